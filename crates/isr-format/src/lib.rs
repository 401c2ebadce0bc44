//! The isr parcel format: everything about how a parcel's bytes are laid out and protected, with no I/O.
//!
//! - [`units`]: newtypes for chunk sizes, chunk indices and byte offsets, so they are never confused.
//! - [`codec`]: one chunk's convergent encoding (zstd + AES-256-GCM under a key derived from the chunk).
//! - [`keys`]: the convergence secret, the parcel keyroot and how it is wrapped for the user and for recovery.
//! - [`keyring`]: a version's per-chunk tags (clear) and keys (sealed under the keyroot) for one image.
//! - [`manifest`]: a version's VM description and the images it is made of.
//!
//! Every parser here takes untrusted bytes: it checks magic, version, length limits and checksums before it
//! believes anything, and fails with a typed error. Byte layouts are documented in `docs/design.md`.

pub mod codec;
pub mod keyring;
pub mod keys;
pub mod manifest;
pub mod tag;
pub mod units;

pub use codec::{ChunkDecoder, ChunkEncoder, ChunkError, EncodedChunk};
pub use keyring::{ChunkEntry, Keyring, KeyringError, KeyringTags};
pub use keys::{
    ChunkKey, ConvergenceSecret, KdfParams, KeyError, KeyWrapKey, Keyroot, LoginSecret, RecoveryPublicKey,
    RecoverySecretKey, UserSecrets, WrappedKeyroot,
};
pub use manifest::{
    Binding, DeviceModel, ImageKind, ImageRef, LegacyManifest, Manifest, ManifestContents, ManifestError,
    VmDescription,
};
pub use tag::Tag;
pub use units::{ByteOffset, ChunkIndex, ChunkSize, ImageLen, UnitsError};

/// Fill `buf` with cryptographically secure random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    // The system RNG only fails if the OS cannot provide randomness at all; nothing safe can go on then.
    ring::rand::SystemRandom::new().fill(&mut out).expect("operating system random number generator failed");
    out
}
