//! Access-order prefetch (as REAP, overlaybd's trace replay): a run records the order in which the guest
//! first touches each chunk of its memory and its disk ([`AccessTrace`]); the order is kept with the version
//! (in the memory image, [`crate::guest_ram::layout`], so encrypted and bound to it like everything else),
//! and the next resume fetches in that order in the background ([`prefetch_in_order`]) while the guest's own
//! faults go first. A cold resume on a new client then has its working set arriving before the guest asks.
//!
//! A trace is a list of 8-byte entries: chunk index (u32 LE), image (u8: 0 disk, 1 memory), 3 zero bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use isr_format::ChunkIndex;

use crate::image::WorkingImage;

/// The most entries kept (4 MiB of chunk data each at the default chunk size: far more than a working set).
pub const MAX_ENTRIES: usize = 1 << 16;
pub const ENTRY_LEN: usize = 8;

/// Which image an entry is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TracedImage {
    Disk = 0,
    Memory = 1,
}

/// One first touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Touch {
    pub image: TracedImage,
    pub chunk: u32,
}

/// The first touches of a run, in order, across images.
#[derive(Debug, Default)]
pub struct AccessTrace {
    order: Mutex<Vec<Touch>>,
}

impl AccessTrace {
    pub fn new() -> Arc<AccessTrace> {
        Arc::default()
    }

    /// The order so far.
    pub fn touches(&self) -> Vec<Touch> {
        self.order.lock().expect("access trace").clone()
    }

    fn push(&self, t: Touch) {
        let mut order = self.order.lock().expect("access trace");
        if order.len() < MAX_ENTRIES {
            order.push(t);
        }
    }
}

/// One image's view of a trace: which of its chunks were touched already (a bit each).
#[derive(Debug)]
pub struct TouchRecorder {
    trace: Arc<AccessTrace>,
    image: TracedImage,
    chunks: u64,
    seen: Vec<AtomicU64>,
}

impl TouchRecorder {
    pub fn new(trace: Arc<AccessTrace>, image: TracedImage, chunks: u64) -> TouchRecorder {
        TouchRecorder {
            trace,
            image,
            chunks,
            seen: (0..chunks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Note that chunks `range` were touched; the first touch of each goes into the trace.
    pub fn touched(&self, range: std::ops::Range<u64>) {
        for i in range.start..range.end.min(self.chunks) {
            let Some(word) = self.seen.get((i / 64) as usize) else { return };
            let bit = 1u64 << (i % 64);
            // Cheap when seen before: a load, no read-modify-write.
            if word.load(Ordering::Relaxed) & bit == 0 && word.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
                if let Ok(chunk) = u32::try_from(i) {
                    self.trace.push(Touch { image: self.image, chunk });
                }
            }
        }
    }
}

/// The bytes of a trace.
pub fn encode(touches: &[Touch]) -> Vec<u8> {
    let mut out = Vec::with_capacity(touches.len() * ENTRY_LEN);
    for t in touches {
        out.extend_from_slice(&t.chunk.to_le_bytes());
        out.extend_from_slice(&[t.image as u8, 0, 0, 0]);
    }
    out
}

/// A trace from its bytes; an error names what is wrong.
pub fn decode(bytes: &[u8]) -> Result<Vec<Touch>, String> {
    if !bytes.len().is_multiple_of(ENTRY_LEN) {
        return Err(format!("{} bytes is not a whole number of entries", bytes.len()));
    }
    if bytes.len() / ENTRY_LEN > MAX_ENTRIES {
        return Err(format!("{} entries (at most {MAX_ENTRIES})", bytes.len() / ENTRY_LEN));
    }
    bytes
        .chunks_exact(ENTRY_LEN)
        .map(|e| {
            let image = match e[4] {
                0 => TracedImage::Disk,
                1 => TracedImage::Memory,
                other => return Err(format!("unknown image {other}")),
            };
            if e[5..] != [0, 0, 0] {
                return Err("reserved bytes are not zero".into());
            }
            Ok(Touch { image, chunk: u32::from_le_bytes([e[0], e[1], e[2], e[3]]) })
        })
        .collect()
}

/// This run's order, then what the earlier trace had that this run did not touch (a short run keeps what
/// a longer one learnt), at most [`MAX_ENTRIES`].
pub fn merge(now: &[Touch], before: &[Touch]) -> Vec<Touch> {
    let mut seen: std::collections::HashSet<Touch> = now.iter().copied().collect();
    let mut out = now.to_vec();
    out.extend(before.iter().filter(|t| seen.insert(**t)));
    out.truncate(MAX_ENTRIES);
    out
}

/// Prefetches in flight at once.
const IN_FLIGHT: usize = 4;
/// How long a prefetch waits for the guest's own fetches to finish before it goes anyway.
const YIELD_AT_MOST: Duration = Duration::from_millis(50);

/// Fetch the chunks of `order` into their runtime images, in order, a few at a time, each waiting while the
/// guest has fetches of its own in flight. Errors are left to the guest's own reads (which fetch again):
/// returns how many chunks were fetched.
pub async fn prefetch_in_order(order: Vec<Touch>, disk: Arc<WorkingImage>, memory: Arc<WorkingImage>) -> u64 {
    let fetched = AtomicU64::new(0);
    futures::stream::iter(order)
        .for_each_concurrent(IN_FLIGHT, |t| {
            let img = match t.image {
                TracedImage::Disk => disk.clone(),
                TracedImage::Memory => memory.clone(),
            };
            let (disk, memory, fetched) = (&disk, &memory, &fetched);
            async move {
                let i = u64::from(t.chunk);
                if i >= img.chunk_count() || img.is_local(i) {
                    return;
                }
                let waited = tokio::time::Instant::now();
                while disk.demand_fetches() + memory.demand_fetches() > 0 && waited.elapsed() < YIELD_AT_MOST
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let cs = img.chunk_size();
                let offset = cs.offset_of(ChunkIndex(i)).0;
                let len = cs.chunk_len(isr_format::ImageLen(img.len()), ChunkIndex(i)) as u64;
                if img.prefetch(offset, len).await.is_ok() {
                    fetched.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await;
    fetched.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(image: TracedImage, chunk: u32) -> Touch {
        Touch { image, chunk }
    }

    #[test]
    fn first_touches_only_in_order_across_images() {
        let trace = AccessTrace::new();
        let mem = TouchRecorder::new(trace.clone(), TracedImage::Memory, 200);
        let disk = TouchRecorder::new(trace.clone(), TracedImage::Disk, 10);
        mem.touched(130..132);
        disk.touched(3..4);
        mem.touched(131..133);
        disk.touched(3..4);
        disk.touched(10..12); // past the end: ignored
        assert_eq!(
            trace.touches(),
            [
                t(TracedImage::Memory, 130),
                t(TracedImage::Memory, 131),
                t(TracedImage::Disk, 3),
                t(TracedImage::Memory, 132)
            ]
        );
    }

    #[test]
    fn bytes_round_trip_and_damage_is_named() {
        let order = vec![t(TracedImage::Disk, 7), t(TracedImage::Memory, 0x0102_0304)];
        let b = encode(&order);
        assert_eq!(b, [7, 0, 0, 0, 0, 0, 0, 0, 4, 3, 2, 1, 1, 0, 0, 0]);
        assert_eq!(decode(&b).unwrap(), order);
        assert!(decode(&b[..9]).unwrap_err().contains("whole number"));
        let mut bad = b.clone();
        bad[4] = 9;
        assert!(decode(&bad).unwrap_err().contains("unknown image"));
        let mut bad = b;
        bad[7] = 1;
        assert!(decode(&bad).unwrap_err().contains("reserved"));
        assert!(decode(&vec![0; (MAX_ENTRIES + 1) * ENTRY_LEN]).unwrap_err().contains("at most"));
    }

    #[test]
    fn merge_keeps_this_runs_order_then_the_rest() {
        let now = [t(TracedImage::Memory, 5), t(TracedImage::Disk, 1)];
        let before = [t(TracedImage::Disk, 1), t(TracedImage::Memory, 9), t(TracedImage::Memory, 5)];
        assert_eq!(
            merge(&now, &before),
            [t(TracedImage::Memory, 5), t(TracedImage::Disk, 1), t(TracedImage::Memory, 9)]
        );
        let many: Vec<Touch> = (0..MAX_ENTRIES as u32 + 10).map(|c| t(TracedImage::Disk, c)).collect();
        assert_eq!(merge(&many, &[]).len(), MAX_ENTRIES);
    }
}
