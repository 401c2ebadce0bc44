//! End-to-end: the real server and client, disks driven by qemu-io over NBD.

mod common;
use common::*;

#[test]
fn write_checkin_checkout_elsewhere_read_back() {
    let server = Server::start();
    // Everything goes at check-in here (tests/trickle.rs covers the background upload).
    let a = Client::without_trickle(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    make_image(&img, 256 << 20);
    let out = a.ok(&["create", "p", "--disk", img.to_str().unwrap(), "--memory", "256"]);
    assert!(out.contains("version 1"), "{out}");
    // 4 MiB random (32 chunks) + 1 MiB of a 44-byte text period (8 chunks, each at another phase).
    assert_eq!(sent_chunks(&out), 40, "{out}");
    assert_eq!(a.stat("p")["state"], "absent");

    a.ok(&["checkout", "p"]);
    a.ok(&["checkout", "p"]); // holding it already: a no-op
    assert_eq!(a.stat("p")["state"], "unmodified");
    let sock = dir.path().join("a.sock");
    let disk = a.disk("p", &sock);
    assert_eq!(a.stat("p")["state"], "running");
    let (ok, text) = qemu_io(
        &sock,
        &[
            "write -P 0x5a 1M 64k",
            "write -P 0xa5 100M 1M",
            "flush",
            "read -P 0x5a 1M 64k",
            "read -P 0 200M 64k",
        ],
    );
    assert!(ok, "{text}");
    stop_disk(disk);
    let st = a.stat("p");
    assert_eq!(st["state"], "modified");
    assert_eq!(st["chunks"]["dirty"], 9, "{st}");

    // Another client cannot take the lock meanwhile: exit 3, naming the holder.
    let b = Client::new(&server, "alice");
    let (code, err) = b.code(&["checkout", "p"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("locked by"), "{err}");

    // Only the touched chunks travel: 1 (64 KiB at 1 MiB) + 8 identical ones (1 MiB of 0xa5 at 100 MiB),
    // which dedup to one upload: 2 chunks.
    let out = a.ok(&["checkin", "p", "-m", "patterns"]);
    assert_eq!(sent_chunks(&out), 2, "{out}");
    assert_eq!(a.stat("p")["state"], "absent");
    let versions = a.ok(&["versions", "p"]);
    assert_eq!(versions.lines().count(), 1 + 2, "a header and two versions: {versions}");
    assert!(versions.contains("patterns"));

    b.ok(&["checkout", "p"]);
    let sock_b = dir.path().join("b.sock");
    let disk = b.disk("p", &sock_b);
    let (ok, text) = qemu_io(&sock_b, &["read -P 0x5a 1M 64k", "read -P 0xa5 100M 1M", "read -P 0 120M 1M"]);
    assert!(ok, "{text}");
    stop_disk(disk);
    // The random data written at create time is intact: export and compare.
    let exported = dir.path().join("export.img");
    b.ok(&["export", "p", "--output", exported.to_str().unwrap()]);
    let original = std::fs::read(&img).unwrap();
    let back = std::fs::read(&exported).unwrap();
    assert_eq!(back.len(), original.len());
    assert_eq!(back[..1 << 20], original[..1 << 20]);
    assert!(back[(1 << 20)..(1 << 20) + 65536].iter().all(|&x| x == 0x5a));
    assert_eq!(back[(2 << 20)..(64 << 20) + (1 << 20)], original[(2 << 20)..(64 << 20) + (1 << 20)]);
    b.ok(&["checkin", "p"]);
}

#[test]
fn users_are_isolated_and_errors_have_their_exit_codes() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    make_image(&img, 16 << 20);
    a.ok(&["create", "secret", "--disk", img.to_str().unwrap()]);
    assert!(a.ok(&["ls"]).contains("secret"));

    let bob = Client::new(&server, "bob");
    assert!(!bob.ok(&["ls"]).contains("secret"));
    let (code, err) = bob.code(&["checkout", "secret"]);
    assert_eq!(code, 1, "{err}");
    let (code, _) = bob.code(&["export", "secret", "--output", dir.path().join("x").to_str().unwrap()]);
    assert_eq!(code, 1);

    let mut wrong = Client::new(&server, "alice");
    wrong.password = "not the password".into();
    let (code, err) = wrong.code(&["ls"]);
    assert_eq!(code, 4, "{err}");

    let mut nowhere = Client::new(&server, "alice");
    nowhere.server = "http://127.0.0.1:9".into();
    let (code, err) = nowhere.code(&["ls"]);
    assert_eq!(code, 6, "{err}");

    let (code, _) = a.code(&["create", "bad/name", "--disk", img.to_str().unwrap()]);
    assert_eq!(code, 2);
    let (code, _) = a.code(&["no-such-command"]);
    assert_eq!(code, 2);
}

#[test]
fn kill9_after_flush_keeps_the_write_and_the_cache_checks() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    make_image(&img, 64 << 20);
    a.ok(&["create", "p", "--disk", img.to_str().unwrap()]);
    a.ok(&["checkout", "p"]);
    let sock = dir.path().join("s.sock");
    let mut disk = a.disk("p", &sock);
    let (ok, text) = qemu_io(&sock, &["write -P 0x77 3M 200k", "flush"]);
    assert!(ok, "{text}");
    signal(&disk, 9);
    disk.wait().unwrap();
    a.ok(&["check", "p"]);
    a.ok(&["check", "p", "--full"]);
    let disk = a.disk("p", &sock);
    let (ok, text) = qemu_io(&sock, &["read -P 0x77 3M 200k"]);
    assert!(ok, "{text}");
    stop_disk(disk);
    // Reads decode into the runtime image without keeping chunks in the cache; hoard fills the cache.
    a.ok(&["hoard", "p"]);
    // A corrupted chunk in the client's cache is found by check --full (exit 5).
    let cache = a.home.path().join("cache");
    for d in std::fs::read_dir(&cache).unwrap().flatten() {
        if d.file_name().len() == 2 {
            for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                let mut b = std::fs::read(f.path()).unwrap();
                let n = b.len();
                b[n / 2] ^= 1;
                std::fs::write(f.path(), b).unwrap();
            }
        }
    }
    let (code, err) = a.code(&["check", "p", "--full"]);
    assert_eq!(code, 5, "{err}");
}

#[test]
fn kill9_during_checkin_then_rerun_finishes() {
    let server = Server::start();
    // Everything goes at check-in here, so that the check-in has something to be killed in.
    let a = Client::without_trickle(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    make_image(&img, 128 << 20);
    a.ok(&["create", "p", "--disk", img.to_str().unwrap()]);
    a.ok(&["checkout", "p"]);
    let sock = dir.path().join("s.sock");
    let disk = a.disk("p", &sock);
    // 48 MiB of distinct data: 384 chunks to upload.
    let src = dir.path().join("src.img");
    let mut data = vec![0u8; 48 << 20];
    blake3::Hasher::new().update(b"checkin payload").finalize_xof().fill(&mut data);
    std::fs::write(&src, &data).unwrap();
    let st = std::process::Command::new("qemu-img")
        .args(["dd", "-f", "raw", "-O", "raw", "bs=1M", "count=48"])
        .arg(format!("if={}", src.display()))
        .arg(format!("of=nbd+unix:///?socket={}", sock.display()))
        .status();
    let copied = match st {
        Ok(s) if s.success() => true,
        _ => {
            let (ok, text) = qemu_io(&sock, &["write -P 0x11 0 48M", "flush"]);
            assert!(ok, "{text}");
            false
        }
    };
    let (ok, text) = qemu_io(&sock, &["flush"]);
    assert!(ok, "{text}");
    stop_disk(disk);
    // Kill the checkin once the server holds some of its chunks, but not all.
    let before = server.chunk_files().len();
    let mut child =
        a.cmd(&["checkin", "p", "-m", "big"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let killed = loop {
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        if server.chunk_files().len() >= before + 16 {
            signal(&child, 9);
            let _ = child.wait();
            break true;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    if killed {
        assert_eq!(
            a.ok(&["versions", "p"]).lines().count(),
            1 + 1,
            "a killed checkin must leave the head unchanged"
        );
        let out = a.ok(&["checkin", "p", "-m", "big"]);
        assert!(out.contains("version 2"), "{out}");
        // What arrived before the kill is not sent again.
        assert!(sent_chunks(&out) < 384, "{out}");
    }
    let versions = a.ok(&["versions", "p"]);
    assert_eq!(versions.lines().count(), 1 + 2, "a header and two versions: {versions}");
    let exported = dir.path().join("out.img");
    a.ok(&["export", "p", "--output", exported.to_str().unwrap()]);
    let back = std::fs::read(&exported).unwrap();
    if copied {
        assert!(back[..48 << 20] == data[..], "exported data differs from what was written");
    } else {
        assert!(back[..48 << 20].iter().all(|&x| x == 0x11));
    }
}

#[test]
fn corrupted_chunk_on_the_server_fails_reads_with_eio_and_export_with_5() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    make_image(&img, 32 << 20);
    a.ok(&["create", "p", "--disk", img.to_str().unwrap()]);
    for f in server.chunk_files() {
        let mut b = std::fs::read(&f).unwrap();
        let n = b.len();
        b[n - 20] ^= 0xff;
        std::fs::write(&f, b).unwrap();
    }
    let (code, err) = a.code(&["export", "p", "--output", dir.path().join("x.img").to_str().unwrap()]);
    assert_eq!(code, 5, "{err}");
    a.ok(&["checkout", "p"]);
    let sock = dir.path().join("s.sock");
    let disk = a.disk("p", &sock);
    let (ok, text) = qemu_io(&sock, &["read 0 64k"]);
    assert!(!ok && text.contains("Input/output error"), "{text}");
    // Zero chunks need no server: they still read.
    let (ok, text) = qemu_io(&sock, &["read -P 0 16M 64k"]);
    assert!(ok, "{text}");
    stop_disk(disk);
    assert!(!dir.path().join("x.img").exists());
}

#[test]
fn discard_hoard_rollback_and_unlock_force() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let original = make_image(&img, 32 << 20);
    a.ok(&["create", "p", "--disk", img.to_str().unwrap()]);
    a.ok(&["checkout", "p"]);
    let sock = dir.path().join("s.sock");
    let disk = a.disk("p", &sock);
    assert!(qemu_io(&sock, &["write -P 0x42 0 128k", "flush"]).0);
    stop_disk(disk);
    assert_eq!(a.stat("p")["state"], "modified");
    a.ok(&["discard", "p"]);
    assert_eq!(a.stat("p")["state"], "unmodified");
    let disk = a.disk("p", &sock);
    let (ok, text) = qemu_io(&sock, &["read -P 0x42 0 128k"]);
    assert!(!ok, "discarded data came back: {text}");
    stop_disk(disk);

    // Hoard, then the disk works with the server gone.
    let out = a.ok(&["hoard", "p"]);
    assert!(out.contains("fetched"), "{out}");
    let st = a.stat("p");
    assert_eq!(st["chunks"]["cached"], st["chunks"]["total"], "{st}");
    let child = a
        .cmd(&["disk", "p", "--nbd", sock.to_str().unwrap(), "--disconnected"])
        .env("ISR_SERVER", "http://127.0.0.1:9")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(|| sock.exists(), std::time::Duration::from_secs(20), "socket");
    let exported = dir.path().join("nbd-copy.img");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .arg(&exported)
        .status()
        .unwrap();
    assert!(st.success());
    stop_disk(child);
    assert_eq!(std::fs::read(&exported).unwrap()[..4 << 20], original[..]);

    // Version 2 with a change, then roll back to 1: version 3 equals version 1.
    let disk = a.disk("p", &sock);
    assert!(qemu_io(&sock, &["write -P 0x43 0 128k", "flush"]).0);
    stop_disk(disk);
    a.ok(&["sync", "p", "-m", "two"]);
    a.ok(&["checkin", "p"]);
    let out = a.ok(&["rollback", "p", "1"]);
    assert!(out.contains("version 3"), "{out}");
    let v3 = dir.path().join("v3.img");
    a.ok(&["export", "p", "--output", v3.to_str().unwrap()]);
    assert_eq!(std::fs::read(&v3).unwrap()[..4 << 20], original[..]);

    // A dead client's lock is broken with unlock --force.
    let b = Client::new(&server, "alice");
    b.ok(&["checkout", "p"]);
    let (code, _) = a.code(&["checkout", "p"]);
    assert_eq!(code, 3);
    a.ok(&["unlock", "p", "--force"]);
    a.ok(&["checkout", "p"]);
}

#[test]
fn qcow2_import_auth_token_and_disconnected_refusal() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.img");
    let original = make_image(&raw, 24 << 20);
    let qcow = dir.path().join("disk.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .status()
        .unwrap();
    assert!(st.success());

    // `isr auth` keeps a token, never the password.
    a.ok(&["auth"]);
    for entry in walk(a.home.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(PASSWORD.len()).any(|w| w == PASSWORD.as_bytes()),
            "{} holds the password",
            entry.display()
        );
    }
    let mut no_pw = Client::new(&server, "alice");
    no_pw.home = tempfile::tempdir().unwrap();
    std::fs::copy(a.home.path().join("session.json"), no_pw.home.path().join("session.json")).unwrap();
    no_pw.password = String::new();
    assert!(no_pw.cmd(&["ls"]).env_remove("ISR_PASSWORD").output().unwrap().status.success());

    a.ok(&["create", "q", "--disk", qcow.to_str().unwrap(), "--chunk-size", "64K"]);
    let out = dir.path().join("q.img");
    a.ok(&["export", "q", "--output", out.to_str().unwrap()]);
    let back = std::fs::read(&out).unwrap();
    assert_eq!(back.len(), 24 << 20);
    assert_eq!(back[..4 << 20], original[..]);

    // Disconnected use needs every chunk local: it fails up front, naming the count. (Client `a` has every
    // chunk cached by the export above; a fresh client has none.)
    let b = Client::new(&server, "alice");
    b.ok(&["checkout", "q"]);
    let sock = dir.path().join("q.sock");
    let (code, err) = b.code(&["disk", "q", "--nbd", sock.to_str().unwrap(), "--disconnected"]);
    assert_eq!(code, 1);
    assert!(err.contains("chunks of q are not hoarded") || err.contains("not in the local cache"), "{err}");
    assert!(err.split_whitespace().any(|w| w.parse::<u64>().is_ok_and(|n| n > 0)), "{err}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
