use std::path::PathBuf;

use crate::qmp::QmpError;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("QEMU not found ({binary}): install qemu-system-x86 version 10 or newer (Debian: from bookworm-backports)")]
    QemuNotFound { binary: PathBuf },
    #[error("cannot start QEMU ({binary}): {source}")]
    Spawn { binary: PathBuf, source: std::io::Error },
    #[error("QEMU {found} is too old: version {required} or newer is needed")]
    QemuTooOld { found: String, required: u64 },
    #[error("QEMU exited ({status}){}", stderr_suffix(stderr))]
    QemuExited { status: String, stderr: String },
    /// The memory image could not be loaded (missing, corrupt, or saved by a different VM description or
    /// QEMU). The VM cannot resume from it; powering off (booting cold) is the way out.
    #[error("memory image {} rejected by QEMU: {reason}", path.display())]
    MemoryImageRejected { path: PathBuf, reason: String },
    /// Saving the memory image failed; the VM was resumed and keeps running.
    #[error("saving the memory image to {} failed: {reason}", path.display())]
    SuspendFailed { path: PathBuf, reason: String },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The guest agent answered something unexpected, or not in time (the guest is untrusted).
    #[error("guest agent: {0}")]
    Agent(String),
    #[error("timed out {0}")]
    Timeout(String),
    /// libvirt (the daemon, `virsh`) refused or failed; `detail` has its words and what to do.
    #[error("libvirt: {what}: {detail}")]
    Libvirt { what: String, detail: String },
    /// The driver cannot do what the configuration asks (e.g. a GTK window under libvirt).
    #[error("{0}")]
    Unsupported(String),
    #[error("the VM is not running (QEMU has exited)")]
    NotRunning,
}

fn stderr_suffix(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}
