//! Errors of the server library, and the JSON error answers of the API.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use isr_store::{MetaError, StoreError};
use isr_wire::{ErrorBody, ErrorCode};

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

/// An API error answer: the [`ErrorBody`] of `code`, with the status the code has (`isr_wire::ErrorCode`).
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    /// Boxed: handlers return `Result<_, ApiError>` everywhere, and the body is large.
    pub body: Box<ErrorBody>,
    /// Close the connection after answering (the request body was not read).
    pub close: bool,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, body: Box::new(ErrorBody::new(code, message)), close: false }
    }
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn unauthorized() -> Self {
        Self::new(ErrorCode::Unauthorized, "missing, invalid or expired bearer token")
    }
    pub fn no_such_parcel(name: &str) -> Self {
        Self::new(ErrorCode::NoSuchParcel, format!("no such parcel: {name}"))
    }
    pub fn too_large(limit: usize) -> Self {
        let mut e = Self::new(ErrorCode::TooLarge, format!("body larger than {limit} bytes"));
        e.close = true;
        e
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = (status, axum::Json(*self.body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.close {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

fn hex_list(tags: &[isr_format::Tag]) -> Option<Vec<String>> {
    Some(tags.iter().map(|t| t.to_hex()).collect())
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> Self {
        use ErrorCode as C;
        let msg = e.to_string();
        match e {
            MetaError::NoSuchParcel(_) => ApiError::new(C::NoSuchParcel, msg),
            MetaError::ParcelExists(_) => ApiError::new(C::ParcelExists, msg),
            MetaError::NoSuchVersion { .. } => ApiError::new(C::NoSuchVersion, msg),
            MetaError::Locked { parcel, lock } => {
                let mut e = ApiError::new(
                    C::Locked,
                    format!(
                        "parcel {parcel} is locked by {} since {}",
                        lock.holder,
                        crate::rfc3339(lock.since_unix)
                    ),
                );
                e.body.holder = Some(lock.holder);
                e.body.since_unix = Some(lock.since_unix);
                e
            }
            MetaError::LockMismatch(_) => ApiError::new(C::LockMismatch, msg),
            MetaError::LockBroken { parcel, broken, current } => {
                let mut e = ApiError::new(
                    C::LockBroken,
                    format!(
                        "your lock on {parcel} was broken by {} at {}",
                        broken.by,
                        crate::rfc3339(broken.unix)
                    ),
                );
                e.body.broken_by = Some(broken.by);
                e.body.broken_unix = Some(broken.unix);
                if let Some(held) = current {
                    e.body.holder = Some(held.holder);
                    e.body.since_unix = Some(held.since_unix);
                }
                e
            }
            MetaError::HasVersions(_) => ApiError::new(C::HasVersions, msg),
            MetaError::StaleBase { head, .. } => {
                let mut e = ApiError::new(C::StaleBase, msg);
                e.body.head = Some(head);
                e
            }
            MetaError::MissingKeyrings(ref k) => {
                let mut e = ApiError::new(C::MissingKeyring, msg);
                e.body.missing = hex_list(k);
                e
            }
            MetaError::MissingChunks(ref k) => {
                let mut e = ApiError::new(C::MissingChunks, msg);
                e.body.missing = hex_list(k);
                e
            }
            MetaError::UserExists(_) => ApiError::new(C::UserExists, msg),
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
            StoreError::Integrity { .. } => ApiError::new(ErrorCode::CorruptChunk, e.to_string()),
            other => ApiError::internal(other.to_string()),
        }
    }
}
