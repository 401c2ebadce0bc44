//! The wire contract end to end (real server, real client): both sides refuse the same parcel names, a lock
//! lost in any of the ways the server reports is exit 3, and the `isr` binary links no server backend.

mod common;
use common::*;
use std::io::{Read, Write};
use std::path::Path;

/// Parcel names and whether the deployment accepts them: one table, run against `isr create` and against a
/// raw request to the server.
const NAMES: &[(&str, bool)] = &[
    ("a", true),
    ("desktop", true),
    ("my-vm_2.0", true),
    ("UPPER-lower.9", true),
    ("-leading-dash", true),
    ("trailing.", true),
    ("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", true), // 64
    ("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", false), // 65
    ("", false),
    (".", false),
    ("..", false),
    (".hidden", false),
    ("a/b", false),
    ("a?b", false),
    ("a#b", false),
    ("a%2eb", false),
    ("sp ace", false),
    ("tab\tbed", false),
    ("é", false),
];

/// One HTTP/1.0 request to the server (no client library: what any program could send); (status, body).
fn http(server: &Server, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let addr = server.url.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn raw_login(server: &Server, user: &str) -> String {
    let secrets =
        isr_format::UserSecrets::derive(user, PASSWORD, isr_format::KdfParams::DEFAULT).expect("derive");
    let req = serde_json::json!({"user": user, "login_secret": secrets.login.to_hex()}).to_string();
    let (status, body) = http(server, "POST", "/api/v1/login", None, &req);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["token"].as_str().unwrap().to_owned()
}

#[test]
fn the_client_and_the_server_refuse_the_same_parcel_names() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    std::fs::write(&img, vec![0x42u8; 256 << 10]).unwrap();
    let alice = Client::new(&server, "alice");
    let token = raw_login(&server, "bob");
    for &(name, valid) in NAMES {
        // The client: `isr create NAME`, refused before anything is sent (exit 2), or created.
        // After `--`, so that a name starting with '-' is a name and not an option.
        let (code, err) = alice.code(&["create", "--disk", img.to_str().unwrap(), "--", name]);
        if valid {
            assert_eq!(code, 0, "isr create {name:?}: {err}");
        } else {
            assert_eq!(code, 2, "isr create {name:?}: {err}");
            assert!(err.contains("invalid parcel name"), "{name:?}: {err}");
        }
        // The server: the same name in a raw create (bob's, so valid names are new there too).
        let req = serde_json::json!({"name": name, "wrapped_keyroot": "00", "recovery_keyroot": null,
            "holder": "raw", "client_id": "raw"})
        .to_string();
        let (status, body) = http(&server, "POST", "/api/v1/parcels", Some(&token), &req);
        if valid {
            assert_eq!(status, 201, "server create {name:?}: {body}");
        } else {
            assert_eq!(status, 400, "server create {name:?}: {body}");
            let e: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(e["code"], "bad_name", "{name:?}: {body}");
        }
    }
    let listed = alice.ok(&["ls"]);
    let created: Vec<&str> = NAMES.iter().filter(|(_, v)| *v).map(|(n, _)| *n).collect();
    let mut shown: Vec<&str> = listed.lines().collect();
    shown.sort();
    let mut expected = created.clone();
    expected.sort();
    assert_eq!(shown, expected, "exactly the valid names were created");
}

fn write_pattern(c: &Client, dir: &Path, parcel: &str, pattern: u8, offset: &str) {
    let sock = dir.join(format!("{parcel}-{pattern}.sock"));
    let disk = c.disk(parcel, &sock);
    let (ok, text) = qemu_io(&sock, &[&format!("write -P {pattern} {offset} 64k"), "flush"]);
    assert!(ok, "{text}");
    stop_disk(disk);
}

#[test]
fn a_lock_lost_in_every_way_the_server_reports_is_exit_3() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let a = Client::new(&server, "alice");
    let b = Client::new(&server, "alice");
    let img = dir.path().join("p.img");
    make_image(&img, 16 << 20);
    a.ok(&["create", "p", "--disk", img.to_str().unwrap()]);
    a.ok(&["checkout", "p"]);
    write_pattern(&a, dir.path(), "p", 0x5a, "1M");

    // Broken by the administrator (`lock_broken`, nobody holds it now).
    let out = server.admin(&["unlock", "alice/p"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, err) = a.code(&["sync", "p"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("broken by") && err.contains("administrator"), "{err}");

    // Another client took it since (`lock_broken`, with who holds it now).
    b.ok(&["checkout", "p"]);
    let (code, err) = a.code(&["checkin", "p"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("broken by"), "{err}");

    // That client's lock was broken in turn: the parcel remembers only the latest break, so A's lock id is
    // now unknown on an unlocked parcel (`lock_mismatch`): still a lost lock, still exit 3.
    let out = server.admin(&["unlock", "alice/p"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, err) = a.code(&["sync", "p"]);
    assert_eq!(code, 3, "{err}");
    let (code, err) = b.code(&["checkin", "p"]);
    assert_eq!((code, err.contains("broken by")), (0, true), "an unmodified parcel just leaves: {err}");
    assert_eq!(a.stat("p")["state"], "modified", "the local changes are kept through it all");

    // And the lock is taken back: A's changes commit.
    a.ok(&["checkout", "p"]);
    let out = a.ok(&["checkin", "p"]);
    assert!(out.contains("version 2"), "{out}");
}

#[test]
fn the_isr_binary_links_no_server_backend() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["tree", "--offline", "-p", "isr-cli", "-e", "normal", "--prefix", "none"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(tree.contains("isr-client ") && tree.contains("isr-wire "), "an odd tree:\n{tree}");
    for backend in ["rusqlite", "tokio-postgres", "postgres-protocol", "object_store", "isr-server "] {
        assert!(
            !tree.lines().any(|l| l.starts_with(backend)),
            "isr links {backend} again (isr-store's backends are features only the server enables):\n{tree}"
        );
    }
}
