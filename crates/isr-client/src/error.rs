//! Client errors, each mapped to an exit code of the user contract.

use isr_format::{ChunkError, KeyError, KeyringError, ManifestError, Tag};

/// How a lock was lost, as the server recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockLoss {
    pub message: String,
    /// Who broke it (a client's name or the administrator); empty when the server has no record.
    pub broken_by: String,
    pub broken_unix: i64,
    /// Who holds the lock now, and since when.
    pub holder_now: Option<(String, i64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    /// Another client holds the parcel's lock.
    #[error("{0}")]
    Locked(String),
    /// The lock this client held was broken (or released) behind its back: local changes are kept.
    #[error("{}", .0.message)]
    LockLost(LockLoss),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("integrity check failed: {0}")]
    Integrity(String),
    #[error("cannot reach the server at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("server error: {0}")]
    Server(String),
    /// The server refused the request as it is (too large, malformed, not allowed): asking again gets
    /// the same answer.
    #[error("the server refused the request: {0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    StaleBase(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{0}")]
    Other(String),
}

impl ClientError {
    /// The process exit code for this error (see SPEC.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Usage(_) => 2,
            ClientError::Locked(_) | ClientError::LockLost(_) => 3,
            ClientError::Auth(_) => 4,
            ClientError::Integrity(_) => 5,
            ClientError::Unreachable { .. } => 6,
            _ => 1,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ClientError::Io { context: context.into(), source }
    }

    /// Worth trying again after a pause: the server could not be reached or failed on its side. Anything
    /// else (a refusal, data failing its check) gives the same answer again.
    pub fn is_transient(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. } | ClientError::Server(_))
    }

    /// The same error for another waiter on one shared operation (same kind, same exit code, same message).
    pub fn shared(e: &ClientError) -> Self {
        match e {
            ClientError::Usage(m) => ClientError::Usage(m.clone()),
            ClientError::Locked(m) => ClientError::Locked(m.clone()),
            ClientError::LockLost(l) => ClientError::LockLost(l.clone()),
            ClientError::Auth(m) => ClientError::Auth(m.clone()),
            ClientError::Integrity(m) => ClientError::Integrity(m.clone()),
            ClientError::Unreachable { url, detail } => {
                ClientError::Unreachable { url: url.clone(), detail: detail.clone() }
            }
            ClientError::Server(m) => ClientError::Server(m.clone()),
            ClientError::Refused(m) => ClientError::Refused(m.clone()),
            ClientError::NotFound(m) => ClientError::NotFound(m.clone()),
            ClientError::Exists(m) => ClientError::Exists(m.clone()),
            ClientError::StaleBase(m) => ClientError::StaleBase(m.clone()),
            ClientError::Io { context, source } => ClientError::Io {
                context: context.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            ClientError::Other(m) => ClientError::Other(m.clone()),
        }
    }

    pub fn chunk(tag: &Tag, e: ChunkError) -> Self {
        ClientError::Integrity(format!("chunk {tag}: {e}"))
    }
}

impl From<KeyringError> for ClientError {
    fn from(e: KeyringError) -> Self {
        ClientError::Integrity(e.to_string())
    }
}

impl From<ManifestError> for ClientError {
    fn from(e: ManifestError) -> Self {
        match e {
            ManifestError::Body(m) => ClientError::Other(format!("invalid VM description: {m}")),
            other => ClientError::Integrity(other.to_string()),
        }
    }
}

impl From<KeyError> for ClientError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::UnwrapFailed => ClientError::Auth(
                "the parcel key could not be unwrapped with this password: if an administrator reset your \
                 password, run `isr passwd` with ISR_PASSWORD set to your previous password and ISR_NEW_PASSWORD \
                 to the current one"
                    .into(),
            ),
            other => ClientError::Integrity(other.to_string()),
        }
    }
}

impl From<isr_store::StoreError> for ClientError {
    fn from(e: isr_store::StoreError) -> Self {
        match e {
            isr_store::StoreError::Integrity { .. } => ClientError::Integrity(e.to_string()),
            other => ClientError::Other(other.to_string()),
        }
    }
}

impl From<crate::runtime::RuntimeError> for ClientError {
    fn from(e: crate::runtime::RuntimeError) -> Self {
        use crate::runtime::RuntimeError as R;
        match e {
            R::Io { what, source } => ClientError::Io { context: what, source },
            R::Corrupt { .. } | R::WrongKey { .. } => ClientError::Integrity(e.to_string()),
            R::Busy { .. } | R::Geometry { .. } => ClientError::Other(e.to_string()),
        }
    }
}
