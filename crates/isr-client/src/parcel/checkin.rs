//! `isr checkin` (sync, release the lock, leave) and `isr checkin --as NEWNAME`.

use super::common::*;
use super::Client;
use super::LocalStateName;
use crate::error::ClientError;
use crate::home::valid_parcel_name;
use crate::manifests::{self, ParcelKey};
use crate::run::is_running;

/// What `checkin` did: the version made (if anything changed), and a note for the user.
#[derive(Debug, Clone)]
pub struct CheckinOutcome {
    pub synced: Option<(u64, Transfer)>,
    pub note: Option<String>,
}

impl Client {
    /// Sync, then release the lock; the parcel leaves this client (its chunks stay in the cache). A parcel
    /// without local changes whose lock was broken meanwhile just leaves (there is nothing to keep).
    pub async fn checkin(&mut self, name: &str, comment: &str) -> Result<CheckinOutcome, ClientError> {
        // A running parcel can be synced (its own process does it), not checked in: it cannot leave.
        let dir = self.home.parcel_dir(&self.user, name);
        if is_running(&dir) {
            return Err(ClientError::Other(format!(
                "{name} is running: suspend it (or stop `isr disk`) before checking it in; `isr sync {name}` \
                 commits a version while it runs"
            )));
        }
        let synced = match self.sync(name, comment).await {
            Ok(s) => s,
            Err(ClientError::LockLost(loss))
                if self.local_state_name(name)? == LocalStateName::Unmodified =>
            {
                self.leave(name)?;
                return Ok(CheckinOutcome {
                    synced: None,
                    note: Some(format!("{}; nothing to check in", loss.message)),
                });
            }
            Err(e) => return Err(e),
        };
        let st = self.home.local_state(&self.user, name)?.ok_or_else(|| not_checked_out(name))?;
        let t = self.connect().await?;
        match t.unlock(name, &st.lock_id).await {
            Ok(()) => {}
            // Committed (or nothing to commit) and the lock went meanwhile: nothing is lost by leaving.
            Err(ClientError::LockLost(_)) if synced.is_some() => {}
            Err(e) => return Err(lock_guidance(name, e)),
        }
        self.leave(name)?;
        Ok(CheckinOutcome { synced, note: None })
    }

    /// Keep the local changes of `name` as a new parcel `new_name` (e.g. after the lock was lost and the head
    /// moved): same keyroot, every chunk shared, version 1 of the new parcel equal to the local state. `name`
    /// then leaves this client (its lock is released if it is still ours).
    pub async fn checkin_as(
        &mut self,
        name: &str,
        new_name: &str,
        comment: &str,
    ) -> Result<(u64, Transfer), ClientError> {
        valid_parcel_name(new_name)?;
        let o = self.open(name)?;
        if is_running(o.files.dir()) {
            return Err(ClientError::Other(format!("{name} is running: suspend it before checking it in")));
        }
        let t = self.connect().await?;
        let id = self.home.identity()?;
        self.encode_local_changes(&o).await?;
        let diff = self.keyring_diff(&o)?;
        let wrapped = hex::decode(&o.state.wrapped_keyroot).map_err(|_| {
            ClientError::Integrity("the local state holds a malformed wrapped keyroot".into())
        })?;
        let recovery = self.recovery_seal(&o.keyroot)?;
        let lock_id = t
            .create_parcel(
                new_name,
                &wrapped,
                recovery.as_ref().map(|r| r.0.as_slice()),
                &id.name,
                &id.client_id,
            )
            .await?;
        let made = async {
            let mut transfer = Transfer::default();
            // The new parcel has no chunks of its own: the base's are on the server already (shared).
            let missing = t.missing(&diff.new_tags).await?;
            upload_from_cache(self.progress.as_ref(), &t, &self.cache()?, &missing, &mut transfer).await?;
            self.put_keyrings(&t, new_name, &lock_id, &diff, true).await?;
            let manifest = Self::planned_manifest(&o, &diff, comment);
            // Sealed for the new parcel: its identity and version 1 are what the MAC binds.
            let key = ParcelKey { user: &self.user, parcel: new_name, keyroot: &o.keyroot };
            let sealed = manifests::seal_for_commit(&manifest, key, 0)?;
            let v = commit_with_retry(
                &t,
                &self.cache()?,
                new_name,
                &lock_id,
                0,
                &sealed,
                &id.name,
                comment,
                &mut transfer,
                None,
            )
            .await?;
            manifests::record_commit(&self.home, key, v)?;
            t.unlock(new_name, &lock_id).await?;
            Ok::<_, ClientError>((v, transfer))
        }
        .await;
        let done = match made {
            Ok(d) => d,
            Err(e) => {
                let _ = t.delete_unfinished_parcel(new_name, &id.client_id).await;
                return Err(e);
            }
        };
        // The changes are safe in the new parcel: release the old lock if it is still ours, and leave.
        let _ = t.unlock(name, &o.state.lock_id).await;
        self.leave(name)?;
        Ok(done)
    }

    /// Remove a parcel's local files (its encrypted chunks stay in the cache).
    pub(super) fn leave(&self, name: &str) -> Result<(), ClientError> {
        let dir = self.home.parcel_dir(&self.user, name);
        std::fs::remove_dir_all(&dir).map_err(|e| ClientError::io(format!("removing {}", dir.display()), e))
    }
}
