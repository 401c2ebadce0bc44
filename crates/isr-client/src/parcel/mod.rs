//! The client of one user on one server ([`Client`]: login, secrets, chunk sources, opened parcels) and the
//! parcel lifecycle, one command per module: what each `isr` command does, as library calls.

use crate::cache::ChunkCache;
use crate::error::ClientError;
use crate::home::{now_unix, valid_parcel_name, Home, LocalState, Session};
use crate::image::WorkingImage;
use crate::manifests::{self, ParcelKey};
use crate::parcel_files::ParcelFiles;
use crate::progress::{self, Progress};
use crate::source::ChunkSources;
use crate::transport::Transport;
use isr_format::{
    ConvergenceSecret, ImageKind, ImageLen, KdfParams, Keyring, Keyroot, Manifest, Tag, UserSecrets,
};
use std::path::PathBuf;
use std::sync::Arc;

mod check;
mod checkin;
mod checkout;
mod common;
mod create;
mod discard;
mod export;
mod hoard;
mod lock;
mod password;
mod rollback;
mod status;
mod sync;

use common::{read_file, unwrap_keyroot};

pub use crate::run::{is_running, RunGuard};
pub use check::CheckReport;
pub use checkin::CheckinOutcome;
pub use checkout::Checkout;
pub(crate) use common::encode_file;
pub use common::Transfer;
pub use create::CreateOptions;
pub use password::PasswordChange;
pub(crate) use status::has_local_changes;
pub use status::{ChunkCounts, ChunkMap, Listing, LocalStateName, ParcelStatus};
pub use sync::SyncPlan;

/// Supplies the user's password when one is needed (from `$ISR_PASSWORD` or a prompt).
pub type PasswordSource = Box<dyn Fn() -> Result<String, ClientError> + Send + Sync>;

/// One user of one server, with this client's home.
pub struct Client {
    pub home: Home,
    pub user: String,
    server: Option<String>,
    ca_pem: Option<Vec<u8>>,
    password: PasswordSource,
    secrets: Option<UserSecrets>,
    transport: Option<Transport>,
    session: Option<Session>,
    progress: Arc<dyn Progress>,
    /// Directories of chunk files asked before the server (`--lookaside`).
    lookaside: Vec<PathBuf>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("user", &self.user).field("server", &self.server).finish()
    }
}

/// A checked-out parcel opened for use (keyroot unwrapped, manifest and keyrings authenticated).
#[derive(Debug)]
pub struct Opened {
    pub state: LocalState,
    /// The parcel's local files.
    pub files: ParcelFiles,
    pub keyroot: Keyroot,
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    /// Set for a transient run's working copy of a version (`files` are then in the run's private directory):
    /// the chunks its images make go to this overlay store instead of the shared cache, and nothing of it is
    /// ever committed ([`crate::transient`]).
    pub overlay: Option<PathBuf>,
}

impl Opened {
    /// Whether this is a transient run's working copy ([`Opened::overlay`]).
    pub fn is_transient(&self) -> bool {
        self.overlay.is_some()
    }
}

impl Client {
    pub fn new(
        home: Home,
        user: String,
        server: Option<String>,
        ca_pem: Option<Vec<u8>>,
        password: PasswordSource,
    ) -> Self {
        Client {
            home,
            user,
            server,
            ca_pem,
            password,
            secrets: None,
            transport: None,
            session: None,
            progress: progress::quiet(),
            lookaside: Vec::new(),
        }
    }

    /// Ask these directories of chunk files (a USB stick, a peer's cache) for chunks before the server.
    pub fn set_lookaside(&mut self, dirs: Vec<PathBuf>) {
        self.lookaside = dirs;
    }

    /// The chunk source stack of this client: cache, lookaside directories, and the server when given.
    pub fn sources(&self, server: Option<Transport>) -> Result<Arc<ChunkSources>, ClientError> {
        Ok(Arc::new(ChunkSources::new(self.cache()?, self.lookaside.clone(), server)))
    }

    /// The chunk sources for an opened parcel: for a transient run's working copy, over a cache with its
    /// overlay ([`Opened::overlay`]), which takes every chunk its images make.
    pub fn sources_for(
        &self,
        o: &Opened,
        server: Option<Transport>,
    ) -> Result<Arc<ChunkSources>, ClientError> {
        let cache = match &o.overlay {
            Some(overlay) => ChunkCache::with_overlay(&self.home.cache_dir(), overlay)?,
            None => self.cache()?,
        };
        Ok(Arc::new(ChunkSources::new(cache, self.lookaside.clone(), server)))
    }

    /// Use the password-derived secrets another client of the same user derived already (deriving them is
    /// slow on purpose: a front end running many operations derives them once).
    pub fn adopt_secrets(&mut self, other: &Client) {
        if other.user == self.user {
            self.secrets = other.secrets.clone();
        }
    }

    /// Report the progress of long operations to `progress` (default: nowhere).
    pub fn set_progress(&mut self, progress: Arc<dyn Progress>) {
        self.progress = progress;
    }

    fn server_url(&self) -> Result<String, ClientError> {
        if let Some(s) = &self.server {
            return Ok(s.clone());
        }
        if let Some(s) = self.home.session()? {
            return Ok(s.server);
        }
        Err(ClientError::Usage("no server given: use --server URL or ISR_SERVER".into()))
    }

    /// The password-derived secrets (asks for the password once).
    pub fn secrets(&mut self) -> Result<&UserSecrets, ClientError> {
        if self.secrets.is_none() {
            let pw = (self.password)()?;
            self.secrets = Some(UserSecrets::derive(&self.user, &pw, KdfParams::DEFAULT)?);
        }
        Ok(self.secrets.as_ref().expect("just set"))
    }

    /// Log in (reusing a stored session token while it is valid) and return the transport.
    pub async fn connect(&mut self) -> Result<Transport, ClientError> {
        if let Some(t) = &self.transport {
            return Ok(t.clone());
        }
        let url = self.server_url()?;
        let base = Transport::new(&url, self.ca_pem.as_deref())?;
        if let Some(s) = self.home.session()? {
            if s.server == base.server() && s.user == self.user && s.expires_unix > now_unix() + 60 {
                let t = base.with_token(s.token.clone());
                self.session = Some(s);
                self.transport = Some(t.clone());
                return Ok(t);
            }
        }
        self.login_with(base).await
    }

    /// Log in now with the password, store the session token (never the password).
    pub async fn login(&mut self) -> Result<Transport, ClientError> {
        let url = self.server_url()?;
        let base = Transport::new(&url, self.ca_pem.as_deref())?;
        self.login_with(base).await
    }

    async fn login_with(&mut self, base: Transport) -> Result<Transport, ClientError> {
        let login = self.secrets()?.login.to_hex();
        let reply = base.login(&self.user, &login).await?;
        let s = Session {
            server: base.server().to_owned(),
            user: self.user.clone(),
            token: reply.token.clone(),
            expires_unix: reply.expires_unix,
            convergence_secret: reply.convergence_secret,
            recovery_pubkey: reply.recovery_pubkey,
        };
        self.home.save_session(&s)?;
        let t = base.with_token(reply.token);
        self.session = Some(s);
        self.transport = Some(t.clone());
        Ok(t)
    }

    pub(crate) fn convergence_secret_pub(&self) -> Result<ConvergenceSecret, ClientError> {
        self.convergence_secret()
    }

    fn convergence_secret(&self) -> Result<ConvergenceSecret, ClientError> {
        let s = match &self.session {
            Some(s) => s.clone(),
            None => self.home.session()?.ok_or_else(|| {
                ClientError::Usage("this client has never logged in: run `isr auth`".into())
            })?,
        };
        ConvergenceSecret::from_hex(&s.convergence_secret).ok_or_else(|| {
            ClientError::Integrity("stored session holds a malformed convergence secret".into())
        })
    }

    fn cache(&self) -> Result<ChunkCache, ClientError> {
        ChunkCache::open(&self.home.cache_dir())
    }

    /// Open a checked-out parcel: unwrap the keyroot and authenticate manifest and keyrings.
    pub fn open(&mut self, name: &str) -> Result<Opened, ClientError> {
        valid_parcel_name(name)?;
        self.clean_stale_runs(name)?;
        let state = self.home.local_state(&self.user, name)?.ok_or_else(|| {
            ClientError::Usage(format!("{name} is not checked out on this client: run `isr checkout {name}`"))
        })?;
        let files = self.home.parcel_files(&self.user, name);
        self.open_at(name, state, files, None)
    }

    /// Open the parcel files `files` (state `state`): unwrap the keyroot, authenticate the manifest.
    pub(crate) fn open_at(
        &mut self,
        name: &str,
        state: LocalState,
        files: ParcelFiles,
        overlay: Option<PathBuf>,
    ) -> Result<Opened, ClientError> {
        let wrap = self.secrets()?.wrap.clone();
        let keyroot = unwrap_keyroot(&state.wrapped_keyroot, &wrap, "the local state")?;
        let manifest_bytes = read_file(&files.base_manifest())?;
        let key = ParcelKey { user: &self.user, parcel: name, keyroot: &keyroot };
        let manifest = manifests::open_local(&self.home, key, state.base_version, &manifest_bytes)?;
        Ok(Opened { state, files, keyroot, manifest, manifest_bytes, overlay })
    }

    /// Clean up after dead runs of `name` on this client, a checked-out parcel's and a transient one's
    /// ([`crate::run::clean_stale`]).
    pub fn clean_stale_runs(&self, name: &str) -> Result<(), ClientError> {
        crate::run::clean_stale(&self.home.parcel_dir(&self.user, name))?;
        crate::run::clean_stale(&self.home.transient_dir(&self.user, name))
    }

    /// The base and working keyrings of one image of an opened parcel.
    pub fn keyrings(
        &self,
        o: &Opened,
        kind: ImageKind,
    ) -> Result<Option<(Keyring, Keyring, bool)>, ClientError> {
        let work_path = o.files.work_keyring(kind);
        let base = match o.manifest.image(kind) {
            Some(r) => {
                let bytes = read_file(&o.files.base_keyring(kind))?;
                if Tag(*blake3::hash(&bytes).as_bytes()) != r.keyring {
                    return Err(ClientError::Integrity(format!(
                        "local {} keyring does not match the manifest",
                        kind.name()
                    )));
                }
                Some(Keyring::open(&bytes, &o.keyroot)?)
            }
            None => None,
        };
        let work =
            if work_path.exists() { Some(Keyring::open(&read_file(&work_path)?, &o.keyroot)?) } else { None };
        Ok(match (base, work) {
            (Some(b), Some(w)) => Some((b, w, true)),
            (Some(b), None) => Some((b.clone(), b, false)),
            (None, Some(w)) => Some((Keyring::new(w.chunk_size(), ImageLen(0))?, w, true)),
            (None, None) => None,
        })
    }

    /// A read-write view of one image of an opened parcel.
    pub async fn working_image(
        &mut self,
        o: &Opened,
        kind: ImageKind,
        disconnected: bool,
    ) -> Result<Arc<WorkingImage>, ClientError> {
        let server = if disconnected { None } else { Some(self.connect().await?) };
        let sources = self.sources_for(o, server)?;
        self.working_image_from(o, kind, sources)
    }

    /// A read-write view of one image of an opened parcel whose chunks come from `sources`.
    pub fn working_image_from(
        &self,
        o: &Opened,
        kind: ImageKind,
        sources: Arc<ChunkSources>,
    ) -> Result<Arc<WorkingImage>, ClientError> {
        let (base, work, _) = self
            .keyrings(o, kind)?
            .ok_or_else(|| ClientError::Other(format!("the parcel has no {} image", kind.name())))?;
        Ok(Arc::new(WorkingImage::new(
            work,
            base.tags().to_vec(),
            o.keyroot.clone(),
            o.files.work_keyring(kind),
            o.files.runtime_image(kind),
            sources,
            self.convergence_secret()?,
        )?))
    }
}
