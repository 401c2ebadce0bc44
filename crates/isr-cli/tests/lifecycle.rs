//! The lifecycle's safety rules end to end (real server, real client): a broken lock strands nobody and
//! loses nothing, failures leave a clean state, names never become other requests, a corrupt cached chunk
//! is fetched again, passwords change without locking anyone out of their parcels.

mod common;
use common::*;
use std::path::Path;

/// A small parcel `name` made from a 32 MiB image (random data in its first 4 MiB, zeros after).
fn small_parcel(c: &Client, dir: &Path, name: &str) {
    let img = dir.join(format!("{name}.img"));
    make_image(&img, 32 << 20);
    c.ok(&["create", name, "--disk", img.to_str().unwrap(), "--memory", "64"]);
}

/// Write `pattern` at `offset` through `isr disk`, flushed.
fn write_pattern(c: &Client, dir: &Path, parcel: &str, pattern: u8, offset: &str) {
    let sock = dir.join(format!("{parcel}-{pattern}.sock"));
    let disk = c.disk(parcel, &sock);
    let (ok, text) = qemu_io(&sock, &[&format!("write -P {pattern} {offset} 64k"), "flush"]);
    assert!(ok, "{text}");
    stop_disk(disk);
}

fn exported(c: &Client, dir: &Path, parcel: &str) -> Vec<u8> {
    let out = dir.join(format!("{parcel}-export.img"));
    c.ok(&["export", parcel, "--output", out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

#[test]
fn a_broken_lock_is_told_its_changes_kept_and_the_lock_taken_back() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let a = Client::new(&server, "alice");
    let b = Client::new(&server, "alice");
    small_parcel(&a, dir.path(), "p");
    a.ok(&["checkout", "p"]);
    write_pattern(&a, dir.path(), "p", 0x5a, "5M");

    // B breaks A's lock; A learns it at the next command that needs the lock: exit 3, who and when.
    let out = b.ok(&["unlock", "p", "--force"]);
    assert!(out.contains("it was locked by"), "{out}");
    for cmd in [&["sync", "p"][..], &["checkin", "p"]] {
        let (code, err) = a.code(cmd);
        assert_eq!(code, 3, "{cmd:?}: {err}");
        assert!(err.contains("broken by") && err.contains(b.home.path().to_str().unwrap()), "{err}");
        assert!(err.contains("isr checkout p"), "{err}");
    }
    assert_eq!(a.stat("p")["state"], "modified", "the local changes are kept");

    // The lock is free: checkout takes it again and the changes commit on top of the unmoved head.
    let (code, err) = a.code(&["checkout", "p"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("took the lock again"), "{err}");
    let out = a.ok(&["checkin", "p", "-m", "after the break"]);
    assert!(out.contains("version 2"), "{out}");
    assert!(exported(&b, dir.path(), "p")[5 << 20..(5 << 20) + 65536].iter().all(|&x| x == 0x5a));

    // Now the head moves while A's lock is broken: A keeps its changes as a new parcel.
    a.ok(&["checkout", "p"]);
    write_pattern(&a, dir.path(), "p", 0x11, "6M");
    b.ok(&["unlock", "p", "--force"]);
    b.ok(&["checkout", "p"]);
    write_pattern(&b, dir.path(), "p", 0x22, "7M");
    b.ok(&["checkin", "p", "-m", "b's work"]);
    let (code, err) = a.code(&["checkout", "p"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("--as NEWNAME") && err.contains("head moved to version 3"), "{err}");
    let (code, err) = a.code(&["sync", "p"]);
    assert_ne!(code, 0);
    assert!(err.contains("--as NEWNAME") && err.contains("isr discard p"), "{err}");
    let out = a.ok(&["checkin", "p", "--as", "p-mine", "-m", "kept"]);
    assert!(out.contains("p-mine version 1"), "{out}");
    assert_eq!(a.stat("p")["state"], "absent");
    let mine = exported(&b, dir.path(), "p-mine");
    assert!(mine[6 << 20..(6 << 20) + 65536].iter().all(|&x| x == 0x11), "A's change is in p-mine");
    assert!(mine[7 << 20..(7 << 20) + 65536].iter().all(|&x| x == 0), "B's is not");
    let head = exported(&b, dir.path(), "p");
    assert!(head[7 << 20..(7 << 20) + 65536].iter().all(|&x| x == 0x22), "p's head is B's version");
    // p's lock was released by A's checkin --as (A had taken it again at the checkout above).
    assert!(!a.ok(&["ls", "-l"]).lines().any(|l| l.starts_with("p ") && l.contains("locked by")));

    // A broken lock of an unmodified (or discarded) parcel: checkin just leaves.
    a.ok(&["checkout", "p"]);
    write_pattern(&a, dir.path(), "p", 0x33, "8M");
    b.ok(&["unlock", "p", "--force"]);
    a.ok(&["discard", "p"]);
    let (code, err) = a.code(&["checkin", "p"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("broken by"), "{err}");
    assert_eq!(a.stat("p")["state"], "absent");
}

#[test]
fn failed_creates_leave_nothing_and_names_never_become_other_requests() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let a = Client::new(&server, "alice");
    let img = dir.path().join("d.img");
    make_image(&img, 8 << 20);
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let img = img.to_str().unwrap();
    for args in [
        &["create", "x", "--disk", img, "--memory", "0"][..],
        &["create", "x", "--disk", img, "--cpus", "0"],
        &["create", "d3", "--disk", empty.to_str().unwrap()],
        &["create", "d4", "--disk", "/nonexistent/disk.img"],
        &["create", "d5", "--disk", img, "--initrd", img],
        &["create", ".dot", "--disk", img],
    ] {
        let (code, err) = a.code(args);
        assert_eq!(code, 2, "{args:?}: {err}");
    }
    assert_eq!(a.ok(&["ls"]).trim(), "", "nothing half-made is left on the server");

    small_parcel(&a, dir.path(), "victim");
    small_parcel(&a, dir.path(), "lock");
    for args in [
        &["unlock", "victim?", "--force"][..],
        &["unlock", "victim#", "--force"],
        &["unlock", "victim?force=true", "--force"],
        &["unlock", ".", "--force"],
        &["unlock", "..", "--force"],
        &["rollback", "victim?", "1"],
        &["versions", "victim#"],
        &["stat", "a/b"],
        &["checkout", "victim/.."],
    ] {
        let (code, err) = a.code(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("invalid parcel name"), "{err}");
    }
    let ls = a.ok(&["ls"]);
    assert!(ls.lines().any(|l| l == "victim") && ls.lines().any(|l| l == "lock"), "{ls}");
    assert_eq!(a.ok(&["versions", "victim"]).lines().count(), 1 + 1, "a header and one version");

    for url in ["http://127.0.0.1:99999", "http://[::1", "ftp://127.0.0.1/"] {
        let (code, err) = a.code(&["--server", url, "ls"]);
        assert_eq!(code, 2, "{url}: {err}");
        assert!(err.contains(url), "{err}");
    }
}

#[test]
fn a_corrupt_cached_chunk_is_fetched_again_and_check_repair_mends_the_cache() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let a = Client::new(&server, "alice");
    let img = dir.path().join("p.img");
    let data = make_image(&img, 32 << 20);
    a.ok(&["create", "p", "--disk", img.to_str().unwrap()]);
    a.ok(&["hoard", "p"]); // checks out by itself
    assert_eq!(a.stat("p")["state"], "unmodified");
    let cache = a.home.path().join("cache");
    let corrupt_all = || {
        let mut n = 0;
        for f in walk(&cache) {
            let mut bytes = std::fs::read(&f).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x40;
            std::fs::write(&f, bytes).unwrap();
            n += 1;
        }
        assert!(n > 30, "the hoarded cache holds the parcel's chunks ({n})");
    };

    corrupt_all();
    let (code, err) = a.code(&["check", "p", "--full"]);
    assert_eq!(code, 5, "{err}");
    // Connected reads fetch good copies (verified) instead of failing with 5 until files are deleted by hand.
    let sock = dir.path().join("p.sock");
    let disk = a.disk("p", &sock);
    let (ok, text) = qemu_io(&sock, &["read -P 0 8M 1M"]);
    assert!(ok, "{text}");
    let f = dir.path().join("read.img");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .arg(&f)
        .status()
        .unwrap();
    assert!(st.success());
    stop_disk(disk);
    assert_eq!(std::fs::read(&f).unwrap()[..data.len()], data[..], "the guest read the right bytes");
    assert_eq!(exported(&a, dir.path(), "p")[..data.len()], data[..]);

    corrupt_all();
    let (code, err) = a.code(&["check", "p", "--repair"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("repaired:"), "{err}");
    a.ok(&["check", "p", "--full"]);

    // The runtime image (hoard decoded every chunk into it): a changed byte of a decoded chunk is found by
    // `check --full` (exit 5) and `--repair` drops that chunk (decoded again when read).
    let runtime = a.home.path().join("parcels/alice/p/runtime/disk.img");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&runtime).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, (1 << 20) + 100).unwrap();
        f.write_all_at(&[b[0] ^ 1], (1 << 20) + 100).unwrap();
    }
    let (code, err) = a.code(&["check", "p", "--full"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("runtime image"), "{err}");
    let (code, err) = a.code(&["check", "p", "--full", "--repair"]);
    assert_eq!(code, 0, "{err}");
    a.ok(&["check", "p", "--full"]);

    // Disconnected, a corrupt chunk fails the read; it never returns wrong data. (Without the runtime
    // image, so that the read decodes from the cache.)
    std::fs::remove_dir_all(runtime.parent().unwrap()).unwrap();
    corrupt_all();
    let mut server = server;
    server.kill();
    let child = a
        .cmd(&["disk", "p", "--nbd", sock.to_str().unwrap(), "--disconnected"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(|| sock.exists(), std::time::Duration::from_secs(60), "the NBD socket");
    let (ok, text) = qemu_io(&sock, &["read -P 0 0 64k"]);
    assert!(!ok, "{text}");
    assert!(text.to_lowercase().contains("input/output error"), "{text}");
    stop_disk(child);
}

#[test]
fn a_server_killed_during_checkin_is_exit_6_and_the_offline_client_still_lists() {
    let mut server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let a = Client::new(&server, "alice");
    let img = dir.path().join("p.img");
    make_image(&img, 64 << 20);
    a.ok(&["create", "p", "--disk", img.to_str().unwrap()]);
    a.ok(&["checkout", "p"]);
    // 48 MiB of distinct data: 384 chunks to upload.
    let sock = dir.path().join("s.sock");
    let disk = a.disk("p", &sock);
    let src = dir.path().join("src.img");
    let mut data = vec![0u8; 48 << 20];
    blake3::Hasher::new().update(b"killed server payload").finalize_xof().fill(&mut data);
    std::fs::write(&src, &data).unwrap();
    let st = std::process::Command::new("qemu-img")
        .args(["dd", "-f", "raw", "-O", "raw", "bs=1M", "count=48"])
        .arg(format!("if={}", src.display()))
        .arg(format!("of=nbd+unix:///?socket={}", sock.display()))
        .status()
        .unwrap();
    assert!(st.success());
    stop_disk(disk);

    let before = server.chunk_files().len();
    let child = a.cmd(&["checkin", "p"]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    wait_for(|| server.chunk_files().len() >= before + 16, std::time::Duration::from_secs(120), "uploads");
    server.kill();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("cannot reach the server"), "{err}");

    // Offline, ls and stat show what this client knows, and say so.
    let out = a.run(&["ls", "-l"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("offline"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("modified"));
    let st = a.stat("p");
    assert_eq!(st["state"], "modified");
    assert!(st["offline"].as_str().is_some(), "{st}");
    assert!(st["head_version"].is_null(), "{st}");
}

#[test]
fn passwd_rewraps_every_parcel_and_an_admin_reset_can_be_followed_up() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let a = Client::new(&server, "alice");
    small_parcel(&a, dir.path(), "p1");
    small_parcel(&a, dir.path(), "p2");
    a.ok(&["checkout", "p1"]);
    let out = a.cmd(&["passwd"]).env("ISR_NEW_PASSWORD", "new secret").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 parcel keys rewrapped"));
    // Re-running it (as after an interruption) changes nothing and succeeds.
    let out = a.cmd(&["passwd"]).env("ISR_NEW_PASSWORD", "new secret").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 already"));

    // A fresh client: the old password no longer logs in, the new one opens every parcel.
    let mut old = Client::new(&server, "alice");
    assert_eq!(old.code(&["ls"]).0, 4);
    old.password = "new secret".into();
    old.ok(&["export", "p2", "--output", dir.path().join("p2.img").to_str().unwrap()]);
    // The parcel checked out before the change still opens on the first client, with the new password.
    let mut a = a;
    a.password = "new secret".into();
    a.ok(&["checkin", "p1"]);

    // An administrator's reset: the login works, the parcels do not yet; `isr passwd` from the previous
    // password to the administrator's one fixes that.
    let out = server.admin_with_password(&["user", "passwd", "alice"], "set by admin");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut fresh = Client::new(&server, "alice");
    fresh.password = "set by admin".into();
    let (code, err) = fresh.code(&["checkout", "p1"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("isr passwd"), "{err}");
    fresh.password = "new secret".into();
    let out = fresh.cmd(&["passwd"]).env("ISR_NEW_PASSWORD", "set by admin").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    fresh.password = "set by admin".into();
    fresh.ok(&["checkout", "p1"]);
    fresh.ok(&["checkin", "p1"]);
}

#[test]
fn a_pinned_self_signed_certificate_is_trusted_and_the_home_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    // The usual way: openssl's req -x509 makes a CA:TRUE certificate.
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let text = String::from_utf8(
        std::process::Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&cert)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(text.contains("CA:TRUE"), "{text}");
    let server = Server::start_tls(&cert, &key);
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let a = Client::new(&server, "alice");
    let (code, err) = a.code(&["auth"]);
    assert_eq!(code, 6, "without the certificate the server is not trusted: {err}");
    a.ok(&["--ca-cert", cert.to_str().unwrap(), "auth"]);
    let img = dir.path().join("p.img");
    make_image(&img, 8 << 20);
    a.ok(&["--ca-cert", cert.to_str().unwrap(), "create", "p", "--disk", img.to_str().unwrap()]);
    a.ok(&["--ca-cert", cert.to_str().unwrap(), "hoard", "p"]);

    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(a.home.path()), 0o700);
    for f in walk(a.home.path()) {
        assert_eq!(mode(&f) & 0o077, 0, "{} is readable by others", f.display());
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
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
