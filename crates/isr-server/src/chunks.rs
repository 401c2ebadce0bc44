//! The chunk store as the server uses it: the [`ChunkStore`] trait object plus what gc, commits and the
//! batched endpoints need beyond it (ages of chunks, batched presence checks, durability once per commit,
//! the chunk index of stores that cannot answer presence cheaply).
//!
//! - **Chunk files** are written with [`isr_store::Durability::Batched`] (temp file + rename, write-back
//!   started, no fsync): a PUT is atomic but not yet durable. Before a commit's transaction,
//!   [`Chunks::make_durable`] syncs the store's file system once (`syncfs(2)`: every chunk any server
//!   process wrote, with the renames' directory entries); inside the transaction the commit's presence
//!   check syncs again only if a chunk it needs was renamed into place since (a rare race with another
//!   writer; then the second sync is short). So a version the server reports committed has every chunk
//!   durable; a chunk PUT and lost in a crash before any commit is simply missing again.
//! - **S3** answers presence from the metadata's chunk index ([`MetaStore::chunk_intent`]): `missing` is a
//!   few indexed queries instead of a request per tag. A PUT is durable when S3 acknowledges it.

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use isr_format::Tag;
use isr_store::meta::{ChunkPresence, ChunkSweeper};
use isr_store::{ChunkStore, FsChunkStore, MetaError, MetaStore, StoreError, VerifyingStore};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Tags per blocking task in a batched presence check of a filesystem store.
const EXISTS_BATCH: usize = 2048;
/// Rows per transaction when `check --repair` indexes chunks.
const REPAIR_BATCH: usize = 1000;
/// A chunk file whose inode changed later than this before a commit's sync began may have been renamed
/// after it (file times come from the kernel's coarse clock, which lags by a tick): the commit syncs again.
const SYNC_MARGIN: Duration = Duration::from_secs(1);

/// Where presence comes from.
#[derive(Clone, Debug)]
enum Index {
    /// The store itself (chunk files, or a store without an index).
    None,
    /// The metadata's chunk index, once [`Chunks::attach_index`] gave the metadata store.
    Wanted,
    Meta(Arc<dyn MetaStore>),
}

#[derive(Clone, Debug)]
pub struct Chunks {
    store: Arc<dyn ChunkStore>,
    /// The underlying directory when the store is a [`FsChunkStore`] (fast paths, file ages, syncs).
    fs: Option<FsChunkStore>,
    index: Index,
}

impl Chunks {
    /// A directory of chunk files, every chunk verified against its tag on the way in and out.
    pub fn fs(fs: FsChunkStore) -> Self {
        Chunks { store: Arc::new(VerifyingStore::new(fs.clone())), fs: Some(fs), index: Index::None }
    }

    /// Any other store, presence asked of the store itself (when it cannot tell a chunk's age, gc treats
    /// every unreferenced chunk as old enough; a commit that then misses a chunk is refused with the list,
    /// and the client uploads it again).
    pub fn other(store: Arc<dyn ChunkStore>) -> Self {
        Chunks { store, fs: None, index: Index::None }
    }

    /// A store whose presence is kept in the metadata's chunk index (S3); [`crate::Storage::from_stores`]
    /// attaches the metadata store.
    pub fn indexed(store: Arc<dyn ChunkStore>) -> Self {
        Chunks { store, fs: None, index: Index::Wanted }
    }

    /// Gives an [`Chunks::indexed`] store its metadata store (no-op for the others).
    pub fn attach_index(&mut self, meta: Arc<dyn MetaStore>) {
        if matches!(self.index, Index::Wanted) {
            self.index = Index::Meta(meta);
        }
    }

    fn index(&self) -> Option<&Arc<dyn MetaStore>> {
        match &self.index {
            Index::Meta(m) => Some(m),
            _ => None,
        }
    }

    /// Whether presence comes from the chunk index.
    pub fn is_indexed(&self) -> bool {
        self.index().is_some()
    }

    pub fn store(&self) -> &Arc<dyn ChunkStore> {
        &self.store
    }

    /// How many times the chunk files were synced (0 for other stores).
    pub fn syncs(&self) -> u64 {
        self.fs.as_ref().map_or(0, FsChunkStore::syncs)
    }

    /// Stores a chunk as a PUT does; true if it was new. Chunk files: written and renamed (durable at the
    /// next commit); an existing one is touched so gc's grace period protects it like a new one. Indexed
    /// stores: the chunk-index protocol of [`MetaStore::chunk_intent`] around the store's PUT.
    pub async fn put(&self, tag: &Tag, data: Bytes) -> Result<bool, MetaError> {
        let len = data.len() as u64;
        if let Some(meta) = self.index() {
            let indexed = meta.chunk_intent(&[*tag], crate::now_unix()).await?.contains(tag);
            let new = self.store.put(tag, data).await?;
            meta.chunk_stored(&[(*tag, len)]).await?;
            // New to the deployment if `missing` would have reported it, even when its object was there
            // (written before a crash that came before its row).
            return Ok(new || !indexed);
        }
        let new = self.store.put(tag, data).await?;
        if !new {
            self.touch(tag).await;
        }
        Ok(new)
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

    /// The stored bytes of each of `tags`, in order, as [`Self::read`] (a batched fetch): a filesystem
    /// store reads them on one blocking thread, any other store is asked for them concurrently. Each has its
    /// own result: one unreadable chunk fails only itself.
    pub async fn read_many(&self, tags: Vec<Tag>) -> Vec<Result<Option<Bytes>, StoreError>> {
        match &self.fs {
            Some(fs) => {
                let n = tags.len();
                fs.get_many(tags).await.unwrap_or_else(|e| {
                    let msg = e.to_string();
                    (0..n).map(|_| Err(StoreError::Backend(msg.clone()))).collect()
                })
            }
            None => futures::future::join_all(tags.iter().map(|t| self.store.get(t))).await,
        }
    }

    /// The tags of `tags` that the store lacks, in request order (`POST /chunks/missing`): from the chunk
    /// index when there is one.
    pub async fn missing(&self, tags: &[Tag]) -> Result<Vec<Tag>, MetaError> {
        if let Some(meta) = self.index() {
            let present = meta.chunks_indexed(tags).await?;
            return Ok(tags.iter().filter(|t| !present.contains(t)).copied().collect());
        }
        Ok(self.missing_in_store(tags).await?)
    }

    /// The tags of `tags` that the store itself lacks, whatever the index says (`check`): chunk files are
    /// looked up, an indexed store is listed once, other stores are asked per tag.
    pub async fn missing_in_store(&self, tags: &[Tag]) -> Result<Vec<Tag>, StoreError> {
        let present: Vec<bool> = match (&self.fs, self.index()) {
            (Some(fs), _) => fs_presence(fs, tags, None).await?.0,
            (None, Some(_)) => {
                let listed: HashSet<Tag> = self.store.list().await?.into_iter().map(|(t, _)| t).collect();
                tags.iter().map(|t| listed.contains(t)).collect()
            }
            (None, None) => {
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

    /// Makes every chunk written so far durable, before a commit's transaction: one `syncfs` of the chunk
    /// files' file system (nothing to do for other stores, whose PUTs are durable when acknowledged).
    /// Returns when the sync began, for [`Chunks::for_commit`].
    pub async fn make_durable(&self) -> Result<SystemTime, StoreError> {
        let began = SystemTime::now();
        if let Some(fs) = self.fs.clone().filter(|fs| fs.durability().needs_sync()) {
            tokio::task::spawn_blocking(move || fs.sync())
                .await
                .map_err(|e| StoreError::Backend(format!("chunk sync task failed: {e}")))??;
        }
        Ok(began)
    }

    /// The presence check of a commit whose chunks [`Chunks::make_durable`] synced from `synced_at` on.
    pub fn for_commit(&self, synced_at: SystemTime) -> CommitPresence<'_> {
        CommitPresence { chunks: self, synced_at }
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

    /// Compares the chunk index with a listing of the store (`isr-server check`); `None` for stores without
    /// an index. With `repair`, rebuilds it: present rows of absent chunks are removed, and listed chunks
    /// without a present row get one through the PUT protocol (a pending row first, then a second listing:
    /// only chunks still there become present, so a gc sweeping meanwhile cannot leave a row without its
    /// chunk).
    pub async fn check_index(&self, repair: bool) -> Result<Option<IndexCheck>, MetaError> {
        let Some(meta) = self.index() else { return Ok(None) };
        let listed: HashMap<Tag, u64> = self.store.list().await?.into_iter().collect();
        let rows = meta.chunk_index().await?;
        let present: HashSet<Tag> = rows.iter().filter(|(_, p, _)| *p).map(|(t, _, _)| *t).collect();
        let mut report = IndexCheck {
            listed: listed.len() as u64,
            rows: rows.len() as u64,
            stale: present.iter().filter(|t| !listed.contains_key(t)).copied().collect(),
            unindexed: listed.keys().filter(|t| !present.contains(t)).copied().collect(),
            repaired: false,
        };
        report.stale.sort();
        report.unindexed.sort();
        if repair {
            meta.chunk_index_forget(&report.stale).await?;
            for batch in report.unindexed.chunks(REPAIR_BATCH) {
                meta.chunk_intent(batch, crate::now_unix()).await?;
            }
            let relisted: HashMap<Tag, u64> = self.store.list().await?.into_iter().collect();
            let found: Vec<(Tag, u64)> =
                report.unindexed.iter().filter_map(|t| relisted.get(t).map(|n| (*t, *n))).collect();
            for batch in found.chunks(REPAIR_BATCH) {
                meta.chunk_stored(batch).await?;
            }
            report.repaired = true;
        }
        Ok(Some(report))
    }
}

/// What [`Chunks::check_index`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexCheck {
    /// Chunks the store listed.
    pub listed: u64,
    /// Rows of the index (present or pending).
    pub rows: u64,
    /// Rows that say present for a chunk the store lacks: `missing` would wrongly call them present.
    pub stale: Vec<Tag>,
    /// Listed chunks without a present row: `missing` reports them missing (harmless: clients upload them
    /// again), typically after a crash between a PUT and its row, or on a deployment older than the index.
    pub unindexed: Vec<Tag>,
    /// Whether the index was rebuilt from the listing.
    pub repaired: bool,
}

/// Presence of chunk files: per tag whether it is there, and whether any present one changed since `since`
/// (less [`SYNC_MARGIN`]).
async fn fs_presence(
    fs: &FsChunkStore,
    tags: &[Tag],
    since: Option<SystemTime>,
) -> Result<(Vec<bool>, bool), StoreError> {
    let since_ns = since.map(|t| {
        t.checked_sub(SYNC_MARGIN)
            .unwrap_or(SystemTime::UNIX_EPOCH)
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128)
    });
    let batches: Vec<Vec<Tag>> = tags.chunks(EXISTS_BATCH).map(<[Tag]>::to_vec).collect();
    let results = futures::stream::iter(batches.into_iter().map(|batch| {
        let fs = fs.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::MetadataExt;
                let mut recent = false;
                let present = batch
                    .iter()
                    .map(|t| match std::fs::symlink_metadata(fs.path_of(t)) {
                        Ok(m) => {
                            let ctime = i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec());
                            recent |= since_ns.is_some_and(|s| ctime >= s);
                            true
                        }
                        Err(_) => false,
                    })
                    .collect::<Vec<bool>>();
                (present, recent)
            })
            .await
            .map_err(|e| StoreError::Backend(format!("presence check failed: {e}")))
        }
    }))
    .buffered(4)
    .try_collect::<Vec<_>>()
    .await?;
    let recent = results.iter().any(|(_, r)| *r);
    Ok((results.into_iter().flat_map(|(p, _)| p).collect(), recent))
}

/// A commit's presence check ([`Chunks::for_commit`]), run inside its transaction.
#[derive(Debug)]
pub struct CommitPresence<'a> {
    chunks: &'a Chunks,
    synced_at: SystemTime,
}

#[async_trait]
impl ChunkPresence for CommitPresence<'_> {
    async fn missing(&self, tags: Vec<Tag>) -> Result<Vec<Tag>, MetaError> {
        let Some(fs) = &self.chunks.fs else { return self.chunks.missing(&tags).await };
        let (present, recent) = fs_presence(fs, &tags, Some(self.synced_at)).await?;
        let missing: Vec<Tag> = tags.iter().zip(&present).filter(|(_, p)| !**p).map(|(t, _)| *t).collect();
        if missing.is_empty() && recent && fs.durability().needs_sync() {
            // A chunk this commit needs may have been renamed into place after the sync began (another
            // writer re-creating one gc had removed): sync again before the version refers to it.
            self.chunks.make_durable().await?;
        }
        Ok(missing)
    }

    fn indexed(&self) -> bool {
        self.chunks.is_indexed()
    }
}

#[async_trait]
impl ChunkPresence for Chunks {
    async fn missing(&self, tags: Vec<Tag>) -> Result<Vec<Tag>, MetaError> {
        Chunks::missing(self, &tags).await
    }

    fn indexed(&self) -> bool {
        self.is_indexed()
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
