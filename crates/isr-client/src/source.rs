//! Where stored chunks come from: one small trait, [`ChunkSource`], and layers that wrap each other (the way
//! nbdkit filters or rustic's backends do). Every command that reads chunks (`checkout`, `hoard`, `disk`,
//! `resume`, `export`, `check --repair`) asks the same stack, built by [`ChunkSources::new`]:
//!
//! ```text
//! Coalescing ─ one fetch per tag however many readers want it
//!  └ Cached ─ the local chunk cache; what comes from below is kept in it
//!     └ Lookaside ─ directories of chunk files (a USB stick, a peer's cache); verified by tag, wrong ones ignored
//!        └ Remote ─ the server; verified by tag; transient failures retried with backoff
//! ```
//!
//! The runtime image's fills ask the part below the cache ([`ChunkSources::get_uncached`]): a chunk decoded
//! there lives in the runtime image, and only `hoard` keeps chunks in the cache for disconnected use.
//!
//! A source answers `Ok(None)` when it does not hold a chunk, so the layer above can ask the next one; only
//! the top of the stack turns "nobody has it" into an error.

use crate::cache::ChunkCache;
use crate::error::ClientError;
use crate::transport::Transport;
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use isr_format::Tag;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A chunk's stored (encrypted) bytes, or `None` when this source does not hold it.
pub type ChunkFuture<'a> = BoxFuture<'a, Result<Option<Bytes>, ClientError>>;

/// One place chunks can come from. What a source returns is a chunk's stored bytes; sources that read
/// untrusted copies (the server, a lookaside directory) verify them against the tag before returning them.
pub trait ChunkSource: Send + Sync + std::fmt::Debug {
    fn get<'a>(&'a self, tag: &'a Tag) -> ChunkFuture<'a>;
}

/// Where the chunks of a run came from (the same counters for every layer of one stack).
#[derive(Debug, Default)]
pub struct SourceStats {
    pub remote_chunks: AtomicU64,
    pub remote_bytes: AtomicU64,
    pub lookaside_chunks: AtomicU64,
    pub lookaside_bytes: AtomicU64,
    /// Lookaside files that did not match their tag (ignored, fetched elsewhere).
    pub lookaside_rejected: AtomicU64,
    /// Transient server failures retried.
    pub retries: AtomicU64,
}

/// A copy of [`SourceStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SourceCounts {
    pub remote_chunks: u64,
    pub remote_bytes: u64,
    pub lookaside_chunks: u64,
    pub lookaside_bytes: u64,
    pub lookaside_rejected: u64,
    pub retries: u64,
}

impl SourceStats {
    pub fn snapshot(&self) -> SourceCounts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SourceCounts {
            remote_chunks: l(&self.remote_chunks),
            remote_bytes: l(&self.remote_bytes),
            lookaside_chunks: l(&self.lookaside_chunks),
            lookaside_bytes: l(&self.lookaside_bytes),
            lookaside_rejected: l(&self.lookaside_rejected),
            retries: l(&self.retries),
        }
    }
}

/// Attempts of one chunk fetch when the server is unreachable or overloaded (then the error stands).
const REMOTE_ATTEMPTS: u32 = 4;
const REMOTE_BACKOFF: Duration = Duration::from_millis(200);
/// Batched fetches (`POST chunks/fetch`) in flight at once.
const BATCHES_IN_FLIGHT: usize = 3;
/// Most chunks in one batched fetch (4 MiB of stored chunks at the default chunk size): small enough that the
/// chunk a reader waits for is never far behind in the answer. 16 x 4 and 64 x 2 were measured too (cold
/// sequential read, docs/performance.md): 32 x 3 was as fast as the larger batches.
const BATCH_TAGS: usize = 32;
const _: () = assert!(BATCH_TAGS <= isr_wire::limits::MAX_FETCH_TAGS);

type Reply = tokio::sync::oneshot::Sender<Result<Option<Bytes>, ClientError>>;

/// Fetches waiting for a batch, and how many batches run.
#[derive(Default)]
struct Batches {
    waiting: std::collections::VecDeque<(Tag, Reply)>,
    running: usize,
}

/// The server. A chunk it does not have is `None`; unreachable or 5xx answers are retried with backoff, any
/// other failure (a chunk that fails its tag, a refusal) is not.
///
/// Fetches are batched: each `get` waits in a queue, and up to [`BATCHES_IN_FLIGHT`] tasks each take up to
/// [`BATCH_TAGS`] waiting tags into one `POST chunks/fetch`, handing every chunk to its waiter as soon as it
/// has arrived. Nothing waits to fill a batch: a lone fetch goes alone, and the fetches that queue up while
/// the batches in flight are busy go together in the next one (one request and one answer for many chunks,
/// where a GET per chunk cost both ends a request each).
#[derive(Debug, Clone)]
pub struct Remote {
    inner: Arc<RemoteInner>,
}

struct RemoteInner {
    transport: Transport,
    stats: Arc<SourceStats>,
    batches: Mutex<Batches>,
}

impl std::fmt::Debug for RemoteInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("server", &self.transport.server()).finish_non_exhaustive()
    }
}

impl Remote {
    pub fn new(transport: Transport, stats: Arc<SourceStats>) -> Remote {
        Remote { inner: Arc::new(RemoteInner { transport, stats, batches: Mutex::default() }) }
    }
}

/// A batch task's place in [`Batches::running`]. Given back by [`Self::next_batch`] once nothing waits. Dropped
/// before that (its task was cancelled: the runtime is shutting down), it gives the place back itself and,
/// when no other batch task is left, fails the fetches still waiting (their senders are dropped), whose
/// waiters would otherwise wait for a task that never comes.
struct BatchSlot {
    remote: Arc<RemoteInner>,
    given_back: bool,
}

impl BatchSlot {
    /// The next batch, or `None` (and the place given back) when nothing waits.
    fn next_batch(&mut self) -> Option<Vec<(Tag, Reply)>> {
        let mut b = self.remote.batches.lock().expect("batch queue");
        if b.waiting.is_empty() {
            b.running -= 1;
            self.given_back = true;
            return None;
        }
        let n = b.waiting.len().min(BATCH_TAGS);
        Some(b.waiting.drain(..n).collect())
    }
}

impl Drop for BatchSlot {
    fn drop(&mut self) {
        if !self.given_back {
            let mut b = self.remote.batches.lock().unwrap_or_else(|e| e.into_inner());
            b.running -= 1;
            if b.running == 0 {
                b.waiting.clear();
            }
        }
    }
}

impl RemoteInner {
    /// Run batches until nothing waits.
    async fn run_batches(self: Arc<Self>) {
        let mut slot = BatchSlot { remote: self.clone(), given_back: false };
        while let Some(batch) = slot.next_batch() {
            self.fetch_batch(batch).await;
        }
    }

    /// One batch: every waiter gets its chunk, `None`, or the error that stood after the retries.
    async fn fetch_batch(&self, batch: Vec<(Tag, Reply)>) {
        let (tags, mut replies): (Vec<Tag>, Vec<Option<Reply>>) =
            batch.into_iter().map(|(t, r)| (t, Some(r))).unzip();
        let (mut from, mut attempt) = (0, 1);
        loop {
            let mut delivered = from;
            let r = self
                .transport
                .fetch_chunks(&tags[from..], |k, chunk| {
                    if let Ok(Some(b)) = &chunk {
                        self.stats.remote_chunks.fetch_add(1, Ordering::Relaxed);
                        self.stats.remote_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                    }
                    if let Some(reply) = replies[from + k].take() {
                        // A waiter that gave up is no error here.
                        let _ = reply.send(chunk);
                    }
                    delivered = from + k + 1;
                })
                .await;
            match r {
                Ok(()) => return,
                Err(_) if delivered == tags.len() => return,
                Err(e) if e.is_transient() && attempt < REMOTE_ATTEMPTS => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        chunks = tags.len() - delivered,
                        attempt,
                        "batched fetch failed, retrying: {e}"
                    );
                    tokio::time::sleep(REMOTE_BACKOFF * 4u32.pow(attempt - 1)).await;
                    (from, attempt) = (delivered, attempt + 1);
                }
                Err(e) => {
                    for reply in replies[delivered..].iter_mut().filter_map(Option::take) {
                        let _ = reply.send(Err(ClientError::shared(&e)));
                    }
                    return;
                }
            }
        }
    }
}

impl ChunkSource for Remote {
    fn get<'a>(&'a self, tag: &'a Tag) -> ChunkFuture<'a> {
        async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let start = {
                let mut b = self.inner.batches.lock().expect("batch queue");
                b.waiting.push_back((*tag, tx));
                let start = b.running < BATCHES_IN_FLIGHT;
                if start {
                    b.running += 1;
                }
                start
            };
            if start {
                tokio::spawn(self.inner.clone().run_batches());
            }
            rx.await.unwrap_or_else(|_| {
                Err(ClientError::Other(format!(
                    "the fetch of chunk {tag} was abandoned (the client is stopping)"
                )))
            })
        }
        .boxed()
    }
}

/// Directories of chunk files: the layout of a chunk cache or server store (`ab/abcd...`, by hex tag) or
/// flat (`abcd...`). Every file is verified against its tag; one that does not match is ignored (and
/// counted), so a stale or tampered stick can cost a fetch, never wrong data.
#[derive(Debug)]
pub struct Lookaside {
    dirs: Vec<PathBuf>,
    stats: Arc<SourceStats>,
}

impl Lookaside {
    pub fn new(dirs: Vec<PathBuf>, stats: Arc<SourceStats>) -> Lookaside {
        Lookaside { dirs, stats }
    }

    /// The candidate paths of `tag` in `dir`.
    pub fn paths_in(dir: &Path, tag: &Tag) -> [PathBuf; 2] {
        let hex = tag.to_hex();
        [dir.join(&hex[..2]).join(&hex), dir.join(hex)]
    }

    fn find_blocking(dirs: &[PathBuf], tag: &Tag, stats: &SourceStats) -> Option<Bytes> {
        for dir in dirs {
            for path in Lookaside::paths_in(dir, tag) {
                let Ok(bytes) = std::fs::read(&path) else { continue };
                match isr_format::codec::verify_tag(tag, &bytes) {
                    Ok(()) => {
                        stats.lookaside_chunks.fetch_add(1, Ordering::Relaxed);
                        stats.lookaside_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        return Some(Bytes::from(bytes));
                    }
                    Err(e) => {
                        stats.lookaside_rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("lookaside {}: {e}: ignored", path.display());
                    }
                }
            }
        }
        None
    }

    /// Whether a file for `tag` exists in some directory (not verified: for counting what a disconnected run
    /// can reach).
    pub fn has_file(&self, tag: &Tag) -> bool {
        self.dirs.iter().any(|d| Lookaside::paths_in(d, tag).iter().any(|p| p.is_file()))
    }
}

impl ChunkSource for Lookaside {
    fn get<'a>(&'a self, tag: &'a Tag) -> ChunkFuture<'a> {
        async move {
            if self.dirs.is_empty() {
                return Ok(None);
            }
            let (dirs, tag, stats) = (self.dirs.clone(), *tag, self.stats.clone());
            tokio::task::spawn_blocking(move || Lookaside::find_blocking(&dirs, &tag, &stats))
                .await
                .map_err(|e| ClientError::Other(format!("lookaside task: {e}")))
        }
        .boxed()
    }
}

/// The sources tried in order; the first that holds a chunk answers.
#[derive(Debug)]
pub struct FirstOf(pub Vec<Arc<dyn ChunkSource>>);

impl ChunkSource for FirstOf {
    fn get<'a>(&'a self, tag: &'a Tag) -> ChunkFuture<'a> {
        async move {
            for s in &self.0 {
                if let Some(b) = s.get(tag).await? {
                    return Ok(Some(b));
                }
            }
            Ok(None)
        }
        .boxed()
    }
}

/// The local chunk cache in front of `below`: a cached copy is returned as it is (the decode that uses it
/// verifies it, and a failing one is evicted and fetched again through [`ChunkSources::refetch`]); what comes
/// from below (already verified) is kept.
#[derive(Debug)]
pub struct Cached {
    cache: ChunkCache,
    below: Arc<dyn ChunkSource>,
}

impl Cached {
    pub fn new(cache: ChunkCache, below: Arc<dyn ChunkSource>) -> Cached {
        Cached { cache, below }
    }
}

impl ChunkSource for Cached {
    fn get<'a>(&'a self, tag: &'a Tag) -> ChunkFuture<'a> {
        async move {
            if let Some(b) = self.cache.get(tag).await? {
                return Ok(Some(b));
            }
            let Some(b) = self.below.get(tag).await? else { return Ok(None) };
            self.cache.put_fetched(tag, b.clone()).await?;
            Ok(Some(b))
        }
        .boxed()
    }
}

type SharedGet = Shared<BoxFuture<'static, Result<Option<Bytes>, Arc<ClientError>>>>;

/// One request below per tag, however many callers want it at once. The request runs to its end even if
/// every caller gave up on it.
pub struct Coalescing {
    inner: Arc<dyn ChunkSource>,
    inflight: Arc<Mutex<HashMap<Tag, SharedGet>>>,
}

impl std::fmt::Debug for Coalescing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescing").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl Coalescing {
    pub fn new(inner: Arc<dyn ChunkSource>) -> Coalescing {
        Coalescing { inner, inflight: Arc::new(Mutex::new(HashMap::new())) }
    }

    fn shared(&self, tag: Tag) -> SharedGet {
        let mut inflight = self.inflight.lock().expect("in-flight map");
        if let Some(f) = inflight.get(&tag) {
            return f.clone();
        }
        let (inner, map) = (self.inner.clone(), self.inflight.clone());
        let fut = async move {
            let r = inner.get(&tag).await.map_err(Arc::new);
            map.lock().expect("in-flight map").remove(&tag);
            r
        }
        .boxed()
        .shared();
        inflight.insert(tag, fut.clone());
        tokio::spawn(fut.clone());
        fut
    }
}

impl ChunkSource for Coalescing {
    fn get<'a>(&'a self, tag: &'a Tag) -> ChunkFuture<'a> {
        let fut = self.shared(*tag);
        async move { fut.await.map_err(|e| ClientError::shared(&e)) }.boxed()
    }
}

/// The stack every reader of chunks uses, and what it needs besides: eviction and refetch of a cached copy
/// that failed its decode, prefetch of many chunks, and counters of where chunks came from.
pub struct ChunkSources {
    top: Coalescing,
    /// Everything below the cache (lookaside, then the server): where a good copy of a bad cached one comes
    /// from.
    below_cache: Arc<dyn ChunkSource>,
    cache: ChunkCache,
    lookaside: Arc<Lookaside>,
    connected: bool,
    pub stats: Arc<SourceStats>,
}

impl std::fmt::Debug for ChunkSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkSources").field("connected", &self.connected).finish()
    }
}

impl ChunkSources {
    /// The stack over `cache`, the `lookaside` directories and, when connected, the server.
    pub fn new(cache: ChunkCache, lookaside: Vec<PathBuf>, server: Option<Transport>) -> ChunkSources {
        let stats = Arc::new(SourceStats::default());
        let lookaside = Arc::new(Lookaside::new(lookaside, stats.clone()));
        let mut below: Vec<Arc<dyn ChunkSource>> = vec![lookaside.clone()];
        let connected = server.is_some();
        if let Some(t) = server {
            below.push(Arc::new(Remote::new(t, stats.clone())));
        }
        let below_cache: Arc<dyn ChunkSource> = Arc::new(FirstOf(below));
        let top = Coalescing::new(Arc::new(Cached::new(cache.clone(), below_cache.clone())));
        ChunkSources { top, below_cache, cache, lookaside, connected, stats }
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Whether some source below the cache (the server, a lookaside directory) could supply a chunk.
    pub fn has_sources_below_cache(&self) -> bool {
        self.connected || !self.lookaside.dirs.is_empty()
    }

    /// The error of a chunk no source holds.
    pub(crate) fn nobody_has(&self, tag: &Tag) -> ClientError {
        if self.connected {
            ClientError::NotFound(format!("chunk {tag}: the server has no copy (nor the cache or lookaside)"))
        } else {
            ClientError::Other(format!(
                "chunk {tag} is not in the local cache (nor a lookaside directory) and the client is disconnected"
            ))
        }
    }

    /// The stored bytes of `tag`: from the cache (not verified here: the decode verifies), else from a
    /// lookaside directory or the server (verified) and then cached.
    pub async fn get(&self, tag: &Tag) -> Result<Bytes, ClientError> {
        self.top.get(tag).await?.ok_or_else(|| self.nobody_has(tag))
    }

    /// A cached copy of `tag` failed its decode (`failure`): drop it and take a good copy (verified) from a
    /// lookaside directory or the server. With neither holding one, `failure` stands (never wrong data).
    pub async fn refetch(&self, tag: &Tag, failure: ClientError) -> Result<Bytes, ClientError> {
        self.cache.evict(tag)?;
        match self.below_cache.get(tag).await? {
            Some(b) => {
                self.cache.put_fetched(tag, b.clone()).await?;
                Ok(b)
            }
            None => Err(failure),
        }
    }

    /// A copy of `tag` from below the cache (a lookaside directory or the server, verified by tag), not kept
    /// in the cache, if any source has one: for the runtime image's fills, which keep the decoded chunk
    /// themselves, and for `check --repair` after it evicted a bad copy.
    pub async fn get_uncached(&self, tag: &Tag) -> Result<Option<Bytes>, ClientError> {
        self.below_cache.get(tag).await
    }

    /// Bring every chunk of `chunks` (tag, plain length) into the cache, `in_flight` at a time (callers pass
    /// what [`ChunkSources::not_cached`] found); `advance(stored, plain)` is called per chunk.
    pub async fn prefetch(
        &self,
        chunks: &[(Tag, u64)],
        in_flight: usize,
        mut advance: impl FnMut(u64, u64),
    ) -> Result<(), ClientError> {
        let results = futures::stream::iter(chunks.iter().copied())
            .map(|(tag, len)| async move {
                let b = self.get(&tag).await?;
                Ok::<(u64, u64), ClientError>((b.len() as u64, len))
            })
            .buffer_unordered(in_flight.max(1));
        futures::pin_mut!(results);
        while let Some(r) = results.next().await {
            let (stored, plain) = r?;
            advance(stored, plain);
        }
        Ok(())
    }

    /// The distinct, non-zero chunks of `chunks` that the cache lacks.
    pub async fn not_cached(&self, chunks: &[(Tag, u64)]) -> Vec<(Tag, u64)> {
        let (cache, chunks) = (self.cache.clone(), chunks.to_vec());
        tokio::task::spawn_blocking(move || {
            let mut seen = std::collections::HashSet::new();
            chunks
                .into_iter()
                .filter(|(t, _)| !t.is_zero() && seen.insert(*t))
                .filter(|(t, _)| !cache.contains_blocking(t))
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// How many distinct chunks of `tags` neither the cache nor a lookaside directory holds (what a
    /// disconnected run could not read).
    pub fn missing_locally_blocking(&self, tags: &[Tag]) -> usize {
        let mut seen = std::collections::HashSet::new();
        tags.iter()
            .filter(|t| !t.is_zero() && seen.insert(**t))
            .filter(|t| !self.cache.contains_blocking(t) && !self.lookaside.has_file(t))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isr_format::{ChunkEncoder, ConvergenceSecret};

    fn chunk(data: &[u8]) -> (Tag, Bytes) {
        let e = ChunkEncoder::new(ConvergenceSecret::random()).encode(data).unwrap().unwrap();
        (e.tag, Bytes::from(e.stored))
    }

    #[derive(Debug)]
    struct Counting {
        chunks: HashMap<Tag, Bytes>,
        asked: AtomicU64,
    }

    impl ChunkSource for Counting {
        fn get<'a>(&'a self, tag: &'a Tag) -> ChunkFuture<'a> {
            async move {
                self.asked.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(self.chunks.get(tag).cloned())
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn lookaside_verifies_every_file_and_ignores_wrong_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (good_tag, good) = chunk(b"good chunk");
        let (bad_tag, bad) = chunk(b"another chunk");
        // good in the cache layout, bad flat with wrong bytes (someone else's chunk under its name)
        let p = &Lookaside::paths_in(dir.path(), &good_tag)[0];
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, &good).unwrap();
        std::fs::write(&Lookaside::paths_in(dir.path(), &bad_tag)[1], &good).unwrap();
        let stats = Arc::new(SourceStats::default());
        let l = Lookaside::new(vec![dir.path().join("absent"), dir.path().to_owned()], stats.clone());
        assert_eq!(l.get(&good_tag).await.unwrap(), Some(good.clone()));
        assert_eq!(l.get(&bad_tag).await.unwrap(), None, "a file that fails its tag is never returned");
        let s = stats.snapshot();
        assert_eq!((s.lookaside_chunks, s.lookaside_rejected), (1, 1));
        assert!(l.has_file(&bad_tag) && l.has_file(&good_tag));
        drop(bad);
    }

    #[tokio::test]
    async fn the_cache_keeps_what_comes_from_below_and_coalescing_asks_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path()).unwrap();
        let (tag, stored) = chunk(b"some data");
        let below =
            Arc::new(Counting { chunks: HashMap::from([(tag, stored.clone())]), asked: AtomicU64::new(0) });
        let top = Coalescing::new(Arc::new(Cached::new(cache.clone(), below.clone())));
        let (a, b, c) = futures::join!(top.get(&tag), top.get(&tag), top.get(&tag));
        for r in [a, b, c] {
            assert_eq!(r.unwrap(), Some(stored.clone()));
        }
        assert_eq!(below.asked.load(Ordering::SeqCst), 1, "three readers, one request below");
        assert!(cache.contains(&tag).await.unwrap());
        assert_eq!(top.get(&tag).await.unwrap(), Some(stored));
        assert_eq!(below.asked.load(Ordering::SeqCst), 1, "the second time from the cache");
        let (absent, _) = chunk(b"nobody has this");
        assert_eq!(top.get(&absent).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_bad_cached_copy_is_replaced_from_lookaside_without_a_server() {
        let cache_dir = tempfile::tempdir().unwrap();
        let stick = tempfile::tempdir().unwrap();
        let (tag, stored) = chunk(b"the real content");
        let sources = ChunkSources::new(ChunkCache::open(cache_dir.path()).unwrap(), vec![], None);
        sources.cache().put_fetched(&tag, Bytes::from_static(b"garbage")).await.unwrap();
        let failure = ClientError::Integrity("bad".into());
        let e = sources.refetch(&tag, failure).await.unwrap_err();
        assert!(matches!(e, ClientError::Integrity(_)), "no source: the failure stands: {e}");

        std::fs::write(&Lookaside::paths_in(stick.path(), &tag)[1], &stored).unwrap();
        let sources =
            ChunkSources::new(ChunkCache::open(cache_dir.path()).unwrap(), vec![stick.path().into()], None);
        sources.cache().put_fetched(&tag, Bytes::from_static(b"garbage")).await.unwrap();
        let good = sources.refetch(&tag, ClientError::Integrity("bad".into())).await.unwrap();
        assert_eq!(good, stored);
        assert_eq!(sources.get(&tag).await.unwrap(), stored, "the good copy is cached now");
        assert_eq!(sources.missing_locally_blocking(&[tag]), 0);
        let (other, _) = chunk(b"elsewhere");
        assert_eq!(sources.missing_locally_blocking(&[other, other]), 1);
        let e = sources.get(&other).await.unwrap_err();
        assert!(e.to_string().contains("disconnected"), "{e}");
    }
}
