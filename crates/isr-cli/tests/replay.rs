//! A man in the middle serving an older authentic manifest: every command that fetches a manifest refuses it
//! (exit 5, integrity) instead of running or exporting an older version, and a client home never accepts a
//! head below the highest version it has seen. Rollback is an ordinary commit of an old version's content.
//!
//! The proxy forwards everything to the real server, except the manifest paths it is told to answer
//! itself. It learns version 1's manifest bytes by watching a legitimate export go through.

mod common;

use common::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Default)]
struct MitmState {
    /// Path → (body, X-Isr-Version) answered instead of the server's reply.
    replace: HashMap<String, (Vec<u8>, u64)>,
    /// Path → body of the server's last 200 reply to a GET of a manifest.
    captured: HashMap<String, Vec<u8>>,
}

struct Mitm {
    url: String,
    state: Arc<Mutex<MitmState>>,
}

impl Mitm {
    fn start(upstream_url: &str) -> Mitm {
        let upstream = upstream_url.strip_prefix("http://").expect("plain HTTP test server").to_owned();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(MitmState::default()));
        let st = state.clone();
        // The proxy lives as long as the test process.
        std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (conn, _) = listener.accept().await.unwrap();
                    let (up, st) = (upstream.clone(), st.clone());
                    tokio::spawn(async move {
                        if let Err(e) = proxy_connection(conn, &up, &st).await {
                            eprintln!("proxy connection: {e}");
                        }
                    });
                }
            });
        });
        Mitm { url, state }
    }

    fn serve(&self, path: &str, body: &[u8], version_header: u64) {
        self.state.lock().unwrap().replace.insert(path.to_owned(), (body.to_vec(), version_header));
    }

    fn pass_through(&self) {
        self.state.lock().unwrap().replace.clear();
    }

    fn captured(&self, path: &str) -> Vec<u8> {
        let st = self.state.lock().unwrap();
        st.captured.get(path).unwrap_or_else(|| panic!("the proxy saw no manifest at {path}")).clone()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// Serve one client connection: requests one after another; answered ones keep the connection, forwarded
/// ones are sent upstream with `connection: close`, relayed whole, and end it.
async fn proxy_connection(
    mut conn: TcpStream,
    upstream: &str,
    state: &Mutex<MitmState>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 65536];
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        assert!(header(&head, "transfer-encoding").is_none(), "the proxy only handles sized bodies: {head}");
        let body_len: usize = header(&head, "content-length").map_or(0, |v| v.parse().unwrap());
        while buf.len() < head_end + 4 + body_len {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let request: Vec<u8> = buf.drain(..head_end + 4 + body_len).collect();
        let mut words = head.split(' ');
        let (method, path) = (words.next().unwrap_or_default(), words.next().unwrap_or_default().to_owned());
        let replacement =
            if method == "GET" { state.lock().unwrap().replace.get(&path).cloned() } else { None };
        if let Some((body, version)) = replacement {
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\nx-isr-version: {version}\r\n\
                 content-length: {}\r\n\r\n",
                body.len()
            );
            conn.write_all(reply.as_bytes()).await?;
            conn.write_all(&body).await?;
            continue;
        }
        let mut up = TcpStream::connect(upstream).await?;
        up.write_all(&request[..head_end]).await?;
        up.write_all(b"\r\nconnection: close\r\n\r\n").await?;
        up.write_all(&request[head_end + 4..]).await?;
        let mut reply = Vec::new();
        up.read_to_end(&mut reply).await?;
        let reply_head_end = find(&reply, b"\r\n\r\n").expect("a complete reply from the server");
        let reply_head = String::from_utf8_lossy(&reply[..reply_head_end]).into_owned();
        if method == "GET" && path.ends_with("/manifest") && reply_head.starts_with("HTTP/1.1 200") {
            assert!(
                header(&reply_head, "transfer-encoding").is_none(),
                "chunked manifest reply: {reply_head}"
            );
            state.lock().unwrap().captured.insert(path, reply[reply_head_end + 4..].to_vec());
        }
        if header(&reply_head, "connection").is_none() {
            let status_end = find(&reply, b"\r\n").unwrap();
            reply.splice(status_end + 2..status_end + 2, b"connection: close\r\n".iter().copied());
        }
        conn.write_all(&reply).await?;
        conn.shutdown().await?;
        return Ok(());
    }
}

const HEAD: &str = "/api/v1/parcels/p/versions/head/manifest";
const V1: &str = "/api/v1/parcels/p/versions/1/manifest";
const V2: &str = "/api/v1/parcels/p/versions/2/manifest";

fn through(mitm: &Mitm, server: &Server) -> Client {
    let mut c = Client::new(server, "alice");
    c.server = mitm.url.clone();
    c
}

fn exported(c: &Client, dir: &std::path::Path, name: &str, version: Option<&str>) -> (i32, String, Vec<u8>) {
    let out = dir.join(name);
    let mut args = vec!["export", "p", "--output", out.to_str().unwrap()];
    if let Some(v) = version {
        args.extend(["--version", v]);
    }
    let (code, err) = c.code(&args);
    (code, err, std::fs::read(&out).unwrap_or_default())
}

fn assert_integrity(code: i32, err: &str, what: &str) {
    assert_eq!(code, 5, "{what}: expected exit 5 (integrity), got {code}: {err}");
}

#[test]
fn replayed_manifests_are_refused_and_rollback_commits_a_new_version() {
    let server = Server::start();
    let mitm = Mitm::start(&server.url);
    let a = through(&mitm, &server);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let original = make_image(&img, 16 << 20);

    // Version 1 as imported, version 2 with its first 128 KiB changed.
    a.ok(&["create", "p", "--disk", img.to_str().unwrap()]);
    a.ok(&["checkout", "p"]);
    let sock = dir.path().join("s.sock");
    let disk = a.disk("p", &sock);
    assert!(qemu_io(&sock, &["write -P 0x42 0 128k", "flush"]).0);
    stop_disk(disk);
    a.ok(&["checkin", "p", "-m", "two"]);
    let (code, err, v1_disk) = exported(&a, dir.path(), "v1.img", Some("1"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(v1_disk[..4 << 20], original[..]);
    let v1_manifest = mitm.captured(V1);
    let (code, err, v2_disk) = exported(&a, dir.path(), "v2.img", None);
    assert_eq!(code, 0, "{err}");
    assert!(v2_disk[..128 << 10].iter().all(|&b| b == 0x42), "version 2 holds the write");

    // A fresh client home: version 1's manifest served as the head (claimed as version 2, or honestly as 1
    // while the parcel's head is 2), and as an explicit version 2 (claimed as 2, or answered as 1).
    let b = through(&mitm, &server);
    for claimed in [2, 1] {
        mitm.pass_through();
        mitm.serve(HEAD, &v1_manifest, claimed);
        let (code, err) = b.code(&["checkout", "p"]);
        assert_integrity(code, &err, &format!("checkout, head served as version {claimed}"));
        assert!(err.contains("version 2") && err.contains("version 1"), "names expected and served: {err}");
        let (code, err, _) = exported(&b, dir.path(), "head.img", None);
        assert_integrity(code, &err, &format!("export of the head served as version {claimed}"));
        mitm.pass_through();
        mitm.serve(V2, &v1_manifest, claimed);
        let (code, err, _) = exported(&b, dir.path(), "two.img", Some("2"));
        assert_integrity(code, &err, &format!("export --version 2 served as version {claimed}"));
        let (code, err) = b.code(&["checkout", "p", "--version", "2"]);
        assert_integrity(code, &err, &format!("checkout --version 2 served as version {claimed}"));
    }
    mitm.pass_through();
    assert!(
        !dir.path().join("head.img").exists() && !dir.path().join("two.img").exists(),
        "nothing exported"
    );
    // The refused checkouts left the parcel unlocked and nothing checked out on b.
    let st = b.stat("p");
    assert_eq!(st["state"], "absent", "{st}");
    assert!(st["lock"].is_null(), "{st}");

    // A home that has seen version 2 refuses a head of 1, however honestly numbered.
    mitm.serve(HEAD, &v1_manifest, 1);
    let (code, err, _) = exported(&a, dir.path(), "stale.img", None);
    assert_integrity(code, &err, "export of a head below the highest version seen");
    assert!(err.contains("already seen version 2"), "{err}");
    let (code, err) = a.code(&["checkout", "p"]);
    assert_integrity(code, &err, "checkout of a head below the highest version seen");
    mitm.pass_through();

    // Without the man in the middle everything works.
    let (code, err, head) = exported(&b, dir.path(), "b-head.img", None);
    assert_eq!((code, head == v2_disk), (0, true), "{err}");
    let (code, err, two) = exported(&b, dir.path(), "b-two.img", Some("2"));
    assert_eq!((code, two == v2_disk), (0, true), "{err}");
    b.ok(&["checkout", "p"]);
    assert_eq!(b.stat("p")["base_version"], 2);

    // Rollback while b holds the lock: refused (locked by another client); a replayed version to roll
    // back to is refused too.
    let (code, err) = a.code(&["rollback", "p", "1"]);
    assert_eq!(code, 3, "rollback of a parcel locked elsewhere: {err}");
    mitm.serve(V1, &mitm.captured(V2), 1);
    let (code, err) = b.code(&["rollback", "p", "1"]);
    assert_integrity(code, &err, "rollback to a version served with another version's manifest");
    mitm.pass_through();

    // b rolls back with its own lock (its base moves to the new head), then a without one.
    let out = b.ok(&["rollback", "p", "1"]);
    assert!(out.contains("version 3"), "{out}");
    assert_eq!(b.stat("p")["base_version"], 3);
    b.ok(&["checkin", "p"]);
    let (code, err, three) = exported(&a, dir.path(), "v3.img", None);
    assert_eq!((code, three == v1_disk), (0, true), "version 3 is version 1's disk: {err}");
    let out = a.ok(&["rollback", "p", "2"]);
    assert!(out.contains("version 4"), "{out}");
    let (code, err, four) = exported(&a, dir.path(), "v4.img", None);
    assert_eq!((code, four == v2_disk), (0, true), "version 4 is version 2's disk: {err}");
    assert!(a.stat("p")["lock"].is_null(), "a rollback without a checkout releases the lock it took");
    let versions = a.ok(&["versions", "p"]);
    assert!(
        versions.contains("rollback to version 1") && versions.contains("rollback to version 2"),
        "{versions}"
    );
    // Every version committed today is bound: an older manifest served for the head is refused by b too,
    // which saw version 3.
    mitm.serve(HEAD, &mitm.captured(V2), 2);
    let (code, err) = b.code(&["checkout", "p"]);
    assert_integrity(code, &err, "checkout of a replayed head by a home that saw version 3");
}
