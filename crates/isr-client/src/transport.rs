//! The server's HTTP API (`docs/api.md`), with errors mapped to [`ClientError`].

use crate::error::{ClientError, LockLoss};
use base64::Engine;
use bytes::Bytes;
use isr_format::Tag;
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// One path segment of an API URL, by what it may contain.
#[derive(Debug, Clone, Copy)]
enum Segment<'a> {
    /// A fixed word of the route.
    Fixed(&'a str),
    /// A parcel name (validated).
    Parcel(&'a str),
    /// A hex tag, hash or id.
    Hex(&'a str),
}
use Segment::{Fixed, Hex, Parcel};

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
    /// IT's network policy (`none` or `nat`), `None` when unset (or from a server without policies).
    #[serde(default)]
    pub network_policy: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct VersionInfo {
    pub version: u64,
    pub created_unix: i64,
    pub client: String,
    pub bytes_uploaded: u64,
    pub comment: String,
}

/// An error answer of the API (`{"error", "code", ...}`), with the extra fields some codes carry.
#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    error: String,
    code: String,
    #[serde(default)]
    missing: Vec<String>,
    #[serde(default)]
    holder: Option<String>,
    #[serde(default)]
    since_unix: Option<i64>,
    #[serde(default)]
    broken_by: Option<String>,
    #[serde(default)]
    broken_unix: Option<i64>,
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
    /// The server's base URL as given (validated), without a trailing slash.
    base: String,
    base_url: Url,
    token: Option<String>,
}

fn install_crypto_provider() {
    // Several callers may race to install it; only the first wins and that is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Check a server URL before anything is sent: scheme, host, port, nothing after the path.
pub fn parse_server_url(server: &str) -> Result<Url, ClientError> {
    let bad = |why: String| ClientError::Usage(format!("invalid server URL {server:?}: {why}"));
    let url = Url::parse(server.trim()).map_err(|e| bad(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!("the scheme must be http or https, not {:?}", url.scheme())));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it names no host".into()));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("it must not have a query or fragment".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("credentials do not belong in the URL (use ISR_USER and ISR_PASSWORD)".into()));
    }
    Ok(url)
}

/// Map an error answer of the API to the client's error (and so to SPEC.md's exit codes). Every code the
/// server documents (docs/api.md) has its place here.
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let Some(p) = parsed else {
        let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        return match status {
            StatusCode::UNAUTHORIZED => ClientError::Auth(format!("{status}: {text}")),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
                ClientError::Unreachable { url: String::new(), detail: format!("{status}: {text}") }
            }
            _ => ClientError::Server(format!("{status}: {text}")),
        };
    };
    let msg = p.error.clone();
    match p.code.as_str() {
        "unauthorized" | "bad_credentials" => ClientError::Auth(msg),
        "locked" => ClientError::Locked(msg),
        "lock_broken" => ClientError::LockLost(LockLoss {
            message: msg,
            broken_by: p.broken_by.unwrap_or_default(),
            broken_unix: p.broken_unix.unwrap_or(0),
            holder_now: p.holder.zip(p.since_unix),
        }),
        "lock_mismatch" => ClientError::LockLost(LockLoss {
            message: msg,
            broken_by: String::new(),
            broken_unix: 0,
            holder_now: p.holder.zip(p.since_unix),
        }),
        "parcel_exists" => ClientError::Exists(msg),
        "stale_base" => ClientError::StaleBase(msg),
        "corrupt_chunk" => ClientError::Integrity(format!("the server's copy is damaged: {msg}")),
        "hash_mismatch" | "tag_mismatch" | "bad_chunk" | "bad_keyring" | "bad_manifest" => {
            ClientError::Integrity(format!("the server refused what this client sent: {msg}"))
        }
        "bad_name" => ClientError::Usage(msg),
        "no_such_parcel" | "no_such_version" | "no_such_keyring" | "no_such_chunk" | "not_found" => {
            ClientError::NotFound(msg)
        }
        // missing_chunks is handled by the commit itself; too_large, bad_request, missing_keyring,
        // has_versions, internal and anything newer are the server's word as it is.
        _ => match status {
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
                ClientError::Unreachable { url: String::new(), detail: msg }
            }
            _ => ClientError::Server(msg),
        },
    }
}

/// A TLS verifier that accepts a certificate pinned in the `--ca-cert` file as it is (a self-signed
/// certificate made with `openssl req -x509` has CA:TRUE, which webpki refuses as a server certificate) and
/// verifies every other one against the file's certificates as roots.
#[derive(Debug)]
struct PinnedOrRoots {
    pinned: Vec<rustls::pki_types::CertificateDer<'static>>,
    roots: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedOrRoots {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if self.pinned.iter().any(|p| p.as_ref() == end_entity.as_ref()) {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        self.roots.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.roots.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.roots.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.roots.supported_verify_schemes()
    }
}

/// The TLS configuration for a `--ca-cert` file: its certificates are roots, and each is also pinned.
fn tls_config_for(ca_pem: &[u8]) -> Result<rustls::ClientConfig, ClientError> {
    let bad = |why: String| ClientError::Usage(format!("bad CA certificate file: {why}"));
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls_pemfile::certs(&mut &ca_pem[..]).collect::<Result<_, _>>().map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in &certs {
        roots.add(c.clone()).map_err(|e| bad(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| bad(e.to_string()))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedOrRoots { pinned: certs, roots: verifier }))
        .with_no_client_auth();
    Ok(config)
}

impl Transport {
    /// `server` is `http://host:port` or `https://...`; `ca_pem` holds certificates to trust (a self-signed
    /// server certificate is pinned as it is; a CA's certificate verifies the server's).
    pub fn new(server: &str, ca_pem: Option<&[u8]>) -> Result<Transport, ClientError> {
        install_crypto_provider();
        let base_url = parse_server_url(server)?;
        let mut b = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(64)
            .connect_timeout(Duration::from_secs(10))
            .http1_only();
        if let Some(pem) = ca_pem {
            b = b.use_preconfigured_tls(tls_config_for(pem)?);
        }
        let http = b.build().map_err(|e| ClientError::Other(format!("HTTP client: {e}")))?;
        let base = server.trim().trim_end_matches('/').to_owned();
        Ok(Transport { http, base, base_url, token: None })
    }

    pub fn server(&self) -> &str {
        &self.base
    }

    pub fn with_token(mut self, token: String) -> Self {
        self.token = Some(token);
        self
    }

    /// The URL of an API endpoint: `/api/v1/` and the segments, each percent-encoded. Segments that are
    /// parcel names must be valid names (checked again here: a name never becomes another path).
    fn url(&self, segments: &[Segment<'_>], query: &[(&str, &str)]) -> Result<Url, ClientError> {
        let mut url = self.base_url.clone();
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|_| ClientError::Usage(format!("server URL {:?} cannot have a path", self.base)))?;
            path.pop_if_empty().push("api").push("v1");
            for seg in segments {
                let s = match seg {
                    Segment::Fixed(s) => *s,
                    Segment::Parcel(name) => {
                        if let Some(why) = isr_format::names::parcel_name_problem(name) {
                            return Err(ClientError::Usage(format!("invalid parcel name {name:?}: {why}")));
                        }
                        name
                    }
                    Segment::Hex(s) => {
                        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                            return Err(ClientError::Other(format!("not a hex id: {s:?}")));
                        }
                        s
                    }
                };
                path.push(s);
            }
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
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

    /// A failure below HTTP (connect, reset, closed mid-answer, timeout) means the server could not be
    /// reached (exit 6); only a request that could not even be built is this client's fault.
    fn transport_error(&self, e: reqwest::Error) -> ClientError {
        if e.is_builder() {
            return ClientError::Usage(format!("cannot build a request to {}: {e}", self.base));
        }
        self.unreachable(&e)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        req.send().await.map_err(|e| self.transport_error(e))
    }

    /// The body of a successful answer (a failure while reading it is a lost connection).
    async fn body(&self, resp: reqwest::Response) -> Result<Bytes, ClientError> {
        resp.bytes().await.map_err(|e| self.transport_error(e))
    }

    async fn error_of(&self, resp: reqwest::Response) -> ClientError {
        let status = resp.status();
        match resp.bytes().await {
            Ok(body) => match api_error(status, &body) {
                ClientError::Unreachable { detail, .. } => {
                    ClientError::Unreachable { url: self.base.clone(), detail }
                }
                other => other,
            },
            Err(e) => self.transport_error(e),
        }
    }

    /// Send a request and return the body of its successful answer, or the API's error.
    async fn ok_body(&self, req: reqwest::RequestBuilder) -> Result<Bytes, ClientError> {
        let resp = self.send(req).await?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        self.body(resp).await
    }

    async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        url: Url,
        body: Option<serde_json::Value>,
    ) -> Result<T, ClientError> {
        let what = url.path().to_owned();
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let bytes = self.ok_body(req).await?;
        let bytes = if bytes.is_empty() { Bytes::from_static(b"null") } else { bytes };
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Server(format!("unexpected reply to {what}: {e}")))
    }

    pub async fn login(&self, user: &str, login_secret: &str) -> Result<LoginReply, ClientError> {
        self.call(
            Method::POST,
            self.url(&[Fixed("login")], &[])?,
            Some(serde_json::json!({"user": user, "login_secret": login_secret})),
        )
        .await
    }

    /// Replace the logged-in user's login secret (after every keyroot was rewrapped).
    pub async fn change_login_secret(&self, login_secret: &str) -> Result<(), ClientError> {
        let url = self.url(&[Fixed("password")], &[])?;
        self.ok_body(self.http.put(url).json(&serde_json::json!({"login_secret": login_secret}))).await?;
        Ok(())
    }

    pub async fn parcels(&self) -> Result<Vec<ParcelSummary>, ClientError> {
        self.call(Method::GET, self.url(&[Fixed("parcels")], &[])?, None).await
    }

    pub async fn parcel(&self, name: &str) -> Result<ParcelDetail, ClientError> {
        self.call(Method::GET, self.url(&[Fixed("parcels"), Parcel(name)], &[])?, None).await
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
                self.url(&[Fixed("parcels")], &[])?,
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

    /// Delete a parcel that has no version yet (undoing a create that failed); the server refuses any other.
    pub async fn delete_unfinished_parcel(&self, name: &str, client_id: &str) -> Result<(), ClientError> {
        let url = self.url(&[Fixed("parcels"), Parcel(name)], &[("client_id", client_id)])?;
        self.ok_body(self.http.delete(url)).await?;
        Ok(())
    }

    pub async fn put_keyroot(&self, name: &str, wrapped: &[u8]) -> Result<(), ClientError> {
        let url = self.url(&[Fixed("parcels"), Parcel(name), Fixed("keyroot")], &[])?;
        self.ok_body(self.http.put(url).json(&serde_json::json!({"wrapped_keyroot": hex::encode(wrapped)})))
            .await?;
        Ok(())
    }

    pub async fn versions(&self, name: &str) -> Result<Vec<VersionInfo>, ClientError> {
        self.call(Method::GET, self.url(&[Fixed("parcels"), Parcel(name), Fixed("versions")], &[])?, None)
            .await
    }

    /// The manifest bytes of version `n` (`None` = head) and its number.
    pub async fn manifest(&self, name: &str, n: Option<u64>) -> Result<(u64, Bytes), ClientError> {
        let v = n.map(|n| n.to_string()).unwrap_or_else(|| "head".into());
        let url = self
            .url(&[Fixed("parcels"), Parcel(name), Fixed("versions"), Fixed(&v), Fixed("manifest")], &[])?;
        let resp = self.send(self.http.get(url)).await?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        let version = resp
            .headers()
            .get("x-isr-version")
            .and_then(|h| h.to_str().ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Server("manifest reply lacks X-Isr-Version".into()))?;
        let body = self.body(resp).await?;
        Ok((version, body))
    }

    /// Upload a sealed keyring under the parcel's lock.
    pub async fn put_keyring(
        &self,
        name: &str,
        lock_id: &str,
        hash: &Tag,
        bytes: Bytes,
    ) -> Result<(), ClientError> {
        let h = hash.to_hex();
        let url =
            self.url(&[Fixed("parcels"), Parcel(name), Fixed("keyrings"), Hex(&h)], &[("lock_id", lock_id)])?;
        self.ok_body(self.http.put(url).body(bytes)).await?;
        Ok(())
    }

    /// A keyring by its hash, verified against the hash before it is returned.
    pub async fn keyring(&self, name: &str, hash: &Tag) -> Result<Bytes, ClientError> {
        let h = hash.to_hex();
        let url = self.url(&[Fixed("parcels"), Parcel(name), Fixed("keyrings"), Hex(&h)], &[])?;
        let body = self.ok_body(self.http.get(url)).await?;
        if Tag(*blake3::hash(&body).as_bytes()) != *hash {
            return Err(ClientError::Integrity(format!(
                "keyring {hash} from the server does not match its hash"
            )));
        }
        Ok(body)
    }

    /// Take the parcel's lock (or get back the one this client id already holds).
    pub async fn lock(&self, name: &str, holder: &str, client_id: &str) -> Result<String, ClientError> {
        #[derive(Deserialize)]
        struct R {
            lock_id: String,
        }
        let r: R = self
            .call(
                Method::POST,
                self.url(&[Fixed("parcels"), Parcel(name), Fixed("lock")], &[])?,
                Some(serde_json::json!({"holder": holder, "client_id": client_id})),
            )
            .await?;
        Ok(r.lock_id)
    }

    /// Whether `lock_id` is still the parcel's lock: Ok, or `LockLost` (broken, naming who and when) or
    /// `Locked` (another client holds it now).
    pub async fn confirm_lock(&self, name: &str, lock_id: &str) -> Result<LockInfo, ClientError> {
        let url = self.url(&[Fixed("parcels"), Parcel(name), Fixed("lock")], &[("lock_id", lock_id)])?;
        self.call(Method::GET, url, None).await
    }

    /// Release our lock (`lock_id`).
    pub async fn unlock(&self, name: &str, lock_id: &str) -> Result<(), ClientError> {
        let url = self.url(&[Fixed("parcels"), Parcel(name), Fixed("lock")], &[("lock_id", lock_id)])?;
        self.ok_body(self.http.delete(url)).await?;
        Ok(())
    }

    /// Break the parcel's lock whoever holds it; `by` names this client to the one whose lock it was.
    pub async fn break_lock(&self, name: &str, by: &str) -> Result<(), ClientError> {
        let url =
            self.url(&[Fixed("parcels"), Parcel(name), Fixed("lock")], &[("force", "true"), ("by", by)])?;
        self.ok_body(self.http.delete(url)).await?;
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
        let url = self.url(&[Fixed("parcels"), Parcel(name), Fixed("versions")], &[])?;
        let resp = self.send(self.http.post(url).json(&body)).await?;
        if resp.status() == StatusCode::CONFLICT {
            let bytes = self.body(resp).await?;
            if let Ok(p) = serde_json::from_slice::<ErrorBody>(&bytes) {
                if p.code == "missing_chunks" {
                    return Ok(Err(CommitRefusal::MissingChunks(
                        p.missing.iter().filter_map(|h| Tag::from_hex(h)).collect(),
                    )));
                }
            }
            return Err(api_error(StatusCode::CONFLICT, &bytes));
        }
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        #[derive(Deserialize)]
        struct R {
            version: u64,
        }
        let bytes = self.body(resp).await?;
        let r: R =
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Server(format!("commit reply: {e}")))?;
        Ok(Ok(r.version))
    }

    /// Which of `tags` the server lacks (one round trip per 65,536 tags).
    pub async fn missing(&self, tags: &[Tag]) -> Result<Vec<Tag>, ClientError> {
        let mut out = Vec::new();
        for batch in tags.chunks(65536) {
            let body: Vec<u8> = batch.iter().flat_map(|t| t.0).collect();
            let url = self.url(&[Fixed("chunks"), Fixed("missing")], &[])?;
            let bytes = self.ok_body(self.http.post(url).body(body)).await?;
            if bytes.len() % 32 != 0 {
                return Err(ClientError::Server("malformed reply to chunks/missing".into()));
            }
            out.extend(bytes.chunks_exact(32).filter_map(|c| c.try_into().ok()).map(Tag));
        }
        Ok(out)
    }

    pub async fn put_chunk(&self, tag: &Tag, stored: Bytes) -> Result<(), ClientError> {
        let h = tag.to_hex();
        let url = self.url(&[Fixed("chunks"), Hex(&h)], &[])?;
        self.ok_body(self.http.put(url).body(stored)).await?;
        Ok(())
    }

    /// A chunk's stored bytes, verified against its tag before they are returned.
    pub async fn get_chunk(&self, tag: &Tag) -> Result<Bytes, ClientError> {
        let h = tag.to_hex();
        let url = self.url(&[Fixed("chunks"), Hex(&h)], &[])?;
        let body = self.ok_body(self.http.get(url)).await?;
        isr_format::codec::verify_tag(tag, &body).map_err(|e| ClientError::chunk(tag, e))?;
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Transport {
        Transport::new("http://127.0.0.1:7850", None).unwrap()
    }

    #[test]
    fn names_never_become_other_paths() {
        let t = t();
        for bad in ["victim?", "victim#", "victim?force=true", ".", "..", "a/b", "", "%2e"] {
            let e = t.url(&[Fixed("parcels"), Parcel(bad), Fixed("lock")], &[]).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
        }
        let u = t.url(&[Fixed("parcels"), Parcel("my-vm_1.0"), Fixed("lock")], &[("by", "a b&c=d")]).unwrap();
        assert_eq!(u.as_str(), "http://127.0.0.1:7850/api/v1/parcels/my-vm_1.0/lock?by=a+b%26c%3Dd");
    }

    #[test]
    fn a_base_path_is_kept() {
        let t = Transport::new("https://isr.example/deploy/", None).unwrap();
        let u = t.url(&[Fixed("parcels")], &[]).unwrap();
        assert_eq!(u.as_str(), "https://isr.example/deploy/api/v1/parcels");
    }

    #[test]
    fn malformed_server_urls_are_usage_errors_naming_the_url() {
        for bad in [
            "http://127.0.0.1:99999",
            "http://[::1",
            "ftp://host",
            "127.0.0.1:7850",
            "http://",
            "http://h/?q",
        ] {
            let e = Transport::new(bad, None).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
            assert!(e.to_string().contains(bad.trim()), "{e}");
        }
    }

    #[test]
    fn every_documented_error_code_has_its_exit_code() {
        let cases = [
            ("unauthorized", 401, 4),
            ("bad_credentials", 401, 4),
            ("locked", 409, 3),
            ("lock_broken", 409, 3),
            ("lock_mismatch", 409, 3),
            ("corrupt_chunk", 500, 5),
            ("tag_mismatch", 400, 5),
            ("hash_mismatch", 400, 5),
            ("bad_manifest", 400, 5),
            ("bad_name", 400, 2),
            ("no_such_parcel", 404, 1),
            ("stale_base", 409, 1),
            ("too_large", 413, 1),
            ("internal", 500, 1),
        ];
        for (code, status, exit) in cases {
            let body = serde_json::json!({"error": "m", "code": code}).to_string();
            let e = api_error(StatusCode::from_u16(status).unwrap(), body.as_bytes());
            assert_eq!(e.exit_code(), exit, "{code}");
        }
        assert_eq!(api_error(StatusCode::BAD_GATEWAY, b"<html>").exit_code(), 6);
        let broken = serde_json::json!({"error": "your lock on p was broken by B at T", "code": "lock_broken",
            "broken_by": "B", "broken_unix": 5});
        match api_error(StatusCode::CONFLICT, broken.to_string().as_bytes()) {
            ClientError::LockLost(l) => assert_eq!((l.broken_by.as_str(), l.broken_unix), ("B", 5)),
            other => panic!("{other:?}"),
        }
    }
}
