//! `isr checkout`: take the lock and fetch a version; taking a broken lock back.

use super::common::*;
use super::Client;
use super::LocalStateName;
use crate::error::ClientError;
use crate::home::{rfc3339, valid_parcel_name, write_atomic, LocalState};
use crate::manifests::{self, Asked, ParcelKey};
use crate::network::SeenPolicy;
use crate::parcel_files::ParcelFiles;
use crate::transport::Transport;
use isr_format::{ImageKind, Keyring};
use std::path::Path;

/// What `checkout` did: the local state, and a note for the user when the lock had to be taken again.
#[derive(Debug, Clone)]
pub struct Checkout {
    pub state: LocalState,
    pub note: Option<String>,
}

impl Client {
    /// Take the lock and fetch what a resume needs. A parcel this client already holds is a no-op; one whose
    /// lock was broken meanwhile gets its lock back when it is free (see [`Client::retake_lock`]).
    pub async fn checkout(&mut self, name: &str, version: Option<u64>) -> Result<Checkout, ClientError> {
        valid_parcel_name(name)?;
        if let Some(st) = self.home.local_state(&self.user, name)? {
            if version.is_some_and(|v| v != st.base_version) {
                return Err(ClientError::Usage(format!(
                    "{name} is already checked out here at version {}: check it in or discard it first",
                    st.base_version
                )));
            }
            return self.retake_lock(name, st).await;
        }
        let t = self.connect().await?;
        let id = self.home.identity()?;
        let lock_id = t.lock(name, &id.name, &id.client_id).await?;
        let result = self.fetch_version(&t, name, version, lock_id.clone()).await;
        if result.is_err() {
            let _ = t.unlock(name, &lock_id).await;
        }
        Ok(Checkout { state: result?, note: None })
    }

    /// The lock of a parcel checked out here: confirmed with the server, or taken again when it was broken
    /// and is free now. If the head moved meanwhile, an unmodified parcel moves to the new head; a modified
    /// one keeps its changes and the note says what the user can do with them.
    async fn retake_lock(&mut self, name: &str, mut st: LocalState) -> Result<Checkout, ClientError> {
        let t = self.connect().await?;
        let loss = match t.confirm_lock(name, &st.lock_id).await {
            Ok(_) => return Ok(Checkout { state: st, note: None }),
            Err(ClientError::LockLost(loss)) => loss,
            Err(e) => return Err(e),
        };
        if let Some((holder, since)) = &loss.holder_now {
            return Err(ClientError::Locked(format!(
                "{}; {holder} holds the lock now (since {}). Your local changes to {name} are kept",
                loss.message,
                rfc3339(*since)
            )));
        }
        let id = self.home.identity()?;
        st.lock_id = t.lock(name, &id.name, &id.client_id).await?;
        self.home.save_local_state(&st)?;
        let mut note = format!("{}; took the lock again", loss.message);
        let head = t.parcel(name).await?.head;
        if head != st.head_at_checkout {
            if self.local_state_name(name)? == LocalStateName::Unmodified {
                let lock_id = st.lock_id.clone();
                st = self.fetch_version(&t, name, None, lock_id).await?;
                note.push_str(&format!(" and moved to the new head, version {}", st.base_version));
            } else {
                note.push_str(&format!(
                    ". The head moved to version {head} meanwhile, but your changes are based on version {}: keep \
                     them as a new parcel with `isr checkin {name} --as NEWNAME`, or drop them with `isr discard \
                     {name}`",
                    st.head_at_checkout
                ));
            }
        }
        Ok(Checkout { state: st, note: Some(note) })
    }

    pub(super) async fn fetch_version(
        &mut self,
        t: &Transport,
        name: &str,
        version: Option<u64>,
        lock_id: String,
    ) -> Result<LocalState, ClientError> {
        let dir = self.home.parcel_dir(&self.user, name);
        let st = self.fetch_version_into(t, name, version, lock_id, &dir).await?;
        self.home.save_local_state(&st)?;
        Ok(st)
    }

    /// Fetch a version (default: the head) into `dir` as a checked-out parcel's files (manifest, base
    /// keyrings; the chunks of the kernel and initrd into the cache) and return its local state, not yet
    /// saved. `dir` is replaced. The disk and the memory image come on demand (`hoard` fetches them all).
    pub(crate) async fn fetch_version_into(
        &mut self,
        t: &Transport,
        name: &str,
        version: Option<u64>,
        lock_id: String,
        dir: &Path,
    ) -> Result<LocalState, ClientError> {
        let detail = t.parcel(name).await?;
        if detail.head == 0 {
            return Err(ClientError::Other(format!(
                "{name} has no version yet (an interrupted create? run it again)"
            )));
        }
        let wrap = self.secrets()?.wrap.clone();
        let keyroot = unwrap_keyroot(&detail.wrapped_keyroot, &wrap, "the server")?;
        let key = ParcelKey { user: &self.user, parcel: name, keyroot: &keyroot };
        let fetched = manifests::fetch(t, &self.home, key, Asked::from_option(version, detail.head)).await?;
        let (v, manifest, manifest_bytes) = (fetched.version, fetched.manifest, fetched.bytes);
        let _ = std::fs::remove_dir_all(dir);
        let files = ParcelFiles::new(dir);
        let sources = self.sources(Some(t.clone()))?;
        for (kind, r) in manifest.images() {
            let bytes = t.keyring(name, &r.keyring).await?;
            let ring = Keyring::open(&bytes, &keyroot)?;
            write_atomic(&files.base_keyring(kind), &bytes)?;
            if matches!(kind, ImageKind::Kernel | ImageKind::Initrd) {
                // Needed whole to start the VM (the guest's RAM and disk are fetched as it touches them).
                fetch_missing(
                    self.progress.as_ref(),
                    &sources,
                    &image_chunks(&ring).collect::<Vec<_>>(),
                    kind.name(),
                )
                .await?;
            }
        }
        write_atomic(&files.base_manifest(), &manifest_bytes)?;
        let st = LocalState {
            server: t.server().to_owned(),
            user: self.user.clone(),
            parcel: name.to_owned(),
            base_version: v,
            head_at_checkout: detail.head.max(v),
            lock_id,
            wrapped_keyroot: detail.wrapped_keyroot,
            memory_dropped: false,
            network_policy: Some(SeenPolicy::from_server(detail.network_policy.as_deref())),
        };
        Ok(st)
    }
}
