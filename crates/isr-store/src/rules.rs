//! The metadata rules, once for every backend: what a lock request, a release, a delete, a commit, a rollback,
//! a prune and a gc sweep may do, decided from the rows the backend read inside its transaction. Each
//! function is a pure decision (rows in, a verdict or the writes to make out); [`crate::meta_tx`] reads those
//! rows and carries the writes out with the statements of [`crate::sql`], in transactions that each backend
//! ([`crate::SqliteMetaStore`], [`crate::PgMetaStore`]) begins and locks its own way.
//!
//! The order of a commit's checks is part of the contract: lock, base version, keyrings, chunks.

use crate::meta::{check_lock, BrokenLock, GcMark, LockInfo, LockRelease, MetaError, VersionSel};
use isr_format::{KeyringTags, Tag};
use std::collections::HashSet;

/// A parcel's row as the rules read it (in the transaction that then acts on it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ParcelRow {
    pub id: i64,
    pub head: u64,
    pub lock: Option<LockInfo>,
    pub broken: Option<BrokenLock>,
    /// `user/parcel`, for errors.
    pub name: String,
}

impl ParcelRow {
    /// [`check_lock`] against this row.
    pub(crate) fn check_lock(&self, lock_id: &str) -> Result<(), MetaError> {
        check_lock(&self.name, lock_id, self.lock.as_ref(), self.broken.as_ref())
    }

    /// The current lock, if `lock_id` is it (confirmation).
    pub(crate) fn confirm(self, lock_id: &str) -> Result<LockInfo, MetaError> {
        self.check_lock(lock_id)?;
        self.lock.ok_or_else(|| MetaError::LockMismatch(self.name.clone()))
    }
}

// ---------------------------------------------------------------------------------------------------------
// Locks

/// What a lock request does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Acquire {
    /// The client already holds the parcel: its lock is returned, nothing changes.
    Held(LockInfo),
    /// The parcel is free: store this lock.
    Take(LockInfo),
}

impl Acquire {
    pub(crate) fn lock(self) -> LockInfo {
        match self {
            Acquire::Held(l) | Acquire::Take(l) => l,
        }
    }
}

/// A lock request of `lock`'s client: idempotent for the holder, refused while another client holds it.
pub(crate) fn acquire(p: &ParcelRow, lock: LockInfo) -> Result<Acquire, MetaError> {
    match &p.lock {
        Some(held) if held.client_id == lock.client_id => Ok(Acquire::Held(held.clone())),
        Some(held) => Err(MetaError::Locked { parcel: p.name.clone(), lock: held.clone() }),
        None => Ok(Acquire::Take(lock)),
    }
}

/// What a release does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Release {
    /// Nothing to change (a forced release of an unlocked parcel keeps its last break too).
    Unchanged,
    /// Clear the lock, first recording this break when it is one.
    Clear { broken: Option<BrokenLock> },
}

/// A release by id ([`check_lock`]) or by force (remembered as the parcel's latest break).
pub(crate) fn release(p: &ParcelRow, how: &LockRelease) -> Result<Release, MetaError> {
    match how {
        LockRelease::Id(id) => {
            p.check_lock(id)?;
            Ok(Release::Clear { broken: None })
        }
        LockRelease::Force { by, now_unix } => Ok(match &p.lock {
            None => Release::Unchanged,
            Some(held) => Release::Clear {
                broken: Some(BrokenLock { lock_id: held.lock_id.clone(), by: by.clone(), unix: *now_unix }),
            },
        }),
    }
}

/// Undoing a create: only a parcel without versions, and not while another client (`client_id` differs)
/// holds it.
pub(crate) fn delete(p: &ParcelRow, client_id: Option<&str>) -> Result<(), MetaError> {
    if p.head != 0 {
        return Err(MetaError::HasVersions(p.name.clone()));
    }
    match &p.lock {
        Some(lock) if client_id != Some(lock.client_id.as_str()) => {
            Err(MetaError::Locked { parcel: p.name.clone(), lock: lock.clone() })
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Commits and rollbacks

/// A commit's first two checks: the caller's lock, then that it builds on the head.
pub(crate) fn commit_preconditions(p: &ParcelRow, lock_id: &str, base_version: u64) -> Result<(), MetaError> {
    p.check_lock(lock_id)?;
    if base_version != p.head {
        return Err(MetaError::StaleBase { base: base_version, head: p.head });
    }
    Ok(())
}

/// The distinct keyrings a commit names, sorted (the ones to look up, and to reference).
pub(crate) fn distinct_keyrings(keyrings: &[Tag]) -> Vec<Tag> {
    let mut out: Vec<Tag> = keyrings.iter().copied().collect::<HashSet<_>>().into_iter().collect();
    out.sort();
    out
}

/// Adds the stored (non-zero) chunk tags of keyring `hash` to `into`.
pub(crate) fn keyring_tags(hash: Tag, data: &[u8], into: &mut HashSet<Tag>) -> Result<(), MetaError> {
    let tags = KeyringTags::parse(data).map_err(|e| MetaError::BadKeyring { hash, reason: e.to_string() })?;
    into.extend(tags.stored_tags().copied());
    Ok(())
}

/// The commit's third check and the chunks it must then find: every keyring in `wanted` must have been
/// uploaded for the parcel (`found`: hash and bytes of those that were); the chunks to look for are those they
/// name minus `known`, the chunks of the head version (present, since gc never sweeps them). Sorted.
pub(crate) fn chunks_needed<'a>(
    wanted: &[Tag],
    found: impl IntoIterator<Item = (Tag, &'a [u8])>,
    known: &HashSet<Tag>,
) -> Result<Vec<Tag>, MetaError> {
    let mut seen = HashSet::new();
    let mut named = HashSet::new();
    for (hash, data) in found {
        keyring_tags(hash, data, &mut named)?;
        seen.insert(hash);
    }
    let mut missing: Vec<Tag> = wanted.iter().filter(|t| !seen.contains(t)).copied().collect();
    if !missing.is_empty() {
        missing.sort();
        return Err(MetaError::MissingKeyrings(missing));
    }
    let mut needed: Vec<Tag> = named.into_iter().filter(|t| !known.contains(t)).collect();
    needed.sort();
    Ok(needed)
}

/// The commit's last check: the chunk store's answer to [`chunks_needed`].
pub(crate) fn chunks_present(missing: Vec<Tag>) -> Result<(), MetaError> {
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MetaError::MissingChunks(missing))
    }
}

/// The number of the version that a commit or rollback on `head` makes.
pub(crate) fn next_version(head: u64) -> u64 {
    head + 1
}

/// Who may roll back: with a lock id, only its holder ([`check_lock`]); without one, only while unlocked.
pub(crate) fn rollback_allowed(p: &ParcelRow, lock_id: Option<&str>) -> Result<(), MetaError> {
    match (lock_id, &p.lock) {
        (Some(id), _) => p.check_lock(id),
        (None, Some(lock)) => Err(MetaError::Locked { parcel: p.name.clone(), lock: lock.clone() }),
        (None, None) => Ok(()),
    }
}

/// The version a rollback repeats, which must exist (`found`: what the backend read for it).
pub(crate) fn rollback_source<T>(p: &ParcelRow, version: u64, found: Option<T>) -> Result<T, MetaError> {
    found.ok_or_else(|| MetaError::NoSuchVersion { parcel: p.name.clone(), version })
}

/// The comment of the version a rollback makes.
pub(crate) fn rollback_comment(version: u64) -> String {
    format!("rollback to version {version}")
}

/// The version a read names.
pub(crate) fn version_number(p: &ParcelRow, which: VersionSel) -> u64 {
    match which {
        VersionSel::Head => p.head,
        VersionSel::Number(n) => n,
    }
}

/// A read of a version that does not exist.
pub(crate) fn no_such_version(p: &ParcelRow, version: u64) -> MetaError {
    MetaError::NoSuchVersion { parcel: p.name.clone(), version }
}

// ---------------------------------------------------------------------------------------------------------
// Prune

/// A prune must keep at least the head.
pub(crate) fn prune_keep(keep: u64) -> Result<u64, MetaError> {
    if keep == 0 {
        return Err(MetaError::Invalid("--keep must be at least 1 (the head is never pruned)".into()));
    }
    Ok(keep)
}

/// The versions a prune deletes, of a parcel's versions listed newest first: all but the newest `keep`
/// (which [`prune_keep`] has checked, so the head always stays).
pub(crate) fn prune_doomed<T>(newest_first: Vec<T>, keep: u64) -> Vec<T> {
    newest_first.into_iter().skip(usize::try_from(keep).unwrap_or(usize::MAX)).collect()
}

/// Which versions a retention policy keeps: restic `forget`'s `--keep-last/-hourly/-daily/-weekly/-monthly/
/// -yearly` (0 = that rule is off). Calendar buckets are taken in UTC (restic uses the local time zone of
/// the machine it runs on; the server has no user's time zone, so UTC, documented in the README).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl KeepPolicy {
    /// No rule given (a usage error: a policy that keeps nothing but the head is `--keep-last 1`).
    pub fn is_empty(&self) -> bool {
        *self == KeepPolicy::default()
    }
}

impl std::fmt::Display for KeepPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut sep = "";
        for (name, n) in self.rules() {
            if n > 0 {
                write!(f, "{sep}--keep-{name} {n}")?;
                sep = " ";
            }
        }
        Ok(())
    }
}

impl KeepPolicy {
    fn rules(&self) -> [(&'static str, u32); 6] {
        [
            ("last", self.last),
            ("hourly", self.hourly),
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
            ("yearly", self.yearly),
        ]
    }
}

/// A policy's verdict on one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeepDecision {
    pub version: u64,
    pub created_unix: i64,
    /// Why it stays (`last`, `hourly`, ..., `head`); empty = it goes.
    pub reasons: Vec<&'static str>,
}

impl KeepDecision {
    pub fn kept(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// The UTC calendar fields of a Unix time: (year, month 1-12, day 1-31, hour).
fn utc_fields(unix: i64) -> (i64, i64, i64, i64) {
    let days = unix.div_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    (y, m, d, unix.rem_euclid(86_400) / 3600)
}

/// Howard Hinnant's civil_from_days: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of January 1st of `year`.
fn days_of_new_year(year: i64) -> i64 {
    // days_from_civil(year, 1, 1): January is month 11 of the previous March-based year.
    let y = year - 1;
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = 306; // (153 * (1 + 9) + 2) / 5
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// ISO 8601 week of a Unix time in UTC, as restic buckets it: ISO year * 100 + week.
fn iso_week(unix: i64) -> i64 {
    let days = unix.div_euclid(86_400);
    // 1970-01-01 was a Thursday; Monday = 0.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (year, _, _) = civil_from_days(thursday);
    let week = (thursday - days_of_new_year(year)) / 7 + 1;
    year * 100 + week
}

/// Applies `policy` to a parcel's versions, (number, commit time) pairs in any order, exactly as restic's
/// `forget` applies `--keep-*` to a group of snapshots: newest first (by version number), each rule's bucket
/// value (the version itself for `last`; its UTC hour, day, ISO week, month or year) keeps a version when
/// it differs from the last value that rule kept, while the rule has count left; a version kept by any rule
/// stays. The head (the highest number) always stays. Returned newest first.
pub fn apply_keep_policy(policy: &KeepPolicy, versions: &[(u64, i64)]) -> Vec<KeepDecision> {
    let mut sorted = versions.to_vec();
    sorted.sort_by_key(|v| std::cmp::Reverse(v.0));
    struct Bucket {
        reason: &'static str,
        left: u32,
        last: Option<i64>,
        value: fn(u64, i64) -> i64,
    }
    let mut buckets = [
        Bucket { reason: "last", left: policy.last, last: None, value: |n, _| n as i64 },
        Bucket {
            reason: "hourly",
            left: policy.hourly,
            last: None,
            value: |_, t| {
                let (y, m, d, h) = utc_fields(t);
                ((y * 100 + m) * 100 + d) * 100 + h
            },
        },
        Bucket {
            reason: "daily",
            left: policy.daily,
            last: None,
            value: |_, t| {
                let (y, m, d, _) = utc_fields(t);
                (y * 100 + m) * 100 + d
            },
        },
        Bucket { reason: "weekly", left: policy.weekly, last: None, value: |_, t| iso_week(t) },
        Bucket {
            reason: "monthly",
            left: policy.monthly,
            last: None,
            value: |_, t| {
                let (y, m, _, _) = utc_fields(t);
                y * 100 + m
            },
        },
        Bucket { reason: "yearly", left: policy.yearly, last: None, value: |_, t| utc_fields(t).0 },
    ];
    sorted
        .iter()
        .enumerate()
        .map(|(i, &(version, created_unix))| {
            let mut reasons = Vec::new();
            for b in &mut buckets {
                if b.left == 0 {
                    continue;
                }
                let v = (b.value)(version, created_unix);
                if b.last != Some(v) {
                    b.last = Some(v);
                    b.left -= 1;
                    reasons.push(b.reason);
                }
            }
            if i == 0 && reasons.is_empty() {
                reasons.push("head");
            }
            KeepDecision { version, created_unix, reasons }
        })
        .collect()
}

/// A policy prune's verdict inside its transaction: the policy must name a rule; the versions to delete.
pub(crate) fn policy_doomed(
    policy: &KeepPolicy,
    versions: &[(u64, i64)],
) -> Result<Vec<KeepDecision>, MetaError> {
    if policy.is_empty() {
        return Err(MetaError::Invalid("a prune policy needs at least one --keep-* rule".into()));
    }
    Ok(apply_keep_policy(policy, versions))
}

// ---------------------------------------------------------------------------------------------------------
// gc: the commit/sweep exclusion

/// What an operation holds against gc sweeps, from before its checks until it ends. A backend maps it to its
/// locking: SQLite's `BEGIN IMMEDIATE` serializes every writer (so all of these exclude each other), and
/// PostgreSQL takes its `gc_lock` row `FOR SHARE` or `FOR UPDATE`, before any parcel row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GcExclusion {
    /// Commits and rollbacks: they make versions reference chunks (and may run in parallel).
    Shared,
    /// Sweep batches and the purge of abandoned keyrings: they delete what no version references, so no
    /// commit may check or reference anything meanwhile; they read the versions only once they hold it.
    Exclusive,
}

/// The exclusion of a commit (its chunk check and insert are one critical section).
pub(crate) const COMMIT: GcExclusion = GcExclusion::Shared;
/// The exclusion of a rollback (a new version referencing chunks).
pub(crate) const ROLLBACK: GcExclusion = GcExclusion::Shared;
/// The exclusion of a gc sweep batch.
pub(crate) const SWEEP: GcExclusion = GcExclusion::Exclusive;
/// The exclusion of the purge of unreferenced keyrings (a commit in flight has checked keyrings it does not
/// reference yet).
pub(crate) const PURGE_KEYRINGS: GcExclusion = GcExclusion::Exclusive;

/// The exclusion of a chunk PUT's pending index row (it must not slip between a sweep's steps).
pub(crate) const CHUNK_INTENT: GcExclusion = GcExclusion::Shared;

/// The exclusion of holding chunks for a lock (shared with commits: a sweep step either sees the hold or
/// runs before it).
pub(crate) const HOLD_CHUNKS: GcExclusion = GcExclusion::Shared;
/// The exclusion of gc's bookkeeping of holds (it ends and removes them, so no hold may be added meanwhile).
pub(crate) const END_HOLDS: GcExclusion = GcExclusion::Exclusive;

/// A row of `held_chunks` as gc reads it: a tag held by a lock of a parcel, with the parcel's current lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HeldRow {
    pub parcel_id: i64,
    pub lock_id: String,
    pub tag: Tag,
    /// When a gc run first saw the lock ended; `None` while none has.
    pub ended_unix: Option<i64>,
    /// The parcel's lock id now (`None`: unlocked).
    pub current_lock: Option<String>,
}

/// What gc makes of a held row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Its lock is the parcel's current lock: the tag is spared.
    Locked,
    /// Its lock ended (released, broken) and no gc run has recorded that yet: spared, the end recorded now.
    Ending,
    /// Recorded ended less than the grace period ago: spared.
    Ended,
    /// Recorded ended at least the grace period ago: not spared, and the row goes.
    Expired,
}

impl Hold {
    /// Whether the row keeps its tag from a sweep.
    pub(crate) fn spares(self) -> bool {
        self != Hold::Expired
    }
}

/// The gc rule of held chunks: a hold protects its tag while its lock is the parcel's current lock; once it
/// is not, for the grace period from the first gc run that saw it so (a lock id never becomes current
/// again: a new lock gets a new id). So a held chunk outlives its lock by at least the grace period, and no
/// lock-release path needs to know about holds.
pub(crate) fn hold(row: &HeldRow, now_unix: i64, grace_secs: i64) -> Hold {
    if row.current_lock.as_deref() == Some(row.lock_id.as_str()) {
        return Hold::Locked;
    }
    match row.ended_unix {
        None => Hold::Ending,
        Some(ended) if now_unix - ended < grace_secs => Hold::Ended,
        Some(_) => Hold::Expired,
    }
}

/// The tags of `rows` that a hold spares from a sweep.
pub(crate) fn held_tags<'a>(
    rows: impl IntoIterator<Item = &'a HeldRow>,
    now_unix: i64,
    grace_secs: i64,
) -> HashSet<Tag> {
    rows.into_iter().filter(|r| hold(r, now_unix, grace_secs).spares()).map(|r| r.tag).collect()
}

/// Whether a chunk-index row stands for a PUT still in flight (pending and recent), which a sweep spares.
pub(crate) fn put_in_flight(present: bool, since_unix: i64, now_unix: i64) -> bool {
    !present && now_unix - since_unix < crate::meta::PENDING_CHUNK_GRACE_SECS
}

/// A sweep's first step, under [`SWEEP`]: the versions committed since the mark (`current`: every version
/// now), whose chunks the sweep must spare.
pub(crate) fn versions_since(mark: &GcMark, current: impl IntoIterator<Item = i64>) -> Vec<i64> {
    current.into_iter().filter(|id| !mark.versions_seen.contains(id)).collect()
}

/// A sweep's verdict: the candidates no version committed since the mark references.
pub(crate) fn sweep_doomed(candidates: Vec<Tag>, referenced_since: &HashSet<Tag>) -> Vec<Tag> {
    candidates.into_iter().filter(|t| !referenced_since.contains(t)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use isr_format::{ChunkIndex, ChunkKey, ChunkSize, ImageLen, Keyring, Keyroot};

    fn lock(client: &str) -> LockInfo {
        LockInfo {
            lock_id: format!("id-{client}"),
            holder: format!("host of {client}"),
            client_id: client.into(),
            since_unix: 5,
        }
    }

    fn row(head: u64, lock: Option<LockInfo>, broken: Option<BrokenLock>) -> ParcelRow {
        ParcelRow { id: 7, head, lock, broken, name: "u/p".into() }
    }

    fn broken(of: &str) -> BrokenLock {
        BrokenLock { lock_id: format!("id-{of}"), by: "admin".into(), unix: 9 }
    }

    /// A sealed keyring naming `tags` (and one all-zero chunk, which is never stored).
    fn keyring(tags: &[Tag]) -> (Tag, Vec<u8>) {
        let mut k =
            Keyring::new(ChunkSize::new(4096).unwrap(), ImageLen((tags.len() as u64 + 1) * 4096)).unwrap();
        for (i, t) in tags.iter().enumerate() {
            k.set(ChunkIndex(i as u64), Some((*t, ChunkKey([1; 32]))));
        }
        let bytes = k.seal(&Keyroot::random());
        (Tag::of(&bytes), bytes)
    }

    #[test]
    fn acquire_is_idempotent_for_the_holder_and_refused_to_others() {
        let free = row(0, None, None);
        assert_eq!(acquire(&free, lock("a")).unwrap(), Acquire::Take(lock("a")));
        let held = row(0, Some(lock("a")), None);
        let mut again = lock("a");
        again.lock_id = "a-second-id".into();
        assert_eq!(acquire(&held, again).unwrap(), Acquire::Held(lock("a")), "the held lock is returned");
        match acquire(&held, lock("b")) {
            Err(MetaError::Locked { parcel, lock: l }) => {
                assert_eq!((parcel.as_str(), l), ("u/p", lock("a")))
            }
            other => panic!("lock held by another: {other:?}"),
        }
    }

    #[test]
    fn release_by_id_and_by_force() {
        let held = row(0, Some(lock("a")), None);
        assert_eq!(release(&held, &LockRelease::Id("id-a".into())).unwrap(), Release::Clear { broken: None });
        assert!(matches!(release(&held, &LockRelease::Id("id-b".into())), Err(MetaError::Locked { .. })));
        let force = LockRelease::Force { by: "laptop".into(), now_unix: 30 };
        assert_eq!(
            release(&held, &force).unwrap(),
            Release::Clear {
                broken: Some(BrokenLock { lock_id: "id-a".into(), by: "laptop".into(), unix: 30 })
            }
        );
        let free = row(0, None, Some(broken("a")));
        assert_eq!(release(&free, &force).unwrap(), Release::Unchanged, "the last break is kept");
        assert!(matches!(release(&free, &LockRelease::Id("x".into())), Err(MetaError::LockMismatch(_))));
        match release(&free, &LockRelease::Id("id-a".into())) {
            Err(MetaError::LockBroken { broken: b, current, .. }) => {
                assert_eq!((b.by.as_str(), current), ("admin", None));
            }
            other => panic!("broken lock: {other:?}"),
        }
    }

    #[test]
    fn confirm_is_check_lock() {
        assert_eq!(row(0, Some(lock("a")), None).confirm("id-a").unwrap(), lock("a"));
        assert!(matches!(row(0, None, None).confirm("id-a"), Err(MetaError::LockMismatch(_))));
        let taken = row(0, Some(lock("b")), Some(broken("a")));
        match taken.confirm("id-a") {
            Err(MetaError::LockBroken { current, .. }) => assert_eq!(current.as_deref(), Some(&lock("b"))),
            other => panic!("broken, then taken by b: {other:?}"),
        }
    }

    #[test]
    fn delete_only_without_versions_and_by_the_holder() {
        assert!(matches!(delete(&row(1, None, None), None), Err(MetaError::HasVersions(_))));
        assert!(matches!(delete(&row(1, Some(lock("a")), None), Some("a")), Err(MetaError::HasVersions(_))));
        let held = row(0, Some(lock("a")), None);
        assert!(matches!(delete(&held, Some("b")), Err(MetaError::Locked { .. })));
        assert!(matches!(delete(&held, None), Err(MetaError::Locked { .. })));
        delete(&held, Some("a")).unwrap();
        delete(&row(0, None, None), None).unwrap();
    }

    #[test]
    fn commit_checks_the_lock_before_the_base() {
        let p = row(2, Some(lock("a")), None);
        commit_preconditions(&p, "id-a", 2).unwrap();
        assert!(matches!(commit_preconditions(&p, "id-b", 0), Err(MetaError::Locked { .. })));
        assert!(matches!(
            commit_preconditions(&p, "id-a", 1),
            Err(MetaError::StaleBase { base: 1, head: 2 })
        ));
        let broken_then_free = row(2, None, Some(broken("a")));
        assert!(matches!(
            commit_preconditions(&broken_then_free, "id-a", 1),
            Err(MetaError::LockBroken { .. })
        ));
    }

    #[test]
    fn the_tags_a_commit_needs() {
        let (a, b, c) = (Tag([1; 32]), Tag([2; 32]), Tag([3; 32]));
        let (k1, d1) = keyring(&[b, a]);
        let (k2, d2) = keyring(&[c, a]);
        let wanted = distinct_keyrings(&[k2, k1, k2]);
        assert_eq!(wanted.len(), 2);
        let found = [(k1, &d1[..]), (k2, &d2[..])];
        assert_eq!(chunks_needed(&wanted, found, &HashSet::new()).unwrap(), vec![a, b, c]);
        // The head's chunks are known to be present.
        assert_eq!(chunks_needed(&wanted, found, &HashSet::from([a, c])).unwrap(), vec![b]);
        // Every keyring must have been uploaded; the missing ones are named, sorted.
        let (x, y) = (Tag([9; 32]), Tag([8; 32]));
        match chunks_needed(&distinct_keyrings(&[x, k1, y]), [(k1, &d1[..])], &HashSet::new()) {
            Err(MetaError::MissingKeyrings(m)) => assert_eq!(m, vec![y, x]),
            other => panic!("missing keyrings: {other:?}"),
        }
        match chunks_needed(&[k1], [(k1, &b"not a keyring"[..])], &HashSet::new()) {
            Err(MetaError::BadKeyring { hash, .. }) => assert_eq!(hash, k1),
            other => panic!("corrupt keyring: {other:?}"),
        }
        chunks_present(vec![]).unwrap();
        assert!(matches!(chunks_present(vec![a]), Err(MetaError::MissingChunks(m)) if m == vec![a]));
        assert_eq!(next_version(0), 1);
    }

    #[test]
    fn rollback_needs_the_lock_and_a_known_version() {
        let locked = row(3, Some(lock("a")), None);
        rollback_allowed(&locked, Some("id-a")).unwrap();
        assert!(matches!(rollback_allowed(&locked, None), Err(MetaError::Locked { .. })));
        assert!(matches!(rollback_allowed(&locked, Some("id-b")), Err(MetaError::Locked { .. })));
        rollback_allowed(&row(3, None, None), None).unwrap();
        assert_eq!(rollback_source(&locked, 2, Some("v2")).unwrap(), "v2");
        assert!(matches!(
            rollback_source::<()>(&locked, 7, None),
            Err(MetaError::NoSuchVersion { version: 7, ref parcel }) if parcel == "u/p"
        ));
        assert_eq!(rollback_comment(2), "rollback to version 2");
        assert_eq!(version_number(&locked, VersionSel::Head), 3);
        assert_eq!(version_number(&locked, VersionSel::Number(1)), 1);
    }

    #[test]
    fn prune_never_drops_the_head() {
        assert!(matches!(prune_keep(0), Err(MetaError::Invalid(m)) if m.contains("at least 1")));
        let newest_first = vec![5, 4, 3, 2, 1];
        assert_eq!(prune_doomed(newest_first.clone(), prune_keep(1).unwrap()), vec![4, 3, 2, 1]);
        assert_eq!(prune_doomed(newest_first.clone(), 3), vec![2, 1]);
        assert_eq!(prune_doomed(newest_first, u64::MAX), Vec::<i32>::new());
    }

    /// The commit times of the table test: version n was committed at `TIMES[n - 1]` (UTC). They cross hour,
    /// day, ISO week (2024-12-30 is in week 1 of 2025), month and year boundaries, with several versions in
    /// one hour and one day.
    const TIMES: [(&str, i64); 20] = [
        ("2023-06-15 12:00:00", 1_686_830_400),
        ("2024-01-10 08:00:00", 1_704_873_600),
        ("2024-11-30 23:59:59", 1_733_011_199),
        ("2024-12-01 00:00:00", 1_733_011_200),
        ("2024-12-29 10:00:00", 1_735_466_400),
        ("2024-12-30 10:00:00", 1_735_552_800),
        ("2024-12-31 23:30:00", 1_735_687_800),
        ("2025-01-01 00:30:00", 1_735_691_400),
        ("2025-01-05 18:00:00", 1_736_100_000),
        ("2025-01-06 09:00:00", 1_736_154_000),
        ("2025-02-14 12:00:00", 1_739_534_400),
        ("2025-02-14 12:45:00", 1_739_537_100),
        ("2025-02-14 13:05:00", 1_739_538_300),
        ("2025-02-15 07:00:00", 1_739_602_800),
        ("2025-03-01 00:00:01", 1_740_787_201),
        ("2025-03-02 00:00:00", 1_740_873_600),
        ("2025-03-02 00:59:59", 1_740_877_199),
        ("2025-03-02 01:00:00", 1_740_877_200),
        ("2025-03-02 01:00:01", 1_740_877_201),
        ("2025-03-03 12:00:00", 1_741_003_200),
    ];

    fn policy(last: u32, hourly: u32, daily: u32, weekly: u32, monthly: u32, yearly: u32) -> KeepPolicy {
        KeepPolicy { last, hourly, daily, weekly, monthly, yearly }
    }

    /// The expected sets come from restic itself (restic 0.14.0, the one installed here): a throwaway
    /// repository, one `TZ=UTC restic backup --host h --time "<TIMES[n-1]>" src` per version (same host and
    /// path, so one group), then `TZ=UTC restic forget --dry-run --json <policy>` for each row, its `keep`
    /// list mapped back from snapshot times to version numbers. (restic 0.15 and later also keep the oldest
    /// snapshot when a rule has count left; 0.14, and this function, do not.)
    #[test]
    fn keep_policy_keeps_what_restic_forget_keeps() {
        let table: &[(KeepPolicy, &[u64])] = &[
            (policy(3, 0, 0, 0, 0, 0), &[18, 19, 20]),
            (policy(0, 4, 0, 0, 0, 0), &[15, 17, 19, 20]),
            (policy(0, 0, 5, 0, 0, 0), &[13, 14, 15, 19, 20]),
            (policy(0, 0, 0, 4, 0, 0), &[10, 14, 19, 20]),
            (policy(0, 0, 0, 0, 6, 0), &[2, 3, 7, 10, 14, 20]),
            (policy(0, 0, 0, 0, 0, 10), &[1, 7, 20]),
            (policy(2, 0, 3, 2, 3, 2), &[7, 10, 14, 15, 19, 20]),
            (policy(0, 2, 0, 0, 2, 0), &[14, 19, 20]),
            (policy(0, 0, 0, 3, 0, 1), &[14, 19, 20]),
            (policy(0, 0, 0, 8, 0, 0), &[2, 4, 5, 9, 10, 14, 19, 20]),
            (policy(1, 0, 0, 0, 0, 0), &[20]),
            (policy(0, 0, 100, 0, 0, 0), &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 19, 20]),
            (policy(0, 3, 0, 0, 0, 3), &[1, 7, 17, 19, 20]),
        ];
        let versions: Vec<(u64, i64)> =
            TIMES.iter().enumerate().map(|(i, (_, t))| (i as u64 + 1, *t)).collect();
        for (p, expected) in table {
            let decisions = apply_keep_policy(p, &versions);
            let mut kept: Vec<u64> = decisions.iter().filter(|d| d.kept()).map(|d| d.version).collect();
            kept.sort();
            assert_eq!(&kept, expected, "{p}");
            assert_eq!(decisions.len(), versions.len());
        }
        // The order versions come in does not matter; the head is kept even by a rule that would not.
        let mut shuffled = versions.clone();
        shuffled.reverse();
        assert_eq!(apply_keep_policy(&policy(3, 0, 0, 0, 0, 0), &shuffled)[0].reasons, vec!["last"]);
        assert!(matches!(policy_doomed(&KeepPolicy::default(), &versions), Err(MetaError::Invalid(_))));
        assert_eq!(policy(2, 0, 3, 0, 0, 1).to_string(), "--keep-last 2 --keep-daily 3 --keep-yearly 1");
    }

    #[test]
    fn utc_calendar_fields() {
        for (text, unix) in TIMES {
            let (y, m, d, h) = utc_fields(unix);
            assert_eq!(format!("{y:04}-{m:02}-{d:02} {h:02}"), text[..13], "{text}");
        }
        assert_eq!(days_of_new_year(1970), 0);
        assert_eq!(days_of_new_year(2000), 10_957);
        assert_eq!(days_of_new_year(1969), -365);
        // ISO weeks across the turn of years (cross-checked with `date -u +%G%V`).
        assert_eq!(iso_week(1_735_466_400), 202_452, "Sunday 2024-12-29");
        assert_eq!(iso_week(1_735_552_800), 202_501, "Monday 2024-12-30");
        assert_eq!(iso_week(1_736_100_000), 202_501, "Sunday 2025-01-05");
        assert_eq!(iso_week(1_736_154_000), 202_502, "Monday 2025-01-06");
        assert_eq!(iso_week(1_609_459_200), 202_053, "Friday 2021-01-01");
        assert_eq!(iso_week(0), 197_001, "Thursday 1970-01-01");
    }

    #[test]
    fn gc_exclusion_and_sweep() {
        assert_eq!((COMMIT, ROLLBACK), (GcExclusion::Shared, GcExclusion::Shared));
        assert_eq!((SWEEP, PURGE_KEYRINGS), (GcExclusion::Exclusive, GcExclusion::Exclusive));
        let mark = GcMark { referenced: HashSet::new(), versions_seen: HashSet::from([1, 2]) };
        assert_eq!(versions_since(&mark, [1, 2, 3, 5]), vec![3, 5], "committed after the mark");
        let (a, b, c) = (Tag([1; 32]), Tag([2; 32]), Tag([3; 32]));
        assert_eq!(sweep_doomed(vec![a, b, c], &HashSet::from([b])), vec![a, c]);
        assert_eq!(CHUNK_INTENT, GcExclusion::Shared);
        assert!(put_in_flight(false, 100, 100 + 3599), "a recent pending row is a PUT in flight");
        assert!(!put_in_flight(false, 100, 100 + 3600), "a writer that died an hour ago");
        assert!(!put_in_flight(true, 100, 100), "a present row is no PUT");
    }

    #[test]
    fn held_chunks_outlive_their_lock_by_the_grace_period() {
        assert_eq!((HOLD_CHUNKS, END_HOLDS), (GcExclusion::Shared, GcExclusion::Exclusive));
        let held = |current: Option<&str>, ended_unix: Option<i64>| HeldRow {
            parcel_id: 7,
            lock_id: "id-a".into(),
            tag: Tag([1; 32]),
            ended_unix,
            current_lock: current.map(str::to_owned),
        };
        // The current lock spares, whatever the grace.
        assert_eq!(hold(&held(Some("id-a"), None), 1000, 0), Hold::Locked);
        // A lock that ended (released, or broken and maybe taken by another): spared at first sight, then
        // for the grace period from there.
        assert_eq!(hold(&held(None, None), 1000, 0), Hold::Ending);
        assert_eq!(hold(&held(Some("id-b"), None), 1000, 0), Hold::Ending);
        assert_eq!(hold(&held(None, Some(1000)), 1000 + 3599, 3600), Hold::Ended);
        assert_eq!(hold(&held(Some("id-b"), Some(1000)), 1000 + 3600, 3600), Hold::Expired);
        assert_eq!(hold(&held(None, Some(1000)), 1000, 0), Hold::Expired, "no grace: gone at the next run");
        assert!(Hold::Locked.spares() && Hold::Ending.spares() && Hold::Ended.spares());
        assert!(!Hold::Expired.spares());
        // A tag is spared when any of its holds spares it.
        let expired = held(None, Some(0));
        let other_tag = HeldRow { tag: Tag([2; 32]), ..held(Some("id-a"), None) };
        assert_eq!(held_tags([&expired, &other_tag], 100, 10), HashSet::from([Tag([2; 32])]));
        let same_tag_next_lock = HeldRow { lock_id: "id-c".into(), ..held(Some("id-c"), None) };
        assert_eq!(held_tags([&expired, &same_tag_next_lock], 100, 10), HashSet::from([Tag([1; 32])]));
    }
}
