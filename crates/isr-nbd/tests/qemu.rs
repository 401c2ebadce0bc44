//! Integration tests against the real QEMU NBD client (`qemu-io`, `qemu-img`
//! from Debian's qemu-utils). These tools are required, never skipped.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use isr_nbd::{serve_with_options, BlockDevice, MemDevice, ServeOptions};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

const MIB: usize = 1 << 20;

struct Server {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), isr_nbd::NbdError>>>,
}

impl Server {
    async fn start(dev: Arc<dyn BlockDevice>, opts: ServeOptions) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_with_options(listener, dev, opts, async move {
            let _ = rx.await;
        }));
        Server { _dir: dir, sock, stop: Some(tx), task: Some(task) }
    }
    fn url(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

async fn run(prog: &str, args: &[String]) -> Output {
    let out = tokio::process::Command::new(prog)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {prog} (install qemu-utils): {e}"));
    eprintln!("$ {prog} {}\n{}", args.join(" "), text(&out));
    out
}

async fn qemu_io(url: &str, extra: &[&str], cmds: &[&str]) -> Output {
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    args.push(url.to_string());
    run("qemu-io", &args).await
}

fn assert_clean(out: &Output) {
    let t = text(out);
    assert!(out.status.success(), "qemu-io failed: {t}");
    assert!(!t.contains("Pattern verification failed"), "{t}");
    assert!(!t.to_lowercase().contains("error"), "{t}");
    assert!(!t.contains("failed"), "{t}");
}

fn patterned(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_read_flush_zero_discard() {
    let dev = Arc::new(MemDevice::from_vec(vec![0xaa; 8 * MIB]));
    let srv = Server::start(dev.clone(), ServeOptions::default()).await;
    let out = qemu_io(
        &srv.url(),
        &[],
        &[
            "write -P 0x5a 1M 64k",
            "read -P 0x5a 1M 64k",
            "flush",
            "write -z 2M 128k",
            "read -P 0 2M 128k",
            "discard 4M 64k",
            "write -P 0x11 7M 1M",
            "write -f -P 0x22 6M 4k",
            "read -P 0x11 7M 1M",
            "read -P 0xaa 0 1M",
        ],
    )
    .await;
    assert_clean(&out);
    let t = text(&out);
    assert!(t.contains("wrote 65536/65536 bytes at offset 1048576"), "{t}");
    assert!(t.contains("read 131072/131072 bytes at offset 2097152"), "{t}");
    assert!(t.contains("discard 65536/65536 bytes at offset 4194304"), "{t}");
    srv.stop().await;

    let d = dev.contents();
    assert!(d[..MIB].iter().all(|&b| b == 0xaa));
    assert!(d[MIB..MIB + 65536].iter().all(|&b| b == 0x5a));
    assert!(d[MIB + 65536..2 * MIB].iter().all(|&b| b == 0xaa));
    assert!(d[2 * MIB..2 * MIB + 131072].iter().all(|&b| b == 0));
    assert!(d[2 * MIB + 131072..4 * MIB].iter().all(|&b| b == 0xaa));
    assert!(d[4 * MIB..4 * MIB + 65536].iter().all(|&b| b == 0)); // MemDevice zeroes on trim
    assert!(d[6 * MIB..6 * MIB + 4096].iter().all(|&b| b == 0x22));
    assert!(d[7 * MIB..].iter().all(|&b| b == 0x11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_detects_wrong_pattern() {
    // Guard against a vacuous assert_clean: a mismatch must be visible.
    let dev = Arc::new(MemDevice::from_vec(vec![0x01; MIB]));
    let srv = Server::start(dev, ServeOptions::default()).await;
    let out = qemu_io(&srv.url(), &[], &["read -P 0x02 0 4k"]).await;
    assert!(text(&out).contains("Pattern verification failed"), "{}", text(&out));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_parallel_aio() {
    let dev = Arc::new(MemDevice::new(4 * MIB));
    let srv = Server::start(dev.clone(), ServeOptions::default()).await;
    let mut cmds = Vec::new();
    for i in 0..32 {
        cmds.push(format!("aio_write -P {} {}k 64k", i + 1, i * 64));
    }
    cmds.push("aio_flush".into());
    for i in 0..32 {
        cmds.push(format!("aio_read -P {} {}k 64k", i + 1, i * 64));
    }
    cmds.push("aio_flush".into());
    let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    let out = qemu_io(&srv.url(), &[], &refs).await;
    assert_clean(&out);
    srv.stop().await;
    let d = dev.contents();
    for i in 0..32 {
        assert!(d[i * 65536..(i + 1) * 65536].iter().all(|&b| b == (i + 1) as u8), "chunk {i}");
    }
}

/// Reads from `[fail_from, ..)` fail with EIO; everything else is a MemDevice.
struct FailingDevice {
    inner: MemDevice,
    fail_from: u64,
}

#[async_trait::async_trait]
impl BlockDevice for FailingDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset + buf.len() as u64 > self.fail_from {
            return Err(io::Error::other("chunk fetch failed"));
        }
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.inner.write(offset, data).await
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_read_error_is_eio() {
    let dev =
        Arc::new(FailingDevice { inner: MemDevice::from_vec(vec![7; 4 * MIB]), fail_from: 2 * MIB as u64 });
    let srv = Server::start(dev, ServeOptions::default()).await;
    let ok = qemu_io(&srv.url(), &[], &["read -P 7 0 64k"]).await;
    assert_clean(&ok);
    let bad = qemu_io(&srv.url(), &[], &["read -P 7 3M 64k"]).await;
    let t = text(&bad);
    assert!(t.contains("Input/output error"), "{t}");
    assert!(!t.contains("read 65536/65536"), "{t}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_read_only_export() {
    let dev = Arc::new(MemDevice::from_vec(vec![3; MIB]));
    let srv = Server::start(dev.clone(), ServeOptions { read_only: true, ..ServeOptions::default() }).await;
    let ok = qemu_io(&srv.url(), &["-r"], &["read -P 3 0 1M"]).await;
    assert_clean(&ok);
    // Opening read-write is refused (EPERM-style), and nothing is written.
    let bad = qemu_io(&srv.url(), &[], &["write -P 9 0 4k"]).await;
    let t = text(&bad);
    assert!(t.contains("Permission denied") || t.contains("Operation not permitted"), "{t}");
    assert!(!t.contains("wrote 4096/4096"), "{t}");
    srv.stop().await;
    assert!(dev.contents().iter().all(|&b| b == 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_convert_bench() {
    let size = 6 * MIB + 12345 / 512 * 512;
    let dev = Arc::new(MemDevice::new(size));
    let srv = Server::start(dev.clone(), ServeOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();

    // info
    let out =
        run("qemu-img", &["info".into(), "--output=json".into(), "-f".into(), "raw".into(), srv.url()]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("\"virtual-size\": {size}")), "{}", text(&out));

    // convert a local image into the export (-n: target exists)
    let data = patterned(size);
    let src = dir.path().join("src.img");
    std::fs::write(&src, &data).unwrap();
    let out = run(
        "qemu-img",
        &[
            "convert".into(),
            "-n".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            "raw".into(),
            p(&src),
            srv.url(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(dev.contents() == data, "device contents differ after convert");

    // and back out of the export
    let dst = dir.path().join("dst.img");
    convert_out(&srv.url(), &dst).await;
    assert!(std::fs::read(&dst).unwrap() == data, "exported contents differ");

    // compare
    let out = run(
        "qemu-img",
        &["compare".into(), "-f".into(), "raw".into(), "-F".into(), "raw".into(), p(&src), srv.url()],
    )
    .await;
    assert!(out.status.success() && text(&out).contains("Images are identical"), "{}", text(&out));

    // bench: pipelined 4k writes then reads
    for extra in [&["-w"][..], &[][..]] {
        let mut args: Vec<String> =
            vec!["bench".into(), "-f".into(), "raw".into(), "-c".into(), "2000".into()];
        args.extend(["-d", "32", "-s", "4k", "-S", "8k"].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(srv.url());
        let out = run("qemu-img", &args).await;
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("Run completed"), "{}", text(&out));
    }
    srv.stop().await;
}

/// QEMU's client reads holes as zeroes: a device with zero and data regions, read through `qemu-io`
/// patterns and copied out with `qemu-img convert`, gives back exactly its contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_reads_holes_as_zeroes() {
    let size = 4 * MIB;
    let mut data = vec![0u8; size];
    data[MIB..2 * MIB].fill(0x5a);
    data[3 * MIB + 4096..3 * MIB + 8192].fill(0x5a);
    let srv = Server::start(Arc::new(MemDevice::sparse(data.clone())), ServeOptions::default()).await;
    let out = qemu_io(
        &srv.url(),
        &[],
        &[
            "read -P 0 0 1M",
            "read -P 0x5a 1M 1M",
            "read -P 0 2M 1M",
            "read -P 0x5a 3149824 4k",
            "read -P 0 0 4k",
        ],
    )
    .await;
    assert_clean(&out);
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("dst.img");
    convert_out(&srv.url(), &dst).await;
    assert!(std::fs::read(&dst).unwrap() == data, "copied contents differ");
    srv.stop().await;
}

/// `qemu-img convert` of the export at `url` into the raw file `dst`.
async fn convert_out(url: &str, dst: &Path) {
    let out = run(
        "qemu-img",
        &["convert".into(), "-f".into(), "raw".into(), "-O".into(), "raw".into(), url.into(), p(dst)],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
}

fn p(path: &Path) -> String {
    path.display().to_string()
}
