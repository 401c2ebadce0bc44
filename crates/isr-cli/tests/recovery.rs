//! IT's recovery key end to end (real server, real client): `isr-server recovery init` configures the
//! deployment, `isr-server export --recovery-key` writes exactly what `isr export` does without the user's
//! password, and `isr-server user passwd --recovery-key` resets a password so that every sealed parcel opens
//! with the new one and none with the old.

mod common;
use common::*;
use std::path::Path;

fn small_parcel(c: &Client, dir: &Path, name: &str) {
    let img = dir.join(format!("{name}.img"));
    make_image(&img, 32 << 20);
    c.ok(&["create", name, "--disk", img.to_str().unwrap()]);
}

fn isr_export(c: &Client, dir: &Path, parcel: &str, version: Option<u64>) -> Vec<u8> {
    let out = dir.join(format!("{parcel}-{version:?}-isr.img"));
    let mut args = vec!["export", parcel, "--output", out.to_str().unwrap()];
    let v = version.map(|v| v.to_string());
    if let Some(v) = &v {
        args.extend(["--version", v.as_str()]);
    }
    c.ok(&args);
    std::fs::read(out).unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn recovery_export_matches_isr_export_and_a_reset_password_opens_every_sealed_parcel() {
    let mut server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    // A parcel from before the deployment had a recovery key: no seal.
    let early = Client::new(&server, "alice");
    small_parcel(&early, dir.path(), "before");

    // recovery init: a private key file (0600, never overwritten) and the public half in the config file.
    let cfg = server.dir.path().join("isr-server.conf");
    std::fs::write(&cfg, "# test deployment\nlisten = 127.0.0.1:0\n").unwrap();
    let key = dir.path().join("recovery.key");
    let out = server.admin(&[
        "recovery",
        "init",
        "--output",
        key.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(public.len(), 64, "{public:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&cfg).unwrap().contains(&format!("recovery_pubkey = {public}")));
    let key_text = std::fs::read(&key).unwrap();
    let again = server.admin(&["recovery", "init", "--output", key.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert_eq!(std::fs::read(&key).unwrap(), key_text, "the key file is never overwritten");
    // A second key file (not the deployment's) for the refusals below.
    let other_key = dir.path().join("other.key");
    assert!(server.admin(&["recovery", "init", "--output", other_key.to_str().unwrap()]).status.success());

    // serve --config picks the public key up; parcels created from now on are sealed to it.
    server.serve_args = vec!["--config".into(), cfg.to_str().unwrap().into()];
    let server = server.restart();
    let a = Client::new(&server, "alice");
    small_parcel(&a, dir.path(), "p1");
    small_parcel(&a, dir.path(), "p2");
    // A second version of p1 (written through `isr disk`).
    let sock = dir.path().join("p1.sock");
    let disk = a.disk("p1", &sock);
    let (ok, text) = qemu_io(&sock, &["write -P 0x5a 1M 64k", "write -P 0x33 20M 1M", "flush"]);
    assert!(ok, "{text}");
    stop_disk(disk);
    a.ok(&["checkin", "p1"]);

    // Recovery export of each version equals `isr export` of it, byte for byte.
    for (parcel, version) in [("p1", Some(1)), ("p1", Some(2)), ("p1", None), ("p2", None)] {
        let img = dir.path().join(format!("{parcel}-{version:?}-recovery.img"));
        let target = format!("alice/{parcel}");
        let mut args = vec![
            "export",
            target.as_str(),
            "--recovery-key",
            key.to_str().unwrap(),
            "--output",
            img.to_str().unwrap(),
        ];
        let v = version.map(|v: u64| v.to_string());
        if let Some(v) = &v {
            args.extend(["--version", v.as_str()]);
        }
        let out = server.admin(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let theirs = isr_export(&a, dir.path(), parcel, version);
        assert!(std::fs::read(&img).unwrap() == theirs, "{parcel} {version:?}: recovery export differs");
    }
    let v1 = std::fs::read(dir.path().join("p1-Some(1)-recovery.img")).unwrap();
    let v2 = std::fs::read(dir.path().join("p1-Some(2)-recovery.img")).unwrap();
    assert!(v1 != v2 && v2[1 << 20..(1 << 20) + 65536].iter().all(|b| *b == 0x5a));

    // Without the key export refuses (usage); with another key it cannot open the seal (exit 4); a parcel
    // without a seal cannot be exported (exit 1). No output file in any case.
    let img = dir.path().join("refused.img");
    let i = img.to_str().unwrap();
    let out = server.admin(&["export", "alice/p1", "--output", i]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out =
        server.admin(&["export", "alice/p1", "--recovery-key", other_key.to_str().unwrap(), "--output", i]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let out =
        server.admin(&["export", "alice/before", "--recovery-key", key.to_str().unwrap(), "--output", i]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("alice/before") && stderr(&out).contains("no recovery seal"),
        "{}",
        stderr(&out)
    );
    assert!(!img.exists());

    // A reset with another key changes nothing: the old password still opens everything.
    let out = server.admin_with_password(
        &["user", "passwd", "alice", "--recovery-key", other_key.to_str().unwrap()],
        "reset by IT",
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(Client::new(&server, "alice").code(&["ls"]).0, 0);

    // The reset: p1 and p2 rewrapped, `before` reported by name and left as it was, exit 1.
    let out = server.admin_with_password(
        &["user", "passwd", "alice", "--recovery-key", key.to_str().unwrap()],
        "reset by IT",
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("alice/before"), "{}", stderr(&out));
    let mut fresh = Client::new(&server, "alice");
    fresh.password = "reset by IT".into();
    for parcel in ["p1", "p2"] {
        let exported = isr_export(&fresh, dir.path(), parcel, None);
        let recovered = std::fs::read(dir.path().join(format!("{parcel}-None-recovery.img"))).unwrap();
        assert!(exported == recovered, "{parcel} opened with the new password differs");
        fresh.ok(&["checkout", parcel]);
    }
    // The old password opens nothing: it no longer logs in.
    let old = Client::new(&server, "alice");
    let (code, err) = old.code(&["export", "p2", "--output", dir.path().join("old.img").to_str().unwrap()]);
    assert_eq!(code, 4, "{err}");

    // A corrupt chunk: exit 5 naming it, and no image written.
    let chunks = server.chunk_files();
    for f in &chunks {
        let mut b = std::fs::read(f).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
        std::fs::write(f, b).unwrap();
    }
    let out = server.admin(&["export", "alice/p2", "--recovery-key", key.to_str().unwrap(), "--output", i]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("corrupt") && stderr(&out).contains("chunk "), "{}", stderr(&out));
    assert!(!img.exists(), "no partial image");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("isr-partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
