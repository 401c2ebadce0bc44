//! The server's HTTP API (`docs/api.md`), with errors mapped to [`ClientError`].

use crate::error::{ClientError, LockLoss};
use base64::Engine;
use bytes::Bytes;
use isr_format::Tag;
use isr_wire::limits::{MAX_COMMENT, MAX_FETCH_TAGS, MAX_HELD_TAGS, MAX_MISSING_TAGS};
use isr_wire::{routes, ApiPath, ErrorBody, ErrorCode, ParcelName, VersionRef};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// The API's reply types, as the wire contract defines them.
pub use isr_wire::{LockInfo, LoginReply, ParcelDetail, ParcelSummary, VersionInfo};

/// Tags per `chunks/missing` request: one round trip each, well within the server's limit.
const MISSING_BATCH: usize = 65536;
const _: () = assert!(MISSING_BATCH <= MAX_MISSING_TAGS);

/// `name` as a parcel name of the wire contract, or a usage error (exit 2) naming what is wrong.
fn parcel(name: &str) -> Result<ParcelName, ClientError> {
    ParcelName::parse(name).map_err(|e| ClientError::Usage(e.to_string()))
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

/// Map an error answer of the API to the client's error (and so to SPEC.md's exit codes).
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) else {
        // Not the API's answer (a proxy's page, a truncated body): only the status tells.
        let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        return match status {
            StatusCode::UNAUTHORIZED => ClientError::Auth(format!("{status}: {text}")),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
                ClientError::Unreachable { url: String::new(), detail: format!("{status}: {text}") }
            }
            _ => ClientError::Server(format!("{status}: {text}")),
        };
    };
    match parsed.known_code() {
        Some(code) => error_for_code(code, parsed),
        // A newer server's code: its message as it is, exit 1.
        None => ClientError::Server(format!("{} ({})", parsed.error, parsed.code)),
    }
}

/// Every error code of the API and the client error it is (SPEC.md's exit codes: 2 usage, 3 locked or lock
/// lost, 4 authentication, 5 integrity, 1 anything else). Exhaustive on purpose: a new code in isr-wire does
/// not compile until it is given its place here.
fn error_for_code(code: ErrorCode, body: ErrorBody) -> ClientError {
    use ErrorCode as C;
    let msg = body.error;
    match code {
        C::Unauthorized | C::BadCredentials => ClientError::Auth(msg),
        C::Locked => ClientError::Locked(msg),
        C::LockBroken => ClientError::LockLost(LockLoss {
            message: msg,
            broken_by: body.broken_by.unwrap_or_default(),
            broken_unix: body.broken_unix.unwrap_or(0),
            holder_now: body.holder.zip(body.since_unix),
        }),
        // The lock is gone without a record of who broke it (an earlier break, forgotten by a later one).
        C::LockMismatch => ClientError::LockLost(LockLoss {
            message: msg,
            broken_by: String::new(),
            broken_unix: 0,
            holder_now: body.holder.zip(body.since_unix),
        }),
        C::ParcelExists | C::UserExists => ClientError::Exists(msg),
        C::StaleBase => ClientError::StaleBase(msg),
        C::CorruptChunk => ClientError::Integrity(format!("the server's copy is damaged: {msg}")),
        C::HashMismatch | C::TagMismatch | C::BadChunk | C::BadKeyring | C::BadManifest => {
            ClientError::Integrity(format!("the server refused what this client sent: {msg}"))
        }
        C::BadName => ClientError::Usage(msg),
        C::NoSuchParcel | C::NoSuchVersion | C::NoSuchKeyring | C::NoSuchChunk | C::NotFound => {
            ClientError::NotFound(msg)
        }
        // Refusals that the same request would get again: not worth a retry.
        C::BadRequest | C::TooLarge | C::HasVersions | C::MissingKeyring => ClientError::Refused(msg),
        // A commit handles missing_chunks itself (uploads them and retries); anywhere else it is the
        // server's word as it is. internal is worth trying again.
        C::MissingChunks | C::Internal => ClientError::Server(msg),
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

    /// The URL of an API endpoint: the server's base URL, then `path`'s segments (each percent-encoded,
    /// though the wire contract's paths are made of validated names, numbers and hex only) and the query.
    fn url(&self, path: &ApiPath, query: &[(&str, String)]) -> Result<Url, ClientError> {
        let mut url = self.base_url.clone();
        {
            let mut segments = url
                .path_segments_mut()
                .map_err(|_| ClientError::Usage(format!("server URL {:?} cannot have a path", self.base)))?;
            segments.pop_if_empty();
            segments.extend(routes::API_PREFIX.split('/').filter(|s| !s.is_empty()));
            segments.extend(path.segments());
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

    /// `method` on `url` with `body` as JSON (none for `None`), and the JSON answer.
    async fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        url: Url,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let what = url.path().to_owned();
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(b);
        }
        let bytes = self.ok_body(req).await?;
        let bytes = if bytes.is_empty() { Bytes::from_static(b"null") } else { bytes };
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Server(format!("unexpected reply to {what}: {e}")))
    }

    pub async fn login(&self, user: &str, login_secret: &str) -> Result<LoginReply, ClientError> {
        let req = isr_wire::LoginRequest { user: user.to_owned(), login_secret: login_secret.to_owned() };
        self.call(Method::POST, self.url(&routes::login(), &[])?, Some(&req)).await
    }

    /// Replace the logged-in user's login secret (after every keyroot was rewrapped).
    pub async fn change_login_secret(&self, login_secret: &str) -> Result<(), ClientError> {
        let url = self.url(&routes::password(), &[])?;
        let req = isr_wire::PasswordRequest { login_secret: login_secret.to_owned() };
        self.ok_body(self.http.put(url).json(&req)).await?;
        Ok(())
    }

    pub async fn parcels(&self) -> Result<Vec<ParcelSummary>, ClientError> {
        self.call(Method::GET, self.url(&routes::parcels(), &[])?, NO_BODY).await
    }

    pub async fn parcel(&self, name: &str) -> Result<ParcelDetail, ClientError> {
        self.call(Method::GET, self.url(&routes::parcel(&parcel(name)?), &[])?, NO_BODY).await
    }

    pub async fn create_parcel(
        &self,
        name: &str,
        wrapped_keyroot: &[u8],
        recovery_keyroot: Option<&[u8]>,
        holder: &str,
        client_id: &str,
    ) -> Result<String, ClientError> {
        let req = isr_wire::CreateParcelRequest {
            name: parcel(name)?.into_string(),
            wrapped_keyroot: hex::encode(wrapped_keyroot),
            recovery_keyroot: recovery_keyroot.map(hex::encode),
            holder: holder.to_owned(),
            client_id: client_id.to_owned(),
        };
        let r: isr_wire::CreateParcelReply =
            self.call(Method::POST, self.url(&routes::parcels(), &[])?, Some(&req)).await?;
        Ok(r.lock_id)
    }

    /// Delete a parcel that has no version yet (undoing a create that failed); the server refuses any other.
    pub async fn delete_unfinished_parcel(&self, name: &str, client_id: &str) -> Result<(), ClientError> {
        let q = isr_wire::DeleteQuery { client_id: Some(client_id.to_owned()) };
        let url = self.url(&routes::parcel(&parcel(name)?), &q.pairs())?;
        self.ok_body(self.http.delete(url)).await?;
        Ok(())
    }

    pub async fn put_keyroot(&self, name: &str, wrapped: &[u8]) -> Result<(), ClientError> {
        let url = self.url(&routes::keyroot(&parcel(name)?), &[])?;
        let req = isr_wire::KeyrootRequest { wrapped_keyroot: hex::encode(wrapped) };
        self.ok_body(self.http.put(url).json(&req)).await?;
        Ok(())
    }

    pub async fn versions(&self, name: &str) -> Result<Vec<VersionInfo>, ClientError> {
        self.call(Method::GET, self.url(&routes::versions(&parcel(name)?), &[])?, NO_BODY).await
    }

    /// The manifest bytes of version `n` (`None` = head) and its number.
    pub async fn manifest(&self, name: &str, n: Option<u64>) -> Result<(u64, Bytes), ClientError> {
        let which = n.map_or(VersionRef::Head, VersionRef::Number);
        let url = self.url(&routes::manifest(&parcel(name)?, which), &[])?;
        let resp = self.send(self.http.get(url)).await?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        let version = resp
            .headers()
            .get(routes::VERSION_HEADER)
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
        let q = isr_wire::LockIdQuery { lock_id: Some(lock_id.to_owned()) };
        let url = self.url(&routes::keyring(&parcel(name)?, hash), &q.pairs())?;
        self.ok_body(self.http.put(url).body(bytes)).await?;
        Ok(())
    }

    /// A keyring by its hash, verified against the hash before it is returned.
    pub async fn keyring(&self, name: &str, hash: &Tag) -> Result<Bytes, ClientError> {
        let url = self.url(&routes::keyring(&parcel(name)?, hash), &[])?;
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
        let req = isr_wire::LockRequest { holder: holder.to_owned(), client_id: client_id.to_owned() };
        let r: isr_wire::LockReply =
            self.call(Method::POST, self.url(&routes::lock(&parcel(name)?), &[])?, Some(&req)).await?;
        Ok(r.lock_id)
    }

    /// Whether `lock_id` is still the parcel's lock: Ok, or `LockLost` (broken, naming who and when) or
    /// `Locked` (another client holds it now).
    pub async fn confirm_lock(&self, name: &str, lock_id: &str) -> Result<LockInfo, ClientError> {
        let q = isr_wire::LockIdQuery { lock_id: Some(lock_id.to_owned()) };
        let url = self.url(&routes::lock(&parcel(name)?), &q.pairs())?;
        self.call(Method::GET, url, NO_BODY).await
    }

    /// Release our lock (`lock_id`).
    pub async fn unlock(&self, name: &str, lock_id: &str) -> Result<(), ClientError> {
        let q = isr_wire::UnlockQuery { lock_id: Some(lock_id.to_owned()), ..Default::default() };
        let url = self.url(&routes::lock(&parcel(name)?), &q.pairs())?;
        self.ok_body(self.http.delete(url)).await?;
        Ok(())
    }

    /// Break the parcel's lock whoever holds it; `by` names this client to the one whose lock it was.
    pub async fn break_lock(&self, name: &str, by: &str) -> Result<(), ClientError> {
        let q = isr_wire::UnlockQuery { lock_id: None, force: true, by: Some(by.to_owned()) };
        let url = self.url(&routes::lock(&parcel(name)?), &q.pairs())?;
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
        if comment.len() > MAX_COMMENT {
            return Err(ClientError::Usage(format!("the comment is longer than {MAX_COMMENT} bytes")));
        }
        let req = isr_wire::CommitRequest {
            lock_id: lock_id.to_owned(),
            base_version,
            manifest: base64::engine::general_purpose::STANDARD.encode(manifest),
            client: client.to_owned(),
            comment: comment.to_owned(),
            bytes_uploaded,
        };
        let url = self.url(&routes::versions(&parcel(name)?), &[])?;
        let resp = self.send(self.http.post(url).json(&req)).await?;
        if resp.status() == StatusCode::CONFLICT {
            let bytes = self.body(resp).await?;
            if let Ok(p) = serde_json::from_slice::<ErrorBody>(&bytes) {
                if p.known_code() == Some(ErrorCode::MissingChunks) {
                    return Ok(Err(CommitRefusal::MissingChunks(
                        p.missing.unwrap_or_default().iter().filter_map(|h| Tag::from_hex(h)).collect(),
                    )));
                }
            }
            return Err(api_error(StatusCode::CONFLICT, &bytes));
        }
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        let bytes = self.body(resp).await?;
        let r: isr_wire::CommitReply =
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Server(format!("commit reply: {e}")))?;
        Ok(Ok(r.version))
    }

    /// Keep `tags` from the server's gc for as long as `lock_id` is the parcel's lock (and the gc grace period
    /// after): chunks uploaded under the lock ahead of the version that will reference them. One request per
    /// `MAX_HELD_TAGS` tags, none for no tags. A lost lock is `LockLost` or `Locked` (exit 3), as for a commit.
    pub async fn hold_chunks(&self, name: &str, lock_id: &str, tags: &[Tag]) -> Result<(), ClientError> {
        let url = self.url(&routes::held(&parcel(name)?), &[])?;
        for batch in tags.chunks(MAX_HELD_TAGS) {
            let req = isr_wire::HoldChunks::new(lock_id, batch);
            self.ok_body(self.http.post(url.clone()).json(&req)).await?;
        }
        Ok(())
    }

    /// Which of `tags` the server lacks (one round trip per [`MISSING_BATCH`] tags).
    pub async fn missing(&self, tags: &[Tag]) -> Result<Vec<Tag>, ClientError> {
        let mut out = Vec::new();
        for batch in tags.chunks(MISSING_BATCH) {
            let url = self.url(&routes::chunks_missing(), &[])?;
            let bytes = self.ok_body(self.http.post(url).body(isr_wire::encode_tags(batch))).await?;
            let missing = isr_wire::decode_tags(&bytes)
                .ok_or_else(|| ClientError::Server("malformed reply to chunks/missing".into()))?;
            out.extend(missing);
        }
        Ok(out)
    }

    pub async fn put_chunk(&self, tag: &Tag, stored: Bytes) -> Result<(), ClientError> {
        let url = self.url(&routes::chunk(tag), &[])?;
        self.ok_body(self.http.put(url).body(stored)).await?;
        Ok(())
    }

    /// Many chunks in one request (`POST chunks/fetch`, at most [`MAX_FETCH_TAGS`]): `each(k, chunk)` is
    /// called for `tags[k]`, in order, as soon as its last byte has arrived: its stored bytes verified against
    /// the tag, `Ok(None)` when the server has no copy, or the integrity error of a copy that is not the
    /// tag's. An `Err` from this function (the server could not be reached, the answer broke off or is
    /// malformed) concerns the tags not handed to `each` yet.
    pub async fn fetch_chunks(
        &self,
        tags: &[Tag],
        mut each: impl FnMut(usize, Result<Option<Bytes>, ClientError>),
    ) -> Result<(), ClientError> {
        assert!(tags.len() <= MAX_FETCH_TAGS, "at most {MAX_FETCH_TAGS} tags per chunks/fetch");
        let url = self.url(&routes::chunks_fetch(), &[])?;
        let mut resp = self.send(self.http.post(url).body(isr_wire::encode_tags(tags))).await?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        let malformed = |e: isr_wire::fetch::FrameError| ClientError::Server(e.to_string());
        let mut frames = isr_wire::fetch::FetchFrames::new(tags.len());
        let mut next = 0;
        while let Some(piece) = resp.chunk().await.map_err(|e| self.transport_error(e))? {
            frames.push(&piece).map_err(malformed)?;
            while let Some(frame) = frames.pop() {
                let tag = &tags[next];
                let verified = match frame {
                    Some(b) => isr_format::codec::verify_tag(tag, &b)
                        .map(|()| Some(b))
                        .map_err(|e| ClientError::chunk(tag, e)),
                    None => Ok(None),
                };
                each(next, verified);
                next += 1;
            }
        }
        frames.finish().map_err(malformed)
    }
}

/// No request body, for [`Transport::call`].
const NO_BODY: Option<&()> = None;

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Transport {
        Transport::new("http://127.0.0.1:7850", None).unwrap()
    }

    #[test]
    fn names_never_become_other_paths() {
        for bad in ["victim?", "victim#", "victim?force=true", ".", "..", "a/b", "", "%2e", ".hidden"] {
            let e = parcel(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
            assert!(e.to_string().starts_with("invalid parcel name"), "{e}");
        }
        let q = isr_wire::UnlockQuery { lock_id: None, force: true, by: Some("a b&c=d".into()) };
        let u = t().url(&routes::lock(&parcel("my-vm_1.0").unwrap()), &q.pairs()).unwrap();
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:7850/api/v1/parcels/my-vm_1.0/lock?force=true&by=a+b%26c%3Dd"
        );
    }

    #[test]
    fn a_base_path_is_kept() {
        let t = Transport::new("https://isr.example/deploy/", None).unwrap();
        let u = t.url(&routes::parcels(), &[]).unwrap();
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

    /// SPEC.md's exit code of every code of the wire contract, as a table a reader can check against
    /// docs/api.md (the mapping itself is the exhaustive match in [`error_for_code`]).
    fn expected_exit(code: ErrorCode) -> i32 {
        use ErrorCode as C;
        match code {
            C::Unauthorized | C::BadCredentials => 4,
            C::Locked | C::LockBroken | C::LockMismatch => 3,
            C::CorruptChunk
            | C::TagMismatch
            | C::HashMismatch
            | C::BadChunk
            | C::BadKeyring
            | C::BadManifest => 5,
            C::BadName => 2,
            _ => 1,
        }
    }

    #[test]
    fn every_error_code_has_its_exit_code() {
        for &code in ErrorCode::ALL {
            let body = serde_json::to_vec(&ErrorBody::new(code, "the server's message")).unwrap();
            let e = api_error(StatusCode::from_u16(code.status()).unwrap(), &body);
            assert_eq!(e.exit_code(), expected_exit(code), "{code}: {e:?}");
            assert!(e.to_string().contains("the server's message"), "{code}: {e}");
        }
        // Refusals are not retried; a server's failure is.
        let refused = serde_json::to_vec(&ErrorBody::new(ErrorCode::HasVersions, "m")).unwrap();
        assert!(!api_error(StatusCode::CONFLICT, &refused).is_transient());
        let internal = serde_json::to_vec(&ErrorBody::new(ErrorCode::Internal, "m")).unwrap();
        assert!(api_error(StatusCode::INTERNAL_SERVER_ERROR, &internal).is_transient());
    }

    #[test]
    fn unknown_codes_and_foreign_answers() {
        // A newer server's code: exit 1, its message kept.
        let e = api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error": "over quota by 3 GiB", "code": "quota_exceeded", "quota": 1}"#,
        );
        assert_eq!(e.exit_code(), 1, "{e:?}");
        assert!(e.to_string().contains("over quota by 3 GiB"), "{e}");
        // Not the API's answer: the status decides.
        assert_eq!(api_error(StatusCode::BAD_GATEWAY, b"<html>").exit_code(), 6);
        assert_eq!(api_error(StatusCode::UNAUTHORIZED, b"<html>").exit_code(), 4);
        assert_eq!(api_error(StatusCode::INTERNAL_SERVER_ERROR, b"").exit_code(), 1);
    }

    #[test]
    fn a_broken_lock_names_who_and_when() {
        let broken = ErrorBody {
            broken_by: Some("B".into()),
            broken_unix: Some(5),
            holder: Some("C".into()),
            since_unix: Some(6),
            ..ErrorBody::new(ErrorCode::LockBroken, "your lock on p was broken by B at T")
        };
        match api_error(StatusCode::CONFLICT, &serde_json::to_vec(&broken).unwrap()) {
            ClientError::LockLost(l) => {
                assert_eq!((l.broken_by.as_str(), l.broken_unix), ("B", 5));
                assert_eq!(l.holder_now, Some(("C".to_owned(), 6)));
            }
            other => panic!("{other:?}"),
        }
    }
}
