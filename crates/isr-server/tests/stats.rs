//! Usage figures after known check-ins: two parcels of two users sharing a chunk, one parcel with two
//! versions sharing chunks with each other; `isr-server stats --json` and the gauges of `serve`'s /metrics.

mod common;

use common::{version, Api, TestServer, Version};
use isr_format::Tag;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_isr-server");

async fn commit_all(api: &Api, parcel: &str, vs: &[&Version]) {
    let lock = api.create(parcel, &format!("client-{parcel}")).await;
    for (i, v) in vs.iter().enumerate() {
        api.upload_version(parcel, &lock, i as u64, v).await;
    }
}

fn sizes(vs: &[&Version]) -> HashMap<Tag, u64> {
    vs.iter().flat_map(|v| v.chunks.iter().map(|(t, c)| (*t, c.len() as u64))).collect()
}

fn metrics(url: &str) -> String {
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn figures_after_known_checkins_of_two_parcels_sharing_chunks() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    // alice/p: two versions of 4 stored chunks each: chunks 0 and 1 common to both (and chunk 0 to every
    // seed), 2 and 3 their own. bob/q: one version of 3 stored chunks, chunk 0 the one shared with alice.
    let (a1, a2, b1) = (version(1, 5, 2), version(2, 5, 2), version(3, 4, 1));
    commit_all(&alice, "p", &[&a1, &a2]).await;
    commit_all(&bob, "q", &[&b1]).await;
    let size = sizes(&[&a1, &a2, &b1]);
    let bytes = |tags: &[Tag]| tags.iter().map(|t| size[t]).sum::<u64>();
    let (a1t, a2t, b1t) = (a1.tags(), a2.tags(), b1.tags());
    assert_eq!(a1t[0], b1t[0], "the fixture shares chunk 0");
    assert_eq!(a1t[..2], a2t[..2]);

    let out = Command::new(BIN).args(["stats", "--json", "--data"]).arg(s.dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let parcels = r["parcels"].as_array().unwrap();
    assert_eq!(parcels.len(), 2, "{r}");
    let p = &parcels[0];
    assert_eq!((p["user"].as_str(), p["parcel"].as_str()), (Some("alice"), Some("p")));
    assert_eq!(p["versions"], 2);
    // Check-in bytes: version 1 added all its chunks, version 2 only its own two.
    let (v1_added, v2_added) = (bytes(&a1t), bytes(&a2t[2..]));
    assert!(v2_added < v1_added);
    assert_eq!(p["checkins_measured"], 2);
    assert_eq!(p["checkin_bytes_p50"], v2_added);
    assert_eq!(p["checkin_bytes_p95"], v1_added);
    assert!((p["checkins_per_day"].as_f64().unwrap() - 2.0 / 30.0).abs() < 1e-9, "{p}");
    // Unique: chunk 1 and each version's own chunks; shared with bob: chunk 0.
    let unique = bytes(&a1t[1..]) + bytes(&a2t[2..]);
    assert_eq!(p["unique_bytes"], unique);
    assert_eq!(p["shared_bytes"], bytes(&a1t[..1]));
    let logical = bytes(&a1t) + bytes(&a2t);
    assert_eq!(p["logical_bytes"], logical);
    let dedup = logical as f64 / (unique + bytes(&a1t[..1])) as f64;
    assert!((p["dedup_ratio"].as_f64().unwrap() - dedup).abs() < 1e-9, "{p}");
    assert!(dedup > 1.0);
    let q = &parcels[1];
    assert_eq!((q["user"].as_str(), q["versions"].as_u64()), (Some("bob"), Some(1)));
    assert_eq!(q["checkin_bytes_p50"], bytes(&b1t));
    assert_eq!(q["unique_bytes"], bytes(&b1t[1..]));
    assert_eq!(q["shared_bytes"], bytes(&b1t[..1]));
    assert_eq!(q["dedup_ratio"], 1.0);
    // The deployment: every distinct chunk once.
    let distinct: std::collections::HashSet<Tag> = a1t.iter().chain(&a2t).chain(&b1t).copied().collect();
    assert_eq!(r["referenced_chunks"], distinct.len());
    assert_eq!(r["referenced_bytes"], distinct.iter().map(|t| size[t]).sum::<u64>());

    // One user, one parcel; unknown ones fail.
    let out = Command::new(BIN).args(["stats", "bob/q", "--data"]).arg(s.dir.path()).output().unwrap();
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("bob") && !table.contains("alice"), "{table}");
    for target in ["carol", "bob/nothing"] {
        let out = Command::new(BIN).args(["stats", target, "--data"]).arg(s.dir.path()).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{target}");
    }

    // The same figures as gauges on serve's /metrics, next to the existing counters.
    let mut serve = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(s.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(serve.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap().to_owned();
    let end = Instant::now() + Duration::from_secs(120);
    let body = loop {
        let body = metrics(&url);
        if body.contains("isr_parcel_versions{") {
            break body;
        }
        assert!(Instant::now() < end, "no usage gauges on /metrics after 2 minutes:\n{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = serve.kill();
    let _ = serve.wait();
    for want in [
        "isr_parcel_versions{user=\"alice\",parcel=\"p\"} 2".to_owned(),
        format!("isr_parcel_checkin_bytes{{user=\"alice\",parcel=\"p\",quantile=\"0.5\"}} {v2_added}"),
        format!("isr_parcel_checkin_bytes{{user=\"alice\",parcel=\"p\",quantile=\"0.95\"}} {v1_added}"),
        format!("isr_parcel_unique_bytes{{user=\"alice\",parcel=\"p\"}} {unique}"),
        format!("isr_parcel_shared_bytes{{user=\"bob\",parcel=\"q\"}} {}", bytes(&b1t[..1])),
        "# TYPE isr_http_requests_total counter".to_owned(),
        "isr_chunks_stored ".to_owned(),
    ] {
        assert!(body.contains(&want), "{want:?} not in /metrics:\n{body}");
    }
    s.stop().await;
}
