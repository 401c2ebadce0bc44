//! Chunks held by a parcel's lock (`POST /parcels/{name}/held`, trickle reintegration): uploaded long before
//! the version that references them, they survive gc for as long as the lock lasts and the grace period
//! after, with two servers of one deployment: the client talks to server A, gc runs on server B's storage.

mod common;

use common::{version, Answer, Api, Backend, TestServer, Version};
use isr_format::Tag;
use isr_server::admin::{gc, GcReport};
use isr_wire::limits::MAX_HELD_TAGS;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_held_chunks_outlive_gc_while_locked() {
    held_chunks_outlive_gc_while_locked(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_s3_held_chunks_outlive_gc_while_locked() {
    held_chunks_outlive_gc_while_locked(Backend::PgS3).await
}

async fn hold(api: &Api, parcel: &str, lock_id: &str, tags: &[Tag]) -> Answer {
    let tags: Vec<String> = tags.iter().map(Tag::to_hex).collect();
    api.post_json(&format!("/api/v1/parcels/{parcel}/held"), json!({"lock_id": lock_id, "tags": tags})).await
}

async fn lock_id(api: &Api, parcel: &str, client_id: &str) -> String {
    let a = api.lock(parcel, client_id).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    a.json()["lock_id"].as_str().unwrap().to_owned()
}

async fn unlock(api: &Api, parcel: &str, lock_id: &str) {
    let a = api.delete(&format!("/api/v1/parcels/{parcel}/lock?lock_id={lock_id}")).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{:?}", a.body);
}

/// gc with no grace period at all, on `server`'s storage.
async fn gc_now(server: &TestServer) -> GcReport {
    gc(&server.storage, Duration::ZERO).await.unwrap()
}

/// Every chunk of `v` is readable (verified by its tag) through `api` and not reported missing.
async fn all_there(api: &Api, v: &Version) {
    assert_eq!(api.missing(&v.tags()).await, vec![], "held chunks reported missing");
    for (tag, data) in &v.chunks {
        let a = api.get(&format!("/api/v1/chunks/{tag}")).await;
        assert_eq!(a.status, StatusCode::OK, "{tag}: {:?}", a.body);
        assert_eq!(&a.body[..], &data[..], "{tag}");
    }
}

async fn held_chunks_outlive_gc_while_locked(backend: Backend) {
    let a = TestServer::start_on(backend).await;
    let b = a.start_sharing().await;
    let secret = a.add_user("alice").await;
    let mut alice = Api::new(&a.url);
    alice.login("alice", &secret).await;
    let mut alice_b = Api::new(&b.url);
    alice_b.login("alice", &secret).await;
    let bob = a.user("bob").await;

    // Version 1 checked in; then a checkout whose changes trickle up while it runs.
    let lock = alice.create("p", "laptop").await;
    assert_eq!(alice.upload_version("p", &lock, 0, &version(1, 3, 0)).await, 1);
    unlock(&alice, "p", &lock).await;
    let lock = lock_id(&alice, "p", "laptop").await;
    let v2 = version(2, 5, 0);

    // Refusals: as for a commit (the lock), another user's parcel is a missing one, bounded requests.
    let other = "ab".repeat(16);
    let a1 = hold(&alice, "p", &other, &v2.tags()).await;
    assert_eq!((a1.status, a1.code()), (StatusCode::CONFLICT, "locked".into()), "{:?}", a1.body);
    assert_eq!(a1.json()["holder"], "host-laptop");
    let a1 = hold(&bob, "p", &lock, &v2.tags()).await;
    assert_eq!((a1.status, a1.code()), (StatusCode::NOT_FOUND, "no_such_parcel".into()));
    let too_many = vec![v2.tags()[0]; MAX_HELD_TAGS + 1];
    assert_eq!(hold(&alice, "p", &lock, &too_many).await.code(), "too_large");
    let a1 = alice.post_json("/api/v1/parcels/p/held", json!({"lock_id": lock, "tags": ["not a tag"]})).await;
    assert_eq!((a1.status, a1.code()), (StatusCode::BAD_REQUEST, "bad_request".into()));

    // Held through server A, uploaded, then gc without a grace period through server B: all kept.
    let a1 = hold(&alice, "p", &lock, &v2.tags()).await;
    assert_eq!(a1.status, StatusCode::NO_CONTENT, "{:?}", a1.body);
    assert_eq!(hold(&alice, "p", &lock, &v2.tags()[..1]).await.status, StatusCode::NO_CONTENT, "again");
    for (tag, data) in &v2.chunks {
        assert!(alice.put_chunk(tag, data).await.status.is_success());
    }
    let r = gc_now(&b).await;
    assert_eq!((r.deleted, r.spared_held), (0, v2.chunks.len() as u64), "{r:?}");
    all_there(&alice_b, &v2).await;
    all_there(&alice, &v2).await;

    // The lock released (a checkin that committed nothing of them): the first gc still keeps them (it is
    // the first to see the lock gone), the next one without a grace period deletes them.
    unlock(&alice, "p", &lock).await;
    let r = gc_now(&b).await;
    assert_eq!((r.deleted, r.spared_held), (0, v2.chunks.len() as u64), "{r:?}");
    all_there(&alice, &v2).await;
    let r = gc_now(&b).await;
    assert_eq!((r.deleted, r.spared_held), (v2.chunks.len() as u64, 0), "{r:?}");
    assert_eq!(r.holds_expired, v2.chunks.len() as u64, "{r:?}");
    for (tag, _) in &v2.chunks {
        let a1 = alice.get(&format!("/api/v1/chunks/{tag}")).await;
        assert_eq!((a1.status, a1.code()), (StatusCode::NOT_FOUND, "no_such_chunk".into()));
    }
    assert_eq!(alice.missing(&v2.tags()).await.len(), v2.chunks.len());

    // Held and uploaded, gc meanwhile, then committed (through B): the version references them, so they
    // stay after the lock is released.
    let lock = lock_id(&alice, "p", "laptop").await;
    let v3 = version(3, 4, 0);
    assert_eq!(hold(&alice, "p", &lock, &v3.tags()).await.status, StatusCode::NO_CONTENT);
    for (tag, data) in &v3.chunks {
        assert!(alice.put_chunk(tag, data).await.status.is_success());
    }
    assert_eq!(gc_now(&b).await.spared_held, v3.chunks.len() as u64);
    assert_eq!(alice_b.put_keyring("p", &lock, &v3).await.status, StatusCode::CREATED);
    let a1 = alice_b.commit("p", &lock, 1, &v3).await;
    assert_eq!(a1.status, StatusCode::CREATED, "committed without re-sending a chunk: {:?}", a1.body);
    assert_eq!(a1.json()["version"], 2);
    unlock(&alice, "p", &lock).await;
    for _ in 0..2 {
        let r = gc_now(&b).await;
        assert_eq!((r.deleted, r.spared_held), (0, 0), "referenced, not held: {r:?}");
    }
    all_there(&alice, &v3).await;

    // A broken lock is told as a commit is told (exit 3 naming who); its holds end like a released one's.
    let lock = lock_id(&alice, "p", "laptop").await;
    let v4 = version(4, 2, 0);
    assert_eq!(hold(&alice, "p", &lock, &v4.tags()).await.status, StatusCode::NO_CONTENT);
    assert!(alice.put_chunk(&v4.chunks[0].0, &v4.chunks[0].1).await.status.is_success());
    let a1 = alice_b.delete("/api/v1/parcels/p/lock?force=true&by=desk").await;
    assert_eq!(a1.status, StatusCode::NO_CONTENT);
    let a1 = hold(&alice, "p", &lock, &v4.tags()).await;
    assert_eq!((a1.status, a1.code()), (StatusCode::CONFLICT, "lock_broken".into()), "{:?}", a1.body);
    assert_eq!(a1.json()["broken_by"], "desk");
    assert_eq!(gc_now(&b).await.spared_held, 1);
    all_there(&alice, &v4).await;
    assert_eq!(gc_now(&b).await.deleted, 1);
    assert_eq!(alice.missing(&v4.tags()).await, v4.tags());

    b.stop().await;
    a.stop().await;
}
