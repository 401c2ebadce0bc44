//! Helpers shared by the lifecycle commands: uploads, fetches, commits, lock messages.

use crate::cache::ChunkCache;
use crate::error::ClientError;
use crate::home::rfc3339;
use crate::progress::{self, Progress};
use crate::source::ChunkSources;
use crate::transport::{CommitRefusal, Transport};
use futures::StreamExt;
use isr_format::{
    ChunkEncoder, ChunkIndex, ChunkSize, ConvergenceSecret, ImageKind, ImageLen, Keyring, Keyroot, Tag,
    WrappedKeyroot,
};
use serde::Serialize;
use std::io::Read;
use std::path::Path;

pub(super) const UPLOADS_IN_FLIGHT: usize = 8;
pub(super) const FETCHES_IN_FLIGHT: usize = 16;

/// What an upload moved.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Transfer {
    pub chunks: u64,
    pub bytes: u64,
    pub image_bytes: u64,
}

impl Transfer {
    /// Count `other` in too.
    pub fn add(&mut self, other: Transfer) {
        self.chunks += other.chunks;
        self.bytes += other.bytes;
        self.image_bytes += other.image_bytes;
    }
}

pub(super) fn read_file(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::io(format!("reading {}", path.display()), e))
}

pub(super) fn not_checked_out(name: &str) -> ClientError {
    ClientError::Usage(format!("{name} is not checked out on this client: run `isr checkout {name}`"))
}

/// A lost lock, told with what the user can do: the local changes are kept, and `checkout` takes the lock
/// again when it is free.
pub(super) fn lock_guidance(name: &str, e: ClientError) -> ClientError {
    match e {
        ClientError::LockLost(mut loss) => {
            let who = match &loss.holder_now {
                Some((holder, since)) => format!("{holder} holds it now (since {})", rfc3339(*since)),
                None => "it is free now".to_owned(),
            };
            loss.message = format!(
                "{}; {who}. Nothing can be checked in without the lock; the local changes to {name} are kept: \
                 `isr checkout {name}` takes the lock again when it is free",
                loss.message
            );
            ClientError::LockLost(loss)
        }
        other => other,
    }
}

/// Every stored chunk of an image with its plaintext length (for progress in bytes).
pub(super) fn image_chunks(ring: &Keyring) -> impl Iterator<Item = (Tag, u64)> + '_ {
    (0..ring.chunk_count())
        .filter_map(move |i| ring.get(ChunkIndex(i)).map(|(t, _)| (t, ring.chunk_len(ChunkIndex(i)) as u64)))
}

/// Decode a hex wrapped keyroot (from `source`, for the message) and unwrap it with the password's key.
pub(super) fn unwrap_keyroot(
    hex_wrapped: &str,
    wrap: &isr_format::KeyWrapKey,
    source: &str,
) -> Result<Keyroot, ClientError> {
    let bytes = hex::decode(hex_wrapped)
        .map_err(|_| ClientError::Integrity(format!("{source} holds a malformed wrapped keyroot")))?;
    Ok(WrappedKeyroot(bytes).unwrap(wrap)?)
}

/// Read `path` chunk by chunk and encode on `workers` threads, sending results in any order.
pub(crate) fn encode_file(
    path: &Path,
    chunk_size: ChunkSize,
    len: u64,
    workers: usize,
    secret: ConvergenceSecret,
    tx: tokio::sync::mpsc::Sender<Result<(u64, Option<isr_format::EncodedChunk>), ClientError>>,
) -> Result<(), ClientError> {
    let mut f =
        std::fs::File::open(path).map_err(|e| ClientError::io(format!("opening {}", path.display()), e))?;
    let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(workers * 4);
    let work_rx = std::sync::Mutex::new(work_rx);
    let n = chunk_size.chunk_count(ImageLen(len));
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (rx, tx, secret) = (&work_rx, tx.clone(), secret.clone());
            s.spawn(move || {
                let mut enc = ChunkEncoder::new(secret);
                loop {
                    let job = rx.lock().expect("work queue").recv();
                    let Ok((i, data)) = job else { break };
                    let r = enc
                        .encode(&data)
                        .map(|e| (i, e))
                        .map_err(|e| ClientError::Other(format!("encoding chunk {i}: {e}")));
                    if tx.blocking_send(r).is_err() {
                        break;
                    }
                }
            });
        }
        let mut result = Ok(());
        for i in 0..n {
            let clen = chunk_size.chunk_len(ImageLen(len), ChunkIndex(i));
            let mut buf = vec![0u8; clen];
            if let Err(e) = f.read_exact(&mut buf) {
                result = Err(ClientError::io(format!("reading {} at chunk {i}", path.display()), e));
                break;
            }
            if work_tx.send((i, buf)).is_err() {
                break;
            }
        }
        drop(work_tx);
        result
    })
}

pub(super) async fn upload_from_cache(
    progress: &dyn Progress,
    t: &Transport,
    cache: &ChunkCache,
    tags: &[Tag],
    transfer: &mut Transfer,
) -> Result<(), ClientError> {
    let total: u64 = tags
        .iter()
        .filter_map(|tag| std::fs::metadata(cache.store().path_of(tag)).ok())
        .map(|m| m.len())
        .sum();
    let bar = progress.task("upload", total);
    let results = futures::stream::iter(tags.iter().copied())
        .map(|tag| async move {
            let stored = cache.get(&tag).await?.ok_or_else(|| {
                ClientError::Integrity(format!(
                    "chunk {tag} written on this client is missing from the cache"
                ))
            })?;
            let n = stored.len() as u64;
            t.put_chunk(&tag, stored).await?;
            Ok::<u64, ClientError>(n)
        })
        .buffer_unordered(UPLOADS_IN_FLIGHT);
    futures::pin_mut!(results);
    while let Some(r) = results.next().await {
        let n = r?;
        transfer.bytes += n;
        transfer.chunks += 1;
        bar.advance(n);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn commit_with_retry(
    t: &Transport,
    cache: &ChunkCache,
    name: &str,
    lock_id: &str,
    base_version: u64,
    manifest: &[u8],
    client: &str,
    comment: &str,
    transfer: &mut Transfer,
    fresh: Option<&[(ImageKind, Keyring)]>,
) -> Result<u64, ClientError> {
    for _ in 0..4 {
        match t.commit(name, lock_id, base_version, manifest, client, comment, transfer.bytes).await? {
            Ok(v) => return Ok(v),
            Err(CommitRefusal::MissingChunks(missing)) => {
                if fresh.is_some() {
                    // A create does not keep its chunks locally: the server lost some of them meanwhile.
                    return Err(ClientError::Server(format!(
                        "the server lost {} chunks during the upload (a concurrent gc?): run the create again",
                        missing.len()
                    )));
                }
                upload_from_cache(&progress::Quiet, t, cache, &missing, transfer).await?;
            }
        }
    }
    Err(ClientError::Server("the server kept refusing the commit for missing chunks".into()))
}

/// Fetch into the cache every distinct stored chunk of `chunks` that it lacks (from a lookaside directory or
/// the server), several in flight.
pub(super) async fn fetch_missing(
    progress: &dyn Progress,
    sources: &ChunkSources,
    chunks: &[(Tag, u64)],
    what: &str,
) -> Result<Transfer, ClientError> {
    let wanted = sources.not_cached(chunks).await;
    // Progress in image bytes (what the chunks decode to): the stored sizes are known only once fetched.
    let bar = progress.task(what, wanted.iter().map(|(_, n)| n).sum());
    let mut transfer = Transfer::default();
    sources
        .prefetch(&wanted, FETCHES_IN_FLIGHT, |stored, plain| {
            transfer.bytes += stored;
            transfer.chunks += 1;
            bar.advance(plain);
        })
        .await?;
    Ok(transfer)
}
