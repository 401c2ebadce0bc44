//! Support for tests and benchmarks of the scale-out backends: a real PostgreSQL and a real S3-compatible
//! store (SeaweedFS), started by `scripts/services.sh` (nothing is mocked).
//!
//! With `ISR_TEST_PG_URL` and `ISR_TEST_S3_URL` set (plus the usual `AWS_*` variables) those services are
//! used; otherwise the first caller of [`services`] runs `scripts/services.sh start` in a fresh temp dir, once
//! per process, and the script's watcher stops the services and removes the dir when this process exits. A
//! failure to start them panics with the script's log: a test that needs them fails, it is never skipped.

use object_store::aws::AmazonS3Builder;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

/// Where the running services are.
#[derive(Debug)]
pub struct Services {
    /// `postgres://postgres@127.0.0.1:PORT/isr`: a database every process may share.
    pub pg_url: String,
    /// `s3://BUCKET/PREFIX`.
    pub s3_url: String,
    /// `AWS_*` settings (endpoint, region, keys) of the S3 service.
    pub aws: Vec<(String, String)>,
}

static SERVICES: OnceLock<Result<Services, String>> = OnceLock::new();

/// The repository's root (this crate is `crates/isr-testkit`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn start_services() -> Result<Services, String> {
    if let (Ok(pg_url), Ok(s3_url)) = (std::env::var("ISR_TEST_PG_URL"), std::env::var("ISR_TEST_S3_URL")) {
        let aws = std::env::vars().filter(|(k, _)| k.starts_with("AWS_")).collect();
        return Ok(Services { pg_url, s3_url, aws });
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
        .map(|(k, v)| (k.to_owned(), v.trim_matches(['"', '\'']).to_owned()))
        .collect();
    let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    Ok(Services {
        pg_url: get("ISR_TEST_PG_URL").ok_or("no ISR_TEST_PG_URL in env file")?,
        s3_url: get("ISR_TEST_S3_URL").ok_or("no ISR_TEST_S3_URL in env file")?,
        aws: vars.iter().filter(|(k, _)| k.starts_with("AWS_")).cloned().collect(),
    })
}

/// The services, started on first use (panics with the start log when they cannot start).
pub fn services() -> &'static Services {
    match SERVICES.get_or_init(start_services) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

/// `prefix` followed by 12 random hex digits: names that never collide between tests or runs.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(isr_format::random_bytes::<6>()))
}

impl Services {
    /// A fresh, empty prefix of the test bucket: `s3://BUCKET/PREFIX/tXXXX`.
    pub fn fresh_s3_url(&self) -> String {
        format!("{}/{}", self.s3_url.trim_end_matches('/'), unique("t"))
    }

    /// An S3 client configuration for the service (the bucket is set by the caller).
    pub fn s3_builder(&self) -> AmazonS3Builder {
        self.aws.iter().fold(AmazonS3Builder::new(), |b, (k, v)| match k.to_ascii_lowercase().parse() {
            Ok(key) => b.with_config(key, v),
            Err(_) => b,
        })
    }

    /// A fresh database on the test PostgreSQL; returns its URL.
    pub async fn fresh_pg_database(&self) -> String {
        let base = &self.pg_url;
        let (client, conn) =
            tokio_postgres::connect(base, tokio_postgres::NoTls).await.expect("connect to test PostgreSQL");
        tokio::spawn(conn);
        let name = unique("isr_t_");
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create test database");
        let (head, _) = base.split_once('?').unwrap_or((base, ""));
        let (server, _) = head.rsplit_once('/').expect("URL with a database");
        format!("{server}/{name}")
    }

    /// Environment for a child process (an `isr-server` binary) that uses these services.
    pub fn env(&self) -> impl Iterator<Item = (&str, &str)> {
        self.aws.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}
