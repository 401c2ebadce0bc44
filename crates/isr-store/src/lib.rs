//! Chunk stores: a small async trait with backends (a directory of files, memory) and wrapping stores that
//! add behaviour (tag verification). The server and the client share them.

pub mod chunk;

pub use chunk::{ChunkStore, Durability, FsChunkStore, MemChunkStore, StoreError, VerifyingStore};
