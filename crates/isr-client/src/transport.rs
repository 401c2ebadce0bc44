//! The server's HTTP API (`docs/api.md`), with errors mapped to [`ClientError`].

use crate::error::ClientError;
use base64::Engine;
use bytes::Bytes;
use isr_format::Tag;
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LoginReply {
    pub token: String,
    pub expires_unix: i64,
    pub convergence_secret: String,
    pub recovery_pubkey: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct LockInfo {
    pub holder: String,
    pub since_unix: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ParcelSummary {
    pub name: String,
    pub head: u64,
    pub created_unix: i64,
    pub lock: Option<LockInfo>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ParcelDetail {
    pub name: String,
    pub head: u64,
    pub created_unix: i64,
    pub lock: Option<LockInfo>,
    pub wrapped_keyroot: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct VersionInfo {
    pub version: u64,
    pub created_unix: i64,
    pub client: String,
    pub bytes_uploaded: u64,
    pub comment: String,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: String,
    code: String,
    #[serde(default)]
    missing: Vec<String>,
}

/// Why a commit was refused in a way the client can act on.
#[derive(Debug)]
pub enum CommitRefusal {
    /// The server lacks these chunks (e.g. a concurrent gc removed them): upload and retry.
    MissingChunks(Vec<Tag>),
}

/// An HTTP connection pool to one server, with the session token once logged in.
#[derive(Debug, Clone)]
pub struct Transport {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

fn install_crypto_provider() {
    // Several callers may race to install it; only the first wins and that is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Transport {
    /// `server` is `http://host:port` or `https://...`; `ca_pem` adds a trusted CA (self-signed servers).
    pub fn new(server: &str, ca_pem: Option<&[u8]>) -> Result<Transport, ClientError> {
        install_crypto_provider();
        let mut b = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(64)
            .connect_timeout(Duration::from_secs(10))
            .http1_only();
        if let Some(pem) = ca_pem {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| ClientError::Usage(format!("bad CA certificate: {e}")))?;
            b = b.add_root_certificate(cert);
        }
        let http = b.build().map_err(|e| ClientError::Other(format!("HTTP client: {e}")))?;
        let base = server.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Usage(format!(
                "server URL {server:?} must start with http:// or https://"
            )));
        }
        Ok(Transport { http, base, token: None })
    }

    pub fn server(&self) -> &str {
        &self.base
    }

    pub fn with_token(mut self, token: String) -> Self {
        self.token = Some(token);
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{}", self.base, path)
    }

    fn unreachable(&self, e: &reqwest::Error) -> ClientError {
        let mut detail = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
        while let Some(s) = src {
            detail = format!("{detail}: {s}");
            src = s.source();
        }
        ClientError::Unreachable { url: self.base.clone(), detail }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() || e.is_timeout() {
                self.unreachable(&e)
            } else {
                ClientError::Server(format!("request failed: {e}"))
            }
        })?;
        Ok(resp)
    }

    async fn error_of(&self, resp: reqwest::Response) -> ClientError {
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let parsed: Option<ErrorBody> = serde_json::from_slice(&body).ok();
        let msg = parsed
            .as_ref()
            .map(|p| p.error.clone())
            .unwrap_or_else(|| format!("{status}: {}", String::from_utf8_lossy(&body)));
        let code = parsed.as_ref().map(|p| p.code.as_str()).unwrap_or("");
        match (status, code) {
            (StatusCode::UNAUTHORIZED, _) => ClientError::Auth(msg),
            (_, "locked") => ClientError::Locked(msg),
            (_, "parcel_exists") => ClientError::Exists(msg),
            (_, "corrupt_chunk") => ClientError::Integrity(format!("the server's copy is damaged: {msg}")),
            (_, "stale_base") => ClientError::StaleBase(msg),
            (StatusCode::NOT_FOUND, _) => ClientError::NotFound(msg),
            _ => ClientError::Server(msg),
        }
    }

    async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ClientError> {
        let mut req = self.http.request(method, self.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = self.send(req).await?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        let bytes = resp.bytes().await.map_err(|e| ClientError::Server(format!("reading reply: {e}")))?;
        let bytes = if bytes.is_empty() { Bytes::from_static(b"null") } else { bytes };
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Server(format!("unexpected reply to {path}: {e}")))
    }

    pub async fn login(&self, user: &str, login_secret: &str) -> Result<LoginReply, ClientError> {
        self.call(
            Method::POST,
            "/login",
            Some(serde_json::json!({"user": user, "login_secret": login_secret})),
        )
        .await
    }

    pub async fn parcels(&self) -> Result<Vec<ParcelSummary>, ClientError> {
        self.call(Method::GET, "/parcels", None).await
    }

    pub async fn parcel(&self, name: &str) -> Result<ParcelDetail, ClientError> {
        self.call(Method::GET, &format!("/parcels/{name}"), None).await
    }

    pub async fn create_parcel(
        &self,
        name: &str,
        wrapped_keyroot: &[u8],
        recovery_keyroot: Option<&[u8]>,
        holder: &str,
        client_id: &str,
    ) -> Result<String, ClientError> {
        #[derive(Deserialize)]
        struct R {
            lock_id: String,
        }
        let r: R = self
            .call(
                Method::POST,
                "/parcels",
                Some(serde_json::json!({
                    "name": name,
                    "wrapped_keyroot": hex::encode(wrapped_keyroot),
                    "recovery_keyroot": recovery_keyroot.map(hex::encode),
                    "holder": holder,
                    "client_id": client_id,
                })),
            )
            .await?;
        Ok(r.lock_id)
    }

    pub async fn put_keyroot(&self, name: &str, wrapped: &[u8]) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .call(
                Method::PUT,
                &format!("/parcels/{name}/keyroot"),
                Some(serde_json::json!({"wrapped_keyroot": hex::encode(wrapped)})),
            )
            .await?;
        Ok(())
    }

    pub async fn versions(&self, name: &str) -> Result<Vec<VersionInfo>, ClientError> {
        self.call(Method::GET, &format!("/parcels/{name}/versions"), None).await
    }

    /// The manifest bytes of version `n` (`None` = head) and its number.
    pub async fn manifest(&self, name: &str, n: Option<u64>) -> Result<(u64, Bytes), ClientError> {
        let v = n.map(|n| n.to_string()).unwrap_or_else(|| "head".into());
        let resp =
            self.send(self.http.get(self.url(&format!("/parcels/{name}/versions/{v}/manifest")))).await?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        let version = resp
            .headers()
            .get("x-isr-version")
            .and_then(|h| h.to_str().ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Server("manifest reply lacks X-Isr-Version".into()))?;
        let body = resp.bytes().await.map_err(|e| ClientError::Server(format!("reading manifest: {e}")))?;
        Ok((version, body))
    }

    pub async fn put_keyring(&self, name: &str, hash: &Tag, bytes: Bytes) -> Result<(), ClientError> {
        let resp = self
            .send(self.http.put(self.url(&format!("/parcels/{name}/keyrings/{hash}"))).body(bytes))
            .await?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        Ok(())
    }

    /// A keyring by its hash, verified against the hash before it is returned.
    pub async fn keyring(&self, name: &str, hash: &Tag) -> Result<Bytes, ClientError> {
        let resp = self.send(self.http.get(self.url(&format!("/parcels/{name}/keyrings/{hash}")))).await?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        let body = resp.bytes().await.map_err(|e| ClientError::Server(format!("reading keyring: {e}")))?;
        if Tag(*blake3::hash(&body).as_bytes()) != *hash {
            return Err(ClientError::Integrity(format!(
                "keyring {hash} from the server does not match its hash"
            )));
        }
        Ok(body)
    }

    pub async fn lock(&self, name: &str, holder: &str, client_id: &str) -> Result<String, ClientError> {
        #[derive(Deserialize)]
        struct R {
            lock_id: String,
        }
        let r: R = self
            .call(
                Method::POST,
                &format!("/parcels/{name}/lock"),
                Some(serde_json::json!({"holder": holder, "client_id": client_id})),
            )
            .await?;
        Ok(r.lock_id)
    }

    pub async fn unlock(&self, name: &str, lock_id: Option<&str>) -> Result<(), ClientError> {
        let q = match lock_id {
            Some(id) => format!("lock_id={id}"),
            None => "force=true".into(),
        };
        let resp = self.send(self.http.delete(self.url(&format!("/parcels/{name}/lock?{q}")))).await?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn commit(
        &self,
        name: &str,
        lock_id: &str,
        base_version: u64,
        manifest: &[u8],
        client: &str,
        comment: &str,
        bytes_uploaded: u64,
    ) -> Result<Result<u64, CommitRefusal>, ClientError> {
        let body = serde_json::json!({
            "lock_id": lock_id,
            "base_version": base_version,
            "manifest": base64::engine::general_purpose::STANDARD.encode(manifest),
            "client": client,
            "comment": comment,
            "bytes_uploaded": bytes_uploaded,
        });
        let resp =
            self.send(self.http.post(self.url(&format!("/parcels/{name}/versions"))).json(&body)).await?;
        if resp.status() == StatusCode::CONFLICT {
            let status = resp.status();
            let bytes = resp.bytes().await.unwrap_or_default();
            let parsed: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
            return match parsed {
                Some(p) if p.code == "missing_chunks" => Ok(Err(CommitRefusal::MissingChunks(
                    p.missing.iter().filter_map(|h| Tag::from_hex(h)).collect(),
                ))),
                Some(p) if p.code == "locked" => Err(ClientError::Locked(p.error)),
                Some(p) if p.code == "stale_base" => Err(ClientError::StaleBase(p.error)),
                Some(p) => Err(ClientError::Server(p.error)),
                None => Err(ClientError::Server(format!("{status}"))),
            };
        }
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        #[derive(Deserialize)]
        struct R {
            version: u64,
        }
        let r: R = resp.json().await.map_err(|e| ClientError::Server(format!("commit reply: {e}")))?;
        Ok(Ok(r.version))
    }

    pub async fn rollback(
        &self,
        name: &str,
        version: u64,
        lock_id: Option<&str>,
        client: &str,
    ) -> Result<u64, ClientError> {
        #[derive(Deserialize)]
        struct R {
            version: u64,
        }
        let r: R = self
            .call(
                Method::POST,
                &format!("/parcels/{name}/rollback"),
                Some(serde_json::json!({"version": version, "lock_id": lock_id, "client": client})),
            )
            .await?;
        Ok(r.version)
    }

    /// Which of `tags` the server lacks (one round trip per 65,536 tags).
    pub async fn missing(&self, tags: &[Tag]) -> Result<Vec<Tag>, ClientError> {
        let mut out = Vec::new();
        for batch in tags.chunks(65536) {
            let body: Vec<u8> = batch.iter().flat_map(|t| t.0).collect();
            let resp = self.send(self.http.post(self.url("/chunks/missing")).body(body)).await?;
            if !resp.status().is_success() {
                return Err(self.error_of(resp).await);
            }
            let bytes = resp.bytes().await.map_err(|e| ClientError::Server(format!("missing reply: {e}")))?;
            if bytes.len() % 32 != 0 {
                return Err(ClientError::Server("malformed reply to chunks/missing".into()));
            }
            out.extend(bytes.chunks_exact(32).map(|c| Tag(c.try_into().expect("32"))));
        }
        Ok(out)
    }

    pub async fn put_chunk(&self, tag: &Tag, stored: Bytes) -> Result<(), ClientError> {
        let resp = self.send(self.http.put(self.url(&format!("/chunks/{tag}"))).body(stored)).await?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        Ok(())
    }

    /// A chunk's stored bytes, verified against its tag before they are returned.
    pub async fn get_chunk(&self, tag: &Tag) -> Result<Bytes, ClientError> {
        let resp = self.send(self.http.get(self.url(&format!("/chunks/{tag}")))).await?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        let body =
            resp.bytes().await.map_err(|e| ClientError::Server(format!("reading chunk {tag}: {e}")))?;
        isr_format::codec::verify_tag(tag, &body).map_err(|e| ClientError::chunk(tag, e))?;
        Ok(body)
    }
}
