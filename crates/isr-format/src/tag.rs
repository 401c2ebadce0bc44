//! The tag of an encoded chunk: the BLAKE3 hash of its stored bytes. Tags name chunks on the server.

use serde::{Deserialize, Serialize};

/// BLAKE3 of a chunk's stored (encrypted) bytes. The all-zero tag is reserved for the all-zero chunk,
/// which is never stored.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag(pub [u8; 32]);

impl Tag {
    pub const ZERO: Tag = Tag([0u8; 32]);

    pub fn of(stored: &[u8]) -> Tag {
        Tag(*blake3::hash(stored).as_bytes())
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Tag> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Tag(out))
    }
}

impl std::fmt::Debug for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tag({})", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Tag {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Tag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Tag::from_hex(&s).ok_or_else(|| serde::de::Error::custom("tag must be 64 hex digits"))
    }
}
