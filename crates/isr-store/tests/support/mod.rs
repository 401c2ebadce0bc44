//! Test support: real PostgreSQL and S3 services, chunk and keyring builders, chunk-store adapters.
//!
//! Services: with `ISR_TEST_PG_URL` and `ISR_TEST_S3_URL` set (plus the usual `AWS_*` variables) the tests use
//! those; otherwise the first test that needs them runs `scripts/services.sh start` in a fresh temp dir (once per
//! test binary) and the script's watcher stops the services and removes the dir when this process exits. A
//! failure to start them fails the tests with the script's log: nothing is skipped.

#![allow(dead_code)]

use async_trait::async_trait;
use bytes::Bytes;
use isr_format::{
    ChunkEncoder, ChunkIndex, ChunkKey, ChunkSize, ConvergenceSecret, ImageLen, Keyring, Keyroot, Tag,
};
use isr_store::meta::{ChunkPresence, ChunkSweeper, MetaError};
use isr_store::{ChunkStore, PgMetaStore, S3ChunkStore};
use object_store::aws::AmazonS3Builder;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Services {
    pub pg_url: String,
    pub s3_url: String,
    /// `AWS_*` settings for the S3 client; `None` = take them from this process's environment.
    aws: Option<Vec<(String, String)>>,
}

static SERVICES: OnceLock<Result<Services, String>> = OnceLock::new();

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn start_services() -> Result<Services, String> {
    if let (Ok(pg_url), Ok(s3_url)) = (std::env::var("ISR_TEST_PG_URL"), std::env::var("ISR_TEST_S3_URL")) {
        return Ok(Services { pg_url, s3_url, aws: None });
    }
    let dir = tempfile::Builder::new()
        .prefix("isr-services-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?
        .keep();
    let log_path = dir.join("start.log");
    let log = std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let script = repo_root().join("scripts/services.sh");
    let t0 = Instant::now();
    // Output to a file, not a pipe: the servers it starts outlive it and must not hold our pipes open.
    let status = Command::new("bash")
        .arg(&script)
        .arg("start")
        .arg(&dir)
        .env("ISR_SERVICES_WATCH_PID", std::process::id().to_string())
        .env("ISR_SERVICES_REMOVE_DIR", "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let out = std::fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "PostgreSQL/S3 test services failed to start ({} start {} exited {status}); set ISR_TEST_PG_URL and \
             ISR_TEST_S3_URL to use running ones. Log:\n{out}",
            script.display(),
            dir.display()
        ));
    }
    eprintln!("test services started in {:.1}s: {}", t0.elapsed().as_secs_f64(), out.trim());
    let env = std::fs::read_to_string(dir.join("env")).map_err(|e| format!("services env: {e}"))?;
    let vars: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    Ok(Services {
        pg_url: get("ISR_TEST_PG_URL").ok_or("no ISR_TEST_PG_URL in env file")?,
        s3_url: get("ISR_TEST_S3_URL").ok_or("no ISR_TEST_S3_URL in env file")?,
        aws: Some(vars.iter().filter(|(k, _)| k.starts_with("AWS_")).cloned().collect()),
    })
}

/// The services, started on first use.
pub fn services() -> &'static Services {
    match SERVICES.get_or_init(start_services) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(isr_format::random_bytes::<6>()))
}

/// A chunk store in a fresh prefix of the test bucket.
pub fn s3_store() -> S3ChunkStore {
    let s = services();
    let url = format!("{}/{}", s.s3_url.trim_end_matches('/'), unique("t"));
    let builder = match &s.aws {
        None => AmazonS3Builder::from_env(),
        Some(vars) => {
            vars.iter().fold(AmazonS3Builder::new(), |b, (k, v)| match k.to_ascii_lowercase().parse() {
                Ok(key) => b.with_config(key, v),
                Err(_) => b,
            })
        }
    };
    S3ChunkStore::from_url_with(&url, builder).expect("s3 store")
}

/// A fresh database on the test server; returns its URL.
pub async fn pg_database() -> String {
    let base = &services().pg_url;
    let (client, conn) =
        tokio_postgres::connect(base, tokio_postgres::NoTls).await.expect("connect to test PostgreSQL");
    tokio::spawn(conn);
    let name = unique("isr_t_");
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create test database");
    let (head, _) = base.split_once('?').unwrap_or((base, ""));
    let (server, _) = head.rsplit_once('/').expect("URL with a database");
    format!("{server}/{name}")
}

pub async fn pg_store() -> (PgMetaStore, String) {
    let url = pg_database().await;
    (PgMetaStore::open(&url).await.expect("open PgMetaStore"), url)
}

/// A real encoded chunk (for stores that verify tags).
pub fn encoded_chunk(seed: u64) -> (Tag, Bytes) {
    let mut data = vec![0u8; 4096];
    data[..8].copy_from_slice(&seed.to_le_bytes());
    data[100] = 1;
    let e = ChunkEncoder::new(ConvergenceSecret([7; 32])).encode(&data).unwrap().expect("non-zero chunk");
    (e.tag, Bytes::from(e.stored))
}

/// Cheap fake chunk bytes and their tag (for metadata tests: only the tag matters).
pub fn fake_chunk() -> (Tag, Bytes) {
    let data = Bytes::from(isr_format::random_bytes::<48>().to_vec());
    (Tag::of(&data), data)
}

/// A sealed keyring naming `tags` (plus one all-zero chunk) and its hash.
pub fn keyring(tags: &[Tag]) -> (Tag, Bytes) {
    let cs = ChunkSize::new(4096).unwrap();
    let n = tags.len() as u64 + 1;
    let mut k = Keyring::new(cs, ImageLen(n * 4096)).unwrap();
    for (i, t) in tags.iter().enumerate() {
        k.set(ChunkIndex(i as u64), Some((*t, ChunkKey([1; 32]))));
    }
    let bytes = Bytes::from(k.seal(&Keyroot::random()));
    (Tag::of(&bytes), bytes)
}

/// Which chunks a store lacks (a commit's check).
pub struct Presence<'a> {
    pub store: &'a dyn ChunkStore,
    /// Sleep after the check, widening the window between check and insert (race tests).
    pub delay: Duration,
}

#[async_trait]
impl ChunkPresence for Presence<'_> {
    async fn missing(&self, tags: Vec<Tag>) -> Result<Vec<Tag>, MetaError> {
        let mut out = Vec::new();
        for t in tags {
            if !self.store.contains(&t).await? {
                out.push(t);
            }
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(out)
    }
}

pub struct Sweeper<'a>(pub &'a dyn ChunkStore);

#[async_trait]
impl ChunkSweeper for Sweeper<'_> {
    async fn delete(&self, tags: Vec<Tag>) -> Result<(), MetaError> {
        for t in tags {
            self.0.delete(&t).await?;
        }
        Ok(())
    }
}

pub fn arc<S: ChunkStore>(s: S) -> Arc<dyn ChunkStore> {
    Arc::new(s)
}
