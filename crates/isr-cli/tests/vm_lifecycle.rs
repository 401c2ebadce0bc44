//! The VM process's life cycle under TCG (issue 10): QEMU never outlives `isr resume`, a dead run's plaintext
//! is removed by the next command of the parcel, a memory image never resumes over a disk it does not match,
//! `isr suspend` tells a killed save apart from a stored memory image, the runtime directory's space is checked
//! before anything starts, `isr disk` keeps a suspended parcel's memory image valid, console.log survives a
//! checkin. Each test uses its own runtime directory (`ISR_RUNTIME_DIR`) so that QEMUs and residue are its own.

mod common;
use common::guest::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Generous: a TCG boot takes 5-30 s on an idle machine, much more on a loaded one.
const BOOT: Duration = Duration::from_secs(300);

/// A runtime directory of the test's own, on tmpfs when there is one.
fn runtime_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let parent = if shm.is_dir() { shm.to_owned() } else { std::env::temp_dir() };
    tempfile::Builder::new().prefix("rt-vm-lifecycle-").tempdir_in(parent).unwrap()
}

/// A running `isr resume`, its stderr collected as it comes.
struct Resume {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Resume {
    fn start(c: &Client, parcel: &str, runtime: &Path) -> Resume {
        let Collecting { child, stderr } = Collecting::spawn(
            c.cmd(&["resume", parcel, "--display", "none"]).env("ISR_RUNTIME_DIR", runtime),
        );
        Resume { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// kill -9 of the isr process itself.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn finish(self) -> String {
        let stderr = self.stderr.clone();
        let out = self.child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = stderr.lock().unwrap().clone();
        assert!(out.status.success(), "resume failed ({:?}): {stdout}\n{stderr}", out.status);
        stdout
    }
}

/// The console from byte `from` on.
fn console_after(console: &Path, from: usize) -> String {
    let bytes = std::fs::read(console).unwrap_or_default();
    String::from_utf8_lossy(bytes.get(from..).unwrap_or_default()).into_owned()
}

fn counters_in(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.split("isr-counter ").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn file_len(p: &Path) -> usize {
    std::fs::metadata(p).map(|m| m.len() as usize).unwrap_or(0)
}

/// Start `isr disk PARCEL --nbd SOCK EXTRA...` and wait for its socket.
fn spawn_disk(c: &Client, parcel: &str, sock: &Path, extra: &[&str]) -> Child {
    let _ = std::fs::remove_file(sock);
    let mut args = vec!["disk", parcel, "--nbd", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let child = c.cmd(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for(|| sock.exists(), Duration::from_secs(120), "the NBD socket of isr disk");
    child
}

fn signal_pid(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

/// One parcel through every exit the issue names: suspend, `isr disk` on the suspended parcel (refused,
/// read-only, forced on another client), checkin (console.log stays), kill -9 of a resume that resumed the memory
/// image (no QEMU left, plaintext removed by the next command, the next resume boots cold, one VM), and a save
/// killed midway (`isr suspend` fails, nothing left).
#[test]
fn killed_resumes_leave_no_vm_and_no_plaintext_and_suspend_tells_the_truth() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let scratch = tempfile::tempdir().unwrap();
    create_guest_parcel(&a, "vm", 256, scratch.path());
    let rt = runtime_dir();
    let console = console_of(&a, "vm");

    // Boot and suspend: the parcel holds a memory image.
    let run = Resume::start(&a, "vm", rt.path());
    wait_for(|| counters(&console).len() >= 2, BOOT, "the guest's counter (cold boot)");
    assert_eq!(qemus_naming(rt.path()).len(), 1, "one QEMU for one resume");
    assert!(
        run.stderr().contains(&console.display().to_string()),
        "console path not printed: {}",
        run.stderr()
    );
    a.ok(&["suspend", "vm"]);
    run.finish();
    assert!(private_dirs(rt.path()).is_empty(), "a suspended resume left {:?}", private_dirs(rt.path()));
    assert_eq!(a.stat("vm")["memory_image"], true);

    // `isr disk` on the suspended parcel: refused by default, read-only allowed.
    let sock = scratch.path().join("d.sock");
    let (code, err) = a.code(&["disk", "vm", "--nbd", sock.to_str().unwrap()]);
    eprintln!("disk on a suspended parcel:\n{err}");
    assert_eq!(code, 1, "disk on a suspended parcel: {err}");
    assert!(err.contains("suspended") && err.contains("--read-only") && err.contains("--force"), "{err}");
    let disk = spawn_disk(&a, "vm", &sock, &["--read-only"]);
    let read = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read 0 64k"])
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&read.stdout);
    assert!(
        read.status.success() && text.contains("read 65536/65536"),
        "read from the read-only export: {text}"
    );
    let (ok, text) = qemu_io(&sock, &["write -P 0x5a 0 64k"]);
    assert!(!ok, "a write to the read-only export succeeded: {text}");
    stop_disk(disk);
    assert_eq!(a.stat("vm")["memory_image"], true, "a read-only export dropped the memory image");

    // checkin removes the parcel from the client, not its console log (which stays private).
    let before = counters(&console);
    let last = *before.last().unwrap();
    a.ok(&["checkin", "vm", "-m", "suspended"]);
    assert_eq!(counters(&console), before, "console.log lost by checkin");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&console).unwrap().permissions().mode() & 0o777, 0o600);

    // Another client: `isr disk --force` checks the parcel out by itself and drops its memory image to write;
    // discard returns to the base version (memory image included); checkin gives the lock back.
    let b = Client::new(&server, "alice");
    let disk = spawn_disk(&b, "vm", &sock, &["--force"]);
    let (ok, text) = qemu_io(&sock, &["write -P 0x5a 63M 64k", "read -P 0x5a 63M 64k"]);
    assert!(ok, "write to the forced export: {text}");
    let err = stop_disk(disk);
    assert!(err.contains("dropped the saved memory image"), "{err}");
    assert_eq!(b.stat("vm")["memory_image"], false);
    b.ok(&["discard", "vm"]);
    assert_eq!(b.stat("vm")["memory_image"], true, "discard did not return to the base version");
    b.ok(&["checkin", "vm"]);

    // A resumes the memory image (the counter goes on), then the isr process is killed.
    let from = file_len(&console);
    let run = Resume::start(&a, "vm", rt.path());
    wait_for(|| counters_in(&console_after(&console, from)).len() >= 2, BOOT, "the counter after the resume");
    let resumed = console_after(&console, from);
    assert_eq!(counters_in(&resumed)[0], last + 1, "did not resume from memory:\n{resumed}");
    assert!(!resumed.contains("isr-boot"), "booted instead of resuming:\n{resumed}");
    // Its RAM is served on demand from the memory runtime image (FUSE, below the private directory).
    assert!(run.stderr().contains("guest RAM of vm: on demand"), "{}", run.stderr());
    assert_eq!(mounts_under(rt.path()).len(), 1, "the guest RAM mount");
    run.kill9();
    wait_for(
        || qemus_naming(rt.path()).is_empty(),
        Duration::from_secs(120),
        "QEMU to exit with its isr resume",
    );
    // Its plaintext is removed by the next command of the parcel, which says so.
    assert_eq!(private_dirs(rt.path()).len(), 1, "the killed resume's private directory");
    let out = a.run(&["stat", "vm", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stat after the kill: {err}");
    eprintln!("stat after kill -9 of the resume:\n{err}");
    assert!(err.contains("removed its private directory") && err.contains("boots cold"), "{err}");
    assert!(private_dirs(rt.path()).is_empty(), "left after cleanup: {:?}", private_dirs(rt.path()));
    assert!(mounts_under(rt.path()).is_empty(), "the dead run's RAM mount: {:?}", mounts_under(rt.path()));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["memory_image"], false, "the consumed memory image would resume over the newer disk");

    // The next resume boots cold: one VM, not a second copy of the old memory.
    let from = file_len(&console);
    let run = Resume::start(&a, "vm", rt.path());
    wait_for(
        || counters_in(&console_after(&console, from)).len() >= 2,
        BOOT,
        "the counter after the cold boot",
    );
    assert!(console_after(&console, from).contains("isr-boot"), "did not boot cold");
    let qemus = qemus_naming(rt.path());
    assert_eq!(qemus.len(), 1, "QEMUs running: {qemus:?}");

    // A save killed midway: QEMU is frozen so the save cannot finish, then the resume is killed.
    signal_pid(qemus[0], "STOP");
    let suspend = a.cmd(&["suspend", "vm"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for(
        || run.stderr().contains("saving the memory"),
        Duration::from_secs(120),
        "the resume to start saving",
    );
    run.kill9();
    let out = suspend.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("suspend of a killed save:\n{err}");
    assert_eq!(out.status.code(), Some(1), "suspend of a killed save: {err}");
    assert!(err.contains("killed or crashed") && err.contains("boots cold"), "{err}");
    assert!(qemus_naming(rt.path()).is_empty(), "QEMU left after a killed save");
    assert!(
        private_dirs(rt.path()).is_empty(),
        "plaintext left after a killed save: {:?}",
        private_dirs(rt.path())
    );
    assert_eq!(a.stat("vm")["memory_image"], false);

    // The kill -9 during the run whose RAM was on demand left the version it resumed intact: another client
    // resumes it, and the guest goes on from where A's suspend left it.
    let c = Client::new(&server, "alice");
    c.ok(&["unlock", "vm", "--force"]);
    let console_c = console_of(&c, "vm");
    let run = Resume::start(&c, "vm", rt.path());
    wait_for(|| !counters(&console_c).is_empty(), BOOT, "the counter on another client");
    let after = std::fs::read_to_string(&console_c).unwrap();
    assert_eq!(counters(&console_c)[0], last + 1, "the last suspended version did not resume:\n{after}");
    assert!(!after.contains("isr-boot"), "booted instead of resuming:\n{after}");
    c.ok(&["suspend", "vm"]);
    run.finish();
    c.ok(&["check", "vm", "--full"]);
}

/// Mount points at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.to_str().unwrap();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(dir))
        .map(str::to_owned)
        .collect()
}

/// Unmounts on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn too_little_runtime_space_fails_before_anything_starts() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let scratch = tempfile::tempdir().unwrap();
    let img = scratch.path().join("disk.img");
    make_image(&img, 16 << 20);
    a.ok(&["create", "p", "--disk", img.to_str().unwrap(), "--memory", "256"]);
    let small = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(small.path())
        .status()
        .unwrap();
    assert!(st.success(), "mounting a 32 MiB tmpfs on {} (the test needs root)", small.path().display());
    let _mount = Mount(small.path().to_owned());

    let dir = small.path().to_str().unwrap();
    for out in [
        // RAM served on demand needs no room there: loaded, it does.
        a.cmd(&["resume", "p", "--display", "none", "--ram", "loaded", "--runtime-dir", dir])
            .output()
            .unwrap(),
        a.cmd(&["resume", "p", "--display", "none"])
            .env("ISR_RUNTIME_DIR", dir)
            .env("ISR_RAM", "loaded")
            .output()
            .unwrap(),
    ] {
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("resume with too little space:\n{err}");
        assert_eq!(out.status.code(), Some(1), "resume with 32 MiB for 256 MiB of RAM: {err}");
        assert!(err.contains(dir) && err.contains("needed") && err.contains("free"), "{err}");
        assert!(err.contains("--runtime-dir") && err.contains("ISR_RUNTIME_DIR"), "{err}");
        assert!(qemus_naming(small.path()).is_empty(), "QEMU started");
        assert!(private_dirs(small.path()).is_empty(), "a private directory was made");
    }
    assert_eq!(a.stat("p")["state"], "unmodified");
    let parcel_dir = a.home.path().join("parcels/alice/p");
    assert!(!parcel_dir.join("run.json").exists(), "a run record stayed");
}
