//! Shared test helpers: an in-process server on 127.0.0.1:0, a small API client, and valid parcel content
//! (encoded chunks, a sealed keyring, a sealed manifest).
#![allow(dead_code)]

use async_trait::async_trait;
use isr_format::{
    ChunkEncoder, ChunkIndex, ChunkSize, ConvergenceSecret, ImageLen, ImageRef, Keyring, Keyroot,
    LoginSecret, Manifest, Tag, VmDescription,
};
use isr_server::chunks::Chunks;
use isr_server::{AppState, ServerSettings, Storage};
use isr_store::{
    ChunkStore, Durability, FsChunkStore, MetaStore, PgMetaStore, S3ChunkStore, SqliteMetaStore, StoreError,
    VerifyingStore,
};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Where a test server keeps its metadata and chunks: the server's test suite runs on every combination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default: one data directory (SQLite + chunk files).
    Embedded,
    /// SQLite metadata, chunks in S3.
    SqliteS3,
    /// PostgreSQL metadata, chunk files.
    PgFs,
    /// PostgreSQL metadata, chunks in S3: the scale-out deployment.
    PgS3,
}

impl Backend {
    fn pg(self) -> bool {
        matches!(self, Backend::PgFs | Backend::PgS3)
    }
    fn s3(self) -> bool {
        matches!(self, Backend::SqliteS3 | Backend::PgS3)
    }
}

pub struct TestServer {
    pub url: String,
    pub storage: Storage,
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    /// Where the stores are (for [`TestServer::start_sharing`]): the directory holding `meta.sqlite` and
    /// `chunks/` (its own `dir`, or the first server's), the PostgreSQL database, the S3 prefix.
    data: std::path::PathBuf,
    pg_url: Option<String>,
    s3_url: Option<String>,
    /// The S3 chunk store's age shifter (see [`TestServer::age_all_chunks`]).
    aged: Option<Arc<AgedStore>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// A server on the embedded default.
    pub async fn start() -> TestServer {
        TestServer::start_on(Backend::Embedded).await
    }

    /// A server on `backend`; PostgreSQL and S3 come from `isr_testkit` (a fresh database and bucket prefix
    /// per server).
    pub async fn start_on(backend: Backend) -> TestServer {
        TestServer::start_with(backend, ServerSettings::default()).await
    }

    /// A server on `backend` with `settings`.
    pub async fn start_with(backend: Backend, settings: ServerSettings) -> TestServer {
        TestServer::start_stores(backend, settings, None).await
    }

    /// A second server process of the same deployment: the same database and chunk store (the scale-out
    /// deployment's servers behind one address; on the embedded default, the same data directory, as an
    /// administrator's `isr-server gc` opens it next to `serve`). Its own connections, caches and port.
    pub async fn start_sharing(&self) -> TestServer {
        TestServer::start_stores(self.backend, ServerSettings::default(), Some(self)).await
    }

    async fn start_stores(
        backend: Backend,
        settings: ServerSettings,
        share: Option<&TestServer>,
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let data = share.map_or_else(|| dir.path().to_owned(), |s| s.data.clone());
        let pg_url = match (backend.pg(), share) {
            (false, _) => None,
            (true, Some(s)) => s.pg_url.clone(),
            (true, None) => Some(isr_testkit::services().fresh_pg_database().await),
        };
        let s3_url = match (backend.s3(), share) {
            (false, _) => None,
            (true, Some(s)) => s.s3_url.clone(),
            (true, None) => Some(isr_testkit::services().fresh_s3_url()),
        };
        let meta: Arc<dyn MetaStore> = match &pg_url {
            Some(url) => Arc::new(PgMetaStore::open(url).await.unwrap()),
            None => Arc::new(SqliteMetaStore::open(data.join("meta.sqlite")).unwrap()),
        };
        let mut aged = None;
        let chunks = match &s3_url {
            Some(url) => {
                let s3 = S3ChunkStore::from_url_with(url, isr_testkit::services().s3_builder()).unwrap();
                let a = Arc::new(AgedStore::new(Arc::new(VerifyingStore::new(s3))));
                aged = Some(a.clone());
                Chunks::indexed(a)
            }
            None => Chunks::fs(FsChunkStore::open(data.join("chunks"), Durability::Batched).unwrap()),
        };
        let storage = Storage::from_stores(meta, chunks).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = AppState::new(storage.clone(), settings);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            isr_server::run(listener, state, None, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        TestServer {
            url,
            storage,
            backend,
            dir,
            data,
            pg_url,
            s3_url,
            aged,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// Makes every chunk stored now look `by` older to gc: file times for chunk files; for S3, whose
    /// objects' times cannot be set, an offset added by the [`AgedStore`] wrapper.
    pub async fn age_all_chunks(&self, by: Duration) {
        if let Some(aged) = &self.aged {
            for (tag, _) in aged.list().await.unwrap() {
                *aged.extra.lock().unwrap().entry(tag).or_default() += by;
            }
            return;
        }
        let root = self.data.join("chunks");
        for d in std::fs::read_dir(&root).unwrap().flatten() {
            if d.file_name().len() != 2 {
                continue;
            }
            for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                let file = std::fs::File::options().write(true).open(f.path()).unwrap();
                file.set_modified(SystemTime::now() - by).unwrap();
            }
        }
    }

    pub async fn add_user(&self, name: &str) -> LoginSecret {
        let secret = LoginSecret::random();
        isr_server::admin::add_user(&self.storage, name, &secret).await.unwrap();
        secret
    }

    /// A user with a logged-in client.
    pub async fn user(&self, name: &str) -> Api {
        let secret = self.add_user(name).await;
        let mut api = Api::new(&self.url);
        api.login(name, &secret).await;
        api
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap();
        }
    }
}

/// A plain-HTTP client (reqwest is built without a default crypto provider: hand it a ring config).
pub fn client() -> reqwest::Client {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder().use_preconfigured_tls(cfg).pool_max_idle_per_host(64).build().unwrap()
}

/// A minimal client of the API.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub token: Option<String>,
    pub http: reqwest::Client,
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: bytes::Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }
}

impl Api {
    pub fn new(url: &str) -> Api {
        Api { url: url.to_owned(), token: None, http: client() }
    }

    pub async fn login(&mut self, user: &str, secret: &LoginSecret) -> Value {
        let a = self.post_json("/api/v1/login", json!({"user": user, "login_secret": secret.to_hex()})).await;
        assert_eq!(a.status, StatusCode::OK, "login: {:?}", a.body);
        let v = a.json();
        self.token = Some(v["token"].as_str().unwrap().to_owned());
        v
    }

    pub async fn send(&self, method: Method, path: &str, body: Option<Vec<u8>>, json_body: bool) -> Answer {
        let mut rb = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb
                .header(
                    "content-type",
                    if json_body { "application/json" } else { "application/octet-stream" },
                )
                .body(b);
        }
        let r = rb.send().await.unwrap();
        Answer { status: r.status(), headers: r.headers().clone(), body: r.bytes().await.unwrap() }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None, false).await
    }
    pub async fn delete(&self, path: &str) -> Answer {
        self.send(Method::DELETE, path, None, false).await
    }
    pub async fn post_json(&self, path: &str, v: Value) -> Answer {
        self.send(Method::POST, path, Some(serde_json::to_vec(&v).unwrap()), true).await
    }
    pub async fn put_json(&self, path: &str, v: Value) -> Answer {
        self.send(Method::PUT, path, Some(serde_json::to_vec(&v).unwrap()), true).await
    }
    pub async fn post_bytes(&self, path: &str, b: Vec<u8>) -> Answer {
        self.send(Method::POST, path, Some(b), false).await
    }
    pub async fn put_bytes(&self, path: &str, b: Vec<u8>) -> Answer {
        self.send(Method::PUT, path, Some(b), false).await
    }

    /// Creates a parcel (locked by `client_id`); returns the lock id.
    pub async fn create(&self, name: &str, client_id: &str) -> String {
        let a = self
            .post_json(
                "/api/v1/parcels",
                json!({"name": name, "wrapped_keyroot": "00ff", "recovery_keyroot": null, "holder": format!("host-{client_id}"), "client_id": client_id}),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
        a.json()["lock_id"].as_str().unwrap().to_owned()
    }

    pub async fn lock(&self, name: &str, client_id: &str) -> Answer {
        self.post_json(
            &format!("/api/v1/parcels/{name}/lock"),
            json!({"holder": format!("host-{client_id}"), "client_id": client_id}),
        )
        .await
    }

    pub async fn put_chunk(&self, tag: &Tag, data: &[u8]) -> Answer {
        self.put_bytes(&format!("/api/v1/chunks/{tag}"), data.to_vec()).await
    }

    pub async fn missing(&self, tags: &[Tag]) -> Vec<Tag> {
        let body: Vec<u8> = tags.iter().flat_map(|t| t.0).collect();
        let a = self.post_bytes("/api/v1/chunks/missing", body).await;
        assert_eq!(a.status, StatusCode::OK);
        a.body.chunks_exact(32).map(|c| Tag(c.try_into().unwrap())).collect()
    }

    /// Uploads `v`'s keyring under the lock `lock_id`.
    pub async fn put_keyring(&self, parcel: &str, lock_id: &str, v: &Version) -> Answer {
        self.put_bytes(
            &format!("/api/v1/parcels/{parcel}/keyrings/{}?lock_id={lock_id}", v.keyring_hash),
            v.keyring.clone(),
        )
        .await
    }

    /// Confirms the lock `lock_id` (`GET .../lock?lock_id=`).
    pub async fn confirm(&self, parcel: &str, lock_id: &str) -> Answer {
        self.get(&format!("/api/v1/parcels/{parcel}/lock?lock_id={lock_id}")).await
    }

    pub async fn commit(&self, parcel: &str, lock_id: &str, base: u64, v: &Version) -> Answer {
        use base64::Engine;
        self.post_json(
            &format!("/api/v1/parcels/{parcel}/versions"),
            json!({"lock_id": lock_id, "base_version": base,
                   "manifest": base64::engine::general_purpose::STANDARD.encode(&v.manifest),
                   "client": "test-client", "comment": format!("version from base {base}"),
                   "bytes_uploaded": v.chunks.iter().map(|(_, c)| c.len()).sum::<usize>()}),
        )
        .await
    }

    /// Uploads a version completely (keyring, missing chunks, commit, retrying while chunks go missing).
    pub async fn upload_version(&self, parcel: &str, lock_id: &str, base: u64, v: &Version) -> u64 {
        let a = self.put_keyring(parcel, lock_id, v).await;
        assert!(a.status.is_success(), "{:?}", a.body);
        let mut todo = self.missing(&v.tags()).await;
        for attempt in 0..100 {
            for t in &todo {
                let data = &v.chunks.iter().find(|(x, _)| x == t).unwrap().1;
                let a = self.put_chunk(t, data).await;
                assert!(a.status.is_success(), "{:?}", a.body);
            }
            let a = self.commit(parcel, lock_id, base, v).await;
            if a.status == StatusCode::CREATED {
                return a.json()["version"].as_u64().unwrap();
            }
            if a.code() == "missing_keyring" {
                // Purged as abandoned by a gc with no grace period: upload it again.
                assert!(self.put_keyring(parcel, lock_id, v).await.status.is_success());
                todo = Vec::new();
                continue;
            }
            assert_eq!(a.code(), "missing_chunks", "attempt {attempt}: {:?}", a.body);
            todo = a.json()["missing"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| Tag::from_hex(h.as_str().unwrap()).unwrap())
                .collect();
            assert!(!todo.is_empty());
        }
        panic!("commit kept missing chunks");
    }
}

/// A version's content: encoded chunks, sealed keyring, sealed manifest.
#[derive(Clone)]
pub struct Version {
    pub chunks: Vec<(Tag, Vec<u8>)>,
    pub keyring: Vec<u8>,
    pub keyring_hash: Tag,
    pub manifest: Vec<u8>,
}

impl Version {
    pub fn tags(&self) -> Vec<Tag> {
        self.chunks.iter().map(|(t, _)| *t).collect()
    }
}

pub const CHUNK: u64 = 4096;

/// `n` distinct chunks (the last one all zero, so never stored) derived from `seed`, with `shared` of
/// them common to every seed.
pub fn version(seed: u64, n: u64, shared: u64) -> Version {
    let keyroot = Keyroot([3; 32]);
    let mut enc = ChunkEncoder::new(ConvergenceSecret([7; 32]));
    let cs = ChunkSize::new(CHUNK).unwrap();
    let len = ImageLen(n * CHUNK);
    let mut keyring = Keyring::new(cs, len).unwrap();
    let mut chunks = Vec::new();
    for i in 0..n - 1 {
        let id = if i < shared { u64::MAX - i } else { seed * 1_000_000 + i };
        let mut plain = vec![0u8; CHUNK as usize];
        blake3::Hasher::new().update(&id.to_le_bytes()).finalize_xof().fill(&mut plain);
        let e = enc.encode(&plain).unwrap().unwrap();
        keyring.set(ChunkIndex(i), Some((e.tag, e.key)));
        chunks.push((e.tag, e.stored));
    }
    let keyring = keyring.seal(&keyroot);
    let keyring_hash = Tag::of(&keyring);
    let manifest = Manifest {
        vm: VmDescription { memory_mib: 256, cpus: 1, append: None, devices: Default::default() },
        chunk_size: cs,
        disk: ImageRef { len, keyring: keyring_hash },
        memory: None,
        kernel: None,
        initrd: None,
        created_unix: 1_800_000_000 + seed as i64,
        comment: format!("seed {seed}"),
    }
    // Legacy (unbound): the version number it will be committed as is not known here, and the server
    // accepts unbound manifests.
    .seal_legacy_unbound(&keyroot)
    .unwrap();
    Version { chunks, keyring, keyring_hash, manifest }
}

/// A rustls client config (ring provider) trusting `roots`.
pub fn tls_client(root_der: Vec<u8>) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(root_der)).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder().use_preconfigured_tls(cfg).build().unwrap()
}

/// A chunk store whose chunks look older than they are by a per-chunk offset (gc tests on S3, where an
/// object's time cannot be set); everything else passes through.
#[derive(Debug)]
pub struct AgedStore {
    inner: Arc<dyn ChunkStore>,
    extra: Mutex<HashMap<Tag, Duration>>,
}

impl AgedStore {
    fn new(inner: Arc<dyn ChunkStore>) -> Self {
        AgedStore { inner, extra: Mutex::new(HashMap::new()) }
    }
}

#[async_trait]
impl ChunkStore for AgedStore {
    async fn put(&self, tag: &Tag, data: bytes::Bytes) -> Result<bool, StoreError> {
        self.inner.put(tag, data).await
    }
    async fn get(&self, tag: &Tag) -> Result<Option<bytes::Bytes>, StoreError> {
        self.inner.get(tag).await
    }
    async fn contains(&self, tag: &Tag) -> Result<bool, StoreError> {
        self.inner.contains(tag).await
    }
    async fn delete(&self, tag: &Tag) -> Result<(), StoreError> {
        self.extra.lock().unwrap().remove(tag);
        self.inner.delete(tag).await
    }
    async fn list(&self) -> Result<Vec<(Tag, u64)>, StoreError> {
        self.inner.list().await
    }
    async fn age(&self, tag: &Tag) -> Option<Duration> {
        let extra = self.extra.lock().unwrap().get(tag).copied().unwrap_or_default();
        Some(self.inner.age(tag).await? + extra)
    }
}
