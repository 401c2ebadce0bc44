//! Trickle reintegration: while a parcel runs (`isr resume`, `isr disk`), the chunks the guest changed and
//! flushed are encoded and sent to the server in the background, so that the check-in after a suspend has
//! little left to send and the user can leave in seconds.
//!
//! One round ([`Trickle::round`]): the dirty chunks whose last write a flush covered are encoded as they are
//! now (each read under its chunk lock; in the background upload, [`Trickle::background_round`], encoded
//! after the lock is released on a thread of the lowest CPU priority), sent through a [`ChunkSink`] (the server: held under the parcel's
//! lock first, so gc spares them until the version that references them is committed), and only then
//! recorded as clean ([`WorkingImage::settle`]). A chunk written again while its upload was in flight keeps
//! its dirty mark (its write stamp moved on) and is sent again in a later round with its final content; a
//! chunk is never recorded as sent before its PUT succeeded.
//!
//! A running sync ([`Trickle::snapshot_and_send`]) takes a point-in-time copy of the image (writes held back
//! while the dirty chunks are encoded), sends what the server lacks and returns the keyring of that state.

use crate::background::Background;
use crate::error::ClientError;
use crate::image::{EncodedDirty, WorkingImage};
use crate::transport::Transport;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use isr_format::{Keyring, Tag};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Chunks encoded and sent per batch (4 MiB at the default chunk size): what is held in memory at once.
const BATCH_CHUNKS: usize = 32;
/// A round records what it sent by rewriting the working keyring once: a round covers at least this many
/// chunks, and at least 1/16 of the image (so the keyring, 64 bytes a chunk, costs under 1% of what a round
/// sends).
const MIN_ROUND_CHUNKS: usize = 256;
/// Rounds a running sync runs before its point-in-time copy (the rest goes into the copy).
const SYNC_DRAIN_ROUNDS: usize = 8;
/// Uploads in flight at once.
const UPLOADS_IN_FLIGHT: usize = 4;
/// How long an idle trickle waits before it looks again (a flush wakes it sooner).
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// Backoff after a failed round: doubles from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// Where a trickle sends chunks. After `send` returns Ok, every chunk given is safe where a later commit
/// looks for it.
#[async_trait::async_trait]
pub trait ChunkSink: Send + Sync + std::fmt::Debug {
    /// Send `chunks` (tag, stored bytes); returns the bytes actually transferred (chunks the other side had
    /// already cost nothing).
    async fn send(&self, chunks: &[(Tag, Bytes)]) -> Result<u64, ClientError>;
}

/// An upload rate bound (bytes per second), shared by every upload it paces.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: u64,
    next_free: Mutex<Instant>,
}

impl RateLimit {
    pub fn new(bytes_per_sec: u64) -> RateLimit {
        RateLimit { bytes_per_sec: bytes_per_sec.max(1), next_free: Mutex::new(Instant::now()) }
    }

    /// Wait for the slot of `bytes` (a token bucket of one second's burst).
    pub async fn pace(&self, bytes: u64) {
        let start = {
            let mut next = self.next_free.lock().expect("rate limit");
            let now = Instant::now();
            // At most one second of unused allowance carries over.
            let start = (*next).max(now.checked_sub(Duration::from_secs(1)).unwrap_or(now));
            *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }
}

/// Parse a rate such as `20M`, `512K`, `1G` or `1500000` (bytes per second; K, M, G are powers of 1024).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let (digits, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 =
        digits.trim().parse().map_err(|_| format!("not a rate: {s:?} (e.g. 20M, 512K, 1G bytes/s)"))?;
    if !n.is_finite() || n <= 0.0 {
        return Err(format!("a rate must be above zero: {s:?}"));
    }
    Ok(((n * mult as f64) as u64).max(1))
}

/// The server as a [`ChunkSink`]: each batch is held under the parcel's lock (so the server's gc keeps it
/// until a version references it), then only the chunks the server lacks are PUT, a few in flight, paced by
/// the rate limit and yielding to the guest's own fetches.
#[derive(Debug)]
pub struct ServerSink {
    transport: Transport,
    parcel: String,
    lock_id: String,
    limit: Option<Arc<RateLimit>>,
    /// The image whose demand fetches go first.
    image: Option<Arc<WorkingImage>>,
}

impl ServerSink {
    pub fn new(
        transport: Transport,
        parcel: &str,
        lock_id: &str,
        limit: Option<Arc<RateLimit>>,
        image: Option<Arc<WorkingImage>>,
    ) -> ServerSink {
        ServerSink { transport, parcel: parcel.into(), lock_id: lock_id.into(), limit, image }
    }
}

#[async_trait::async_trait]
impl ChunkSink for ServerSink {
    async fn send(&self, chunks: &[(Tag, Bytes)]) -> Result<u64, ClientError> {
        if chunks.is_empty() {
            return Ok(0);
        }
        let tags: Vec<Tag> = chunks.iter().map(|(t, _)| *t).collect();
        // Held first: from here on the server's gc spares them (a lost lock fails here, before any PUT).
        self.transport.hold_chunks(&self.parcel, &self.lock_id, &tags).await?;
        let missing: HashSet<Tag> = self.transport.missing(&tags).await?.into_iter().collect();
        let t = &self.transport;
        let to_send: Vec<(Tag, Bytes)> =
            chunks.iter().filter(|(tag, _)| missing.contains(tag)).cloned().collect();
        futures::stream::iter(to_send)
            .map(|(tag, stored)| async move {
                if let Some(image) = &self.image {
                    // The guest's reads wait on their fetches: they go first.
                    while image.demand_fetches() > 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                if let Some(limit) = &self.limit {
                    limit.pace(stored.len() as u64).await;
                }
                let n = stored.len() as u64;
                t.put_chunk(&tag, stored).await?;
                Ok::<u64, ClientError>(n)
            })
            .buffer_unordered(UPLOADS_IN_FLIGHT)
            .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
            .await
    }
}

/// What a trickle has done, for the running process's reports.
#[derive(Debug, Default)]
pub struct TrickleStats {
    /// Chunks recorded as sent (their content is on the server).
    pub chunks_sent: AtomicU64,
    /// Bytes transferred (chunks the server already had cost nothing).
    pub bytes_sent: AtomicU64,
    /// Chunks sent but written again during their upload (sent again later).
    pub chunks_superseded: AtomicU64,
    /// Rounds that failed (retried after a pause).
    pub failures: AtomicU64,
}

/// The background upload of one running image.
#[derive(Debug)]
pub struct Trickle {
    image: Arc<WorkingImage>,
    sink: Arc<dyn ChunkSink>,
    /// One round or snapshot at a time.
    busy: tokio::sync::Mutex<()>,
    /// Where the background rounds encode: a low-priority thread, so that the guest keeps its CPU.
    background: Background,
    pub stats: TrickleStats,
}

/// Who waits for a round's encoding: nobody (the background upload, which encodes at low priority) or a
/// user's sync (at normal priority, as fast as the machine allows).
#[derive(Debug, Clone, Copy)]
enum Urgency {
    Background,
    Now,
}

impl Trickle {
    pub fn new(image: Arc<WorkingImage>, sink: Arc<dyn ChunkSink>) -> Result<Trickle, ClientError> {
        Ok(Trickle {
            image,
            sink,
            busy: tokio::sync::Mutex::new(()),
            background: Background::start()?,
            stats: TrickleStats::default(),
        })
    }

    /// Encode, send and record a round of flushed dirty chunks, batch by batch; returns how many were
    /// recorded as sent (0: nothing was waiting). For a sync that someone waits for: it encodes at normal
    /// priority.
    pub async fn round(&self) -> Result<usize, ClientError> {
        self.round_until(&|| false, Urgency::Now).await
    }

    /// [`Self::round`] as the background upload runs it: each chunk's encoding at low priority, outside the
    /// chunk's lock.
    pub async fn background_round(&self) -> Result<usize, ClientError> {
        self.round_until(&|| false, Urgency::Background).await
    }

    /// A round that ends early, with what it sent recorded, once `stop` says so.
    async fn round_until(
        &self,
        stop: &(dyn Fn() -> bool + Sync),
        urgency: Urgency,
    ) -> Result<usize, ClientError> {
        let _one = self.busy.lock().await;
        let round = MIN_ROUND_CHUNKS.max(self.image.chunk_count() as usize / 16);
        let candidates = self.image.flushed_dirty(round);
        if candidates.is_empty() {
            return Ok(0);
        }
        let mut sent = Vec::with_capacity(candidates.len());
        let mut failed = None;
        for batch in candidates.chunks(BATCH_CHUNKS) {
            // One encode at a time (in the background, at the lowest priority too): the guest keeps the CPU.
            let mut encoded = Vec::with_capacity(batch.len());
            for &i in batch {
                let encoding = match urgency {
                    Urgency::Now => self.image.encode_dirty(i).await,
                    Urgency::Background => self.image.encode_dirty_in_background(i, &self.background).await,
                };
                match encoding {
                    Ok(Some(enc)) => encoded.push(enc),
                    Ok(None) => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if failed.is_some() {
                break;
            }
            match self.sink.send(&unique_chunks(&encoded)).await {
                Ok(n) => self.stats.bytes_sent.fetch_add(n, Ordering::Relaxed),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            // Sent: only the tags are kept until the round records them.
            sent.extend(encoded.into_iter().map(EncodedDirty::without_bytes));
            if stop() {
                break;
            }
        }
        // What was sent is recorded even when a later batch failed.
        let settled = self.settle(&sent).await?;
        match failed {
            Some(e) => Err(e),
            None => Ok(settled),
        }
    }

    async fn settle(&self, sent: &[EncodedDirty]) -> Result<usize, ClientError> {
        let settled = self.image.settle(sent).await?;
        self.stats.chunks_sent.fetch_add(settled as u64, Ordering::Relaxed);
        self.stats.chunks_superseded.fetch_add((sent.len() - settled) as u64, Ordering::Relaxed);
        Ok(settled)
    }

    async fn send_and_settle(&self, encoded: &[EncodedDirty]) -> Result<usize, ClientError> {
        let sent = self.sink.send(&unique_chunks(encoded)).await?;
        self.stats.bytes_sent.fetch_add(sent, Ordering::Relaxed);
        self.settle(encoded).await
    }

    /// Rounds until nothing flushed is left to send, at most `max_rounds`.
    pub async fn drain(&self, max_rounds: usize) -> Result<(), ClientError> {
        for _ in 0..max_rounds {
            if self.round().await? == 0 {
                break;
            }
        }
        Ok(())
    }

    /// A running sync's point-in-time state: every write so far flushed and encoded, what the server lacks
    /// sent, and the keyring of that state (the chunks written since stay dirty for the next round).
    pub async fn snapshot_and_send(&self) -> Result<Keyring, ClientError> {
        // Most of the work first, while the guest writes on: what is flushed already (bounded: a guest that
        // keeps writing would keep it going).
        self.drain(SYNC_DRAIN_ROUNDS).await?;
        let _one = self.busy.lock().await;
        let (keyring, encoded) = self.image.snapshot().await?;
        self.send_and_settle(&encoded).await?;
        Ok(keyring)
    }

    /// Run rounds until `stop`: right after each productive round, else at the next flush or after
    /// [`IDLE_WAIT`]. A failed round is retried after a growing pause; a lost lock ends the trickle (nothing
    /// more can be committed by this client, and every change stays here).
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = BACKOFF.0;
        loop {
            if *stop.borrow() {
                return;
            }
            // Armed before the round: a flush during it is not missed.
            let flush = self.image.next_flush();
            futures::pin_mut!(flush);
            flush.as_mut().enable();
            let stopping = || *stop.borrow();
            let (pause, idle) = match self.round_until(&stopping, Urgency::Background).await {
                Ok(0) => (IDLE_WAIT, true),
                Ok(_) => {
                    backoff = BACKOFF.0;
                    (Duration::ZERO, false)
                }
                Err(e @ (ClientError::LockLost(_) | ClientError::Locked(_))) => {
                    eprintln!("isr: background upload stopped: {e}");
                    return;
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "background upload failed; trying again in {backoff:?}");
                    let b = backoff;
                    backoff = (backoff * 2).min(BACKOFF.1);
                    (b, false)
                }
            };
            if !pause.is_zero() {
                let woken = async {
                    if idle {
                        flush.await
                    } else {
                        std::future::pending().await
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = woken => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// The chunks of `encoded` to send, each tag once (the zero chunk never).
fn unique_chunks(encoded: &[EncodedDirty]) -> Vec<(Tag, Bytes)> {
    let mut seen = HashSet::new();
    encoded
        .iter()
        .filter_map(|e| e.chunk.as_ref())
        .filter(|(tag, _, _)| seen.insert(*tag))
        .map(|(tag, _, stored)| (*tag, stored.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ChunkCache;
    use crate::source::ChunkSources;
    use isr_format::{ChunkEncoder, ChunkIndex, ChunkSize, ConvergenceSecret, ImageLen, Keyroot};
    use std::collections::HashMap;

    const CLEN: usize = 128 << 10;

    /// A server that keeps what it is sent; with a gate, its first send waits until the test opens it.
    #[derive(Default, Debug)]
    struct MemorySink {
        stored: Mutex<HashMap<Tag, Bytes>>,
        sends: AtomicU64,
        gate: Mutex<Option<(tokio::sync::oneshot::Sender<()>, tokio::sync::oneshot::Receiver<()>)>>,
    }

    #[async_trait::async_trait]
    impl ChunkSink for MemorySink {
        async fn send(&self, chunks: &[(Tag, Bytes)]) -> Result<u64, ClientError> {
            self.sends.fetch_add(1, Ordering::SeqCst);
            let gate = self.gate.lock().unwrap().take();
            if let Some((entered, open)) = gate {
                let _ = entered.send(());
                let _ = open.await;
            }
            let mut stored = self.stored.lock().unwrap();
            let mut n = 0;
            for (tag, bytes) in chunks {
                if stored.insert(*tag, bytes.clone()).is_none() {
                    n += bytes.len() as u64;
                }
            }
            Ok(n)
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        image: Arc<WorkingImage>,
        secret: ConvergenceSecret,
        keyroot: Keyroot,
        work: std::path::PathBuf,
        sink: Arc<MemorySink>,
        trickle: Trickle,
    }

    /// An image of 8 all-zero chunks (nothing to fetch) and a trickle into a [`MemorySink`].
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::new(ChunkSize::DEFAULT, ImageLen(8 * CLEN as u64)).unwrap();
        let (secret, keyroot) = (ConvergenceSecret::random(), Keyroot::random());
        let sources =
            Arc::new(ChunkSources::new(ChunkCache::open(&dir.path().join("cache")).unwrap(), vec![], None));
        let work = dir.path().join("work.keyring");
        let tags = keyring.tags().to_vec();
        let image = Arc::new(
            WorkingImage::new(
                keyring,
                tags,
                keyroot.clone(),
                work.clone(),
                dir.path().join("runtime.img"),
                sources,
                secret.clone(),
            )
            .unwrap(),
        );
        let sink = Arc::new(MemorySink::default());
        let trickle = Trickle::new(image.clone(), sink.clone()).unwrap();
        Fixture { _dir: dir, image, secret, keyroot, work, sink, trickle }
    }

    impl Fixture {
        fn tag_of(&self, plain: &[u8]) -> Tag {
            ChunkEncoder::new(self.secret.clone()).encode(plain).unwrap().unwrap().tag
        }
        /// The working keyring as a crash would find it (the file).
        fn persisted_tag(&self, i: u64) -> Option<Tag> {
            // No file: the image is still its base (all zero here).
            let Ok(bytes) = std::fs::read(&self.work) else { return None };
            let ring = Keyring::open(&bytes, &self.keyroot).unwrap();
            ring.get(ChunkIndex(i)).map(|(t, _)| t)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_flushed_chunks_are_sent_and_then_are_clean() {
        let f = fixture();
        let (a, b) = (vec![0xa1u8; CLEN], vec![0xb2u8; CLEN]);
        f.image.write(0, &a).await.unwrap();
        f.image.write(CLEN as u64, &b).await.unwrap();
        assert_eq!(f.trickle.round().await.unwrap(), 0, "nothing is flushed yet");
        assert_eq!(f.sink.sends.load(Ordering::SeqCst), 0);
        f.image.flush().await.unwrap();
        // Written after the flush: not durable, not sent.
        f.image.write(2 * CLEN as u64, &a).await.unwrap();
        assert_eq!(f.trickle.round().await.unwrap(), 2);
        assert_eq!(f.image.dirty_chunks(), 1, "chunk 2 waits for a flush");
        assert_eq!(f.image.dirty_bytes(), CLEN as u64);
        let stored = f.sink.stored.lock().unwrap().clone();
        assert!(stored.contains_key(&f.tag_of(&a)) && stored.contains_key(&f.tag_of(&b)));
        assert_eq!(f.persisted_tag(0), Some(f.tag_of(&a)));
        assert_eq!(f.persisted_tag(1), Some(f.tag_of(&b)));
        // Still reads back from the runtime image.
        let mut got = vec![0u8; CLEN];
        f.image.read(CLEN as u64, &mut got).await.unwrap();
        assert!(got == b);
        // Chunk 2 has the same content as chunk 0: once flushed it is recorded, and nothing new is sent.
        f.image.flush().await.unwrap();
        assert_eq!(f.trickle.round().await.unwrap(), 1);
        assert_eq!(f.image.dirty_chunks(), 0);
        assert_eq!(f.sink.stored.lock().unwrap().len(), 2);
        assert_eq!(f.trickle.stats.chunks_sent.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_rewritten_during_its_own_upload_ends_with_its_final_content() {
        let f = Arc::new(fixture());
        let (old, new) = (vec![0x01u8; CLEN], vec![0x02u8; CLEN]);
        f.image.write(3 * CLEN as u64, &old).await.unwrap();
        f.image.flush().await.unwrap();
        // The upload of the old content stops in flight until the chunk has been written again.
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel();
        let (open_tx, open_rx) = tokio::sync::oneshot::channel();
        *f.sink.gate.lock().unwrap() = Some((entered_tx, open_rx));
        let f2 = f.clone();
        let round = tokio::spawn(async move { f2.trickle.round().await });
        entered_rx.await.unwrap();
        f.image.write(3 * CLEN as u64, &new).await.unwrap();
        f.image.flush().await.unwrap();
        open_tx.send(()).unwrap();
        assert_eq!(round.await.unwrap().unwrap(), 0, "the old content is not recorded as the chunk's");
        assert!(f.sink.stored.lock().unwrap().contains_key(&f.tag_of(&old)), "the old upload did happen");
        assert_eq!(f.image.dirty_chunks(), 1, "the chunk is still dirty");
        assert_ne!(f.persisted_tag(3), Some(f.tag_of(&old)));
        // The next round sends the final content and records it.
        assert_eq!(f.trickle.round().await.unwrap(), 1);
        assert_eq!(f.image.dirty_chunks(), 0);
        assert!(f.sink.stored.lock().unwrap().contains_key(&f.tag_of(&new)));
        assert_eq!(f.image.keyring().get(ChunkIndex(3)).map(|(t, _)| t), Some(f.tag_of(&new)));
        assert_eq!(f.persisted_tag(3), Some(f.tag_of(&new)));
        assert_eq!(f.trickle.stats.chunks_superseded.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_background_encoding_holds_up_no_write_and_a_stale_one_is_not_recorded() {
        let f = Arc::new(fixture());
        let (old, new) = (vec![0x03u8; CLEN], vec![0x04u8; CLEN]);
        f.image.write(5 * CLEN as u64, &old).await.unwrap();
        f.image.flush().await.unwrap();
        let bg = &f.trickle.background;
        // The background thread is kept busy, so the round's encoding of chunk 5 waits in its queue.
        let (busy_tx, busy_rx) = std::sync::mpsc::channel::<()>();
        let f2 = f.clone();
        let blocker =
            tokio::spawn(async move { f2.trickle.background.run(move || busy_rx.recv().unwrap()).await });
        while bg.pending() < 1 {
            tokio::task::yield_now().await;
        }
        let f2 = f.clone();
        let round = tokio::spawn(async move { f2.trickle.background_round().await });
        while bg.pending() < 2 {
            tokio::task::yield_now().await;
        }
        // The old content has been read and its encoding waits: the chunk's lock is free, the write goes
        // through. (A deadlock guard, not a speed limit: with the lock held the write would never end.)
        let rewrite = async {
            f.image.write(5 * CLEN as u64, &new).await.unwrap();
            f.image.flush().await.unwrap();
        };
        let rewritten = tokio::time::timeout(std::time::Duration::from_secs(60), rewrite).await;
        busy_tx.send(()).unwrap();
        assert!(rewritten.is_ok(), "a write waited on a background encoding");
        blocker.await.unwrap().unwrap();
        assert_eq!(round.await.unwrap().unwrap(), 0, "the stale encoding is not recorded");
        assert_eq!(f.image.dirty_chunks(), 1, "the chunk is still dirty");
        assert_eq!(f.trickle.stats.chunks_superseded.load(Ordering::SeqCst), 1);
        // The next round records the final content.
        assert_eq!(f.trickle.background_round().await.unwrap(), 1);
        assert_eq!(f.image.keyring().get(ChunkIndex(5)).map(|(t, _)| t), Some(f.tag_of(&new)));
        assert_eq!(f.persisted_tag(5), Some(f.tag_of(&new)));
        let mut got = vec![0u8; CLEN];
        f.image.read(5 * CLEN as u64, &mut got).await.unwrap();
        assert!(got == new);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_is_the_state_when_it_was_taken() {
        let f = fixture();
        let (a, b, c) = (vec![0x0au8; CLEN], vec![0x0bu8; CLEN], vec![0x0cu8; CLEN]);
        f.image.write(0, &a).await.unwrap();
        f.image.flush().await.unwrap();
        // Not flushed by the guest: the snapshot flushes it and takes it.
        f.image.write(CLEN as u64, &b).await.unwrap();
        let ring = f.trickle.snapshot_and_send().await.unwrap();
        assert_eq!(ring.get(ChunkIndex(0)).map(|(t, _)| t), Some(f.tag_of(&a)));
        assert_eq!(ring.get(ChunkIndex(1)).map(|(t, _)| t), Some(f.tag_of(&b)));
        assert_eq!(ring.get(ChunkIndex(2)), None);
        for t in [f.tag_of(&a), f.tag_of(&b)] {
            assert!(f.sink.stored.lock().unwrap().contains_key(&t), "the snapshot's chunks were sent");
        }
        assert_eq!(f.image.dirty_chunks(), 0);
        // Later writes do not change the snapshot, and are sent later.
        f.image.write(0, &c).await.unwrap();
        assert_eq!(ring.get(ChunkIndex(0)).map(|(t, _)| t), Some(f.tag_of(&a)));
        assert_eq!(f.image.dirty_chunks(), 1);
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("20M").unwrap(), 20 << 20);
        assert_eq!(parse_rate("512K").unwrap(), 512 << 10);
        assert_eq!(parse_rate("1G").unwrap(), 1 << 30);
        assert_eq!(parse_rate("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_rate("1000").unwrap(), 1000);
        assert_eq!(parse_rate("10MB/s").unwrap(), 10 << 20);
        for bad in ["", "0", "-1M", "fast", "M", "nan"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} parsed");
        }
    }
}
