//! isr-wire: the contract of the HTTP API (`docs/api.md`), one definition used by `isr-server` and the
//! client.
//!
//! - [`types`]: the JSON request and reply bodies, query strings, the error body, binary tag lists.
//! - [`fetch`]: the framed answer of `chunks/fetch` (writer's header, reader's incremental parser).
//! - [`codes`]: [`ErrorCode`], every documented error code with its status.
//! - [`limits`]: body sizes and counts the server enforces and the client stays within.
//! - [`routes`]: route patterns for the server's router, path builders for the client.
//! - [`names`]: validated names and ids ([`ParcelName`], [`UserName`], [`LockId`], ...), one rule each.
//!
//! It has no HTTP stack and no storage: the client links it without linking any server backend.

pub mod codes;
pub mod fetch;
pub mod limits;
pub mod names;
pub mod routes;
pub mod types;

pub use codes::ErrorCode;
pub use names::{ClientId, DisplayText, InvalidName, LockId, ParcelName, UserName};
pub use routes::{ApiPath, VersionRef};
pub use types::*;
