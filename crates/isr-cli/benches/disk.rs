//! `isr disk` vs `qemu-nbd` serving a raw copy of the same image, both driven by `qemu-img bench` over a Unix
//! socket, plus a cold sequential read (fresh client home, no hoard) vs QEMU's copy-on-read over loopback NBD
//! in the same run. The disk is 2 GiB (ISR_BENCH_DISK_MIB changes it) and the 4 KiB workloads touch every
//! chunk once, so their working set is the whole disk, far beyond any cache inside isr.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p isr-cli --bench disk`
//! (same CARGO_TARGET_DIR); ISR_BENCH_ONLY=hot or cold runs one half. Needs qemu-utils (qemu-img, qemu-nbd). ISR_BENCH_DIR picks the scratch directory.

mod common;
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

static IMAGE_MIB: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
    std::env::var("ISR_BENCH_DISK_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(2048)
});
/// 4 KiB requests this far apart land in a new 128 KiB chunk each time, and at a new offset in it.
const STRIDE: u64 = 128 * 1024 + 4096;
const REPS: usize = 3;
/// Rounds of the whole-disk rows (nbdcopy, convert): a pipeline whose own limit, qemu-img or nbdcopy, moves by
/// up to 2x from one run to the next on a shared machine, so each side gets more tries at its best.
const WHOLE_REPS: usize = 5;
/// Rounds of the cold read (each reader once per round; the best of each counts), after one warm-up round
/// that is not counted.
const COLD_ROUNDS: usize = 5;

struct Workload {
    name: &'static str,
    args: Vec<String>,
    /// Bytes moved, for MB/s; requests, for IOPS.
    bytes: u64,
    requests: u64,
}

fn image_mib() -> u64 {
    *IMAGE_MIB
}

fn image() -> u64 {
    image_mib() * MIB
}

fn bench_args(write: bool, count: u64, size: u64, step: u64, depth: u64) -> Vec<String> {
    let mut a = vec![
        "-f".into(),
        "raw".into(),
        "-c".into(),
        count.to_string(),
        "-s".into(),
        size.to_string(),
        "-S".into(),
        step.to_string(),
        "-d".into(),
        depth.to_string(),
    ];
    if write {
        // A non-zero pattern: zero writes would be free for isr (zero chunks are not stored). One flush at
        // the end, so the time includes making the data durable.
        a.extend(["-w".into(), "--pattern=165".into(), format!("--flush-interval={count}")]);
    }
    a
}

fn workloads() -> Vec<Workload> {
    let chunks = image() / STRIDE;
    let seq = |write, name| Workload {
        name,
        args: bench_args(write, image_mib(), MIB, MIB, 16),
        bytes: image(),
        requests: image_mib(),
    };
    let small = |write, depth, count, name| Workload {
        name,
        args: bench_args(write, count, 4096, STRIDE, depth),
        bytes: count * 4096,
        requests: count,
    };
    vec![
        seq(false, "seq read 1 MiB, QD16"),
        seq(true, "seq write 1 MiB, QD16, +flush"),
        small(false, 16, chunks, "4 KiB read, every chunk once (stride 132 KiB), QD16"),
        small(false, 1, chunks, "4 KiB read, every chunk once (stride 132 KiB), QD1"),
        small(true, 16, chunks, "4 KiB write, every chunk once (stride 132 KiB), QD16, +flush"),
        small(true, 1, chunks, "4 KiB write, every chunk once (stride 132 KiB), QD1, +flush"),
    ]
}

/// Run `qemu-img bench` and return its own "Run completed in X seconds".
fn qemu_img_bench(target: &str, args: &[String]) -> Duration {
    let out = run(Command::new("qemu-img").arg("bench").args(args).arg(target), "qemu-img bench");
    let secs: f64 = out
        .split("Run completed in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("odd qemu-img bench output: {out}"));
    Duration::from_secs_f64(secs)
}

/// Sequential write of real (mixed) data with `qemu-img convert -n`, which flushes before it exits.
fn convert_into(src: &Path, target: &str) -> Duration {
    let t = Instant::now();
    run(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw", "-m", "16", "-W"])
            .arg(src)
            .arg(target),
        "qemu-img convert",
    );
    t.elapsed()
}

/// Read the whole disk through `qemu-io -C` (copy-on-read) on `overlay`: 1 MiB reads, 16 in flight, each
/// batch waited for; the data is written into the overlay as it is read.
fn copy_on_read_all(overlay: &Path) -> Duration {
    let mut c = Command::new("qemu-io");
    c.args(["-C", "-f", "qcow2"]);
    for i in 0..image_mib() {
        c.arg("-c").arg(format!("aio_read -q {} 1M", i * MIB));
        if i % 16 == 15 {
            c.arg("-c").arg("aio_flush");
        }
    }
    c.arg("-c").arg("aio_flush").arg(overlay);
    let t = Instant::now();
    run(&mut c, "qemu-io copy-on-read");
    let took = t.elapsed();
    let filled = std::fs::metadata(overlay).unwrap().len();
    assert!(filled >= image() / 2, "the copy-on-read overlay holds only {filled} bytes");
    took
}

/// Read every file under `dir` (into the page cache).
fn read_all_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            read_all_files(&p);
        } else if p.is_file() {
            let _ = std::io::copy(&mut std::fs::File::open(&p).unwrap(), &mut std::io::sink());
        }
    }
}

/// `nbdcopy URL FILE` (a fresh file each time); the time it took.
fn nbdcopy(url: &str, out: &Path) -> Duration {
    let _ = std::fs::remove_file(out);
    std::fs::File::create(out).unwrap().set_len(image()).unwrap();
    let t = Instant::now();
    let st = Command::new("nbdcopy").arg(url).arg(out).status().expect("nbdcopy");
    assert!(st.success(), "nbdcopy {url} failed");
    t.elapsed()
}

fn qemu_nbd_unix(image: &Path, sock: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    let child = Command::new("qemu-nbd")
        .args(["-f", "raw", "--cache=writeback", "--aio=threads", "--persistent", "--socket"])
        .arg(sock)
        .arg(image)
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-nbd (install qemu-utils)");
    wait_for(|| sock.exists(), Duration::from_secs(30), "the qemu-nbd socket");
    child
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn qemu_nbd_tcp(image: &Path, port: u16) -> Child {
    let child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "--cache=writeback",
            "--aio=threads",
            "--persistent",
            "--read-only",
            "-b",
            "127.0.0.1",
            "-p",
        ])
        .arg(port.to_string())
        .arg(image)
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    wait_for(
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        Duration::from_secs(30),
        "qemu-nbd on TCP",
    );
    child
}

/// A table row for a workload that moves the whole disk once: MB/s of the peer and of isr, and their ratio.
fn whole_disk_row(name: &str, peer: Duration, isr: Duration) -> Vec<String> {
    vec![
        name.to_owned(),
        format!("{:.0} MB/s", mbps(image(), peer)),
        format!("{:.0} MB/s", mbps(image(), isr)),
        format!("{:.2}", peer.as_secs_f64() / isr.as_secs_f64()),
    ]
}

fn best(v: &[Duration]) -> Duration {
    *v.iter().min().unwrap()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require_tool("qemu-img", "apt-get install qemu-utils");
    require_tool("qemu-nbd", "apt-get install qemu-utils");
    require_tool("nbdcopy", "apt-get install libnbd-bin");
    println!("{}", load_note());
    let dir = scratch();
    let d = dir.path();
    let img = d.join("image.raw");
    let t = Instant::now();
    make_mixed_image(&img, image(), "isr bench image");
    let img2 = d.join("image2.raw");
    make_mixed_image(&img2, image(), "isr bench image, second content");
    eprintln!("images written in {:.1}s", t.elapsed().as_secs_f64());

    let server = Server::start(&d.join("server"));
    let a = Client::new(&server, &d.join("home-a"));
    let img_s = img.to_str().unwrap();
    a.ok(&["create", "hot", "--disk", img_s]);
    a.ok(&["create", "cold", "--disk", img_s]);
    a.ok(&["checkout", "hot"]);
    a.ok(&["hoard", "hot"]);
    let peer_img = d.join("peer.raw");
    std::fs::copy(&img, &peer_img).unwrap();
    // The setup wrote gigabytes (images, chunk files, the hoarded runtime image). Their writeback would
    // otherwise start during the first measured runs and fall on whichever reader goes first.
    run(&mut Command::new("sync"), "sync");

    // ISR_BENCH_ONLY=cold (or hot) runs one half.
    let only = std::env::var("ISR_BENCH_ONLY").unwrap_or_default();
    if only != "cold" {
        // ---- hoarded parcel vs qemu-nbd, Unix sockets
        let isr_sock = d.join("isr.sock");
        let peer_sock = d.join("peer.sock");
        // The background upload off: it would send each write workload's data to the bench's own server, on
        // this machine's cores and disk, during the workloads after it, the peer's runs as much as isr's. Its
        // cost to a guest is measured after the table (the convert row again, upload on).
        let isr = a.disk_with("hot", &isr_sock, &["--upload-rate", "0"]);
        let peer = qemu_nbd_unix(&peer_img, &peer_sock);
        let isr_url = format!("nbd+unix:///?socket={}", isr_sock.display());
        let peer_url = format!("nbd+unix:///?socket={}", peer_sock.display());

        let mut rows = Vec::new();
        for w in workloads() {
            let (mut pt, mut it) = (Vec::new(), Vec::new());
            for _ in 0..REPS {
                pt.push(qemu_img_bench(&peer_url, &w.args));
                it.push(qemu_img_bench(&isr_url, &w.args));
            }
            let (p, i) = (best(&pt), best(&it));
            let unit = |d: Duration| {
                if w.bytes / w.requests >= MIB {
                    format!("{:.0} MB/s", mbps(w.bytes, d))
                } else {
                    format!("{:.0} IOPS", w.requests as f64 / d.as_secs_f64())
                }
            };
            rows.push(vec![
                w.name.to_string(),
                unit(p),
                unit(i),
                format!("{:.2}", p.as_secs_f64() / i.as_secs_f64()),
            ]);
            eprintln!("{}: qemu-nbd {:?} isr {:?}", w.name, pt, it);
        }
        // nbdcopy (libnbd) of the whole disk into a file: both servers answer block status, so zero chunks
        // (a quarter of the mixed image) are skipped rather than read.
        {
            let (mut pt, mut it) = (Vec::new(), Vec::new());
            let out = d.join("nbdcopy.raw");
            for _ in 0..WHOLE_REPS {
                pt.push(nbdcopy(&peer_url, &out));
                it.push(nbdcopy(&isr_url, &out));
            }
            let _ = std::fs::remove_file(&out);
            let (p, i) = (best(&pt), best(&it));
            rows.push(whole_disk_row("nbdcopy of the whole disk to a file (block status on both)", p, i));
            eprintln!("nbdcopy: qemu-nbd {pt:?} isr {it:?}");
        }
        // Real data: a different mixed image written over the whole disk, then flushed.
        let convert_peer = {
            let (mut pt, mut it) = (Vec::new(), Vec::new());
            for rep in 0..WHOLE_REPS {
                let src = if rep % 2 == 0 { &img2 } else { &img };
                pt.push(convert_into(src, &peer_url));
                it.push(convert_into(src, &isr_url));
            }
            let (p, i) = (best(&pt), best(&it));
            rows.push(whole_disk_row(
                "seq write of the whole disk, other mixed data (qemu-img convert -n -m 16 -W), +flush",
                p,
                i,
            ));
            eprintln!("convert: qemu-nbd {pt:?} isr {it:?}");
            p
        };
        stop(isr);
        stop(peer);
        // The same writes with the background upload on (the default), while it works through everything the
        // workloads above wrote (it encodes at the lowest CPU priority and sends to the server on this machine).
        {
            let isr = a.disk("hot", &isr_sock);
            let mut it = Vec::new();
            for rep in 0..WHOLE_REPS {
                it.push(convert_into(if rep % 2 == 0 { &img2 } else { &img }, &isr_url));
            }
            stop(isr);
            rows.push(whole_disk_row(
                "the same, background upload on (sending the writes above meanwhile); qemu-nbd: its row above",
                convert_peer,
                best(&it),
            ));
            eprintln!("convert, background upload on: isr {it:?}");
        }
        print_table(
            &format!(
                "isr disk (hoarded) vs qemu-nbd --cache=writeback --aio=threads, {} MiB image, best of {REPS} (whole-disk rows: of {WHOLE_REPS})",
                image_mib()
            ),
            &["workload (qemu-img bench)", "qemu-nbd", "isr disk", "isr/qemu-nbd"],
            &rows,
        );
    }

    if only != "hot" {
        // ---- cold sequential read: fresh home, checkout without hoard, read the whole disk. The three readers
        // take turns, round after round, so that what this machine does meanwhile (it pages out memory
        // left unused for a while, and memory it handed back costs more to fill again) falls on all of them.
        let read_all = bench_args(false, image_mib(), MIB, MIB, 16);
        let port = free_port();
        let tcp = qemu_nbd_tcp(&peer_img, port);
        let (mut cold, mut tcp_t, mut cor_t) = (Vec::new(), Vec::new(), Vec::new());
        // CPU time of every process of each run (isr: `isr disk`, isr-server, qemu-img; copy-on-read:
        // qemu-io, qemu-nbd), summed over the rounds: what a machine's cores must supply per read.
        let (mut cold_cpu, mut cor_cpu) = (Duration::ZERO, Duration::ZERO);
        let me = std::process::id();
        let mut fetched = String::new();
        // Round 0 is a warm-up, run in full and not counted. The first reader to fill a gigabyte of page
        // cache takes memory the host has not backed yet and ran 1.4-3.2x slower than in its later rounds;
        // after round 0 every reader reuses memory the previous reader freed.
        for rep in 0..=COLD_ROUNDS {
            let counted = rep > 0;
            let b = Client::new(&server, &d.join(format!("home-cold-{rep}")));
            b.ok(&["checkout", "cold"]);
            // The server's chunk files in the page cache, as the peer's raw file is (the qemu-nbd TCP run
            // reads it just before the copy-on-read).
            read_all_files(&server.data);
            let sock = d.join(format!("cold-{rep}.sock"));
            let child = b.disk("cold", &sock);
            let before = cpu_time(child.id(), false) + cpu_time(server.pid(), false) + cpu_time(me, true);
            let t = qemu_img_bench(&format!("nbd+unix:///?socket={}", sock.display()), &read_all);
            let spent =
                cpu_time(child.id(), false) + cpu_time(server.pid(), false) + cpu_time(me, true) - before;
            if counted {
                cold.push(t);
                cold_cpu += spent;
            }
            stop(child);
            fetched = b
                .ok(&["stat", "cold"])
                .lines()
                .find(|l| l.contains("cached"))
                .unwrap_or_default()
                .trim()
                .to_owned();
            b.ok(&["checkin", "cold"]);
            let _ = std::fs::remove_dir_all(&b.home);

            let t = qemu_img_bench(&format!("nbd://127.0.0.1:{port}"), &read_all);
            if counted {
                tcp_t.push(t);
            }
            // QEMU's copy-on-read: an empty qcow2 overlay over the NBD export, every read written into it.
            let overlay = d.join(format!("cor-{rep}.qcow2"));
            run(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                    .arg(format!("nbd://127.0.0.1:{port}"))
                    .arg(&overlay),
                "qemu-img create overlay",
            );
            let before = cpu_time(tcp.id(), false) + cpu_time(me, true);
            let t = copy_on_read_all(&overlay);
            let spent = cpu_time(tcp.id(), false) + cpu_time(me, true) - before;
            if counted {
                cor_t.push(t);
                cor_cpu += spent;
            }
            let _ = std::fs::remove_file(&overlay);
        }
        stop(tcp);
        eprintln!("cold: isr {cold:?} (last: {fetched}); qemu-nbd tcp {tcp_t:?}; copy-on-read {cor_t:?}");
        let rounds = COLD_ROUNDS as u32;
        let (isr_cpu, peer_cpu) = (cold_cpu / rounds, cor_cpu / rounds);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len() as u32;
        let (isr_wall, cor_wall) = (mean(&cold), mean(&cor_t));
        // The best ratio this CPU cost allows: every core busy with the read the whole time.
        let ceiling = cor_wall.as_secs_f64() * cores / isr_cpu.as_secs_f64();
        let (c, p, cor) =
            (mbps(image(), best(&cold)), mbps(image(), best(&tcp_t)), mbps(image(), best(&cor_t)));
        print_table(
            &format!("cold sequential read of the whole disk (fresh client home, checkout without hoard; qemu-img bench 1 MiB QD16; best of {COLD_ROUNDS} interleaved rounds after a warm-up round)"),
            &["reader", "MB/s", "isr cold / this"],
            &[
                vec!["isr disk, every chunk fetched from isr-server over loopback HTTP".into(), format!("{c:.0}"), "1.00".into()],
                vec!["QEMU copy-on-read (qcow2 overlay) over loopback NBD from qemu-nbd, cold overlay (same run)".into(), format!("{cor:.0}"), format!("{:.2}", c / cor)],
                vec!["qemu-nbd over loopback TCP, raw file in page cache (same run)".into(), format!("{p:.0}"), format!("{:.2}", c / p)],
            ],
        );
        print_table(
            &format!("CPU cost of the cold read, mean of {COLD_ROUNDS} rounds ({cores} cores)"),
            &["reader", "wall s", "CPU s, all its processes", "CPU s per wall s"],
            &[
                vec![
                    "isr (isr disk + isr-server + qemu-img)".into(),
                    format!("{:.2}", isr_wall.as_secs_f64()),
                    format!("{:.2}", isr_cpu.as_secs_f64()),
                    format!("{:.2}", isr_cpu.as_secs_f64() / isr_wall.as_secs_f64()),
                ],
                vec![
                    "copy-on-read (qemu-io + qemu-nbd)".into(),
                    format!("{:.2}", cor_wall.as_secs_f64()),
                    format!("{:.2}", peer_cpu.as_secs_f64()),
                    format!("{:.2}", peer_cpu.as_secs_f64() / cor_wall.as_secs_f64()),
                ],
            ],
        );
        println!(
            "ceiling of isr / copy-on-read at this CPU cost: {ceiling:.2}x (copy-on-read's mean wall time x {cores} cores / isr's CPU time)"
        );
    }
}
