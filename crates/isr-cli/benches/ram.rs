//! Guest RAM on demand vs loaded before start (`--ram loaded`), same machine, same run.
//!
//! 1. **Time to the guest's next instruction** on a client with nothing cached: a 768 MiB guest keeping
//!    32 MiB and 384 MiB of random data in a tmpfs (`isr_fill`) and reading it again and again (`isr_scan`),
//!    printing a tick every 0.1 s (`isr_tick`). Client A boots it, suspends and checks in; then a fresh
//!    client resumes it: the time from starting `isr resume` to the guest's first tick, the bytes the server
//!    sent by then, the time to the guest's first complete pass over its data, and the bytes after a minute.
//!    Then the same client resumes again from its own cache. RAM on demand with the recorded access order
//!    prefetched, on demand without it (`--prefetch off`), and loaded before start (`--ram loaded`).
//! 2. **A memory-heavy guest loop** (`isr_memloop`: a 128 MiB tmpfs file overwritten again and again, for
//!    45 s, longer than the kernel's 30 s dirty expiry, so the RAM file's write-back runs meanwhile): its write
//!    rate (guest MiB per guest second) under RAM on demand vs loaded, alternating rounds.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p isr-cli --bench ram`. Needs QEMU, root
//! (FUSE). `ISR_BENCH_ONLY=resume|loop` runs one part.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const BASE_APPEND: &str = "console=ttyS0 quiet panic=-1 init_on_free=1";
const RUN_FOR: Duration = Duration::from_secs(60);
const LOOP_FOR: Duration = Duration::from_secs(45);

fn guest() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new("bash").arg(root.join("guest/build.sh")).output().unwrap();
    check(&out, "guest/build.sh");
    root.join("guest/out")
}

fn lines_with(console: &Path, key: &str) -> Vec<Vec<u64>> {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix(key))
        .map(|rest| rest.split_whitespace().filter_map(|w| w.parse().ok()).collect())
        .collect()
}

fn last_tick(console: &Path) -> u64 {
    lines_with(console, "isr-tick ").iter().filter_map(|v| v.first().copied()).max().unwrap_or(0)
}

fn finish(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "isr resume failed: {text}");
    text
}

/// `isr_bytes_out_total` of the server.
fn bytes_out(server: &Server) -> u64 {
    use std::io::{Read, Write};
    let addr = server.url.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find(|l| l.starts_with("isr_bytes_out_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn console_of(c: &Client, parcel: &str) -> PathBuf {
    c.home.join("logs").join("alice").join(parcel).join("console.log")
}

/// `mode`: `auto`, `noprefetch` (auto without the prefetch) or `loaded`.
fn resume(c: &Client, parcel: &str, mode: &str) -> Child {
    let (ram, prefetch) = match mode {
        "noprefetch" => ("auto", "off"),
        m => (m, "on"),
    };
    c.cmd(&[
        "resume",
        parcel,
        "--display",
        "none",
        "--ram",
        ram,
        "--prefetch",
        prefetch,
        "--upload-rate",
        "0",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

/// Create `parcel` (768 MiB RAM) with `append`, boot it on `a` until `ready` says so, suspend, check in.
fn prepare(
    a: &Client,
    out: &Path,
    dir: &Path,
    parcel: &str,
    memory: &str,
    append: &str,
    ready: impl Fn(&Path) -> bool,
) {
    let disk = dir.join(format!("{parcel}.img"));
    std::fs::copy(out.join("disk.img"), &disk).unwrap();
    let (k, i) = (out.join("vmlinuz"), out.join("initrd.img"));
    a.ok(&[
        "create",
        parcel,
        "--disk",
        disk.to_str().unwrap(),
        "--memory",
        memory,
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        i.to_str().unwrap(),
        "--append",
        append,
    ]);
    let t = Instant::now();
    let child = resume(a, parcel, "auto");
    let console = console_of(a, parcel);
    wait_for(|| ready(&console), Duration::from_secs(600), "the guest to be ready");
    a.ok(&["suspend", parcel]);
    finish(child);
    a.ok(&["checkin", parcel]);
    eprintln!("{parcel}: boot, fill, suspend, checkin in {:.1}s", t.elapsed().as_secs_f64());
}

struct ResumeRun {
    cold: f64,
    bytes_first: u64,
    scan: f64,
    bytes_after: u64,
    suspend: f64,
    cached: f64,
}

/// A fresh client resumes `parcel` (taking the lock from whoever has it), runs it, suspends; then resumes
/// it again from its own cache.
fn resume_on_new_client(server: &Server, home: &Path, parcel: &str, ram: &str) -> ResumeRun {
    let b = Client::new(server, home);
    b.ok(&["unlock", parcel, "--force"]);
    let console = console_of(&b, parcel);
    let before = bytes_out(server);
    let t = Instant::now();
    // The console log is new on this client: any tick is after the resume.
    let child = resume(&b, parcel, ram);
    wait_for(|| last_tick(&console) > 0, Duration::from_secs(120), "the first tick");
    let cold = t.elapsed().as_secs_f64();
    let bytes_first = bytes_out(server) - before;
    let scanned = |c: &Path| !lines_with(c, "isr-scan ").is_empty();
    wait_for(|| scanned(&console), Duration::from_secs(300), "a pass over the guest's data");
    let scan = t.elapsed().as_secs_f64();
    std::thread::sleep(RUN_FOR.saturating_sub(t.elapsed()));
    let bytes_after = bytes_out(server) - before;
    let t = Instant::now();
    b.ok(&["suspend", parcel]);
    finish(child);
    let suspend = t.elapsed().as_secs_f64();
    let seen = last_tick(&console);
    let t = Instant::now();
    let child = resume(&b, parcel, ram);
    wait_for(|| last_tick(&console) > seen, Duration::from_secs(120), "the first tick (cached)");
    let cached = t.elapsed().as_secs_f64();
    b.ok(&["suspend", parcel]);
    finish(child);
    ResumeRun { cold, bytes_first, scan, bytes_after, suspend, cached }
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / MIB as f64)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require_tool("qemu-system-x86_64", "see /work/shared/notes/test-guest.md");
    println!("{}", load_note());
    let only = std::env::var("ISR_BENCH_ONLY").unwrap_or_default();
    let out = guest();
    let dir = scratch();
    let d = dir.path();
    let server = Server::start(&d.join("server"));
    let a = Client::new(&server, &d.join("a"));

    if only.is_empty() || only == "resume" {
        let mut rows = Vec::new();
        let mut cold = std::collections::HashMap::new();
        for fill in [32u64, 384] {
            let parcel = format!("fill{fill}");
            let append = format!("{BASE_APPEND} isr_fill={fill} isr_tick isr_scan");
            prepare(&a, &out, d, &parcel, "768", &append, |c| lines_with(c, "isr-scan ").len() >= 2);
            for (n, ram) in ["auto", "noprefetch", "loaded"].into_iter().enumerate() {
                let r = resume_on_new_client(&server, &d.join(format!("b-{fill}-{n}")), &parcel, ram);
                cold.insert((fill, ram), r.cold);
                rows.push(vec![
                    format!("{fill} MiB"),
                    match ram {
                        "auto" => "on demand + prefetch".into(),
                        "noprefetch" => "on demand, no prefetch".into(),
                        _ => "loaded before start".into(),
                    },
                    format!("{:.2}s", r.cold),
                    mib(r.bytes_first),
                    format!("{:.2}s", r.scan),
                    mib(r.bytes_after),
                    format!("{:.2}s", r.cached),
                    format!("{:.2}s", r.suspend),
                ]);
            }
        }
        print_table(
            "isr resume of a 768 MiB TCG guest: time to its next instruction (first tick), nothing cached",
            &[
                "RAM in use",
                "guest RAM",
                "to first tick, cold",
                "MiB fetched by then",
                "to first data pass",
                "MiB fetched after 60 s",
                "to first tick, cached",
                "suspend",
            ],
            &rows,
        );
        let ratio = |ram| cold[&(384, ram)] / cold[&(32, ram)];
        println!(
            "384 MiB vs 32 MiB in use, cold: on demand {:.2}x, loaded {:.2}x; on demand vs loaded at 384 MiB: {:.2}x",
            ratio("auto"),
            ratio("loaded"),
            cold[&(384, "auto")] / cold[&(384, "loaded")]
        );
    }

    if only.is_empty() || only == "loop" {
        let append = format!("{BASE_APPEND} isr_memloop=128");
        prepare(&a, &out, d, "memloop", "512", &append, |c| lines_with(c, "isr-memloop ").len() >= 3);
        let console = console_of(&a, "memloop");
        let mut best = std::collections::HashMap::new();
        for round in 0..2 {
            for ram in ["auto", "loaded"] {
                let seen = lines_with(&console, "isr-memloop ").len();
                let child = resume(&a, "memloop", ram);
                wait_for(
                    || lines_with(&console, "isr-memloop ").len() >= seen + 2,
                    Duration::from_secs(600),
                    "the memory loop after the resume",
                );
                // Longer than the kernel's dirty expiry (30 s): the write-back of the RAM file runs meanwhile.
                std::thread::sleep(LOOP_FOR);
                a.ok(&["suspend", "memloop"]);
                finish(child);
                // From the second pass after the resume (the first includes the fault-in of the file).
                let passes = lines_with(&console, "isr-memloop ");
                let (first, last) = (&passes[seen + 1], passes.last().unwrap());
                let secs = (last[1] - first[1]) as f64 / 100.0;
                let rate = (passes.len() - seen - 2) as f64 * 128.0 / secs;
                eprintln!("round {round}: {ram}: {rate:.1} MiB/s (guest time)");
                let e = best.entry(ram).or_insert(0.0f64);
                *e = e.max(rate);
            }
        }
        let (lazy, eager) = (best["auto"], best["loaded"]);
        print_table(
            "a guest loop overwriting 128 MiB of tmpfs for 45 s (512 MiB TCG guest), best of 2 alternating rounds",
            &["guest RAM", "MiB/s written (guest time)", "vs loaded"],
            &[
                vec!["on demand (FUSE)".into(), format!("{lazy:.1}"), format!("{:.2}", lazy / eager)],
                vec!["loaded before start (peer)".into(), format!("{eager:.1}"), "1.00".into()],
            ],
        );
    }
}
