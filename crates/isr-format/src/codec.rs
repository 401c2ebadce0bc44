//! The chunk codec: convergent encryption of one chunk.
//!
//! ```text
//! stored chunk = header(12) || AES-256-GCM(key, nonce = 0, aad = header, payload) (payload + 16-byte GCM tag)
//! header:  0..4  magic "ISRC"
//!          4     format version (1)
//!          5     cipher id (1 = AES-256-GCM)
//!          6     compression id (0 = none, 1 = zstd)
//!          7     reserved (0)
//!          8..12 plaintext length, u32 little endian
//! key  = BLAKE3-keyed(convergence secret, plaintext)
//! tag  = BLAKE3(stored chunk)
//! ```
//! The key is a function of the plaintext, so one key never encrypts two different plaintexts and the fixed
//! nonce is safe. An all-zero chunk is never encoded: keyrings record it as [`Tag::ZERO`].

use crate::keys::{ChunkKey, ConvergenceSecret};
use crate::tag::Tag;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

pub const CHUNK_MAGIC: &[u8; 4] = b"ISRC";
pub const CHUNK_FORMAT_VERSION: u8 = 1;
pub const CIPHER_AES_256_GCM: u8 = 1;
pub const COMPRESSION_NONE: u8 = 0;
pub const COMPRESSION_ZSTD: u8 = 1;
pub const HEADER_LEN: usize = 12;
pub const AEAD_TAG_LEN: usize = 16;
/// zstd level: level 1 is the fastest standard level and already removes most redundancy in disk images.
pub const ZSTD_LEVEL: i32 = 1;
/// The largest plaintext a chunk may hold (the largest chunk size).
pub const MAX_PLAINTEXT: usize = crate::units::ChunkSize::MAX as usize;
/// The largest stored chunk any valid encoder can produce: header, raw payload (compression is dropped when
/// it does not save) and the AEAD tag. Anything longer is rejected before it is hashed or buffered further.
pub const MAX_STORED: usize = HEADER_LEN + MAX_PLAINTEXT + AEAD_TAG_LEN;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("chunk integrity: stored bytes hash to {actual}, keyring expects {expected}")]
    TagMismatch { expected: Tag, actual: Tag },
    #[error("chunk integrity: malformed header ({0})")]
    BadHeader(&'static str),
    #[error("chunk integrity: {0} bytes is outside the valid stored size")]
    BadSize(usize),
    #[error("chunk integrity: authenticated decryption failed (wrong key or altered ciphertext)")]
    Decrypt,
    #[error("chunk integrity: decompression failed")]
    Decompress,
    #[error("chunk integrity: plaintext is {actual} bytes, expected {expected}")]
    LengthMismatch { expected: usize, actual: usize },
    #[error("chunk of {0} bytes is larger than the 4 MiB maximum")]
    TooLarge(usize),
}

/// An encoded chunk, ready to store under `tag`.
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    pub tag: Tag,
    pub key: ChunkKey,
    pub stored: Vec<u8>,
}

/// True when every byte is zero (such chunks are never stored).
pub fn is_zero(data: &[u8]) -> bool {
    let (head, body) = data.split_at(data.len() % 16);
    head.iter().all(|&b| b == 0)
        && body.chunks_exact(16).all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
}

fn aead(key: &ChunkKey) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key.0).expect("AES-256 key is 32 bytes"))
}

/// Encodes chunks; holds a reusable zstd context, so keep one per thread.
pub struct ChunkEncoder {
    secret: ConvergenceSecret,
    zstd: zstd::bulk::Compressor<'static>,
}

impl std::fmt::Debug for ChunkEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkEncoder")
    }
}

impl ChunkEncoder {
    pub fn new(secret: ConvergenceSecret) -> Self {
        let zstd = zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("zstd level 1 is valid");
        ChunkEncoder { secret, zstd }
    }

    /// Encode `plaintext`. Returns `None` for an all-zero chunk, which is recorded, never stored.
    pub fn encode(&mut self, plaintext: &[u8]) -> Result<Option<EncodedChunk>, ChunkError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(ChunkError::TooLarge(plaintext.len()));
        }
        if is_zero(plaintext) {
            return Ok(None);
        }
        let key = ChunkKey::derive(&self.secret, plaintext);
        let bound = zstd::zstd_safe::compress_bound(plaintext.len());
        let mut stored = vec![0u8; HEADER_LEN + bound.max(plaintext.len()) + AEAD_TAG_LEN];
        let compressed = self
            .zstd
            .compress_to_buffer(plaintext, &mut stored[HEADER_LEN..HEADER_LEN + bound])
            .ok()
            .filter(|&n| n < plaintext.len());
        let (compression, payload_len) = match compressed {
            Some(n) => (COMPRESSION_ZSTD, n),
            None => {
                stored[HEADER_LEN..HEADER_LEN + plaintext.len()].copy_from_slice(plaintext);
                (COMPRESSION_NONE, plaintext.len())
            }
        };
        stored[..4].copy_from_slice(CHUNK_MAGIC);
        stored[4] = CHUNK_FORMAT_VERSION;
        stored[5] = CIPHER_AES_256_GCM;
        stored[6] = compression;
        stored[7] = 0;
        stored[8..12].copy_from_slice(&(plaintext.len() as u32).to_le_bytes());
        let (header, rest) = stored.split_at_mut(HEADER_LEN);
        let gcm_tag = aead(&key)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(&header[..]),
                &mut rest[..payload_len],
            )
            .expect("chunk sizes are far below AES-GCM's limit");
        rest[payload_len..payload_len + AEAD_TAG_LEN].copy_from_slice(gcm_tag.as_ref());
        stored.truncate(HEADER_LEN + payload_len + AEAD_TAG_LEN);
        let tag = Tag::of(&stored);
        Ok(Some(EncodedChunk { tag, key, stored }))
    }
}

/// Checks only what can be checked without the key: the size bound and that `stored` hashes to `tag`.
/// The server runs this on every upload.
pub fn verify_tag(tag: &Tag, stored: &[u8]) -> Result<(), ChunkError> {
    if stored.len() < HEADER_LEN + AEAD_TAG_LEN || stored.len() > MAX_STORED {
        return Err(ChunkError::BadSize(stored.len()));
    }
    let actual = Tag::of(stored);
    if &actual != tag {
        return Err(ChunkError::TagMismatch { expected: *tag, actual });
    }
    Ok(())
}

/// Header checks of every decoder (magic, version, cipher, reserved byte, plaintext length).
fn check_header(header: &[u8], expected_len: usize) -> Result<[u8; HEADER_LEN], ChunkError> {
    let header: [u8; HEADER_LEN] = header.try_into().map_err(|_| ChunkError::BadHeader("short header"))?;
    if &header[..4] != CHUNK_MAGIC {
        return Err(ChunkError::BadHeader("bad magic"));
    }
    if header[4] != CHUNK_FORMAT_VERSION {
        return Err(ChunkError::BadHeader("unsupported format version"));
    }
    if header[5] != CIPHER_AES_256_GCM {
        return Err(ChunkError::BadHeader("unknown cipher"));
    }
    if header[7] != 0 {
        return Err(ChunkError::BadHeader("reserved byte set"));
    }
    let plain_len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if plain_len != expected_len {
        return Err(ChunkError::LengthMismatch { expected: expected_len, actual: plain_len });
    }
    Ok(header)
}

/// The stored size of an uncompressed (`COMPRESSION_NONE`) chunk of `plain_len` bytes: a stored chunk of
/// exactly this size can be read with [`decode_raw_in_place`] straight into its destination.
pub fn raw_stored_len(plain_len: usize) -> usize {
    HEADER_LEN + plain_len + AEAD_TAG_LEN
}

/// Verify and decrypt an uncompressed stored chunk given in its three parts, `header || payload ||
/// aead_tag` (the stored bytes, split), decrypting `payload` in place: on success it holds the plaintext.
/// The caller reads the ciphertext straight into the plaintext's destination and saves a copy. Same checks,
/// same order as [`ChunkDecoder::decode_into`]; a chunk whose header names a compression is refused
/// (`BadHeader`), so decode those with the other functions. On failure `payload` holds garbage.
pub fn decode_raw_in_place(
    tag: &Tag,
    key: &ChunkKey,
    header: &[u8],
    payload: &mut [u8],
    aead_tag: &[u8],
) -> Result<(), ChunkError> {
    let total = header.len() + payload.len() + aead_tag.len();
    if !(HEADER_LEN + AEAD_TAG_LEN..=MAX_STORED).contains(&total) {
        return Err(ChunkError::BadSize(total));
    }
    let mut h = blake3::Hasher::new();
    h.update(header);
    h.update(payload);
    h.update(aead_tag);
    let actual = Tag(*h.finalize().as_bytes());
    if &actual != tag {
        return Err(ChunkError::TagMismatch { expected: *tag, actual });
    }
    if aead_tag.len() != AEAD_TAG_LEN {
        return Err(ChunkError::BadSize(total));
    }
    let header = check_header(header, payload.len())?;
    let gcm_tag = ring::aead::Tag::try_from(aead_tag).map_err(|_| ChunkError::BadSize(total))?;
    aead(key)
        .open_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(&header),
            gcm_tag,
            payload,
            0..,
        )
        .map_err(|_| ChunkError::Decrypt)?;
    if header[6] != COMPRESSION_NONE {
        return Err(ChunkError::BadHeader("compressed chunk given to the raw decoder"));
    }
    Ok(())
}

/// The last step of decoding: a decrypted payload into exactly `out.len()` plaintext bytes.
fn decompress_into(
    zstd: &mut zstd::bulk::Decompressor<'static>,
    compression: u8,
    payload: &[u8],
    out: &mut [u8],
) -> Result<(), ChunkError> {
    match compression {
        COMPRESSION_NONE => {
            if payload.len() != out.len() {
                return Err(ChunkError::LengthMismatch { expected: out.len(), actual: payload.len() });
            }
            out.copy_from_slice(payload);
        }
        COMPRESSION_ZSTD => {
            let n = zstd.decompress_to_buffer(payload, out).map_err(|_| ChunkError::Decompress)?;
            if n != out.len() {
                return Err(ChunkError::LengthMismatch { expected: out.len(), actual: n });
            }
        }
        _ => return Err(ChunkError::BadHeader("unknown compression")),
    }
    Ok(())
}

/// [`decompress_into`] replacing the contents of `out` with exactly `len` plaintext bytes, written into its
/// spare capacity: no zero-fill of memory the decompressor overwrites anyway.
fn decompress_into_vec(
    zstd: &mut zstd::bulk::Decompressor<'static>,
    compression: u8,
    payload: &[u8],
    out: &mut Vec<u8>,
    len: usize,
) -> Result<(), ChunkError> {
    out.clear();
    match compression {
        COMPRESSION_NONE => {
            if payload.len() != len {
                return Err(ChunkError::LengthMismatch { expected: len, actual: payload.len() });
            }
            out.extend_from_slice(payload);
        }
        COMPRESSION_ZSTD => {
            out.reserve(len);
            // A frame longer than `len` fails here or below; `out`'s capacity bounds what it may write.
            let n = zstd.decompress_to_buffer(payload, out).map_err(|_| ChunkError::Decompress)?;
            if n != len {
                out.clear();
                return Err(ChunkError::LengthMismatch { expected: len, actual: n });
            }
        }
        _ => return Err(ChunkError::BadHeader("unknown compression")),
    }
    Ok(())
}

/// Decodes chunks; holds a reusable zstd context, so keep one per thread.
pub struct ChunkDecoder {
    zstd: zstd::bulk::Decompressor<'static>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for ChunkDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkDecoder")
    }
}

impl Default for ChunkDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkDecoder {
    pub fn new() -> Self {
        ChunkDecoder { zstd: zstd::bulk::Decompressor::new().expect("zstd context"), scratch: Vec::new() }
    }

    /// Verify and decode `stored` into `out`, which must be exactly the expected plaintext length.
    /// Checks, in order: size bounds, tag, header, AEAD, decompressed length.
    pub fn decode_into(
        &mut self,
        tag: &Tag,
        key: &ChunkKey,
        stored: &[u8],
        out: &mut [u8],
    ) -> Result<(), ChunkError> {
        verify_tag(tag, stored)?;
        let header = check_header(&stored[..HEADER_LEN], out.len())?;
        self.scratch.clear();
        self.scratch.extend_from_slice(&stored[HEADER_LEN..]);
        let payload = aead(key)
            .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(&header), &mut self.scratch)
            .map_err(|_| ChunkError::Decrypt)?;
        decompress_into(&mut self.zstd, header[6], payload, out)
    }

    /// Like [`Self::decode_into`], but decrypts in place in `stored` (whose contents are destroyed, even on
    /// failure) instead of copying the ciphertext to an internal buffer first, and replaces the contents of
    /// `out` with the `len` plaintext bytes (written into its capacity, never zero-filled first). Same
    /// checks, same order. On failure `out` holds no plaintext that may be used.
    pub fn decode_in_place(
        &mut self,
        tag: &Tag,
        key: &ChunkKey,
        stored: &mut [u8],
        out: &mut Vec<u8>,
        len: usize,
    ) -> Result<(), ChunkError> {
        verify_tag(tag, stored)?;
        self.decode_fetched_in_place(key, stored, out, len)
    }

    /// Like [`Self::decode_in_place`] for bytes whose tag the caller has just checked with [`verify_tag`]
    /// (a fetch from the server or a lookaside directory does): the same checks but the tag's hash, which
    /// would only repeat that one. The AEAD still authenticates every byte under the keyring's key, so a
    /// chunk that is not the keyring's fails here (`Decrypt`) whatever the caller checked.
    pub fn decode_fetched_in_place(
        &mut self,
        key: &ChunkKey,
        stored: &mut [u8],
        out: &mut Vec<u8>,
        len: usize,
    ) -> Result<(), ChunkError> {
        out.clear();
        if len > MAX_PLAINTEXT {
            return Err(ChunkError::TooLarge(len));
        }
        if stored.len() < HEADER_LEN + AEAD_TAG_LEN || stored.len() > MAX_STORED {
            return Err(ChunkError::BadSize(stored.len()));
        }
        let (header, rest) = stored.split_at_mut(HEADER_LEN);
        let header = check_header(header, len)?;
        let payload = aead(key)
            .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(&header), rest)
            .map_err(|_| ChunkError::Decrypt)?;
        decompress_into_vec(&mut self.zstd, header[6], payload, out, len)
    }

    /// Like [`Self::decode_into`] into a fresh buffer of `expected_len` bytes.
    pub fn decode(
        &mut self,
        tag: &Tag,
        key: &ChunkKey,
        stored: &[u8],
        expected_len: usize,
    ) -> Result<Vec<u8>, ChunkError> {
        if expected_len > MAX_PLAINTEXT {
            return Err(ChunkError::TooLarge(expected_len));
        }
        let mut out = vec![0u8; expected_len];
        self.decode_into(tag, key, stored, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secret() -> ConvergenceSecret {
        ConvergenceSecret([7u8; 32])
    }

    #[test]
    fn zero_chunk_is_not_encoded() {
        let mut enc = ChunkEncoder::new(secret());
        assert!(enc.encode(&[0u8; 4096]).unwrap().is_none());
        assert!(enc.encode(&[]).unwrap().is_none());
        let mut one = vec![0u8; 4096];
        one[4095] = 1;
        assert!(enc.encode(&one).unwrap().is_some());
    }

    #[test]
    fn convergent_and_secret_dependent() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let a = ChunkEncoder::new(secret()).encode(&data).unwrap().unwrap();
        let b = ChunkEncoder::new(secret()).encode(&data).unwrap().unwrap();
        let c = ChunkEncoder::new(ConvergenceSecret([8u8; 32])).encode(&data).unwrap().unwrap();
        assert_eq!(a.tag, b.tag);
        assert_eq!(a.stored, b.stored);
        assert_ne!(a.tag, c.tag);
        assert_eq!(a.stored[6], COMPRESSION_ZSTD);
    }

    #[test]
    fn incompressible_is_stored_raw() {
        let mut data = vec![0u8; 4096];
        blake3::Hasher::new().update(b"seed").finalize_xof().fill(&mut data);
        let e = ChunkEncoder::new(secret()).encode(&data).unwrap().unwrap();
        assert_eq!(e.stored[6], COMPRESSION_NONE);
        assert_eq!(e.stored.len(), HEADER_LEN + 4096 + AEAD_TAG_LEN);
        let back = ChunkDecoder::new().decode(&e.tag, &e.key, &e.stored, 4096).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn every_flipped_byte_is_an_integrity_error() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i / 7) as u8).collect();
        let e = ChunkEncoder::new(secret()).encode(&data).unwrap().unwrap();
        let mut dec = ChunkDecoder::new();
        for i in 0..e.stored.len() {
            let mut bad = e.stored.clone();
            bad[i] ^= 0x80;
            assert!(dec.decode(&e.tag, &e.key, &bad, data.len()).is_err(), "flip at {i} undetected");
            // Even with the tag recomputed (a forger who controls the keyring's tag), AEAD catches it.
            let forged = Tag::of(&bad);
            assert!(dec.decode(&forged, &e.key, &bad, data.len()).is_err(), "forged flip at {i} undetected");
        }
        let mut wrong_key = e.key.clone();
        wrong_key.0[0] ^= 1;
        assert_eq!(dec.decode(&e.tag, &wrong_key, &e.stored, data.len()), Err(ChunkError::Decrypt));
        assert!(matches!(
            dec.decode(&e.tag, &e.key, &e.stored, data.len() - 1),
            Err(ChunkError::LengthMismatch { .. })
        ));
    }

    /// `decode_in_place`, `decode_raw_in_place` and (on tag-checked bytes) `decode_fetched_in_place` accept
    /// exactly what `decode_into` accepts.
    fn in_place_agrees(e: &EncodedChunk, stored: &[u8], tag: &Tag, key: &ChunkKey, len: usize) {
        let mut dec = ChunkDecoder::new();
        let reference = dec.decode(tag, key, stored, len);
        let mut copy = stored.to_vec();
        // A reused buffer's old contents and capacity must not leak into a result.
        let mut out = vec![7u8; 2 * len + 1];
        let r = dec.decode_in_place(tag, key, &mut copy, &mut out, len).map(|()| out);
        assert_eq!(r.is_ok(), reference.is_ok());
        if let (Ok(a), Ok(b)) = (&r, &reference) {
            assert_eq!(a, b);
        }
        // Bytes that passed `verify_tag` (what a fetch hands over): the fetched decoder agrees too.
        if verify_tag(tag, stored).is_ok() {
            let mut copy = stored.to_vec();
            let mut out = Vec::new();
            let f = dec.decode_fetched_in_place(key, &mut copy, &mut out, len).map(|()| out);
            assert_eq!(f, reference, "fetched decoder disagrees");
        }
        if stored.len() >= HEADER_LEN + AEAD_TAG_LEN && stored.len() - HEADER_LEN - AEAD_TAG_LEN == len {
            let mut payload = stored[HEADER_LEN..stored.len() - AEAD_TAG_LEN].to_vec();
            let raw = decode_raw_in_place(
                tag,
                key,
                &stored[..HEADER_LEN],
                &mut payload,
                &stored[stored.len() - AEAD_TAG_LEN..],
            );
            let raw_ok = e.stored[6] == COMPRESSION_NONE && reference.is_ok();
            assert_eq!(raw.is_ok(), raw_ok, "raw decoder disagrees");
            if raw.is_ok() {
                assert_eq!(Some(&payload), reference.as_ref().ok());
            }
        }
    }

    #[test]
    fn in_place_decoders_check_everything() {
        let mut raw = vec![0u8; 4096];
        blake3::Hasher::new().update(b"seed").finalize_xof().fill(&mut raw);
        let text: Vec<u8> = (0..8192u32).map(|i| (i / 7) as u8).collect();
        for data in [raw, text] {
            let e = ChunkEncoder::new(secret()).encode(&data).unwrap().unwrap();
            in_place_agrees(&e, &e.stored, &e.tag, &e.key, data.len());
            assert_eq!(raw_stored_len(data.len()) == e.stored.len(), e.stored[6] == COMPRESSION_NONE);
            for i in 0..e.stored.len() {
                let mut bad = e.stored.clone();
                bad[i] ^= 0x80;
                in_place_agrees(&e, &bad, &e.tag, &e.key, data.len());
                in_place_agrees(&e, &bad, &Tag::of(&bad), &e.key, data.len());
            }
            let mut wrong_key = e.key.clone();
            wrong_key.0[0] ^= 1;
            in_place_agrees(&e, &e.stored, &e.tag, &wrong_key, data.len());
            in_place_agrees(&e, &e.stored, &e.tag, &e.key, data.len() - 1);
            in_place_agrees(&e, &e.stored[..e.stored.len() - 1], &e.tag, &e.key, data.len());
        }
    }

    proptest! {
        #[test]
        fn roundtrip(data in proptest::collection::vec(any::<u8>(), 1..20000), repeat in 1usize..4) {
            let data: Vec<u8> = data.iter().cycle().take(data.len() * repeat).copied().collect();
            let mut enc = ChunkEncoder::new(secret());
            match enc.encode(&data).unwrap() {
                None => prop_assert!(is_zero(&data)),
                Some(e) => {
                    prop_assert_eq!(Tag::of(&e.stored), e.tag);
                    let back = ChunkDecoder::new().decode(&e.tag, &e.key, &e.stored, data.len()).unwrap();
                    prop_assert_eq!(back, data);
                }
            }
        }

        #[test]
        fn decode_arbitrary_bytes_never_panics(stored in proptest::collection::vec(any::<u8>(), 0..5000),
                                               len in 0usize..10000, valid_tag in any::<bool>()) {
            let tag = if valid_tag { Tag::of(&stored) } else { Tag([1; 32]) };
            let r = ChunkDecoder::new().decode(&tag, &ChunkKey([3; 32]), &stored, len);
            prop_assert!(r.is_err());
        }
    }
}
