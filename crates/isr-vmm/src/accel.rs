//! Choosing between KVM and TCG by trying KVM.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::config::Accel;

/// How long the KVM probe may take. A working KVM needs a few milliseconds after QEMU's start-up; TCG
/// ~150 ms; a broken or nested KVM that emulates guest code is 100x slower than TCG and runs out of time.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The outcome of [`detect_accel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDetection {
    pub accel: Accel,
    /// Why, for the user (e.g. "KVM ran the probe in 12 ms", "cannot open /dev/kvm: Permission denied").
    pub reason: String,
}

/// isa-debug-exit turns the value 0x2a written by the probe into exit status (0x2a << 1) | 1.
const PROBE_EXIT: i32 = 0x2a * 2 + 1;

/// A 64 KiB "BIOS" whose reset vector (the last 16 bytes) counts a 16M-iteration loop in real mode, then
/// writes 0x2a to the isa-debug-exit port, which ends QEMU with status 85.
fn probe_bios() -> Vec<u8> {
    let mut bios = vec![0u8; 64 * 1024];
    let code: [u8; 15] = [
        0x66, 0xB9, 0x00, 0x00, 0x00, 0x01, // mov ecx, 0x01000000
        0x66, 0x49, // l: dec ecx
        0x75, 0xFC, // jnz l
        0xB0, 0x2A, // mov al, 0x2a
        0xE6, 0xF4, // out 0xf4, al
        0xF4, // hlt
    ];
    let at = bios.len() - 16;
    bios[at..at + code.len()].copy_from_slice(&code);
    bios
}

/// Tries KVM by running a small compute loop as guest code under `-accel kvm` with a time limit, and falls
/// back to TCG when /dev/kvm cannot be opened, QEMU refuses KVM, or KVM is far too slow (as a nested
/// hypervisor that cannot run a stock guest kernel is). Takes at most about [`KVM_PROBE_TIMEOUT`].
pub async fn detect_accel(qemu: &Path) -> AccelDetection {
    let tcg = |reason: String| AccelDetection { accel: Accel::Tcg, reason };
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return tcg(format!("cannot open /dev/kvm: {e}"));
    }
    let mut bios = match tempfile::Builder::new().prefix("isr-kvm-probe-").suffix(".bin").tempfile() {
        Ok(f) => f,
        Err(e) => return tcg(format!("cannot write the KVM probe: {e}")),
    };
    if let Err(e) = bios.write_all(&probe_bios()).and_then(|()| bios.flush()) {
        return tcg(format!("cannot write the KVM probe: {e}"));
    }
    let started = Instant::now();
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "kvm", "-machine", "pc", "-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-m", "16", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-bios"])
        .arg(bios.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    crate::vm::die_with_parent(&mut cmd);
    let child = cmd.spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return tcg(format!("cannot run {}: {e}", qemu.display())),
    };
    let mut stderr = child.stderr.take();
    match tokio::time::timeout(KVM_PROBE_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.code() == Some(PROBE_EXIT) => AccelDetection {
            accel: Accel::Kvm,
            reason: format!("KVM ran the probe in {} ms", started.elapsed().as_millis()),
        },
        Ok(Ok(status)) => {
            let mut msg = String::new();
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_string(&mut msg).await;
            }
            let msg = msg.lines().rev().find(|l| !l.contains("warning:")).unwrap_or("").trim().to_owned();
            tcg(format!("QEMU could not use KVM ({status}): {msg}"))
        }
        Ok(Err(e)) => tcg(format!("waiting for the KVM probe: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            tcg(format!(
                "KVM is unusable: a probe that takes milliseconds did not finish in {} s \
                 (nested or emulated KVM?)",
                KVM_PROBE_TIMEOUT.as_secs()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reset_vector() {
        let b = probe_bios();
        assert_eq!(b.len(), 65536);
        assert_eq!(&b[0xFFF0..0xFFF2], &[0x66, 0xB9]);
        assert_eq!(b[0xFFFE], 0xF4);
    }

    #[tokio::test]
    async fn missing_qemu_means_tcg() {
        let d = detect_accel(Path::new("/nonexistent/qemu-system-x86_64")).await;
        assert_eq!(d.accel, Accel::Tcg);
        assert!(!d.reason.is_empty());
    }
}
