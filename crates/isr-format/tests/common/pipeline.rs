//! Parallel work with results consumed in order, shared by the round-trip test and the demo.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Sets the flag when dropped during a panic, so the other side of the pipeline stops instead of waiting.
struct StopOnPanic<'a>(&'a AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Release);
        }
    }
}

/// Worker threads to use: the machine's cores, at least 2 (so the parallel path is always exercised), at most 8.
pub fn threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8)
}

/// Run `work(state, i)` for every `i in 0..n` on `threads` threads (each with its own `init()` state), and
/// hand the results to `sink` on the calling thread in index order. Workers run ahead of the sink by at
/// most a few items per thread, so memory stays bounded.
pub fn pipeline<S, T: Send>(
    n: u64,
    threads: usize,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, u64) -> T + Sync,
    mut sink: impl FnMut(u64, T),
) {
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let window = 4 * threads as u64;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, T)>(window as usize);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (tx, next, done, stop, init, work) = (tx.clone(), &next, &done, &stop, &init, &work);
            s.spawn(move || {
                let _guard = StopOnPanic(stop);
                let mut state = init();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    // Stay within `window` items of the sink, so results waiting to be reordered stay few.
                    while i >= done.load(Ordering::Acquire) + window {
                        if stop.load(Ordering::Acquire) {
                            return;
                        }
                        std::thread::yield_now();
                    }
                    if tx.send((i, work(&mut state, i))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let _guard = StopOnPanic(&stop);
        let mut pending = BTreeMap::new();
        let mut expect = 0;
        for (i, t) in rx {
            pending.insert(i, t);
            while let Some(t) = pending.remove(&expect) {
                sink(expect, t);
                expect += 1;
                done.store(expect, Ordering::Release);
            }
        }
        assert_eq!(expect, n, "a worker stopped early");
    });
}
