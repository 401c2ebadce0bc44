//! IT's recovery key: `isr-server recovery init`, `export --recovery-key` and `user passwd --recovery-key`.
//!
//! Clients seal every parcel's keyroot to the deployment's X25519 recovery public key (when the server
//! announces one). The private half lives in a file the administrator keeps offline; with it these commands
//! open the storage directly, unseal a keyroot, and then read a version's images (verifying every chunk) or
//! rewrap the keyroots under a new password. Without the file the server still cannot read anything.

use crate::auth;
use crate::error::ServerError;
use crate::storage::Storage;
use futures::StreamExt;
use isr_format::codec::ChunkDecoder;
use isr_format::{
    ChunkIndex, ImageKind, KdfParams, KeyError, Keyring, Keyroot, Manifest, RecoverySecretKey, UserSecrets,
    WrappedKeyroot,
};
use isr_store::meta::VersionSel;
use isr_store::{MetaError, StoreError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Chunks fetched and decoded at once by an export.
const EXPORT_IN_FLIGHT: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("{0} exists: refusing to overwrite a recovery key file (move it away first)")]
    KeyFileExists(PathBuf),
    #[error("recovery key file {path}: {source}")]
    KeyFile { path: PathBuf, source: KeyError },
    #[error("parcel {0} has no recovery seal (created before the deployment had a recovery key)")]
    NoSeal(String),
    #[error("parcel {parcel}: {source} (is this the deployment's recovery key?)")]
    WrongKey { parcel: String, source: KeyError },
    #[error("integrity failure: {0}")]
    Integrity(String),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RecoveryError {
    let context = context.into();
    move |source| RecoveryError::Io { context, source }
}

/// Creates a new recovery key pair: the private key into `output` (created exclusively, mode 0600, synced).
pub fn init(output: &Path) -> Result<RecoverySecretKey, RecoveryError> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = RecoverySecretKey::random();
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(output).map_err(
            |e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => RecoveryError::KeyFileExists(output.to_owned()),
                _ => RecoveryError::Io { context: format!("creating {}", output.display()), source: e },
            },
        )?;
    let written = file.write_all(key.to_file_text().as_bytes()).and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(output);
        return Err(RecoveryError::Io { context: format!("writing {}", output.display()), source: e });
    }
    Ok(key)
}

/// Reads a recovery key file.
pub fn load(path: &Path) -> Result<RecoverySecretKey, RecoveryError> {
    let text = std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
    RecoverySecretKey::from_file_text(&text)
        .map_err(|source| RecoveryError::KeyFile { path: path.to_owned(), source })
}

/// The keyroot of `user/parcel`, from its recovery seal.
pub async fn keyroot(
    storage: &Storage,
    user: &str,
    parcel: &str,
    key: &RecoverySecretKey,
) -> Result<Keyroot, RecoveryError> {
    let name = format!("{user}/{parcel}");
    let detail = storage.meta.parcel(user, parcel).await?;
    let sealed = detail.recovery_keyroot.ok_or_else(|| RecoveryError::NoSeal(name.clone()))?;
    WrappedKeyroot(sealed)
        .open_with_recovery(key)
        .map_err(|source| RecoveryError::WrongKey { parcel: name, source })
}

/// What an export wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exported {
    pub version: u64,
    pub bytes: u64,
}

/// Writes the raw `kind` image of a version (default: the head) of `user/parcel` to `output`: every chunk
/// verified against its tag and decoded with the keyring's key. Written to a temporary file beside `output`
/// and renamed once complete, so `output` is never a partial image.
pub async fn export(
    storage: &Storage,
    user: &str,
    parcel: &str,
    version: Option<u64>,
    kind: ImageKind,
    key: &RecoverySecretKey,
    output: &Path,
) -> Result<Exported, RecoveryError> {
    let name = format!("{user}/{parcel}");
    let keyroot = keyroot(storage, user, parcel, key).await?;
    let which = version.map_or(VersionSel::Head, VersionSel::Number);
    let (number, bytes) = storage.meta.manifest(user, parcel, which).await?;
    let contents = Manifest::open_without_binding_check(&bytes, &keyroot)
        .map_err(|e| RecoveryError::Integrity(format!("manifest of {name} version {number}: {e}")))?;
    // A rollback repeats an older version's manifest bytes, so the number it names may be lower; never
    // another parcel's, never a later one.
    if let Some(b) = &contents.binding {
        if b.user != user || b.parcel != parcel || b.version > number {
            return Err(RecoveryError::Integrity(format!(
                "version {number} of {name} holds a manifest written for {b}"
            )));
        }
    }
    let manifest = contents.manifest;
    let image = *manifest.image(kind).ok_or_else(|| {
        RecoveryError::Usage(format!("version {number} of {name} has no {} image", kind.name()))
    })?;
    let ring_bytes = storage.meta.keyring(user, parcel, image.keyring).await?.ok_or_else(|| {
        RecoveryError::Integrity(format!("keyring {} of {name} version {number} is missing", image.keyring))
    })?;
    let ring = Keyring::open(&ring_bytes, &keyroot)
        .map_err(|e| RecoveryError::Integrity(format!("keyring {} of {name}: {e}", image.keyring)))?;
    if ring.image_len() != image.len || ring.chunk_size() != manifest.chunk_size {
        return Err(RecoveryError::Integrity(format!(
            "keyring {} of {name} does not describe the manifest's {} image",
            image.keyring,
            kind.name()
        )));
    }
    let tmp = partial_path(output);
    let file = std::fs::File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    let written = write_image(storage, &name, Arc::new(ring), file).await;
    match written {
        Ok(len) => {
            std::fs::rename(&tmp, output).map_err(io(format!("renaming to {}", output.display())))?;
            Ok(Exported { version: number, bytes: len })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// `DIR/.NAME.isr-partial` for `DIR/NAME`: same directory (so the rename is atomic), hidden.
fn partial_path(output: &Path) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    output.with_file_name(format!(".{name}.isr-partial"))
}

async fn write_image(
    storage: &Storage,
    name: &str,
    ring: Arc<Keyring>,
    file: std::fs::File,
) -> Result<u64, RecoveryError> {
    let len = ring.image_len().0;
    // All-zero chunks are not stored: the sized file already reads as zeros there.
    file.set_len(len).map_err(io("sizing the output"))?;
    let file = Arc::new(file);
    let store = storage.chunks.store().clone();
    let results = futures::stream::iter(0..ring.chunk_count())
        .map(|i| {
            let (ring, file, store) = (ring.clone(), file.clone(), store.clone());
            async move {
                let idx = ChunkIndex(i);
                let Some((tag, _)) = ring.get(idx) else { return Ok(()) };
                let stored = match store.get(&tag).await {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        return Err(RecoveryError::Integrity(format!(
                            "chunk {tag} (chunk {i} of {name}) is missing from the chunk store"
                        )))
                    }
                    Err(StoreError::Integrity { source, .. }) => {
                        return Err(RecoveryError::Integrity(format!(
                            "chunk {tag} (chunk {i} of {name}) is corrupt: {source}"
                        )))
                    }
                    Err(e) => return Err(e.into()),
                };
                let name = name.to_owned();
                tokio::task::spawn_blocking(move || {
                    let (tag, key) = ring.get(idx).expect("checked above");
                    let plain =
                        ChunkDecoder::new().decode(&tag, key, &stored, ring.chunk_len(idx)).map_err(|e| {
                            RecoveryError::Integrity(format!(
                                "chunk {tag} (chunk {i} of {name}) is corrupt: {e}"
                            ))
                        })?;
                    use std::os::unix::fs::FileExt;
                    file.write_all_at(&plain, ring.chunk_size().offset_of(idx).0)
                        .map_err(io("writing the output"))
                })
                .await
                .map_err(|e| RecoveryError::Io {
                    context: "decoding a chunk".into(),
                    source: std::io::Error::other(e),
                })?
            }
        })
        .buffer_unordered(EXPORT_IN_FLIGHT);
    futures::pin_mut!(results);
    while let Some(r) = results.next().await {
        r?;
    }
    file.sync_all().map_err(io("syncing the output"))?;
    Ok(len)
}

/// What a password reset through the recovery key did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PasswordReset {
    /// Parcels whose keyroot is now wrapped under the new password.
    pub rewrapped: Vec<String>,
    /// Parcels without a recovery seal: left as they were (they still open with the previous password).
    pub unsealed: Vec<String>,
}

/// Sets `user`'s password to `password`: every parcel keyroot that has a recovery seal is rewrapped under the
/// key the client derives from the new password (the recovery seal stays), then the login hash is replaced.
/// Every seal is opened before anything is written, so a wrong recovery key changes nothing.
pub async fn reset_password(
    storage: &Storage,
    user: &str,
    password: String,
    key: &RecoverySecretKey,
) -> Result<PasswordReset, RecoveryError> {
    if storage.meta.user(user).await?.is_none() {
        return Err(MetaError::NoSuchUser(user.to_owned()).into());
    }
    let mut report = PasswordReset::default();
    let mut opened = Vec::new();
    for p in storage.meta.list_parcels(Some(user)).await? {
        match keyroot(storage, user, &p.name, key).await {
            Ok(k) => opened.push((p.name, k)),
            Err(RecoveryError::NoSeal(_)) => report.unsealed.push(format!("{user}/{}", p.name)),
            Err(e) => return Err(e),
        }
    }
    let u = user.to_owned();
    // The same derivation as the client's (argon2id with the default parameters): the client wraps with it.
    let secrets = tokio::task::spawn_blocking(move || UserSecrets::derive(&u, &password, KdfParams::DEFAULT))
        .await
        .map_err(|e| ServerError::Hash(e.to_string()))?
        .map_err(|e| ServerError::Hash(e.to_string()))?;
    for (parcel, keyroot) in opened {
        let wrapped = WrappedKeyroot::wrap(&keyroot, &secrets.wrap);
        storage.meta.set_wrapped_keyroot(user, &parcel, &wrapped.0).await?;
        report.rewrapped.push(format!("{user}/{parcel}"));
    }
    let login = secrets.login.clone();
    let hash = tokio::task::spawn_blocking(move || auth::hash_login_secret(&login))
        .await
        .map_err(|e| ServerError::Hash(e.to_string()))??;
    storage.meta.set_login_hash(user, &hash).await?;
    Ok(report)
}
