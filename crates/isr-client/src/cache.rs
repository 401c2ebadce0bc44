//! The local chunk cache: encrypted chunks as fetched, named by tag, shared by every parcel of the client.
//! Nothing in it is plaintext; chunks get here through [`crate::source`]'s stack; a chunk is only usable with its key from a keyring sealed under a keyroot.
//!
//! A transient run (`isr resume --transient`) adds an *overlay*: a store of its own, in its private
//! directory, that takes every chunk the run makes (the guest's writes) and is searched before the shared
//! cache. Fetched chunks still go to the shared cache (ciphertext verified by tag, useful later); nothing the
//! run made outlives it, because the overlay goes with the private directory.

use crate::error::ClientError;
use bytes::Bytes;
use isr_format::Tag;
use isr_store::{ChunkStore, Durability, FsChunkStore};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct ChunkCache {
    /// For fetched chunks: a crash can only lose a chunk that is still on the server.
    fetched: FsChunkStore,
    /// For chunks made by this client (dirty data): fsynced before any keyring refers to them.
    durable: FsChunkStore,
    /// A transient run's store for the chunks it makes (searched first; never fsynced: thrown away).
    overlay: Option<FsChunkStore>,
}

impl ChunkCache {
    pub fn open(dir: &Path) -> Result<ChunkCache, ClientError> {
        Ok(ChunkCache {
            fetched: FsChunkStore::open(dir, Durability::Rename)?,
            durable: FsChunkStore::open(dir, Durability::Fsync)?,
            overlay: None,
        })
    }

    /// The cache of `dir` with the overlay `overlay` (created if missing) for every chunk made through it.
    pub fn with_overlay(dir: &Path, overlay: &Path) -> Result<ChunkCache, ClientError> {
        let mut c = ChunkCache::open(dir)?;
        c.overlay = Some(FsChunkStore::open(overlay, Durability::Rename)?);
        Ok(c)
    }

    /// Where the stored bytes of `tag` are: the overlay's copy if it has one, else the shared cache's path.
    fn path_of(&self, tag: &Tag) -> std::path::PathBuf {
        if let Some(o) = &self.overlay {
            let p = o.path_of(tag);
            if p.exists() {
                return p;
            }
        }
        self.fetched.path_of(tag)
    }

    pub fn store(&self) -> &FsChunkStore {
        &self.fetched
    }

    /// The stored bytes of `tag` if cached. Not verified here: decoding verifies the tag.
    pub async fn get(&self, tag: &Tag) -> Result<Option<Bytes>, ClientError> {
        if let Some(o) = &self.overlay {
            if let Some(b) = o.get(tag).await? {
                return Ok(Some(b));
            }
        }
        Ok(self.fetched.get(tag).await?)
    }

    pub async fn contains(&self, tag: &Tag) -> Result<bool, ClientError> {
        if let Some(o) = &self.overlay {
            if o.contains(tag).await? {
                return Ok(true);
            }
        }
        Ok(self.fetched.contains(tag).await?)
    }

    /// Keep a chunk fetched from the server (already verified against its tag).
    pub async fn put_fetched(&self, tag: &Tag, stored: Bytes) -> Result<(), ClientError> {
        self.fetched.put(tag, stored).await?;
        Ok(())
    }

    /// Keep a chunk this client made, durably (with an overlay: there, for the run only).
    pub async fn put_durable(&self, tag: &Tag, stored: Bytes) -> Result<(), ClientError> {
        match &self.overlay {
            Some(o) => o.put(tag, stored).await?,
            None => self.durable.put(tag, stored).await?,
        };
        Ok(())
    }

    /// Blocking read of a cached chunk's stored bytes (for use inside `spawn_blocking`, next to the decode).
    pub fn read_blocking(&self, tag: &Tag) -> Result<Option<Vec<u8>>, ClientError> {
        let path = self.path_of(tag);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ClientError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Blocking open of a cached chunk's file and its length, for callers that read it into buffers of
    /// their own (not verified here either).
    pub fn open_blocking(&self, tag: &Tag) -> Result<Option<(std::fs::File, u64)>, ClientError> {
        let path = self.path_of(tag);
        let err = |e: std::io::Error| ClientError::io(format!("reading {}", path.display()), e);
        match std::fs::File::open(&path) {
            Ok(f) => {
                let len = f.metadata().map_err(err)?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    /// Whether `tag` is cached (in the overlay or the shared cache; blocking: one or two `stat`s).
    pub fn contains_blocking(&self, tag: &Tag) -> bool {
        self.path_of(tag).exists()
    }

    /// Drop a cached chunk (one that failed verification), so that it is fetched again.
    pub fn evict(&self, tag: &Tag) -> Result<(), ClientError> {
        let path = self.path_of(tag);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::warn!(%tag, "cached chunk failed verification: dropped, to be fetched again");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ClientError::io(format!("removing {}", path.display()), e)),
        }
    }
}
