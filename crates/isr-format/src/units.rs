//! Newtypes that keep chunk indices, byte offsets and lengths apart.

use serde::{Deserialize, Serialize};

/// The chunk size of a parcel: a power of two from 4 KiB to 4 MiB, fixed for the parcel's lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct ChunkSize(u32);

/// The position of a chunk within one image (disk or memory), counted in chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkIndex(pub u64);

/// A byte position within one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ByteOffset(pub u64);

/// The length of an image in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ImageLen(pub u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitsError {
    #[error("chunk size {0} is not a power of two between 4 KiB and 4 MiB")]
    BadChunkSize(u64),
    #[error("cannot parse chunk size {0:?}: use bytes or a K/M suffix, e.g. 128K")]
    Unparsable(String),
}

impl ChunkSize {
    pub const MIN: u32 = 4 * 1024;
    pub const MAX: u32 = 4 * 1024 * 1024;
    pub const DEFAULT: ChunkSize = ChunkSize(128 * 1024);

    pub fn new(bytes: u64) -> Result<Self, UnitsError> {
        if bytes.is_power_of_two() && (Self::MIN as u64..=Self::MAX as u64).contains(&bytes) {
            Ok(ChunkSize(bytes as u32))
        } else {
            Err(UnitsError::BadChunkSize(bytes))
        }
    }

    /// Parses `131072`, `128K`, `128KiB`, `1M`, `1MiB` (case-insensitive).
    pub fn parse(text: &str) -> Result<Self, UnitsError> {
        let t = text.trim().to_ascii_lowercase();
        let t = t.trim_end_matches("ib").trim_end_matches('b');
        let (digits, mult) = match t.chars().last() {
            Some('k') => (&t[..t.len() - 1], 1024u64),
            Some('m') => (&t[..t.len() - 1], 1024 * 1024),
            _ => (t, 1),
        };
        let n: u64 = digits.parse().map_err(|_| UnitsError::Unparsable(text.to_owned()))?;
        Self::new(n.checked_mul(mult).ok_or_else(|| UnitsError::Unparsable(text.to_owned()))?)
    }

    pub fn bytes(self) -> u32 {
        self.0
    }

    pub fn as_usize(self) -> usize {
        self.0 as usize
    }

    pub fn log2(self) -> u32 {
        self.0.trailing_zeros()
    }

    /// The chunk holding byte `offset`.
    pub fn index_of(self, offset: ByteOffset) -> ChunkIndex {
        ChunkIndex(offset.0 >> self.log2())
    }

    /// The first byte of chunk `index`.
    pub fn offset_of(self, index: ChunkIndex) -> ByteOffset {
        ByteOffset(index.0 << self.log2())
    }

    /// Where `offset` falls inside its chunk.
    pub fn offset_in_chunk(self, offset: ByteOffset) -> usize {
        (offset.0 & (self.0 as u64 - 1)) as usize
    }

    /// How many chunks an image of `len` bytes has (the last one may be short).
    pub fn chunk_count(self, len: ImageLen) -> u64 {
        len.0.div_ceil(self.0 as u64)
    }

    /// The length of chunk `index` in an image of `len` bytes: the chunk size, except for a short last chunk.
    pub fn chunk_len(self, len: ImageLen, index: ChunkIndex) -> usize {
        let start = self.offset_of(index).0;
        len.0.saturating_sub(start).min(self.0 as u64) as usize
    }

    /// The chunks overlapped by the byte range `[offset, offset + len)`.
    pub fn chunks_in_range(self, offset: ByteOffset, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = self.index_of(offset).0;
        let last = self.index_of(ByteOffset(offset.0 + len - 1)).0;
        first..last + 1
    }
}

impl TryFrom<u32> for ChunkSize {
    type Error = UnitsError;
    fn try_from(v: u32) -> Result<Self, UnitsError> {
        ChunkSize::new(v as u64)
    }
}

impl From<ChunkSize> for u32 {
    fn from(c: ChunkSize) -> u32 {
        c.0
    }
}

impl std::fmt::Display for ChunkSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 >= 1024 * 1024 {
            write!(f, "{}MiB", self.0 >> 20)
        } else {
            write!(f, "{}KiB", self.0 >> 10)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(ChunkSize::parse("128K").unwrap().bytes(), 131072);
        assert_eq!(ChunkSize::parse("4MiB").unwrap().bytes(), 4 << 20);
        assert_eq!(ChunkSize::parse("4096").unwrap().bytes(), 4096);
        assert!(ChunkSize::parse("100K").is_err());
        assert!(ChunkSize::parse("8M").is_err());
        assert!(ChunkSize::parse("2K").is_err());
        assert!(ChunkSize::parse("abc").is_err());
    }

    proptest! {
        #[test]
        fn offset_index_roundtrip(log2 in 12u32..=22, offset in 0u64..(1u64 << 44)) {
            let cs = ChunkSize::new(1 << log2).unwrap();
            let idx = cs.index_of(ByteOffset(offset));
            let start = cs.offset_of(idx);
            prop_assert!(start.0 <= offset);
            prop_assert!(offset < start.0 + cs.bytes() as u64);
            prop_assert_eq!(start.0 + cs.offset_in_chunk(ByteOffset(offset)) as u64, offset);
        }

        #[test]
        fn chunk_lengths_sum_to_image(log2 in 12u32..=22, len in 0u64..(1u64 << 34)) {
            let cs = ChunkSize::new(1 << log2).unwrap();
            let n = cs.chunk_count(ImageLen(len));
            let full = n.saturating_sub(1) * cs.bytes() as u64;
            let last = if n == 0 { 0 } else { cs.chunk_len(ImageLen(len), ChunkIndex(n - 1)) as u64 };
            prop_assert_eq!(full + last, len);
            prop_assert!(n == 0 || last > 0);
        }

        #[test]
        fn range_covers_exactly(log2 in 12u32..=22, offset in 0u64..(1u64 << 40), len in 1u64..(1u64 << 26)) {
            let cs = ChunkSize::new(1 << log2).unwrap();
            let r = cs.chunks_in_range(ByteOffset(offset), len);
            prop_assert!(cs.offset_of(ChunkIndex(r.start)).0 <= offset);
            let end = cs.offset_of(ChunkIndex(r.end)).0;
            prop_assert!(end >= offset + len);
            prop_assert!(end - (offset + len) < cs.bytes() as u64);
        }
    }
}
