//! `isr rollback`: a new head identical to an older version.

use super::common::*;
use super::has_local_changes;
use super::Client;
use crate::error::ClientError;
use crate::home::{now_unix, valid_parcel_name};
use crate::manifests::{self, Asked, ParcelKey};
use crate::run::is_running;

impl Client {
    /// A new head identical to `version`: its manifest re-sealed as an ordinary commit under the lock (this
    /// client's when the parcel is checked out here, else taken for the commit and released).
    pub async fn rollback(&mut self, name: &str, version: u64) -> Result<u64, ClientError> {
        valid_parcel_name(name)?;
        let local = self.home.local_state(&self.user, name)?;
        if let Some(st) = &local {
            let files = self.home.parcel_files(&self.user, name);
            if has_local_changes(&files)? || is_running(files.dir()) {
                return Err(ClientError::Other(format!(
                    "{name} has local changes here: check them in or discard them before a rollback (base {})",
                    st.base_version
                )));
            }
        }
        let t = self.connect().await?;
        let id = self.home.identity()?;
        let (lock_id, taken) = match &local {
            Some(st) => (st.lock_id.clone(), false),
            None => (t.lock(name, &id.name, &id.client_id).await?, true),
        };
        let wrap = self.secrets()?.wrap.clone();
        let cache = self.cache()?;
        let user = self.user.clone();
        let home = self.home.clone();
        let committed = async {
            let detail = t.parcel(name).await?;
            let keyroot = unwrap_keyroot(&detail.wrapped_keyroot, &wrap, "the server")?;
            let key = ParcelKey { user: &user, parcel: name, keyroot: &keyroot };
            // Version N re-sealed for head + 1: a rollback is an ordinary commit.
            let mut manifest = manifests::fetch(&t, &home, key, Asked::Version(version)).await?.manifest;
            let comment = format!("rollback to version {version}");
            manifest.comment = comment.clone();
            manifest.created_unix = now_unix();
            manifests::check_commit_base(&home, key, detail.head)?;
            let sealed = manifests::seal_for_commit(&manifest, key, detail.head)?;
            let mut transfer = Transfer::default();
            let v = commit_with_retry(
                &t,
                &cache,
                name,
                &lock_id,
                detail.head,
                &sealed,
                &id.name,
                &comment,
                &mut transfer,
                None,
            )
            .await?;
            manifests::record_commit(&home, key, v)?;
            Ok::<u64, ClientError>(v)
        }
        .await;
        if taken {
            let _ = t.unlock(name, &lock_id).await;
        }
        let v = committed.map_err(|e| lock_guidance(name, e))?;
        if let Some(st) = local {
            // Still holding the lock: move the local base to the new head.
            self.fetch_version(&t, name, Some(v), st.lock_id).await?;
        }
        Ok(v)
    }
}
