//! The chunk store as the server uses it: the [`ChunkStore`] trait object plus what gc and the batched
//! endpoints need beyond it (ages of chunks, batched presence checks).

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use isr_format::Tag;
use isr_store::meta::{ChunkPresence, ChunkSweeper};
use isr_store::{ChunkStore, FsChunkStore, MetaError, StoreError, VerifyingStore};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Tags per blocking task in a batched presence check of a filesystem store.
const EXISTS_BATCH: usize = 2048;

#[derive(Clone, Debug)]
pub struct Chunks {
    store: Arc<dyn ChunkStore>,
    /// The underlying directory when the store is a [`FsChunkStore`] (fast paths, file ages).
    fs: Option<FsChunkStore>,
}

impl Chunks {
    /// A directory of chunk files, every chunk verified against its tag on the way in and out.
    pub fn fs(fs: FsChunkStore) -> Self {
        Chunks { store: Arc::new(VerifyingStore::new(fs.clone())), fs: Some(fs) }
    }

    /// Any other store (when it cannot tell a chunk's age, gc treats every unreferenced chunk as old enough;
    /// a commit that then misses a chunk is refused with the list, and the client uploads it again).
    pub fn other(store: Arc<dyn ChunkStore>) -> Self {
        Chunks { store, fs: None }
    }

    pub fn store(&self) -> &Arc<dyn ChunkStore> {
        &self.store
    }

    /// The directory of a filesystem store (its free space is what `prune_low_space_percent` watches).
    pub fn fs_root(&self) -> Option<&std::path::Path> {
        self.fs.as_ref().map(FsChunkStore::root)
    }

    /// A chunk for the GET hot path: from a filesystem store, the file as stored without re-hashing it here
    /// (every client verifies each chunk against its tag before use, and `check --full` re-hashes the
    /// store); other stores go through their own (verifying) `get`.
    pub async fn read(&self, tag: &Tag) -> Result<Option<Bytes>, StoreError> {
        match &self.fs {
            Some(fs) => fs.get(tag).await,
            None => self.store.get(tag).await,
        }
    }

    /// The tags of `tags` that the store lacks, in request order.
    pub async fn missing(&self, tags: &[Tag]) -> Result<Vec<Tag>, StoreError> {
        let present: Vec<bool> = match &self.fs {
            Some(fs) => {
                let batches: Vec<Vec<Tag>> = tags.chunks(EXISTS_BATCH).map(<[Tag]>::to_vec).collect();
                let results = futures::stream::iter(batches.into_iter().map(|batch| {
                    let fs = fs.clone();
                    async move {
                        tokio::task::spawn_blocking(move || {
                            batch.iter().map(|t| fs.path_of(t).exists()).collect::<Vec<bool>>()
                        })
                        .await
                        .map_err(|e| StoreError::Backend(format!("presence check failed: {e}")))
                    }
                }))
                .buffered(4)
                .try_collect::<Vec<_>>()
                .await?;
                results.into_iter().flatten().collect()
            }
            None => {
                futures::stream::iter(tags.iter().copied().map(|t| {
                    let store = self.store.clone();
                    async move { store.contains(&t).await }
                }))
                .buffered(64)
                .try_collect()
                .await?
            }
        };
        Ok(tags.iter().zip(present).filter(|(_, p)| !p).map(|(t, _)| *t).collect())
    }

    /// How long ago a chunk was written (or last re-uploaded); `None` when unknown or absent.
    pub async fn age(&self, tag: &Tag) -> Option<Duration> {
        self.store.age(tag).await
    }

    /// Marks an existing chunk as recently uploaded, so gc's grace period protects it like a new one.
    pub async fn touch(&self, tag: &Tag) {
        if let Some(fs) = &self.fs {
            let path = fs.path_of(tag);
            let _ = tokio::task::spawn_blocking(move || {
                std::fs::File::options()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_modified(SystemTime::now()))
            })
            .await;
        }
    }
}

#[async_trait]
impl ChunkPresence for Chunks {
    async fn missing(&self, tags: Vec<Tag>) -> Result<Vec<Tag>, MetaError> {
        Ok(Chunks::missing(self, &tags).await?)
    }
}

#[async_trait]
impl ChunkSweeper for Chunks {
    async fn delete(&self, tags: Vec<Tag>) -> Result<(), MetaError> {
        futures::stream::iter(tags.into_iter().map(|t| {
            let store = self.store.clone();
            async move { store.delete(&t).await }
        }))
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
        Ok(())
    }
}
