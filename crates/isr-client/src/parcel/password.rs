//! `isr passwd`: a new password, every keyroot rewrapped.

use super::common::*;
use super::Client;
use crate::error::ClientError;
use crate::transport::Transport;
use isr_format::{KdfParams, UserSecrets, WrappedKeyroot};

/// What `isr passwd` changed.
#[derive(Debug, Clone, Copy, Default)]
pub struct PasswordChange {
    /// Keyroots rewrapped with the new password.
    pub rewrapped: u64,
    /// Keyroots that already opened with the new password (an earlier, interrupted run).
    pub already: u64,
}

impl Client {
    /// Change the user's password: every parcel's keyroot is rewrapped with the new password's key, then the
    /// login secret is replaced. Safe to run again after an interruption, and also the way out after an
    /// administrator's `isr-server user passwd` (run with the previous password as the old one and the one
    /// the administrator set as the new one): the login works with either, and a keyroot that already opens
    /// with the new password is left as it is.
    pub async fn change_password(&mut self, new_password: &str) -> Result<PasswordChange, ClientError> {
        if new_password.is_empty() {
            return Err(ClientError::Usage("the new password is empty".into()));
        }
        let old = self.secrets()?.clone();
        let new = UserSecrets::derive(&self.user, new_password, KdfParams::DEFAULT)?;
        let url = self.server_url()?;
        let base = Transport::new(&url, self.ca_pem.as_deref())?;
        // Log in with the old password; if that fails, the login secret may already be the new one.
        let (t, logged_in_with_new) = match self.login_with(base.clone()).await {
            Ok(t) => (t, false),
            Err(ClientError::Auth(_)) => {
                self.secrets = Some(new.clone());
                let t = self.login_with(base).await.map_err(|e| match e {
                    ClientError::Auth(m) => ClientError::Auth(format!(
                        "{m}: neither ISR_PASSWORD nor the new password is this user's login password"
                    )),
                    other => other,
                })?;
                (t, true)
            }
            Err(e) => return Err(e),
        };
        let mut change = PasswordChange::default();
        for p in t.parcels().await? {
            let detail = t.parcel(&p.name).await?;
            if unwrap_keyroot(&detail.wrapped_keyroot, &new.wrap, "the server").is_ok() {
                change.already += 1;
                continue;
            }
            let keyroot = unwrap_keyroot(&detail.wrapped_keyroot, &old.wrap, "the server").map_err(|e| match e {
                ClientError::Auth(_) => ClientError::Auth(format!(
                    "the key of parcel {} opens with neither the old nor the new password; nothing was changed                      for it (an administrator's recovery key can reset it)",
                    p.name
                )),
                other => other,
            })?;
            let rewrapped = WrappedKeyroot::wrap(&keyroot, &new.wrap);
            t.put_keyroot(&p.name, &rewrapped.0).await?;
            change.rewrapped += 1;
        }
        if !logged_in_with_new {
            t.change_login_secret(&new.login.to_hex()).await?;
        }
        self.secrets = Some(new.clone());
        // Parcels checked out here keep a copy of the wrapped keyroot: rewrap those too.
        for st in self.home.local_states(&self.user)? {
            let mut st = st;
            if let Ok(keyroot) = unwrap_keyroot(&st.wrapped_keyroot, &old.wrap, "the local state") {
                st.wrapped_keyroot = hex::encode(WrappedKeyroot::wrap(&keyroot, &new.wrap).0);
                self.home.save_local_state(&st)?;
            }
        }
        // The stored token stays valid; a fresh login proves the new secret works.
        self.transport = None;
        self.login().await?;
        Ok(change)
    }
}
