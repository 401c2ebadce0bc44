//! The client's home directory (`--home`, `$ISR_HOME`):
//!
//! ```text
//! HOME/client.json                   this client's id and name (the lock holder shown to others)
//! HOME/session.json                  server, user, session token, deployment convergence secret (mode 0600)
//! HOME/seen.json                     per parcel: highest version seen, first bound version seen (manifests.rs)
//! HOME/cache/                        encrypted chunks by tag, shared by every parcel of this client
//! HOME/parcels/USER/PARCEL/          one checked-out parcel: its files are named by
//!                                    [`crate::parcel_files::ParcelFiles`] (state.json, base.manifest,
//!                                    keyrings/, runtime/, run.lock, run.json, run-outcome.json)
//! HOME/transient/USER/PARCEL/        the run records of a transient run (`resume --transient`): run.lock,
//!                                    run.json, run-outcome.json; its working area is in its private directory
//! ```
//! Every file is replaced by write-to-temp, fsync, rename, fsync of the directory.

use crate::error::ClientError;
use crate::parcel_files::ParcelFiles;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientIdentity {
    pub client_id: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub server: String,
    pub user: String,
    pub token: String,
    pub expires_unix: i64,
    pub convergence_secret: String,
    pub recovery_pubkey: Option<String>,
}

/// What this client remembers about a checked-out parcel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalState {
    pub server: String,
    pub user: String,
    pub parcel: String,
    /// The version whose contents this checkout started from.
    pub base_version: u64,
    /// The head when this checkout started (or last synced): the base a commit must name.
    pub head_at_checkout: u64,
    pub lock_id: String,
    pub wrapped_keyroot: String,
    /// Set by a VM that was powered off: the next resume boots cold even if the base has a memory image.
    #[serde(default)]
    pub memory_dropped: bool,
    /// IT's network policy as last seen from the server (at checkout and every connected resume); absent in
    /// states written before policies existed (a `--disconnected` resume then runs without network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<crate::network::SeenPolicy>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_159_509), "2026-12-01T21:11:49Z");
    }
}

#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A Unix time as RFC 3339 UTC (`2026-12-01T21:11:49Z`), for messages.
pub fn rfc3339(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86400), unix.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Replace `path` atomically and durably with `bytes`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    let dir = path.parent().ok_or_else(|| ClientError::Other(format!("{} has no parent", path.display())))?;
    if !dir.is_dir() {
        create_private_dir(dir)?;
    }
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ClientError::io(format!("writing {}", path.display()), e)
    })
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, ClientError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| ClientError::Integrity(format!("{} is corrupt: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ClientError::io(format!("reading {}", path.display()), e)),
    }
}

/// The parcel name rule of the whole deployment (`isr_wire::ParcelName`), as a usage error (exit 2).
pub fn valid_parcel_name(name: &str) -> Result<(), ClientError> {
    match isr_wire::names::parcel_name_problem(name) {
        None => Ok(()),
        Some(why) => Err(ClientError::Usage(format!(
            "invalid parcel name {name:?}: {why} (1-64 letters, digits, '.', '_' or '-', not starting with '.')"
        ))),
    }
}

/// Make `dir` (and its missing parents) a directory only its owner can enter.
pub fn create_private_dir(dir: &Path) -> Result<(), ClientError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ClientError::io(format!("creating {}", dir.display()), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| ClientError::io(format!("making {} private", dir.display()), e))
}

impl Home {
    pub fn open(root: impl Into<PathBuf>) -> Result<Home, ClientError> {
        let root = root.into();
        // Everything below the home is private to its owner: the root is 0700 (so nothing under it can be
        // reached by others whatever its own mode), and files are written 0600.
        create_private_dir(&root)?;
        create_private_dir(&root.join("cache"))?;
        Ok(Home { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// The KVM probe's verdict for this host's current boot (`--accel auto`).
    pub fn kvm_probe_verdict(&self) -> PathBuf {
        self.root.join("kvm-probe.json")
    }

    pub fn identity(&self) -> Result<ClientIdentity, ClientError> {
        let path = self.root.join("client.json");
        if let Some(id) = read_json(&path)? {
            return Ok(id);
        }
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "client".into());
        let id = ClientIdentity {
            client_id: hex::encode(isr_format::random_bytes::<16>()),
            name: format!("{}:{}", host.trim(), self.root.display()),
        };
        write_atomic(&path, &serde_json::to_vec_pretty(&id).expect("serializable"))?;
        Ok(id)
    }

    pub fn session(&self) -> Result<Option<Session>, ClientError> {
        read_json(&self.root.join("session.json"))
    }

    pub fn save_session(&self, s: &Session) -> Result<(), ClientError> {
        write_atomic(&self.root.join("session.json"), &serde_json::to_vec_pretty(s).expect("serializable"))
    }

    pub fn parcel_dir(&self, user: &str, parcel: &str) -> PathBuf {
        self.root.join("parcels").join(user).join(parcel)
    }

    /// The local files of a parcel checked out here.
    pub fn parcel_files(&self, user: &str, parcel: &str) -> ParcelFiles {
        ParcelFiles::new(self.parcel_dir(user, parcel))
    }

    /// Where a transient run of the parcel keeps its run records (never its data: that is in the run's
    /// private directory under the runtime directory).
    pub fn transient_dir(&self, user: &str, parcel: &str) -> PathBuf {
        self.root.join("transient").join(user).join(parcel)
    }

    pub fn local_state(&self, user: &str, parcel: &str) -> Result<Option<LocalState>, ClientError> {
        read_json(&self.parcel_files(user, parcel).state())
    }

    /// Every parcel of `user` checked out here.
    pub fn local_states(&self, user: &str) -> Result<Vec<LocalState>, ClientError> {
        let dir = self.root.join("parcels").join(user);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ClientError::io(format!("reading {}", dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            if let Some(st) = read_json::<LocalState>(&ParcelFiles::new(entry.path()).state())? {
                out.push(st);
            }
        }
        out.sort_by(|a, b| a.parcel.cmp(&b.parcel));
        Ok(out)
    }

    pub fn save_local_state(&self, st: &LocalState) -> Result<(), ClientError> {
        write_atomic(
            &self.parcel_files(&st.user, &st.parcel).state(),
            &serde_json::to_vec_pretty(st).expect("serializable"),
        )
    }
}
