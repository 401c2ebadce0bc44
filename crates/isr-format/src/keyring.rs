//! A keyring: for every chunk of one image, its tag in clear and its key sealed under the parcel's keyroot.
//!
//! ```text
//! 0      4   magic "ISRK"
//! 4      2   format version, u16 LE (1)
//! 6      1   hash id (1 = BLAKE3)
//! 7      1   cipher id (1 = AES-256-GCM)
//! 8      4   chunk size, u32 LE
//! 12     8   image length in bytes, u64 LE (N = ceil(length / chunk size) chunks)
//! 20     12  nonce (random per sealing)
//! 32     32N tags, in chunk order; all-zero = the all-zero chunk
//! 32+32N 32N+16  chunk keys, AES-256-GCM(keyring key, nonce, aad = BLAKE3(bytes 0..32+32N))
//! end-32 32  checksum: BLAKE3 of everything before it
//! ```
//! The server reads tags (dedup, upload diffs, garbage collection) but can neither read keys nor change a tag
//! unnoticed: tags are bound into the AEAD's associated data.

use crate::keys::{ChunkKey, Keyroot};
use crate::tag::Tag;
use crate::units::{ChunkIndex, ChunkSize, ImageLen};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

pub const KEYRING_MAGIC: &[u8; 4] = b"ISRK";
pub const KEYRING_VERSION: u16 = 1;
const HEADER_LEN: usize = 32;
const CHECKSUM_LEN: usize = 32;
/// 2^25 chunks: a 4 TiB image at the default chunk size. Bounds allocations made for untrusted input.
pub const MAX_CHUNKS: u64 = 1 << 25;
const KEYRING_KEY_CONTEXT: &str = "isr 2026-11 keyring keys v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    #[error("keyring integrity: {0}")]
    Malformed(&'static str),
    #[error("keyring integrity: checksum mismatch")]
    Checksum,
    #[error("keyring integrity: keys could not be authenticated (wrong parcel key or altered keyring)")]
    Decrypt,
    #[error("keyring has {0} chunks, more than the {MAX_CHUNKS} allowed")]
    TooManyChunks(u64),
    #[error("bad chunk size: {0}")]
    ChunkSize(#[from] crate::units::UnitsError),
}

/// One chunk's entry: `None` for an all-zero chunk.
pub type ChunkEntry<'a> = Option<(Tag, &'a ChunkKey)>;

/// A decoded keyring.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Keyring {
    chunk_size: ChunkSize,
    image_len: ImageLen,
    tags: Vec<Tag>,
    keys: Vec<ChunkKey>,
}

/// Only the clear part of a keyring, as the server sees it (checksum verified, keys not readable).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct KeyringTags {
    pub chunk_size: ChunkSize,
    pub image_len: ImageLen,
    pub tags: Vec<Tag>,
}

impl KeyringTags {
    /// Validate an untrusted keyring's structure and checksum and return its tags.
    pub fn parse(bytes: &[u8]) -> Result<KeyringTags, KeyringError> {
        let (chunk_size, image_len, n) = parse_header(bytes)?;
        let tags = bytes[HEADER_LEN..HEADER_LEN + 32 * n]
            .chunks_exact(32)
            .map(|t| Tag(t.try_into().expect("32 bytes")))
            .collect();
        Ok(KeyringTags { chunk_size, image_len, tags })
    }

    /// The non-zero tags, in chunk order: a tag shared by several chunks appears once per chunk (collect
    /// into a set for the distinct ones).
    pub fn stored_tags(&self) -> impl Iterator<Item = &Tag> {
        self.tags.iter().filter(|t| !t.is_zero())
    }
}

fn parse_header(bytes: &[u8]) -> Result<(ChunkSize, ImageLen, usize), KeyringError> {
    if bytes.len() < HEADER_LEN + 16 + CHECKSUM_LEN {
        return Err(KeyringError::Malformed("shorter than the fixed header"));
    }
    if &bytes[..4] != KEYRING_MAGIC {
        return Err(KeyringError::Malformed("bad magic"));
    }
    if u16::from_le_bytes([bytes[4], bytes[5]]) != KEYRING_VERSION {
        return Err(KeyringError::Malformed("unsupported version"));
    }
    if bytes[6] != 1 || bytes[7] != 1 {
        return Err(KeyringError::Malformed("unknown hash or cipher id"));
    }
    let chunk_size = ChunkSize::new(u32::from_le_bytes(bytes[8..12].try_into().expect("4")) as u64)?;
    let image_len = ImageLen(u64::from_le_bytes(bytes[12..20].try_into().expect("8")));
    let n = chunk_size.chunk_count(image_len);
    if n > MAX_CHUNKS {
        return Err(KeyringError::TooManyChunks(n));
    }
    let n = n as usize;
    if bytes.len() != HEADER_LEN + 64 * n + 16 + CHECKSUM_LEN {
        return Err(KeyringError::Malformed("length does not match the chunk count"));
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if blake3::hash(body).as_bytes() != sum {
        return Err(KeyringError::Checksum);
    }
    Ok((chunk_size, image_len, n))
}

fn keyring_aead(keyroot: &Keyroot) -> LessSafeKey {
    LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &keyroot.subkey(KEYRING_KEY_CONTEXT)).expect("32-byte key"),
    )
}

impl Keyring {
    /// A keyring for an image of `image_len` bytes in which every chunk is zero.
    pub fn new(chunk_size: ChunkSize, image_len: ImageLen) -> Result<Keyring, KeyringError> {
        let n = chunk_size.chunk_count(image_len);
        if n > MAX_CHUNKS {
            return Err(KeyringError::TooManyChunks(n));
        }
        Ok(Keyring {
            chunk_size,
            image_len,
            tags: vec![Tag::ZERO; n as usize],
            keys: vec![ChunkKey([0; 32]); n as usize],
        })
    }

    pub fn chunk_size(&self) -> ChunkSize {
        self.chunk_size
    }

    pub fn image_len(&self) -> ImageLen {
        self.image_len
    }

    pub fn chunk_count(&self) -> u64 {
        self.tags.len() as u64
    }

    pub fn tags(&self) -> &[Tag] {
        &self.tags
    }

    /// Plaintext length of chunk `index` (the last chunk may be short).
    pub fn chunk_len(&self, index: ChunkIndex) -> usize {
        self.chunk_size.chunk_len(self.image_len, index)
    }

    pub fn get(&self, index: ChunkIndex) -> ChunkEntry<'_> {
        let i = index.0 as usize;
        let tag = self.tags[i];
        if tag.is_zero() {
            None
        } else {
            Some((tag, &self.keys[i]))
        }
    }

    /// Record chunk `index` as `entry` (`None` = all zero).
    pub fn set(&mut self, index: ChunkIndex, entry: Option<(Tag, ChunkKey)>) {
        let i = index.0 as usize;
        match entry {
            Some((tag, key)) => {
                self.tags[i] = tag;
                self.keys[i] = key;
            }
            None => {
                self.tags[i] = Tag::ZERO;
                self.keys[i] = ChunkKey([0; 32]);
            }
        }
    }

    /// The chunks whose tags differ between `self` and `base` (plus any chunk only one of them has).
    pub fn diff(&self, base: &Keyring) -> Vec<ChunkIndex> {
        let common = self.tags.len().min(base.tags.len());
        let mut out: Vec<ChunkIndex> = self.tags[..common]
            .iter()
            .zip(&base.tags[..common])
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| ChunkIndex(i as u64))
            .collect();
        out.extend((common..self.tags.len().max(base.tags.len())).map(|i| ChunkIndex(i as u64)));
        out
    }

    /// Serialize with keys sealed under `keyroot` (random nonce).
    pub fn seal(&self, keyroot: &Keyroot) -> Vec<u8> {
        let n = self.tags.len();
        let mut out = Vec::with_capacity(HEADER_LEN + 64 * n + 16 + CHECKSUM_LEN);
        out.extend_from_slice(KEYRING_MAGIC);
        out.extend_from_slice(&KEYRING_VERSION.to_le_bytes());
        out.extend_from_slice(&[1, 1]);
        out.extend_from_slice(&self.chunk_size.bytes().to_le_bytes());
        out.extend_from_slice(&self.image_len.0.to_le_bytes());
        let nonce: [u8; 12] = crate::random_bytes();
        out.extend_from_slice(&nonce);
        for t in &self.tags {
            out.extend_from_slice(&t.0);
        }
        let aad = blake3::hash(&out);
        let keys_at = out.len();
        for k in &self.keys {
            out.extend_from_slice(&k.0);
        }
        let gcm_tag = keyring_aead(keyroot)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut out[keys_at..],
            )
            .expect("keyring below AES-GCM's size limit");
        out.extend_from_slice(gcm_tag.as_ref());
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parse an untrusted keyring and unseal its keys with `keyroot`.
    pub fn open(bytes: &[u8], keyroot: &Keyroot) -> Result<Keyring, KeyringError> {
        let (chunk_size, image_len, n) = parse_header(bytes)?;
        let tags_end = HEADER_LEN + 32 * n;
        let nonce: [u8; 12] = bytes[20..32].try_into().expect("12");
        let aad = blake3::hash(&bytes[..tags_end]);
        let mut sealed = bytes[tags_end..bytes.len() - CHECKSUM_LEN].to_vec();
        let plain = keyring_aead(keyroot)
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad.as_bytes()), &mut sealed)
            .map_err(|_| KeyringError::Decrypt)?;
        let tags: Vec<Tag> =
            bytes[HEADER_LEN..tags_end].chunks_exact(32).map(|t| Tag(t.try_into().expect("32"))).collect();
        let keys: Vec<ChunkKey> =
            plain.chunks_exact(32).map(|k| ChunkKey(k.try_into().expect("32"))).collect();
        Ok(Keyring { chunk_size, image_len, tags, keys })
    }

    /// Change the image length (new chunks are zero; removed chunks are dropped).
    pub fn resize(&mut self, image_len: ImageLen) -> Result<(), KeyringError> {
        let n = self.chunk_size.chunk_count(image_len);
        if n > MAX_CHUNKS {
            return Err(KeyringError::TooManyChunks(n));
        }
        self.tags.resize(n as usize, Tag::ZERO);
        self.keys.resize(n as usize, ChunkKey([0; 32]));
        self.image_len = image_len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(n_bytes: u64) -> Keyring {
        let mut k = Keyring::new(ChunkSize::DEFAULT, ImageLen(n_bytes)).unwrap();
        for i in (0..k.chunk_count()).step_by(3) {
            k.set(ChunkIndex(i), Some((Tag([(i % 250 + 1) as u8; 32]), ChunkKey([(i % 13) as u8; 32]))));
        }
        k
    }

    #[test]
    fn seal_open_roundtrip() {
        let kr = Keyroot::random();
        let k = sample(10 * 1024 * 1024 + 5);
        let bytes = k.seal(&kr);
        assert_eq!(Keyring::open(&bytes, &kr).unwrap(), k);
        let tags = KeyringTags::parse(&bytes).unwrap();
        assert_eq!(tags.tags, k.tags);
        assert_eq!(k.chunk_len(ChunkIndex(80)), 5);
        assert!(matches!(Keyring::open(&bytes, &Keyroot::random()), Err(KeyringError::Decrypt)));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let kr = Keyroot::random();
        let bytes = sample(1024 * 1024).seal(&kr);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(Keyring::open(&bad, &kr).is_err(), "flip at {i} undetected");
            assert!(KeyringTags::parse(&bad).is_err(), "flip at {i} undetected by server parse");
        }
    }

    #[test]
    fn tag_swap_with_recomputed_checksum_is_detected() {
        // A server that rewrites a tag and fixes the checksum still cannot pass the AEAD.
        let kr = Keyroot::random();
        let mut bytes = sample(1024 * 1024).seal(&kr);
        bytes[HEADER_LEN] ^= 1;
        let end = bytes.len() - CHECKSUM_LEN;
        let sum = blake3::hash(&bytes[..end]);
        bytes[end..].copy_from_slice(sum.as_bytes());
        assert!(KeyringTags::parse(&bytes).is_ok());
        assert_eq!(Keyring::open(&bytes, &kr), Err(KeyringError::Decrypt));
    }

    #[test]
    fn diff_lists_changed_chunks() {
        let a = sample(4 * 1024 * 1024);
        let mut b = a.clone();
        b.set(ChunkIndex(1), Some((Tag([9; 32]), ChunkKey([9; 32]))));
        b.set(ChunkIndex(3), None);
        assert_eq!(b.diff(&a), vec![ChunkIndex(1), ChunkIndex(3)]);
        let mut c = b.clone();
        c.resize(ImageLen(5 * 1024 * 1024)).unwrap();
        assert_eq!(c.diff(&b), (32..40).map(ChunkIndex).collect::<Vec<_>>());
    }

    proptest! {
        #[test]
        fn parse_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = KeyringTags::parse(&bytes);
            let _ = Keyring::open(&bytes, &Keyroot([1; 32]));
        }

        #[test]
        fn parse_mutated_valid_header_never_panics(len in 0u64..(1 << 40), cs in any::<u32>(), cut in 0usize..200) {
            let mut bytes = Keyring::new(ChunkSize::new(4096).unwrap(), ImageLen(8192)).unwrap().seal(&Keyroot([2; 32]));
            bytes[8..12].copy_from_slice(&cs.to_le_bytes());
            bytes[12..20].copy_from_slice(&len.to_le_bytes());
            bytes.truncate(bytes.len().saturating_sub(cut));
            let changed = cut > 0 || cs != 4096 || len != 8192;
            prop_assert_eq!(KeyringTags::parse(&bytes).is_err(), changed);
        }
    }
}
