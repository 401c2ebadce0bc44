//! What the administrator's subcommands do: users, garbage collection, consistency checks.

use crate::auth;
use crate::error::ServerError;
use crate::storage::Storage;
use futures::StreamExt;
use isr_format::{KeyringTags, LoginSecret, Tag};
use isr_store::meta::valid_user_name;
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
    pub keyrings_purged: u64,
}

/// Mark (every tag of every keyring of every version) and sweep (every other chunk older than `grace`).
/// Safe to run while servers accept commits: each sweep batch excludes commits and re-checks versions
/// committed since the mark.
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
    for batch in candidates.chunks(SWEEP_BATCH) {
        let tags: Vec<Tag> = batch.iter().map(|(t, _)| *t).collect();
        let deleted: HashSet<Tag> =
            storage.meta.gc_sweep(&mark, tags, &storage.chunks).await?.into_iter().collect();
        report.deleted += deleted.len() as u64;
        report.bytes_freed += batch.iter().filter(|(t, _)| deleted.contains(t)).map(|(_, n)| n).sum::<u64>();
    }
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

/// Splits `USER/PARCEL`.
pub fn split_target(target: &str) -> Option<(&str, &str)> {
    let (u, p) = target.split_once('/')?;
    (!u.is_empty() && !p.is_empty() && !p.contains('/')).then_some((u, p))
}
