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
    match unopenable(Path::new(KVM_DEVICE)) {
        Some(tcg) => tcg,
        None => run_probe(qemu).await.detection,
    }
}

const KVM_DEVICE: &str = "/dev/kvm";

/// TCG, and why, when the KVM device cannot be opened read-write (no probe is needed then).
fn unopenable(device: &Path) -> Option<AccelDetection> {
    let e = std::fs::OpenOptions::new().read(true).write(true).open(device).err()?;
    Some(AccelDetection { accel: Accel::Tcg, reason: format!("cannot open {}: {e}", device.display()) })
}

/// [`detect_accel`], remembering the probe's verdict in `verdict_file` so that only the first run on a host
/// pays for it (up to [`KVM_PROBE_TIMEOUT`] where KVM does not work). The verdict holds for the same boot
/// (the kernel's boot id) and the same QEMU binary (its resolved path, size and modification time); a reboot
/// or another QEMU probes again, and so does a verdict file that does not parse. Whether /dev/kvm opens is
/// checked every time (it is cheap, and group membership or a module load changes it).
pub async fn detect_accel_remembered(qemu: &Path, verdict_file: &Path) -> AccelDetection {
    detect_remembered(qemu, verdict_file, Path::new(KVM_DEVICE), BOOT_ID).await
}

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// What a remembered verdict is valid for.
#[derive(Debug, PartialEq, Eq)]
struct ProbeIdentity {
    boot_id: String,
    qemu: std::path::PathBuf,
    qemu_len: u64,
    qemu_mtime_ns: u128,
}

impl ProbeIdentity {
    fn of(qemu: &Path, boot_id_file: &Path) -> Option<ProbeIdentity> {
        let boot_id = std::fs::read_to_string(boot_id_file).ok()?.trim().to_owned();
        let qemu = resolve(qemu)?;
        let meta = std::fs::metadata(&qemu).ok()?;
        let mtime = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
        (!boot_id.is_empty()).then_some(ProbeIdentity {
            boot_id,
            qemu,
            qemu_len: meta.len(),
            qemu_mtime_ns: mtime.as_nanos(),
        })
    }

    fn to_json(&self, d: &AccelDetection) -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "boot_id": self.boot_id,
            "qemu": self.qemu.to_string_lossy(),
            "qemu_len": self.qemu_len,
            "qemu_mtime_ns": self.qemu_mtime_ns.to_string(),
            "accel": match d.accel { Accel::Kvm => "kvm", Accel::Tcg => "tcg" },
            "reason": d.reason,
        })
    }

    /// The verdict in `v` when it was made for this identity.
    fn verdict_in(&self, v: &serde_json::Value) -> Option<AccelDetection> {
        let same = v["version"] == 1
            && v["boot_id"].as_str()? == self.boot_id
            && Path::new(v["qemu"].as_str()?) == self.qemu
            && v["qemu_len"].as_u64()? == self.qemu_len
            && v["qemu_mtime_ns"].as_str()?.parse::<u128>().ok()? == self.qemu_mtime_ns;
        let accel = match v["accel"].as_str()? {
            "kvm" => Accel::Kvm,
            "tcg" => Accel::Tcg,
            _ => return None,
        };
        let reason = v["reason"].as_str()?;
        same.then(|| AccelDetection {
            accel,
            reason: format!("{reason}; remembered from this boot's first probe"),
        })
    }
}

/// `qemu` as the canonical path of a file: as given when it has a directory part, else searched in `$PATH`.
fn resolve(qemu: &Path) -> Option<std::path::PathBuf> {
    if qemu.components().count() > 1 {
        return std::fs::canonicalize(qemu).ok();
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(qemu))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
}

/// The largest verdict file read (it is a few hundred bytes).
const MAX_VERDICT_FILE: u64 = 16 << 10;

async fn detect_remembered(qemu: &Path, verdict_file: &Path, kvm: &Path, boot_id: &str) -> AccelDetection {
    if let Some(tcg) = unopenable(kvm) {
        return tcg;
    }
    let identity = ProbeIdentity::of(qemu, Path::new(boot_id));
    if let Some(id) = &identity {
        let remembered = std::fs::File::open(verdict_file).ok().and_then(|f| {
            use std::io::Read;
            let mut text = String::new();
            f.take(MAX_VERDICT_FILE).read_to_string(&mut text).ok()?;
            id.verdict_in(&serde_json::from_str(&text).ok()?)
        });
        if let Some(d) = remembered {
            return d;
        }
    }
    let d = run_probe(qemu).await;
    if let (Some(id), true) = (&identity, d.probed) {
        if let Err(e) = write_verdict(verdict_file, &id.to_json(&d.detection)) {
            tracing::warn!("cannot remember the KVM probe's verdict in {}: {e}", verdict_file.display());
        }
    }
    d.detection
}

/// Write-then-rename, so that a reader never sees half a verdict.
fn write_verdict(path: &Path, v: &serde_json::Value) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(v.to_string().as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// What [`run_probe`] found, and whether the probe ran (a verdict worth remembering) or could not start.
struct Probed {
    detection: AccelDetection,
    probed: bool,
}

async fn run_probe(qemu: &Path) -> Probed {
    let tcg =
        |reason: String| Probed { detection: AccelDetection { accel: Accel::Tcg, reason }, probed: false };
    let ran =
        |reason: String| Probed { detection: AccelDetection { accel: Accel::Tcg, reason }, probed: true };
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
        Ok(Ok(status)) if status.code() == Some(PROBE_EXIT) => Probed {
            detection: AccelDetection {
                accel: Accel::Kvm,
                reason: format!("KVM ran the probe in {} ms", started.elapsed().as_millis()),
            },
            probed: true,
        },
        Ok(Ok(status)) => {
            let mut msg = String::new();
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_string(&mut msg).await;
            }
            let msg = msg.lines().rev().find(|l| !l.contains("warning:")).unwrap_or("").trim().to_owned();
            ran(format!("QEMU could not use KVM ({status}): {msg}"))
        }
        Ok(Err(e)) => tcg(format!("waiting for the KVM probe: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            ran(format!(
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

    /// A fake QEMU that counts its runs in `runs` and exits with `status` (85: the probe's "KVM works").
    fn fake_qemu(dir: &Path, status: i32) -> (std::path::PathBuf, std::path::PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let (qemu, runs) = (dir.join("qemu-system-x86_64"), dir.join("runs"));
        std::fs::write(&qemu, format!("#!/bin/sh\necho run >> '{}'\nexit {status}\n", runs.display()))
            .unwrap();
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
        (qemu, runs)
    }

    fn runs(file: &Path) -> usize {
        std::fs::read_to_string(file).map_or(0, |s| s.lines().count())
    }

    #[tokio::test]
    async fn the_verdict_is_remembered_per_boot_and_qemu_binary() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (qemu, counter) = fake_qemu(d, PROBE_EXIT);
        // Stand-ins for /dev/kvm (any file that opens read-write) and the kernel's boot id.
        let (kvm, boot) = (d.join("kvm"), d.join("boot_id"));
        std::fs::write(&kvm, b"").unwrap();
        std::fs::write(&boot, "boot-1\n").unwrap();
        let verdict = d.join("kvm-probe.json");
        let detect = || detect_remembered(&qemu, &verdict, &kvm, boot.to_str().unwrap());

        let first = detect().await;
        assert_eq!((first.accel, runs(&counter)), (Accel::Kvm, 1), "{first:?}");
        let second = detect().await;
        assert_eq!((second.accel, runs(&counter)), (Accel::Kvm, 1), "the second run probes nothing");
        assert!(second.reason.contains("remembered"), "{}", second.reason);

        // Another boot probes again.
        std::fs::write(&boot, "boot-2\n").unwrap();
        assert_eq!(detect().await.accel, Accel::Kvm);
        assert_eq!(runs(&counter), 2);
        assert_eq!(detect().await.accel, Accel::Kvm);
        assert_eq!(runs(&counter), 2);

        // Another QEMU (here: one that refuses KVM) probes again, and its verdict is remembered too.
        let (_, counter) = fake_qemu(d, 1);
        std::fs::write(&counter, "").unwrap();
        let refused = detect().await;
        assert_eq!((refused.accel, runs(&counter)), (Accel::Tcg, 1), "{refused:?}");
        assert!(refused.reason.contains("could not use KVM"), "{}", refused.reason);
        assert_eq!(detect().await.accel, Accel::Tcg);
        assert_eq!(runs(&counter), 1);

        // A verdict file that does not parse (or is not a verdict) is probed over and rewritten.
        let junk: [&[u8]; 4] = [b"{not json", b"[]", b"{\"version\": 1, \"accel\": \"kvm\"}", &[0xff; 64]];
        for junk in junk {
            std::fs::write(&verdict, junk).unwrap();
            let before = runs(&counter);
            assert_eq!(detect().await.accel, Accel::Tcg);
            assert_eq!(runs(&counter), before + 1);
        }
        assert_eq!(detect().await.accel, Accel::Tcg);
        assert_eq!(runs(&counter), 5, "rewritten after the last junk");

        // No /dev/kvm: TCG without running QEMU, and the remembered verdict is not consulted.
        let gone = d.join("no-kvm");
        let d2 = detect_remembered(&qemu, &verdict, &gone, boot.to_str().unwrap()).await;
        assert_eq!(d2.accel, Accel::Tcg);
        assert!(d2.reason.starts_with("cannot open"), "{}", d2.reason);
        assert_eq!(runs(&counter), 5);
    }

    #[tokio::test]
    async fn missing_qemu_means_tcg() {
        let d = detect_accel(Path::new("/nonexistent/qemu-system-x86_64")).await;
        assert_eq!(d.accel, Accel::Tcg);
        assert!(!d.reason.is_empty());
    }
}
