//! Conformance of every backend behind the same traits, against real services: chunk stores (fs, memory, S3
//! on SeaweedFS) and metadata stores (SQLite, PostgreSQL), plus the multi-process races of PostgreSQL.
//! See `support` for how the services are found or started (never skipped).

mod support;

use bytes::Bytes;
use futures::StreamExt;
use isr_format::Tag;
use isr_store::meta::*;
use isr_store::{
    ChunkStore, Durability, FsChunkStore, MemChunkStore, SqliteMetaStore, StoreError, VerifyingStore,
};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use support::*;

// ---------------------------------------------------------------------------------------------------------
// Chunk stores

async fn chunk_conformance(store: &dyn ChunkStore) {
    assert!(store.list().await.unwrap().is_empty(), "a fresh store is empty");
    let (t1, c1) = encoded_chunk(1);
    let (t2, c2) = encoded_chunk(2);
    let (t3, _) = encoded_chunk(3);
    assert!(store.put(&t1, c1.clone()).await.unwrap(), "first put is new");
    assert!(!store.put(&t1, c1.clone()).await.unwrap(), "second put is not");
    assert!(store.put(&t2, c2.clone()).await.unwrap());
    assert_eq!(store.get(&t1).await.unwrap().unwrap(), c1);
    assert_eq!(store.get(&t2).await.unwrap().unwrap(), c2);
    assert!(store.get(&t3).await.unwrap().is_none());
    assert!(store.contains(&t1).await.unwrap());
    assert!(!store.contains(&t3).await.unwrap());
    let mut listed = store.list().await.unwrap();
    listed.sort();
    let mut want = vec![(t1, c1.len() as u64), (t2, c2.len() as u64)];
    want.sort();
    assert_eq!(listed, want);
    store.delete(&t2).await.unwrap();
    store.delete(&t2).await.unwrap();
    store.delete(&t3).await.unwrap();
    assert!(store.get(&t2).await.unwrap().is_none());
    assert!(!store.contains(&t2).await.unwrap());
    assert_eq!(store.list().await.unwrap(), vec![(t1, c1.len() as u64)]);
    // Racing puts of one tag: all succeed, the chunk is whole.
    let (t4, c4) = encoded_chunk(4);
    let puts = (0..8).map(|_| store.put(&t4, c4.clone()));
    let results = futures::future::join_all(puts).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert!(results.iter().any(|r| *r.as_ref().unwrap()));
    assert_eq!(store.get(&t4).await.unwrap().unwrap(), c4);
}

#[tokio::test]
async fn chunks_fs() {
    let dir = tempfile::tempdir().unwrap();
    chunk_conformance(&FsChunkStore::open(dir.path(), Durability::Fsync).unwrap()).await;
}

#[tokio::test]
async fn chunks_mem() {
    chunk_conformance(&MemChunkStore::new()).await;
}

#[tokio::test]
async fn chunks_s3() {
    let store = s3_store();
    chunk_conformance(&store).await;
    // Another prefix of the same bucket sees none of it.
    assert!(s3_store().list().await.unwrap().is_empty());
}

#[tokio::test]
async fn chunks_s3_verifying() {
    let s3 = s3_store();
    let store = VerifyingStore::new(s3.clone());
    chunk_conformance(&store).await;
    let (t1, c1) = encoded_chunk(11);
    let (_, c2) = encoded_chunk(12);
    assert!(matches!(store.put(&t1, c2.clone()).await, Err(StoreError::Integrity { .. })));
    assert!(!s3.contains(&t1).await.unwrap(), "wrong bytes were not stored");
    // Corruption in the bucket is reported, never returned.
    assert!(s3.put(&t1, c2).await.unwrap());
    assert!(matches!(store.get(&t1).await, Err(StoreError::Integrity { .. })));
    s3.delete(&t1).await.unwrap();
    assert!(store.put(&t1, c1.clone()).await.unwrap());
    assert_eq!(store.get(&t1).await.unwrap().unwrap(), c1);
}

/// More objects than one S3 listing page (1000) holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunks_s3_list_pages() {
    let store = s3_store();
    let items: Vec<(Tag, Bytes)> = (0..1100u32)
        .map(|i| {
            let data = Bytes::from(i.to_le_bytes().to_vec());
            (Tag::of(&data), data)
        })
        .collect();
    let results: Vec<_> = futures::stream::iter(items.iter().map(|(t, d)| store.put(t, d.clone())))
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(results.iter().all(|r| matches!(r, Ok(true))));
    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), items.len());
    let want: HashSet<(Tag, u64)> = items.iter().map(|(t, _)| (*t, 4)).collect();
    assert_eq!(listed.into_iter().collect::<HashSet<_>>(), want);
}

// ---------------------------------------------------------------------------------------------------------
// Metadata stores

fn lock(client: &str) -> LockInfo {
    LockInfo {
        lock_id: unique("lock-"),
        holder: format!("host of {client}"),
        client_id: client.to_owned(),
        since_unix: 1000,
    }
}

/// A forced release, as `isr-server unlock` makes it.
fn force() -> LockRelease {
    LockRelease::Force { by: "the administrator".into(), now_unix: 3000 }
}

fn new_parcel(user: &str, name: &str, lock: LockInfo) -> NewParcel {
    NewParcel {
        user: user.into(),
        name: name.into(),
        wrapped_keyroot: vec![1, 2, 3],
        recovery_keyroot: Some(vec![4, 5]),
        lock,
        now_unix: 1000,
    }
}

fn new_version(user: &str, parcel: &str, lock_id: &str, base: u64, keyrings: Vec<Tag>) -> NewVersion {
    NewVersion {
        user: user.into(),
        parcel: parcel.into(),
        lock_id: lock_id.into(),
        base_version: base,
        manifest: Bytes::from(format!("manifest on {base}")),
        keyrings,
        client: "client-a".into(),
        comment: format!("on {base}"),
        bytes_uploaded: 77,
        now_unix: 2000 + base as i64,
    }
}

fn present(store: &dyn ChunkStore) -> Presence<'_> {
    Presence { store, delay: Duration::ZERO }
}

async fn meta_users_tokens_settings(m: &dyn MetaStore) {
    assert_eq!(m.setting_or_init("secret", "first".into()).await.unwrap(), "first");
    assert_eq!(m.setting_or_init("secret", "second".into()).await.unwrap(), "first");
    m.add_user("alice", "hash-a", 10).await.unwrap();
    m.add_user("bob", "hash-b", 11).await.unwrap();
    assert!(matches!(m.add_user("alice", "x", 12).await, Err(MetaError::UserExists(_))));
    let users = m.list_users().await.unwrap();
    assert_eq!(users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["alice", "bob"]);
    assert_eq!(
        m.user("alice").await.unwrap(),
        Some(UserRecord { name: "alice".into(), login_hash: "hash-a".into(), created_unix: 10 })
    );
    assert_eq!(m.user("carol").await.unwrap(), None);
    assert!(matches!(m.set_login_hash("carol", "h").await, Err(MetaError::NoSuchUser(_))));

    assert_eq!(m.login_failures("alice").await.unwrap(), LoginFailures::default());
    assert_eq!(m.record_login_failure("alice", 50).await.unwrap(), 1);
    assert_eq!(m.record_login_failure("alice", 60).await.unwrap(), 2);
    assert_eq!(m.login_failures("alice").await.unwrap(), LoginFailures { count: 2, last_unix: 60 });
    assert_eq!(m.record_login_failure("nobody", 60).await.unwrap(), 0);
    m.clear_login_failures("alice").await.unwrap();
    assert_eq!(m.login_failures("alice").await.unwrap().count, 0);
    m.record_login_failure("alice", 70).await.unwrap();
    m.set_login_hash("alice", "hash-a2").await.unwrap();
    assert_eq!(m.user("alice").await.unwrap().unwrap().login_hash, "hash-a2");
    assert_eq!(m.login_failures("alice").await.unwrap().count, 0, "a new secret clears failures");

    m.add_token([1; 32], "alice", 100).await.unwrap();
    m.add_token([2; 32], "alice", 200).await.unwrap();
    m.add_token([3; 32], "bob", 300).await.unwrap();
    assert!(matches!(m.add_token([4; 32], "carol", 100).await, Err(MetaError::NoSuchUser(_))));
    assert_eq!(m.token([1; 32], 99).await.unwrap(), Some(("alice".into(), 100)));
    assert_eq!(m.token([1; 32], 100).await.unwrap(), None, "expired");
    assert_eq!(m.token([9; 32], 0).await.unwrap(), None);
    assert_eq!(m.purge_expired_tokens(150).await.unwrap(), 1);
    assert_eq!(m.token([2; 32], 150).await.unwrap(), Some(("alice".into(), 200)));

    m.create_parcel(new_parcel("alice", "p", lock("c1"))).await.unwrap();
    m.remove_user("alice").await.unwrap();
    assert!(matches!(m.remove_user("alice").await, Err(MetaError::NoSuchUser(_))));
    assert_eq!(m.token([2; 32], 150).await.unwrap(), None, "tokens go with the user");
    assert!(m.list_parcels(None).await.unwrap().is_empty(), "parcels go with the user");
    assert_eq!(m.token([3; 32], 150).await.unwrap(), Some(("bob".into(), 300)));
}

async fn meta_parcels_and_locks(m: &dyn MetaStore) {
    m.add_user("alice", "h", 1).await.unwrap();
    m.add_user("bob", "h", 1).await.unwrap();
    let l1 = lock("client-1");
    m.create_parcel(new_parcel("alice", "p1", l1.clone())).await.unwrap();
    m.create_parcel(new_parcel("alice", "p2", lock("client-1"))).await.unwrap();
    m.create_parcel(new_parcel("bob", "p1", lock("client-9"))).await.unwrap();
    assert!(matches!(
        m.create_parcel(new_parcel("alice", "p1", lock("x"))).await,
        Err(MetaError::ParcelExists(_))
    ));
    assert!(matches!(
        m.create_parcel(new_parcel("carol", "p1", lock("x"))).await,
        Err(MetaError::NoSuchUser(_))
    ));
    let all = m.list_parcels(None).await.unwrap();
    assert_eq!(
        all.iter().map(|p| format!("{}/{}", p.user, p.name)).collect::<Vec<_>>(),
        ["alice/p1", "alice/p2", "bob/p1"]
    );
    let mine = m.list_parcels(Some("alice")).await.unwrap();
    assert_eq!(mine.len(), 2);
    assert_eq!(mine[0].head, 0);
    assert_eq!(mine[0].lock.as_ref(), Some(&l1));
    let d = m.parcel("alice", "p1").await.unwrap();
    assert_eq!(
        (d.wrapped_keyroot.as_slice(), d.recovery_keyroot.as_deref()),
        (&[1, 2, 3][..], Some(&[4, 5][..]))
    );
    assert!(matches!(m.parcel("alice", "nope").await, Err(MetaError::NoSuchParcel(_))));
    assert!(matches!(m.parcel("carol", "p1").await, Err(MetaError::NoSuchParcel(_))));
    m.set_wrapped_keyroot("alice", "p1", &[9, 9]).await.unwrap();
    assert_eq!(m.parcel("alice", "p1").await.unwrap().wrapped_keyroot, vec![9, 9]);
    assert!(matches!(m.set_wrapped_keyroot("alice", "nope", &[1]).await, Err(MetaError::NoSuchParcel(_))));
    assert_eq!(m.locks_held().await.unwrap(), 3);

    // The creator holds the lock; re-locking by the same client is idempotent and returns the held lock.
    assert_eq!(m.acquire_lock("alice", "p1", lock("client-1")).await.unwrap(), l1);
    match m.acquire_lock("alice", "p1", lock("client-2")).await {
        Err(MetaError::Locked { lock, .. }) => assert_eq!(lock, l1),
        other => panic!("expected Locked, got {other:?}"),
    }
    // A wrong id while another lock is held: told who holds it (check_lock).
    assert!(matches!(
        m.release_lock("alice", "p1", LockRelease::Id("wrong".into())).await,
        Err(MetaError::Locked { .. })
    ));
    m.release_lock("alice", "p1", LockRelease::Id(l1.lock_id.clone())).await.unwrap();
    assert!(matches!(
        m.release_lock("alice", "p1", LockRelease::Id(l1.lock_id.clone())).await,
        Err(MetaError::LockMismatch(_))
    ));
    assert_eq!(m.locks_held().await.unwrap(), 2);
    let l2 = lock("client-2");
    assert_eq!(m.acquire_lock("alice", "p1", l2.clone()).await.unwrap(), l2);
    assert_eq!(m.parcel("alice", "p1").await.unwrap().info.lock, Some(l2.clone()));
    m.release_lock("alice", "p1", force()).await.unwrap();
    assert_eq!(m.parcel("alice", "p1").await.unwrap().info.lock, None);
    m.release_lock("alice", "p1", force()).await.unwrap();
    assert!(matches!(m.acquire_lock("alice", "nope", lock("c")).await, Err(MetaError::NoSuchParcel(_))));

    // Deleting: refused while another client holds the lock.
    assert!(matches!(m.delete_parcel("alice", "p2", Some("client-2")).await, Err(MetaError::Locked { .. })));
    assert!(matches!(m.delete_parcel("alice", "p2", None).await, Err(MetaError::Locked { .. })));
    m.delete_parcel("alice", "p2", Some("client-1")).await.unwrap();
    m.delete_parcel("alice", "p1", None).await.unwrap();
    assert!(matches!(m.delete_parcel("alice", "p1", None).await, Err(MetaError::NoSuchParcel(_))));
    assert_eq!(m.list_parcels(Some("alice")).await.unwrap(), vec![]);
}

async fn meta_commits(m: &dyn MetaStore) {
    let chunks = MemChunkStore::new();
    m.add_user("u", "h", 1).await.unwrap();
    let l = lock("c1");
    m.create_parcel(new_parcel("u", "p", l.clone())).await.unwrap();
    let (a, da) = fake_chunk();
    let (b, db) = fake_chunk();
    let (c, dc) = fake_chunk();
    for (t, d) in [(a, &da), (b, &db)] {
        chunks.put(&t, d.clone()).await.unwrap();
    }
    let (k1, kd1) = keyring(&[a, b]);
    assert!(m.put_keyring("u", "p", &l.lock_id, k1, kd1.clone()).await.unwrap());
    assert!(!m.put_keyring("u", "p", &l.lock_id, k1, kd1.clone()).await.unwrap());
    assert_eq!(m.keyring("u", "p", k1).await.unwrap(), Some(kd1.clone()));
    assert_eq!(m.keyring("u", "p", Tag([5; 32])).await.unwrap(), None);
    assert!(matches!(
        m.put_keyring("u", "nope", &l.lock_id, k1, kd1.clone()).await,
        Err(MetaError::NoSuchParcel(_))
    ));

    // Refusals, in order: lock, base, keyrings, chunks.
    let bad_lock = new_version("u", "p", "wrong", 0, vec![k1]);
    assert!(matches!(m.commit_version(bad_lock, &present(&chunks)).await, Err(MetaError::Locked { .. })));
    let stale = new_version("u", "p", &l.lock_id, 3, vec![k1]);
    assert!(matches!(
        m.commit_version(stale, &present(&chunks)).await,
        Err(MetaError::StaleBase { base: 3, head: 0 })
    ));
    let no_keyring = new_version("u", "p", &l.lock_id, 0, vec![k1, Tag([6; 32])]);
    match m.commit_version(no_keyring, &present(&chunks)).await {
        Err(MetaError::MissingKeyrings(k)) => assert_eq!(k, vec![Tag([6; 32])]),
        other => panic!("expected MissingKeyrings, got {other:?}"),
    }
    let (k2, kd2) = keyring(&[a, c]);
    m.put_keyring("u", "p", &l.lock_id, k2, kd2).await.unwrap();
    match m.commit_version(new_version("u", "p", &l.lock_id, 0, vec![k2]), &present(&chunks)).await {
        Err(MetaError::MissingChunks(t)) => assert_eq!(t, vec![c]),
        other => panic!("expected MissingChunks, got {other:?}"),
    }
    assert!(m.versions("u", "p").await.unwrap().is_empty(), "refused commits leave nothing");

    assert_eq!(
        m.commit_version(new_version("u", "p", &l.lock_id, 0, vec![k1]), &present(&chunks)).await.unwrap(),
        1
    );
    chunks.put(&c, dc.clone()).await.unwrap();
    assert_eq!(
        m.commit_version(new_version("u", "p", &l.lock_id, 1, vec![k2, k2]), &present(&chunks))
            .await
            .unwrap(),
        2
    );
    let stale = new_version("u", "p", &l.lock_id, 1, vec![k1]);
    assert!(matches!(
        m.commit_version(stale, &present(&chunks)).await,
        Err(MetaError::StaleBase { base: 1, head: 2 })
    ));
    let vs = m.versions("u", "p").await.unwrap();
    assert_eq!(vs.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(
        (vs[0].client.as_str(), vs[0].bytes_uploaded, vs[0].comment.as_str()),
        ("client-a", 77, "on 0")
    );
    assert_eq!(m.manifest("u", "p", VersionSel::Head).await.unwrap(), (2, Bytes::from("manifest on 1")));
    assert_eq!(m.manifest("u", "p", VersionSel::Number(1)).await.unwrap(), (1, Bytes::from("manifest on 0")));
    assert!(matches!(
        m.manifest("u", "p", VersionSel::Number(9)).await,
        Err(MetaError::NoSuchVersion { version: 9, .. })
    ));
    assert_eq!(m.parcel("u", "p").await.unwrap().info.head, 2);

    // Rollback: needs the lock id while locked; repeats the old manifest and keyrings as a new head.
    let rb = |lock_id: Option<String>, version| Rollback {
        user: "u".into(),
        parcel: "p".into(),
        version,
        lock_id,
        client: "admin".into(),
        now_unix: 5000,
    };
    assert!(matches!(m.rollback(rb(None, 1)).await, Err(MetaError::Locked { .. })));
    assert!(matches!(m.rollback(rb(Some("wrong".into()), 1)).await, Err(MetaError::Locked { .. })));
    assert!(matches!(
        m.rollback(rb(Some(l.lock_id.clone()), 7)).await,
        Err(MetaError::NoSuchVersion { version: 7, .. })
    ));
    assert_eq!(m.rollback(rb(Some(l.lock_id.clone()), 1)).await.unwrap(), 3);
    assert_eq!(m.manifest("u", "p", VersionSel::Head).await.unwrap(), (3, Bytes::from("manifest on 0")));
    assert_eq!(m.versions("u", "p").await.unwrap()[2].comment, "rollback to version 1");
    m.release_lock("u", "p", force()).await.unwrap();
    assert_eq!(m.rollback(rb(None, 2)).await.unwrap(), 4, "an unlocked parcel needs no lock id");

    let mut refd = m.referenced_keyrings().await.unwrap();
    refd.sort();
    let mut want = vec![("u".to_string(), "p".to_string(), k1), ("u".into(), "p".into(), k2)];
    want.sort();
    assert_eq!(refd, want);

    // Prune: never the head; keyrings only the pruned versions named go with them.
    assert!(matches!(m.prune("u", "p", 0).await, Err(MetaError::Invalid(_))));
    assert_eq!(m.prune("u", "p", 10).await.unwrap(), PruneStats::default());
    assert_eq!(m.prune("u", "p", 2).await.unwrap(), PruneStats { versions_deleted: 2, keyrings_deleted: 0 });
    assert_eq!(m.prune("u", "p", 1).await.unwrap(), PruneStats { versions_deleted: 1, keyrings_deleted: 1 });
    assert_eq!(m.versions("u", "p").await.unwrap().iter().map(|v| v.version).collect::<Vec<_>>(), [4]);
    assert_eq!(m.keyring("u", "p", k1).await.unwrap(), None);
    assert!(m.keyring("u", "p", k2).await.unwrap().is_some());
    assert_eq!(m.manifest("u", "p", VersionSel::Head).await.unwrap().0, 4);

    // Abandoned uploads: unreferenced keyrings older than the cut-off (uploaded under a lock).
    let l = m.acquire_lock("u", "p", lock("c1")).await.unwrap();
    let (k3, kd3) = keyring(&[c]);
    m.put_keyring("u", "p", &l.lock_id, k3, kd3).await.unwrap();
    assert_eq!(m.purge_unreferenced_keyrings(0).await.unwrap(), 0, "too young");
    assert_eq!(m.purge_unreferenced_keyrings(i64::MAX).await.unwrap(), 1);
    assert_eq!(m.keyring("u", "p", k3).await.unwrap(), None);
    assert!(m.keyring("u", "p", k2).await.unwrap().is_some(), "referenced keyrings stay");
}

/// The gc grace period of the tests that hold no chunks (it matters only to holds).
const GRACE: i64 = 3600;

/// One sweep over `chunks`: mark, candidates, sweep with `grace_secs` for holds. Deleted and held tags are
/// sorted.
async fn sweep(m: &dyn MetaStore, chunks: &dyn ChunkStore, grace_secs: i64) -> Swept {
    let mark = m.gc_mark().await.unwrap();
    let candidates: Vec<Tag> = chunks
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| !mark.referenced.contains(t))
        .collect();
    let mut swept = m.gc_sweep(&mark, candidates, grace_secs, &Sweeper(chunks)).await.unwrap();
    swept.deleted.sort();
    swept
}

/// One full gc over `chunks`: mark, candidates, sweep. Returns the tags deleted.
async fn gc(m: &dyn MetaStore, chunks: &dyn ChunkStore) -> Vec<Tag> {
    sweep(m, chunks, GRACE).await.deleted
}

fn sorted<const N: usize>(tags: [Tag; N]) -> Vec<Tag> {
    let mut v = tags.to_vec();
    v.sort();
    v
}

/// Chunks held by a lock (uploaded ahead of the version that will reference them) survive gc while the lock
/// lasts and for the grace period after a gc run first saw it ended; the index rows of held tags stay too.
async fn meta_held_chunks(m: &dyn MetaStore, chunks: &dyn ChunkStore) {
    m.add_user("u", "h", 1).await.unwrap();
    m.add_user("v", "h", 1).await.unwrap();
    let l = lock("c1");
    m.create_parcel(new_parcel("u", "p", l.clone())).await.unwrap();
    let [(a, da), (b, db), (c, dc)] = [(); 3].map(|_| fake_chunk());
    // Only the parcel's current lock holds, as only it commits; another user's parcel is a missing one.
    assert!(matches!(m.hold_chunks("u", "p", "wrong", &[a], 10).await, Err(MetaError::Locked { .. })));
    assert!(matches!(
        m.hold_chunks("u", "nope", &l.lock_id, &[a], 10).await,
        Err(MetaError::NoSuchParcel(_))
    ));
    assert!(matches!(m.hold_chunks("v", "p", &l.lock_id, &[a], 10).await, Err(MetaError::NoSuchParcel(_))));
    m.hold_chunks("u", "p", &l.lock_id, &[a, b], 10).await.unwrap();
    m.hold_chunks("u", "p", &l.lock_id, &[b], 11).await.unwrap();
    m.hold_chunks("u", "p", &l.lock_id, &[], 11).await.unwrap();
    // Uploaded as a PUT does (index rows as on S3), after the hold.
    m.chunk_intent(&[a, b, c], now()).await.unwrap();
    for (t, d) in [(a, da.clone()), (b, db), (c, dc)] {
        chunks.put(&t, d).await.unwrap();
    }
    m.chunk_stored(&[(a, 1), (b, 1), (c, 1)]).await.unwrap();

    // Locked: held tags survive sweeps with no grace at all, index rows included; c is not held.
    let swept = sweep(m, chunks, 0).await;
    assert_eq!((swept.deleted, swept.held), (vec![c], sorted([a, b])));
    assert_eq!(m.chunks_indexed(&[a, b, c]).await.unwrap(), HashSet::from([a, b]));
    assert_eq!(m.gc_end_holds(0).await.unwrap(), 0, "the lock is current");
    assert_eq!(sweep(m, chunks, 0).await.held, sorted([a, b]));

    // Released: the first sweep spares them (no run has recorded the end yet), whatever the grace.
    m.release_lock("u", "p", LockRelease::Id(l.lock_id.clone())).await.unwrap();
    assert!(matches!(m.hold_chunks("u", "p", &l.lock_id, &[c], 12).await, Err(MetaError::LockMismatch(_))));
    assert_eq!(sweep(m, chunks, 0).await, Swept { deleted: vec![], held: sorted([a, b]) });
    assert_eq!(m.gc_end_holds(GRACE).await.unwrap(), 0, "ended now: recorded, kept for the grace");
    // Within the grace period from that record: spared.
    assert_eq!(sweep(m, chunks, GRACE).await, Swept { deleted: vec![], held: sorted([a, b]) });
    assert_eq!(m.gc_end_holds(GRACE).await.unwrap(), 0);
    // Past it: deleted with their index rows, and the holds go.
    assert_eq!(sweep(m, chunks, 0).await, Swept { deleted: sorted([a, b]), held: vec![] });
    assert!(!chunks.contains(&a).await.unwrap() && !chunks.contains(&b).await.unwrap());
    assert!(m.chunks_indexed(&[a, b]).await.unwrap().is_empty());
    assert_eq!(m.gc_end_holds(0).await.unwrap(), 2);

    // A broken lock's holds end the same way; the parcel's next lock holds on its own.
    let l2 = m.acquire_lock("u", "p", lock("c2")).await.unwrap();
    m.hold_chunks("u", "p", &l2.lock_id, &[a], 20).await.unwrap();
    chunks.put(&a, da).await.unwrap();
    m.release_lock("u", "p", force()).await.unwrap();
    assert!(matches!(
        m.hold_chunks("u", "p", &l2.lock_id, &[a], 21).await,
        Err(MetaError::LockBroken { .. })
    ));
    assert_eq!(sweep(m, chunks, 0).await.held, vec![a], "broken, its end not recorded yet");
    assert_eq!(m.gc_end_holds(0).await.unwrap(), 0, "l2's end recorded");
    let l3 = m.acquire_lock("u", "p", lock("c3")).await.unwrap();
    m.hold_chunks("u", "p", &l3.lock_id, &[a], 22).await.unwrap();
    assert_eq!(sweep(m, chunks, 0).await.held, vec![a], "l2's hold has expired, l3's holds");
    assert_eq!(m.gc_end_holds(0).await.unwrap(), 1, "l2's hold removed, l3's kept");
    // Deleting the parcel (an undone create) removes its holds.
    m.delete_parcel("u", "p", Some("c3")).await.unwrap();
    assert_eq!(sweep(m, chunks, 0).await, Swept { deleted: vec![a], held: vec![] });
}

async fn meta_gc(m: &dyn MetaStore, chunks: &dyn ChunkStore) {
    m.add_user("u", "h", 1).await.unwrap();
    let l = lock("c1");
    m.create_parcel(new_parcel("u", "p", l.clone())).await.unwrap();
    let (a, da) = fake_chunk();
    let (b, db) = fake_chunk();
    let (garbage, dg) = fake_chunk();
    for (t, d) in [(a, da), (b, db), (garbage, dg)] {
        chunks.put(&t, d).await.unwrap();
    }
    let (k1, kd1) = keyring(&[a, b, a]);
    m.put_keyring("u", "p", &l.lock_id, k1, kd1).await.unwrap();
    m.commit_version(new_version("u", "p", &l.lock_id, 0, vec![k1]), &present(chunks)).await.unwrap();
    assert_eq!(gc(m, chunks).await, vec![garbage]);
    let mut left: Vec<Tag> = chunks.list().await.unwrap().into_iter().map(|(t, _)| t).collect();
    left.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(left, want);

    // A version committed after the mark protects its chunks from that mark's sweep.
    let mark = m.gc_mark().await.unwrap();
    let (c, dc) = fake_chunk();
    chunks.put(&c, dc).await.unwrap();
    let (k2, kd2) = keyring(&[a, c]);
    m.put_keyring("u", "p", &l.lock_id, k2, kd2).await.unwrap();
    m.commit_version(new_version("u", "p", &l.lock_id, 1, vec![k2]), &present(chunks)).await.unwrap();
    let stale_candidates = vec![c];
    assert_eq!(m.gc_sweep(&mark, stale_candidates, GRACE, &Sweeper(chunks)).await.unwrap(), Swept::default());
    assert!(chunks.contains(&c).await.unwrap());

    // After a prune, chunks only the pruned version named are garbage.
    m.prune("u", "p", 1).await.unwrap();
    assert_eq!(gc(m, chunks).await, vec![b]);
    assert!(chunks.contains(&a).await.unwrap() && chunks.contains(&c).await.unwrap());
}

#[tokio::test]
async fn meta_sqlite_users_tokens_settings() {
    let dir = tempfile::tempdir().unwrap();
    meta_users_tokens_settings(&SqliteMetaStore::open(dir.path().join("m.db")).unwrap()).await;
}

#[tokio::test]
async fn meta_pg_users_tokens_settings() {
    meta_users_tokens_settings(&pg_store().await.0).await;
}

#[tokio::test]
async fn meta_sqlite_parcels_and_locks() {
    let dir = tempfile::tempdir().unwrap();
    meta_parcels_and_locks(&SqliteMetaStore::open(dir.path().join("m.db")).unwrap()).await;
}

#[tokio::test]
async fn meta_pg_parcels_and_locks() {
    meta_parcels_and_locks(&pg_store().await.0).await;
}

#[tokio::test]
async fn meta_sqlite_commits() {
    let dir = tempfile::tempdir().unwrap();
    meta_commits(&SqliteMetaStore::open(dir.path().join("m.db")).unwrap()).await;
}

#[tokio::test]
async fn meta_pg_commits() {
    meta_commits(&pg_store().await.0).await;
}

#[tokio::test]
async fn meta_sqlite_gc() {
    let dir = tempfile::tempdir().unwrap();
    meta_gc(&SqliteMetaStore::open(dir.path().join("m.db")).unwrap(), &MemChunkStore::new()).await;
}

#[tokio::test]
async fn meta_pg_gc_with_s3_chunks() {
    meta_gc(&pg_store().await.0, &s3_store()).await;
}

#[tokio::test]
async fn meta_sqlite_held_chunks() {
    let dir = tempfile::tempdir().unwrap();
    meta_held_chunks(&SqliteMetaStore::open(dir.path().join("m.db")).unwrap(), &MemChunkStore::new()).await;
}

#[tokio::test]
async fn meta_pg_held_chunks_with_s3_chunks() {
    meta_held_chunks(&pg_store().await.0, &s3_store()).await;
}

// ---------------------------------------------------------------------------------------------------------
// PostgreSQL shared by several server processes (each PgMetaStore has its own connections).

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_open_concurrently_creates_the_schema_once() {
    let url = pg_database().await;
    let opens = (0..6).map(|_| isr_store::PgMetaStore::open(&url));
    for r in futures::future::join_all(opens).await {
        r.unwrap();
    }
    let (a, b) = (
        isr_store::PgMetaStore::open(&url).await.unwrap(),
        isr_store::PgMetaStore::open(&url).await.unwrap(),
    );
    // The convergence secret: generated once, whoever asks first.
    let (x, y) =
        tokio::join!(a.setting_or_init("k", "from-a".into()), b.setting_or_init("k", "from-b".into()));
    assert_eq!(x.unwrap(), y.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_two_processes_race_for_a_lock() {
    let (a, url) = pg_store().await;
    let b = isr_store::PgMetaStore::open(&url).await.unwrap();
    a.add_user("u", "h", 1).await.unwrap();
    a.create_parcel(new_parcel("u", "p", lock("creator"))).await.unwrap();
    let (a, b) = (Arc::new(a), Arc::new(b));
    for round in 0..100 {
        b.release_lock("u", "p", force()).await.unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let race = |m: Arc<isr_store::PgMetaStore>, who: &'static str| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                m.acquire_lock("u", "p", lock(who)).await
            })
        };
        let (ra, rb) = (race(a.clone(), "a"), race(b.clone(), "b"));
        let (ra, rb) = (ra.await.unwrap(), rb.await.unwrap());
        let winner = match (&ra, &rb) {
            (Ok(w), Err(MetaError::Locked { lock, .. })) | (Err(MetaError::Locked { lock, .. }), Ok(w)) => {
                assert_eq!(w, lock, "the loser sees the winner's lock");
                w.clone()
            }
            other => panic!("round {round}: expected exactly one winner, got {other:?}"),
        };
        assert_eq!(a.parcel("u", "p").await.unwrap().info.lock, Some(winner));
    }
}

/// gc on one process while another commits: no chunk a version references is ever lost.
async fn gc_races_commits(committer: &dyn MetaStore, collector: &dyn MetaStore, chunks: &dyn ChunkStore) {
    committer.add_user("u", "h", 1).await.unwrap();
    let l = lock("c1");
    committer.create_parcel(new_parcel("u", "p", l.clone())).await.unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let commits = async {
        let mut prev: Vec<Tag> = Vec::new();
        let mut head = 0;
        for _ in 0..25 {
            // Each version keeps half the previous chunks and adds new ones; garbage appears on the side.
            let mut tags: Vec<Tag> = prev.iter().step_by(2).copied().collect();
            for _ in 0..4 {
                let (t, d) = fake_chunk();
                chunks.put(&t, d).await.unwrap();
                tags.push(t);
                let (g, dg) = fake_chunk();
                chunks.put(&g, dg).await.unwrap();
            }
            let (k, kd) = keyring(&tags);
            committer.put_keyring("u", "p", &l.lock_id, k, kd).await.unwrap();
            let slow = Presence { store: chunks, delay: Duration::from_millis(5) };
            loop {
                match committer.commit_version(new_version("u", "p", &l.lock_id, head, vec![k]), &slow).await
                {
                    Ok(n) => {
                        head = n;
                        break;
                    }
                    // gc removed uploaded-but-uncommitted chunks: upload again, as a client does.
                    Err(MetaError::MissingChunks(missing)) => {
                        for t in missing {
                            // Metadata tests do not verify chunk bytes: any bytes will do.
                            chunks.put(&t, Bytes::from_static(b"re-uploaded")).await.unwrap();
                        }
                    }
                    Err(e) => panic!("commit failed: {e}"),
                }
            }
            prev = tags;
            // Let the collector in between commits too (SQLite's busy waits could otherwise starve it).
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let sweeps = async {
        let mut deleted = 0;
        let mut rounds = 0;
        // Sweeps during the commits, and at least one that starts after them (it finds their garbage), so
        // the counts below never depend on how fast either side runs.
        loop {
            let commits_done = done.load(std::sync::atomic::Ordering::SeqCst);
            deleted += gc(collector, chunks).await.len();
            rounds += 1;
            if commits_done && rounds > 1 {
                break;
            }
        }
        (rounds, deleted)
    };
    let ((), (rounds, deleted)) = tokio::join!(commits, sweeps);
    assert!(rounds > 1 && deleted > 0, "gc ran {rounds} rounds, deleted {deleted}");
    // Every chunk every version references is still there.
    let mark = collector.gc_mark().await.unwrap();
    assert!(!mark.referenced.is_empty());
    for t in &mark.referenced {
        assert!(chunks.contains(t).await.unwrap(), "referenced chunk {t:?} was lost");
    }
    gc(collector, chunks).await;
    let left: HashSet<Tag> = chunks.list().await.unwrap().into_iter().map(|(t, _)| t).collect();
    assert_eq!(left, mark.referenced, "a final gc leaves exactly the referenced chunks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_gc_on_one_process_while_another_commits() {
    let (a, url) = pg_store().await;
    let b = isr_store::PgMetaStore::open(&url).await.unwrap();
    gc_races_commits(&a, &b, &s3_store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_gc_on_one_handle_while_another_commits() {
    let dir = tempfile::tempdir().unwrap();
    let a = SqliteMetaStore::open(dir.path().join("m.db")).unwrap();
    let b = SqliteMetaStore::open(dir.path().join("m.db")).unwrap();
    gc_races_commits(&a, &b, &MemChunkStore::new()).await;
}

// ---------------------------------------------------------------------------------------------------------
// Broken locks, undoing a create, login reservations: the same rules on every metadata backend.

fn assert_broken(r: Result<impl std::fmt::Debug, MetaError>, by: &str, current: Option<&LockInfo>) {
    match r {
        Err(MetaError::LockBroken { broken, current: now, .. }) => {
            assert_eq!(broken.by, by);
            assert_eq!(now.as_deref(), current);
        }
        other => panic!("expected LockBroken by {by}, got {other:?}"),
    }
}

async fn meta_broken_locks(m: &dyn MetaStore) {
    let chunks = MemChunkStore::new();
    m.add_user("u", "h", 1).await.unwrap();
    let l1 = lock("c1");
    m.create_parcel(new_parcel("u", "p", l1.clone())).await.unwrap();
    assert_eq!(m.confirm_lock("u", "p", &l1.lock_id).await.unwrap(), l1);
    assert_eq!(m.broken_lock("u", "p").await.unwrap(), None);
    let (t, d) = fake_chunk();
    chunks.put(&t, d).await.unwrap();
    let (k1, kd1) = keyring(&[t]);
    m.put_keyring("u", "p", &l1.lock_id, k1, kd1.clone()).await.unwrap();

    // Broken by another client: every operation carrying the old id is told who broke it.
    let by_laptop = LockRelease::Force { by: "laptop".into(), now_unix: 3000 };
    m.release_lock("u", "p", by_laptop).await.unwrap();
    let broken = m.broken_lock("u", "p").await.unwrap().unwrap();
    assert_eq!(
        (broken.lock_id.as_str(), broken.by.as_str(), broken.unix),
        (l1.lock_id.as_str(), "laptop", 3000)
    );
    assert_broken(m.confirm_lock("u", "p", &l1.lock_id).await, "laptop", None);
    assert_broken(m.put_keyring("u", "p", &l1.lock_id, k1, kd1.clone()).await, "laptop", None);
    assert_broken(
        m.commit_version(new_version("u", "p", &l1.lock_id, 0, vec![k1]), &present(&chunks)).await,
        "laptop",
        None,
    );
    assert_broken(m.release_lock("u", "p", LockRelease::Id(l1.lock_id.clone())).await, "laptop", None);
    let rb = |lock_id: &str| Rollback {
        user: "u".into(),
        parcel: "p".into(),
        version: 1,
        lock_id: Some(lock_id.into()),
        client: "c1".into(),
        now_unix: 3100,
    };
    assert_broken(m.rollback(rb(&l1.lock_id)).await, "laptop", None);
    assert!(m.versions("u", "p").await.unwrap().is_empty(), "nothing was committed");
    // An id never held is just unknown.
    assert!(matches!(m.confirm_lock("u", "p", "never").await, Err(MetaError::LockMismatch(_))));
    // Breaking an unlocked parcel changes nothing.
    m.release_lock("u", "p", force()).await.unwrap();
    assert_eq!(m.broken_lock("u", "p").await.unwrap().unwrap().by, "laptop");

    // Someone else holds it now: the broken holder learns that too; other ids see the holder.
    let l2 = m.acquire_lock("u", "p", lock("c2")).await.unwrap();
    assert_broken(m.confirm_lock("u", "p", &l1.lock_id).await, "laptop", Some(&l2));
    assert_broken(
        m.commit_version(new_version("u", "p", &l1.lock_id, 0, vec![k1]), &present(&chunks)).await,
        "laptop",
        Some(&l2),
    );
    match m.confirm_lock("u", "p", "never").await {
        Err(MetaError::Locked { lock, .. }) => assert_eq!(lock, l2),
        other => panic!("expected Locked, got {other:?}"),
    }
    assert_eq!(m.confirm_lock("u", "p", &l2.lock_id).await.unwrap(), l2);
    m.put_keyring("u", "p", &l2.lock_id, k1, kd1).await.unwrap();
    assert_eq!(
        m.commit_version(new_version("u", "p", &l2.lock_id, 0, vec![k1]), &present(&chunks)).await.unwrap(),
        1
    );
    // Only the latest break is remembered.
    m.release_lock("u", "p", force()).await.unwrap();
    assert_broken(m.confirm_lock("u", "p", &l2.lock_id).await, "the administrator", None);
    assert!(matches!(m.confirm_lock("u", "p", &l1.lock_id).await, Err(MetaError::LockMismatch(_))));

    // A parcel with versions is never deleted through delete_parcel, whoever asks.
    let l3 = m.acquire_lock("u", "p", lock("c3")).await.unwrap();
    for client in [Some("c3"), Some("other"), None] {
        assert!(matches!(m.delete_parcel("u", "p", client).await, Err(MetaError::HasVersions(_))));
    }
    assert_eq!(m.parcel("u", "p").await.unwrap().info.lock, Some(l3));
    assert_eq!(m.versions("u", "p").await.unwrap().len(), 1);
    // One with none is (an undone create), by its lock holder.
    m.create_parcel(new_parcel("u", "empty", lock("c4"))).await.unwrap();
    assert!(matches!(m.delete_parcel("u", "empty", Some("c5")).await, Err(MetaError::Locked { .. })));
    m.delete_parcel("u", "empty", Some("c4")).await.unwrap();
}

async fn meta_login_reservations(m: &dyn MetaStore) {
    m.add_user("u", "h", 1).await.unwrap();
    let seen = m.login_failures("u").await.unwrap();
    assert!(m.reserve_login_attempt("u", seen, 100).await.unwrap());
    // A second reservation from the same (now stale) state loses: exactly one of racing attempts wins.
    assert!(!m.reserve_login_attempt("u", seen, 100).await.unwrap());
    let now = m.login_failures("u").await.unwrap();
    assert_eq!(now, LoginFailures { count: 1, last_unix: 100 });
    assert!(m.reserve_login_attempt("u", now, 101).await.unwrap());
    assert_eq!(m.login_failures("u").await.unwrap(), LoginFailures { count: 2, last_unix: 101 });
    assert!(!m.reserve_login_attempt("nobody", LoginFailures::default(), 1).await.unwrap());
    m.clear_login_failures("u").await.unwrap();
    assert_eq!(m.login_failures("u").await.unwrap().count, 0);
}

#[tokio::test]
async fn meta_sqlite_broken_locks() {
    let dir = tempfile::tempdir().unwrap();
    meta_broken_locks(&SqliteMetaStore::open(dir.path().join("m.db")).unwrap()).await;
}

#[tokio::test]
async fn meta_pg_broken_locks() {
    meta_broken_locks(&pg_store().await.0).await;
}

#[tokio::test]
async fn meta_sqlite_login_reservations() {
    let dir = tempfile::tempdir().unwrap();
    meta_login_reservations(&SqliteMetaStore::open(dir.path().join("m.db")).unwrap()).await;
}

#[tokio::test]
async fn meta_pg_login_reservations() {
    meta_login_reservations(&pg_store().await.0).await;
}

/// The tables `users` and `parcels` as the first release created them (no broken-lock columns).
const OLD_SCHEMA: &str = "
CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, login_hash TEXT NOT NULL,
    created_unix INTEGER NOT NULL, failed_logins INTEGER NOT NULL DEFAULT 0,
    last_failed_unix INTEGER NOT NULL DEFAULT 0);
CREATE TABLE parcels (id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE, name TEXT NOT NULL,
    created_unix INTEGER NOT NULL, head INTEGER NOT NULL DEFAULT 0, wrapped_keyroot BLOB NOT NULL,
    recovery_keyroot BLOB, lock_id TEXT, lock_holder TEXT, lock_client_id TEXT, lock_since INTEGER,
    UNIQUE (user_id, name));
INSERT INTO users (name, login_hash, created_unix) VALUES ('u', 'h', 1);
INSERT INTO parcels (user_id, name, created_unix, wrapped_keyroot, lock_id, lock_holder, lock_client_id, lock_since)
    VALUES (1, 'p', 1, x'00', 'old-lock', 'old host', 'c1', 5);
";

/// An existing database gets the new columns on open, keeps its rows, and breaks are then remembered.
async fn migrated_store_remembers_breaks(m: &dyn MetaStore) {
    assert_eq!(m.parcel("u", "p").await.unwrap().info.lock.unwrap().holder, "old host");
    assert_eq!(m.broken_lock("u", "p").await.unwrap(), None);
    m.release_lock("u", "p", force()).await.unwrap();
    assert_broken(m.confirm_lock("u", "p", "old-lock").await, "the administrator", None);
    // ... and the network policy column: unset, then settable.
    assert_eq!(m.parcel("u", "p").await.unwrap().network_policy, None);
    m.set_network_policy("u", "p", Some(NetworkPolicy::None)).await.unwrap();
    assert_eq!(m.parcel("u", "p").await.unwrap().network_policy, Some(NetworkPolicy::None));
}

/// The administrator's per-parcel network policy: unset by default, set, changed, cleared, per parcel.
async fn meta_network_policy(m: &dyn MetaStore) {
    m.add_user("u", "h", 1).await.unwrap();
    m.create_parcel(new_parcel("u", "p", lock("c1"))).await.unwrap();
    m.create_parcel(new_parcel("u", "q", lock("c1"))).await.unwrap();
    assert_eq!(m.parcel("u", "p").await.unwrap().network_policy, None);
    m.set_network_policy("u", "p", Some(NetworkPolicy::None)).await.unwrap();
    assert_eq!(m.parcel("u", "p").await.unwrap().network_policy, Some(NetworkPolicy::None));
    assert_eq!(m.parcel("u", "q").await.unwrap().network_policy, None, "only the parcel named");
    m.set_network_policy("u", "p", Some(NetworkPolicy::Nat)).await.unwrap();
    assert_eq!(m.parcel("u", "p").await.unwrap().network_policy, Some(NetworkPolicy::Nat));
    m.set_network_policy("u", "p", None).await.unwrap();
    assert_eq!(m.parcel("u", "p").await.unwrap().network_policy, None);
    assert!(matches!(
        m.set_network_policy("u", "nope", Some(NetworkPolicy::None)).await,
        Err(MetaError::NoSuchParcel(_))
    ));
    assert!(matches!(
        m.set_network_policy("other", "p", Some(NetworkPolicy::None)).await,
        Err(MetaError::NoSuchParcel(_))
    ));
}

#[tokio::test]
async fn meta_sqlite_network_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    meta_network_policy(&SqliteMetaStore::open(&path).unwrap()).await;
    // A stored name this version does not know is refused, never read as "unset" (which would lift it).
    let m = SqliteMetaStore::open(&path).unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("UPDATE parcels SET network_policy = 'bridged' WHERE name = 'p'", [])
        .unwrap();
    match m.parcel("u", "p").await {
        Err(MetaError::Database(why)) => assert!(why.contains("bridged"), "{why}"),
        other => panic!("expected a database error naming the policy, got {other:?}"),
    }
}

#[tokio::test]
async fn meta_pg_network_policy() {
    meta_network_policy(&pg_store().await.0).await;
}

#[tokio::test]
async fn meta_sqlite_migrates_an_old_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    rusqlite::Connection::open(&path).unwrap().execute_batch(OLD_SCHEMA).unwrap();
    migrated_store_remembers_breaks(&SqliteMetaStore::open(&path).unwrap()).await;
    // Opening again (columns present) changes nothing.
    let again = SqliteMetaStore::open(&path).unwrap();
    assert_eq!(again.broken_lock("u", "p").await.unwrap().unwrap().lock_id, "old-lock");
}

#[tokio::test]
async fn meta_pg_migrates_an_old_database() {
    let url = pg_database().await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    let driver = tokio::spawn(conn);
    let old = OLD_SCHEMA
        .replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
        .replace("INTEGER", "BIGINT")
        .replace("BLOB", "BYTEA")
        .replace("x'00'", "'\\x00'::bytea");
    client.batch_execute(&old).await.unwrap();
    drop(client);
    driver.await.unwrap().unwrap();
    migrated_store_remembers_breaks(&isr_store::PgMetaStore::open(&url).await.unwrap()).await;
    let again = isr_store::PgMetaStore::open(&url).await.unwrap();
    assert_eq!(again.broken_lock("u", "p").await.unwrap().unwrap().lock_id, "old-lock");
}

fn mode_of(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn fs_chunks_and_sqlite_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("chunks");
    let store = FsChunkStore::open(&root, Durability::Fsync).unwrap();
    let (t, c) = encoded_chunk(1);
    store.put(&t, c).await.unwrap();
    assert_eq!(mode_of(&root), 0o700);
    assert_eq!(mode_of(&root.join("tmp")), 0o700);
    assert_eq!(mode_of(store.path_of(&t).parent().unwrap()), 0o700);
    assert_eq!(mode_of(&store.path_of(&t)), 0o600);
    // A store made with open modes is tightened when opened.
    use std::os::unix::fs::PermissionsExt;
    let fanout = store.path_of(&t).parent().unwrap().to_owned();
    for d in [&root, &fanout] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    FsChunkStore::open(&root, Durability::Fsync).unwrap();
    assert_eq!((mode_of(&root), mode_of(&fanout)), (0o700, 0o700));

    let db = dir.path().join("meta.sqlite");
    let m = SqliteMetaStore::open(&db).unwrap();
    m.add_user("u", "h", 1).await.unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let p = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
        assert_eq!(mode_of(&p), 0o600, "{}", p.display());
    }
    drop(m);
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    SqliteMetaStore::open(&db).unwrap();
    assert_eq!(mode_of(&db), 0o600);
}

/// The indexes a store has, by name (not those of primary keys and unique constraints).
async fn indexes_of_pg(url: &str) -> Vec<String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let driver = tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()
               AND indexname NOT LIKE '%\\_pkey' AND indexname NOT LIKE '%\\_key' ORDER BY indexname",
            &[],
        )
        .await
        .unwrap();
    drop(client);
    driver.await.unwrap().unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

fn indexes_of_sqlite(path: &std::path::Path) -> Vec<String> {
    let c = rusqlite::Connection::open(path).unwrap();
    let mut st = c
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_autoindex%'
             ORDER BY name",
        )
        .unwrap();
    st.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
}

/// One schema: both backends have the same indexes, and an existing database gets a newer one when opened.
#[tokio::test]
async fn meta_backends_have_the_same_indexes() {
    let (_, url) = pg_store().await;
    let pg = indexes_of_pg(&url).await;
    assert_eq!(pg, ["held_chunks_by_tag", "tokens_by_expiry", "tokens_by_user", "version_keyrings_by_hash"]);
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("m.db");
    SqliteMetaStore::open(&fresh).unwrap();
    assert_eq!(indexes_of_sqlite(&fresh), pg);
    let old = dir.path().join("old.db");
    rusqlite::Connection::open(&old).unwrap().execute_batch(OLD_SCHEMA).unwrap();
    SqliteMetaStore::open(&old).unwrap();
    // Including the index of a table the old schema lacked (held_chunks): the table was added on open.
    assert_eq!(indexes_of_sqlite(&old), pg);
}

// ---------------------------------------------------------------------------------------------------------
// The chunk index (presence of S3 chunks kept in the metadata database)

/// Presence from the chunk index: the commit reads it in its own transaction and never asks the store.
struct IndexPresence;

#[async_trait::async_trait]
impl ChunkPresence for IndexPresence {
    async fn missing(&self, _: Vec<Tag>) -> Result<Vec<Tag>, MetaError> {
        panic!("an indexed commit must not ask the store")
    }
    fn indexed(&self) -> bool {
        true
    }
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

async fn meta_chunk_index(m: &dyn MetaStore) {
    let chunks = MemChunkStore::new();
    let [(a, da), (b, db), (c, dc), (d, _), (e, de)] = [(); 5].map(|_| fake_chunk());
    // a and b PUT completely; c's PUT in flight (pending row, object written); e left pending by a writer
    // that died two hours ago.
    m.chunk_intent(&[a, b, c], now()).await.unwrap();
    m.chunk_intent(&[e], now() - 7200).await.unwrap();
    for (t, data) in [(a, da), (b, db), (c, dc), (e, de)] {
        chunks.put(&t, data).await.unwrap();
    }
    m.chunk_stored(&[(a, 10), (b, 20)]).await.unwrap();
    assert_eq!(m.chunk_intent(&[a, c], now()).await.unwrap(), HashSet::from([a]), "a was present already");
    assert_eq!(m.chunks_indexed(&[a, b, c, d, e]).await.unwrap(), HashSet::from([a, b]));
    // More tags than one query holds.
    let many: Vec<Tag> = (0..700).map(|_| fake_chunk().0).chain([b]).collect();
    assert_eq!(m.chunks_indexed(&many).await.unwrap(), HashSet::from([b]));
    let mut rows: Vec<(Tag, bool)> =
        m.chunk_index().await.unwrap().into_iter().map(|(t, p, _)| (t, p)).collect();
    rows.sort();
    let mut want = vec![(a, true), (b, true), (c, false), (e, false)];
    want.sort();
    assert_eq!(rows, want);

    // Commits read the index: b is present, a chunk without a present row is missing.
    m.add_user("u", "h", 1).await.unwrap();
    let l = lock("c1");
    m.create_parcel(new_parcel("u", "p", l.clone())).await.unwrap();
    let (k1, kd1) = keyring(&[b]);
    m.put_keyring("u", "p", &l.lock_id, k1, kd1).await.unwrap();
    m.commit_version(new_version("u", "p", &l.lock_id, 0, vec![k1]), &IndexPresence).await.unwrap();
    let (k2, kd2) = keyring(&[b, c, d]);
    m.put_keyring("u", "p", &l.lock_id, k2, kd2).await.unwrap();
    match m.commit_version(new_version("u", "p", &l.lock_id, 1, vec![k2]), &IndexPresence).await {
        Err(MetaError::MissingChunks(mut missing)) => {
            missing.sort();
            let mut want = vec![c, d];
            want.sort();
            assert_eq!(missing, want, "pending and absent chunks are missing");
        }
        other => panic!("commit without its chunks: {other:?}"),
    }

    // gc: a (present, unreferenced) and e (stale pending) go with their rows; c (a PUT in flight) stays.
    let mut swept = gc(m, &chunks).await;
    swept.sort();
    let mut want = vec![a, e];
    want.sort();
    assert_eq!(swept, want);
    assert!(!chunks.contains(&a).await.unwrap() && chunks.contains(&c).await.unwrap());
    assert!(chunks.contains(&b).await.unwrap(), "referenced");
    let mut rows: Vec<Tag> = m.chunk_index().await.unwrap().into_iter().map(|(t, _, _)| t).collect();
    rows.sort();
    let mut want = vec![b, c];
    want.sort();
    assert_eq!(rows, want);
    // A PUT of a that finishes after the sweep removed its row does not bring the row back (its object is
    // gone): a is reported missing, never present.
    m.chunk_stored(&[(a, 10)]).await.unwrap();
    assert!(m.chunks_indexed(&[a]).await.unwrap().is_empty());
    // A PUT that begins after the mark (a pending row) keeps its object from that mark's sweep.
    let mark = m.gc_mark().await.unwrap();
    m.chunk_intent(&[c], now()).await.unwrap();
    assert_eq!(m.gc_sweep(&mark, vec![c], GRACE, &Sweeper(&chunks)).await.unwrap(), Swept::default());
    assert!(chunks.contains(&c).await.unwrap());

    // check --repair removes present rows of chunks the store lacks.
    assert_eq!(m.chunk_index_forget(&[b, c, d]).await.unwrap(), 1, "only b's row said present");
    assert!(m.chunks_indexed(&[b]).await.unwrap().is_empty());
}

#[tokio::test]
async fn meta_sqlite_chunk_index() {
    let dir = tempfile::tempdir().unwrap();
    meta_chunk_index(&SqliteMetaStore::open(dir.path().join("m.db")).unwrap()).await;
}

#[tokio::test]
async fn meta_pg_chunk_index() {
    meta_chunk_index(&pg_store().await.0).await;
}
