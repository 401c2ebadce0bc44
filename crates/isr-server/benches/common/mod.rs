//! Shared by the chunk-throughput benchmarks: the load generator (HTTP/1.1 keep-alive clients that GET
//! stored chunks or PUT fresh ones for a fixed time) and what it needs.
#![allow(dead_code)]

use bytes::Bytes;
use isr_format::Tag;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const CHUNK_BYTES: usize = 128 * 1024;

/// Where the load goes: one or more servers (client `i` talks to `bases[i % bases.len()]`).
pub struct Target {
    pub name: &'static str,
    pub bases: Vec<String>,
    pub get_path: Box<dyn Fn(&Tag) -> String + Send + Sync>,
    pub put_path: Box<dyn Fn(&Tag) -> String + Send + Sync>,
    pub token: Option<String>,
}

#[derive(Clone, Copy, Default)]
pub struct Throughput {
    pub rps: f64,
    pub mbps: f64,
    /// Seconds measured.
    pub secs: f64,
}

/// reqwest is built without a default crypto provider: hand it a ring config (unused for plain HTTP).
pub fn client_builder() -> reqwest::ClientBuilder {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder().use_preconfigured_tls(cfg)
}

/// A distinct stored chunk (any bytes name themselves by their BLAKE3 tag) for PUT runs.
pub fn fresh_chunk(base: &[u8], n: u64) -> (Tag, Bytes) {
    let mut v = base.to_vec();
    v[..8].copy_from_slice(&n.to_le_bytes());
    v[8..16].copy_from_slice(&std::process::id().to_le_bytes().repeat(2));
    (Tag::of(&v), Bytes::from(v))
}

/// POST /api/v1/login; the answer (token, convergence secret, ...).
pub async fn login(url: &str, user: &str, secret: &isr_format::LoginSecret) -> serde_json::Value {
    let http = client_builder().build().unwrap();
    http.post(format!("{url}/api/v1/login"))
        .json(&serde_json::json!({"user": user, "login_secret": secret.to_hex()}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Runs `clients` loops of `op(client, k)` for `secs` seconds (`k` counts each client's requests); `op`
/// returns the bytes it moved.
pub async fn drive<F, Fut>(clients: usize, secs: f64, op: F) -> Throughput
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = usize> + Send,
{
    let requests = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (op, requests, bytes) = (op.clone(), requests.clone(), bytes.clone());
            tokio::spawn(async move {
                let mut k = 0;
                while Instant::now() < end {
                    let n = op(i, k).await;
                    k += 1;
                    requests.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    Throughput {
        rps: requests.load(Ordering::Relaxed) as f64 / secs,
        mbps: bytes.load(Ordering::Relaxed) as f64 / secs / 1e6,
        secs,
    }
}

/// The tag client `i` GETs on its `k`-th request: clients stride through the stored chunks.
pub fn pick(tags: &[Tag], i: usize, k: usize) -> &Tag {
    &tags[(i + 7 * k) % tags.len()]
}

static SEQ: AtomicU64 = AtomicU64::new(1 << 32);

/// A PUT body never sent before in this process.
pub fn next_fresh_chunk(base: &[u8]) -> (Tag, Bytes) {
    fresh_chunk(base, SEQ.fetch_add(1, Ordering::Relaxed))
}

/// The number of the next [`next_fresh_chunk`]: the chunks of a run are `fresh_chunk(base, n)` for `n` from
/// the value before it to the value after it.
pub fn fresh_seq() -> u64 {
    SEQ.load(Ordering::Relaxed)
}

/// GETs of `tags` or PUTs of fresh chunks against `target` over HTTP/1.1 keep-alive connections.
pub async fn measure(
    target: Arc<Target>,
    put: bool,
    clients: usize,
    secs: f64,
    tags: Arc<Vec<Tag>>,
    base: Arc<Vec<u8>>,
) -> Throughput {
    let http = client_builder().pool_max_idle_per_host(clients).http1_only().build().unwrap();
    // Warm the connections up.
    let warm = futures::future::join_all((0..clients).map(|i| {
        let (http, target, tags) = (http.clone(), target.clone(), tags.clone());
        async move {
            let base = &target.bases[i % target.bases.len()];
            let url = format!("{base}{}", (target.get_path)(&tags[i % tags.len()]));
            let mut rb = http.get(url);
            if let Some(t) = &target.token {
                rb = rb.bearer_auth(t);
            }
            rb.send().await.unwrap().bytes().await.unwrap();
        }
    }));
    warm.await;
    drive(clients, secs, move |i, k| {
        let (http, target, tags, base) = (http.clone(), target.clone(), tags.clone(), base.clone());
        async move {
            let base_url = &target.bases[i % target.bases.len()];
            let (rb, n) = if put {
                let (tag, body) = next_fresh_chunk(&base);
                let n = body.len();
                (http.put(format!("{base_url}{}", (target.put_path)(&tag))).body(body), n)
            } else {
                (http.get(format!("{base_url}{}", (target.get_path)(pick(&tags, i, k)))), 0)
            };
            let rb = match &target.token {
                Some(t) => rb.bearer_auth(t),
                None => rb,
            };
            let r = rb.send().await.expect("request failed");
            let status = r.status();
            let body = r.bytes().await.expect("reading the answer");
            assert!(status.is_success(), "{} {status}", target.name);
            if put {
                n
            } else {
                body.len()
            }
        }
    })
    .await
}
