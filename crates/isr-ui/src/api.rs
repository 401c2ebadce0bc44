//! The console's HTTP routes: the page, the JSON API the page polls and posts to, and the VNC WebSocket.

use crate::jobs::{JobState, JobView, Jobs};
use crate::{UiError, UiSettings};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use isr_client::home::Home;
use isr_client::parcel::{Client, LocalStateName};
use isr_client::resume::StopRequest;
use isr_client::ClientError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const COOKIE: &str = "isr_ui";

/// A VM this console runs.
#[derive(Debug, Clone)]
pub struct RunningVm {
    pub stop: tokio::sync::mpsc::Sender<StopRequest>,
    pub vnc_socket: PathBuf,
    pub job: u64,
}

/// The console's state, shared by every request.
#[derive(Clone)]
pub struct Console(Arc<Inner>);

struct Inner {
    settings: UiSettings,
    /// The one-time token of the printed URL; `None` once spent.
    token: Mutex<Option<String>>,
    /// The session cookie's value (random, this process only).
    session: String,
    /// A client kept for the page's polling (its password-derived secrets are derived once).
    status: tokio::sync::Mutex<Client>,
    jobs: Arc<Jobs>,
    running: Mutex<HashMap<String, RunningVm>>,
}

impl Console {
    pub fn new(settings: UiSettings, token: String) -> Result<Console, UiError> {
        let mut status = new_client(&settings)?;
        // Derive the password's secrets now, once: every job adopts them.
        status.secrets()?;
        Ok(Console(Arc::new(Inner {
            settings,
            token: Mutex::new(Some(token)),
            session: crate::new_token(),
            status: tokio::sync::Mutex::new(status),
            jobs: Arc::new(Jobs::default()),
            running: Mutex::new(HashMap::new()),
        })))
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningVm>> {
        self.0.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn running_vm(&self, parcel: &str) -> Option<RunningVm> {
        self.running().get(parcel).cloned()
    }

    /// A client for one job, sharing the status client's secrets.
    async fn job_client(&self, job: u64) -> Result<Client, ClientError> {
        let mut c = new_client(&self.0.settings).map_err(|e| ClientError::Other(e.to_string()))?;
        c.adopt_secrets(&*self.0.status.lock().await);
        c.set_progress(self.0.jobs.progress(job));
        Ok(c)
    }

    /// Suspend every VM this console runs and wait until each has stopped (the console is closing).
    pub async fn suspend_all(&self) {
        let vms: Vec<RunningVm> = self.running().values().cloned().collect();
        for vm in &vms {
            let _ = vm.stop.send(StopRequest::Suspend).await;
        }
        while !self.running().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Start `op` on `parcel` as a job running `work` with its own client.
    fn spawn_job<F, Fut>(&self, parcel: &str, op: &str, cancellable: bool, work: F) -> u64
    where
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<String, ClientError>> + Send + 'static,
    {
        let id = self.0.jobs.start(parcel, op);
        let me = self.clone();
        let task = tokio::spawn(async move {
            let outcome = match me.job_client(id).await {
                Ok(c) => work(c).await,
                Err(e) => Err(e),
            };
            me.0.jobs.finish(
                id,
                match outcome {
                    Ok(message) => JobState::Done { message },
                    Err(e) => JobState::Failed { message: e.to_string(), exit_code: e.exit_code() },
                },
            );
        });
        if cancellable {
            self.0.jobs.set_abort(id, task.abort_handle());
        }
        id
    }
}

fn new_client(s: &UiSettings) -> Result<Client, UiError> {
    let home = Home::open(&s.home)?;
    let pw = s.password.clone();
    let mut c = Client::new(
        home,
        s.user.clone(),
        s.server.clone(),
        s.ca_pem.clone(),
        Box::new(move || Ok(pw.clone())),
    );
    c.set_lookaside(s.lookaside.clone());
    Ok(c)
}

pub fn router(state: Console) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/api/state", get(api_state))
        .route("/api/parcels/{name}/versions", get(versions))
        .route("/api/parcels/{name}/chunks", get(chunks))
        .route("/api/parcels/{name}/{op}", post(operation))
        .route("/api/jobs/{id}/cancel", post(cancel))
        .route("/api/parcels/{name}/vnc", get(crate::vnc::websocket))
        .fallback(get(asset))
        .with_state(state)
}

// ---- access ----

/// A request from the page that opened the console's URL (it holds the session cookie).
pub struct Session;

fn has_session(headers: &HeaderMap, console: &Console) -> bool {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).any(
        |c| {
            c.trim()
                .strip_prefix(COOKIE)
                .and_then(|r| r.strip_prefix('='))
                .is_some_and(|v| v == console.0.session)
        },
    )
}

impl FromRequestParts<Console> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &Console) -> Result<Self, Self::Rejection> {
        if !has_session(&parts.headers, st) {
            return Err((StatusCode::FORBIDDEN, "open the URL that `isr ui` printed").into_response());
        }
        // State-changing requests must come from the page's own script: no cross-site form can set this.
        if parts.method != axum::http::Method::GET && !parts.headers.contains_key("x-isr-ui") {
            return Err((StatusCode::FORBIDDEN, "missing X-Isr-Ui header").into_response());
        }
        Ok(Session)
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn index(State(st): State<Console>, headers: HeaderMap, Query(q): Query<TokenQuery>) -> Response {
    if let Some(t) = q.token {
        let mut token = st.0.token.lock().unwrap_or_else(|p| p.into_inner());
        if token.as_deref() == Some(t.as_str()) {
            *token = None;
            let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", st.0.session);
            let mut resp = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            return resp;
        }
        return (StatusCode::FORBIDDEN, "this console URL was used already; run `isr ui` again")
            .into_response();
    }
    if !has_session(&headers, &st) {
        return (StatusCode::FORBIDDEN, "open the URL that `isr ui` printed").into_response();
    }
    asset_response("/index.html")
}

async fn asset(State(st): State<Console>, headers: HeaderMap, uri: axum::http::Uri) -> Response {
    if !has_session(&headers, &st) {
        return (StatusCode::FORBIDDEN, "open the URL that `isr ui` printed").into_response();
    }
    asset_response(uri.path())
}

fn asset_response(path: &str) -> Response {
    match crate::assets::get(path) {
        Some((mime, bytes)) => {
            ([(header::CONTENT_TYPE, mime), (header::CACHE_CONTROL, "no-store")], bytes).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}

// ---- errors ----

/// A client error as the page shows it: the same message as the CLI, and its exit code's meaning.
struct ApiError(ClientError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.0.exit_code();
        let status = match code {
            2 => StatusCode::BAD_REQUEST,
            3 => StatusCode::CONFLICT,
            4 => StatusCode::UNAUTHORIZED,
            5 => StatusCode::UNPROCESSABLE_ENTITY,
            6 => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(serde_json::json!({"error": self.0.to_string(), "exit_code": code}))).into_response()
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        ApiError(e)
    }
}

fn check_name(name: &str) -> Result<(), ApiError> {
    isr_client::home::valid_parcel_name(name).map_err(ApiError)
}

// ---- state ----

#[derive(Serialize)]
struct ParcelView {
    name: String,
    head: Option<u64>,
    lock: Option<isr_client::transport::LockInfo>,
    state: LocalStateName,
    base: Option<u64>,
    chunks: isr_client::parcel::ChunkCounts,
    pending_upload_bytes: u64,
    memory_image: bool,
    /// A VM of it runs in this console (its screen can be shown).
    screen: bool,
    /// The operation running on it from this console, if any.
    busy: Option<String>,
}

#[derive(Serialize)]
struct StateView {
    user: String,
    offline: Option<String>,
    parcels: Vec<ParcelView>,
    jobs: Vec<JobView>,
}

async fn api_state(State(st): State<Console>, _s: Session) -> Result<Json<StateView>, ApiError> {
    let mut c = st.0.status.lock().await;
    let listing = c.list().await?;
    let mut parcels = Vec::new();
    for (p, state) in listing.parcels {
        let mut view = ParcelView {
            name: p.name.clone(),
            head: listing.offline.is_none().then_some(p.head),
            lock: p.lock.clone(),
            state,
            base: None,
            chunks: Default::default(),
            pending_upload_bytes: 0,
            memory_image: false,
            screen: st.running_vm(&p.name).is_some(),
            busy: st.0.jobs.running_op(&p.name),
        };
        if state != LocalStateName::Absent {
            match c.stat(&p.name).await {
                Ok(s) => {
                    view.base = s.base_version;
                    view.chunks = s.chunks;
                    view.pending_upload_bytes = s.pending_upload_bytes;
                    view.memory_image = s.memory_image;
                }
                Err(e) => tracing::warn!(parcel = %p.name, error = %e, "stat failed"),
            }
        }
        parcels.push(view);
    }
    Ok(Json(StateView {
        user: st.0.settings.user.clone(),
        offline: listing.offline,
        parcels,
        jobs: st.0.jobs.views(),
    }))
}

async fn versions(
    State(st): State<Console>,
    _s: Session,
    Path(name): Path<String>,
) -> Result<Json<Vec<isr_client::transport::VersionInfo>>, ApiError> {
    check_name(&name)?;
    Ok(Json(st.0.status.lock().await.versions(&name).await?))
}

async fn chunks(
    State(st): State<Console>,
    _s: Session,
    Path(name): Path<String>,
) -> Result<Json<isr_client::parcel::ChunkMap>, ApiError> {
    check_name(&name)?;
    Ok(Json(st.0.status.lock().await.chunk_map(&name).await?))
}

// ---- operations ----

#[derive(Deserialize, Default)]
struct OpBody {
    #[serde(default)]
    message: String,
    #[serde(default)]
    version: Option<u64>,
}

#[derive(Serialize)]
struct Started {
    job: Option<u64>,
    message: String,
}

async fn operation(
    State(st): State<Console>,
    _s: Session,
    Path((name, op)): Path<(String, String)>,
    body: Option<Json<OpBody>>,
) -> Result<Json<Started>, ApiError> {
    check_name(&name)?;
    let body = body.map(|Json(b)| b).unwrap_or_default();
    if let Some(busy) = st.0.jobs.running_op(&name) {
        // Suspend and power off go to a running VM; anything else waits for the running operation.
        if !(busy == "resume" && matches!(op.as_str(), "suspend" | "poweroff")) {
            return Err(ApiError(ClientError::Usage(format!("{name} is busy: {busy} is running"))));
        }
    }
    let n = name.clone();
    let job = match op.as_str() {
        "checkout" => st.spawn_job(&name, "checkout", true, move |mut c| async move {
            let co = c.checkout(&n, body.version).await?;
            Ok(match co.note {
                Some(note) => format!("checked out {n} at version {}: {note}", co.state.base_version),
                None => format!("checked out {n} at version {}", co.state.base_version),
            })
        }),
        "hoard" => st.spawn_job(&name, "hoard", true, move |mut c| async move {
            let t = c.hoard(&n).await?;
            Ok(format!("hoarded {n}: fetched {} chunks ({} bytes)", t.chunks, t.bytes))
        }),
        "sync" => st.spawn_job(&name, "sync", true, move |mut c| async move {
            Ok(match c.sync(&n, &body.message).await? {
                Some((v, t)) => format!("synced {n} as version {v}: sent {} chunks", t.chunks),
                None => format!("{n} has no local changes"),
            })
        }),
        "checkin" => st.spawn_job(&name, "checkin", true, move |mut c| async move {
            let out = c.checkin(&n, &body.message).await?;
            let note = out.note.map(|n| format!(" ({n})")).unwrap_or_default();
            Ok(match out.synced {
                Some((v, t)) => format!("checked in {n} as version {v}: sent {} chunks{note}", t.chunks),
                None => format!("checked in {n}: no changes{note}"),
            })
        }),
        "discard" => st.spawn_job(&name, "discard", false, move |mut c| async move {
            c.discard(&n)?;
            Ok(format!("discarded local changes to {n}"))
        }),
        "rollback" => {
            let version = body.version.ok_or_else(|| {
                ApiError(ClientError::Usage("rollback needs the version to roll back to".into()))
            })?;
            st.spawn_job(&name, "rollback", false, move |mut c| async move {
                let v = c.rollback(&n, version).await?;
                Ok(format!("{n} version {v} has the content of version {version}"))
            })
        }
        "resume" => st.start_resume(&name)?,
        "suspend" | "poweroff" => {
            let how = if op == "suspend" { StopRequest::Suspend } else { StopRequest::Poweroff };
            if let Some(vm) = st.running_vm(&name) {
                let _ = vm.stop.send(how).await;
                return Ok(Json(Started { job: Some(vm.job), message: format!("{op} requested") }));
            }
            // Running elsewhere on this client (`isr resume` in a terminal): ask that process.
            st.spawn_job(&name, &op, false, move |mut c| async move {
                match c.stop_running(&n, how, std::time::Duration::from_secs(600)).await? {
                    Some(o) => Ok(format!("{n}: {}", o.outcome)),
                    None => Err(ClientError::Usage(format!("{n} is not running on this client"))),
                }
            })
        }
        other => return Err(ApiError(ClientError::Usage(format!("no operation {other:?}")))),
    };
    Ok(Json(Started { job: Some(job), message: format!("{op} started") }))
}

impl Console {
    /// Resume `name` in this process with its screen on a private VNC socket for the page.
    fn start_resume(&self, name: &str) -> Result<u64, ApiError> {
        if self.running_vm(name).is_some() {
            return Err(ApiError(ClientError::Usage(format!("{name} is running already"))));
        }
        let vnc_socket = self.0.settings.runtime_dir.join(format!("{name}.vnc"));
        let _ = std::fs::remove_file(&vnc_socket);
        let mut opts = self.0.settings.resume.clone();
        opts.display = isr_vmm::Display::Vnc { listen: format!("unix:{}", vnc_socket.display()) };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // Registered before the job starts, so that the job's end always finds (and removes) it.
        self.running().insert(name.to_owned(), RunningVm { stop: tx, vnc_socket, job: 0 });
        let n = name.to_owned();
        let me = self.clone();
        let id = self.spawn_job(name, "resume", false, move |mut c| async move {
            let r = c.resume(&n, &opts, rx).await;
            me.running().remove(&n);
            let r = r?;
            Ok(format!("{n}: {} ({})", r.outcome, r.accel))
        });
        if let Some(vm) = self.running().get_mut(name) {
            vm.job = id;
        }
        Ok(id)
    }
}

async fn cancel(State(st): State<Console>, _s: Session, Path(id): Path<u64>) -> Result<StatusCode, ApiError> {
    if st.0.jobs.cancel(id) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(ClientError::Usage(format!(
            "job {id} cannot be cancelled (finished, or not cancellable)"
        ))))
    }
}
