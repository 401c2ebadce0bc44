//! Pocket ISR: the statically linked `isr` (`make pocket`, which `make test` runs and names in
//! `$ISR_POCKET_BIN`) on a USB-stick-like file system of its own, with its home and a lookaside directory of
//! chunks on the same stick. Run from there with an empty environment, it needs nothing installed but QEMU,
//! and it resumes a suspended parcel on a fresh home without one chunk from the server.

mod common;
use common::guest::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(300);

fn pocket_bin() -> PathBuf {
    let p = std::env::var_os("ISR_POCKET_BIN").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/pocket/x86_64-unknown-linux-gnu/pocket/isr")
    });
    assert!(p.is_file(), "{} missing: build it with `make pocket` (make test does)", p.display());
    p
}

/// The ELF program header types of `bin`.
fn program_header_types(bin: &[u8]) -> Vec<u32> {
    assert_eq!(&bin[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(bin[4], 2, "not a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes(bin[o..o + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(bin[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum)
        .map(|i| {
            let o = phoff + i * phentsize;
            u32::from_le_bytes(bin[o..o + 4].try_into().unwrap())
        })
        .collect()
}

/// An ext4 file system in a file, loop-mounted for the test's lifetime: the "USB stick".
struct Stick {
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl Stick {
    fn new(size_mib: u64) -> Stick {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("stick.img");
        std::fs::File::create(&image).unwrap().set_len(size_mib << 20).unwrap();
        let mkfs = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image).status().unwrap();
        assert!(mkfs.success(), "mkfs.ext4 failed");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        let out = Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mount).output().unwrap();
        assert!(out.status.success(), "mount -o loop failed: {}", String::from_utf8_lossy(&out.stderr));
        Stick { mount, _dir: dir }
    }
}

impl Drop for Stick {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

#[test]
fn the_static_isr_runs_from_a_stick_with_an_empty_environment_and_resumes_from_its_chunks() {
    let bin = pocket_bin();
    let bytes = std::fs::read(&bin).unwrap();
    let types = program_header_types(&bytes);
    const PT_INTERP: u32 = 3;
    assert!(!types.contains(&PT_INTERP), "{} asks for a dynamic loader: not static", bin.display());
    let ldd = Command::new("ldd").arg(&bin).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&ldd.stdout), String::from_utf8_lossy(&ldd.stderr));
    assert!(said.contains("not a dynamic executable") || said.contains("statically linked"), "ldd: {said}");

    // The parcel: suspended with a memory image on client A (the ordinary isr), checked in.
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let scratch = tempfile::tempdir().unwrap();
    create_guest_parcel(&a, "vm", 128, scratch.path());
    let run = resume(&a, "vm");
    let console = console_of(&a, "vm");
    wait_for(|| counters(&console).len() >= 3, BOOT, "the guest's counter on A");
    a.ok(&["suspend", "vm"]);
    finish(run);
    let at_suspend = *counters(&console).last().unwrap();
    a.ok(&["checkin", "vm", "-m", "suspended on A"]);

    // The stick: the binary, an empty home, and every chunk of the server's store.
    let stick = Stick::new(512);
    let isr = stick.mount.join("isr");
    std::fs::copy(&bin, &isr).unwrap();
    let home = stick.mount.join("home");
    let chunks = stick.mount.join("chunks");
    server.copy_chunks_to(&chunks);
    let pocket = |args: &[&str]| {
        let mut c = Command::new(&isr);
        c.args(args)
            .env_clear()
            .env("ISR_SERVER", &server.url)
            .env("ISR_USER", "alice")
            .env("ISR_PASSWORD", PASSWORD)
            .env("ISR_HOME", &home)
            .env("ISR_LOOKASIDE", &chunks)
            .env("ISR_ACCEL", "tcg")
            .stdin(Stdio::null());
        c
    };
    let version = pocket(&["--version"]).output().unwrap();
    assert!(version.status.success(), "{}", String::from_utf8_lossy(&version.stderr));

    // Resume on the stick's fresh home: the guest continues; no chunk comes from the server.
    let before = server.chunks_fetched();
    let run = pocket(&["resume", "vm", "--display", "none"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let console_b = home.join("logs/alice/vm/console.log");
    wait_for(
        || counters(&console_b).iter().any(|&n| n > at_suspend + 2),
        BOOT,
        "the guest's counter continuing under the pocket isr",
    );
    let text = std::fs::read_to_string(&console_b).unwrap();
    assert!(!text.contains("isr-boot"), "the guest booted instead of resuming: {text}");
    let suspend = pocket(&["suspend", "vm"]).output().unwrap();
    assert!(suspend.status.success(), "{}", String::from_utf8_lossy(&suspend.stderr));
    let out = finish(run);
    assert_eq!(server.chunks_fetched(), before, "chunks came from the server, not the stick: {out}");
    assert!(out.contains("0 chunks (0.0 MiB) from the server"), "{out}");
    assert!(out.contains("from lookaside"), "{out}");
    // Its home is on the stick, and the checkout and the memory image went there.
    let stat = pocket(&["stat", "vm", "--json"]).output().unwrap();
    let stat: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    assert_eq!(stat["memory_image"], true, "{stat}");
    assert!(home.join("cache").is_dir());
}
