//! Chunk stores: a small async trait with backends (a directory of files, memory) and wrapping stores that
//! add behaviour (tag verification). The server and the client share them.
//!
//! The server's backends are features, all on by default: `sqlite` ([`SqliteMetaStore`]), `postgres`
//! ([`PgMetaStore`]) and `s3` ([`S3ChunkStore`]). The client depends on this crate without them, so the
//! `isr` binary links no database and no S3 client.

pub mod chunk;

pub use chunk::{ChunkStore, Durability, FsChunkStore, MemChunkStore, StoreError, VerifyingStore};
pub mod meta;
// The one implementation of the metadata rules exists for the SQL backends (dead code without either).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) mod meta_tx;
// Plain decision code, needed by every build (`meta` re-exports the prune policy).
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) mod rules;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) mod sql;

pub use meta::{MetaError, MetaStore, NetworkPolicy};

#[cfg(feature = "sqlite")]
pub mod meta_sqlite;
#[cfg(feature = "sqlite")]
pub use meta_sqlite::SqliteMetaStore;

#[cfg(feature = "postgres")]
pub mod meta_pg;
#[cfg(feature = "postgres")]
pub use meta_pg::PgMetaStore;

#[cfg(feature = "s3")]
pub mod chunk_s3;
#[cfg(feature = "s3")]
pub use chunk_s3::S3ChunkStore;
/// The object store crate behind [`S3ChunkStore`] (for callers that configure or inspect the bucket).
#[cfg(feature = "s3")]
pub use object_store;
