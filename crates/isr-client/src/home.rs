//! The client's home directory (`--home`, `$ISR_HOME`):
//!
//! ```text
//! HOME/client.json                   this client's id and name (the lock holder shown to others)
//! HOME/session.json                  server, user, session token, deployment convergence secret (mode 0600)
//! HOME/seen.json                     per parcel: highest version seen, first bound version seen (manifests.rs)
//! HOME/cache/                        encrypted chunks by tag, shared by every parcel of this client
//! HOME/parcels/USER/PARCEL/          one checked-out parcel:
//!     state.json                       base version, lock id, wrapped keyroot
//!     base.manifest                    the base version's manifest (authenticated on every load)
//!     keyrings/base-KIND               sealed keyrings of the base version
//!     keyrings/work-KIND               sealed working keyrings: present only when KIND was modified
//!     run.lock                         held (flock) while a disk export or VM runs
//! ```
//! Every file is replaced by write-to-temp, fsync, rename, fsync of the directory.

use crate::error::ClientError;
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

/// Replace `path` atomically and durably with `bytes`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    let dir = path.parent().ok_or_else(|| ClientError::Other(format!("{} has no parent", path.display())))?;
    std::fs::create_dir_all(dir).map_err(|e| ClientError::io(format!("creating {}", dir.display()), e))?;
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

pub fn valid_parcel_name(name: &str) -> Result<(), ClientError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ClientError::Usage(format!(
            "invalid parcel name {name:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

impl Home {
    pub fn open(root: impl Into<PathBuf>) -> Result<Home, ClientError> {
        let root = root.into();
        std::fs::create_dir_all(root.join("cache"))
            .map_err(|e| ClientError::io(format!("creating {}", root.display()), e))?;
        Ok(Home { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
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

    pub fn local_state(&self, user: &str, parcel: &str) -> Result<Option<LocalState>, ClientError> {
        read_json(&self.parcel_dir(user, parcel).join("state.json"))
    }

    pub fn save_local_state(&self, st: &LocalState) -> Result<(), ClientError> {
        write_atomic(
            &self.parcel_dir(&st.user, &st.parcel).join("state.json"),
            &serde_json::to_vec_pretty(st).expect("serializable"),
        )
    }
}
