//! `POST /api/v1/chunks/missing` for 20,000 tags: the scale-out deployment (PostgreSQL metadata, chunks in S3,
//! presence from the chunk index) against the embedded default (SQLite + chunk files), in the same run, and
//! the S3 deployment asking the store per tag (what the server did before the index) as the old figure.
//!
//! `cargo bench -p isr-server --bench missing` (`ISR_BENCH_TAGS` sets the number of tags, default 20,000).
//! In-process servers on loopback, each on its own storage; half the tags are stored (small chunks: the size
//! does not matter to `missing`), in an order that interleaves stored and absent ones. PostgreSQL and
//! SeaweedFS come from `isr_testkit` (`scripts/services.sh`). Each figure is the best of several requests.

mod common;

use bytes::Bytes;
use futures::StreamExt;
use isr_format::{LoginSecret, Tag};
use isr_server::chunks::Chunks;
use isr_server::{AppState, ServerSettings, Storage, StorageConfig};
use isr_store::{MetaStore, PgMetaStore, S3ChunkStore, VerifyingStore};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A chunk (any bytes name themselves by their BLAKE3 tag).
fn chunk(i: u64) -> (Tag, Bytes) {
    let mut v = vec![0u8; 512];
    blake3::Hasher::new().update(b"missing bench").update(&i.to_le_bytes()).finalize_xof().fill(&mut v);
    (Tag::of(&v), Bytes::from(v))
}

async fn serve(storage: Storage, user: &str) -> (String, String) {
    let secret = LoginSecret::random();
    isr_server::admin::add_user(&storage, user, &secret).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = AppState::new(storage, ServerSettings::default());
    tokio::spawn(isr_server::run(listener, state, None, std::future::pending()));
    let r = common::login(&url, user, &secret).await;
    (url, r["token"].as_str().unwrap().to_owned())
}

/// Stores the even-numbered chunks of `0..n` (the server's PUT path, 32 at a time).
async fn seed(chunks: &Chunks, n: u64) {
    futures::stream::iter((0..n).step_by(2))
        .for_each_concurrent(32, |i| async move {
            let (t, b) = chunk(i);
            chunks.put(&t, b).await.unwrap();
        })
        .await;
}

/// The best time of `reps` requests of `missing` for all `n` tags; checks the answer.
async fn time_missing(url: &str, token: &str, n: u64, reps: usize) -> Duration {
    let http = common::client_builder().build().unwrap();
    let body: Vec<u8> = (0..n).flat_map(|i| chunk(i).0 .0).collect();
    let mut best = Duration::MAX;
    for _ in 0..reps {
        let t0 = Instant::now();
        let r = http
            .post(format!("{url}/api/v1/chunks/missing"))
            .bearer_auth(token)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "missing: {}", r.status());
        let answer = r.bytes().await.unwrap();
        best = best.min(t0.elapsed());
        assert_eq!(answer.len() as u64, n / 2 * 32, "the odd-numbered half is missing");
    }
    best
}

fn main() {
    let n: u64 = std::env::var("ISR_BENCH_TAGS").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let reps = if std::env::args().any(|a| a == "--bench") { 5 } else { 2 };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let svc = isr_testkit::services();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let embedded =
            Storage::open(&StorageConfig::data_dir(dir.path().join("data")), isr_server::Deployment::Create)
                .await
                .unwrap();
        let meta: Arc<dyn MetaStore> =
            Arc::new(PgMetaStore::open(&svc.fresh_pg_database().await).await.unwrap());
        let s3 = Arc::new(VerifyingStore::new(
            S3ChunkStore::from_url_with(&svc.fresh_s3_url(), svc.s3_builder()).unwrap(),
        ));
        let scaleout = Storage::from_stores(meta.clone(), Chunks::indexed(s3.clone())).await.unwrap();
        // The same bucket and database, presence asked of S3 per tag (the server before the index).
        let per_tag = Storage::from_stores(meta, Chunks::other(s3)).await.unwrap();

        let t0 = Instant::now();
        seed(&embedded.chunks, n).await;
        let seed_embedded = t0.elapsed();
        let t0 = Instant::now();
        seed(&scaleout.chunks, n).await;
        let seed_s3 = t0.elapsed();

        let (url_e, tok_e) = serve(embedded, "bench").await;
        let (url_s, tok_s) = serve(scaleout, "bench").await;
        let (url_p, tok_p) = serve(per_tag, "bench2").await;
        let e = time_missing(&url_e, &tok_e, n, reps).await;
        let s = time_missing(&url_s, &tok_s, n, reps).await;
        let p = time_missing(&url_p, &tok_p, n, 1).await;
        println!(
            "chunks/missing for {n} tags ({} stored), best of {reps} (per-tag S3: 1 run); seeding {} chunks \
             through the PUT path took {:.1} s embedded, {:.1} s S3",
            n / 2,
            n / 2,
            seed_embedded.as_secs_f64(),
            seed_s3.as_secs_f64()
        );
        println!("| deployment | ms | vs embedded |");
        println!("| --- | ---: | ---: |");
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!("| embedded (SQLite + chunk files) | {:.0} | 1.00 |", ms(e));
        println!("| PostgreSQL + S3, chunk index | {:.0} | {:.2} |", ms(s), ms(s) / ms(e));
        println!("| PostgreSQL + S3, HEAD per tag (before) | {:.0} | {:.2} |", ms(p), ms(p) / ms(e));
    });
}
