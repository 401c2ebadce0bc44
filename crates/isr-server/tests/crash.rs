//! The real `isr-server` binary: SIGKILL in the middle of a check-in, restart, check, finish the check-in;
//! graceful SIGTERM; exit codes of `check`.

mod common;

use common::{version, Api};
use isr_format::keys::KdfParams;
use isr_format::{Tag, UserSecrets};
use reqwest::StatusCode;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_isr-server");

fn admin(data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("ISR_DATA", data)
        .env("ISR_PASSWORD", "correct horse")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// Starts `serve` on a free port; returns the child and its URL (from the one line it prints).
fn serve(data: &Path) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url =
        line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert!(!url.ends_with(":0"));
    (child, url.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_checkin_leaves_the_head_and_the_retry_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let out = admin(data, &["user", "add", "alice"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = admin(data, &["user", "list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).starts_with("alice\t"));
    let secret = UserSecrets::derive("alice", "correct horse", KdfParams::DEFAULT).unwrap().login;

    let (mut server, url) = serve(data);
    let mut api = Api::new(&url);
    api.login("alice", &secret).await;
    let lock = api.create("p", "laptop").await;
    let v1 = version(1, 8, 0);
    assert_eq!(api.upload_version("p", &lock, 0, &v1).await, 1);

    // Check-in of version 2: keyring, then chunks; the server dies part-way through the chunks.
    let v2 = version(2, 600, 0);
    assert_eq!(api.put_keyring("p", &v2).await.status, StatusCode::CREATED);
    let needed = api.missing(&v2.tags()).await;
    assert_eq!(needed.len(), v2.chunks.len());
    let (confirmed_part, rest) = needed.split_at(needed.len() / 3);
    for t in confirmed_part {
        let c = &v2.chunks.iter().find(|(x, _)| x == t).unwrap().1;
        assert_eq!(api.put_chunk(t, c).await.status, StatusCode::CREATED);
    }
    // The rest in flight, 8 at a time, while the server is killed.
    let confirmed = std::sync::Arc::new(std::sync::Mutex::new(confirmed_part.to_vec()));
    let uploads = {
        let (api, rest, v2, confirmed) = (api.clone(), rest.to_vec(), v2.clone(), confirmed.clone());
        tokio::spawn(async move {
            use futures::StreamExt;
            futures::stream::iter(rest)
                .for_each_concurrent(8, |t| {
                    let (api, v2, confirmed) = (api.clone(), v2.clone(), confirmed.clone());
                    async move {
                        let c = v2.chunks.iter().find(|(x, _)| *x == t).unwrap().1.clone();
                        let r = api
                            .http
                            .put(format!("{}/api/v1/chunks/{t}", api.url))
                            .bearer_auth(api.token.as_ref().unwrap())
                            .body(c)
                            .send()
                            .await;
                        if r.is_ok_and(|r| r.status() == StatusCode::CREATED) {
                            confirmed.lock().unwrap().push(t);
                        }
                    }
                })
                .await;
        })
    };
    tokio::time::sleep(Duration::from_millis(40)).await;
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();
    uploads.await.unwrap();
    let confirmed = confirmed.lock().unwrap().clone();
    assert!(confirmed.len() < needed.len(), "the server was killed too late to test anything");

    // After the crash: metadata intact, head unchanged, every referenced chunk present.
    let out = admin(data, &["check", "--full"]);
    assert!(out.status.success(), "check after crash: {}", String::from_utf8_lossy(&out.stdout));
    let (mut server, url) = serve(data);
    api.url = url;
    let p = api.get("/api/v1/parcels/p").await.json();
    assert_eq!(p["head"], 1);
    assert_eq!(p["lock"]["holder"], "host-laptop");
    // The token survived too (it lives in the database). chunks/missing reports exactly what did not arrive:
    // never the confirmed uploads, always those never sent; the ones in flight may have landed or not.
    let missing = api.missing(&v2.tags()).await;
    for t in &confirmed {
        assert!(!missing.contains(t), "confirmed chunk {t} reported missing");
    }
    assert!(!missing.is_empty());
    assert!(missing.len() <= needed.len() - confirmed.len());
    // Retry: upload only what is missing, commit.
    let before = isr_server_bytes_in(&api).await;
    for t in &missing {
        let c = &v2.chunks.iter().find(|(x, _)| x == t).unwrap().1;
        assert_eq!(api.put_chunk(t, c).await.status, StatusCode::CREATED);
    }
    let a = api.commit("p", &lock, 1, &v2).await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    assert_eq!(a.json()["version"], 2);
    let sent: u64 =
        missing.iter().map(|t| v2.chunks.iter().find(|(x, _)| x == t).unwrap().1.len() as u64).sum();
    assert!(isr_server_bytes_in(&api).await - before >= sent);
    let m = api.get("/api/v1/parcels/p/versions/head/manifest").await;
    assert_eq!(&m.body[..], &v2.manifest[..]);

    // Graceful stop on SIGTERM: exit 0.
    assert!(Command::new("kill").arg("-TERM").arg(server.id().to_string()).status().unwrap().success());
    let status = server.wait().unwrap();
    assert_eq!(status.code(), Some(0));

    // check: all good, then a missing and a corrupt chunk make it exit 5 naming them.
    assert!(admin(data, &["check"]).status.success());
    let parcels = String::from_utf8(admin(data, &["parcel", "list"]).stdout).unwrap();
    assert!(parcels.contains("alice") && parcels.contains("host-laptop"), "{parcels}");
    let path_of = |t: &Tag| data.join("chunks").join(&t.to_hex()[..2]).join(t.to_hex());
    let gone = v2.chunks[0].0;
    std::fs::remove_file(path_of(&gone)).unwrap();
    let out = admin(data, &["check"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&gone.to_hex()));
    let bad = v2.chunks[1].0;
    let mut bytes = std::fs::read(path_of(&bad)).unwrap();
    bytes[40] ^= 1;
    std::fs::write(path_of(&bad), bytes).unwrap();
    assert!(admin(data, &["check"]).status.code() == Some(5));
    let out = admin(data, &["check", "--full"]);
    assert_eq!(out.status.code(), Some(5));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("corrupt chunk {bad}")), "{text}");

    // Admin commands: unlock, prune, usage errors, unsupported backends.
    assert!(admin(data, &["unlock", "alice/p"]).status.success());
    assert!(!String::from_utf8(admin(data, &["parcel", "list", "alice"]).stdout)
        .unwrap()
        .contains("host-laptop"));
    assert!(admin(data, &["prune", "alice/p", "--keep", "1"]).status.success());
    assert_eq!(admin(data, &["prune", "alice/p", "--keep", "0"]).status.code(), Some(2));
    assert_eq!(admin(data, &["prune", "nobody", "--keep", "1"]).status.code(), Some(2));
    assert_eq!(admin(data, &["frobnicate"]).status.code(), Some(2));
    let out = admin(data, &["gc", "--database", "postgres://isr@127.0.0.1:9/isr", "--chunks", "s3://b/p"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("database"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = admin(data, &["gc", "--grace", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

async fn isr_server_bytes_in(api: &Api) -> u64 {
    let m = String::from_utf8(api.get("/metrics").await.body.to_vec()).unwrap();
    m.lines().find_map(|l| l.strip_prefix("isr_bytes_in_total ")).unwrap().parse().unwrap()
}
