//! Errors of the server library, and the JSON error answers of the API.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use isr_store::{MetaError, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("configuration: {0}")]
    Config(String),
    /// The storage options name no deployment (and the command may not create one).
    #[error("{0}")]
    NoDeployment(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

/// An API error answer: `{"error": message, "code": code, ...extra}` with `status`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Close the connection after answering (the request body was not read).
    pub close: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), extra: serde_json::Map::new(), close: false }
    }
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing, invalid or expired bearer token")
    }
    pub fn no_such_parcel(name: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "no_such_parcel", format!("no such parcel: {name}"))
    }
    pub fn too_large(limit: usize) -> Self {
        let mut e =
            Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("body larger than {limit} bytes"));
        e.close = true;
        e
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.extra;
        body.insert("error".into(), self.message.into());
        body.insert("code".into(), self.code.into());
        let mut resp = (self.status, axum::Json(serde_json::Value::Object(body))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.close {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

fn hex_list(tags: &[isr_format::Tag]) -> serde_json::Value {
    tags.iter().map(|t| serde_json::Value::from(t.to_hex())).collect::<Vec<_>>().into()
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> Self {
        use StatusCode as S;
        let msg = e.to_string();
        match e {
            MetaError::NoSuchParcel(_) => ApiError::new(S::NOT_FOUND, "no_such_parcel", msg),
            MetaError::ParcelExists(_) => ApiError::new(S::CONFLICT, "parcel_exists", msg),
            MetaError::NoSuchVersion { .. } => ApiError::new(S::NOT_FOUND, "no_such_version", msg),
            MetaError::Locked { parcel, lock } => ApiError::new(
                S::CONFLICT,
                "locked",
                format!(
                    "parcel {parcel} is locked by {} since {}",
                    lock.holder,
                    crate::rfc3339(lock.since_unix)
                ),
            )
            .with("holder", lock.holder)
            .with("since_unix", lock.since_unix),
            MetaError::LockMismatch(_) => ApiError::new(S::CONFLICT, "lock_mismatch", msg),
            MetaError::LockBroken { parcel, broken, current } => {
                let mut e = ApiError::new(
                    S::CONFLICT,
                    "lock_broken",
                    format!(
                        "your lock on {parcel} was broken by {} at {}",
                        broken.by,
                        crate::rfc3339(broken.unix)
                    ),
                )
                .with("broken_by", broken.by)
                .with("broken_unix", broken.unix);
                if let Some(held) = current {
                    e = e.with("holder", held.holder).with("since_unix", held.since_unix);
                }
                e
            }
            MetaError::HasVersions(_) => ApiError::new(S::CONFLICT, "has_versions", msg),
            MetaError::StaleBase { head, .. } => {
                ApiError::new(S::CONFLICT, "stale_base", msg).with("head", head)
            }
            MetaError::MissingKeyrings(ref k) => {
                let list = hex_list(k);
                ApiError::new(S::BAD_REQUEST, "missing_keyring", msg).with("missing", list)
            }
            MetaError::MissingChunks(ref k) => {
                let list = hex_list(k);
                ApiError::new(S::CONFLICT, "missing_chunks", msg).with("missing", list)
            }
            MetaError::UserExists(_) => ApiError::new(S::CONFLICT, "user_exists", msg),
            MetaError::NoSuchUser(_) => ApiError::unauthorized(),
            MetaError::Invalid(_) => ApiError::bad_request(msg),
            other => {
                tracing::error!(error = %other, "metadata error");
                ApiError::internal(other.to_string())
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "chunk store error");
        match e {
            StoreError::Integrity { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "corrupt_chunk", e.to_string())
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}
