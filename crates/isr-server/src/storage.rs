//! Opening the metadata and chunk stores from the storage options every subcommand takes.

use crate::chunks::Chunks;
use crate::error::ServerError;
use isr_format::ConvergenceSecret;
use isr_store::{
    Durability, FsChunkStore, MetaError, MetaStore, PgMetaStore, S3ChunkStore, SqliteMetaStore,
    VerifyingStore,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the stores are: `data` alone is the embedded default (`DATA/meta.sqlite`, `DATA/chunks/`);
/// `database` / `chunks` override either part.
#[derive(Clone, Debug, Default)]
pub struct StorageConfig {
    pub data: Option<PathBuf>,
    /// `sqlite:PATH`, `sqlite://PATH`, a plain path, or `postgres://USER@HOST:PORT/DB` (shared by several
    /// server processes).
    pub database: Option<String>,
    /// `file:PATH`, `file://PATH`, a plain path, or `s3://BUCKET/PREFIX` (endpoint, region and keys from the
    /// usual `AWS_*` variables).
    pub chunks: Option<String>,
}

impl StorageConfig {
    pub fn data_dir(dir: impl Into<PathBuf>) -> Self {
        StorageConfig { data: Some(dir.into()), ..Default::default() }
    }
}

/// Whether opening may create a deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deployment {
    /// `user add`: create the data directory, database and chunk store if there are none.
    Create,
    /// Everything else: refuse storage that holds no deployment (a mistyped `--data` must not silently
    /// become an empty server).
    MustExist,
}

/// The setting every deployment has from its first open on.
const CONVERGENCE_SECRET: &str = "convergence_secret";

/// The opened stores, shared by every request.
#[derive(Clone, Debug)]
pub struct Storage {
    pub meta: Arc<dyn MetaStore>,
    pub chunks: Chunks,
    /// The deployment's convergence secret (created on first open).
    pub convergence_secret: ConvergenceSecret,
}

fn strip_scheme<'a>(url: &'a str, scheme: &str) -> Option<&'a str> {
    let rest = url.strip_prefix(scheme)?.strip_prefix(':')?;
    Some(rest.strip_prefix("//").unwrap_or(rest))
}

/// A directory of the server's own, private to its owner (0700, set explicitly).
fn private_dir(dir: &Path) -> Result<(), ServerError> {
    Ok(isr_store::chunk::create_private_dir(dir)?)
}

fn no_deployment(what: String) -> ServerError {
    ServerError::NoDeployment(format!(
        "{what}: no isr deployment there. `isr-server user add NAME` with the same storage options creates one"
    ))
}

impl Storage {
    /// Opens the stores `cfg` names; with [`Deployment::MustExist`], refuses storage that holds no
    /// deployment (no database file, no chunk directory, or a database never initialised) without creating
    /// anything there.
    pub async fn open(cfg: &StorageConfig, mode: Deployment) -> Result<Storage, ServerError> {
        if cfg.data.is_none() && (cfg.database.is_none() || cfg.chunks.is_none()) {
            return Err(ServerError::Config(
                "no storage given: use --data DIR (or $ISR_DATA), or both --database and --chunks".into(),
            ));
        }
        let create = mode == Deployment::Create;
        if let Some(d) = &cfg.data {
            if !create && !d.is_dir() {
                return Err(no_deployment(format!("data directory {} does not exist", d.display())));
            }
            private_dir(d)?;
        }
        let meta: Arc<dyn MetaStore> = match &cfg.database {
            Some(url) if url.starts_with("postgres:") || url.starts_with("postgresql:") => {
                Arc::new(PgMetaStore::open(url).await?)
            }
            Some(url) => {
                let path = PathBuf::from(strip_scheme(url, "sqlite").unwrap_or(url));
                if !create && !path.is_file() {
                    return Err(no_deployment(format!("database {} does not exist", path.display())));
                }
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
                    private_dir(parent)?;
                }
                Arc::new(SqliteMetaStore::open(path)?)
            }
            None => {
                let path = cfg.data.as_ref().expect("checked").join("meta.sqlite");
                if !create && !path.is_file() {
                    return Err(no_deployment(format!(
                        "{} holds no meta.sqlite",
                        path.parent().expect("joined").display()
                    )));
                }
                Arc::new(SqliteMetaStore::open(path)?)
            }
        };
        if !create && meta.setting(CONVERGENCE_SECRET).await?.is_none() {
            let db = cfg
                .database
                .as_deref()
                .map_or_else(|| "the data directory's database".to_owned(), isr_store::meta_pg::redact);
            return Err(no_deployment(format!("{db} was never initialised")));
        }
        let chunks = match &cfg.chunks {
            Some(url) if url.starts_with("s3:") => {
                // Presence from the metadata's chunk index: `missing` for 20,000 tags is a few queries, not
                // 20,000 HEADs.
                Chunks::indexed(Arc::new(VerifyingStore::new(S3ChunkStore::from_url(url)?)))
            }
            other => {
                let chunk_dir = match other {
                    Some(url) => PathBuf::from(strip_scheme(url, "file").unwrap_or(url)),
                    None => cfg.data.as_ref().expect("checked").join("chunks"),
                };
                if !create && !chunk_dir.is_dir() {
                    return Err(no_deployment(format!(
                        "chunk directory {} does not exist",
                        chunk_dir.display()
                    )));
                }
                // Written and renamed, no fsync per chunk: each commit syncs once before its transaction
                // (see `chunks`).
                Chunks::fs(FsChunkStore::open(&chunk_dir, Durability::Batched)?)
            }
        };
        Storage::from_stores(meta, chunks).await
    }

    /// Storage over stores the caller opened (tests and benchmarks configure their own S3 clients); reads
    /// or creates the deployment's convergence secret. An [`Chunks::indexed`] store gets `meta` as its chunk
    /// index.
    pub async fn from_stores(meta: Arc<dyn MetaStore>, mut chunks: Chunks) -> Result<Storage, ServerError> {
        chunks.attach_index(meta.clone());
        let secret = meta.setting_or_init(CONVERGENCE_SECRET, ConvergenceSecret::random().to_hex()).await?;
        let convergence_secret = ConvergenceSecret::from_hex(&secret)
            .ok_or_else(|| MetaError::Database("stored convergence secret is not 64 hex digits".into()))?;
        Ok(Storage { meta, chunks, convergence_secret })
    }
}
