//! Content-addressed chunk stores keyed by [`Tag`].

use async_trait::async_trait;
use bytes::Bytes;
use isr_format::codec::{verify_tag, ChunkError};
use isr_format::Tag;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk store I/O error at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("chunk {tag} failed verification: {source}")]
    Integrity { tag: Tag, source: ChunkError },
    #[error("chunk store backend error: {0}")]
    Backend(String),
}

impl StoreError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::Io { path: path.to_owned(), source }
    }
}

/// A content-addressed store of encoded chunks. Implementations must be safe to share between tasks and
/// processes: `put` of an existing tag is harmless (same tag, same bytes) and a reader never sees a partial
/// chunk.
#[async_trait]
pub trait ChunkStore: Send + Sync + std::fmt::Debug + 'static {
    /// Store `data` under `tag`. Returns true if it was not stored before.
    async fn put(&self, tag: &Tag, data: Bytes) -> Result<bool, StoreError>;
    /// The chunk, or `None` when absent.
    async fn get(&self, tag: &Tag) -> Result<Option<Bytes>, StoreError>;
    async fn contains(&self, tag: &Tag) -> Result<bool, StoreError>;
    /// Remove a chunk; absent chunks are not an error.
    async fn delete(&self, tag: &Tag) -> Result<(), StoreError>;
    /// Every stored tag with its size in bytes.
    async fn list(&self) -> Result<Vec<(Tag, u64)>, StoreError>;
    /// How long ago the chunk was written, when the backend knows (gc spares young chunks: they may belong
    /// to a commit still in progress).
    async fn age(&self, _tag: &Tag) -> Option<std::time::Duration> {
        None
    }
}

#[async_trait]
impl<S: ChunkStore + ?Sized> ChunkStore for Arc<S> {
    async fn put(&self, tag: &Tag, data: Bytes) -> Result<bool, StoreError> {
        (**self).put(tag, data).await
    }
    async fn get(&self, tag: &Tag) -> Result<Option<Bytes>, StoreError> {
        (**self).get(tag).await
    }
    async fn contains(&self, tag: &Tag) -> Result<bool, StoreError> {
        (**self).contains(tag).await
    }
    async fn delete(&self, tag: &Tag) -> Result<(), StoreError> {
        (**self).delete(tag).await
    }
    async fn list(&self) -> Result<Vec<(Tag, u64)>, StoreError> {
        (**self).list().await
    }
    async fn age(&self, tag: &Tag) -> Option<std::time::Duration> {
        (**self).age(tag).await
    }
}

/// Temp files older than this are leftovers of a crashed writer.
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// How hard [`FsChunkStore::put`] works to make a chunk durable before it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file before the rename and the directory after it: the chunk survives power loss.
    Fsync,
    /// Write and rename only: atomic (never a partial chunk), durable once the OS writes back or
    /// [`FsChunkStore::sync`] (or [`FsChunkStore::sync_all`]) runs (the client's cache of fetched chunks).
    Rename,
    /// As [`Durability::Rename`], and each file's write-back starts at once without being waited for. The
    /// server's mode: a commit makes its chunks durable in one [`FsChunkStore::sync`] before its
    /// transaction, and by then the disk has written most of them.
    Batched,
}

impl Durability {
    /// Whether a chunk put is durable only after [`FsChunkStore::sync`] (or the OS's own write-back).
    pub fn needs_sync(self) -> bool {
        matches!(self, Durability::Rename | Durability::Batched)
    }
}

/// Chunks as files `DIR/ab/abcdef...` (first byte of the tag as a fan-out directory), written to
/// `DIR/tmp/` first and renamed into place. Private to the owner: directories 0700, files 0600, set
/// explicitly (whatever the umask).
#[derive(Debug, Clone)]
pub struct FsChunkStore {
    root: PathBuf,
    durability: Durability,
    /// How many times [`FsChunkStore::sync`] ran (tests check that a commit syncs).
    syncs: Arc<std::sync::atomic::AtomicU64>,
}

impl FsChunkStore {
    pub fn open(root: impl Into<PathBuf>, durability: Durability) -> Result<Self, StoreError> {
        let root = root.into();
        let tmp = root.join("tmp");
        create_private_dir(&root)?;
        create_private_dir(&tmp)?;
        // Stores made before directories were private: tighten the fan-out directories too (files inside
        // are unreachable through the private root either way).
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                if e.file_name().len() == 2 && e.file_type().is_ok_and(|t| t.is_dir()) {
                    set_mode(&e.path(), PRIVATE_DIR)?;
                }
            }
        }
        // Leftovers of writes interrupted by a crash were never renamed, so never visible. Remove those old
        // enough that no live writer (another process sharing the store) can still be working on them.
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let stale = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_TEMP_AGE);
                if stale {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(FsChunkStore { root, durability, syncs: Arc::default() })
    }

    /// Makes every chunk written so far durable, by whichever process wrote it: `syncfs(2)` of the file
    /// system the store is on, which writes back the data of every file and the directory entries of every
    /// rename there (one journal commit), and reports write-back errors (Linux 5.8 and later).
    pub fn sync(&self) -> Result<(), StoreError> {
        use std::os::fd::AsRawFd;
        let dir = std::fs::File::open(&self.root).map_err(|e| StoreError::io(&self.root, e))?;
        // SAFETY: syncfs takes a file descriptor and nothing else; `dir` keeps it open for the call.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
        if rc != 0 {
            return Err(StoreError::io(&self.root, std::io::Error::last_os_error()));
        }
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// How many times [`FsChunkStore::sync`] has run on this store (and its clones).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path_of(&self, tag: &Tag) -> PathBuf {
        let hex = tag.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    fn put_blocking(&self, tag: &Tag, data: &[u8]) -> Result<bool, StoreError> {
        let dest = self.path_of(tag);
        if dest.exists() {
            return Ok(false);
        }
        let dir = dest.parent().expect("chunk paths have a parent");
        if !dir.is_dir() {
            create_private_dir(dir)?;
        }
        let tmp = self.root.join("tmp").join(format!("{}.{:016x}", tag.to_hex(), rand_u64()));
        let mut f = create_private_file(&tmp)?;
        let written = f.write_all(data).and_then(|_| match self.durability {
            Durability::Fsync => f.sync_data(),
            Durability::Batched => {
                start_writeback(&f);
                Ok(())
            }
            Durability::Rename => Ok(()),
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(StoreError::io(&tmp, e));
        }
        drop(f);
        std::fs::rename(&tmp, &dest).map_err(|e| StoreError::io(&dest, e))?;
        if self.durability == Durability::Fsync {
            sync_dir(dir)?;
        }
        Ok(true)
    }

    /// fsync every chunk file and directory (after a batch of [`Durability::Rename`] puts).
    pub fn sync_all(&self) -> Result<(), StoreError> {
        for dir in std::fs::read_dir(&self.root).map_err(|e| StoreError::io(&self.root, e))?.flatten() {
            let path = dir.path();
            if !path.is_dir() || dir.file_name() == "tmp" {
                continue;
            }
            for f in std::fs::read_dir(&path).map_err(|e| StoreError::io(&path, e))?.flatten() {
                let p = f.path();
                std::fs::File::open(&p).and_then(|f| f.sync_data()).map_err(|e| StoreError::io(&p, e))?;
            }
            sync_dir(&path)?;
        }
        sync_dir(&self.root)
    }

    fn list_blocking(&self) -> Result<Vec<(Tag, u64)>, StoreError> {
        let mut out = Vec::new();
        for dir in std::fs::read_dir(&self.root).map_err(|e| StoreError::io(&self.root, e))?.flatten() {
            if dir.file_name().len() != 2 || !dir.path().is_dir() {
                continue;
            }
            let path = dir.path();
            for f in std::fs::read_dir(&path).map_err(|e| StoreError::io(&path, e))?.flatten() {
                let name = f.file_name();
                if let Some(tag) = name.to_str().and_then(Tag::from_hex) {
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    out.push((tag, len));
                }
            }
        }
        Ok(out)
    }
}

/// Mode of every directory of a [`FsChunkStore`].
pub const PRIVATE_DIR: u32 = 0o700;
/// Mode of every file of a [`FsChunkStore`].
pub const PRIVATE_FILE: u32 = 0o600;

fn set_mode(path: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| StoreError::io(path, e))
}

/// Creates `dir` (and missing parents, which the caller owns the mode of) as a 0700 directory; an existing one
/// is set to 0700. Racing creators are fine.
pub fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR)
        .create(dir)
        .map_err(|e| StoreError::io(dir, e))?;
    // The umask may have taken bits off: set the mode explicitly.
    set_mode(dir, PRIVATE_DIR)
}

/// A new file, mode 0600 whatever the umask.
fn create_private_file(path: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .open(path)
        .map_err(|e| StoreError::io(path, e))?;
    f.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE)).map_err(|e| StoreError::io(path, e))?;
    Ok(f)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StoreError::io(dir, e))
}

fn rand_u64() -> u64 {
    u64::from_le_bytes(isr_format::random_bytes())
}

/// Starts writing a new chunk file's pages to disk without waiting for it (`sync_file_range(2)` with
/// `SYNC_FILE_RANGE_WRITE`): the disk works while more chunks arrive, so the commit's `syncfs` that makes
/// them durable finds little left to write. Only a hint: its failure changes nothing (the sync reports
/// write-back errors).
fn start_writeback(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range takes a file descriptor and integers; `f` keeps the descriptor open.
    #[allow(unsafe_code)]
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
}

/// A chunk file's bytes, or `None` when there is no such file. Blocking.
fn read_chunk_file(path: &Path) -> Result<Option<Bytes>, StoreError> {
    match std::fs::read(path) {
        Ok(v) => Ok(Some(Bytes::from(v))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(path, e)),
    }
}

impl FsChunkStore {
    /// The stored bytes of each of `tags`, in order, read one after the other on one blocking thread (a
    /// batched fetch: one hop for many small reads from the page cache, not one each).
    pub async fn get_many(
        &self,
        tags: Vec<Tag>,
    ) -> Result<Vec<Result<Option<Bytes>, StoreError>>, StoreError> {
        let s = self.clone();
        blocking(move || Ok(tags.iter().map(|tag| read_chunk_file(&s.path_of(tag))).collect())).await
    }
}

#[async_trait]
impl ChunkStore for FsChunkStore {
    async fn put(&self, tag: &Tag, data: Bytes) -> Result<bool, StoreError> {
        let (s, tag) = (self.clone(), *tag);
        blocking(move || s.put_blocking(&tag, &data)).await
    }

    async fn get(&self, tag: &Tag) -> Result<Option<Bytes>, StoreError> {
        let path = self.path_of(tag);
        blocking(move || read_chunk_file(&path)).await
    }

    async fn contains(&self, tag: &Tag) -> Result<bool, StoreError> {
        let path = self.path_of(tag);
        blocking(move || Ok(path.exists())).await
    }

    async fn delete(&self, tag: &Tag) -> Result<(), StoreError> {
        let path = self.path_of(tag);
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(&path, e)),
        })
        .await
    }

    async fn list(&self) -> Result<Vec<(Tag, u64)>, StoreError> {
        let s = self.clone();
        blocking(move || s.list_blocking()).await
    }

    async fn age(&self, tag: &Tag) -> Option<std::time::Duration> {
        let path = self.path_of(tag);
        tokio::task::spawn_blocking(move || std::fs::metadata(path).ok()?.modified().ok()?.elapsed().ok())
            .await
            .ok()
            .flatten()
    }
}

/// Chunks in memory, for tests.
#[derive(Debug, Default, Clone)]
pub struct MemChunkStore {
    chunks: Arc<RwLock<HashMap<Tag, Bytes>>>,
}

impl MemChunkStore {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn len(&self) -> usize {
        self.chunks.read().expect("lock").len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Replace a stored chunk's bytes (for corruption tests).
    pub fn corrupt(&self, tag: &Tag, data: Bytes) {
        self.chunks.write().expect("lock").insert(*tag, data);
    }
}

#[async_trait]
impl ChunkStore for MemChunkStore {
    async fn put(&self, tag: &Tag, data: Bytes) -> Result<bool, StoreError> {
        let mut m = self.chunks.write().expect("lock");
        if m.contains_key(tag) {
            return Ok(false);
        }
        m.insert(*tag, data);
        Ok(true)
    }
    async fn get(&self, tag: &Tag) -> Result<Option<Bytes>, StoreError> {
        Ok(self.chunks.read().expect("lock").get(tag).cloned())
    }
    async fn contains(&self, tag: &Tag) -> Result<bool, StoreError> {
        Ok(self.chunks.read().expect("lock").contains_key(tag))
    }
    async fn delete(&self, tag: &Tag) -> Result<(), StoreError> {
        self.chunks.write().expect("lock").remove(tag);
        Ok(())
    }
    async fn list(&self) -> Result<Vec<(Tag, u64)>, StoreError> {
        Ok(self.chunks.read().expect("lock").iter().map(|(t, b)| (*t, b.len() as u64)).collect())
    }
}

/// Wraps a store so that every chunk written or read is checked against its tag: a store never accepts
/// bytes under the wrong name, and a corrupted file is reported as an integrity error, never returned.
#[derive(Debug, Clone)]
pub struct VerifyingStore<S> {
    inner: S,
}

impl<S> VerifyingStore<S> {
    pub fn new(inner: S) -> Self {
        VerifyingStore { inner }
    }
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

#[async_trait]
impl<S: ChunkStore> ChunkStore for VerifyingStore<S> {
    async fn put(&self, tag: &Tag, data: Bytes) -> Result<bool, StoreError> {
        verify_tag(tag, &data).map_err(|source| StoreError::Integrity { tag: *tag, source })?;
        self.inner.put(tag, data).await
    }
    async fn get(&self, tag: &Tag) -> Result<Option<Bytes>, StoreError> {
        match self.inner.get(tag).await? {
            Some(data) => {
                verify_tag(tag, &data).map_err(|source| StoreError::Integrity { tag: *tag, source })?;
                Ok(Some(data))
            }
            None => Ok(None),
        }
    }
    async fn contains(&self, tag: &Tag) -> Result<bool, StoreError> {
        self.inner.contains(tag).await
    }
    async fn delete(&self, tag: &Tag) -> Result<(), StoreError> {
        self.inner.delete(tag).await
    }
    async fn list(&self) -> Result<Vec<(Tag, u64)>, StoreError> {
        self.inner.list().await
    }
    async fn age(&self, tag: &Tag) -> Option<std::time::Duration> {
        self.inner.age(tag).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isr_format::{ChunkEncoder, ConvergenceSecret};

    fn chunk(seed: u8) -> (Tag, Bytes) {
        let data = vec![seed; 8192];
        let e = ChunkEncoder::new(ConvergenceSecret([1; 32])).encode(&data).unwrap().unwrap();
        (e.tag, Bytes::from(e.stored))
    }

    async fn exercise(store: &dyn ChunkStore) {
        let (t1, c1) = chunk(1);
        let (t2, c2) = chunk(2);
        assert!(store.put(&t1, c1.clone()).await.unwrap());
        assert!(!store.put(&t1, c1.clone()).await.unwrap());
        assert!(store.put(&t2, c2.clone()).await.unwrap());
        assert_eq!(store.get(&t1).await.unwrap().unwrap(), c1);
        assert!(store.contains(&t2).await.unwrap());
        let mut listed = store.list().await.unwrap();
        listed.sort();
        let mut want = vec![(t1, c1.len() as u64), (t2, c2.len() as u64)];
        want.sort();
        assert_eq!(listed, want);
        store.delete(&t2).await.unwrap();
        store.delete(&t2).await.unwrap();
        assert!(store.get(&t2).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn fs_store_behaves() {
        let dir = tempfile::tempdir().unwrap();
        exercise(&FsChunkStore::open(dir.path(), Durability::Fsync).unwrap()).await;
        let s = FsChunkStore::open(dir.path(), Durability::Rename).unwrap();
        s.sync_all().unwrap();
        assert_eq!(s.syncs(), 0);
        let (t3, c3) = chunk(3);
        s.put(&t3, c3).await.unwrap();
        s.clone().sync().unwrap();
        assert_eq!(s.syncs(), 1, "clones share the counter");
    }

    #[tokio::test]
    async fn mem_store_behaves() {
        exercise(&MemChunkStore::new()).await;
    }

    #[tokio::test]
    async fn verifying_store_refuses_wrong_bytes_and_reports_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FsChunkStore::open(dir.path(), Durability::Rename).unwrap();
        let store = VerifyingStore::new(fs.clone());
        let (t1, c1) = chunk(1);
        let (_, c2) = chunk(2);
        assert!(matches!(store.put(&t1, c2).await, Err(StoreError::Integrity { .. })));
        assert!(!fs.contains(&t1).await.unwrap());
        store.put(&t1, c1.clone()).await.unwrap();
        let mut bad = c1.to_vec();
        bad[20] ^= 1;
        std::fs::write(fs.path_of(&t1), &bad).unwrap();
        assert!(matches!(store.get(&t1).await, Err(StoreError::Integrity { .. })));
    }

    #[tokio::test]
    async fn leftover_temp_files_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        FsChunkStore::open(dir.path(), Durability::Rename).unwrap();
        let partial = dir.path().join("tmp/partial");
        std::fs::write(&partial, b"half a chunk").unwrap();
        std::fs::write(dir.path().join("tmp/in-progress"), b"another writer").unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options().write(true).open(&partial).unwrap().set_modified(old).unwrap();
        let s = FsChunkStore::open(dir.path(), Durability::Rename).unwrap();
        assert!(s.list().await.unwrap().is_empty());
        assert!(!partial.exists());
        assert!(dir.path().join("tmp/in-progress").exists());
    }
}
