//! Chunk GET/PUT throughput of the scale-out deployment (PostgreSQL metadata, chunks in S3) against the
//! embedded default (SQLite + chunk files), and of two servers against one, all in the same run.
//!
//! `cargo bench -p isr-server --bench scaleout` (`ISR_BENCH_SECS` sets the seconds per cell, default 2.5).
//! Every deployment is real `isr-server serve` processes on loopback: the embedded default on a data
//! directory; one and then two servers on one fresh PostgreSQL database and one fresh S3 prefix (SeaweedFS),
//! started by `isr_testkit` (`scripts/services.sh`). The load generator's clients split evenly across a
//! deployment's servers. The peer is the same load sent straight to the S3 service with `object_store`
//! (what isr-server adds on top of the store it fronts). Everything (clients, servers, PostgreSQL, SeaweedFS) shares this machine's cores,
//! so "two servers" measures whether a second process adds throughput here, not what a second machine would.

mod common;

use bytes::Bytes;
use common::{client_builder, measure, Target, Throughput, CHUNK_BYTES};
use isr_format::keys::KdfParams;
use isr_format::{ChunkEncoder, ConvergenceSecret, Tag, UserSecrets};
use isr_store::object_store::{ObjectStoreExt, PutPayload};
use isr_store::S3ChunkStore;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

const N_CHUNKS: usize = 256;
const CONCURRENCY: [usize; 3] = [1, 16, 64];
const USER: &str = "bench";
const PASSWORD: &str = "bench password";

/// `isr-server serve` processes killed when the benchmark ends, however it ends.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Deployment {
    name: &'static str,
    storage_args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Deployment {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_isr-server"));
        c.args(args)
            .args(&self.storage_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("ISR_PASSWORD", PASSWORD)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        c
    }

    fn add_user(&self) {
        let out = self.cmd(&["user", "add", USER]).output().unwrap();
        assert!(out.status.success(), "{}: user add: {}", self.name, String::from_utf8_lossy(&out.stderr));
    }

    /// `n` servers on this deployment's storage; their URLs.
    fn serve(&self, n: usize) -> (Servers, Vec<String>) {
        let mut servers = Servers(Vec::new());
        let mut urls = Vec::new();
        for _ in 0..n {
            let mut child =
                self.cmd(&["serve", "--listen", "127.0.0.1:0"]).stdout(Stdio::piped()).spawn().unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
            servers.0.push(child);
            let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}"));
            urls.push(url.to_owned());
        }
        (servers, urls)
    }
}

async fn login(url: &str) -> (String, ConvergenceSecret) {
    let secret = UserSecrets::derive(USER, PASSWORD, KdfParams::DEFAULT).unwrap().login;
    let r = common::login(url, USER, &secret).await;
    let cs = ConvergenceSecret::from_hex(r["convergence_secret"].as_str().unwrap()).unwrap();
    (r["token"].as_str().unwrap().to_owned(), cs)
}

/// Uploads `N_CHUNKS` encoded 128 KiB chunks of incompressible data through the API (what GETs read).
async fn seed(url: &str, token: &str, cs: ConvergenceSecret) -> Vec<Tag> {
    let http = client_builder().build().unwrap();
    let mut enc = ChunkEncoder::new(cs);
    let mut tags = Vec::new();
    for i in 0..N_CHUNKS as u64 {
        let mut plain = vec![0u8; CHUNK_BYTES];
        blake3::Hasher::new().update(&i.to_le_bytes()).finalize_xof().fill(&mut plain);
        let e = enc.encode(&plain).unwrap().unwrap();
        let r = http
            .put(format!("{url}/api/v1/chunks/{}", e.tag))
            .bearer_auth(token)
            .body(Bytes::from(e.stored))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "seeding: {}", r.status());
        tags.push(e.tag);
    }
    tags
}

/// GET and PUT throughput of `servers` for every concurrency: `[(get, put)]`.
fn run(
    rt: &tokio::runtime::Runtime,
    name: &'static str,
    urls: &[String],
    secs: f64,
    base: &Arc<Vec<u8>>,
) -> Vec<(Throughput, Throughput)> {
    let (token, cs) = rt.block_on(login(&urls[0]));
    let tags = Arc::new(rt.block_on(seed(&urls[0], &token, cs)));
    let target = Arc::new(Target {
        name,
        bases: urls.to_vec(),
        get_path: Box::new(|t| format!("/api/v1/chunks/{t}")),
        put_path: Box::new(|t| format!("/api/v1/chunks/{t}")),
        token: Some(token),
    });
    CONCURRENCY
        .iter()
        .map(|&c| {
            let get = rt.block_on(measure(target.clone(), false, c, secs, tags.clone(), base.clone()));
            let put = rt.block_on(measure(target.clone(), true, c, secs, tags.clone(), base.clone()));
            (get, put)
        })
        .collect()
}

/// The peer: the same GETs and PUTs straight to the S3 service with `object_store` (no isr-server in front),
/// on the same chunk keys.
async fn measure_direct(
    s3: Arc<S3ChunkStore>,
    put: bool,
    clients: usize,
    secs: f64,
    tags: Arc<Vec<Tag>>,
    base: Arc<Vec<u8>>,
) -> Throughput {
    common::drive(clients, secs, move |i, k| {
        let (s3, tags, base) = (s3.clone(), tags.clone(), base.clone());
        async move {
            let store = s3.object_store();
            if put {
                let (tag, body) = common::next_fresh_chunk(&base);
                let n = body.len();
                store.put(&s3.key_of(&tag), PutPayload::from_bytes(body)).await.unwrap();
                n
            } else {
                let key = s3.key_of(common::pick(&tags, i, k));
                store.get(&key).await.unwrap().bytes().await.unwrap().len()
            }
        }
    })
    .await
}

fn main() {
    // `cargo bench` passes --bench; run by hand without it, do a short smoke run.
    let secs: f64 = std::env::var("ISR_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if std::env::args().any(|a| a == "--bench") { 2.5 } else { 0.3 });
    let svc = isr_testkit::services();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut base = vec![0u8; CHUNK_BYTES + 28];
    blake3::Hasher::new().update(b"put").finalize_xof().fill(&mut base);
    let base = Arc::new(base);

    let embedded = Deployment {
        name: "embedded",
        storage_args: vec!["--data".into(), dir.path().join("data").display().to_string()],
        env: Vec::new(),
    };
    let scaleout = Deployment {
        name: "postgres+s3",
        storage_args: vec![
            "--database".into(),
            rt.block_on(svc.fresh_pg_database()),
            "--chunks".into(),
            svc.fresh_s3_url(),
        ],
        env: svc.env().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
    };
    embedded.add_user();
    scaleout.add_user();

    let results_embedded = {
        let (_servers, urls) = embedded.serve(1);
        run(&rt, "embedded", &urls, secs, &base)
    };
    let results_one = {
        let (_servers, urls) = scaleout.serve(1);
        run(&rt, "s3 x1", &urls, secs, &base)
    };
    let results_two = {
        let (_servers, urls) = scaleout.serve(2);
        run(&rt, "s3 x2", &urls, secs, &base)
    };

    let results_direct: Vec<(Throughput, Throughput)> = {
        let s3 = Arc::new(S3ChunkStore::from_url_with(&svc.fresh_s3_url(), svc.s3_builder()).unwrap());
        let tags: Vec<Tag> = rt.block_on(async {
            let mut tags = Vec::new();
            for i in 0..N_CHUNKS as u64 {
                let (tag, body) = common::fresh_chunk(&base, i);
                s3.object_store().put(&s3.key_of(&tag), PutPayload::from_bytes(body)).await.unwrap();
                tags.push(tag);
            }
            tags
        });
        let tags = Arc::new(tags);
        CONCURRENCY
            .iter()
            .map(|&c| {
                let get = rt.block_on(measure_direct(s3.clone(), false, c, secs, tags.clone(), base.clone()));
                let put = rt.block_on(measure_direct(s3.clone(), true, c, secs, tags.clone(), base.clone()));
                (get, put)
            })
            .collect()
    };
    println!(
        "chunk GET/PUT over loopback, 128 KiB incompressible chunks, {secs} s per cell; embedded = SQLite + \
         chunk files, S3 = PostgreSQL + SeaweedFS; MB/s of chunk bytes"
    );
    println!(
        "| op | clients | embedded | S3, 1 server | S3, 2 servers | S3 direct (peer) | S3/embedded | 2 servers/1 \
         | S3 via isr/direct |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (op, pick) in [("GET", 0usize), ("PUT", 1)] {
        for (i, c) in CONCURRENCY.iter().enumerate() {
            let sel = |r: &(Throughput, Throughput)| if pick == 0 { r.0 } else { r.1 };
            let (e, one, two, direct) = (
                sel(&results_embedded[i]),
                sel(&results_one[i]),
                sel(&results_two[i]),
                sel(&results_direct[i]),
            );
            println!(
                "| {op} | {c} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
                e.mbps,
                one.mbps,
                two.mbps,
                direct.mbps,
                one.mbps / e.mbps,
                two.mbps / one.mbps,
                one.mbps / direct.mbps
            );
        }
    }
}
