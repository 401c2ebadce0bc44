//! A checked-out image (disk or memory) read and written in place.
//!
//! Reads find a chunk in memory, else decode it from the local cache, else fetch it from the server
//! (verified against the keyring; a chunk that cannot be fetched or verified fails the read, never returns
//! wrong data). Writes change decoded chunks in memory and mark them dirty. A flush encodes every dirty chunk
//! (convergent encryption, so nothing plaintext is written), stores it in the cache with fsync, and then
//! replaces the sealed working keyring atomically: after a crash the image is exactly the last flushed state.

use crate::cache::ChunkCache;
use crate::error::ClientError;
use crate::home::write_atomic;
use crate::source::{ChunkSources, SourceStats};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use isr_format::codec;
use isr_format::{
    ByteOffset, ChunkDecoder, ChunkEncoder, ChunkIndex, ChunkKey, ChunkSize, ConvergenceSecret, ImageLen,
    Keyring, Keyroot, Tag,
};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Decoded clean chunks kept in memory (dirty chunks are kept until flushed, whatever this says).
pub const DEFAULT_MEMORY_CACHE: usize = 256 << 20;
/// Dirty (unflushed) data kept in memory before a write forces a flush.
const MAX_DIRTY_BYTES: usize = 512 << 20;
const STRIPES: usize = 1024;
/// Chunks fetched ahead of a sequential reader (4 MiB at the default chunk size).
const READ_AHEAD: u64 = 32;
/// Chunks of one request decoded (or fetched) concurrently.
const READ_PARALLELISM: usize = 16;
const FLUSH_PARALLELISM: usize = 4;

thread_local! {
    static DECODER: std::cell::RefCell<ChunkDecoder> = std::cell::RefCell::new(ChunkDecoder::new());
    /// The stored bytes of a compressed chunk being decoded (reused: no allocation per chunk).
    static STORED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A zstd context per thread: creating one per chunk costs more than compressing a 128 KiB chunk.
    static ENCODER: std::cell::RefCell<Option<(ConvergenceSecret, ChunkEncoder)>> = const { std::cell::RefCell::new(None) };
}

fn encode_chunk(
    secret: &ConvergenceSecret,
    data: &[u8],
) -> Result<Option<isr_format::codec::EncodedChunk>, isr_format::codec::ChunkError> {
    ENCODER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(s, _)| s != secret) {
            *cell = Some((secret.clone(), ChunkEncoder::new(secret.clone())));
        }
        cell.as_mut().expect("just set").1.encode(data)
    })
}

/// Read chunk `tag` from the cache and verify and decode it straight into `out` (exactly the chunk's
/// length); `Ok(false)` when it is not cached. Blocking. An uncompressed chunk is read from its file directly
/// into `out` and decrypted there; a compressed one into a reused per-thread buffer, decrypted in place and
/// decompressed into `out`. On an error `out` holds garbage and must not be returned.
fn decode_cached_into(
    cache: &ChunkCache,
    tag: &Tag,
    key: &ChunkKey,
    out: &mut [u8],
) -> Result<bool, ClientError> {
    use std::io::Read;
    let Some((mut file, size)) = cache.open_blocking(tag)? else {
        return Ok(false);
    };
    let io = |e: std::io::Error| ClientError::io(format!("reading chunk {tag} from the cache"), e);
    let bad = |e: codec::ChunkError| ClientError::chunk(tag, e);
    let mut header = [0u8; codec::HEADER_LEN];
    let raw_size = codec::raw_stored_len(out.len()) as u64;
    if size == raw_size {
        file.read_exact(&mut header).map_err(io)?;
        if header[6] == codec::COMPRESSION_NONE {
            let mut gcm_tag = [0u8; codec::AEAD_TAG_LEN];
            file.read_exact(out).map_err(io)?;
            file.read_exact(&mut gcm_tag).map_err(io)?;
            codec::decode_raw_in_place(tag, key, &header, out, &gcm_tag).map_err(bad)?;
            return Ok(true);
        }
    }
    STORED.with(|stored| {
        let mut stored = stored.borrow_mut();
        stored.clear();
        if size == raw_size {
            stored.extend_from_slice(&header);
        }
        // Never buffer more than one byte past the largest valid chunk: the decoder rejects it by its size.
        let limit = (codec::MAX_STORED + 1).saturating_sub(stored.len()) as u64;
        (&mut file).take(limit).read_to_end(&mut stored).map_err(io)?;
        DECODER.with(|d| d.borrow_mut().decode_in_place(tag, key, &mut stored, out)).map_err(bad)?;
        // The thread keeps its buffer, but not one far larger than this image's chunks.
        if stored.capacity() > 2 * out.len().max(256 << 10) {
            *stored = Vec::new();
        }
        Ok(true)
    })
}

struct Resident {
    data: Vec<u8>,
    last_use: u64,
}

struct State {
    keyring: Keyring,
    resident: HashMap<u64, Resident>,
    dirty: BTreeSet<u64>,
    clean_bytes: usize,
    clock: u64,
    last_read: Option<u64>,
}

/// Counters for `stat`, the dirtometer and tests.
#[derive(Debug, Default)]
pub struct ImageStats {
    /// Where fetched chunks came from (shared with every user of the same source stack).
    pub sources: Arc<SourceStats>,
    pub flushes: AtomicU64,
}

pub struct WorkingImage {
    chunk_size: ChunkSize,
    len: ImageLen,
    keyroot: Keyroot,
    base_tags: Vec<Tag>,
    work_path: PathBuf,
    cache: ChunkCache,
    sources: Arc<ChunkSources>,
    secret: ConvergenceSecret,
    state: Mutex<State>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Read-ahead has considered chunks up to here (exclusive), so it does not re-check them per request.
    ahead_mark: AtomicU64,
    memory_cache: usize,
    pub stats: Arc<ImageStats>,
}

impl std::fmt::Debug for WorkingImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkingImage").field("len", &self.len).field("work_path", &self.work_path).finish()
    }
}

fn eio(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl WorkingImage {
    /// `keyring` is the current working state (the working keyring if the image was modified, else the
    /// base); `base_tags` are the base version's tags, to tell whether the image is still unmodified.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        keyring: Keyring,
        base_tags: Vec<Tag>,
        keyroot: Keyroot,
        work_path: PathBuf,
        sources: Arc<ChunkSources>,
        secret: ConvergenceSecret,
        memory_cache: usize,
    ) -> WorkingImage {
        let stats = Arc::new(ImageStats { sources: sources.stats.clone(), ..Default::default() });
        let cache = sources.cache().clone();
        WorkingImage {
            chunk_size: keyring.chunk_size(),
            len: keyring.image_len(),
            keyroot,
            base_tags,
            work_path,
            cache,
            sources,
            secret,
            state: Mutex::new(State {
                keyring,
                resident: HashMap::new(),
                dirty: BTreeSet::new(),
                clean_bytes: 0,
                clock: 0,
                last_read: None,
            }),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            ahead_mark: AtomicU64::new(0),
            memory_cache,
            stats,
        }
    }

    pub fn len(&self) -> u64 {
        self.len.0
    }

    pub fn is_empty(&self) -> bool {
        self.len.0 == 0
    }

    pub fn chunk_size(&self) -> ChunkSize {
        self.chunk_size
    }

    fn stripe(&self, i: u64) -> &tokio::sync::Mutex<()> {
        &self.stripes[(i as usize) % STRIPES]
    }

    /// A snapshot of the working keyring (flushed and unflushed state alike are in memory).
    pub fn keyring(&self) -> Keyring {
        self.state.lock().expect("image state").keyring.clone()
    }

    /// How many chunks are dirty in memory (written, not yet flushed).
    pub fn dirty_chunks(&self) -> usize {
        self.state.lock().expect("image state").dirty.len()
    }

    fn check_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len.0) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("range {offset}+{len} beyond image of {} bytes", self.len.0),
            ));
        }
        Ok(())
    }

    /// Decode chunk `i` from the cache or the server; `None` for a zero chunk (nothing stored). The caller
    /// holds the chunk's stripe lock.
    async fn load(&self, i: u64) -> Result<Option<Vec<u8>>, ClientError> {
        let idx = ChunkIndex(i);
        let (entry, clen) = {
            let st = self.state.lock().expect("image state");
            (st.keyring.get(idx).map(|(t, k)| (t, k.clone())), st.keyring.chunk_len(idx))
        };
        let Some((tag, key)) = entry else {
            return Ok(None);
        };
        // From the cache: read and decode in one blocking step.
        let (cache, k) = (self.cache.clone(), key.clone());
        let cached = tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, ClientError> {
            let mut data = vec![0u8; clen];
            Ok(decode_cached_into(&cache, &tag, &k, &mut data)?.then_some(data))
        })
        .await
        .map_err(|e| ClientError::Other(format!("decode task: {e}")))?;
        match cached {
            Ok(Some(data)) => return Ok(Some(data)),
            Ok(None) => {}
            Err(e) => self.drop_bad_cached(&tag, e)?,
        }
        // From a lookaside directory or the server (joining a read-ahead fetch of the chunk if one is under way).
        let stored = self.sources.get(&tag).await?;
        tokio::task::spawn_blocking(move || {
            DECODER
                .with(|d| d.borrow_mut().decode(&tag, &key, &stored, clen))
                .map_err(|e| ClientError::chunk(&tag, e))
        })
        .await
        .map_err(|e| ClientError::Other(format!("decode task: {e}")))?
        .map(Some)
    }

    /// A cached chunk failed verification: when another source could have a good copy (the server, a lookaside
    /// directory), drop it so that the read fetches one (verified); else the read fails (never wrong data).
    fn drop_bad_cached(&self, tag: &Tag, e: ClientError) -> Result<(), ClientError> {
        match e {
            ClientError::Integrity(_) if self.sources.has_sources_below_cache() => self.cache.evict(tag),
            other => Err(other),
        }
    }

    /// Fetch the next chunks into the cache (encrypted) when reads are sequential.
    fn read_ahead(&self, from: u64) {
        if !self.sources.has_sources_below_cache() {
            return;
        }
        let mark = self.ahead_mark.load(Ordering::Relaxed);
        let start = if (from..from + READ_AHEAD).contains(&mark) { mark } else { from };
        let tags: Vec<(Tag, u64)> = {
            let st = self.state.lock().expect("image state");
            let end = (from + READ_AHEAD).min(st.keyring.chunk_count());
            self.ahead_mark.store(end.max(start), Ordering::Relaxed);
            (start..end)
                .filter(|i| !st.resident.contains_key(i))
                .filter_map(|i| st.keyring.get(ChunkIndex(i)).map(|(t, _)| t))
                .filter(|t| !self.sources.is_fetching(t))
                .map(|t| (t, 0))
                .collect()
        };
        if tags.is_empty() {
            return;
        }
        let sources = self.sources.clone();
        tokio::spawn(async move {
            // Started here, each runs to its end on its own (the coalescing layer spawns it).
            for (tag, _) in sources.not_cached(&tags).await {
                sources.start_fetch(tag);
            }
        });
    }

    fn evict_if_needed(&self, st: &mut State) {
        if st.clean_bytes <= self.memory_cache {
            return;
        }
        let mut clean: Vec<(u64, u64)> = st
            .resident
            .iter()
            .filter(|(i, _)| !st.dirty.contains(i))
            .map(|(i, r)| (r.last_use, *i))
            .collect();
        clean.sort_unstable();
        for (_, i) in clean {
            if st.clean_bytes <= self.memory_cache * 7 / 8 {
                break;
            }
            if let Some(r) = st.resident.remove(&i) {
                st.clean_bytes -= r.data.len();
            }
        }
    }

    fn insert_resident(&self, st: &mut State, i: u64, data: Vec<u8>) {
        st.clock += 1;
        st.clean_bytes += data.len();
        let last_use = st.clock;
        st.resident.insert(i, Resident { data, last_use });
        self.evict_if_needed(st);
    }

    /// Make chunk `i` resident; the caller holds its stripe lock.
    async fn ensure_resident(&self, i: u64) -> Result<(), ClientError> {
        if self.state.lock().expect("image state").resident.contains_key(&i) {
            return Ok(());
        }
        let clen = self.chunk_size.chunk_len(self.len, ChunkIndex(i));
        let data = self.load(i).await?.unwrap_or_else(|| vec![0u8; clen]);
        let mut st = self.state.lock().expect("image state");
        self.insert_resident(&mut st, i, data);
        Ok(())
    }

    /// Fill `piece` with bytes `start..start + piece.len()` of chunk `i`. A resident chunk is copied from
    /// memory. A whole chunk that is not resident is verified and decoded straight into `piece` and not kept
    /// in memory (a sequential reader does not come back for it; the encrypted chunk stays in the cache).
    /// Part of a chunk is copied from the decoded chunk, which is kept for the next small read.
    async fn read_piece(&self, i: u64, start: usize, mut piece: BytesMut) -> (BytesMut, std::io::Result<()>) {
        let _g = self.stripe(i).lock().await;
        let entry = {
            let mut st = self.state.lock().expect("image state");
            st.clock += 1;
            let clock = st.clock;
            if let Some(r) = st.resident.get_mut(&i) {
                r.last_use = clock;
                let n = piece.len();
                piece.copy_from_slice(&r.data[start..start + n]);
                return (piece, Ok(()));
            }
            st.keyring.get(ChunkIndex(i)).map(|(t, k)| (t, k.clone()))
        };
        let clen = self.chunk_size.chunk_len(self.len, ChunkIndex(i));
        if start != 0 || piece.len() != clen {
            let r = self.read_part(i, start, &mut piece).await;
            return (piece, r);
        }
        let Some((tag, key)) = entry else {
            piece.fill(0);
            return (piece, Ok(()));
        };
        let (cache, k) = (self.cache.clone(), key.clone());
        let (mut piece, cached) = match tokio::task::spawn_blocking(move || {
            let r = decode_cached_into(&cache, &tag, &k, &mut piece);
            (piece, r)
        })
        .await
        {
            Ok(x) => x,
            Err(e) => return (BytesMut::new(), Err(eio(format!("decode task: {e}")))),
        };
        match cached {
            Ok(true) => return (piece, Ok(())),
            Ok(false) => {}
            Err(e) => {
                if let Err(e) = self.drop_bad_cached(&tag, e) {
                    return (piece, Err(eio(e)));
                }
            }
        }
        // From a lookaside directory or the server (joining a read-ahead fetch of the chunk if one is under way).
        let stored = match self.sources.get(&tag).await {
            Ok(b) => b,
            Err(e) => return (piece, Err(eio(e))),
        };
        match tokio::task::spawn_blocking(move || {
            let r = DECODER.with(|d| d.borrow_mut().decode_into(&tag, &key, &stored, &mut piece));
            (piece, r)
        })
        .await
        {
            Ok((piece, r)) => (piece, r.map_err(|e| eio(ClientError::chunk(&tag, e)))),
            Err(e) => (BytesMut::new(), Err(eio(format!("decode task: {e}")))),
        }
    }

    /// Copy `out.len()` bytes of chunk `i` from `start` into `out`, keeping the decoded chunk in memory. The
    /// caller holds the stripe lock and found the chunk not resident.
    async fn read_part(&self, i: u64, start: usize, out: &mut [u8]) -> std::io::Result<()> {
        match self.load(i).await.map_err(eio)? {
            // A zero chunk is not worth keeping in memory.
            None => out.fill(0),
            Some(data) => {
                out.copy_from_slice(&data[start..start + out.len()]);
                let mut st = self.state.lock().expect("image state");
                self.insert_resident(&mut st, i, data);
            }
        }
        Ok(())
    }

    pub async fn read(self: &Arc<Self>, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let (data, r) = self.read_owned(offset, vec![0u8; buf.len()]).await;
        r?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` into `buf` and hand it back (on an error its contents are
    /// unspecified and must not be used). The chunks of one request are read concurrently, each into its
    /// own piece of `buf`.
    pub async fn read_owned(self: &Arc<Self>, offset: u64, buf: Vec<u8>) -> (Vec<u8>, std::io::Result<()>) {
        if let Err(e) = self.check_range(offset, buf.len() as u64) {
            return (buf, Err(e));
        }
        let cs = self.chunk_size;
        let range = cs.chunks_in_range(ByteOffset(offset), buf.len() as u64);
        if range.is_empty() {
            return (buf, Ok(()));
        }
        let sequential = {
            let mut st = self.state.lock().expect("image state");
            let seq = st.last_read.is_some_and(|l| range.start == l || range.start == l + 1);
            st.last_read = Some(range.end - 1);
            seq
        };
        if sequential || range.end - range.start > 1 {
            self.read_ahead(range.end);
        }
        // One owned piece of `buf` per chunk (no copy: they share `buf`'s memory and are joined again).
        let mut rest = match Bytes::from(buf).try_into_mut() {
            Ok(b) => b,
            Err(b) => BytesMut::from(&b[..]),
        };
        let mut parts = Vec::with_capacity((range.end - range.start) as usize);
        let mut pos = offset;
        for i in range {
            let start = cs.offset_in_chunk(ByteOffset(pos));
            let n = (cs.chunk_len(self.len, ChunkIndex(i)) - start).min(rest.len());
            parts.push((parts.len(), i, start, rest.split_to(n)));
            pos += n as u64;
        }
        drop(rest);
        let mut done: Vec<Option<BytesMut>> = vec![None; parts.len()];
        let mut pending = parts.into_iter();
        let mut running = futures::stream::FuturesUnordered::new();
        let piece = |(k, i, start, piece): (usize, u64, usize, BytesMut)| async move {
            let (piece, r) = self.read_piece(i, start, piece).await;
            (k, piece, r)
        };
        for p in pending.by_ref().take(READ_PARALLELISM) {
            running.push(piece(p));
        }
        let mut result = Ok(());
        while let Some((k, bytes, r)) = running.next().await {
            done[k] = Some(bytes);
            if result.is_ok() {
                result = r;
            }
            if let Some(p) = pending.next() {
                running.push(piece(p));
            }
        }
        let mut whole = BytesMut::new();
        for p in done.into_iter().flatten() {
            // Adjacent pieces of one buffer join without a copy.
            whole.unsplit(p);
        }
        (Vec::from(whole), result)
    }

    /// Apply `f(chunk_bytes, start_in_chunk, range_in_data)` to every chunk overlapped by the range.
    async fn modify(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut [u8], std::ops::Range<usize>, std::ops::Range<usize>),
    ) -> std::io::Result<()> {
        self.check_range(offset, len)?;
        let cs = self.chunk_size;
        let mut pos = 0usize;
        for i in cs.chunks_in_range(ByteOffset(offset), len) {
            let _g = self.stripe(i).lock().await;
            let start = if pos == 0 { cs.offset_in_chunk(ByteOffset(offset)) } else { 0 };
            let clen = cs.chunk_len(self.len, ChunkIndex(i));
            let n = (clen - start).min(len as usize - pos);
            let whole = start == 0 && n == clen;
            if whole {
                // A whole-chunk overwrite needs nothing from the old contents.
                let mut st = self.state.lock().expect("image state");
                if !st.resident.contains_key(&i) {
                    st.clock += 1;
                    let last_use = st.clock;
                    st.clean_bytes += clen;
                    st.resident.insert(i, Resident { data: vec![0u8; clen], last_use });
                }
            } else {
                self.ensure_resident(i).await.map_err(eio)?;
            }
            let mut st = self.state.lock().expect("image state");
            let st = &mut *st;
            let r = st.resident.get_mut(&i).expect("resident under stripe lock");
            f(&mut r.data, start..start + n, pos..pos + n);
            if st.dirty.insert(i) {
                st.clean_bytes -= r.data.len();
            }
            pos += n;
        }
        Ok(())
    }

    pub async fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.modify(offset, data.len() as u64, |chunk, c, d| chunk[c].copy_from_slice(&data[d])).await?;
        self.limit_dirty().await
    }

    /// Zero a range. Whole chunks become zero chunks: nothing stored, nothing sent.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.modify(offset, len, |chunk, c, _| chunk[c].fill(0)).await?;
        self.limit_dirty().await
    }

    /// Dirty chunks live in memory until a flush; a guest that writes a lot without flushing gets an early
    /// flush instead of an unbounded memory footprint (unflushed writes may be made durable early).
    async fn limit_dirty(&self) -> std::io::Result<()> {
        let dirty_bytes = self.dirty_chunks() * self.chunk_size.as_usize();
        if dirty_bytes > MAX_DIRTY_BYTES {
            self.flush().await.map_err(eio)?;
        }
        Ok(())
    }

    /// Encode every dirty chunk into the cache (fsynced), then replace the working keyring durably.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let dirty: Vec<u64> = self.state.lock().expect("image state").dirty.iter().copied().collect();
        if dirty.is_empty() {
            return Ok(());
        }
        let results = futures::stream::iter(dirty)
            .map(|i| async move {
                let _g = self.stripe(i).lock().await;
                let data = {
                    let st = self.state.lock().expect("image state");
                    if !st.dirty.contains(&i) {
                        return Ok(());
                    }
                    st.resident.get(&i).map(|r| r.data.clone()).expect("dirty chunks are resident")
                };
                let secret = self.secret.clone();
                let encoded = tokio::task::spawn_blocking(move || encode_chunk(&secret, &data))
                    .await
                    .map_err(|e| ClientError::Other(format!("encode task: {e}")))?
                    .map_err(|e| ClientError::Other(format!("encoding chunk {i}: {e}")))?;
                let entry = match encoded {
                    Some(e) => {
                        self.cache.put_durable(&e.tag, Bytes::from(e.stored)).await?;
                        Some((e.tag, e.key))
                    }
                    None => None,
                };
                let mut st = self.state.lock().expect("image state");
                st.keyring.set(ChunkIndex(i), entry);
                st.dirty.remove(&i);
                if let Some(r) = st.resident.get(&i) {
                    st.clean_bytes += r.data.len();
                }
                self.evict_if_needed(&mut st);
                Ok::<(), ClientError>(())
            })
            .buffer_unordered(FLUSH_PARALLELISM)
            .collect::<Vec<_>>()
            .await;
        for r in results {
            r?;
        }
        self.persist().await?;
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Allocation of `len` bytes at `offset` for NBD block status, per chunk: a zero chunk (nothing stored)
    /// is a hole reading as zeroes, a written chunk still in memory is zero when all its bytes are, the
    /// rest is data. Never fetches anything.
    pub fn block_status(&self, offset: u64, len: u32) -> std::io::Result<Vec<isr_nbd::proto::Extent>> {
        use isr_nbd::proto::{state, Extent};
        self.check_range(offset, len as u64)?;
        let cs = self.chunk_size;
        let st = self.state.lock().expect("image state");
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len as u64;
        for i in cs.chunks_in_range(ByteOffset(offset), len as u64) {
            let chunk_end =
                (cs.offset_of(ChunkIndex(i)).0 + cs.chunk_len(self.len, ChunkIndex(i)) as u64).min(end);
            let flags = if st.dirty.contains(&i) {
                let zero = st.resident.get(&i).is_some_and(|r| codec::is_zero(&r.data));
                if zero {
                    state::ZERO
                } else {
                    0
                }
            } else if st.keyring.get(ChunkIndex(i)).is_none() {
                state::HOLE | state::ZERO
            } else {
                0
            };
            out.push(Extent { len: (chunk_end - pos) as u32, flags });
            pos = chunk_end;
        }
        Ok(out)
    }

    /// Bring the chunks of a range into the local cache (NBD_CMD_CACHE), several at a time; returns once
    /// they are there.
    pub async fn prefetch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.check_range(offset, len)?;
        let tags: Vec<(Tag, u64)> = {
            let st = self.state.lock().expect("image state");
            self.chunk_size
                .chunks_in_range(ByteOffset(offset), len)
                .filter(|i| !st.resident.contains_key(i))
                .filter_map(|i| st.keyring.get(ChunkIndex(i)).map(|(t, _)| (t, 0)))
                .collect()
        };
        let wanted = self.sources.not_cached(&tags).await;
        self.sources.prefetch(&wanted, PREFETCH_IN_FLIGHT, |_, _| {}).await.map_err(eio)
    }

    /// Zero a range only where that needs no decode (NBD fast zero): every chunk it covers only partly must
    /// be in memory or a zero chunk already; else `Unsupported`, before anything changed.
    pub async fn write_zeroes_fast(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.check_range(offset, len)?;
        let cs = self.chunk_size;
        let slow = {
            let st = self.state.lock().expect("image state");
            cs.chunks_in_range(ByteOffset(offset), len).any(|i| {
                let start = cs.offset_of(ChunkIndex(i)).0;
                let clen = cs.chunk_len(self.len, ChunkIndex(i)) as u64;
                let whole = offset <= start && start + clen <= offset + len;
                !whole && !st.resident.contains_key(&i) && st.keyring.get(ChunkIndex(i)).is_some()
            })
        };
        if slow {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "zeroing part of a chunk that is not in memory needs a decode",
            ));
        }
        self.write_zeroes(offset, len).await
    }

    /// Write the working keyring (or remove it when the image equals its base again).
    async fn persist(&self) -> Result<(), ClientError> {
        let keyring = self.keyring();
        let path = self.work_path.clone();
        if keyring.tags() == self.base_tags.as_slice() {
            return match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(ClientError::io(format!("removing {}", path.display()), e)),
            };
        }
        let keyroot = self.keyroot.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &keyring.seal(&keyroot)))
            .await
            .map_err(|e| ClientError::Other(format!("keyring task: {e}")))?
    }
}

/// Chunks fetched at once for an NBD cache request.
const PREFETCH_IN_FLIGHT: usize = 16;

/// A [`WorkingImage`] exported over NBD.
#[derive(Debug, Clone)]
pub struct ImageDevice(pub Arc<WorkingImage>);

#[async_trait::async_trait]
impl isr_nbd::BlockDevice for ImageDevice {
    fn size(&self) -> u64 {
        self.0.len.0
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, buf).await
    }
    async fn read_owned(&self, offset: u64, buf: Vec<u8>) -> (Vec<u8>, std::io::Result<()>) {
        self.0.read_owned(offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data).await
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.0.flush().await.map_err(eio)
    }
    async fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.write_zeroes(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.write_zeroes(offset, len).await
    }
    async fn write_zeroes_fast(&self, offset: u64, len: u64, _no_hole: bool) -> std::io::Result<()> {
        // A zero chunk is never stored: "no hole" has no meaning for an image of chunks.
        self.0.write_zeroes_fast(offset, len).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> std::io::Result<Vec<isr_nbd::proto::Extent>> {
        self.0.block_status(offset, len)
    }
    async fn cache(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.prefetch(offset, len).await
    }
    /// One in-memory state serves every connection, and a flush makes all of it durable.
    fn multi_conn_consistent(&self) -> bool {
        true
    }
}
