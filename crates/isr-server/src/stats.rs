//! Usage figures (`isr-server stats`, and the `isr_parcel_*` gauges of `/metrics`), derived from what the
//! stores hold: every version's keyrings (their clear tags) and the chunk store's listing (stored sizes).
//!
//! Definitions (README "where SPEC.md is silent" repeats them):
//! - bytes are *stored* chunk bytes (compressed and encrypted, as the chunk store lists them);
//! - a check-in's bytes are those of the chunks its version names that the version before it (number − 1)
//!   did not: what the check-in added to the parcel. Version 1 counts all its chunks. A version whose
//!   predecessor was pruned is left out (nothing to compare with), so the percentiles are over the rest;
//! - check-ins per day: versions committed in the last 30 days, divided by 30;
//! - unique bytes: chunks only this parcel references; shared: chunks other parcels reference too;
//! - dedup ratio: the bytes of every version counted in full, over the bytes of the distinct chunks
//!   (unique + shared) the parcel references.

use crate::error::ServerError;
use crate::storage::Storage;
use isr_format::{KeyringTags, Manifest, Tag};
use isr_store::meta::VersionSel;
use isr_store::MetaError;
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// The window of [`ParcelUsage::checkins_per_day`].
pub const CHECKIN_WINDOW_DAYS: i64 = 30;

/// The figures of one parcel.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ParcelUsage {
    pub user: String,
    pub parcel: String,
    pub versions: u64,
    /// Check-ins the percentiles are over.
    pub checkins_measured: u64,
    pub checkin_bytes_p50: u64,
    pub checkin_bytes_p95: u64,
    /// Versions committed in the last [`CHECKIN_WINDOW_DAYS`] days, per day.
    pub checkins_per_day: f64,
    pub unique_bytes: u64,
    pub shared_bytes: u64,
    /// Every version's chunks counted in full.
    pub logical_bytes: u64,
    pub dedup_ratio: f64,
}

/// The figures of the parcels asked for, and of the whole deployment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct UsageReport {
    pub parcels: Vec<ParcelUsage>,
    /// Distinct chunks referenced by any version, and their bytes.
    pub referenced_chunks: u64,
    pub referenced_bytes: u64,
    pub logical_bytes: u64,
    pub dedup_ratio: f64,
}

/// Nearest-rank percentile of sorted values (0 for none).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ratio(logical: u64, stored: u64) -> f64 {
    if stored == 0 {
        0.0
    } else {
        logical as f64 / stored as f64
    }
}

/// One parcel's versions as sets of stored tags: (number, commit time, tags).
type VersionTags = Vec<(u64, i64, HashSet<Tag>)>;

async fn parcel_versions(storage: &Storage, user: &str, parcel: &str) -> Result<VersionTags, ServerError> {
    let mut keyrings: HashMap<Tag, Vec<Tag>> = HashMap::new();
    let mut out = Vec::new();
    for v in storage.meta.versions(user, parcel).await? {
        let (_, bytes) = match storage.meta.manifest(user, parcel, VersionSel::Number(v.version)).await {
            Ok(m) => m,
            // Pruned meanwhile.
            Err(MetaError::NoSuchVersion { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let manifest = Manifest::parse_unauthenticated(&bytes).map_err(|e| {
            MetaError::Database(format!("stored manifest of {user}/{parcel} version {}: {e}", v.version))
        })?;
        let mut tags = HashSet::new();
        for (_, image) in manifest.manifest.images() {
            if let std::collections::hash_map::Entry::Vacant(slot) = keyrings.entry(image.keyring) {
                let stored: Vec<Tag> = match storage.meta.keyring(user, parcel, image.keyring).await? {
                    Some(data) => KeyringTags::parse(&data)
                        .map_err(|e| MetaError::BadKeyring { hash: image.keyring, reason: e.to_string() })?
                        .stored_tags()
                        .copied()
                        .collect(),
                    None => Vec::new(),
                };
                slot.insert(stored);
            }
            tags.extend(keyrings[&image.keyring].iter().copied());
        }
        out.push((v.version, v.created_unix, tags));
    }
    Ok(out)
}

/// The figures of every parcel of `user` (or of everyone; of one parcel with `parcel`), at `now_unix`.
/// Shared bytes are always judged against every parcel of the deployment.
pub async fn usage(
    storage: &Storage,
    user: Option<&str>,
    parcel: Option<&str>,
    now_unix: i64,
) -> Result<UsageReport, ServerError> {
    let sizes: HashMap<Tag, u64> = storage.chunks.store().list().await?.into_iter().collect();
    let size = |t: &Tag| sizes.get(t).copied().unwrap_or(0);
    let mut all = Vec::new();
    for p in storage.meta.list_parcels(None).await? {
        let versions = match parcel_versions(storage, &p.user, &p.name).await {
            Ok(v) => v,
            Err(ServerError::Meta(MetaError::NoSuchParcel(_))) => continue,
            Err(e) => return Err(e),
        };
        all.push((p.user, p.name, versions));
    }
    // Which parcels reference each chunk.
    let mut referenced_by: HashMap<Tag, u32> = HashMap::new();
    let mut unions = Vec::with_capacity(all.len());
    for (_, _, versions) in &all {
        let union: HashSet<Tag> = versions.iter().flat_map(|(_, _, t)| t.iter().copied()).collect();
        for t in &union {
            *referenced_by.entry(*t).or_default() += 1;
        }
        unions.push(union);
    }
    let mut report = UsageReport {
        referenced_chunks: referenced_by.len() as u64,
        referenced_bytes: referenced_by.keys().map(size).sum(),
        ..Default::default()
    };
    let since = now_unix - CHECKIN_WINDOW_DAYS * 86_400;
    for ((u, p, versions), union) in all.iter().zip(&unions) {
        let logical: u64 = versions.iter().map(|(_, _, t)| t.iter().map(size).sum::<u64>()).sum();
        report.logical_bytes += logical;
        if user.is_some_and(|w| w != u) || parcel.is_some_and(|w| w != p) {
            continue;
        }
        let by_number: HashMap<u64, &HashSet<Tag>> = versions.iter().map(|(n, _, t)| (*n, t)).collect();
        let mut added: Vec<u64> = versions
            .iter()
            .filter_map(|(n, _, tags)| {
                let before = if *n == 1 { Some(None) } else { by_number.get(&(n - 1)).map(Some) };
                before.map(|b| tags.iter().filter(|t| b.is_none_or(|b| !b.contains(t))).map(size).sum())
            })
            .collect();
        added.sort_unstable();
        let (unique, shared) = union.iter().fold((0, 0), |(u, s), t| {
            if referenced_by.get(t).copied().unwrap_or(0) > 1 {
                (u, s + size(t))
            } else {
                (u + size(t), s)
            }
        });
        let recent = versions.iter().filter(|(_, at, _)| *at > since && *at <= now_unix).count();
        report.parcels.push(ParcelUsage {
            user: u.clone(),
            parcel: p.clone(),
            versions: versions.len() as u64,
            checkins_measured: added.len() as u64,
            checkin_bytes_p50: percentile(&added, 50.0),
            checkin_bytes_p95: percentile(&added, 95.0),
            checkins_per_day: recent as f64 / CHECKIN_WINDOW_DAYS as f64,
            unique_bytes: unique,
            shared_bytes: shared,
            logical_bytes: logical,
            dedup_ratio: ratio(logical, unique + shared),
        });
    }
    report.dedup_ratio = ratio(report.logical_bytes, report.referenced_bytes);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[7], 95.0), 7);
        let v: Vec<u64> = (1..=20).collect();
        assert_eq!(percentile(&v, 50.0), 10);
        assert_eq!(percentile(&v, 95.0), 19);
        assert_eq!(percentile(&[1, 2, 3], 50.0), 2);
        assert_eq!(ratio(10, 0), 0.0);
        assert_eq!(ratio(10, 4), 2.5);
    }
}
