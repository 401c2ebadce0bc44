//! Boots the project's test guest (guest/build.sh) under TCG with its disk served by qemu-nbd, suspends it to a
//! memory image, resumes it, and checks that the guest's in-memory counter continues and the disk holds one
//! contiguous run of counter values. Needs QEMU 10 (guest/build.sh installs it when run as root); fails, never
//! skips, without it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use isr_vmm::{detect_accel, Accel, Start, Vm, VmConfig, VmmError, DEFAULT_QEMU};

const APPEND: &str = "console=ttyS0 quiet panic=-1 init_on_free=1";

struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
    disk: PathBuf,
}

/// Runs guest/build.sh once per test binary.
fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest");
        let t = Instant::now();
        let out = Command::new("bash").arg(root.join("build.sh")).output().expect("running guest/build.sh");
        assert!(
            out.status.success(),
            "guest/build.sh failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("guest/build.sh: {:.1} s", t.elapsed().as_secs_f64());
        let out_dir = std::env::var_os("ISR_GUEST_OUT").map(PathBuf::from).unwrap_or(root.join("out"));
        Guest {
            kernel: out_dir.join("vmlinuz"),
            initrd: out_dir.join("initrd.img"),
            disk: out_dir.join("disk.img"),
        }
    })
}

/// qemu-nbd serving a copy of the guest disk; killed on drop.
struct Nbd {
    child: std::process::Child,
    socket: PathBuf,
    disk: PathBuf,
}

impl Nbd {
    fn start(dir: &Path) -> Nbd {
        let disk = dir.join("disk.img");
        std::fs::copy(&guest().disk, &disk).expect("copying disk.img");
        let socket = dir.join("nbd.sock");
        let child = Command::new("qemu-nbd")
            .arg(format!("--socket={}", socket.display()))
            .args(["-f", "raw", "--persistent"])
            .arg(&disk)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting qemu-nbd (qemu-utils)");
        // a generous deadline: only a qemu-nbd that never starts should fail this, not a loaded machine
        let deadline = Instant::now() + Duration::from_secs(300);
        while !socket.exists() {
            if Instant::now() > deadline {
                panic!("qemu-nbd did not create its socket {} within 5 minutes", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Nbd { child, socket, disk }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config(dir: &Path, nbd: &Nbd, append: &str) -> VmConfig {
    let g = guest();
    let mut c = VmConfig::new(256, &nbd.socket);
    c.kernel = Some(g.kernel.clone());
    c.initrd = Some(g.initrd.clone());
    c.append = Some(append.into());
    c.console_log = Some(dir.join("console.log"));
    c.accel = Accel::Tcg;
    c
}

/// Counter values printed on the console after byte `from`.
fn counters(log: &Path, from: usize) -> Vec<u64> {
    let bytes = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(bytes.get(from..).unwrap_or_default());
    text.lines().filter_map(|l| l.trim().strip_prefix("isr-counter ")?.trim().parse().ok()).collect()
}

/// Waits until the console shows (after byte `from`) a counter >= `at_least`; returns the counters seen.
async fn wait_counter(vm: &mut Vm, log: &Path, from: usize, at_least: u64, timeout: Duration) -> Vec<u64> {
    let t = Instant::now();
    loop {
        let c = counters(log, from);
        if c.last().is_some_and(|&n| n >= at_least) {
            return c;
        }
        if t.elapsed() > timeout {
            let _ = vm.poweroff().await;
            panic!(
                "no isr-counter >= {at_least} within {timeout:?}; console:\n{}\nQEMU stderr:\n{}",
                String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()),
                vm.stderr_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_len(log: &Path) -> usize {
    std::fs::metadata(log).map(|m| m.len() as usize).unwrap_or(0)
}

/// The counter file on the (raw ext4) disk, after replaying the journal on a copy.
fn disk_counter(disk: &Path, dir: &Path) -> Vec<u64> {
    let copy = dir.join("check.img");
    std::fs::copy(disk, &copy).unwrap();
    let fsck = Command::new("e2fsck").args(["-fy"]).arg(&copy).output().expect("running e2fsck");
    // 0: clean, 1: errors corrected (journal replay counts as such)
    assert!(
        matches!(fsck.status.code(), Some(0 | 1)),
        "e2fsck found a damaged file system ({}):\n{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout)
    );
    let out =
        Command::new("debugfs").args(["-R", "cat /counter"]).arg(&copy).output().expect("running debugfs");
    assert!(out.status.success(), "debugfs: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap_or_else(|_| panic!("bad line {l:?} in /counter")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_suspend_resume_continues_counter() {
    let t0 = Instant::now();
    guest();
    let dir = tempfile::tempdir().unwrap();
    let mut nbd = Nbd::start(dir.path());
    let cfg = config(dir.path(), &nbd, APPEND);
    let log = cfg.console_log.clone().unwrap();
    let image = dir.path().join("memory.img");

    // cold boot
    let mut vm = Vm::start(cfg.clone(), Start::Cold).await.expect("cold boot");
    let machine = vm.machine_type().await.unwrap();
    assert!(machine.starts_with("pc-i440fx-"), "{machine}");
    let before = wait_counter(&mut vm, &log, 0, 3, Duration::from_secs(300)).await;
    let t_boot = t0.elapsed();

    // suspend
    let info = vm.suspend(&image).await.expect("suspend");
    let last = *counters(&log, 0).last().unwrap();
    assert!(last >= *before.last().unwrap());
    assert!(vm.wait().await.unwrap().code.is_some());
    assert!(matches!(vm.suspend(&image).await, Err(VmmError::NotRunning)));
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "memory image: {:.1} MiB apparent, {:.1} MiB allocated ({:.0}% sparse), written in {} ms; machine {machine}",
        mib(info.file_size),
        mib(info.allocated),
        100.0 * (1.0 - info.allocated as f64 / info.file_size as f64),
        info.elapsed.as_millis()
    );
    // mapped-ram: all 256 MiB of RAM have their place in the file, zero pages are holes
    assert!(info.file_size >= 256 << 20, "image smaller than RAM: {}", info.file_size);
    assert!(info.allocated < info.file_size / 2, "image not sparse: {info:?}");
    assert!(!Path::new(&format!("{}.partial", image.display())).exists());

    // resume: the in-memory counter continues
    let offset = log_len(&log);
    let t_resume = Instant::now();
    let mut vm =
        Vm::start(cfg.clone(), Start::Incoming { memory_image_path: image.clone() }).await.expect("resume");
    let after = wait_counter(&mut vm, &log, offset, last + 2, Duration::from_secs(300)).await;
    let t_resumed = t_resume.elapsed();
    assert_eq!(after[0], last + 1, "first counter after resume (before suspend: {last}); after: {after:?}");
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "{after:?}");
    assert!(
        !String::from_utf8_lossy(&std::fs::read(&log).unwrap()[offset..]).contains("isr-boot"),
        "the guest rebooted instead of resuming"
    );

    // power off
    let exit = vm.poweroff().await.expect("poweroff");
    assert_eq!(exit.reason.as_deref(), Some("host-qmp-quit"), "{exit}");
    let printed_last = *counters(&log, 0).last().unwrap();

    // a memory image that is not one, or one saved with a different machine, is rejected distinctly
    let garbage = dir.path().join("garbage.img");
    std::fs::write(&garbage, vec![0x5au8; 1 << 20]).unwrap();
    match Vm::start(cfg.clone(), Start::Incoming { memory_image_path: garbage.clone() }).await {
        Err(VmmError::MemoryImageRejected { path, reason }) => {
            assert_eq!(path, garbage);
            eprintln!("garbage image rejected: {reason}");
        }
        other => panic!("garbage memory image: {other:?}"),
    }
    let mut bigger = cfg.clone();
    bigger.memory_mib = 512;
    match Vm::start(bigger, Start::Incoming { memory_image_path: image.clone() }).await {
        Err(e @ VmmError::MemoryImageRejected { .. }) => eprintln!("512 MiB VM: {e}"),
        other => panic!("image of a 256 MiB VM into a 512 MiB one: {other:?}"),
    }
    // a damaged image that passes the header check: QEMU itself refuses it
    let truncated = dir.path().join("truncated.img");
    let mut head = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open(&image).unwrap(), 64 << 10),
        &mut head,
    )
    .unwrap();
    std::fs::write(&truncated, &head).unwrap();
    match Vm::start(cfg.clone(), Start::Incoming { memory_image_path: truncated }).await {
        Err(e @ VmmError::MemoryImageRejected { .. }) => eprintln!("truncated image: {e}"),
        other => panic!("truncated memory image: {other:?}"),
    }
    let missing = dir.path().join("missing.img");
    assert!(matches!(
        Vm::start(cfg.clone(), Start::Incoming { memory_image_path: missing }).await,
        Err(VmmError::MemoryImageRejected { .. })
    ));

    // the disk: one contiguous run 1..N covering everything the guest printed (it syncs before printing)
    nbd.stop();
    let on_disk = disk_counter(&nbd.disk, dir.path());
    let n = on_disk.len() as u64;
    assert_eq!(on_disk, (1..=n).collect::<Vec<u64>>(), "counter file is not 1..N");
    assert!(n >= printed_last, "disk has 1..{n}, guest printed {printed_last}");
    eprintln!(
        "boot to counter 3: {:.1} s; resume to counter {}: {:.1} s; disk 1..{n}; total {:.1} s",
        t_boot.as_secs_f64(),
        last + 2,
        t_resumed.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_poweroff_ends_wait() {
    guest();
    let dir = tempfile::tempdir().unwrap();
    let nbd = Nbd::start(dir.path());
    let cfg = config(dir.path(), &nbd, &format!("{APPEND} isr_stop_at=2"));
    let mut vm = Vm::start(cfg, Start::Cold).await.expect("cold boot");
    let exit =
        tokio::time::timeout(Duration::from_secs(300), vm.wait()).await.expect("guest did not power off");
    let exit = exit.unwrap();
    assert!(exit.guest_initiated(), "{exit}");
    assert!(exit.success(), "{exit}");
    assert_eq!(counters(&dir.path().join("console.log"), 0), [1, 2]);
}

#[tokio::test]
async fn qemu_missing_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = VmConfig::new(64, dir.path().join("none.sock"));
    c.qemu = "/nonexistent/qemu-system-x86_64".into();
    let err = Vm::start(c, Start::Cold).await.unwrap_err();
    assert!(matches!(err, VmmError::QemuNotFound { .. }), "{err}");
    assert!(err.to_string().contains("install qemu-system-x86"), "{err}");
}

#[tokio::test]
async fn qemu_exit_reports_stderr() {
    guest();
    let dir = tempfile::tempdir().unwrap();
    // no NBD server on the socket: QEMU cannot open the disk and exits
    let c = VmConfig::new(64, dir.path().join("none.sock"));
    let err = Vm::start(c, Start::Cold).await.unwrap_err();
    match &err {
        VmmError::QemuExited { stderr, .. } => assert!(stderr.contains("none.sock"), "{stderr}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn accel_detection_ends_with_a_reason() {
    // detect_accel bounds its own probe (KVM_PROBE_TIMEOUT); the deadline here only turns a hang into a failure
    let d = tokio::time::timeout(Duration::from_secs(300), detect_accel(Path::new(DEFAULT_QEMU)))
        .await
        .expect("detect_accel did not return within 5 minutes");
    eprintln!("detect_accel: {:?} ({})", d.accel, d.reason);
    assert!(!d.reason.is_empty(), "no reason given for {:?}", d.accel);
}
