//! What the administrator's subcommands do: users, garbage collection, consistency checks.

use crate::auth;
use crate::error::ServerError;
use crate::storage::Storage;
use futures::StreamExt;
use isr_format::{KeyringTags, LoginSecret, Tag};
use isr_store::meta::{apply_keep_policy, valid_user_name, KeepDecision, KeepPolicy, PruneStats};
use isr_store::{MetaError, StoreError};
use std::collections::HashSet;
use std::time::Duration;

/// Default age below which gc leaves an unreferenced chunk alone (it may belong to a commit in progress).
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);
/// Chunks deleted per exclusive sweep batch (bounds how long commits wait for gc).
const SWEEP_BATCH: usize = 1000;

pub async fn add_user(storage: &Storage, name: &str, secret: &LoginSecret) -> Result<(), ServerError> {
    if !valid_user_name(name) {
        return Err(ServerError::Config(format!(
            "invalid user name {name:?}: use 1-64 of A-Z a-z 0-9 . _ -, not starting with . or -"
        )));
    }
    let s = secret.clone();
    let hash = tokio::task::spawn_blocking(move || auth::hash_login_secret(&s))
        .await
        .map_err(|e| ServerError::Hash(e.to_string()))??;
    storage.meta.add_user(name, &hash, crate::now_unix()).await?;
    Ok(())
}

pub async fn set_password(storage: &Storage, name: &str, secret: &LoginSecret) -> Result<(), ServerError> {
    let s = secret.clone();
    let hash = tokio::task::spawn_blocking(move || auth::hash_login_secret(&s))
        .await
        .map_err(|e| ServerError::Hash(e.to_string()))??;
    storage.meta.set_login_hash(name, &hash).await?;
    Ok(())
}

/// What one gc run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub stored: u64,
    pub referenced: u64,
    pub deleted: u64,
    pub bytes_freed: u64,
    /// Unreferenced but younger than the grace period.
    pub spared_young: u64,
    /// Unreferenced and old enough, but held by a parcel's lock (uploaded ahead of the version that will
    /// reference them: `POST /parcels/{name}/held`), or by a lock that ended less than the grace period ago.
    pub spared_held: u64,
    /// Holds removed: their lock ended at least the grace period ago.
    pub holds_expired: u64,
    pub keyrings_purged: u64,
}

/// Mark (every tag of every keyring of every version) and sweep (every other chunk older than `grace`,
/// unless a lock holds it). Safe to run while servers accept commits: each sweep batch excludes commits and
/// re-checks versions committed since the mark. Then the holds whose lock ended are recorded as ended, and
/// those that ended `grace` ago or more removed.
pub async fn gc(storage: &Storage, grace: Duration) -> Result<GcReport, ServerError> {
    let mark = storage.meta.gc_mark().await?;
    let listed = storage.chunks.store().list().await?;
    let mut report = GcReport {
        stored: listed.len() as u64,
        referenced: mark.referenced.len() as u64,
        ..Default::default()
    };
    let unreferenced: Vec<(Tag, u64)> =
        listed.into_iter().filter(|(t, _)| !mark.referenced.contains(t)).collect();
    let aged: Vec<Option<(Tag, u64)>> =
        futures::stream::iter(unreferenced.into_iter().map(|(t, n)| async move {
            match storage.chunks.age(&t).await {
                // Absent meanwhile (another gc): nothing to do. Unknown age (other backends) counts as old.
                Some(age) if age < grace => None,
                _ => Some((t, n)),
            }
        }))
        .buffered(32)
        .collect()
        .await;
    report.spared_young = aged.iter().filter(|a| a.is_none()).count() as u64;
    let candidates: Vec<(Tag, u64)> = aged.into_iter().flatten().collect();
    let grace_secs = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
    for batch in candidates.chunks(SWEEP_BATCH) {
        let tags: Vec<Tag> = batch.iter().map(|(t, _)| *t).collect();
        let swept = storage.meta.gc_sweep(&mark, tags, grace_secs, &storage.chunks).await?;
        let deleted: HashSet<Tag> = swept.deleted.into_iter().collect();
        report.deleted += deleted.len() as u64;
        report.bytes_freed += batch.iter().filter(|(t, _)| deleted.contains(t)).map(|(_, n)| n).sum::<u64>();
        report.spared_held += swept.held.len() as u64;
    }
    // After the sweeps: a lock that ended since the last run protected its chunks in this one too.
    report.holds_expired = storage.meta.gc_end_holds(grace_secs).await?;
    let before = crate::now_unix() - grace.as_secs() as i64;
    report.keyrings_purged = storage.meta.purge_unreferenced_keyrings(before).await?;
    Ok(report)
}

/// Something `check` found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    MissingChunk { tag: Tag, parcel: String },
    CorruptChunk { tag: Tag, parcel: String, reason: String },
    BadKeyring { hash: Tag, parcel: String, reason: String },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::MissingChunk { tag, parcel } => {
                write!(f, "missing chunk {tag} (referenced by {parcel})")
            }
            Problem::CorruptChunk { tag, parcel, reason } => {
                write!(f, "corrupt chunk {tag} (referenced by {parcel}): {reason}")
            }
            Problem::BadKeyring { hash, parcel, reason } => {
                write!(f, "bad keyring {hash} of {parcel}: {reason}")
            }
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub keyrings: u64,
    pub chunks: u64,
    pub problems: Vec<Problem>,
}

/// Every keyring of every version is intact and every chunk it names is present; with `full`, every chunk
/// is also re-read and re-hashed.
pub async fn check(storage: &Storage, full: bool) -> Result<CheckReport, ServerError> {
    let mut report = CheckReport::default();
    // tag -> first parcel naming it (for the report)
    let mut tags: std::collections::HashMap<Tag, String> = std::collections::HashMap::new();
    for (user, parcel, hash) in storage.meta.referenced_keyrings().await? {
        report.keyrings += 1;
        let name = format!("{user}/{parcel}");
        let data = match storage.meta.keyring(&user, &parcel, hash).await {
            Ok(Some(d)) => d,
            Ok(None) => {
                report.problems.push(Problem::BadKeyring { hash, parcel: name, reason: "missing".into() });
                continue;
            }
            Err(MetaError::NoSuchParcel(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        if Tag::of(&data) != hash {
            report.problems.push(Problem::BadKeyring {
                hash,
                parcel: name,
                reason: "bytes do not match the hash".into(),
            });
            continue;
        }
        match KeyringTags::parse(&data) {
            Ok(k) => {
                for t in k.stored_tags() {
                    tags.entry(*t).or_insert_with(|| name.clone());
                }
            }
            Err(e) => report.problems.push(Problem::BadKeyring { hash, parcel: name, reason: e.to_string() }),
        }
    }
    report.chunks = tags.len() as u64;
    let mut all: Vec<(Tag, String)> = tags.into_iter().collect();
    all.sort();
    if full {
        let store = storage.chunks.store();
        let results: Vec<Option<Problem>> =
            futures::stream::iter(all.into_iter().map(|(tag, parcel)| async move {
                match store.get(&tag).await {
                    Ok(Some(_)) => Ok(None),
                    Ok(None) => Ok(Some(Problem::MissingChunk { tag, parcel })),
                    Err(StoreError::Integrity { source, .. }) => {
                        Ok(Some(Problem::CorruptChunk { tag, parcel, reason: source.to_string() }))
                    }
                    Err(e) => Err(e),
                }
            }))
            .buffered(8)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        report.problems.extend(results.into_iter().flatten());
    } else {
        let only_tags: Vec<Tag> = all.iter().map(|(t, _)| *t).collect();
        // The store itself, not the chunk index (which `check_index` compares with a listing).
        let missing: HashSet<Tag> = storage.chunks.missing_in_store(&only_tags).await?.into_iter().collect();
        report.problems.extend(
            all.into_iter()
                .filter(|(t, _)| missing.contains(t))
                .map(|(tag, parcel)| Problem::MissingChunk { tag, parcel }),
        );
    }
    Ok(report)
}

/// What a policy prune decided for one parcel (and, unless a dry run, removed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParcelPrune {
    pub user: String,
    pub parcel: String,
    /// Every version, newest first, with why it stays (or nothing: it goes).
    pub decisions: Vec<KeepDecision>,
    /// What was removed (all zero for a dry run).
    pub stats: PruneStats,
}

/// Applies `policy` to one parcel (`Some((user, parcel))`) or to every parcel that has versions. A dry run
/// only reads the versions and decides; the real run decides again inside each parcel's prune transaction.
pub async fn prune_policy(
    storage: &Storage,
    target: Option<(&str, &str)>,
    policy: &KeepPolicy,
    dry_run: bool,
) -> Result<Vec<ParcelPrune>, ServerError> {
    if policy.is_empty() {
        return Err(ServerError::Config("a prune policy needs at least one --keep-* rule".into()));
    }
    let parcels: Vec<(String, String)> = match target {
        Some((u, p)) => vec![(u.to_owned(), p.to_owned())],
        None => storage
            .meta
            .list_parcels(None)
            .await?
            .into_iter()
            .filter(|p| p.head > 0)
            .map(|p| (p.user, p.name))
            .collect(),
    };
    let mut out = Vec::new();
    for (user, parcel) in parcels {
        let (decisions, stats) = if dry_run {
            let versions = storage.meta.versions(&user, &parcel).await?;
            let times: Vec<(u64, i64)> = versions.iter().map(|v| (v.version, v.created_unix)).collect();
            (apply_keep_policy(policy, &times), PruneStats::default())
        } else {
            match storage.meta.prune_by_policy(&user, &parcel, policy).await {
                Ok(r) => (r.decisions, r.stats),
                // Removed meanwhile (a whole-deployment run racing `user remove`): nothing to prune.
                Err(MetaError::NoSuchParcel(_)) if target.is_none() => continue,
                Err(e) => return Err(e.into()),
            }
        };
        out.push(ParcelPrune { user, parcel, decisions, stats });
    }
    Ok(out)
}

/// Free space of the filesystem holding the chunk directory, in percent of its size (for non-root users:
/// `f_bavail`). `None` for stores without a local filesystem (S3: no free-space figure, so the low-space
/// threshold does not apply there).
pub fn free_space_percent(storage: &Storage) -> Option<f64> {
    let root = storage.chunks.fs_root()?;
    let path = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is a NUL-terminated string that outlives the call, and `st` points to writable memory
    // of the size statvfs fills; it is read only after statvfs reported success.
    #[allow(unsafe_code)]
    let st = unsafe {
        if libc::statvfs(path.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    if st.f_blocks == 0 {
        return None;
    }
    Some(st.f_bavail as f64 * 100.0 / st.f_blocks as f64)
}

/// When `serve` applies the configured prune policy by itself.
#[derive(Clone, Debug, PartialEq)]
pub struct PruneSchedule {
    pub policy: KeepPolicy,
    /// Apply it this often (`prune_every_secs`).
    pub every: Option<Duration>,
    /// Apply it as soon as the chunk store's free space falls below this (`prune_low_space_percent`;
    /// filesystem stores only).
    pub low_space_percent: Option<f64>,
    /// The gc after each application spares unreferenced chunks younger than this.
    pub gc_grace: Duration,
    /// How often the free space is looked at.
    pub check_every: Duration,
    /// After a low-space application, the least time until the next one for low space (a policy that
    /// cannot free enough would otherwise run again at every check).
    pub low_space_backoff: Duration,
}

impl PruneSchedule {
    pub fn new(policy: KeepPolicy) -> Self {
        PruneSchedule {
            policy,
            every: None,
            low_space_percent: None,
            gc_grace: DEFAULT_GC_GRACE,
            check_every: Duration::from_secs(60),
            low_space_backoff: Duration::from_secs(600),
        }
    }
}

/// One application of the policy to every parcel, then gc.
pub async fn apply_schedule_once(
    storage: &Storage,
    s: &PruneSchedule,
) -> Result<(u64, GcReport), ServerError> {
    let pruned = prune_policy(storage, None, &s.policy, false).await?;
    let versions: u64 = pruned.iter().map(|p| p.stats.versions_deleted).sum();
    let report = gc(storage, s.gc_grace).await?;
    Ok((versions, report))
}

/// `serve`'s background task: applies the schedule until the task is dropped or aborted. Failures are
/// logged and retried at the next occasion; they never stop the server.
pub fn spawn_prune_schedule(storage: Storage, s: PruneSchedule) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut next_due = s.every.map(|e| start + e);
        let mut low_space_not_before = start;
        loop {
            let wake = match next_due {
                Some(due) if s.low_space_percent.is_none() => due,
                Some(due) => due.min(tokio::time::Instant::now() + s.check_every),
                None => tokio::time::Instant::now() + s.check_every,
            };
            tokio::time::sleep_until(wake).await;
            let now = tokio::time::Instant::now();
            let due = next_due.is_some_and(|d| now >= d);
            let free = if s.low_space_percent.is_some() { free_space_percent(&storage) } else { None };
            let low = now >= low_space_not_before
                && matches!((free, s.low_space_percent), (Some(f), Some(t)) if f < t);
            if !due && !low {
                continue;
            }
            let why = if due { "schedule" } else { "low space" };
            match apply_schedule_once(&storage, &s).await {
                Ok((versions, r)) => tracing::info!(
                    why,
                    policy = %s.policy,
                    versions_deleted = versions,
                    chunks_deleted = r.deleted,
                    bytes_freed = r.bytes_freed,
                    free_percent = free,
                    "prune policy applied"
                ),
                Err(e) => tracing::warn!(why, error = %e, "applying the prune policy failed"),
            }
            if due {
                next_due = s.every.map(|e| now + e);
            }
            if low {
                low_space_not_before = now + s.low_space_backoff;
            }
        }
    })
}

/// Splits `USER/PARCEL`.
pub fn split_target(target: &str) -> Option<(&str, &str)> {
    let (u, p) = target.split_once('/')?;
    (!u.is_empty() && !p.is_empty() && !p.contains('/')).then_some((u, p))
}
