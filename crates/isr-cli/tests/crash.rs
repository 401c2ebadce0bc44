//! kill -9 of `isr disk` at 20 moments of a write+flush stream (seeded; the seed is printed, and
//! `ISR_CRASH_SEED` replays one): no flushed write is lost, every sector holds either its last flushed
//! content or a later unflushed one, and `isr check --full` passes after each kill. At the end the state is
//! checked in and read back on another client.

mod common;
use common::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const IMAGE: u64 = 48 << 20;
const SECTOR: u64 = 4096;
const ROUNDS: usize = 20;

/// The content write number `seq` puts into sector `sector`.
fn sector_data(seq: u64, sector: u64) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(&seq.to_le_bytes()).update(&sector.to_le_bytes());
    let mut out = vec![0u8; SECTOR as usize];
    h.finalize_xof().fill(&mut out);
    out
}

/// What a sector may hold: its durable content (`None`: the original image's) and later unflushed writes.
#[derive(Clone, Default)]
struct Sector {
    flushed: Option<u64>,
    unflushed: Vec<u64>,
}

/// xorshift64*: the test's own seeded generator (the seed is printed so that a failure can be replayed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Write random runs of sectors with a flush every few writes until the connection dies; the model learns
/// a write when it is acknowledged and its durability when the flush after it is.
fn stream(
    sock: &Path,
    model: &Mutex<HashMap<u64, Sector>>,
    seed: u64,
    next_seq: &Mutex<u64>,
    stop: &AtomicBool,
) {
    let Ok(mut nbd) = Nbd::connect(sock, IMAGE) else { return };
    let mut rng = Rng(seed | 1);
    let sectors = IMAGE / SECTOR;
    let mut since_flush: Vec<u64> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let run = 1 + rng.below(40); // up to 160 KiB: whole chunks, parts of chunks, across chunk borders
        let first = rng.below(sectors - run);
        let seq = {
            let mut s = next_seq.lock().unwrap();
            *s += 1;
            *s
        };
        let mut data = Vec::with_capacity((run * SECTOR) as usize);
        for s in first..first + run {
            data.extend(sector_data(seq, s));
        }
        {
            // Possible from the moment it is sent: a write cut off by the kill may still have landed.
            let mut m = model.lock().unwrap();
            for s in first..first + run {
                m.entry(s).or_default().unflushed.push(seq);
                since_flush.push(s);
            }
        }
        if nbd.write(first * SECTOR, &data).is_err() {
            return;
        }
        if rng.below(4) == 0 {
            if nbd.flush().is_err() {
                return;
            }
            let mut m = model.lock().unwrap();
            for s in since_flush.drain(..) {
                let e = m.get_mut(&s).unwrap();
                if let Some(&last) = e.unflushed.iter().max() {
                    e.flushed = Some(last);
                    e.unflushed.clear();
                }
            }
        }
    }
}

#[test]
fn kill_9_during_writes_and_flushes_loses_no_flushed_write() {
    let seed: u64 = std::env::var("ISR_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("crash test seed: {seed} (replay with ISR_CRASH_SEED={seed})");
    eprintln!("crash test seed: {seed} (replay with ISR_CRASH_SEED={seed})");
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    make_image(&img, IMAGE);
    let original = std::fs::read(&img).unwrap();
    a.ok(&["create", "p", "--disk", img.to_str().unwrap()]);
    a.ok(&["checkout", "p"]);
    let sock = dir.path().join("nbd.sock");
    let model = Arc::new(Mutex::new(HashMap::<u64, Sector>::new()));
    let next_seq = Arc::new(Mutex::new(0u64));
    let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
    let expected = |s: u64, seq: Option<u64>| match seq {
        Some(q) => sector_data(q, s),
        None => original[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize].to_vec(),
    };
    for round in 0..ROUNDS {
        let child = a.disk("p", &sock);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (model, next_seq, stop, sock) = (model.clone(), next_seq.clone(), stop.clone(), sock.clone());
            let seed = rng.next();
            std::thread::spawn(move || stream(&sock, &model, seed, &next_seq, &stop))
        };
        let wait = Duration::from_millis(100 + rng.below(1500));
        std::thread::sleep(wait);
        let mut child = child;
        child.kill().unwrap(); // SIGKILL to the isr process itself
        child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let writes = *next_seq.lock().unwrap();
        let (code, out) = a.code(&["check", "p", "--full"]);
        assert_eq!(code, 0, "round {round} (seed {seed}): isr check --full after kill -9: {out}");
        // Every sector written so far holds its flushed content or a later unflushed one; that is its
        // state from now on.
        let child = a.disk("p", &sock);
        let mut nbd = Nbd::connect(&sock, IMAGE).unwrap();
        let mut m = model.lock().unwrap();
        let mut lost_unflushed = 0;
        for (&s, e) in m.iter_mut() {
            let got = nbd.read(s * SECTOR, SECTOR as usize).unwrap();
            let now = if got == expected(s, e.flushed) {
                if !e.unflushed.is_empty() {
                    lost_unflushed += 1;
                }
                e.flushed
            } else if let Some(&q) = e.unflushed.iter().find(|&&q| got == sector_data(q, s)) {
                Some(q)
            } else {
                panic!(
                    "round {round} (seed {seed}): sector {s} holds neither its last flushed write ({:?}) nor a later \
                     one ({:?}): a flushed write was lost or a sector was torn",
                    e.flushed, e.unflushed
                );
            };
            *e = Sector { flushed: now, unflushed: Vec::new() };
        }
        drop(m);
        drop(nbd);
        stop_disk(child);
        eprintln!(
            "round {round}: killed after {wait:?}, {writes} writes so far; {lost_unflushed} sectors lost unflushed writes"
        );
    }
    assert!(*next_seq.lock().unwrap() > ROUNDS as u64, "the stream wrote almost nothing");
    // The state survives a check-in and shows on another client.
    a.ok(&["checkin", "p"]);
    let b = Client::new(&server, "alice");
    b.ok(&["checkout", "p"]);
    let child = b.disk("p", &sock);
    let mut nbd = Nbd::connect(&sock, IMAGE).unwrap();
    for (&s, e) in model.lock().unwrap().iter() {
        assert_eq!(
            nbd.read(s * SECTOR, SECTOR as usize).unwrap(),
            expected(s, e.flushed),
            "sector {s} on client B"
        );
    }
    drop(nbd);
    stop_disk(child);
}
