//! The lock of a parcel: confirming it (`isr checkout` of a parcel held here) and breaking it (`isr unlock --force`).

use super::common::*;
use super::Client;
use crate::error::ClientError;
use crate::home::valid_parcel_name;
use crate::transport::LockInfo;

impl Client {
    /// Confirm with the server that this client still holds the lock of `name` (exit 3 naming who broke it
    /// and when, or who holds it now).
    pub async fn confirm_lock(&mut self, name: &str) -> Result<(), ClientError> {
        let st = self.home.local_state(&self.user, name)?.ok_or_else(|| not_checked_out(name))?;
        let t = self.connect().await?;
        t.confirm_lock(name, &st.lock_id).await.map(|_| ()).map_err(|e| lock_guidance(name, e))
    }

    /// Break the lock of `name` whoever holds it; returns who held it and since when.
    pub async fn unlock_force(&mut self, name: &str) -> Result<Option<LockInfo>, ClientError> {
        valid_parcel_name(name)?;
        let t = self.connect().await?;
        let held = t.parcel(name).await?.lock;
        let id = self.home.identity()?;
        t.break_lock(name, &id.name).await?;
        Ok(held)
    }
}
