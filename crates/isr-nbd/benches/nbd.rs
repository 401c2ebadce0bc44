//! isr-nbd vs qemu-nbd, both driven by `qemu-img bench` over a Unix socket.
//!
//! Each server exports its own copy of the same 256 MiB raw image (page cache,
//! no O_DIRECT on either side):
//! * isr-nbd: [`FileDevice`] (pread/pwrite on tokio's blocking pool, like
//!   qemu-nbd's thread pool), 2 tokio worker threads;
//! * isr-nbd "inline": same, but `FileDevice::with_inline_reads(64 KiB)` (small
//!   preads done directly on the async task; page-cache images only);
//! * qemu-nbd: `-f raw --cache=writeback --aio=threads --detect-zeroes=off
//!   --discard=ignore --persistent` (its defaults, page-cache backed like ours).
//!
//! Every workload is run twice per server (alternating); the best run counts.
//! Run with `cargo bench -p isr-nbd`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isr_nbd::{serve, FileDevice};

const IMAGE_SIZE: usize = 256 << 20;

struct Workload {
    name: &'static str,
    args: &'static [&'static str],
    count: u64,
    size: u64,
}

const WORKLOADS: &[Workload] = &[
    Workload { name: "seq read 1M d8", args: &["-d", "8", "-s", "1M"], count: 1024, size: 1 << 20 },
    Workload { name: "seq write 1M d8", args: &["-w", "-d", "8", "-s", "1M"], count: 1024, size: 1 << 20 },
    Workload {
        name: "4k read S8k d32",
        args: &["-d", "32", "-s", "4k", "-S", "8k"],
        count: 40000,
        size: 4096,
    },
    Workload {
        name: "4k write S8k d32",
        args: &["-w", "-d", "32", "-s", "4k", "-S", "8k"],
        count: 40000,
        size: 4096,
    },
    Workload { name: "4k read S8k d1", args: &["-d", "1", "-s", "4k", "-S", "8k"], count: 15000, size: 4096 },
];

fn url(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// Run `qemu-img bench` and return the elapsed seconds it reports.
fn bench(sock: &Path, w: &Workload) -> f64 {
    let count = w.count.to_string();
    let out = Command::new("qemu-img")
        .args(["bench", "-f", "raw", "-c", &count])
        .args(w.args)
        .arg(url(sock))
        .output()
        .expect("run qemu-img (install qemu-utils)");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-img bench failed: {text}");
    // "Run completed in 1.234 seconds."
    let secs = text
        .split("Run completed in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("cannot parse qemu-img output: {text}"));
    secs
}

fn wait_for_socket(sock: &Path) {
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "server socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn make_image(path: &PathBuf) {
    let mut data = vec![0u8; IMAGE_SIZE];
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    std::fs::write(path, &data).expect("write image");
}

fn start_isr(
    rt: &tokio::runtime::Runtime,
    sock: PathBuf,
    image: &Path,
    inline: usize,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), isr_nbd::NbdError>>) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let _g = rt.enter();
    let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
    let dev = Arc::new(FileDevice::open(image).expect("open image").with_inline_reads(inline));
    let task = rt.spawn(serve(listener, dev, async move {
        let _ = stop_rx.await;
    }));
    (stop_tx, task)
}

fn main() {
    // `cargo bench` passes --bench; no arguments are used.
    let dir = tempfile::tempdir().expect("tempdir");
    let isr_img = dir.path().join("isr.img");
    let qemu_img = dir.path().join("qemu.img");
    make_image(&isr_img);
    std::fs::copy(&isr_img, &qemu_img).expect("copy image");

    // isr-nbd servers, in process (both export isr.img; they run one at a time).
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let isr_sock = dir.path().join("isr.sock");
    let inline_sock = dir.path().join("isr-inline.sock");
    let servers = [
        start_isr(&rt, isr_sock.clone(), &isr_img, 0),
        start_isr(&rt, inline_sock.clone(), &isr_img, 64 << 10),
    ];

    // qemu-nbd.
    let qemu_sock = dir.path().join("qemu.sock");
    let mut qemu = Command::new("qemu-nbd")
        .args(["-f", "raw", "--cache=writeback", "--aio=threads", "--detect-zeroes=off", "--discard=ignore"])
        .arg("--persistent")
        .arg(format!("--socket={}", qemu_sock.display()))
        .arg(&qemu_img)
        .stdout(Stdio::null())
        .spawn()
        .expect("run qemu-nbd (install qemu-utils)");
    wait_for_socket(&qemu_sock);

    let started = Instant::now();
    println!();
    println!("isr-nbd vs qemu-nbd, qemu-img bench over Unix sockets, 256 MiB raw image (page cache)");
    println!(
        "{:<17} {:>9} {:>8} {:>9} {:>8} {:>9} {:>8} {:>6} {:>6}",
        "workload", "isr MB/s", "IOPS", "inl MB/s", "IOPS", "qemu MB/s", "IOPS", "isr/q", "inl/q"
    );
    for w in WORKLOADS {
        let (mut isr, mut inl, mut q) = (f64::MAX, f64::MAX, f64::MAX);
        for _ in 0..2 {
            isr = isr.min(bench(&isr_sock, w));
            inl = inl.min(bench(&inline_sock, w));
            q = q.min(bench(&qemu_sock, w));
        }
        let mbs = |s: f64| (w.count * w.size) as f64 / s / 1e6;
        let iops = |s: f64| w.count as f64 / s;
        println!(
            "{:<17} {:>9.1} {:>8.0} {:>9.1} {:>8.0} {:>9.1} {:>8.0} {:>5.2}x {:>5.2}x",
            w.name,
            mbs(isr),
            iops(isr),
            mbs(inl),
            iops(inl),
            mbs(q),
            iops(q),
            q / isr,
            q / inl
        );
    }
    println!(
        "isr = isr-nbd + FileDevice on spawn_blocking; inl = isr-nbd + FileDevice with inline reads <= 64 KiB;"
    );
    println!(
        "qemu = qemu-nbd; ratios = throughput / qemu-nbd throughput; best of 2 runs each; total {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let _ = qemu.kill();
    let _ = qemu.wait();
    for (stop_tx, task) in servers {
        let _ = stop_tx.send(());
        rt.block_on(task).expect("server task").expect("server");
    }
}
