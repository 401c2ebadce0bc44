//! The HTTP API (`docs/api.md`): routes, authentication and request handling.

use crate::auth::{self, TokenCache};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::storage::Storage;
use axum::body::Body;
use axum::extract::{FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use isr_format::codec::ChunkError;
use isr_format::{KeyringTags, Manifest, RecoveryPublicKey, Tag};
use isr_store::meta::{LockInfo, LockRelease, NewParcel, NewVersion, VersionSel};
use isr_store::{MetaError, StoreError};
use isr_wire::limits::{
    MAX_CHUNK_BODY, MAX_COMMENT, MAX_FETCH_TAGS, MAX_HELD_TAGS, MAX_HEX_FIELD, MAX_JSON_BODY,
    MAX_KEYRING_BODY, MAX_MISSING_TAGS, MAX_TOKEN, TAG_LEN,
};
use isr_wire::{fetch, routes, ClientId, DisplayText, ErrorCode, LockId, ParcelName, UserName, VersionRef};
use std::sync::Arc;

/// Server-wide settings.
#[derive(Clone, Debug, Default)]
pub struct ServerSettings {
    /// Returned to clients at login.
    pub recovery_pubkey: Option<RecoveryPublicKey>,
    /// How failed logins hold back further attempts.
    pub login_throttle: auth::LoginThrottle,
}

/// Everything a request handler needs.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
pub struct Inner {
    pub storage: Storage,
    pub settings: ServerSettings,
    pub metrics: Metrics,
    pub tokens: TokenCache,
    pub logins: auth::LoginGate,
}

impl AppState {
    pub fn new(storage: Storage, settings: ServerSettings) -> Self {
        AppState(Arc::new(Inner {
            storage,
            settings,
            metrics: Metrics::default(),
            tokens: TokenCache::default(),
            logins: auth::LoginGate::default(),
        }))
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub fn storage(&self) -> &Storage {
        &self.0.storage
    }

    /// Recounts the chunk store for the `isr_chunks_stored` / `isr_store_bytes` gauges.
    pub async fn recount_store(&self) -> Result<(), StoreError> {
        let list = self.0.storage.chunks.store().list().await?;
        self.0.metrics.set_store(list.len() as u64, list.iter().map(|(_, n)| n).sum());
        Ok(())
    }
}

/// The routes, for [`crate::run`] or any other hyper/axum server. The patterns are the wire contract's
/// (`isr_wire::routes`), which the client's paths are built to match.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(routes::LOGIN, post(login))
        .route(routes::PASSWORD, put(change_password))
        .route(routes::PARCELS, get(list_parcels).post(create_parcel))
        .route(routes::PARCEL, get(get_parcel).delete(delete_parcel))
        .route(routes::KEYROOT, put(put_keyroot))
        .route(routes::VERSIONS, get(list_versions).post(commit))
        .route(routes::MANIFEST, get(get_manifest))
        .route(routes::KEYRING, put(put_keyring).get(get_keyring))
        .route(routes::LOCK, post(lock).delete(unlock).get(confirm_lock))
        .route(routes::HELD, post(hold_chunks))
        .route(routes::CHUNKS_MISSING, post(chunks_missing))
        .route(routes::CHUNKS_FETCH, post(chunks_fetch))
        .route(routes::CHUNK, put(put_chunk).get(get_chunk))
        .route(routes::METRICS, get(metrics))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

async fn count_requests(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .and_then(|m| routes::ALL.iter().find(|r| **r == m.as_str()).copied())
        .unwrap_or("unmatched");
    let resp = next.run(req).await;
    st.0.metrics.request(route, resp.status().as_u16());
    resp
}

/// The authenticated user of a request (`Authorization: Bearer TOKEN`).
#[derive(Debug, Clone)]
pub struct Authed(pub String);

impl FromRequestParts<AppState> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN)
            .ok_or_else(ApiError::unauthorized)?;
        match st.0.tokens.validate(st.0.storage.meta.as_ref(), token).await? {
            Some(user) => Ok(Authed(user)),
            None => Err(ApiError::unauthorized()),
        }
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Reads a request body of at most `limit` bytes: refused from its Content-Length before reading, and
/// while streaming (a chunked body is never buffered past the limit).
async fn read_body(st: &AppState, headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = content_length(headers);
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
    let mut stream = body.into_data_stream();
    while let Some(frame) = stream.next().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
        if buf.len() + frame.len() > limit {
            st.0.metrics.add_in(buf.len());
            return Err(ApiError::too_large(limit));
        }
        if buf.is_empty() && declared == Some(frame.len() as u64) {
            // The whole body in one frame: keep it without copying.
            st.0.metrics.add_in(frame.len());
            return Ok(frame);
        }
        buf.extend_from_slice(&frame);
    }
    st.0.metrics.add_in(buf.len());
    Ok(buf.freeze())
}

async fn read_json<T: serde::de::DeserializeOwned>(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let bytes = read_body(st, headers, body, MAX_JSON_BODY).await?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid JSON request: {e}")))
}

/// A parcel name from a path: an invalid one names no parcel (404, as another user's parcel does).
fn check_name(name: &str) -> Result<ParcelName, ApiError> {
    ParcelName::parse(name).map_err(|_| ApiError::no_such_parcel(name))
}

/// A display name from a client (holder, breaker, client): bounded, no control characters (it is shown to
/// other users and written to logs).
fn check_text(field: &str, value: String) -> Result<DisplayText, ApiError> {
    DisplayText::parse(&value).map_err(|e| ApiError::bad_request(format!("{field}: {}", e.why)))
}

/// A lock id from a query or body: the ids this server issues (hex), anything else is malformed.
fn check_lock_id(value: &str) -> Result<LockId, ApiError> {
    LockId::parse(value).map_err(|e| ApiError::bad_request(format!("lock_id: {}", e.why)))
}

fn decode_hex(field: &str, value: &str) -> Result<Vec<u8>, ApiError> {
    if value.len() > MAX_HEX_FIELD {
        return Err(ApiError::bad_request(format!("{field} is too long")));
    }
    hex::decode(value).map_err(|_| ApiError::bad_request(format!("{field} must be hex")))
}

fn octets(st: &AppState, data: Bytes) -> Response {
    st.0.metrics.add_out(data.len());
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], data).into_response()
}

// ---- login ----

async fn login(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<isr_wire::LoginReply>, ApiError> {
    let req: isr_wire::LoginRequest = read_json(&st, &headers, body).await?;
    let secret = parse_login_secret(&req.login_secret)?;
    st.0.metrics.login_attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let meta = &st.0.storage.meta;
    // A name no user can have is an unknown user (same answer, same cost).
    let user = match UserName::parse(&req.user) {
        Ok(name) => meta.user(name.as_str()).await?,
        Err(_) => None,
    };
    if let Some(u) = &user {
        // Held back after repeated failures, and counted as a failure before the verification (see auth).
        st.0.logins.admit(meta.as_ref(), &st.0.settings.login_throttle, &u.name).await?;
    }
    let phc = user.as_ref().map_or_else(|| auth::dummy_hash().to_owned(), |u| u.login_hash.clone());
    st.0.metrics.login_verifications.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ok = tokio::task::spawn_blocking(move || auth::verify_login_secret(&phc, &secret))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let Some(user) = user.filter(|_| ok) else {
        st.0.metrics.logins_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(user = %req.user.escape_debug(), "failed login");
        return Err(ApiError::new(ErrorCode::BadCredentials, "wrong user name or password"));
    };
    meta.clear_login_failures(&user.name).await?;
    let now = crate::now_unix();
    let _ = meta.purge_expired_tokens(now).await;
    let (token, hash) = auth::new_token();
    let expires_unix = now + auth::TOKEN_LIFETIME_SECS;
    meta.add_token(hash, &user.name, expires_unix).await?;
    tracing::info!(user = %user.name, "login");
    Ok(Json(isr_wire::LoginReply {
        token,
        expires_unix,
        convergence_secret: st.0.storage.convergence_secret.to_hex(),
        recovery_pubkey: st.0.settings.recovery_pubkey.map(|k| k.to_hex()),
    }))
}

fn parse_login_secret(hex_secret: &str) -> Result<[u8; 32], ApiError> {
    let mut secret = [0u8; 32];
    hex::decode_to_slice(hex_secret.trim(), &mut secret)
        .map_err(|_| ApiError::bad_request("login_secret must be 64 hex digits"))?;
    Ok(secret)
}

/// The authenticated user's new login secret (the client has rewrapped every parcel's keyroot first).
async fn change_password(
    State(st): State<AppState>,
    Authed(user): Authed,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let req: isr_wire::PasswordRequest = read_json(&st, &headers, body).await?;
    let secret = isr_format::LoginSecret(parse_login_secret(&req.login_secret)?);
    let hash = tokio::task::spawn_blocking(move || auth::hash_login_secret(&secret))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    // Also clears the failed-login counter.
    st.0.storage.meta.set_login_hash(&user, &hash).await?;
    tracing::info!(%user, "password changed");
    Ok(StatusCode::NO_CONTENT)
}

// ---- parcels ----

fn wire_lock(lock: &Option<LockInfo>) -> Option<isr_wire::LockInfo> {
    lock.as_ref().map(|l| isr_wire::LockInfo { holder: l.holder.clone(), since_unix: l.since_unix })
}

async fn list_parcels(
    State(st): State<AppState>,
    Authed(user): Authed,
) -> Result<Json<Vec<isr_wire::ParcelSummary>>, ApiError> {
    let list = st.0.storage.meta.list_parcels(Some(&user)).await?;
    Ok(Json(
        list.iter()
            .map(|p| isr_wire::ParcelSummary {
                name: p.name.clone(),
                head: p.head,
                created_unix: p.created_unix,
                lock: wire_lock(&p.lock),
            })
            .collect(),
    ))
}

fn new_lock(holder: String, client_id: String) -> Result<LockInfo, ApiError> {
    let holder = check_text("holder", holder)?;
    let client_id =
        ClientId::parse(&client_id).map_err(|e| ApiError::bad_request(format!("client_id: {}", e.why)))?;
    Ok(LockInfo {
        lock_id: hex::encode(isr_format::random_bytes::<16>()),
        holder: holder.into_string(),
        client_id: client_id.into_string(),
        since_unix: crate::now_unix(),
    })
}

async fn create_parcel(
    State(st): State<AppState>,
    Authed(user): Authed,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: isr_wire::CreateParcelRequest = read_json(&st, &headers, body).await?;
    let name = ParcelName::parse(&req.name).map_err(|e| ApiError::new(ErrorCode::BadName, e.to_string()))?;
    let wrapped_keyroot = decode_hex("wrapped_keyroot", &req.wrapped_keyroot)?;
    let recovery_keyroot =
        req.recovery_keyroot.as_deref().map(|r| decode_hex("recovery_keyroot", r)).transpose()?;
    let lock = new_lock(req.holder, req.client_id)?;
    let lock_id = lock.lock_id.clone();
    st.0.storage
        .meta
        .create_parcel(NewParcel {
            user: user.clone(),
            name: name.to_string(),
            wrapped_keyroot,
            recovery_keyroot,
            lock,
            now_unix: crate::now_unix(),
        })
        .await?;
    tracing::info!(%user, parcel = %name, "parcel created");
    Ok((StatusCode::CREATED, Json(isr_wire::CreateParcelReply { lock_id })).into_response())
}

async fn get_parcel(
    State(st): State<AppState>,
    Authed(user): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let p = st.0.storage.meta.parcel(&user, &name).await?;
    Ok(Json(isr_wire::ParcelDetail {
        lock: wire_lock(&p.info.lock),
        name: p.info.name,
        head: p.info.head,
        created_unix: p.info.created_unix,
        wrapped_keyroot: hex::encode(&p.wrapped_keyroot),
        network_policy: p.network_policy.map(|n| n.as_str().to_owned()),
    })
    .into_response())
}

async fn put_keyroot(
    State(st): State<AppState>,
    Authed(user): Authed,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    check_name(&name)?;
    let req: isr_wire::KeyrootRequest = read_json(&st, &headers, body).await?;
    let wrapped = decode_hex("wrapped_keyroot", &req.wrapped_keyroot)?;
    st.0.storage.meta.set_wrapped_keyroot(&user, &name, &wrapped).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_parcel(
    State(st): State<AppState>,
    Authed(user): Authed,
    Path(name): Path<String>,
    Query(q): Query<isr_wire::DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    check_name(&name)?;
    st.0.storage.meta.delete_parcel(&user, &name, q.client_id.as_deref()).await?;
    tracing::info!(%user, parcel = %name, "parcel deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ---- versions ----

async fn list_versions(
    State(st): State<AppState>,
    Authed(user): Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let list = st.0.storage.meta.versions(&user, &name).await?;
    let out: Vec<_> = list
        .into_iter()
        .map(|v| isr_wire::VersionInfo {
            version: v.version,
            created_unix: v.created_unix,
            client: v.client,
            bytes_uploaded: v.bytes_uploaded,
            comment: v.comment,
        })
        .collect();
    Ok(Json(out).into_response())
}

async fn get_manifest(
    State(st): State<AppState>,
    Authed(user): Authed,
    Path((name, n)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let which = match VersionRef::parse(&n) {
        Some(VersionRef::Head) => VersionSel::Head,
        Some(VersionRef::Number(n)) => VersionSel::Number(n),
        None => {
            return Err(ApiError::new(
                ErrorCode::NoSuchVersion,
                format!("no version {n:?} (a number or head)"),
            ))
        }
    };
    let (number, manifest) = st.0.storage.meta.manifest(&user, &name, which).await?;
    let mut resp = octets(&st, manifest);
    resp.headers_mut().insert(routes::VERSION_HEADER, HeaderValue::from(number));
    Ok(resp)
}

async fn commit(
    State(st): State<AppState>,
    Authed(user): Authed,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    // Someone else's parcel is a missing one, whatever the request holds.
    st.0.storage.meta.parcel(&user, &name).await?;
    let req: isr_wire::CommitRequest = read_json(&st, &headers, body).await?;
    let client = check_text("client", req.client)?.into_string();
    if req.comment.len() > MAX_COMMENT {
        return Err(ApiError::bad_request(format!("comment longer than {MAX_COMMENT} bytes")));
    }
    let lock_id = check_lock_id(&req.lock_id)?;
    let bad = |m: String| ApiError::new(ErrorCode::BadManifest, m);
    let manifest = base64::engine::general_purpose::STANDARD
        .decode(req.manifest.as_bytes())
        .map_err(|e| bad(format!("manifest is not base64: {e}")))?;
    let parsed = Manifest::parse_unauthenticated(&manifest).map_err(|e| bad(e.to_string()))?;
    // Only the client can check the MAC; a bound manifest naming another parcel or number is a client bug
    // (or a replay) that would make the version unopenable, so it is refused here already.
    if let Some(b) = &parsed.binding {
        if b.user != user || b.parcel != name.as_str() {
            return Err(bad(format!(
                "the manifest is sealed for parcel {}/{}, not {user}/{name}",
                b.user, b.parcel
            )));
        }
        if Some(b.version) != req.base_version.checked_add(1) {
            return Err(bad(format!(
                "the manifest is sealed for version {}, but a commit on base {} makes version {}",
                b.version,
                req.base_version,
                req.base_version.saturating_add(1)
            )));
        }
    }
    let keyrings: Vec<Tag> = parsed.manifest.images().map(|(_, r)| r.keyring).collect();
    let v = NewVersion {
        user: user.clone(),
        parcel: name.to_string(),
        lock_id: lock_id.into_string(),
        base_version: req.base_version,
        manifest: Bytes::from(manifest),
        keyrings,
        client,
        comment: req.comment,
        bytes_uploaded: req.bytes_uploaded,
        now_unix: crate::now_unix(),
    };
    // Run to completion even if the client goes away: the outcome is all or nothing either way. The chunks
    // are made durable first, in one step, outside the transaction; the presence check inside it syncs
    // again only for a chunk renamed into place since.
    let st2 = st.clone();
    let version = tokio::spawn(async move {
        let chunks = &st2.0.storage.chunks;
        let synced_at = chunks.make_durable().await?;
        st2.0.storage.meta.commit_version(v, &chunks.for_commit(synced_at)).await
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    tracing::info!(%user, parcel = %name, version, "version committed");
    Ok((StatusCode::CREATED, Json(isr_wire::CommitReply { version })).into_response())
}

// ---- keyrings ----

fn parse_tag(s: &str, what: &str) -> Result<Tag, ApiError> {
    Tag::from_hex(s).ok_or_else(|| ApiError::bad_request(format!("{what} must be 64 hex digits")))
}

fn required_lock_id(q: isr_wire::LockIdQuery) -> Result<String, ApiError> {
    let id = q.lock_id.ok_or_else(|| ApiError::bad_request("the lock_id=HEX query parameter is required"))?;
    Ok(check_lock_id(&id)?.into_string())
}

async fn put_keyring(
    State(st): State<AppState>,
    Authed(user): Authed,
    Path((name, hash)): Path<(String, String)>,
    Query(q): Query<isr_wire::LockIdQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    check_name(&name)?;
    let hash = parse_tag(&hash, "keyring hash")?;
    // Someone else's parcel is a missing one, whatever the request holds.
    st.0.storage.meta.parcel(&user, &name).await?;
    let lock_id = required_lock_id(q)?;
    // The parcel must be this user's and locked by the caller before the body is worth reading; the store
    // checks the lock again in the transaction that stores the keyring.
    st.0.storage.meta.confirm_lock(&user, &name, &lock_id).await?;
    let data = read_body(&st, &headers, body, MAX_KEYRING_BODY).await?;
    let d2 = data.clone();
    let checked = tokio::task::spawn_blocking(move || {
        if Tag::of(&d2) != hash {
            return Err(ApiError::new(
                ErrorCode::HashMismatch,
                "keyring bytes do not hash to the hash in the URL",
            ));
        }
        KeyringTags::parse(&d2).map(|_| ()).map_err(|e| ApiError::new(ErrorCode::BadKeyring, e.to_string()))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    checked?;
    let new = st.0.storage.meta.put_keyring(&user, &name, &lock_id, hash, data).await?;
    Ok(if new { StatusCode::CREATED } else { StatusCode::OK })
}

async fn get_keyring(
    State(st): State<AppState>,
    Authed(user): Authed,
    Path((name, hash)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let hash = parse_tag(&hash, "keyring hash")?;
    match st.0.storage.meta.keyring(&user, &name, hash).await? {
        Some(data) => Ok(octets(&st, data)),
        None => Err(ApiError::new(ErrorCode::NoSuchKeyring, format!("no keyring {hash} in parcel {name}"))),
    }
}

// ---- locks ----

async fn lock(
    State(st): State<AppState>,
    Authed(user): Authed,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let req: isr_wire::LockRequest = read_json(&st, &headers, body).await?;
    let lock = st.0.storage.meta.acquire_lock(&user, &name, new_lock(req.holder, req.client_id)?).await?;
    tracing::info!(%user, parcel = %name, holder = %lock.holder, "lock");
    Ok(Json(isr_wire::LockReply { lock_id: lock.lock_id, since_unix: lock.since_unix }).into_response())
}

/// Whether `lock_id` is still the parcel's lock (a client confirms before it resumes, and at checkout of a
/// parcel it already has).
async fn confirm_lock(
    State(st): State<AppState>,
    Authed(user): Authed,
    Path(name): Path<String>,
    Query(q): Query<isr_wire::LockIdQuery>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    st.0.storage.meta.parcel(&user, &name).await?;
    let lock_id = required_lock_id(q)?;
    let lock = st.0.storage.meta.confirm_lock(&user, &name, &lock_id).await?;
    Ok(Json(isr_wire::LockInfo { holder: lock.holder, since_unix: lock.since_unix }).into_response())
}

async fn unlock(
    State(st): State<AppState>,
    Authed(user): Authed,
    Path(name): Path<String>,
    Query(q): Query<isr_wire::UnlockQuery>,
) -> Result<StatusCode, ApiError> {
    check_name(&name)?;
    let how = match (q.force, q.lock_id) {
        (true, _) => {
            let by = check_text("by", q.by.unwrap_or_else(|| format!("an unnamed client of {user}")))?;
            LockRelease::Force { by: by.into_string(), now_unix: crate::now_unix() }
        }
        (false, Some(id)) => LockRelease::Id(check_lock_id(&id)?.into_string()),
        (false, None) => return Err(ApiError::bad_request("give lock_id=HEX or force=true")),
    };
    let forced = matches!(how, LockRelease::Force { .. });
    st.0.storage.meta.release_lock(&user, &name, how).await?;
    tracing::info!(%user, parcel = %name, force = forced, "unlock");
    Ok(StatusCode::NO_CONTENT)
}

/// Keeps chunks from gc under the caller's lock: uploaded (or about to be) ahead of the version that will
/// reference them. The lock is checked as a commit checks it, so a lost lock is told the same way.
async fn hold_chunks(
    State(st): State<AppState>,
    Authed(user): Authed,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    check_name(&name)?;
    // Someone else's parcel is a missing one, whatever the request holds.
    st.0.storage.meta.parcel(&user, &name).await?;
    let req: isr_wire::HoldChunks = read_json(&st, &headers, body).await?;
    let lock_id = check_lock_id(&req.lock_id)?;
    if req.tags.len() > MAX_HELD_TAGS {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!("more than {MAX_HELD_TAGS} tags in one request"),
        ));
    }
    let tags = req.tags.iter().map(|t| parse_tag(t, "every tag")).collect::<Result<Vec<_>, _>>()?;
    st.0.storage.meta.hold_chunks(&user, &name, lock_id.as_str(), &tags, crate::now_unix()).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- chunks ----

fn split_tags(body: &[u8], max: usize) -> Result<Vec<Tag>, ApiError> {
    let tags = isr_wire::decode_tags(body)
        .ok_or_else(|| ApiError::bad_request("body must be a concatenation of 32-byte tags"))?;
    if tags.len() > max {
        return Err(ApiError::too_large(max * TAG_LEN));
    }
    Ok(tags)
}

async fn chunks_missing(
    State(st): State<AppState>,
    _auth: Authed,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&st, &headers, body, MAX_MISSING_TAGS * TAG_LEN).await?;
    let tags = split_tags(&body, MAX_MISSING_TAGS)?;
    let missing = st.0.storage.chunks.missing(&tags).await?;
    let mut out = BytesMut::with_capacity(missing.len() * 32);
    for t in &missing {
        out.extend_from_slice(&t.0);
    }
    Ok(octets(&st, out.freeze()))
}

/// Chunks of a batched fetch read per store call.
const FETCH_GROUP: usize = 8;

async fn chunks_fetch(
    State(st): State<AppState>,
    _auth: Authed,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&st, &headers, body, MAX_FETCH_TAGS * TAG_LEN).await?;
    let tags = split_tags(&body, MAX_FETCH_TAGS)?;
    // Read FETCH_GROUP chunks per store call (one blocking hop for a filesystem store), two groups ahead of
    // the socket; each chunk goes out as its length word and its bytes, uncopied.
    let groups: Vec<Vec<Tag>> = tags.chunks(FETCH_GROUP).map(<[Tag]>::to_vec).collect();
    let st2 = st.clone();
    let frames = futures::stream::iter(groups)
        .map(move |group| {
            let st = st2.clone();
            async move {
                let read = st.0.storage.chunks.read_many(group.clone()).await;
                group
                    .iter()
                    .zip(read)
                    .map(|(tag, r)| {
                        r.unwrap_or_else(|e| {
                            // An absent frame: the client reports the chunk missing (never wrong data).
                            tracing::error!(%tag, error = %e, "chunk unreadable in batched fetch");
                            None
                        })
                    })
                    .collect::<Vec<_>>()
            }
        })
        .buffered(2)
        .flat_map(futures::stream::iter)
        .flat_map(move |data| {
            let header = Bytes::copy_from_slice(&fetch::frame_header(data.as_ref().map(Bytes::len)));
            st.0.metrics.add_out(header.len() + data.as_ref().map_or(0, Bytes::len));
            if data.is_some() {
                st.0.metrics.chunk_sent();
            }
            futures::stream::iter([Some(header), data].into_iter().flatten().map(Ok::<_, std::io::Error>))
        });
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))],
        Body::from_stream(frames),
    )
        .into_response())
}

async fn put_chunk(
    State(st): State<AppState>,
    _auth: Authed,
    Path(tag): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let tag = parse_tag(&tag, "chunk tag")?;
    let data = read_body(&st, &headers, body, MAX_CHUNK_BODY).await?;
    let len = data.len();
    // Written (durable at the next commit's sync, or when S3 acknowledges it), touched if it was there.
    match st.0.storage.chunks.put(&tag, data).await {
        Ok(true) => {
            st.0.metrics.chunk_stored(len);
            Ok(StatusCode::CREATED)
        }
        Ok(false) => Ok(StatusCode::OK),
        Err(MetaError::Chunks(StoreError::Integrity {
            source: ChunkError::TagMismatch { actual, .. },
            ..
        })) => Err(ApiError::new(
            ErrorCode::TagMismatch,
            format!("chunk bytes hash to {actual}, not to the tag in the URL"),
        )),
        Err(MetaError::Chunks(StoreError::Integrity { source, .. })) => {
            Err(ApiError::new(ErrorCode::BadChunk, source.to_string()))
        }
        Err(MetaError::Chunks(e)) => Err(e.into()),
        Err(e) => Err(e.into()),
    }
}

async fn get_chunk(
    State(st): State<AppState>,
    _auth: Authed,
    Path(tag): Path<String>,
) -> Result<Response, ApiError> {
    let tag = parse_tag(&tag, "chunk tag")?;
    match st.0.storage.chunks.read(&tag).await? {
        Some(data) => {
            st.0.metrics.chunk_sent();
            Ok(octets(&st, data))
        }
        None => Err(ApiError::new(ErrorCode::NoSuchChunk, format!("no chunk {tag}"))),
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    let locks = st.0.storage.meta.locks_held().await.unwrap_or(0);
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"))],
        st.0.metrics.render(locks, st.0.logins.counters.held_back.load(std::sync::atomic::Ordering::Relaxed)),
    )
        .into_response()
}
