//! The error codes of the API: one enum, each code with its HTTP status and what it means. The strings are
//! the wire format (`"code"` of every error answer) and never change; a new code is a new variant, and the
//! client's exhaustive `match` on [`ErrorCode`] (isr-client's transport) does not compile until it is given
//! an exit code.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident = $wire:literal, $status:literal, $when:literal;)+) => {
        /// An error code of the API (`docs/api.md`, "Error codes").
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum ErrorCode {
            $($(#[$doc])* #[serde(rename = $wire)] $variant,)+
        }

        impl ErrorCode {
            /// Every code, in the order of the documentation's table.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)+];

            /// The code as it is on the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $wire,)+
                }
            }

            /// The HTTP status every answer with this code has.
            pub const fn status(self) -> u16 {
                match self {
                    $(ErrorCode::$variant => $status,)+
                }
            }

            /// When the server answers with it (the documentation's table).
            pub const fn when(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $when,)+
                }
            }
        }
    };
}

codes! {
    BadRequest = "bad_request", 400, "malformed JSON, hex, query, id or tag list";
    BadName = "bad_name", 400, "invalid parcel name on create";
    BadManifest = "bad_manifest", 400, "commit manifest not base64, refused by the parser, or bound to another parcel or version";
    MissingKeyring = "missing_keyring", 400, "commit names keyrings not uploaded for the parcel (`missing`)";
    HashMismatch = "hash_mismatch", 400, "keyring upload does not hash to the hash in the URL";
    BadKeyring = "bad_keyring", 400, "keyring upload does not parse";
    TagMismatch = "tag_mismatch", 400, "chunk upload does not hash to its tag";
    BadChunk = "bad_chunk", 400, "chunk upload is too short to be a chunk";
    Unauthorized = "unauthorized", 401, "no, unknown or expired token";
    BadCredentials = "bad_credentials", 401, "login failed (wrong user name or password)";
    NoSuchParcel = "no_such_parcel", 404, "no such parcel of this user (also for invalid names in a path)";
    NoSuchVersion = "no_such_version", 404, "no such version (or not a number or `head`)";
    NoSuchKeyring = "no_such_keyring", 404, "no such keyring in this user's parcel";
    NoSuchChunk = "no_such_chunk", 404, "no such chunk";
    NotFound = "not_found", 404, "no such endpoint";
    ParcelExists = "parcel_exists", 409, "create of an existing parcel";
    UserExists = "user_exists", 409, "a user of that name exists (no v1 route creates users: `isr-server user add` does)";
    Locked = "locked", 409, "held by another client or lock (`holder`, `since_unix`)";
    LockBroken = "lock_broken", 409, "the caller's lock was broken (`broken_by`, `broken_unix`; `holder`, `since_unix` if locked again)";
    LockMismatch = "lock_mismatch", 409, "lock id unknown and the parcel unlocked";
    HasVersions = "has_versions", 409, "delete of a parcel that has versions";
    StaleBase = "stale_base", 409, "commit base is not the head (`head`)";
    MissingChunks = "missing_chunks", 409, "commit's chunks not all stored (`missing`)";
    TooLarge = "too_large", 413, "body over the endpoint's limit";
    Internal = "internal", 500, "server-side failure";
    CorruptChunk = "corrupt_chunk", 500, "a stored chunk failed its check on the server";
}

impl ErrorCode {
    /// The code named by `wire`, or `None` for a code this build does not know (a newer server's).
    pub fn from_wire(wire: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == wire)
    }

    /// The "Error codes" table of `docs/api.md`, rendered from the enum (a test keeps the two equal).
    pub fn markdown_table() -> String {
        let mut out = String::from("| status | code | when |\n| --- | --- | --- |\n");
        for c in ErrorCode::ALL {
            out.push_str(&format!("| {} | `{}` | {} |\n", c.status(), c.as_str(), c.when()));
        }
        out
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire strings of today's servers and clients: changing one breaks every deployed client.
    const WIRE: &[(ErrorCode, &str, u16)] = &[
        (ErrorCode::BadRequest, "bad_request", 400),
        (ErrorCode::BadName, "bad_name", 400),
        (ErrorCode::BadManifest, "bad_manifest", 400),
        (ErrorCode::MissingKeyring, "missing_keyring", 400),
        (ErrorCode::HashMismatch, "hash_mismatch", 400),
        (ErrorCode::BadKeyring, "bad_keyring", 400),
        (ErrorCode::TagMismatch, "tag_mismatch", 400),
        (ErrorCode::BadChunk, "bad_chunk", 400),
        (ErrorCode::Unauthorized, "unauthorized", 401),
        (ErrorCode::BadCredentials, "bad_credentials", 401),
        (ErrorCode::NoSuchParcel, "no_such_parcel", 404),
        (ErrorCode::NoSuchVersion, "no_such_version", 404),
        (ErrorCode::NoSuchKeyring, "no_such_keyring", 404),
        (ErrorCode::NoSuchChunk, "no_such_chunk", 404),
        (ErrorCode::NotFound, "not_found", 404),
        (ErrorCode::ParcelExists, "parcel_exists", 409),
        (ErrorCode::UserExists, "user_exists", 409),
        (ErrorCode::Locked, "locked", 409),
        (ErrorCode::LockBroken, "lock_broken", 409),
        (ErrorCode::LockMismatch, "lock_mismatch", 409),
        (ErrorCode::HasVersions, "has_versions", 409),
        (ErrorCode::StaleBase, "stale_base", 409),
        (ErrorCode::MissingChunks, "missing_chunks", 409),
        (ErrorCode::TooLarge, "too_large", 413),
        (ErrorCode::Internal, "internal", 500),
        (ErrorCode::CorruptChunk, "corrupt_chunk", 500),
    ];

    #[test]
    fn wire_strings_and_statuses_are_pinned() {
        assert_eq!(ErrorCode::ALL.len(), WIRE.len());
        for (code, wire, status) in WIRE {
            assert_eq!(code.as_str(), *wire);
            assert_eq!(code.status(), *status, "{wire}");
            assert_eq!(serde_json::to_string(code).unwrap(), format!("\"{wire}\""));
            assert_eq!(serde_json::from_str::<ErrorCode>(&format!("\"{wire}\"")).unwrap(), *code);
            assert_eq!(ErrorCode::from_wire(wire), Some(*code));
        }
        assert_eq!(ErrorCode::from_wire("a_code_from_the_future"), None);
    }

    #[test]
    fn the_documented_table_is_the_enum() {
        let doc = include_str!("../../../docs/api.md");
        let table = ErrorCode::markdown_table();
        assert!(
            doc.contains(&table),
            "docs/api.md's error-code table differs from the enum; it should be:\n{table}"
        );
    }
}
