//! Keys: the convergence secret (chunk keys), the parcel keyroot, and how the keyroot is kept from the server.
//!
//! The server stores a parcel's keyroot only wrapped: under a key derived from the user's password (which the
//! server never sees: the client sends a *different* secret derived from the same password to log in), and,
//! when the deployment configures one, sealed to an administrator's X25519 recovery public key.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("wrapped keyroot is malformed: {0}")]
    Malformed(&'static str),
    #[error("keyroot could not be unwrapped: wrong password or corrupted wrapping")]
    UnwrapFailed,
    #[error("keyroot could not be opened with this recovery key")]
    RecoveryFailed,
    #[error("recovery public key is invalid: {0}")]
    BadRecoveryKey(&'static str),
    #[error("password key derivation failed: {0}")]
    Kdf(String),
    #[error("recovery key file is invalid: {0}")]
    BadRecoveryFile(&'static str),
}

macro_rules! secret_bytes {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name(pub [u8; 32]);
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($name), "(..)"))
            }
        }
        impl $name {
            pub fn random() -> Self {
                $name(crate::random_bytes())
            }
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
            pub fn from_hex(s: &str) -> Option<Self> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s.trim(), &mut out).ok()?;
                Some($name(out))
            }
        }
    };
}

secret_bytes!(
    /// The deployment's convergence secret: the BLAKE3 key under which chunk keys are derived from chunk
    /// contents. Identical chunks encrypt identically only among holders of the same secret.
    ConvergenceSecret
);
secret_bytes!(
    /// A chunk's encryption key: keyed BLAKE3 of the plaintext under the convergence secret.
    ChunkKey
);
secret_bytes!(
    /// A parcel's root secret: it seals the chunk keys in keyrings and authenticates manifests.
    Keyroot
);
secret_bytes!(
    /// Wraps keyroots; derived from the user's password and never sent anywhere.
    KeyWrapKey
);
secret_bytes!(
    /// What the client sends to log in; derived from the password separately from the [`KeyWrapKey`].
    LoginSecret
);
secret_bytes!(
    /// An administrator's X25519 recovery secret key; kept offline by IT.
    RecoverySecretKey
);

impl ChunkKey {
    /// The convergent key of `plaintext`.
    pub fn derive(secret: &ConvergenceSecret, plaintext: &[u8]) -> ChunkKey {
        ChunkKey(*blake3::keyed_hash(&secret.0, plaintext).as_bytes())
    }
}

impl Keyroot {
    /// A purpose-specific key derived from the keyroot (BLAKE3 derive_key).
    pub(crate) fn subkey(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.0)
    }
}

/// An administrator's X25519 recovery public key (hex in configuration files).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RecoveryPublicKey(pub [u8; 32]);

impl RecoveryPublicKey {
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out)
            .map_err(|_| KeyError::BadRecoveryKey("not 64 hex digits"))?;
        Ok(RecoveryPublicKey(out))
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// The first word of the one key line of a recovery key file.
const RECOVERY_FILE_TAG: &str = "isr-recovery-secret-v1";

impl RecoverySecretKey {
    pub fn public_key(&self) -> RecoveryPublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        RecoveryPublicKey(*x25519_dalek::PublicKey::from(&secret).as_bytes())
    }

    /// The recovery key file's text (layout in docs/design.md): `#` comment lines saying what it is and its
    /// public half, then the one line `isr-recovery-secret-v1 <64 hex>`.
    pub fn to_file_text(&self) -> String {
        format!(
            "# isr recovery private key (X25519). It opens every parcel keyroot sealed to the public key\n\
             # below: keep it offline, readable only by the administrator.\n\
             # public {}\n\
             {RECOVERY_FILE_TAG} {}\n",
            self.public_key().to_hex(),
            self.to_hex()
        )
    }

    /// Parses an untrusted recovery key file: comments and blank lines are skipped; exactly one key line;
    /// a `# public HEX` comment, when present, must be the key's public half (a hand-edited or mixed-up file).
    pub fn from_file_text(text: &str) -> Result<RecoverySecretKey, KeyError> {
        let mut key = None;
        let mut public = None;
        for line in text.lines().map(str::trim) {
            if let Some(comment) = line.strip_prefix('#') {
                if let Some(hex) = comment.trim().strip_prefix("public ") {
                    public = Some(RecoveryPublicKey::from_hex(hex).map_err(|_| {
                        KeyError::BadRecoveryFile("the `# public` line is not 64 hex digits")
                    })?);
                }
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let hex = line
                .strip_prefix(RECOVERY_FILE_TAG)
                .filter(|rest| rest.starts_with(' '))
                .ok_or(KeyError::BadRecoveryFile("expected a line `isr-recovery-secret-v1 <64 hex>`"))?;
            if key.is_some() {
                return Err(KeyError::BadRecoveryFile("more than one key line"));
            }
            key = Some(
                RecoverySecretKey::from_hex(hex)
                    .ok_or(KeyError::BadRecoveryFile("the key is not 64 hex digits"))?,
            );
        }
        let key = key.ok_or(KeyError::BadRecoveryFile("no key line"))?;
        if public.is_some_and(|p| p != key.public_key()) {
            return Err(KeyError::BadRecoveryFile("the `# public` line is not this key's public half"));
        }
        Ok(key)
    }
}

/// Cost of the client-side password KDF (argon2id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
}

impl KdfParams {
    /// OWASP's first argon2id recommendation (m = 46 MiB, t = 1) raised to 64 MiB and t = 2.
    pub const DEFAULT: KdfParams = KdfParams { memory_kib: 64 * 1024, iterations: 2 };
}

/// The two secrets a password yields: one to log in with, one to wrap keyroots with.
#[derive(Clone, Debug)]
pub struct UserSecrets {
    pub login: LoginSecret,
    pub wrap: KeyWrapKey,
}

impl UserSecrets {
    /// argon2id(password, salt = H(user)) -> master; login and wrap keys are independent BLAKE3 derivations of
    /// the master, so knowing the login secret (as the server does, hashed) reveals nothing about the wrap key.
    pub fn derive(user: &str, password: &str, params: KdfParams) -> Result<UserSecrets, KeyError> {
        let salt = blake3::derive_key("isr 2026-11 user salt v1", user.as_bytes());
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(params.memory_kib, params.iterations, 1, Some(32))
                .map_err(|e| KeyError::Kdf(e.to_string()))?,
        );
        let mut master = [0u8; 32];
        argon
            .hash_password_into(password.as_bytes(), &salt[..16], &mut master)
            .map_err(|e| KeyError::Kdf(e.to_string()))?;
        Ok(UserSecrets {
            login: LoginSecret(blake3::derive_key("isr 2026-11 login secret v1", &master)),
            wrap: KeyWrapKey(blake3::derive_key("isr 2026-11 keyroot wrap v1", &master)),
        })
    }
}

const WRAP_MAGIC: &[u8; 4] = b"ISRW";
const WRAP_VERSION: u8 = 1;
const KIND_PASSWORD: u8 = 1;
const KIND_RECOVERY: u8 = 2;
/// magic(4) version(1) kind(1) reserved(2) nonce-or-ephemeral(32) ciphertext(32 + 16)
pub const WRAPPED_KEYROOT_LEN: usize = 8 + 32 + 48;

/// A keyroot wrapped for storage on the server: by the user's [`KeyWrapKey`] or sealed to a recovery key.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct WrappedKeyroot(pub Vec<u8>);

fn aead(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("AES-256 key is 32 bytes"))
}

impl WrappedKeyroot {
    /// Wrap under the user's key with a random nonce.
    pub fn wrap(keyroot: &Keyroot, key: &KeyWrapKey) -> WrappedKeyroot {
        let nonce: [u8; 12] = crate::random_bytes();
        let mut out = Vec::with_capacity(WRAPPED_KEYROOT_LEN);
        out.extend_from_slice(WRAP_MAGIC);
        out.extend_from_slice(&[WRAP_VERSION, KIND_PASSWORD, 0, 0]);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&[0u8; 20]);
        let mut body = keyroot.0.to_vec();
        aead(&key.0)
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&out[..40]), &mut body)
            .expect("sealing 32 bytes cannot fail");
        out.extend_from_slice(&body);
        WrappedKeyroot(out)
    }

    /// Seal to the recovery public key: ephemeral X25519, key = BLAKE3(shared, both public keys).
    pub fn seal_for_recovery(keyroot: &Keyroot, recovery: &RecoveryPublicKey) -> WrappedKeyroot {
        let eph = x25519_dalek::StaticSecret::from(crate::random_bytes::<32>());
        let eph_pub = x25519_dalek::PublicKey::from(&eph);
        let shared = eph.diffie_hellman(&x25519_dalek::PublicKey::from(recovery.0));
        let key = recovery_kdf(shared.as_bytes(), eph_pub.as_bytes(), &recovery.0);
        let mut out = Vec::with_capacity(WRAPPED_KEYROOT_LEN);
        out.extend_from_slice(WRAP_MAGIC);
        out.extend_from_slice(&[WRAP_VERSION, KIND_RECOVERY, 0, 0]);
        out.extend_from_slice(eph_pub.as_bytes());
        let mut body = keyroot.0.to_vec();
        // The key is fresh for every seal (new ephemeral secret), so a fixed nonce is never reused.
        aead(&key)
            .seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(&out[..40]), &mut body)
            .expect("sealing 32 bytes cannot fail");
        out.extend_from_slice(&body);
        WrappedKeyroot(out)
    }

    fn check(&self, kind: u8) -> Result<(), KeyError> {
        let b = &self.0;
        if b.len() != WRAPPED_KEYROOT_LEN {
            return Err(KeyError::Malformed("wrong length"));
        }
        if &b[..4] != WRAP_MAGIC {
            return Err(KeyError::Malformed("bad magic"));
        }
        if b[4] != WRAP_VERSION {
            return Err(KeyError::Malformed("unsupported version"));
        }
        if b[5] != kind {
            return Err(KeyError::Malformed("wrapped for a different kind of key"));
        }
        Ok(())
    }

    pub fn is_recovery(&self) -> bool {
        self.0.get(5) == Some(&KIND_RECOVERY)
    }

    pub fn unwrap(&self, key: &KeyWrapKey) -> Result<Keyroot, KeyError> {
        self.check(KIND_PASSWORD)?;
        let nonce: [u8; 12] = self.0[8..20].try_into().expect("slice of 12");
        open(&key.0, nonce, &self.0).ok_or(KeyError::UnwrapFailed)
    }

    pub fn open_with_recovery(&self, secret: &RecoverySecretKey) -> Result<Keyroot, KeyError> {
        self.check(KIND_RECOVERY)?;
        let eph_pub: [u8; 32] = self.0[8..40].try_into().expect("slice of 32");
        let sk = x25519_dalek::StaticSecret::from(secret.0);
        let shared = sk.diffie_hellman(&x25519_dalek::PublicKey::from(eph_pub));
        if !shared.was_contributory() {
            return Err(KeyError::RecoveryFailed);
        }
        let key = recovery_kdf(shared.as_bytes(), &eph_pub, &secret.public_key().0);
        open(&key, [0; 12], &self.0).ok_or(KeyError::RecoveryFailed)
    }

    /// Re-wrap under a new password key (a password change touches no chunk).
    pub fn rewrap(&self, old: &KeyWrapKey, new: &KeyWrapKey) -> Result<WrappedKeyroot, KeyError> {
        Ok(WrappedKeyroot::wrap(&self.unwrap(old)?, new))
    }
}

fn recovery_kdf(shared: &[u8; 32], eph_pub: &[u8; 32], recovery_pub: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("isr 2026-11 recovery seal v1");
    h.update(shared).update(eph_pub).update(recovery_pub);
    *h.finalize().as_bytes()
}

fn open(key: &[u8; 32], nonce: [u8; 12], wrapped: &[u8]) -> Option<Keyroot> {
    let mut body = wrapped[40..].to_vec();
    let plain = aead(key)
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&wrapped[..40]), &mut body)
        .ok()?;
    Some(Keyroot(plain.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: KdfParams = KdfParams { memory_kib: 1024, iterations: 1 };

    #[test]
    fn password_wrap_roundtrip_and_wrong_password() {
        let kr = Keyroot::random();
        let right = UserSecrets::derive("alice", "correct horse", FAST).unwrap();
        let wrong = UserSecrets::derive("alice", "correct horsf", FAST).unwrap();
        let w = WrappedKeyroot::wrap(&kr, &right.wrap);
        assert_eq!(w.unwrap(&right.wrap).unwrap(), kr);
        assert_eq!(w.unwrap(&wrong.wrap), Err(KeyError::UnwrapFailed));
        // The login secret is not the wrapping key: a server holding it cannot unwrap.
        assert_eq!(w.unwrap(&KeyWrapKey(right.login.0)), Err(KeyError::UnwrapFailed));
    }

    #[test]
    fn same_password_other_user_differs() {
        let a = UserSecrets::derive("alice", "pw", FAST).unwrap();
        let b = UserSecrets::derive("bob", "pw", FAST).unwrap();
        assert_ne!(a.wrap, b.wrap);
        assert_ne!(a.login, b.login);
        assert_ne!(a.login.0, a.wrap.0);
    }

    #[test]
    fn recovery_opens_and_others_cannot() {
        let kr = Keyroot::random();
        let admin = RecoverySecretKey::random();
        let sealed = WrappedKeyroot::seal_for_recovery(&kr, &admin.public_key());
        assert!(sealed.is_recovery());
        assert_eq!(sealed.open_with_recovery(&admin).unwrap(), kr);
        let other = RecoverySecretKey::random();
        assert_eq!(sealed.open_with_recovery(&other), Err(KeyError::RecoveryFailed));
        let pw = UserSecrets::derive("u", "p", FAST).unwrap();
        assert!(matches!(sealed.unwrap(&pw.wrap), Err(KeyError::Malformed(_))));
    }

    #[test]
    fn recovery_key_file_roundtrip_and_refusals() {
        let key = RecoverySecretKey([0x42; 32]);
        // X25519 of the clamped scalar 0x42 x 32 (cross-checked with Python's `cryptography` X25519).
        assert_eq!(
            key.public_key().to_hex(),
            "132c442be010fbd57e72603328aa76e71fccc1503aae219327d14d9c9993f472"
        );
        let text = key.to_file_text();
        assert_eq!(RecoverySecretKey::from_file_text(&text).unwrap(), key);
        assert!(text.contains(&format!("# public {}", key.public_key().to_hex())));
        assert!(text.ends_with(&format!("isr-recovery-secret-v1 {}\n", "42".repeat(32))));
        // Without the comments it is still the key.
        let bare = format!("isr-recovery-secret-v1 {}", key.to_hex());
        assert_eq!(RecoverySecretKey::from_file_text(&bare).unwrap(), key);
        let bad = |t: &str| RecoverySecretKey::from_file_text(t).unwrap_err();
        assert!(matches!(bad(""), KeyError::BadRecoveryFile(m) if m.contains("no key line")));
        assert!(matches!(bad(&key.to_hex()), KeyError::BadRecoveryFile(_)), "a bare hex line");
        assert!(matches!(bad("isr-recovery-secret-v1 abcd"), KeyError::BadRecoveryFile(_)));
        assert!(
            matches!(bad(&format!("{bare}\n{bare}")), KeyError::BadRecoveryFile(m) if m.contains("more"))
        );
        let other = RecoverySecretKey([0x43; 32]).public_key().to_hex();
        assert!(matches!(bad(&format!("# public {other}\n{bare}")), KeyError::BadRecoveryFile(_)));
    }

    #[test]
    fn rewrap_changes_password() {
        let kr = Keyroot::random();
        let old = UserSecrets::derive("u", "old", FAST).unwrap();
        let new = UserSecrets::derive("u", "new", FAST).unwrap();
        let w = WrappedKeyroot::wrap(&kr, &old.wrap).rewrap(&old.wrap, &new.wrap).unwrap();
        assert_eq!(w.unwrap(&new.wrap).unwrap(), kr);
        assert!(w.unwrap(&old.wrap).is_err());
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let kr = Keyroot::random();
        let k = KeyWrapKey::random();
        let w = WrappedKeyroot::wrap(&kr, &k);
        for i in 0..w.0.len() {
            let mut bad = w.clone();
            bad.0[i] ^= 0x01;
            assert!(bad.unwrap(&k).is_err(), "flip at byte {i} not detected");
        }
    }
}
