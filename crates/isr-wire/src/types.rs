//! The JSON bodies and query strings of the API, one definition for the server (which serializes replies and
//! parses requests) and the client (the reverse). Field names and shapes are the wire format of `docs/api.md`;
//! the golden tests below pin each one's JSON.
//!
//! Fields that carry names and ids are plain strings here: the server validates them with the rules of
//! [`crate::names`] so that it can answer each with its documented code (`bad_name`, `bad_request`,
//! `no_such_parcel`), which a failed deserialization could not.

use crate::codes::ErrorCode;
use crate::limits::TAG_LEN;
use isr_format::Tag;
use serde::{Deserialize, Serialize};

/// `POST /login`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginRequest {
    pub user: String,
    /// 64 hex digits.
    pub login_secret: String,
}

/// The answer to `POST /login`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginReply {
    pub token: String,
    pub expires_unix: i64,
    pub convergence_secret: String,
    pub recovery_pubkey: Option<String>,
}

/// `PUT /password`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordRequest {
    pub login_secret: String,
}

/// Who holds a parcel's lock, and since when (in parcel listings and the lock confirmation's answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub holder: String,
    pub since_unix: i64,
}

/// One parcel of `GET /parcels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParcelSummary {
    pub name: String,
    pub head: u64,
    pub created_unix: i64,
    pub lock: Option<LockInfo>,
}

/// `GET /parcels/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParcelDetail {
    pub name: String,
    pub head: u64,
    pub created_unix: i64,
    pub lock: Option<LockInfo>,
    pub wrapped_keyroot: String,
    /// IT's network policy (`none` or `nat`), `None` when unset (or from a server without policies).
    #[serde(default)]
    pub network_policy: Option<String>,
}

/// `POST /parcels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateParcelRequest {
    pub name: String,
    pub wrapped_keyroot: String,
    #[serde(default)]
    pub recovery_keyroot: Option<String>,
    pub holder: String,
    pub client_id: String,
}

/// The answer to `POST /parcels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateParcelReply {
    pub lock_id: String,
}

/// `PUT /parcels/{name}/keyroot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyrootRequest {
    pub wrapped_keyroot: String,
}

/// `?client_id=` of `DELETE /parcels/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteQuery {
    pub client_id: Option<String>,
}

/// One version of `GET /parcels/{name}/versions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: u64,
    pub created_unix: i64,
    pub client: String,
    pub bytes_uploaded: u64,
    pub comment: String,
}

/// `POST /parcels/{name}/versions` (a commit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRequest {
    pub lock_id: String,
    pub base_version: u64,
    /// The manifest bytes in base64 (standard alphabet).
    pub manifest: String,
    #[serde(default)]
    pub client: String,
    #[serde(default)]
    pub comment: String,
    #[serde(default)]
    pub bytes_uploaded: u64,
}

/// The answer to a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitReply {
    pub version: u64,
}

/// `POST /parcels/{name}/lock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRequest {
    pub holder: String,
    pub client_id: String,
}

/// The answer to `POST /parcels/{name}/lock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockReply {
    pub lock_id: String,
    pub since_unix: i64,
}

/// `?lock_id=` of keyring uploads and of the lock confirmation (`GET .../lock`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockIdQuery {
    pub lock_id: Option<String>,
}

/// The query of `DELETE /parcels/{name}/lock`: `lock_id=` (release) or `force=true[&by=NAME]` (break).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnlockQuery {
    pub lock_id: Option<String>,
    #[serde(default)]
    pub force: bool,
    /// Who breaks the lock (a client's display name), told to the holder whose lock it was.
    pub by: Option<String>,
}

impl DeleteQuery {
    /// The query string's pairs, for a client.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        self.client_id.iter().map(|c| ("client_id", c.clone())).collect()
    }
}

impl LockIdQuery {
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        self.lock_id.iter().map(|c| ("lock_id", c.clone())).collect()
    }
}

impl UnlockQuery {
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out: Vec<(&'static str, String)> =
            self.lock_id.iter().map(|c| ("lock_id", c.clone())).collect();
        if self.force {
            out.push(("force", "true".into()));
        }
        out.extend(self.by.iter().map(|b| ("by", b.clone())));
        out
    }
}

/// `POST /parcels/{name}/held`: keep these chunks (uploaded, or about to be, under the caller's lock and not
/// yet referenced by any version) from gc while the lock lasts. At most
/// [`crate::limits::MAX_HELD_TAGS`] tags per request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldChunks {
    pub lock_id: String,
    /// The chunk tags, 64 hex digits each.
    pub tags: Vec<String>,
}

impl HoldChunks {
    /// The request for `tags` under the lock `lock_id`.
    pub fn new(lock_id: &str, tags: &[Tag]) -> HoldChunks {
        HoldChunks { lock_id: lock_id.to_owned(), tags: tags.iter().map(Tag::to_hex).collect() }
    }
}

/// An error answer: `{"error": message, "code": code, ...}` with the extra fields some codes carry.
///
/// `code` stays a string so that a client can read the message of a code it does not know (a newer
/// server's); [`ErrorBody::known_code`] gives the [`ErrorCode`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
    /// `locked`, and `lock_broken` when someone holds the parcel now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_unix: Option<i64>,
    /// `lock_broken`: who broke the lock, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken_unix: Option<i64>,
    /// `stale_base`: the head the commit should have been based on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<u64>,
    /// `missing_chunks`, `missing_keyring`: the tags or hashes, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<Vec<String>>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody { error: message.into(), code: code.as_str().to_owned(), ..ErrorBody::default() }
    }

    /// The code, when this build knows it.
    pub fn known_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_wire(&self.code)
    }
}

/// The body of `chunks/missing` and `chunks/fetch` requests (and of the `chunks/missing` answer): the
/// tags' 32 bytes each, concatenated.
pub fn encode_tags(tags: &[Tag]) -> Vec<u8> {
    tags.iter().flat_map(|t| t.0).collect()
}

/// The tags of a concatenation of 32-byte tags, or `None` when its length is not a multiple of 32.
pub fn decode_tags(body: &[u8]) -> Option<Vec<Tag>> {
    if !body.len().is_multiple_of(TAG_LEN) {
        return None;
    }
    Some(body.chunks_exact(TAG_LEN).map(|c| Tag(c.try_into().expect("32 bytes"))).collect())
}

#[cfg(test)]
mod golden {
    //! The JSON of every type as deployed servers and clients write it. A change here is a change of the
    //! wire: it breaks old clients (or old servers) and needs a new API version instead.

    use super::*;
    use serde_json::{json, Value};

    fn pin<T>(value: T, golden: Value)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        assert_eq!(serde_json::to_value(&value).unwrap(), golden, "{value:?}");
        let back: T = serde_json::from_value(golden.clone()).unwrap();
        assert_eq!(back, value, "{golden}");
    }

    #[test]
    fn requests() {
        pin(
            LoginRequest { user: "alice".into(), login_secret: "ab".repeat(32) },
            json!({"user": "alice", "login_secret": "ab".repeat(32)}),
        );
        pin(PasswordRequest { login_secret: "cd".into() }, json!({"login_secret": "cd"}));
        pin(
            CreateParcelRequest {
                name: "p".into(),
                wrapped_keyroot: "00".into(),
                recovery_keyroot: None,
                holder: "h".into(),
                client_id: "c1".into(),
            },
            json!({"name": "p", "wrapped_keyroot": "00", "recovery_keyroot": null, "holder": "h", "client_id": "c1"}),
        );
        pin(KeyrootRequest { wrapped_keyroot: "abcd".into() }, json!({"wrapped_keyroot": "abcd"}));
        pin(
            CommitRequest {
                lock_id: "1f".into(),
                base_version: 1,
                manifest: "AAEC".into(),
                client: "laptop".into(),
                comment: "c".into(),
                bytes_uploaded: 9,
            },
            json!({"lock_id": "1f", "base_version": 1, "manifest": "AAEC", "client": "laptop", "comment": "c", "bytes_uploaded": 9}),
        );
        pin(
            LockRequest { holder: "h".into(), client_id: "c9".into() },
            json!({"holder": "h", "client_id": "c9"}),
        );
        pin(
            HoldChunks::new("1f", &[Tag([1; 32]), Tag([0xab; 32])]),
            json!({"lock_id": "1f", "tags": ["01".repeat(32), "ab".repeat(32)]}),
        );
    }

    #[test]
    fn requests_from_older_clients_keep_their_defaults() {
        let c: CommitRequest =
            serde_json::from_value(json!({"lock_id": "1f", "base_version": 0, "manifest": ""})).unwrap();
        assert_eq!((c.client.as_str(), c.comment.as_str(), c.bytes_uploaded), ("", "", 0));
        let p: CreateParcelRequest = serde_json::from_value(
            json!({"name": "p", "wrapped_keyroot": "00", "holder": "h", "client_id": "c"}),
        )
        .unwrap();
        assert_eq!(p.recovery_keyroot, None);
        let d: ParcelDetail = serde_json::from_value(
            json!({"name": "p", "head": 0, "created_unix": 1, "lock": null, "wrapped_keyroot": "00"}),
        )
        .unwrap();
        assert_eq!(d.network_policy, None);
    }

    #[test]
    fn replies() {
        pin(
            LoginReply {
                token: "t".into(),
                expires_unix: 5,
                convergence_secret: "cs".into(),
                recovery_pubkey: None,
            },
            json!({"token": "t", "expires_unix": 5, "convergence_secret": "cs", "recovery_pubkey": null}),
        );
        let lock = LockInfo { holder: "h".into(), since_unix: 7 };
        pin(lock.clone(), json!({"holder": "h", "since_unix": 7}));
        pin(
            vec![
                ParcelSummary { name: "p".into(), head: 2, created_unix: 1, lock: Some(lock.clone()) },
                ParcelSummary { name: "q".into(), head: 0, created_unix: 1, lock: None },
            ],
            json!([
                {"name": "p", "head": 2, "created_unix": 1, "lock": {"holder": "h", "since_unix": 7}},
                {"name": "q", "head": 0, "created_unix": 1, "lock": null},
            ]),
        );
        pin(
            ParcelDetail {
                name: "p".into(),
                head: 2,
                created_unix: 1,
                lock: None,
                wrapped_keyroot: "00".into(),
                network_policy: Some("nat".into()),
            },
            json!({"name": "p", "head": 2, "created_unix": 1, "lock": null, "wrapped_keyroot": "00", "network_policy": "nat"}),
        );
        pin(CreateParcelReply { lock_id: "ab".into() }, json!({"lock_id": "ab"}));
        pin(
            vec![VersionInfo {
                version: 1,
                created_unix: 3,
                client: "c".into(),
                bytes_uploaded: 4,
                comment: "m".into(),
            }],
            json!([{"version": 1, "created_unix": 3, "client": "c", "bytes_uploaded": 4, "comment": "m"}]),
        );
        pin(CommitReply { version: 3 }, json!({"version": 3}));
        pin(LockReply { lock_id: "ab".into(), since_unix: 8 }, json!({"lock_id": "ab", "since_unix": 8}));
    }

    #[test]
    fn errors() {
        pin(ErrorBody::new(ErrorCode::BadName, "m"), json!({"error": "m", "code": "bad_name"}));
        pin(
            ErrorBody {
                holder: Some("h".into()),
                since_unix: Some(2),
                broken_by: Some("b".into()),
                broken_unix: Some(1),
                ..ErrorBody::new(ErrorCode::LockBroken, "m")
            },
            json!({"error": "m", "code": "lock_broken", "broken_by": "b", "broken_unix": 1, "holder": "h", "since_unix": 2}),
        );
        pin(
            ErrorBody { head: Some(4), ..ErrorBody::new(ErrorCode::StaleBase, "m") },
            json!({"error": "m", "code": "stale_base", "head": 4}),
        );
        pin(
            ErrorBody { missing: Some(vec!["aa".into()]), ..ErrorBody::new(ErrorCode::MissingChunks, "m") },
            json!({"error": "m", "code": "missing_chunks", "missing": ["aa"]}),
        );
        // A newer server's code and fields: still readable, the code unknown.
        let b: ErrorBody =
            serde_json::from_value(json!({"error": "m", "code": "quota_exceeded", "quota": 5})).unwrap();
        assert_eq!((b.error.as_str(), b.known_code()), ("m", None));
    }

    #[test]
    fn queries() {
        let q = UnlockQuery { lock_id: None, force: true, by: Some("a b&c=d".into()) };
        assert_eq!(q.pairs(), vec![("force", "true".to_owned()), ("by", "a b&c=d".to_owned())]);
        let q = UnlockQuery { lock_id: Some("ab".into()), ..UnlockQuery::default() };
        assert_eq!(q.pairs(), vec![("lock_id", "ab".to_owned())]);
        assert_eq!(LockIdQuery { lock_id: Some("ab".into()) }.pairs(), vec![("lock_id", "ab".to_owned())]);
        assert_eq!(DeleteQuery { client_id: Some("c".into()) }.pairs(), vec![("client_id", "c".to_owned())]);
        assert!(DeleteQuery::default().pairs().is_empty());
    }

    #[test]
    fn tag_lists() {
        let tags = [Tag([1; 32]), Tag([2; 32])];
        let body = encode_tags(&tags);
        assert_eq!(body.len(), 64);
        assert_eq!(decode_tags(&body).unwrap(), tags);
        assert_eq!(decode_tags(&body[..63]), None);
        assert_eq!(decode_tags(&[]).unwrap(), vec![]);
    }
}
