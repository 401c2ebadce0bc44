//! Manifests opened bound to what was asked for, and the highest version of each parcel this home has seen.
//!
//! Every manifest fetched from the server is opened bound to the user, the parcel and the version number it
//! must have: the number asked for (`--version N`), or for `head` the number the server answered, which
//! must not be below the highest version this client home has seen of the parcel. Every commit seals its
//! manifest bound to `base + 1` and never names a base below that highest version. So a server (or a man in
//! the middle) that serves an older authentic manifest is detected instead of silently rolling the parcel
//! back.
//!
//! `HOME/seen.json` holds, per parcel, the highest version seen and the lowest version seen in the bound
//! format. Parcels are told apart by owner, name and a hash derived from their keyroot, so a parcel deleted
//! and created again under the same name (a new keyroot) starts afresh, and the same parcel reached through
//! another server URL keeps its history. Legacy (format 1, unbound) manifests are accepted only for
//! versions below the lowest bound version seen: from that version on every version is bound (a client that
//! cannot open bound manifests cannot commit on top of one).

use crate::error::ClientError;
use crate::home::{write_atomic, Home};
use crate::transport::Transport;
use bytes::Bytes;
use isr_format::{Binding, Keyroot, LegacyManifest, Manifest, ManifestError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const SEEN_FILE: &str = "seen.json";
const SEEN_LOCK: &str = "seen.lock";
const PARCEL_ID_CONTEXT: &str = "isr 2026-11 client seen-versions parcel id";

/// One parcel, as its manifests are bound and its history is remembered.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ParcelKey<'a> {
    pub user: &'a str,
    pub parcel: &'a str,
    pub keyroot: &'a Keyroot,
}

impl ParcelKey<'_> {
    fn binding(&self, version: u64) -> Binding {
        Binding::new(self.user, self.parcel, version)
    }

    /// The key of its record in `seen.json`: names for people, a keyroot-derived id to tell parcels apart.
    fn record_key(&self) -> String {
        let id = blake3::derive_key(PARCEL_ID_CONTEXT, &self.keyroot.0);
        format!("{}/{} {}", self.user, self.parcel, hex::encode(&id[..16]))
    }

    fn name(&self) -> String {
        format!("{}/{}", self.user, self.parcel)
    }
}

/// Which manifest was asked of the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Asked {
    /// This version number exactly.
    Version(u64),
    /// The head, which must be at least `at_least` (e.g. the head the server reported a moment before) and
    /// at least the highest version seen.
    Head { at_least: u64 },
}

impl Asked {
    /// `Some(n)` is version `n`, `None` the head.
    pub fn from_option(version: Option<u64>, head_at_least: u64) -> Asked {
        match version {
            Some(n) => Asked::Version(n),
            None => Asked::Head { at_least: head_at_least },
        }
    }
}

/// A manifest fetched from the server and opened bound to its parcel and number.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub version: u64,
    pub manifest: Manifest,
    pub bytes: Bytes,
}

/// What this home remembers of one parcel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    /// The highest version number seen (opened or committed).
    highest: u64,
    /// The lowest version number seen in the bound format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    first_bound: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SeenFile {
    parcels: BTreeMap<String, Seen>,
}

fn seen_path(home: &Home) -> PathBuf {
    home.root().join(SEEN_FILE)
}

fn read_seen(path: &Path) -> Result<SeenFile, ClientError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            ClientError::Integrity(format!(
                "{} is corrupt ({e}): it records the versions this client has seen; remove it to start afresh",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SeenFile::default()),
        Err(e) => Err(ClientError::io(format!("reading {}", path.display()), e)),
    }
}

fn seen(home: &Home, key: &ParcelKey<'_>) -> Result<Seen, ClientError> {
    Ok(read_seen(&seen_path(home))?.parcels.get(&key.record_key()).copied().unwrap_or_default())
}

/// Merge `version` into the parcel's record (highest only grows, first bound only shrinks), under a lock so
/// concurrent `isr` commands of one home do not lose each other's updates.
fn record(home: &Home, key: &ParcelKey<'_>, version: u64, bound: bool) -> Result<(), ClientError> {
    let lock_path = home.root().join(SEEN_LOCK);
    use std::os::unix::fs::OpenOptionsExt;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| ClientError::io(format!("opening {}", lock_path.display()), e))?;
    lock.lock().map_err(|e| ClientError::io(format!("locking {}", lock_path.display()), e))?;
    let path = seen_path(home);
    let mut file = read_seen(&path)?;
    let entry = file.parcels.entry(key.record_key()).or_default();
    let before = *entry;
    entry.highest = entry.highest.max(version);
    if bound {
        entry.first_bound = Some(entry.first_bound.map_or(version, |b| b.min(version)));
    }
    if *entry != before {
        write_atomic(&path, &serde_json::to_vec_pretty(&file).expect("serializable"))?;
    }
    Ok(())
}

/// Open manifest bytes that must be version `version` of the parcel; a legacy manifest only where one can
/// still be right.
fn open_as(
    key: &ParcelKey<'_>,
    seen: Seen,
    version: u64,
    bytes: &[u8],
) -> Result<(Manifest, bool), ClientError> {
    let legacy = match seen.first_bound {
        Some(first) if version >= first => LegacyManifest::Refuse,
        _ => LegacyManifest::Accept,
    };
    match Manifest::open_bound(bytes, key.keyroot, &key.binding(version), legacy) {
        Ok(c) => Ok((c.manifest, c.binding.is_some())),
        Err(e @ ManifestError::Unbound { .. }) => Err(ClientError::Integrity(format!(
            "{e}; this client has seen {}'s manifests bound since version {}",
            key.name(),
            seen.first_bound.unwrap_or_default()
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Fetch a manifest from the server and open it bound to the parcel and the version asked for (or, for the
/// head, the number the server answered, which must not go back from what this home has seen).
pub(crate) async fn fetch(
    t: &Transport,
    home: &Home,
    key: ParcelKey<'_>,
    asked: Asked,
) -> Result<Fetched, ClientError> {
    let seen = seen(home, &key)?;
    let (version, bytes) = t.manifest(key.parcel, asked_number(asked)).await?;
    match asked {
        Asked::Version(n) if version != n => {
            return Err(ClientError::Integrity(format!(
                "asked the server for version {n} of {}, it answered with version {version}",
                key.name()
            )));
        }
        Asked::Head { at_least } if version < at_least.max(seen.highest) => {
            let why = if seen.highest >= at_least {
                format!("this client has already seen version {}", seen.highest)
            } else {
                format!("the server itself reported version {at_least} as the head a moment before")
            };
            return Err(ClientError::Integrity(format!(
                "the server answered version {version} as the head of {}, but {why}: a replayed or rolled-back \
                 answer (if the server was restored from an older backup, remove the parcel's entry from {})",
                key.name(),
                seen_path(home).display()
            )));
        }
        _ => {}
    }
    let (manifest, bound) = open_as(&key, seen, version, &bytes)?;
    record(home, &key, version, bound)?;
    Ok(Fetched { version, manifest, bytes })
}

fn asked_number(asked: Asked) -> Option<u64> {
    match asked {
        Asked::Version(n) => Some(n),
        Asked::Head { .. } => None,
    }
}

/// Open a manifest kept locally (a checked-out base) that must be version `version` of the parcel.
pub(crate) fn open_local(
    home: &Home,
    key: ParcelKey<'_>,
    version: u64,
    bytes: &[u8],
) -> Result<Manifest, ClientError> {
    let seen = seen(home, &key)?;
    let (manifest, bound) = open_as(&key, seen, version, bytes)?;
    let lowers_first_bound = bound && seen.first_bound.is_none_or(|b| version < b);
    if lowers_first_bound || version > seen.highest {
        record(home, &key, version, bound)?;
    }
    Ok(manifest)
}

/// Refuse a commit on `base` when this home has seen a newer version: it would go back from it.
pub(crate) fn check_commit_base(home: &Home, key: ParcelKey<'_>, base: u64) -> Result<(), ClientError> {
    let seen = seen(home, &key)?;
    if base < seen.highest {
        return Err(ClientError::StaleBase(format!(
            "this client has already seen version {} of {}: a commit on version {base} would go back from it",
            seen.highest,
            key.name()
        )));
    }
    Ok(())
}

/// Seal `manifest` as the version a commit on `base` creates (the server numbers it `base + 1`).
pub(crate) fn seal_for_commit(
    manifest: &Manifest,
    key: ParcelKey<'_>,
    base: u64,
) -> Result<Vec<u8>, ClientError> {
    let version = base
        .checked_add(1)
        .ok_or_else(|| ClientError::Other(format!("{} has no version number left", key.name())))?;
    Ok(manifest.seal(key.keyroot, &key.binding(version))?)
}

/// Remember a version this client committed.
pub(crate) fn record_commit(home: &Home, key: ParcelKey<'_>, version: u64) -> Result<(), ClientError> {
    record(home, &key, version, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use isr_format::{ChunkSize, ImageLen, ImageRef, Tag, VmDescription};

    fn manifest() -> Manifest {
        Manifest {
            vm: VmDescription { memory_mib: 64, cpus: 1, append: None, devices: Default::default() },
            chunk_size: ChunkSize::DEFAULT,
            disk: ImageRef { len: ImageLen(1 << 20), keyring: Tag([1; 32]) },
            memory: None,
            kernel: None,
            initrd: None,
            created_unix: 1_800_000_000,
            comment: String::new(),
        }
    }

    #[test]
    fn local_manifests_open_bound_and_legacy_only_below_the_first_bound_version() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(dir.path()).unwrap();
        let kr = Keyroot([4; 32]);
        let key = ParcelKey { user: "alice", parcel: "p", keyroot: &kr };
        let legacy = manifest().seal_legacy_unbound(&kr).unwrap();
        // Nothing seen yet: a legacy manifest may be any version.
        assert_eq!(open_local(&home, key, 3, &legacy).unwrap(), manifest());
        let v5 = seal_for_commit(&manifest(), key, 4).unwrap();
        assert!(matches!(open_local(&home, key, 4, &v5), Err(ClientError::Integrity(_))));
        assert_eq!(open_local(&home, key, 5, &v5).unwrap(), manifest());
        // Version 5 was bound, so from 5 on a legacy manifest is refused; below it, still accepted.
        assert!(matches!(open_local(&home, key, 6, &legacy), Err(ClientError::Integrity(_))));
        assert_eq!(open_local(&home, key, 4, &legacy).unwrap(), manifest());
        // Another parcel (other keyroot) has its own record.
        let other = Keyroot([5; 32]);
        let okey = ParcelKey { user: "alice", parcel: "p", keyroot: &other };
        assert_eq!(
            open_local(&home, okey, 6, &manifest().seal_legacy_unbound(&other).unwrap()).unwrap(),
            manifest()
        );
        assert!(check_commit_base(&home, okey, 6).is_ok());
    }

    #[test]
    fn commits_never_go_back_from_the_highest_version_seen() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(dir.path()).unwrap();
        let kr = Keyroot([4; 32]);
        let key = ParcelKey { user: "alice", parcel: "p", keyroot: &kr };
        assert!(check_commit_base(&home, key, 0).is_ok());
        record_commit(&home, key, 3).unwrap();
        record_commit(&home, key, 2).unwrap();
        assert!(check_commit_base(&home, key, 3).is_ok());
        let e = check_commit_base(&home, key, 2).unwrap_err();
        assert!(matches!(&e, ClientError::StaleBase(m) if m.contains("version 3 of alice/p")), "{e}");
        // The record survives in the home.
        let file = read_seen(&seen_path(&home)).unwrap();
        assert_eq!(
            file.parcels.values().copied().collect::<Vec<_>>(),
            [Seen { highest: 3, first_bound: Some(2) }]
        );
    }
}
