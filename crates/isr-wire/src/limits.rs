//! The limits of the API: what the server enforces and the client stays within (`docs/api.md`,
//! "Conventions").

/// Largest JSON request body (a commit carries a manifest of up to 1 MiB in base64).
pub const MAX_JSON_BODY: usize = 4 << 20;
/// Largest keyring upload (a 128 GiB image at 128 KiB chunks).
pub const MAX_KEYRING_BODY: usize = 64 << 20;
/// Largest chunk upload: a stored chunk at its largest.
pub const MAX_CHUNK_BODY: usize = isr_format::codec::MAX_STORED;
/// Most tags in one `POST /chunks/missing`.
pub const MAX_MISSING_TAGS: usize = 1 << 20;
/// Most tags in one `POST /parcels/{name}/held` (a client sends more in several requests).
pub const MAX_HELD_TAGS: usize = 4096;
/// Most tags in one `POST /chunks/fetch`.
pub const MAX_FETCH_TAGS: usize = 256;
/// Longest display text (holder, client, breaker) and client id, in bytes.
pub const MAX_DISPLAY_TEXT: usize = 256;
/// Longest version comment, in bytes.
pub const MAX_COMMENT: usize = 4096;
/// Longest hex field of a JSON request (wrapped keyroots), in hex digits.
pub const MAX_HEX_FIELD: usize = 8192;
/// Longest bearer token the server looks up.
pub const MAX_TOKEN: usize = 256;
/// A tag in the binary bodies of `chunks/missing` and `chunks/fetch`.
pub const TAG_LEN: usize = 32;
/// The length word of an absent chunk in a `chunks/fetch` answer (no bytes follow it).
pub const FETCH_ABSENT: u32 = u32::MAX;
