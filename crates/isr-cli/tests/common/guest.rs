//! The project's test guest (guest/build.sh) as an isr parcel, and what tests watch of a running VM.

use super::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

/// Kernel command line of the test guest.
pub const APPEND: &str = "console=ttyS0 quiet panic=-1 init_on_free=1";

/// guest/out, built (or checked) by guest/build.sh.
pub fn guest() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest");
    let st =
        std::process::Command::new("bash").arg(root.join("build.sh")).stdout(Stdio::null()).status().unwrap();
    assert!(st.success(), "guest/build.sh failed");
    root.join("out")
}

/// Create `parcel` from the test guest (direct kernel boot) with `memory_mib` of RAM.
pub fn create_guest_parcel(c: &Client, parcel: &str, memory_mib: u32, scratch: &Path) {
    create_guest_parcel_appending(c, parcel, memory_mib, scratch, APPEND)
}

/// [`create_guest_parcel`] with another kernel command line (e.g. [`APPEND`] and a test's parameters).
pub fn create_guest_parcel_appending(
    c: &Client,
    parcel: &str,
    memory_mib: u32,
    scratch: &Path,
    append: &str,
) {
    let out = guest();
    let disk = scratch.join(format!("{parcel}-disk.img"));
    std::fs::copy(out.join("disk.img"), &disk).unwrap();
    c.ok(&[
        "create",
        parcel,
        "--disk",
        disk.to_str().unwrap(),
        "--memory",
        &memory_mib.to_string(),
        "--kernel",
        out.join("vmlinuz").to_str().unwrap(),
        "--initrd",
        out.join("initrd.img").to_str().unwrap(),
        "--append",
        append,
    ]);
}

/// The `isr-counter N` values the guest printed on its console.
pub fn counters(console: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split("isr-counter ").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Where `isr resume` sends the guest's serial console.
pub fn console_of(c: &Client, parcel: &str) -> PathBuf {
    c.home.path().join("logs").join(&c.user).join(parcel).join("console.log")
}

/// Start `isr resume PARCEL --display none` (stdout and stderr piped).
pub fn resume(c: &Client, parcel: &str) -> Child {
    c.cmd(&["resume", parcel, "--display", "none"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait for a resume to end and require success; returns its stdout and stderr.
pub fn finish(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "resume failed: {text}");
    text
}

/// Pids of the QEMUs isr started (`-name isr,process=isr-qemu`) whose command line names `path` (e.g. a
/// test's own runtime directory). Zombies have no command line and are not listed.
pub fn qemus_naming(path: &Path) -> Vec<u32> {
    let needle = path.to_str().unwrap().as_bytes();
    let has = |hay: &[u8], n: &[u8]| hay.windows(n.len()).any(|w| w == n);
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if has(&cmd, needle) && has(&cmd, b"process=isr-qemu") {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Entries of `dir` whose name starts with `isr-` (private directories of resumes).
pub fn private_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("isr-"))
        .map(|e| e.path())
        .collect()
}
