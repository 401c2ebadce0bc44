//! A checked-out image read and written in place, through its [runtime image](crate::runtime).
//!
//! A chunk the runtime image holds is read with a pread and a decrypt. Any other chunk is decoded from the
//! local cache, else fetched through the chunk sources (lookaside directories, the server), verified against
//! the keyring (a chunk that cannot be fetched or verified fails the read, never returns wrong data), and
//! stored in the runtime image once. Writes go to the runtime image's sectors and mark the chunk dirty; a
//! flush is one fdatasync. [`WorkingImage::encode_changes`] (sync, check-in) turns the dirty chunks into
//! convergent chunks in the cache and a new sealed working keyring.

use crate::background::Background;
use crate::cache::ChunkCache;
use crate::error::ClientError;
use crate::home::write_atomic;
use crate::runtime::{state, Entry, Recovery, RuntimeImage};
use crate::source::{ChunkSources, SourceStats};
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use isr_format::codec;
use isr_format::{
    ByteOffset, ChunkDecoder, ChunkEncoder, ChunkIndex, ChunkKey, ChunkSize, ConvergenceSecret, ImageLen,
    Keyring, Keyroot, Tag,
};
use isr_nbd::ReadSpan;
use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const STRIPES: usize = 1024;
/// Chunks filled ahead of a sequential reader (8 MiB at the default chunk size).
const READ_AHEAD: u64 = 64;
/// Chunks of one request decoded (or fetched) concurrently.
const READ_PARALLELISM: usize = 16;
/// Chunks of one request encrypted and written concurrently.
const WRITE_PARALLELISM: usize = 8;
/// Requests up to this size do their pread/pwrite on the async task itself (a page-cache hit costs less than
/// the hop to a blocking thread); larger ones go to the blocking pool.
const INLINE_IO: usize = 32 << 10;
/// Read-ahead fills in flight at once (each a fetch, a decode and a write into the runtime image): the
/// fetches in flight of a sequential reader beyond its own requests.
const FILLS_IN_FLIGHT: usize = 24;

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

/// Chunk `i`'s whole plaintext (`clen` bytes) from the runtime image, whose map entry is `e`: zeroes for a
/// zero chunk. Blocking.
fn read_whole_chunk(rt: &RuntimeImage, i: u64, e: Entry, clen: usize) -> Result<Vec<u8>, ClientError> {
    let mut plain = vec![0u8; clen];
    if !e.is(state::ZERO) {
        rt.read(i, 0, &mut plain)?;
    }
    Ok(plain)
}

/// Dirty chunk `i` encoded convergently from `plain`, its content at write stamp `written`. Blocking.
fn encode_dirty_plain(
    secret: &ConvergenceSecret,
    i: ChunkIndex,
    written: u64,
    plain: &[u8],
) -> Result<Option<EncodedDirty>, ClientError> {
    let chunk = encode_chunk(secret, plain)
        .map_err(|e| ClientError::Other(format!("encoding chunk {}: {e}", i.0)))?
        .map(|enc| (enc.tag, enc.key, Bytes::from(enc.stored)));
    Ok(Some(EncodedDirty { index: i, written, chunk, plain_len: plain.len() }))
}

/// Verify and decode chunk `tag`, opened from the cache as `file` of `size` bytes, into `out` (its contents
/// replaced by the chunk's `len` bytes). Blocking. An uncompressed chunk is read from its file directly
/// into `out` and decrypted there; a compressed one into a reused per-thread buffer, decrypted in place
/// and decompressed into `out`. On an error `out` holds garbage and must not be returned.
fn decode_cached_into(
    (mut file, size): (std::fs::File, u64),
    tag: &Tag,
    key: &ChunkKey,
    out: &mut Vec<u8>,
    len: usize,
) -> Result<(), ClientError> {
    use std::io::Read;
    let io = |e: std::io::Error| ClientError::io(format!("reading chunk {tag} from the cache"), e);
    let bad = |e: codec::ChunkError| ClientError::chunk(tag, e);
    let mut header = [0u8; codec::HEADER_LEN];
    let raw_size = codec::raw_stored_len(len) as u64;
    if size == raw_size {
        file.read_exact(&mut header).map_err(io)?;
        if header[6] == codec::COMPRESSION_NONE {
            let mut gcm_tag = [0u8; codec::AEAD_TAG_LEN];
            out.clear();
            // Read into `out`'s capacity: no zero-fill of bytes the file overwrites.
            (&mut file).take(len as u64).read_to_end(out).map_err(io)?;
            if out.len() != len {
                return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            file.read_exact(&mut gcm_tag).map_err(io)?;
            codec::decode_raw_in_place(tag, key, &header, out, &gcm_tag).map_err(bad)?;
            return Ok(());
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
        DECODER.with(|d| d.borrow_mut().decode_in_place(tag, key, &mut stored, out, len)).map_err(bad)?;
        // The thread keeps its buffer, but not one far larger than this image's chunks.
        if stored.capacity() > 2 * len.max(256 << 10) {
            *stored = Vec::new();
        }
        Ok(())
    })
}

/// Decode chunk `tag`, just fetched (and verified by tag) from below the cache, into `out` (its contents
/// replaced by the chunk's `len` bytes). Blocking.
fn decode_fetched_into(
    fetched: Bytes,
    tag: &Tag,
    key: &ChunkKey,
    out: &mut Vec<u8>,
    len: usize,
) -> Result<(), ClientError> {
    // Decrypted where it is when the buffer is ours alone (it is, straight from a fetch), else in a copy.
    let mut stored = fetched.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
    DECODER
        .with(|d| d.borrow_mut().decode_fetched_in_place(key, &mut stored, out, len))
        .map_err(|e| ClientError::chunk(tag, e))
}

/// Store a remote chunk's plaintext in chunk `i` of the runtime image as present and clean (data before the
/// map entry: a crash in between leaves the chunk absent). Blocking.
/// `plain` was decoded with the keyring's `key` (the AEAD proved it), so its content MAC needs no hash of it.
fn install_blocking(
    rt: &RuntimeImage,
    i: u64,
    tag: &Tag,
    key: &ChunkKey,
    plain: &[u8],
) -> Result<(), ClientError> {
    rt.write_chunk(i, plain)?;
    rt.set_entry(i, rt.clean_entry(i, tag, key))?;
    Ok(())
}

/// The plaintext of chunks that read-ahead just filled, for the reader that comes for them next: it takes a
/// chunk from here instead of reading it back from the runtime image and decrypting it. Clean chunks only (a
/// write of a chunk drops it here first, under the chunk's lock), at most [`READY_CHUNKS`], oldest dropped
/// first; in memory only, like every other plaintext of a running image.
#[derive(Default)]
struct Ready {
    chunks: HashMap<u64, Vec<u8>>,
    order: VecDeque<u64>,
}

/// What [`WorkingImage::read_piece`] did with its piece of a read.
enum Part {
    /// The bytes are in the piece.
    Written,
    /// The bytes are a zero chunk's.
    Zero,
    /// The bytes are these, a slice of a plaintext just decoded.
    Shared(Bytes),
}

impl Part {
    /// The span of a piece of `n` bytes: a zero chunk is a hole only in a sparse read (else its zeroes were
    /// written into the piece).
    fn span(self, n: u32, sparse: bool) -> ReadSpan {
        match self {
            Part::Zero if sparse => ReadSpan::Hole(n),
            Part::Written | Part::Zero => ReadSpan::Buffer(n),
            Part::Shared(b) => ReadSpan::Shared(b),
        }
    }
}

/// Chunks kept in [`Ready`]: two read-ahead windows.
const READY_CHUNKS: usize = 2 * READ_AHEAD as usize;

impl Ready {
    fn put(&mut self, i: u64, plain: Vec<u8>) {
        while self.chunks.len() >= READY_CHUNKS {
            let Some(old) = self.order.pop_front() else { break };
            self.chunks.remove(&old);
        }
        if self.order.len() > 2 * READY_CHUNKS {
            let chunks = &self.chunks;
            self.order.retain(|j| chunks.contains_key(j));
        }
        self.chunks.insert(i, plain);
        self.order.push_back(i);
    }

    fn take(&mut self, i: u64) -> Option<Vec<u8>> {
        self.chunks.remove(&i)
    }

    fn clear(&mut self) {
        self.chunks.clear();
        self.order.clear();
    }
}

/// A dirty chunk encoded convergently while the image may go on changing ([`WorkingImage::encode_dirty`]):
/// what a check-in, a trickle upload or a running sync sends, and what [`WorkingImage::settle`] then records
/// as the chunk's clean content unless the chunk was written again since it was read.
#[derive(Debug, Clone)]
pub struct EncodedDirty {
    pub index: ChunkIndex,
    /// The chunk's write stamp when it was read (see [`WorkingImage::stamp`]).
    written: u64,
    /// The convergent chunk: tag, key and stored bytes; `None` when it is all zero (nothing to send).
    pub chunk: Option<(Tag, ChunkKey, Bytes)>,
    /// The chunk's plaintext length.
    pub plain_len: usize,
}

impl EncodedDirty {
    /// The same without its stored bytes (sent already: the tag is what is recorded).
    pub fn without_bytes(self) -> EncodedDirty {
        EncodedDirty { chunk: self.chunk.map(|(t, k, _)| (t, k, Bytes::new())), ..self }
    }

    /// The keyring entry this chunk gets.
    fn keyring_entry(&self) -> Option<(Tag, ChunkKey)> {
        self.chunk.as_ref().map(|(t, k, _)| (*t, k.clone()))
    }
}

/// Where a chunk's decode and store run.
#[derive(Clone, Copy)]
enum Hop {
    /// On the calling task's thread: for a fetched chunk, whose decode is a fraction of a millisecond of CPU
    /// and whose store is a write into the page cache. On a cold read, a hop per chunk to the blocking pool
    /// cost more than that work: wake-ups, and context switches among dozens of pool threads, each with its
    /// own cold codec buffers. Doing it here took a quarter off a cold read's time (docs/performance.md,
    /// session 10).
    None,
    /// On a blocking thread: for work that reads a file (a chunk from the cache).
    Blocking,
}

/// Where the current content of a chunk is.
enum Held {
    /// All zero (a zero chunk of the keyring, or zeroed here).
    Zero,
    /// In the runtime image.
    Local,
    /// Only in its convergent form: decode it (from the cache, a lookaside directory or the server).
    Remote(Tag, ChunkKey),
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
    /// The base version's tags (replaced when a running sync commits a new base).
    base_tags: Mutex<Vec<Tag>>,
    work_path: PathBuf,
    cache: ChunkCache,
    sources: Arc<ChunkSources>,
    secret: ConvergenceSecret,
    runtime: Arc<RuntimeImage>,
    /// The working keyring: what a clean chunk holds (dirty chunks are newer, in the runtime image only).
    keyring: Mutex<Keyring>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    last_read: Mutex<Option<u64>>,
    /// Read-ahead has considered chunks up to here (exclusive), so it does not re-check them per request.
    ahead_mark: AtomicU64,
    fills_in_flight: AtomicUsize,
    ready: Mutex<Ready>,
    /// Per chunk, the stamp of its last write ([`Self::stamp`]): an encode of a dirty chunk remembers it, and
    /// its result is recorded only if no write came since (a chunk rewritten during its own upload stays
    /// dirty and is sent again).
    written: Vec<AtomicU64>,
    /// The last write stamp handed out.
    write_seq: AtomicU64,
    /// Every write stamped up to here was covered by a completed flush.
    flushed_seq: AtomicU64,
    /// Writes hold it shared; a running sync's snapshot holds it exclusively (no write in flight or starting).
    gate: tokio::sync::RwLock<()>,
    /// Chunk fetches for reads and writes in flight (a trickle upload yields to them).
    demand_fetches: AtomicUsize,
    /// Told after every flush (a trickle waiting for work wakes up).
    flushed: tokio::sync::Notify,
    /// Records first touches for the access-order prefetch, once set ([`Self::record_touches`]).
    touches: std::sync::OnceLock<crate::access_trace::TouchRecorder>,
    /// What opening the runtime image found after an unclean end.
    pub recovery: Recovery,
    pub stats: Arc<ImageStats>,
}

impl std::fmt::Debug for WorkingImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkingImage").field("len", &self.len).field("runtime", &self.runtime).finish()
    }
}

fn eio(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn join_err(e: tokio::task::JoinError) -> ClientError {
    ClientError::Other(format!("image task: {e}"))
}

impl WorkingImage {
    /// `keyring` is the current working state (the working keyring if the image was modified, else the
    /// base); `base_tags` are the base version's tags, to tell whether the image is still unmodified.
    /// Opens (or makes) the runtime image at `runtime_path`; blocking.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        keyring: Keyring,
        base_tags: Vec<Tag>,
        keyroot: Keyroot,
        work_path: PathBuf,
        runtime_path: PathBuf,
        sources: Arc<ChunkSources>,
        secret: ConvergenceSecret,
    ) -> Result<WorkingImage, ClientError> {
        let (runtime, recovery) = RuntimeImage::open(
            &runtime_path,
            &keyroot,
            &secret,
            keyring.chunk_size(),
            keyring.image_len(),
            keyring.tags(),
        )?;
        let stats = Arc::new(ImageStats { sources: sources.stats.clone(), ..Default::default() });
        let cache = sources.cache().clone();
        let written = (0..runtime.chunk_count()).map(|_| AtomicU64::new(0)).collect();
        Ok(WorkingImage {
            chunk_size: keyring.chunk_size(),
            len: keyring.image_len(),
            keyroot,
            base_tags: Mutex::new(base_tags),
            work_path,
            cache,
            sources,
            secret,
            runtime: Arc::new(runtime),
            keyring: Mutex::new(keyring),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            last_read: Mutex::new(None),
            ahead_mark: AtomicU64::new(0),
            fills_in_flight: AtomicUsize::new(0),
            ready: Mutex::new(Ready::default()),
            written,
            write_seq: AtomicU64::new(0),
            flushed_seq: AtomicU64::new(0),
            gate: tokio::sync::RwLock::new(()),
            demand_fetches: AtomicUsize::new(0),
            flushed: tokio::sync::Notify::new(),
            touches: std::sync::OnceLock::new(),
            recovery,
            stats,
        })
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

    fn chunk_len(&self, i: u64) -> usize {
        self.chunk_size.chunk_len(self.len, ChunkIndex(i))
    }

    /// The working keyring (dirty chunks are not in it until [`Self::encode_changes`]).
    pub fn keyring(&self) -> Keyring {
        self.keyring.lock().expect("image keyring").clone()
    }

    /// How many chunks changed since the working keyring (in the runtime image only).
    pub fn dirty_chunks(&self) -> usize {
        self.runtime.chunks_with(state::DIRTY).len()
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

    fn held_by(&self, i: u64, e: &Entry) -> Held {
        let local = |e: &Entry| if e.is(state::ZERO) { Held::Zero } else { Held::Local };
        if e.is(state::DIRTY) {
            return local(e);
        }
        let keyring = self.keyring.lock().expect("image keyring");
        match keyring.get(ChunkIndex(i)) {
            None => Held::Zero,
            Some((tag, _)) if e.is(state::PRESENT) && e.tag_mac == self.runtime.tag_mac(&tag) => local(e),
            Some((tag, key)) => Held::Remote(tag, key.clone()),
        }
    }

    /// Record from now on the first touch of each chunk (a read or a write) into `trace` as `image`.
    pub fn record_touches(
        &self,
        trace: Arc<crate::access_trace::AccessTrace>,
        image: crate::access_trace::TracedImage,
    ) {
        let _ = self.touches.set(crate::access_trace::TouchRecorder::new(
            trace,
            image,
            self.runtime.chunk_count(),
        ));
    }

    fn touched(&self, offset: u64, len: u64) {
        if let Some(t) = self.touches.get() {
            let r = self.chunk_size.chunks_in_range(ByteOffset(offset), len);
            t.touched(r.start..r.end);
        }
    }

    /// Whether chunk `i` needs no fetch (it is in the runtime image, or zero).
    pub fn is_local(&self, i: u64) -> bool {
        !matches!(self.held(i), Held::Remote(..))
    }

    fn held(&self, i: u64) -> Held {
        self.held_by(i, &self.runtime.entry(i))
    }

    /// The plaintext of chunk `i`, held only remotely as `tag`: decoded from the cache, else fetched through
    /// the sources (verified by tag) and decoded; with `install`, also stored in the runtime image as present
    /// and clean. A cached chunk's read, decode and store are one hop to a blocking thread; a fetched chunk's
    /// decode and store run right here (see [`Self::decode_and_install`]).
    async fn obtain(&self, i: u64, tag: Tag, key: ChunkKey, install: bool) -> Result<Vec<u8>, ClientError> {
        // An open() that finds nothing costs less than a hop to a blocking thread (a cold read's every chunk).
        if let Some(file) = self.cache.open_blocking(&tag)? {
            let k = key.clone();
            let from_cache = move |plain: &mut Vec<u8>, len| decode_cached_into(file, &tag, &k, plain, len);
            match self.decode_and_install(i, tag, key.clone(), install, Hop::Blocking, from_cache).await {
                Ok(plain) => return Ok(plain),
                Err(e) => self.drop_bad_cached(&tag, e)?,
            }
        }
        // Not cached: fetched and decoded, not kept in the chunk cache (the runtime image keeps the plaintext;
        // `hoard` is what fills the cache for disconnected use).
        self.demand_fetches.fetch_add(1, Ordering::Relaxed);
        let fetched = self.sources.get_uncached(&tag).await;
        self.demand_fetches.fetch_sub(1, Ordering::Relaxed);
        let fetched = fetched?.ok_or_else(|| self.sources.nobody_has(&tag))?;
        let k = key.clone();
        let from_fetch = move |plain: &mut Vec<u8>, len| decode_fetched_into(fetched, &tag, &k, plain, len);
        self.decode_and_install(i, tag, key, install, Hop::None, from_fetch).await
    }

    /// `decode` chunk `i` (under `key`) into a new buffer and, with `install`, store it in the runtime image
    /// as the clean content of `tag`; on a blocking thread or, with [`Hop::None`], on this task's thread.
    async fn decode_and_install(
        &self,
        i: u64,
        tag: Tag,
        key: ChunkKey,
        install: bool,
        hop: Hop,
        decode: impl FnOnce(&mut Vec<u8>, usize) -> Result<(), ClientError> + Send + 'static,
    ) -> Result<Vec<u8>, ClientError> {
        let (rt, clen) = (self.runtime.clone(), self.chunk_len(i));
        let work = move || {
            let mut plain = Vec::with_capacity(clen);
            decode(&mut plain, clen)?;
            if install {
                install_blocking(&rt, i, &tag, &key, &plain)?;
            }
            Ok(plain)
        };
        match hop {
            Hop::None => work(),
            Hop::Blocking => tokio::task::spawn_blocking(work).await.map_err(join_err)?,
        }
    }

    /// A cached chunk failed verification: when another source could have a good copy (the server, a lookaside
    /// directory), drop it so that the read fetches one (verified); else the read fails (never wrong data).
    fn drop_bad_cached(&self, tag: &Tag, e: ClientError) -> Result<(), ClientError> {
        match e {
            ClientError::Integrity(_) if self.sources.has_sources_below_cache() => self.cache.evict(tag),
            other => Err(other),
        }
    }

    /// Make chunk `i` local if it is held only remotely; the caller holds its stripe lock. Returns the
    /// plaintext when it was fetched.
    async fn fill_locked(&self, i: u64) -> Result<Option<Vec<u8>>, ClientError> {
        match self.held(i) {
            Held::Remote(tag, key) => Ok(Some(self.obtain(i, tag, key, true).await?)),
            Held::Zero | Held::Local => Ok(None),
        }
    }

    async fn fill(&self, i: u64) -> Result<(), ClientError> {
        let _g = self.stripe(i).lock().await;
        self.fill_locked(i).await.map(drop)
    }

    /// A read-ahead fill of chunk `i`: its plaintext is left for the reader that comes for it next.
    async fn fill_ahead(&self, i: u64) -> Result<(), ClientError> {
        let _g = self.stripe(i).lock().await;
        if let Some(plain) = self.fill_locked(i).await? {
            self.ready.lock().expect("ready chunks").put(i, plain);
        }
        Ok(())
    }

    /// Fill the next chunks of a sequential reader into the runtime image in the background.
    fn read_ahead(self: &Arc<Self>, from: u64) {
        let mark = self.ahead_mark.load(Ordering::Relaxed);
        let start = if (from..from + READ_AHEAD).contains(&mark) { mark } else { from };
        let end = (from + READ_AHEAD).min(self.runtime.chunk_count());
        self.ahead_mark.store(end.max(start), Ordering::Relaxed);
        for i in start..end {
            if !matches!(self.held(i), Held::Remote(..)) {
                continue;
            }
            if self.fills_in_flight.fetch_add(1, Ordering::Relaxed) >= FILLS_IN_FLIGHT {
                self.fills_in_flight.fetch_sub(1, Ordering::Relaxed);
                // Not considered: a later request starts it.
                self.ahead_mark.store(i, Ordering::Relaxed);
                return;
            }
            let me = self.clone();
            tokio::spawn(async move {
                // A failure here is the demand read's to report (it fetches again).
                let _ = me.fill_ahead(i).await;
                me.fills_in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    /// Bytes `start..start + piece.len()` of chunk `i`: written into `piece` ([`Part::Written`]), the
    /// zeroes of a zero chunk ([`Part::Zero`]: `piece` is zero-filled unless `sparse`, for which the reply
    /// sends a hole) or, with `scatter`, a slice of a plaintext just decoded ([`Part::Shared`]: the reply
    /// sends it from there, without a copy into `piece`).
    async fn read_piece(
        &self,
        i: u64,
        start: usize,
        mut piece: BytesMut,
        sparse: bool,
        scatter: bool,
    ) -> (BytesMut, std::io::Result<Part>) {
        let n = piece.len();
        let hand_over = |mut piece: BytesMut, plain: Vec<u8>| {
            if scatter {
                (piece, Ok(Part::Shared(Bytes::from(plain).slice(start..start + n))))
            } else {
                piece.copy_from_slice(&plain[start..start + n]);
                (piece, Ok(Part::Written))
            }
        };
        if let Held::Remote(..) = self.held(i) {
            let _g = self.stripe(i).lock().await;
            match self.fill_locked(i).await {
                Ok(Some(plain)) => return hand_over(piece, plain),
                Ok(None) => {}
                Err(e) => return (piece, Err(eio(e))),
            }
        }
        let held = self.held(i);
        if let Held::Local = held {
            if let Some(plain) = self.ready.lock().expect("ready chunks").take(i) {
                return hand_over(piece, plain);
            }
        }
        match held {
            Held::Zero => {
                if !sparse {
                    piece.fill(0);
                }
                (piece, Ok(Part::Zero))
            }
            Held::Local | Held::Remote(..) if piece.len() <= INLINE_IO => {
                // A few sectors from the page cache: cheaper here than a hop to a blocking thread.
                let r = self.runtime.read(i, start, &mut piece).map_err(eio);
                (piece, r.map(|()| Part::Written))
            }
            Held::Local | Held::Remote(..) => {
                let rt = self.runtime.clone();
                match tokio::task::spawn_blocking(move || {
                    let r = rt.read(i, start, &mut piece);
                    (piece, r)
                })
                .await
                {
                    Ok((piece, r)) => (piece, r.map(|()| Part::Written).map_err(eio)),
                    Err(e) => (BytesMut::new(), Err(eio(e))),
                }
            }
        }
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
        let (buf, r) = self.read_pieces(offset, buf, false, false).await;
        (buf, r.map(drop))
    }

    /// Like [`Self::read_owned`], and the ranges of `buf` that are zero chunks (in order, merged when
    /// adjacent): a structured NBD reply sends them as holes, without their bytes, so `buf` is left as it
    /// was there.
    pub async fn read_sparse_owned(
        self: &Arc<Self>,
        offset: u64,
        buf: Vec<u8>,
    ) -> (Vec<u8>, std::io::Result<Vec<std::ops::Range<u32>>>) {
        let (buf, r) = self.read_pieces(offset, buf, true, false).await;
        let holes = r.map(|spans| {
            let mut at = 0u32;
            let mut holes = Vec::new();
            for s in spans {
                let n = s.len() as u32;
                if let ReadSpan::Hole(_) = s {
                    holes.push(at..at + n);
                }
                at += n;
            }
            holes
        });
        (buf, holes)
    }

    /// Like [`Self::read_sparse_owned`], and a chunk just decoded (fetched now or by read-ahead) is not
    /// copied into `buf`: its span is a slice of the plaintext, which the NBD reply sends from there.
    pub async fn read_scattered(
        self: &Arc<Self>,
        offset: u64,
        buf: Vec<u8>,
    ) -> (Vec<u8>, std::io::Result<Vec<ReadSpan>>) {
        self.read_pieces(offset, buf, true, true).await
    }

    /// A read of `buf.len()` bytes at `offset`, chunk by chunk, as spans in order (adjacent ones of the same
    /// kind merged): with `sparse` zero chunks are holes and their ranges of `buf` are not written; with
    /// `scatter` a chunk just decoded is a [`ReadSpan::Shared`] slice of its plaintext instead of a copy.
    async fn read_pieces(
        self: &Arc<Self>,
        offset: u64,
        buf: Vec<u8>,
        sparse: bool,
        scatter: bool,
    ) -> (Vec<u8>, std::io::Result<Vec<ReadSpan>>) {
        if let Err(e) = self.check_range(offset, buf.len() as u64) {
            return (buf, Err(e));
        }
        if buf.len() > u32::MAX as usize {
            let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "a read is at most 4 GiB");
            return (buf, Err(e));
        }
        self.touched(offset, buf.len() as u64);
        let cs = self.chunk_size;
        let range = cs.chunks_in_range(ByteOffset(offset), buf.len() as u64);
        if range.is_empty() {
            return (buf, Ok(Vec::new()));
        }
        let sequential = {
            let mut last = self.last_read.lock().expect("last read");
            let seq = last.is_some_and(|l| range.start == l || range.start == l + 1);
            *last = Some(range.end - 1);
            seq
        };
        if sequential || range.end - range.start > 1 {
            self.read_ahead(range.end);
        }
        if range.end - range.start == 1 {
            // One chunk (the common case): no split.
            let start = cs.offset_in_chunk(ByteOffset(offset));
            let (piece, r) =
                self.read_piece(range.start, start, BytesMut::from(Bytes::from(buf)), sparse, scatter).await;
            let n = piece.len() as u32;
            return (Vec::from(piece), r.map(|part| vec![part.span(n, sparse)]));
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
            let n = (self.chunk_len(i) - start).min(rest.len());
            parts.push((parts.len(), i, start, rest.split_to(n)));
            pos += n as u64;
        }
        drop(rest);
        let mut done: Vec<Option<(BytesMut, Part)>> = (0..parts.len()).map(|_| None).collect();
        let mut pending = parts.into_iter();
        let mut running = futures::stream::FuturesUnordered::new();
        let piece = |(k, i, start, piece): (usize, u64, usize, BytesMut)| async move {
            let (piece, r) = self.read_piece(i, start, piece, sparse, scatter).await;
            (k, piece, r)
        };
        for p in pending.by_ref().take(READ_PARALLELISM) {
            running.push(piece(p));
        }
        let mut result = Ok(());
        while let Some((k, bytes, r)) = running.next().await {
            let part = match r {
                Ok(part) => part,
                Err(e) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                    Part::Written
                }
            };
            done[k] = Some((bytes, part));
            if let Some(p) = pending.next() {
                running.push(piece(p));
            }
        }
        let mut whole = BytesMut::new();
        let mut spans: Vec<ReadSpan> = Vec::new();
        for (p, part) in done.into_iter().flatten() {
            let span = part.span(p.len() as u32, sparse);
            match (spans.last_mut(), span) {
                (Some(ReadSpan::Hole(a)), ReadSpan::Hole(b))
                | (Some(ReadSpan::Buffer(a)), ReadSpan::Buffer(b)) => *a += b,
                (_, span) => spans.push(span),
            }
            // Adjacent pieces of one buffer join without a copy.
            whole.unsplit(p);
        }
        (Vec::from(whole), result.map(|()| spans))
    }

    /// Write `data` (or zeroes, when `None`) at `start` of chunk `i`; the caller holds its stripe lock.
    /// Crash order: a chunk that turns dirty is marked in the map before its data is written (after a crash
    /// it is dropped unless a flush made it durable); a chunk that was durably zero gets its data before
    /// the map says it is not zero any more.
    async fn write_chunk_locked(
        &self,
        i: u64,
        start: usize,
        data: Option<&[u8]>,
        len: usize,
    ) -> Result<(), ClientError> {
        let clen = self.chunk_len(i);
        let whole = start == 0 && len == clen;
        self.stamp(i);
        self.ready.lock().expect("ready chunks").take(i);
        let e = self.runtime.entry(i);
        // What stays of the entry: a chunk dirty before keeps its flushed mark.
        let flushed = e.state & state::FLUSHED;
        let dirty = state::PRESENT | state::DIRTY | flushed;
        let zeroing = data.is_none_or(codec::is_zero);
        let held = self.held_by(i, &e);
        if zeroing && matches!(held, Held::Zero) {
            // Zeroes over zeroes: nothing changes, so nothing turns dirty (nor is sent) and nothing is freed.
            return Ok(());
        }
        if whole && zeroing {
            let rt = self.runtime.clone();
            return tokio::task::spawn_blocking(move || {
                rt.set_entry(i, Entry { state: dirty | state::ZERO, ..Entry::default() })?;
                rt.punch(i)
            })
            .await
            .map_err(join_err)?
            .map_err(Into::into);
        }
        // The encryption and the pwrite run on this task: a hop to a blocking thread per chunk cost more
        // (a wake-up each, and a copy of the data to move it there) than the write into the page cache.
        let rt = &self.runtime;
        match held {
            Held::Local => {
                let zeroes;
                let data = match data {
                    Some(d) => d,
                    None => {
                        zeroes = vec![0u8; len];
                        &zeroes
                    }
                };
                rt.set_entry(i, Entry { state: dirty, ..e })?;
                Ok(rt.write(i, start, data)?)
            }
            Held::Zero | Held::Remote(..) => {
                // The whole chunk is written: what it was (zeroes or the remote chunk) with this write on it.
                let plain: Cow<[u8]> = match (data, held) {
                    (Some(d), _) if whole => Cow::Borrowed(d),
                    (data, held) => {
                        let mut plain = match held {
                            Held::Remote(tag, key) if !whole => self.obtain(i, tag, key, false).await?,
                            _ => vec![0u8; clen],
                        };
                        match data {
                            Some(d) => plain[start..start + len].copy_from_slice(d),
                            None => plain[start..start + len].fill(0),
                        }
                        Cow::Owned(plain)
                    }
                };
                let entry = Entry { state: dirty, ..Entry::default() };
                if e.is(state::ZERO | state::FLUSHED) {
                    rt.write_chunk(i, &plain)?;
                    rt.set_entry(i, entry)?;
                } else {
                    rt.set_entry(i, entry)?;
                    rt.write_chunk(i, &plain)?;
                }
                Ok(())
            }
        }
    }

    /// Write `data` (zeroes when `None`) over `len` bytes at `offset`, chunk by chunk.
    async fn modify(&self, offset: u64, len: u64, data: Option<&[u8]>) -> std::io::Result<()> {
        self.check_range(offset, len)?;
        self.touched(offset, len);
        let _writing = self.gate.read().await;
        let cs = self.chunk_size;
        let mut pieces = Vec::new();
        let mut pos = 0usize;
        for i in cs.chunks_in_range(ByteOffset(offset), len) {
            let start = if pos == 0 { cs.offset_in_chunk(ByteOffset(offset)) } else { 0 };
            let n = (self.chunk_len(i) - start).min(len as usize - pos);
            pieces.push((i, start, pos, n));
            pos += n;
        }
        // The chunks of one request are disjoint: encrypted and written concurrently, each under its own lock.
        futures::stream::iter(pieces)
            .map(|(i, start, pos, n)| async move {
                let _g = self.stripe(i).lock().await;
                self.write_chunk_locked(i, start, data.map(|d| &d[pos..pos + n]), n).await.map_err(eio)
            })
            .buffer_unordered(WRITE_PARALLELISM)
            .try_collect::<()>()
            .await
    }

    pub async fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.modify(offset, data.len() as u64, Some(data)).await
    }

    /// Zero a range. Whole chunks become zero chunks: nothing stored, nothing sent.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.modify(offset, len, None).await
    }

    /// Make every write so far durable: one fdatasync of the runtime image.
    pub async fn flush(&self) -> Result<(), ClientError> {
        // Every write stamped before this point has completed or is concurrent with the flush request.
        let covered = self.write_seq.load(Ordering::SeqCst);
        let rt = self.runtime.clone();
        tokio::task::spawn_blocking(move || rt.flush()).await.map_err(join_err)??;
        self.flushed_seq.fetch_max(covered, Ordering::SeqCst);
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.flushed.notify_waiters();
        Ok(())
    }

    /// Resolves at the next flush (counted from when it is enabled or first polled).
    pub fn next_flush(&self) -> tokio::sync::futures::Notified<'_> {
        self.flushed.notified()
    }

    /// Mark chunk `i` as written now (before its data changes; the caller holds its stripe lock).
    fn stamp(&self, i: u64) {
        let s = self.write_seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.written[i as usize].store(s, Ordering::SeqCst);
    }

    /// Dirty chunks whose last write a flush has covered (durable here, so worth sending), at most `max`,
    /// lowest first.
    pub fn flushed_dirty(&self, max: usize) -> Vec<ChunkIndex> {
        let flushed = self.flushed_seq.load(Ordering::SeqCst);
        self.runtime
            .chunks_with(state::DIRTY)
            .into_iter()
            .filter(|&i| self.written[i as usize].load(Ordering::SeqCst) <= flushed)
            .take(max)
            .map(ChunkIndex)
            .collect()
    }

    /// Plaintext bytes of the chunks changed since the working keyring (not yet encoded, so not sent).
    pub fn dirty_bytes(&self) -> u64 {
        self.runtime.chunks_with(state::DIRTY).into_iter().map(|i| self.chunk_len(i) as u64).sum()
    }

    /// How many chunks the image has.
    pub fn chunk_count(&self) -> u64 {
        self.runtime.chunk_count()
    }

    /// Chunk fetches for the guest's reads and writes in flight now.
    pub fn demand_fetches(&self) -> usize {
        self.demand_fetches.load(Ordering::Relaxed)
    }

    /// Encode dirty chunk `i` convergently as it is now (read under its lock, so no write tears it);
    /// `None` when it is not dirty (any more). Nothing is recorded: see [`Self::settle`].
    pub async fn encode_dirty(&self, i: ChunkIndex) -> Result<Option<EncodedDirty>, ClientError> {
        let _g = self.stripe(i.0).lock().await;
        self.encode_dirty_locked(i).await
    }

    async fn encode_dirty_locked(&self, i: ChunkIndex) -> Result<Option<EncodedDirty>, ClientError> {
        let e = self.runtime.entry(i.0);
        if !e.is(state::DIRTY) {
            return Ok(None);
        }
        let written = self.written[i.0 as usize].load(Ordering::SeqCst);
        let (rt, secret, clen) = (self.runtime.clone(), self.secret.clone(), self.chunk_len(i.0));
        tokio::task::spawn_blocking(move || {
            let plain = read_whole_chunk(&rt, i.0, e, clen)?;
            encode_dirty_plain(&secret, i, written, &plain)
        })
        .await
        .map_err(join_err)?
    }

    /// Like [`Self::encode_dirty`], for the background upload: the chunk's plaintext is read under its lock,
    /// and the encoding runs on `background` (low priority) after the lock is released, so that neither the
    /// guest's CPU nor its next access to the chunk waits on it. A write meanwhile makes the result stale,
    /// which [`Self::settle`] sees by the write stamp taken with the plaintext.
    pub async fn encode_dirty_in_background(
        &self,
        i: ChunkIndex,
        background: &Background,
    ) -> Result<Option<EncodedDirty>, ClientError> {
        let (written, plain) = {
            let _g = self.stripe(i.0).lock().await;
            let e = self.runtime.entry(i.0);
            if !e.is(state::DIRTY) {
                return Ok(None);
            }
            let written = self.written[i.0 as usize].load(Ordering::SeqCst);
            let (rt, clen) = (self.runtime.clone(), self.chunk_len(i.0));
            let plain = tokio::task::spawn_blocking(move || read_whole_chunk(&rt, i.0, e, clen))
                .await
                .map_err(join_err)??;
            (written, plain)
        };
        let secret = self.secret.clone();
        background.run(move || encode_dirty_plain(&secret, i, written, &plain)).await?
    }

    /// Record encoded chunks as the clean content of their chunks, except those written again since they
    /// were read (they stay dirty, to be encoded again). The working keyring is made durable before any map
    /// entry says clean; the entries are durable at the next flush (until then a crash leaves them dirty and
    /// flushed: encoded again). The encoded chunks must be where a later sync finds them (the server, or the
    /// cache). Returns how many were recorded.
    pub async fn settle(&self, encoded: &[EncodedDirty]) -> Result<usize, ClientError> {
        let unchanged = |enc: &EncodedDirty| {
            self.written[enc.index.0 as usize].load(Ordering::SeqCst) == enc.written
                && self.runtime.entry(enc.index.0).is(state::DIRTY)
        };
        let mut kept = Vec::with_capacity(encoded.len());
        for enc in encoded {
            let _g = self.stripe(enc.index.0).lock().await;
            if unchanged(enc) {
                self.keyring.lock().expect("image keyring").set(enc.index, enc.keyring_entry());
                kept.push(enc);
            }
        }
        if kept.is_empty() {
            return Ok(0);
        }
        self.persist().await?;
        let mut n = 0;
        for enc in kept {
            let _g = self.stripe(enc.index.0).lock().await;
            // Written again after the keyring took it: the entry stays dirty (the keyring's tag is the content
            // of a flushed state, what a crash falls back to).
            if unchanged(enc) {
                // An all-zero chunk has no convergent chunk: its entry is the zero tag's, which takes no key.
                let (tag, key) = enc.keyring_entry().unwrap_or((Tag::ZERO, ChunkKey([0; 32])));
                self.runtime.set_entry(enc.index.0, self.runtime.clean_entry(enc.index.0, &tag, &key))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// A point-in-time copy for a sync of the running image: no write in flight (new ones wait), everything
    /// written so far flushed, every dirty chunk encoded. Returns the keyring of that state and the chunks
    /// encoded for it (to send, then [`Self::settle`]). Writes go on as soon as it returns.
    pub async fn snapshot(&self) -> Result<(Keyring, Vec<EncodedDirty>), ClientError> {
        let _quiet = self.gate.write().await;
        self.flush().await?;
        let dirty = self.runtime.chunks_with(state::DIRTY);
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let encoded: Vec<EncodedDirty> = futures::stream::iter(dirty)
            .map(|i| self.encode_dirty(ChunkIndex(i)))
            .buffer_unordered(threads)
            .try_filter_map(|e| async move { Ok(e) })
            .try_collect()
            .await?;
        let mut keyring = self.keyring();
        for enc in &encoded {
            keyring.set(enc.index, enc.keyring_entry());
        }
        Ok((keyring, encoded))
    }

    /// A sync of the running image committed `tags` as the new base: the working keyring is written again
    /// (or removed, when the image is that base).
    pub async fn rebase(&self, tags: Vec<Tag>) -> Result<(), ClientError> {
        *self.base_tags.lock().expect("base tags") = tags;
        self.persist().await
    }

    /// Encode every dirty chunk convergently into the cache (durably, several at a time), then write the new
    /// working keyring, then mark those chunks clean ([`Self::settle`]). Returns how many chunks were encoded.
    pub async fn encode_changes(&self) -> Result<usize, ClientError> {
        let dirty = self.runtime.chunks_with(state::DIRTY);
        if dirty.is_empty() {
            return Ok(0);
        }
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        let encoded: Vec<EncodedDirty> = futures::stream::iter(dirty)
            .map(|i| async move {
                let Some(enc) = self.encode_dirty(ChunkIndex(i)).await? else { return Ok(None) };
                if let Some((tag, _, stored)) = &enc.chunk {
                    self.cache.put_durable(tag, stored.clone()).await?;
                }
                Ok::<_, ClientError>(Some(enc))
            })
            .buffer_unordered(threads)
            .try_filter_map(|e| async move { Ok(e) })
            .try_collect()
            .await?;
        let n = self.settle(&encoded).await?;
        let rt = self.runtime.clone();
        tokio::task::spawn_blocking(move || rt.flush()).await.map_err(join_err)??;
        Ok(n)
    }

    /// Drop clean chunks from the runtime image (decoded again when read).
    pub async fn forget(&self, chunks: &[u64]) -> Result<(), ClientError> {
        self.ready.lock().expect("ready chunks").clear();
        let (rt, chunks) = (self.runtime.clone(), chunks.to_vec());
        tokio::task::spawn_blocking(move || {
            for i in chunks {
                rt.drop_chunk(i)?;
            }
            rt.flush()
        })
        .await
        .map_err(join_err)??;
        Ok(())
    }

    /// Verify every present clean chunk against its plaintext MAC; returns the chunks that fail.
    pub async fn verify_local(&self) -> Result<Vec<u64>, ClientError> {
        let rt = self.runtime.clone();
        Ok(tokio::task::spawn_blocking(move || rt.verify_all()).await.map_err(join_err)??)
    }

    /// Allocation of `len` bytes at `offset` for NBD block status, per chunk: a zero chunk (of the keyring,
    /// or zeroed here) is a hole reading as zeroes, the rest is data. Never fetches anything.
    pub fn block_status(&self, offset: u64, len: u32) -> std::io::Result<Vec<isr_nbd::proto::Extent>> {
        use isr_nbd::proto::{state as nbd, Extent};
        self.check_range(offset, len as u64)?;
        let cs = self.chunk_size;
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len as u64;
        for i in cs.chunks_in_range(ByteOffset(offset), len as u64) {
            let chunk_end = (cs.offset_of(ChunkIndex(i)).0 + self.chunk_len(i) as u64).min(end);
            let flags = match self.held(i) {
                Held::Zero => nbd::HOLE | nbd::ZERO,
                Held::Local | Held::Remote(..) => 0,
            };
            out.push(Extent { len: (chunk_end - pos) as u32, flags });
            pos = chunk_end;
        }
        Ok(out)
    }

    /// Fill the chunks of a range into the runtime image (NBD_CMD_CACHE, hoard), several at a time; returns
    /// once they are there.
    pub async fn prefetch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.check_range(offset, len)?;
        let remote: Vec<u64> = self
            .chunk_size
            .chunks_in_range(ByteOffset(offset), len)
            .filter(|&i| matches!(self.held(i), Held::Remote(..)))
            .collect();
        let results: Vec<Result<(), ClientError>> = futures::stream::iter(remote)
            .map(|i| self.fill(i))
            .buffer_unordered(PREFETCH_IN_FLIGHT)
            .collect()
            .await;
        results.into_iter().collect::<Result<(), _>>().map_err(eio)
    }

    /// How many chunks are held only remotely (not yet in the runtime image).
    pub fn remote_chunks(&self) -> u64 {
        (0..self.runtime.chunk_count()).filter(|&i| matches!(self.held(i), Held::Remote(..))).count() as u64
    }

    /// Zero a range only where that needs no decode (NBD fast zero): every chunk it covers only partly must
    /// be local or zero already; else `Unsupported`, before anything changed.
    pub async fn write_zeroes_fast(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.check_range(offset, len)?;
        let cs = self.chunk_size;
        let slow = cs.chunks_in_range(ByteOffset(offset), len).any(|i| {
            let start = cs.offset_of(ChunkIndex(i)).0;
            let whole = offset <= start && start + self.chunk_len(i) as u64 <= offset + len;
            !whole && matches!(self.held(i), Held::Remote(..))
        });
        if slow {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "zeroing part of a chunk that is not here yet needs a decode",
            ));
        }
        self.write_zeroes(offset, len).await
    }

    /// Flush, and close the runtime image cleanly (the next open needs no recovery).
    pub async fn close(&self) -> Result<(), ClientError> {
        let rt = self.runtime.clone();
        tokio::task::spawn_blocking(move || rt.close()).await.map_err(join_err)??;
        Ok(())
    }

    /// Write the working keyring (or remove it when the image equals its base again).
    async fn persist(&self) -> Result<(), ClientError> {
        let keyring = self.keyring();
        let path = self.work_path.clone();
        if keyring.tags() == self.base_tags.lock().expect("base tags").as_slice() {
            return match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(ClientError::io(format!("removing {}", path.display()), e)),
            };
        }
        let keyroot = self.keyroot.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &keyring.seal(&keyroot)))
            .await
            .map_err(join_err)?
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
    async fn read_sparse_owned(
        &self,
        offset: u64,
        buf: Vec<u8>,
    ) -> (Vec<u8>, std::io::Result<Vec<std::ops::Range<u32>>>) {
        self.0.read_sparse_owned(offset, buf).await
    }
    async fn read_scattered(&self, offset: u64, buf: Vec<u8>) -> (Vec<u8>, std::io::Result<Vec<ReadSpan>>) {
        self.0.read_scattered(offset, buf).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Lookaside;

    const CHUNKS: u64 = 80;

    /// Chunk `i`'s content: distinct per chunk, every fourth one zero.
    fn content(i: u64, clen: usize) -> Vec<u8> {
        if i % 4 == 3 {
            return vec![0; clen];
        }
        let mut b = vec![0u8; clen];
        blake3::Hasher::new().update(&i.to_le_bytes()).finalize_xof().fill(&mut b);
        b
    }

    /// An image of [`CHUNKS`] chunks whose stored chunks are only in a lookaside directory (the cold case:
    /// nothing in the chunk cache).
    fn cold_image(dir: &std::path::Path) -> Arc<WorkingImage> {
        let cs = ChunkSize::DEFAULT;
        let clen = cs.bytes() as usize;
        let mut keyring = Keyring::new(cs, ImageLen(CHUNKS * clen as u64)).unwrap();
        let secret = ConvergenceSecret::random();
        let stick = dir.join("stick");
        std::fs::create_dir_all(&stick).unwrap();
        let mut enc = ChunkEncoder::new(secret.clone());
        for i in 0..CHUNKS {
            if let Some(e) = enc.encode(&content(i, clen)).unwrap() {
                std::fs::write(&Lookaside::paths_in(&stick, &e.tag)[1], &e.stored).unwrap();
                keyring.set(ChunkIndex(i), Some((e.tag, e.key)));
            }
        }
        let cache = ChunkCache::open(&dir.join("cache")).unwrap();
        let sources = Arc::new(ChunkSources::new(cache, vec![stick], None));
        let tags = keyring.tags().to_vec();
        let img = WorkingImage::new(
            keyring,
            tags,
            Keyroot::random(),
            dir.join("work.keyring"),
            dir.join("runtime.img"),
            sources,
            secret,
        )
        .unwrap();
        Arc::new(img)
    }

    async fn settle(img: &WorkingImage) {
        while img.fills_in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cold_read_fills_the_runtime_image_and_not_the_chunk_cache() {
        let dir = tempfile::tempdir().unwrap();
        let img = cold_image(dir.path());
        let clen = img.chunk_size().bytes() as usize;
        let mut all = Vec::new();
        for i in 0..CHUNKS {
            all.extend(content(i, clen));
        }
        // 1 MiB requests in order, as a sequential reader (qemu-img, a guest's boot) sends them.
        let step = 8 * clen;
        for at in (0..all.len()).step_by(step) {
            let (got, r) = img.read_owned(at as u64, vec![0; step]).await;
            r.unwrap();
            assert!(got == all[at..at + step], "bytes {at}+{step}");
        }
        settle(&img).await;
        assert_eq!(img.remote_chunks(), 0, "every chunk is in the runtime image now");
        let keyring = img.keyring();
        let stored: Vec<Tag> = keyring.tags().iter().copied().filter(|t| !t.is_zero()).collect();
        for t in &stored {
            assert!(!img.cache.contains_blocking(t), "a fill kept {t} in the chunk cache");
        }
        let s = img.stats.sources.snapshot();
        assert_eq!(s.lookaside_chunks, stored.len() as u64, "each chunk fetched once: {s:?}");
        // Read again: from the runtime image (the stick may go away).
        std::fs::remove_dir_all(dir.path().join("stick")).unwrap();
        let (got, r) = img.read_owned(0, vec![0; all.len()]).await;
        r.unwrap();
        assert!(got == all);
    }

    /// The bytes a read's spans stand for: `buf` where they say so, zeroes for holes, shared slices as they are.
    fn join_spans(buf: &[u8], spans: &[ReadSpan]) -> Vec<u8> {
        let mut out = Vec::with_capacity(buf.len());
        for s in spans {
            let at = out.len();
            match s {
                ReadSpan::Buffer(n) => out.extend_from_slice(&buf[at..at + *n as usize]),
                ReadSpan::Hole(n) => out.resize(at + *n as usize, 0),
                ReadSpan::Shared(b) => out.extend_from_slice(b),
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scattered_read_hands_over_decoded_chunks_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let img = cold_image(dir.path());
        let clen = img.chunk_size().bytes() as usize;
        let all: Vec<u8> = (0..CHUNKS).flat_map(|i| content(i, clen)).collect();
        // Cold, 1 MiB at a time from a mid-chunk offset: fetched and read-ahead chunks come as shared
        // slices, zero chunks as holes; the poisoned buffer shows through nowhere.
        let (step, first) = (8 * clen, 4096);
        let mut shared = 0;
        for at in (first..all.len() - step).step_by(step) {
            let (buf, r) = img.read_scattered(at as u64, vec![0xee; step]).await;
            let spans = r.unwrap();
            assert_eq!(spans.iter().map(ReadSpan::len).sum::<usize>(), step);
            assert!(spans.iter().all(|s| !s.is_empty()));
            assert!(join_spans(&buf, &spans) == all[at..at + step], "bytes {at}+{step}");
            shared += spans.iter().filter(|s| matches!(s, ReadSpan::Shared(_))).count();
            for w in spans.windows(2) {
                let same = matches!((&w[0], &w[1]), (ReadSpan::Hole(_), ReadSpan::Hole(_)))
                    || matches!((&w[0], &w[1]), (ReadSpan::Buffer(_), ReadSpan::Buffer(_)));
                assert!(!same, "adjacent spans of one kind are merged: {spans:?}");
            }
        }
        assert!(shared > 0, "no decoded chunk was handed over");
        settle(&img).await;
        // Warm: every chunk from the runtime image into the buffer, zero chunks still holes.
        let (buf, r) = img.read_scattered(0, vec![0xee; 16 * clen]).await;
        let spans = r.unwrap();
        assert!(join_spans(&buf, &spans) == all[..16 * clen]);
        assert!(spans.iter().any(|s| matches!(s, ReadSpan::Hole(_))));
        // The sparse read sees the same bytes, its holes where the zero chunks are.
        let (buf, r) = img.read_sparse_owned(0, vec![0xee; 16 * clen]).await;
        let holes = r.unwrap();
        assert_eq!(holes, [3, 7, 11, 15].map(|k| (k * clen) as u32..((k + 1) * clen) as u32));
        let mut expect = all[..16 * clen].to_vec();
        for h in &holes {
            expect[h.start as usize..h.end as usize].fill(0xee);
        }
        assert!(buf == expect);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_after_read_ahead_is_what_the_next_read_sees() {
        let dir = tempfile::tempdir().unwrap();
        let img = cold_image(dir.path());
        let clen = img.chunk_size().bytes() as usize;
        // Two chunks read: read-ahead fills the next ones and leaves their plaintext waiting.
        let (_, r) = img.read_owned(0, vec![0; 2 * clen]).await;
        r.unwrap();
        settle(&img).await;
        assert!(!img.ready.lock().unwrap().chunks.is_empty(), "read-ahead left plaintext for the reader");
        // Chunk 5 rewritten in part, chunk 6 whole, chunk 9 zeroed: none of the waiting plaintext may be served.
        let at5 = 5 * clen as u64 + 4096;
        img.write(at5, &[0xa5; 8192]).await.unwrap();
        img.write(6 * clen as u64, &vec![0x5a; clen]).await.unwrap();
        img.write_zeroes(9 * clen as u64, clen as u64).await.unwrap();
        let (got, r) = img.read_owned(4 * clen as u64, vec![0; 8 * clen]).await;
        r.unwrap();
        let chunk = |k: u64| &got[(k - 4) as usize * clen..(k - 3) as usize * clen];
        assert!(chunk(4) == content(4, clen), "chunk 4 (from the waiting plaintext)");
        let mut five = content(5, clen);
        five[4096..4096 + 8192].fill(0xa5);
        assert!(chunk(5) == five, "chunk 5 shows the partial write");
        assert!(chunk(6).iter().all(|&b| b == 0x5a), "chunk 6 shows the whole write");
        assert!(chunk(7) == content(7, clen));
        assert!(chunk(9).iter().all(|&b| b == 0), "chunk 9 was zeroed");
        assert!(chunk(10) == content(10, clen));
        assert_eq!(img.dirty_chunks(), 3);
    }

    /// Every kind of write, each against what the chunk was (absent, present, zero; whole, part, unaligned),
    /// reads back as written; zeroes written over a zero chunk leave it as it was, not dirty.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_of_every_kind_read_back_and_zeroes_over_zeroes_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let img = cold_image(dir.path());
        let clen = img.chunk_size().bytes() as usize;
        let mut want: Vec<u8> = (0..CHUNKS).flat_map(|i| content(i, clen)).collect();
        let at = |i: u64| i as usize * clen;
        // Chunks 0-2 absent; 3 zero (in the keyring); 4 made present by a read.
        let (_, r) = img.read_owned(at(4) as u64, vec![0; clen]).await;
        r.unwrap();
        img.write_zeroes(at(3) as u64, clen as u64).await.unwrap();
        img.write_zeroes(at(7) as u64 + 8192, 4096).await.unwrap();
        assert_eq!(img.dirty_chunks(), 0, "zeroes over zeroes changed something");
        let mut writes: Vec<(usize, Vec<u8>)> = vec![
            (at(0), vec![0x11; clen]),         // whole, absent: nothing fetched
            (at(1) + 4096, vec![0x22; 8192]),  // part of an absent chunk, sector-aligned
            (at(2) + 100, vec![0x33; 5000]),   // part of an absent chunk, unaligned
            (at(3) + 512, vec![0x44; 4096]),   // part of a zero chunk
            (at(4) + 4095, vec![0x55; 2]),     // across a sector boundary of a present chunk
            (at(4) + 8192, vec![0x66; 65536]), // sectors of a present chunk
            (at(5) - 4096, vec![0x77; clen]),  // across two chunks, present and absent
        ];
        writes.push((at(7), vec![0x88; clen])); // whole, over a zero chunk
        for (off, data) in &writes {
            img.write(*off as u64, data).await.unwrap();
            want[*off..off + data.len()].copy_from_slice(data);
        }
        img.write_zeroes(at(8) as u64, 2 * clen as u64).await.unwrap();
        want[at(8)..at(10)].fill(0);
        let (got, r) = img.read_owned(0, vec![0; at(12)]).await;
        r.unwrap();
        for i in 0..12 {
            assert!(got[at(i)..at(i + 1)] == want[at(i)..at(i + 1)], "chunk {i}");
        }
        img.flush().await.unwrap();
        assert_eq!(img.dirty_chunks(), 9, "chunks 0-5 and 7-9 changed");
        assert!(matches!(img.held(11), Held::Zero), "chunk 11 was zero before and is untouched");
    }
}
