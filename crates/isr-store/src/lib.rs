//! Chunk stores: a small async trait with backends (a directory of files, memory) and wrapping stores that
//! add behaviour (tag verification). The server and the client share them.

pub mod chunk;

pub use chunk::{ChunkStore, Durability, FsChunkStore, MemChunkStore, StoreError, VerifyingStore};
pub mod meta;
pub mod meta_sqlite;
pub(crate) mod meta_tx;
pub(crate) mod rules;
pub(crate) mod sql;

pub use meta::{MetaError, MetaStore, NetworkPolicy};
pub use meta_sqlite::SqliteMetaStore;
pub mod chunk_s3;
pub mod meta_pg;

pub use chunk_s3::S3ChunkStore;
pub use meta_pg::PgMetaStore;
/// The object store crate behind [`S3ChunkStore`] (for callers that configure or inspect the bucket).
pub use object_store;
