//! What packagers and users expect around the binaries: shell completions, man pages, the systemd unit, the
//! client's configuration file, and listings with headers and `--json`.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({:?}):\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_parse_in_their_shells_and_name_the_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    for (bin, subcommands) in [
        (isr_bin(), &["checkout", "resume", "checkin", "completions", "versions"][..]),
        (server_bin(), &["serve", "unlock", "prune", "completions"][..]),
    ] {
        for (shell, check) in [("bash", &["-n"][..]), ("zsh", &["-n"][..]), ("fish", &["--no-execute"][..])] {
            let script = run_ok(Command::new(&bin).args(["completions", shell]));
            for sub in subcommands {
                assert!(script.contains(sub), "{} {shell} completions lack {sub}", bin.display());
            }
            assert!(!script.contains("\"man\""), "the hidden man subcommand is completed: {}", bin.display());
            let file = dir.path().join(format!("{}.{shell}", bin.file_name().unwrap().to_string_lossy()));
            std::fs::write(&file, &script).unwrap();
            run_ok(Command::new(shell).args(check).arg(&file));
        }
    }
    let out = Command::new(isr_bin()).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Render one man page as `man -l` does for a reader.
fn render(page: &Path) -> String {
    let out = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .env("MANWIDTH", "100")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .expect("man (install man-db)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "man -l {}: {:?} {err}",
        page.display(),
        out.status
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn man_pages_for_every_command_render() {
    let dir = tempfile::tempdir().unwrap();
    run_ok(Command::new(isr_bin()).args(["man", "--output"]).arg(dir.path()));
    run_ok(Command::new(server_bin()).args(["man", "--output"]).arg(dir.path()));
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    for want in [
        "isr.1",
        "isr-resume.1",
        "isr-checkout.1",
        "isr-completions.1",
        "isr-server.1",
        "isr-server-serve.1",
        "isr-server-user.1",
        "isr-server-user-add.1",
    ] {
        assert!(pages.contains(&want.to_owned()), "{want} missing: {pages:?}");
    }
    assert!(!pages.iter().any(|p| p.ends_with("-man.1") || p.contains("-help")), "{pages:?}");
    for page in &pages {
        let text = render(&dir.path().join(page));
        let name = page.trim_end_matches(".1");
        assert!(text.contains("NAME") && text.contains(name), "{page} renders as:\n{text}");
    }
    let resume = render(&dir.path().join("isr-resume.1"));
    assert!(resume.contains("--transient") && resume.contains("--display"), "{resume}");
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/isr-server.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for hardening in
        ["NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=isr-server", "User=isr-server"]
    {
        assert!(text.contains(hardening), "the unit lacks {hardening}");
    }
    assert!(text.contains("ExecStart=/usr/bin/isr-server serve --data /var/lib/isr-server"));
    // No systemd runs here to start it: verified with the binary where this build put it.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("isr-server.service");
    std::fs::write(&copy, text.replace("/usr/bin/isr-server", server_bin().to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze (install systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify: {:?} {err}", out.status);
    let sysusers = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/isr-server.sysusers"),
    )
    .unwrap();
    assert!(sysusers.lines().any(|l| l.starts_with("u isr-server ")), "{sysusers}");
}

fn json(text: &str) -> serde_json::Value {
    // One JSON object on stdout, nothing else.
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn config_file_listings_with_headers_and_json() {
    let server = Server::start();
    let a = Client::new(&server, "alice");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    make_image(&img, 8 << 20);
    a.ok(&["create", "p", "--disk", img.to_str().unwrap(), "-m", "first"]);
    a.ok(&["checkout", "p"]);

    // The server, user and home from a configuration file: the environment does not name them.
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "# a client's settings\nserver = \"{}\"\nuser = \"alice\"\nhome = \"{}\"\ndisplay = \"none\"\n",
            server.url,
            a.home.path().display()
        ),
    )
    .unwrap();
    let bare = |args: &[&str]| {
        let mut c = Command::new(isr_bin());
        c.args(args).env_remove("ISR_SERVER").env_remove("ISR_USER").env_remove("ISR_HOME");
        c.env("ISR_PASSWORD", PASSWORD).env("HOME", dir.path()).env_remove("XDG_CONFIG_HOME");
        c.env_remove("ISR_CONFIG");
        c
    };
    let ls =
        json(&run_ok(bare(&["--config", cfg.to_str().unwrap(), "ls", "--json"]).env_remove("ISR_DISPLAY")));
    assert_eq!(ls["parcels"][0]["name"], "p");
    assert_eq!(ls["parcels"][0]["head"], 1);
    assert_eq!(ls["parcels"][0]["state"], "unmodified");
    assert!(ls["parcels"][0]["lock"]["holder"].is_string(), "{ls}");
    assert!(ls["offline"].is_null(), "{ls}");
    // $ISR_CONFIG names it too, and the default place is $XDG_CONFIG_HOME/isr/config.toml
    run_ok(bare(&["ls"]).env("ISR_CONFIG", &cfg));
    let xdg = dir.path().join("xdg");
    std::fs::create_dir_all(xdg.join("isr")).unwrap();
    std::fs::copy(&cfg, xdg.join("isr/config.toml")).unwrap();
    assert_eq!(run_ok(bare(&["ls"]).env("XDG_CONFIG_HOME", &xdg)).trim(), "p");
    // The environment wins over the file, a flag over both: a wrong user from either is refused by the server.
    let (code, _) = {
        let out = bare(&["ls"]).env("ISR_CONFIG", &cfg).env("ISR_USER", "mallory").output().unwrap();
        (out.status.code(), ())
    };
    assert_eq!(code, Some(4), "the environment's user was not used");
    let out =
        bare(&["--user", "alice", "ls"]).env("ISR_CONFIG", &cfg).env("ISR_USER", "mallory").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Bad files: exit 2 naming the file and the key.
    for (text, key) in [
        ("colour = \"blue\"\n", "colour"),
        ("display = \"vga\"\n", "display"),
        ("password = \"hunter2\"\n", "password"),
        ("server = [\"a\", \"b\"]\n", "server"),
    ] {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, text).unwrap();
        let out = bare(&["--config", bad.to_str().unwrap(), "ls"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(bad.to_str().unwrap()) && err.contains(&format!("key {key}")), "{err}");
    }
    let out = bare(&["--config", "/nonexistent/isr.toml", "ls"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));

    // Listings: column headers, and --json as one object.
    let sock = dir.path().join("nbd.sock");
    let disk = a.disk("p", &sock);
    let (ok, text) = qemu_io(&sock, &["write -P 0x5a 0 64k", "flush"]);
    assert!(ok, "{text}");
    stop_disk(disk);
    a.ok(&["sync", "p", "-m", "second"]);
    let long = a.ok(&["ls", "-l"]);
    let header = long.lines().next().unwrap();
    for col in ["PARCEL", "HEAD", "STATE", "LOCK"] {
        assert!(header.contains(col), "{long}");
    }
    assert!(long.lines().nth(1).unwrap().starts_with("p "), "{long}");
    let versions = a.ok(&["versions", "p"]);
    let header = versions.lines().next().unwrap();
    for col in ["VERSION", "CREATED", "CLIENT", "UPLOADED", "COMMENT"] {
        assert!(header.contains(col), "{versions}");
    }
    assert_eq!(versions.lines().count(), 3, "{versions}");
    let v = json(&a.ok(&["versions", "p", "--json"]));
    assert_eq!(v["parcel"], "p");
    let list = v["versions"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["version"], 1);
    assert_eq!(list[1]["comment"], "second");
    assert!(list[1]["bytes_uploaded"].is_u64() && list[1]["client"].is_string(), "{v}");
}
