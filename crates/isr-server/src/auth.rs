//! Login secrets, session tokens and failed-login throttling.
//!
//! The client never sends the password: it sends the [`LoginSecret`] derived from it
//! ([`UserSecrets::derive`]); the server keeps only an argon2id hash (random salt) of that secret. Session
//! tokens are random, stored as their BLAKE3 hash, and expire after [`TOKEN_LIFETIME_SECS`].
//!
//! Throttling ([`LoginGate::admit`]) counts an attempt as a failure *before* verifying it (a compare-and-set
//! on the user's failure counter in the database, cleared by a success), so attempts in flight are held back
//! like finished ones: N parallel connections do not buy N guesses. Within one process a user's attempts
//! also queue on a per-user async mutex, so only one of them polls the database; other users never wait.

use crate::error::ServerError;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use isr_format::keys::KdfParams;
use isr_format::{LoginSecret, UserSecrets};
use isr_store::MetaStore;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
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
    LoginThrottle::default().delay_secs(failures)
}

/// The hold-back rule: after `free_failures` failures in a row, an attempt is admitted only
/// `unit_secs * 2^(failures - free_failures)` seconds (at most `max_delay_secs`) after the last one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginThrottle {
    pub free_failures: u32,
    pub unit_secs: i64,
    pub max_delay_secs: i64,
    /// How often a held-back attempt re-reads the shared counter (another process may have cleared it).
    pub poll: Duration,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        LoginThrottle {
            free_failures: FREE_FAILURES,
            unit_secs: 1,
            max_delay_secs: MAX_LOGIN_DELAY_SECS,
            poll: Duration::from_secs(1),
        }
    }
}

impl LoginThrottle {
    pub fn delay_secs(&self, failures: u32) -> i64 {
        if failures < self.free_failures {
            return 0;
        }
        let doublings = failures - self.free_failures;
        let factor = 1i64.checked_shl(doublings).filter(|_| doublings < 63).unwrap_or(i64::MAX);
        self.unit_secs.saturating_mul(factor).min(self.max_delay_secs)
    }
}

/// Counts of the throttle, for `/metrics` and tests.
#[derive(Debug, Default)]
pub struct LoginCounters {
    /// Attempts currently held back (waiting for their turn or their time).
    pub held_back: std::sync::atomic::AtomicI64,
}

/// Decrements `held_back` however the wait ends (including a client that goes away).
struct HeldBack<'a>(&'a std::sync::atomic::AtomicI64);

impl Drop for HeldBack<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Per-user admission of login attempts in this process.
#[derive(Debug, Default)]
pub struct LoginGate {
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub counters: LoginCounters,
}

impl LoginGate {
    fn turn_of(&self, user: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        turns.entry(user.to_owned()).or_default().clone()
    }

    fn forget_if_idle(&self, user: &str) {
        let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        if turns.get(user).is_some_and(|t| Arc::strong_count(t) == 1) {
            turns.remove(user);
        }
    }

    /// Waits until `user` (a known user) may make one more attempt, and counts it as a failure before it is
    /// verified; the caller clears the counter when the secret was right. One attempt per user and process
    /// decides at a time; across processes, the compare-and-set in the database gives each slot to one.
    pub async fn admit(
        &self,
        meta: &dyn MetaStore,
        throttle: &LoginThrottle,
        user: &str,
    ) -> Result<(), isr_store::MetaError> {
        use std::sync::atomic::Ordering;
        self.counters.held_back.fetch_add(1, Ordering::Relaxed);
        let held = HeldBack(&self.counters.held_back);
        let turn = self.turn_of(user);
        let result = async {
            let _mine = turn.lock().await;
            loop {
                let seen = meta.login_failures(user).await?;
                let now = crate::now_unix();
                let wait = seen.last_unix.saturating_add(throttle.delay_secs(seen.count)) - now;
                if wait > 0 {
                    let wait = Duration::from_secs(wait as u64).min(throttle.poll);
                    tokio::time::sleep(wait).await;
                    continue;
                }
                if meta.reserve_login_attempt(user, seen, now).await? {
                    return Ok(());
                }
                // Another process took this slot: decide again on what it wrote.
            }
        }
        .await;
        drop(turn);
        drop(held);
        self.forget_if_idle(user);
        result
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
        let slow = LoginThrottle { unit_secs: 3600, max_delay_secs: 100 * 3600, ..LoginThrottle::default() };
        assert_eq!(slow.delay_secs(2), 0);
        assert_eq!(slow.delay_secs(4), 7200);
        assert_eq!(slow.delay_secs(u32::MAX), 100 * 3600);
    }
}
