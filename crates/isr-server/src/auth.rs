//! Login secrets, session tokens and failed-login throttling.
//!
//! The client never sends the password: it sends the [`LoginSecret`] derived from it
//! ([`UserSecrets::derive`]); the server keeps only an argon2id hash (random salt) of that secret. Session
//! tokens are random, stored as their BLAKE3 hash, and expire after [`TOKEN_LIFETIME_SECS`].

use crate::error::ServerError;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use isr_format::keys::KdfParams;
use isr_format::{LoginSecret, UserSecrets};
use isr_store::MetaStore;
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, Instant};

pub const TOKEN_LIFETIME_SECS: i64 = 12 * 3600;
/// How long a validated token is trusted without asking the database again. Tokens are only revoked by
/// expiry (checked on every use) and by removing the user, which takes effect within this time.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(5);
const TOKEN_CACHE_MAX: usize = 10_000;
/// Failed logins of one user tolerated before answers are slowed down.
pub const FREE_FAILURES: u32 = 3;
/// The longest a login is held back.
pub const MAX_LOGIN_DELAY_SECS: i64 = 30;

/// The login secret a password yields (what `isr` and `isr-server user add` both compute).
pub fn login_secret_from_password(user: &str, password: &str) -> Result<LoginSecret, ServerError> {
    UserSecrets::derive(user, password, KdfParams::DEFAULT)
        .map(|s| s.login)
        .map_err(|e| ServerError::Hash(e.to_string()))
}

/// argon2id PHC string of a login secret, with a random salt.
pub fn hash_login_secret(secret: &LoginSecret) -> Result<String, ServerError> {
    let salt = SaltString::encode_b64(&isr_format::random_bytes::<16>())
        .map_err(|e| ServerError::Hash(e.to_string()))?;
    Ok(Argon2::default()
        .hash_password(&secret.0, &salt)
        .map_err(|e| ServerError::Hash(e.to_string()))?
        .to_string())
}

/// Checks a login secret against a stored hash (slow on purpose).
pub fn verify_login_secret(phc: &str, secret: &[u8; 32]) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| Argon2::default().verify_password(secret, &h).is_ok())
}

/// A hash to verify against for unknown users, so they cost the same time as known ones.
pub fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_login_secret(&LoginSecret::random()).unwrap_or_default())
}

/// How long a login for a user with `failures` recent failures is held back after the last failure.
pub fn login_delay_secs(failures: u32) -> i64 {
    if failures < FREE_FAILURES {
        0
    } else {
        1i64.checked_shl(failures - FREE_FAILURES).unwrap_or(i64::MAX).min(MAX_LOGIN_DELAY_SECS)
    }
}

/// A new random session token and the hash under which it is stored.
pub fn new_token() -> (String, [u8; 32]) {
    let token = hex::encode(isr_format::random_bytes::<32>());
    let hash = token_hash(&token);
    (token, hash)
}

pub fn token_hash(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

#[derive(Debug)]
struct Cached {
    user: String,
    expires_unix: i64,
    checked: Instant,
}

/// A short-lived in-process cache of validated tokens, keyed by token hash.
#[derive(Debug, Default)]
pub struct TokenCache {
    map: RwLock<HashMap<[u8; 32], Cached>>,
}

impl TokenCache {
    /// The user a bearer token belongs to, or `None` when it is unknown or expired.
    pub async fn validate(
        &self,
        meta: &dyn MetaStore,
        token: &str,
    ) -> Result<Option<String>, isr_store::MetaError> {
        let hash = token_hash(token);
        let now = crate::now_unix();
        if let Ok(map) = self.map.read() {
            if let Some(c) = map.get(&hash) {
                if c.expires_unix > now && c.checked.elapsed() < TOKEN_CACHE_TTL {
                    return Ok(Some(c.user.clone()));
                }
            }
        }
        let found = meta.token(hash, now).await?;
        if let Ok(mut map) = self.map.write() {
            if map.len() >= TOKEN_CACHE_MAX {
                map.clear();
            }
            match &found {
                Some((user, expires_unix)) => {
                    map.insert(
                        hash,
                        Cached { user: user.clone(), expires_unix: *expires_unix, checked: Instant::now() },
                    );
                }
                None => {
                    map.remove(&hash);
                }
            }
        }
        Ok(found.map(|(u, _)| u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_delays_grow() {
        let s = LoginSecret::random();
        let h = hash_login_secret(&s).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_login_secret(&h, &s.0));
        assert!(!verify_login_secret(&h, &LoginSecret::random().0));
        assert!(!verify_login_secret(dummy_hash(), &s.0));
        assert_eq!(login_delay_secs(0), 0);
        assert_eq!(login_delay_secs(3), 1);
        assert_eq!(login_delay_secs(5), 4);
        assert_eq!(login_delay_secs(200), MAX_LOGIN_DELAY_SECS);
    }
}
