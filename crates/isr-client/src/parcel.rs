//! The parcel lifecycle: what each `isr` command does, as library calls.

use crate::cache::ChunkCache;
use crate::error::ClientError;
use crate::home::{now_unix, rfc3339, valid_parcel_name, write_atomic, Home, LocalState, Session};
use crate::image::WorkingImage;
use crate::manifests::{self, Asked, ParcelKey};
use crate::network::SeenPolicy;
use crate::progress::{self, Progress};
use crate::runtime::RuntimeImage;
use crate::source::ChunkSources;
use crate::transport::{CommitRefusal, LockInfo, ParcelSummary, Transport, VersionInfo};
use bytes::Bytes;
use futures::StreamExt;
use isr_format::{
    ChunkDecoder, ChunkEncoder, ChunkIndex, ChunkSize, ConvergenceSecret, ImageKind, ImageLen, ImageRef,
    KdfParams, Keyring, Keyroot, Manifest, RecoveryPublicKey, Tag, UserSecrets, VmDescription,
    WrappedKeyroot,
};
use serde::Serialize;
use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const UPLOADS_IN_FLIGHT: usize = 8;
const FETCHES_IN_FLIGHT: usize = 16;

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

/// What `isr create` needs besides the disk image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub memory_mib: u32,
    pub cpus: u32,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    pub chunk_size: ChunkSize,
    pub comment: String,
}

/// What an upload moved.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Transfer {
    pub chunks: u64,
    pub bytes: u64,
    pub image_bytes: u64,
}

/// A parcel's local state (SPEC.md's `"state"` of `isr stat --json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalStateName {
    /// Not on this client.
    Absent,
    /// Checked out, equal to the version it came from.
    Unmodified,
    /// A VM or disk export of it is active.
    Running,
    /// Suspended or exported with changes not yet checked in.
    Modified,
}

impl LocalStateName {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalStateName::Absent => "absent",
            LocalStateName::Unmodified => "unmodified",
            LocalStateName::Running => "running",
            LocalStateName::Modified => "modified",
        }
    }
}

impl std::fmt::Display for LocalStateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// What `checkout` did: the local state, and a note for the user when the lock had to be taken again.
#[derive(Debug, Clone)]
pub struct Checkout {
    pub state: LocalState,
    pub note: Option<String>,
}

/// What `checkin` did: the version made (if anything changed), and a note for the user.
#[derive(Debug, Clone)]
pub struct CheckinOutcome {
    pub synced: Option<(u64, Transfer)>,
    pub note: Option<String>,
}

/// Parcels as `isr ls` shows them; `offline` says why the server's view is missing (then only the parcels
/// checked out here are listed, with what this client knows).
#[derive(Debug, Clone)]
pub struct Listing {
    pub parcels: Vec<(ParcelSummary, LocalStateName)>,
    pub offline: Option<String>,
}

/// One character per chunk of an image: [`ChunkMap::ABSENT`] (not on this client), [`ChunkMap::CACHED`],
/// [`ChunkMap::DIRTY`] (changed here, not on the server yet), [`ChunkMap::UPLOADED`] (changed here, on the
/// server), [`ChunkMap::ZERO`] (nothing stored).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChunkMap {
    pub disk: String,
    pub memory: String,
}

impl ChunkMap {
    pub const ABSENT: char = '.';
    pub const CACHED: char = 'c';
    pub const DIRTY: char = 'd';
    pub const UPLOADED: char = 'u';
    pub const ZERO: char = 'z';
}

/// What `isr passwd` changed.
#[derive(Debug, Clone, Copy, Default)]
pub struct PasswordChange {
    /// Keyroots rewrapped with the new password.
    pub rewrapped: u64,
    /// Keyroots that already opened with the new password (an earlier, interrupted run).
    pub already: u64,
}

/// What `isr check` found: problems left, and problems repaired (`--repair`).
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub problems: Vec<String>,
    pub repaired: Vec<String>,
}

/// One image of the version a sync makes.
#[derive(Debug, Clone)]
struct PlannedImage {
    kind: ImageKind,
    image_ref: ImageRef,
    /// The sealed keyring (the working one when the image changed, else the base's).
    sealed: Vec<u8>,
    changed: bool,
}

/// What a sync commits: every image of the new version, and the chunks made here that the server may lack.
#[derive(Debug, Clone, Default)]
struct SyncPlan {
    images: Vec<PlannedImage>,
    new_tags: Vec<Tag>,
    modified: bool,
}

/// The local state of a parcel, as `isr stat` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ParcelStatus {
    pub parcel: String,
    pub state: LocalStateName,
    pub head_version: Option<u64>,
    pub base_version: Option<u64>,
    pub chunks: ChunkCounts,
    pub lock: Option<LockInfo>,
    pub memory_image: bool,
    /// Bytes of chunks changed here that the server does not have yet (0 when offline: unknown).
    pub pending_upload_bytes: u64,
    /// IT's network policy: the server's (`unset`, `none`, `nat`); offline, the one last seen here (`null`
    /// when never seen).
    pub network_policy: Option<SeenPolicy>,
    /// Set when the server could not be reached: head and lock are then unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ChunkCounts {
    pub cached: u64,
    pub dirty: u64,
    pub total: u64,
}

/// A checked-out parcel opened for use (keyroot unwrapped, manifest and keyrings authenticated).
#[derive(Debug)]
pub struct Opened {
    pub state: LocalState,
    pub dir: PathBuf,
    pub keyroot: Keyroot,
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    /// Set for a transient run's working copy of a version (`dir` is then in the run's private directory):
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

pub(crate) fn base_keyring_path(dir: &Path, kind: ImageKind) -> PathBuf {
    dir.join("keyrings").join(format!("base-{}", kind.name()))
}

/// The runtime image of one image of a checked-out parcel (see [`crate::runtime`]).
pub fn runtime_image_path(dir: &Path, kind: ImageKind) -> PathBuf {
    dir.join("runtime").join(format!("{}.img", kind.name()))
}

/// Whether a checked-out parcel has changes not in its base: a working keyring, or dirty runtime chunks.
pub(crate) fn has_local_changes(dir: &Path) -> Result<bool, ClientError> {
    for kind in ImageKind::ALL {
        if work_keyring_path(dir, kind).exists()
            || RuntimeImage::summary(&runtime_image_path(dir, kind))?.is_some_and(|s| s.dirty > 0)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

pub fn work_keyring_path(dir: &Path, kind: ImageKind) -> PathBuf {
    dir.join("keyrings").join(format!("work-{}", kind.name()))
}

fn read_file(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::io(format!("reading {}", path.display()), e))
}

pub use crate::run::{is_running, RunGuard};

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

    // ---- create -----------------------------------------------------------------------------------

    /// Import a disk image (raw, or anything `qemu-img` reads) as version 1 of a new parcel. Everything is
    /// checked before the server hears of the parcel, and a create that fails later deletes the parcel again:
    /// nothing half-made remains (a create killed outright leaves a parcel without versions, which the next
    /// `isr create` of that name finishes).
    pub async fn create(
        &mut self,
        name: &str,
        disk: &Path,
        opts: &CreateOptions,
    ) -> Result<(u64, Transfer), ClientError> {
        valid_parcel_name(name)?;
        let vm = VmDescription {
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            append: opts.append.clone(),
            devices: isr_format::DeviceModel::CURRENT,
        };
        vm.validate().map_err(|e| ClientError::Usage(format!("{e}")))?;
        if opts.comment.len() > 4096 {
            return Err(ClientError::Usage("the message is longer than 4096 bytes".into()));
        }
        if opts.initrd.is_some() && opts.kernel.is_none() {
            return Err(ClientError::Usage("--initrd needs --kernel".into()));
        }
        for (what, path) in
            [("kernel", opts.kernel.as_deref()), ("initrd", opts.initrd.as_deref())].into_iter()
        {
            if let Some(p) = path {
                check_input_file(p, what)?;
            }
        }
        check_input_file(disk, "disk image")?;
        let raw = RawImage::open(disk, &self.home.root().join("tmp"))?;
        check_input_file(raw.path(), "disk image")?;
        let t = self.connect().await?;
        let id = self.home.identity()?;
        let wrap = self.secrets()?.wrap.clone();
        let (keyroot, lock_id) = {
            let keyroot = Keyroot::random();
            let wrapped = WrappedKeyroot::wrap(&keyroot, &wrap);
            let recovery = self.recovery_seal(&keyroot)?;
            match t
                .create_parcel(
                    name,
                    &wrapped.0,
                    recovery.as_ref().map(|r| r.0.as_slice()),
                    &id.name,
                    &id.client_id,
                )
                .await
            {
                Ok(lock_id) => (keyroot, lock_id),
                Err(ClientError::Exists(msg)) => {
                    // An interrupted create leaves a parcel without versions: finish it with its own keyroot.
                    let detail = t.parcel(name).await?;
                    if detail.head != 0 {
                        return Err(ClientError::Exists(msg));
                    }
                    let keyroot = unwrap_keyroot(&detail.wrapped_keyroot, &wrap, "the server")?;
                    (keyroot, t.lock(name, &id.name, &id.client_id).await?)
                }
                Err(e) => return Err(e),
            }
        };
        let made = self.upload_first_version(&t, name, &raw, opts, vm, &keyroot, &lock_id, &id.name).await;
        match made {
            Ok(done) => {
                t.unlock(name, &lock_id).await?;
                Ok(done)
            }
            Err(e) => {
                if let Err(undo) = t.delete_unfinished_parcel(name, &id.client_id).await {
                    tracing::warn!(parcel = name, error = %undo, "could not delete the unfinished parcel");
                }
                Err(e)
            }
        }
    }

    /// The keyroot sealed for the deployment's recovery key, when the server announced one.
    fn recovery_seal(&self, keyroot: &Keyroot) -> Result<Option<WrappedKeyroot>, ClientError> {
        let Some(hexkey) = self.session.as_ref().and_then(|s| s.recovery_pubkey.clone()) else {
            return Ok(None);
        };
        let key = RecoveryPublicKey::from_hex(&hexkey)
            .map_err(|e| ClientError::Server(format!("the server's recovery key is malformed: {e}")))?;
        Ok(Some(WrappedKeyroot::seal_for_recovery(keyroot, &key)))
    }

    /// Encode and upload the images of a new parcel, then commit them as version 1.
    #[allow(clippy::too_many_arguments)]
    async fn upload_first_version(
        &mut self,
        t: &Transport,
        name: &str,
        raw: &RawImage,
        opts: &CreateOptions,
        vm: VmDescription,
        keyroot: &Keyroot,
        lock_id: &str,
        client_name: &str,
    ) -> Result<(u64, Transfer), ClientError> {
        let secret = self.convergence_secret()?;
        let mut transfer = Transfer::default();
        let mut images: Vec<(ImageKind, Keyring)> = Vec::new();
        let disk_ring = upload_image(
            self.progress.as_ref(),
            t,
            &secret,
            raw.path(),
            opts.chunk_size,
            "disk",
            &mut transfer,
        )
        .await?;
        images.push((ImageKind::Disk, disk_ring));
        if let Some(k) = &opts.kernel {
            images.push((
                ImageKind::Kernel,
                upload_image(self.progress.as_ref(), t, &secret, k, opts.chunk_size, "kernel", &mut transfer)
                    .await?,
            ));
        }
        if let Some(i) = &opts.initrd {
            images.push((
                ImageKind::Initrd,
                upload_image(self.progress.as_ref(), t, &secret, i, opts.chunk_size, "initrd", &mut transfer)
                    .await?,
            ));
        }
        let mut refs = std::collections::HashMap::new();
        for (kind, ring) in &images {
            let sealed = Bytes::from(ring.seal(keyroot));
            let hash = Tag(*blake3::hash(&sealed).as_bytes());
            t.put_keyring(name, lock_id, &hash, sealed).await?;
            refs.insert(*kind, ImageRef { len: ring.image_len(), keyring: hash });
        }
        let manifest = Manifest {
            vm,
            chunk_size: opts.chunk_size,
            disk: refs[&ImageKind::Disk],
            memory: None,
            kernel: refs.get(&ImageKind::Kernel).copied(),
            initrd: refs.get(&ImageKind::Initrd).copied(),
            created_unix: now_unix(),
            comment: opts.comment.clone(),
        };
        let key = ParcelKey { user: &self.user, parcel: name, keyroot };
        let sealed = manifests::seal_for_commit(&manifest, key, 0)?;
        let version = commit_with_retry(
            t,
            &self.cache()?,
            name,
            lock_id,
            0,
            &sealed,
            client_name,
            &opts.comment,
            &mut transfer,
            Some(&images),
        )
        .await?;
        manifests::record_commit(&self.home, key, version)?;
        Ok((version, transfer))
    }

    // ---- checkout ---------------------------------------------------------------------------------

    /// Take the lock and fetch what a resume needs. A parcel this client already holds is a no-op; one whose
    /// lock was broken meanwhile gets its lock back when it is free (see [`Client::retake_lock`]).
    pub async fn checkout(&mut self, name: &str, version: Option<u64>) -> Result<Checkout, ClientError> {
        valid_parcel_name(name)?;
        if let Some(st) = self.home.local_state(&self.user, name)? {
            if version.is_some_and(|v| v != st.base_version) {
                return Err(ClientError::Usage(format!(
                    "{name} is already checked out here at version {}: check it in or discard it first",
                    st.base_version
                )));
            }
            return self.retake_lock(name, st).await;
        }
        let t = self.connect().await?;
        let id = self.home.identity()?;
        let lock_id = t.lock(name, &id.name, &id.client_id).await?;
        let result = self.fetch_version(&t, name, version, lock_id.clone()).await;
        if result.is_err() {
            let _ = t.unlock(name, &lock_id).await;
        }
        Ok(Checkout { state: result?, note: None })
    }

    /// The lock of a parcel checked out here: confirmed with the server, or taken again when it was broken
    /// and is free now. If the head moved meanwhile, an unmodified parcel moves to the new head; a modified
    /// one keeps its changes and the note says what the user can do with them.
    async fn retake_lock(&mut self, name: &str, mut st: LocalState) -> Result<Checkout, ClientError> {
        let t = self.connect().await?;
        let loss = match t.confirm_lock(name, &st.lock_id).await {
            Ok(_) => return Ok(Checkout { state: st, note: None }),
            Err(ClientError::LockLost(loss)) => loss,
            Err(e) => return Err(e),
        };
        if let Some((holder, since)) = &loss.holder_now {
            return Err(ClientError::Locked(format!(
                "{}; {holder} holds the lock now (since {}). Your local changes to {name} are kept",
                loss.message,
                rfc3339(*since)
            )));
        }
        let id = self.home.identity()?;
        st.lock_id = t.lock(name, &id.name, &id.client_id).await?;
        self.home.save_local_state(&st)?;
        let mut note = format!("{}; took the lock again", loss.message);
        let head = t.parcel(name).await?.head;
        if head != st.head_at_checkout {
            if self.local_state_name(name)? == LocalStateName::Unmodified {
                let lock_id = st.lock_id.clone();
                st = self.fetch_version(&t, name, None, lock_id).await?;
                note.push_str(&format!(" and moved to the new head, version {}", st.base_version));
            } else {
                note.push_str(&format!(
                    ". The head moved to version {head} meanwhile, but your changes are based on version {}: keep \
                     them as a new parcel with `isr checkin {name} --as NEWNAME`, or drop them with `isr discard \
                     {name}`",
                    st.head_at_checkout
                ));
            }
        }
        Ok(Checkout { state: st, note: Some(note) })
    }

    /// Confirm with the server that this client still holds the lock of `name` (exit 3 naming who broke it
    /// and when, or who holds it now).
    pub async fn confirm_lock(&mut self, name: &str) -> Result<(), ClientError> {
        let st = self.home.local_state(&self.user, name)?.ok_or_else(|| not_checked_out(name))?;
        let t = self.connect().await?;
        t.confirm_lock(name, &st.lock_id).await.map(|_| ()).map_err(|e| lock_guidance(name, e))
    }

    async fn fetch_version(
        &mut self,
        t: &Transport,
        name: &str,
        version: Option<u64>,
        lock_id: String,
    ) -> Result<LocalState, ClientError> {
        let dir = self.home.parcel_dir(&self.user, name);
        let st = self.fetch_version_into(t, name, version, lock_id, &dir).await?;
        self.home.save_local_state(&st)?;
        Ok(st)
    }

    /// Fetch a version (default: the head) into `dir` as a checked-out parcel's files (manifest, base
    /// keyrings; the chunks of the memory image, kernel and initrd into the cache) and return its local state,
    /// not yet saved. `dir` is replaced.
    pub(crate) async fn fetch_version_into(
        &mut self,
        t: &Transport,
        name: &str,
        version: Option<u64>,
        lock_id: String,
        dir: &Path,
    ) -> Result<LocalState, ClientError> {
        let detail = t.parcel(name).await?;
        if detail.head == 0 {
            return Err(ClientError::Other(format!(
                "{name} has no version yet (an interrupted create? run it again)"
            )));
        }
        let wrap = self.secrets()?.wrap.clone();
        let keyroot = unwrap_keyroot(&detail.wrapped_keyroot, &wrap, "the server")?;
        let key = ParcelKey { user: &self.user, parcel: name, keyroot: &keyroot };
        let fetched = manifests::fetch(t, &self.home, key, Asked::from_option(version, detail.head)).await?;
        let (v, manifest, manifest_bytes) = (fetched.version, fetched.manifest, fetched.bytes);
        let _ = std::fs::remove_dir_all(dir);
        let sources = self.sources(Some(t.clone()))?;
        for (kind, r) in manifest.images() {
            let bytes = t.keyring(name, &r.keyring).await?;
            let ring = Keyring::open(&bytes, &keyroot)?;
            write_atomic(&base_keyring_path(dir, kind), &bytes)?;
            if kind != ImageKind::Disk {
                // Memory, kernel and initrd are needed whole to start the VM.
                fetch_missing(
                    self.progress.as_ref(),
                    &sources,
                    &image_chunks(&ring).collect::<Vec<_>>(),
                    kind.name(),
                )
                .await?;
            }
        }
        write_atomic(&dir.join("base.manifest"), &manifest_bytes)?;
        let st = LocalState {
            server: t.server().to_owned(),
            user: self.user.clone(),
            parcel: name.to_owned(),
            base_version: v,
            head_at_checkout: detail.head.max(v),
            lock_id,
            wrapped_keyroot: detail.wrapped_keyroot,
            memory_dropped: false,
            network_policy: Some(SeenPolicy::from_server(detail.network_policy.as_deref())),
        };
        Ok(st)
    }

    /// Open a checked-out parcel: unwrap the keyroot and authenticate manifest and keyrings.
    pub fn open(&mut self, name: &str) -> Result<Opened, ClientError> {
        valid_parcel_name(name)?;
        self.clean_stale_runs(name)?;
        let state = self.home.local_state(&self.user, name)?.ok_or_else(|| {
            ClientError::Usage(format!("{name} is not checked out on this client: run `isr checkout {name}`"))
        })?;
        let dir = self.home.parcel_dir(&self.user, name);
        self.open_at(name, state, dir, None)
    }

    /// Open the parcel files in `dir` (state `state`): unwrap the keyroot, authenticate the manifest.
    pub(crate) fn open_at(
        &mut self,
        name: &str,
        state: LocalState,
        dir: PathBuf,
        overlay: Option<PathBuf>,
    ) -> Result<Opened, ClientError> {
        let wrap = self.secrets()?.wrap.clone();
        let keyroot = unwrap_keyroot(&state.wrapped_keyroot, &wrap, "the local state")?;
        let manifest_bytes = read_file(&dir.join("base.manifest"))?;
        let key = ParcelKey { user: &self.user, parcel: name, keyroot: &keyroot };
        let manifest = manifests::open_local(&self.home, key, state.base_version, &manifest_bytes)?;
        Ok(Opened { state, dir, keyroot, manifest, manifest_bytes, overlay })
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
        let work_path = work_keyring_path(&o.dir, kind);
        let base = match o.manifest.image(kind) {
            Some(r) => {
                let bytes = read_file(&base_keyring_path(&o.dir, kind))?;
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
            work_keyring_path(&o.dir, kind),
            runtime_image_path(&o.dir, kind),
            sources,
            self.convergence_secret()?,
        )?))
    }

    /// Encode what changed in the parcel's runtime images into its working keyrings (what a sync then plans
    /// from). The parcel must not be running.
    async fn encode_local_changes(&self, o: &Opened) -> Result<(), ClientError> {
        for kind in ImageKind::ALL {
            if !runtime_image_path(&o.dir, kind).exists() {
                continue;
            }
            let img = self.working_image_from(o, kind, self.sources(None)?)?;
            img.encode_changes().await?;
            img.close().await?;
        }
        Ok(())
    }

    // ---- sync / checkin / discard -----------------------------------------------------------------

    /// What a sync of `o` would commit: every image of the new version and the chunks made here.
    fn plan_sync(&self, o: &Opened) -> Result<SyncPlan, ClientError> {
        let mut plan = SyncPlan::default();
        let mut seen = HashSet::new();
        for kind in ImageKind::ALL {
            if kind == ImageKind::Memory
                && o.state.memory_dropped
                && !work_keyring_path(&o.dir, kind).exists()
            {
                // Powered off since the base: the new version has no memory image.
                plan.modified = true;
                continue;
            }
            let Some((base, work, modified)) = self.keyrings(o, kind)? else { continue };
            plan.modified |= modified;
            let base_set: HashSet<&Tag> = base.tags().iter().collect();
            for tag in work.tags() {
                if !tag.is_zero() && !base_set.contains(tag) && seen.insert(*tag) {
                    plan.new_tags.push(*tag);
                }
            }
            let sealed = if modified {
                read_file(&work_keyring_path(&o.dir, kind))?
            } else {
                read_file(&base_keyring_path(&o.dir, kind))?
            };
            let keyring = Tag(*blake3::hash(&sealed).as_bytes());
            plan.images.push(PlannedImage {
                kind,
                image_ref: ImageRef { len: work.image_len(), keyring },
                sealed,
                changed: modified,
            });
        }
        Ok(plan)
    }

    /// The manifest of the version a plan makes.
    fn planned_manifest(o: &Opened, plan: &SyncPlan, comment: &str) -> Manifest {
        let mut manifest = o.manifest.clone();
        manifest.memory = None;
        for img in &plan.images {
            let r = img.image_ref;
            match img.kind {
                ImageKind::Disk => manifest.disk = r,
                ImageKind::Memory => manifest.memory = Some(r),
                ImageKind::Kernel => manifest.kernel = Some(r),
                ImageKind::Initrd => manifest.initrd = Some(r),
            }
        }
        manifest.created_unix = now_unix();
        manifest.comment = comment.to_owned();
        manifest
    }

    /// Upload the chunks of a plan that the server lacks, then its keyrings (all of them with `every_keyring`,
    /// for a parcel that has none yet; else those that changed).
    async fn upload_plan(
        &self,
        t: &Transport,
        name: &str,
        lock_id: &str,
        plan: &SyncPlan,
        every_keyring: bool,
        transfer: &mut Transfer,
    ) -> Result<(), ClientError> {
        let missing = t.missing(&plan.new_tags).await?;
        upload_from_cache(self.progress.as_ref(), t, &self.cache()?, &missing, transfer).await?;
        for img in plan.images.iter().filter(|i| every_keyring || i.changed) {
            t.put_keyring(name, lock_id, &img.image_ref.keyring, Bytes::from(img.sealed.clone())).await?;
        }
        Ok(())
    }

    /// Upload local changes as a new version and keep the lock.
    pub async fn sync(&mut self, name: &str, comment: &str) -> Result<Option<(u64, Transfer)>, ClientError> {
        let o = self.open(name)?;
        if is_running(&o.dir) {
            return Err(ClientError::Other(format!(
                "{name} is running: suspend it (or stop `isr disk`) before syncing"
            )));
        }
        let t = self.connect().await?;
        // A broken lock is told before anything is sent; the local changes stay as they are.
        t.confirm_lock(name, &o.state.lock_id).await.map_err(|e| lock_guidance(name, e))?;
        self.encode_local_changes(&o).await?;
        let plan = self.plan_sync(&o)?;
        if !plan.modified {
            return Ok(None);
        }
        let id = self.home.identity()?;
        let mut transfer = Transfer::default();
        self.upload_plan(&t, name, &o.state.lock_id, &plan, false, &mut transfer)
            .await
            .map_err(|e| lock_guidance(name, e))?;
        let manifest = Self::planned_manifest(&o, &plan, comment);
        let key = ParcelKey { user: &self.user, parcel: name, keyroot: &o.keyroot };
        let base = o.state.head_at_checkout;
        let sealed = manifests::seal_for_commit(&manifest, key, base)?;
        let committed = match manifests::check_commit_base(&self.home, key, base) {
            Ok(()) => {
                commit_with_retry(
                    &t,
                    &self.cache()?,
                    name,
                    &o.state.lock_id,
                    base,
                    &sealed,
                    &id.name,
                    comment,
                    &mut transfer,
                    None,
                )
                .await
            }
            Err(e) => Err(e),
        };
        let (version, base_manifest) = match committed {
            Ok(v) => (v, sealed),
            Err(ClientError::StaleBase(msg)) => {
                // A previous sync may have committed exactly this state and died before recording it.
                let head_m = manifests::fetch(&t, &self.home, key, Asked::Head { at_least: base }).await?;
                let head = head_m.version;
                let same = head_m.manifest.images().map(|(k, r)| (k, r.keyring)).collect::<Vec<_>>()
                    == manifest.images().map(|(k, r)| (k, r.keyring)).collect::<Vec<_>>();
                if !same {
                    return Err(ClientError::StaleBase(format!(
                        "{msg}: {name}'s head is version {head}, but the changes here are based on version {} \
                         (the lock was broken and someone else checked in meanwhile?). Keep them as a new parcel \
                         with `isr checkin {name} --as NEWNAME`, or drop them with `isr discard {name}`",
                        o.state.head_at_checkout
                    )));
                }
                // Its manifest (bound to its own number) becomes the base.
                (head, head_m.bytes.to_vec())
            }
            Err(e) => return Err(lock_guidance(name, e)),
        };
        manifests::record_commit(&self.home, key, version)?;
        // Record the new base: keyrings first, then the manifest, then the state that points at them.
        for img in &plan.images {
            write_atomic(&base_keyring_path(&o.dir, img.kind), &img.sealed)?;
        }
        if manifest.memory.is_none() {
            let _ = std::fs::remove_file(base_keyring_path(&o.dir, ImageKind::Memory));
        }
        write_atomic(&o.dir.join("base.manifest"), &base_manifest)?;
        let mut st = o.state.clone();
        st.base_version = version;
        st.head_at_checkout = version;
        st.memory_dropped = false;
        self.home.save_local_state(&st)?;
        for img in &plan.images {
            let _ = std::fs::remove_file(work_keyring_path(&o.dir, img.kind));
        }
        Ok(Some((version, transfer)))
    }

    /// Sync, then release the lock; the parcel leaves this client (its chunks stay in the cache). A parcel
    /// without local changes whose lock was broken meanwhile just leaves (there is nothing to keep).
    pub async fn checkin(&mut self, name: &str, comment: &str) -> Result<CheckinOutcome, ClientError> {
        let synced = match self.sync(name, comment).await {
            Ok(s) => s,
            Err(ClientError::LockLost(loss))
                if self.local_state_name(name)? == LocalStateName::Unmodified =>
            {
                self.leave(name)?;
                return Ok(CheckinOutcome {
                    synced: None,
                    note: Some(format!("{}; nothing to check in", loss.message)),
                });
            }
            Err(e) => return Err(e),
        };
        let st = self.home.local_state(&self.user, name)?.ok_or_else(|| not_checked_out(name))?;
        let t = self.connect().await?;
        match t.unlock(name, &st.lock_id).await {
            Ok(()) => {}
            // Committed (or nothing to commit) and the lock went meanwhile: nothing is lost by leaving.
            Err(ClientError::LockLost(_)) if synced.is_some() => {}
            Err(e) => return Err(lock_guidance(name, e)),
        }
        self.leave(name)?;
        Ok(CheckinOutcome { synced, note: None })
    }

    /// Keep the local changes of `name` as a new parcel `new_name` (e.g. after the lock was lost and the head
    /// moved): same keyroot, every chunk shared, version 1 of the new parcel equal to the local state. `name`
    /// then leaves this client (its lock is released if it is still ours).
    pub async fn checkin_as(
        &mut self,
        name: &str,
        new_name: &str,
        comment: &str,
    ) -> Result<(u64, Transfer), ClientError> {
        valid_parcel_name(new_name)?;
        let o = self.open(name)?;
        if is_running(&o.dir) {
            return Err(ClientError::Other(format!("{name} is running: suspend it before checking it in")));
        }
        let t = self.connect().await?;
        let id = self.home.identity()?;
        self.encode_local_changes(&o).await?;
        let plan = self.plan_sync(&o)?;
        let wrapped = hex::decode(&o.state.wrapped_keyroot).map_err(|_| {
            ClientError::Integrity("the local state holds a malformed wrapped keyroot".into())
        })?;
        let recovery = self.recovery_seal(&o.keyroot)?;
        let lock_id = t
            .create_parcel(
                new_name,
                &wrapped,
                recovery.as_ref().map(|r| r.0.as_slice()),
                &id.name,
                &id.client_id,
            )
            .await?;
        let made = async {
            let mut transfer = Transfer::default();
            // The new parcel has no chunks of its own: the base's are on the server already (shared).
            self.upload_plan(&t, new_name, &lock_id, &plan, true, &mut transfer).await?;
            let manifest = Self::planned_manifest(&o, &plan, comment);
            // Sealed for the new parcel: its identity and version 1 are what the MAC binds.
            let key = ParcelKey { user: &self.user, parcel: new_name, keyroot: &o.keyroot };
            let sealed = manifests::seal_for_commit(&manifest, key, 0)?;
            let v = commit_with_retry(
                &t,
                &self.cache()?,
                new_name,
                &lock_id,
                0,
                &sealed,
                &id.name,
                comment,
                &mut transfer,
                None,
            )
            .await?;
            manifests::record_commit(&self.home, key, v)?;
            t.unlock(new_name, &lock_id).await?;
            Ok::<_, ClientError>((v, transfer))
        }
        .await;
        let done = match made {
            Ok(d) => d,
            Err(e) => {
                let _ = t.delete_unfinished_parcel(new_name, &id.client_id).await;
                return Err(e);
            }
        };
        // The changes are safe in the new parcel: release the old lock if it is still ours, and leave.
        let _ = t.unlock(name, &o.state.lock_id).await;
        self.leave(name)?;
        Ok(done)
    }

    /// Remove a parcel's local files (its encrypted chunks stay in the cache).
    fn leave(&self, name: &str) -> Result<(), ClientError> {
        let dir = self.home.parcel_dir(&self.user, name);
        std::fs::remove_dir_all(&dir).map_err(|e| ClientError::io(format!("removing {}", dir.display()), e))
    }

    /// Drop local changes: back to the base version.
    pub fn discard(&mut self, name: &str) -> Result<(), ClientError> {
        let o = self.open(name)?;
        if is_running(&o.dir) {
            return Err(ClientError::Other(format!("{name} is running: stop it before discarding")));
        }
        for kind in ImageKind::ALL {
            // The runtime image's changes first: a crash half-way leaves changes to discard again, never a mix.
            let rt = runtime_image_path(&o.dir, kind);
            if rt.exists() {
                if let Some((base, _, _)) = self.keyrings(&o, kind)? {
                    let (img, _) = RuntimeImage::open(
                        &rt,
                        &o.keyroot,
                        base.chunk_size(),
                        base.image_len(),
                        base.tags(),
                    )?;
                    img.drop_dirty()?;
                    img.close()?;
                }
            }
            let p = work_keyring_path(&o.dir, kind);
            if p.exists() {
                std::fs::remove_file(&p)
                    .map_err(|e| ClientError::io(format!("removing {}", p.display()), e))?;
            }
        }
        let mut st = o.state;
        st.memory_dropped = false;
        self.home.save_local_state(&st)
    }

    /// Fetch every chunk of the parcel into the cache, checking it out first when it is not here yet.
    pub async fn hoard(&mut self, name: &str) -> Result<Transfer, ClientError> {
        if self.home.local_state(&self.user, name)?.is_none() {
            self.checkout(name, None).await?;
        }
        let o = self.open(name)?;
        let t = self.connect().await?;
        let mut chunks = Vec::new();
        for kind in ImageKind::ALL {
            if let Some((base, work, _)) = self.keyrings(&o, kind)? {
                chunks.extend(image_chunks(&base));
                chunks.extend(image_chunks(&work));
            }
        }
        let sources = self.sources(Some(t))?;
        let transfer = fetch_missing(self.progress.as_ref(), &sources, &chunks, "hoard").await?;
        // Decoded into the runtime image too, so the first reads need no decode (a running parcel's own
        // process fills it as the guest reads).
        if !is_running(&o.dir) {
            let img = self.working_image_from(&o, ImageKind::Disk, sources)?;
            img.prefetch(0, img.len()).await.map_err(|e| ClientError::io("filling the runtime image", e))?;
            img.close().await?;
        }
        Ok(transfer)
    }

    /// How many distinct stored chunks of a checked-out parcel are not in the cache.
    pub async fn missing_locally(&mut self, o: &Opened) -> Result<u64, ClientError> {
        let mut tags = Vec::new();
        for kind in ImageKind::ALL {
            if let Some((_, work, _)) = self.keyrings(o, kind)? {
                tags.extend_from_slice(work.tags());
            }
        }
        let sources = self.sources(None)?;
        let n = tokio::task::spawn_blocking(move || sources.missing_locally_blocking(&tags))
            .await
            .map_err(|e| ClientError::Other(format!("counting chunks: {e}")))?;
        Ok(n as u64)
    }

    // ---- rollback / unlock ------------------------------------------------------------------------

    /// A new head identical to `version`: its manifest re-sealed as an ordinary commit under the lock (this
    /// client's when the parcel is checked out here, else taken for the commit and released).
    pub async fn rollback(&mut self, name: &str, version: u64) -> Result<u64, ClientError> {
        valid_parcel_name(name)?;
        let local = self.home.local_state(&self.user, name)?;
        if let Some(st) = &local {
            let dir = self.home.parcel_dir(&self.user, name);
            if has_local_changes(&dir)? || is_running(&dir) {
                return Err(ClientError::Other(format!(
                    "{name} has local changes here: check them in or discard them before a rollback (base {})",
                    st.base_version
                )));
            }
        }
        let t = self.connect().await?;
        let id = self.home.identity()?;
        let (lock_id, taken) = match &local {
            Some(st) => (st.lock_id.clone(), false),
            None => (t.lock(name, &id.name, &id.client_id).await?, true),
        };
        let wrap = self.secrets()?.wrap.clone();
        let cache = self.cache()?;
        let user = self.user.clone();
        let home = self.home.clone();
        let committed = async {
            let detail = t.parcel(name).await?;
            let keyroot = unwrap_keyroot(&detail.wrapped_keyroot, &wrap, "the server")?;
            let key = ParcelKey { user: &user, parcel: name, keyroot: &keyroot };
            // Version N re-sealed for head + 1: a rollback is an ordinary commit.
            let mut manifest = manifests::fetch(&t, &home, key, Asked::Version(version)).await?.manifest;
            let comment = format!("rollback to version {version}");
            manifest.comment = comment.clone();
            manifest.created_unix = now_unix();
            manifests::check_commit_base(&home, key, detail.head)?;
            let sealed = manifests::seal_for_commit(&manifest, key, detail.head)?;
            let mut transfer = Transfer::default();
            let v = commit_with_retry(
                &t,
                &cache,
                name,
                &lock_id,
                detail.head,
                &sealed,
                &id.name,
                &comment,
                &mut transfer,
                None,
            )
            .await?;
            manifests::record_commit(&home, key, v)?;
            Ok::<u64, ClientError>(v)
        }
        .await;
        if taken {
            let _ = t.unlock(name, &lock_id).await;
        }
        let v = committed.map_err(|e| lock_guidance(name, e))?;
        if let Some(st) = local {
            // Still holding the lock: move the local base to the new head.
            self.fetch_version(&t, name, Some(v), st.lock_id).await?;
        }
        Ok(v)
    }

    /// Break the lock of `name` whoever holds it; returns who held it and since when.
    pub async fn unlock_force(&mut self, name: &str) -> Result<Option<LockInfo>, ClientError> {
        valid_parcel_name(name)?;
        let t = self.connect().await?;
        let held = t.parcel(name).await?.lock;
        let id = self.home.identity()?;
        t.break_lock(name, &id.name).await?;
        Ok(held)
    }

    // ---- password ---------------------------------------------------------------------------------

    /// Change the user's password: every parcel's keyroot is rewrapped with the new password's key, then the
    /// login secret is replaced. Safe to run again after an interruption, and also the way out after an
    /// administrator's `isr-server user passwd` (run with the previous password as the old one and the one
    /// the administrator set as the new one): the login works with either, and a keyroot that already opens
    /// with the new password is left as it is.
    pub async fn change_password(&mut self, new_password: &str) -> Result<PasswordChange, ClientError> {
        if new_password.is_empty() {
            return Err(ClientError::Usage("the new password is empty".into()));
        }
        let old = self.secrets()?.clone();
        let new = UserSecrets::derive(&self.user, new_password, KdfParams::DEFAULT)?;
        let url = self.server_url()?;
        let base = Transport::new(&url, self.ca_pem.as_deref())?;
        // Log in with the old password; if that fails, the login secret may already be the new one.
        let (t, logged_in_with_new) = match self.login_with(base.clone()).await {
            Ok(t) => (t, false),
            Err(ClientError::Auth(_)) => {
                self.secrets = Some(new.clone());
                let t = self.login_with(base).await.map_err(|e| match e {
                    ClientError::Auth(m) => ClientError::Auth(format!(
                        "{m}: neither ISR_PASSWORD nor the new password is this user's login password"
                    )),
                    other => other,
                })?;
                (t, true)
            }
            Err(e) => return Err(e),
        };
        let mut change = PasswordChange::default();
        for p in t.parcels().await? {
            let detail = t.parcel(&p.name).await?;
            if unwrap_keyroot(&detail.wrapped_keyroot, &new.wrap, "the server").is_ok() {
                change.already += 1;
                continue;
            }
            let keyroot = unwrap_keyroot(&detail.wrapped_keyroot, &old.wrap, "the server").map_err(|e| match e {
                ClientError::Auth(_) => ClientError::Auth(format!(
                    "the key of parcel {} opens with neither the old nor the new password; nothing was changed                      for it (an administrator's recovery key can reset it)",
                    p.name
                )),
                other => other,
            })?;
            let rewrapped = WrappedKeyroot::wrap(&keyroot, &new.wrap);
            t.put_keyroot(&p.name, &rewrapped.0).await?;
            change.rewrapped += 1;
        }
        if !logged_in_with_new {
            t.change_login_secret(&new.login.to_hex()).await?;
        }
        self.secrets = Some(new.clone());
        // Parcels checked out here keep a copy of the wrapped keyroot: rewrap those too.
        for st in self.home.local_states(&self.user)? {
            let mut st = st;
            if let Ok(keyroot) = unwrap_keyroot(&st.wrapped_keyroot, &old.wrap, "the local state") {
                st.wrapped_keyroot = hex::encode(WrappedKeyroot::wrap(&keyroot, &new.wrap).0);
                self.home.save_local_state(&st)?;
            }
        }
        // The stored token stays valid; a fresh login proves the new secret works.
        self.transport = None;
        self.login().await?;
        Ok(change)
    }

    // ---- listing ----------------------------------------------------------------------------------

    /// Every parcel of the user with its local state; offline, the parcels checked out here as far as this
    /// client knows them (`Listing::offline` says why), or the error when none is.
    pub async fn list(&mut self) -> Result<Listing, ClientError> {
        let server = match self.connect().await {
            Ok(t) => t.parcels().await,
            Err(e) => Err(e),
        };
        let (parcels, offline) = match server {
            Ok(p) => (p, None),
            Err(e @ ClientError::Unreachable { .. }) if !self.home.local_states(&self.user)?.is_empty() => {
                let local = self
                    .home
                    .local_states(&self.user)?
                    .into_iter()
                    .map(|st| ParcelSummary {
                        name: st.parcel,
                        head: st.head_at_checkout,
                        created_unix: 0,
                        lock: None,
                    })
                    .collect();
                (local, Some(e.to_string()))
            }
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for p in parcels {
            let state = self.local_state_name(&p.name)?;
            out.push((p, state));
        }
        Ok(Listing { parcels: out, offline })
    }

    pub async fn versions(&mut self, name: &str) -> Result<Vec<VersionInfo>, ClientError> {
        valid_parcel_name(name)?;
        let t = self.connect().await?;
        t.versions(name).await
    }

    /// The local state of a parcel, from its files alone.
    pub fn local_state_name(&self, name: &str) -> Result<LocalStateName, ClientError> {
        let Some(st) = self.home.local_state(&self.user, name)? else { return Ok(LocalStateName::Absent) };
        let dir = self.home.parcel_dir(&self.user, name);
        if is_running(&dir) {
            return Ok(LocalStateName::Running);
        }
        let modified = st.memory_dropped || has_local_changes(&dir)?;
        Ok(if modified { LocalStateName::Modified } else { LocalStateName::Unmodified })
    }

    /// Disk chunks available locally, changed since the base, and in all (no server contact).
    pub async fn local_chunk_counts(&mut self, o: &Opened) -> Result<(u64, u64, u64), ClientError> {
        let cache = self.cache()?;
        let Some((base, work, _)) = self.keyrings(o, ImageKind::Disk)? else { return Ok((0, 0, 0)) };
        let mut cached = 0;
        for tag in work.tags() {
            if tag.is_zero() || cache.contains(tag).await? {
                cached += 1;
            }
        }
        let mut changed: HashSet<u64> = work.diff(&base).into_iter().map(|i| i.0).collect();
        changed.extend(RuntimeImage::dirty_in(&runtime_image_path(&o.dir, ImageKind::Disk))?);
        Ok((cached, changed.len() as u64, work.chunk_count()))
    }

    /// The state of a parcel; without the server, what this client knows (`offline` says why).
    pub async fn stat(&mut self, name: &str) -> Result<ParcelStatus, ClientError> {
        valid_parcel_name(name)?;
        self.clean_stale_runs(name)?;
        let state = self.local_state_name(name)?;
        let server = match self.connect().await {
            Ok(t) => t.parcel(name).await,
            Err(e) => Err(e),
        };
        let (head, lock, policy, offline) = match server {
            Ok(d) => (Some(d.head), d.lock, Some(SeenPolicy::from_server(d.network_policy.as_deref())), None),
            Err(e @ ClientError::Unreachable { .. }) if state != LocalStateName::Absent => {
                (None, None, None, Some(e.to_string()))
            }
            Err(e) => return Err(e),
        };
        let connected = offline.is_none();
        let mut status = ParcelStatus {
            parcel: name.to_owned(),
            state,
            head_version: head,
            base_version: None,
            chunks: ChunkCounts::default(),
            lock,
            memory_image: false,
            pending_upload_bytes: 0,
            network_policy: policy,
            offline,
        };
        if state == LocalStateName::Absent {
            return Ok(status);
        }
        let o = self.open(name)?;
        status.base_version = Some(o.state.base_version);
        status.network_policy = status.network_policy.or(o.state.network_policy);
        let (cached, dirty, total) = self.local_chunk_counts(&o).await?;
        status.chunks = ChunkCounts { cached, dirty, total };
        status.memory_image = !o.state.memory_dropped
            && (o.manifest.memory.is_some() || work_keyring_path(&o.dir, ImageKind::Memory).exists());
        if connected {
            status.pending_upload_bytes = self.pending_upload_bytes(&o).await?;
        }
        Ok(status)
    }

    /// Bytes of the chunks made here (not in the base) that the server lacks.
    async fn pending_upload_bytes(&mut self, o: &Opened) -> Result<u64, ClientError> {
        let plan = self.plan_sync(o)?;
        if plan.new_tags.is_empty() {
            return Ok(0);
        }
        let t = self.connect().await?;
        let cache = self.cache()?;
        Ok(t.missing(&plan.new_tags)
            .await?
            .iter()
            .filter_map(|tag| std::fs::metadata(cache.store().path_of(tag)).ok())
            .map(|m| m.len())
            .sum())
    }

    /// The state of every chunk of the disk and memory images of a checked-out parcel, for the chunk map.
    pub async fn chunk_map(&mut self, name: &str) -> Result<ChunkMap, ClientError> {
        let o = self.open(name)?;
        let cache = self.cache()?;
        let mut map = ChunkMap::default();
        // Which changed chunks the server has already (connected only).
        let plan = self.plan_sync(&o)?;
        let on_server: HashSet<Tag> = match self.connect().await {
            Ok(t) => {
                let missing: HashSet<Tag> = t.missing(&plan.new_tags).await?.into_iter().collect();
                plan.new_tags.iter().filter(|t| !missing.contains(t)).copied().collect()
            }
            Err(_) => HashSet::new(),
        };
        for kind in [ImageKind::Disk, ImageKind::Memory] {
            let Some((base, work, _)) = self.keyrings(&o, kind)? else { continue };
            let mut states = String::with_capacity(work.chunk_count() as usize);
            for i in 0..work.chunk_count() {
                let idx = ChunkIndex(i);
                let tag = work.get(idx).map(|(t, _)| t);
                let base_tag = (i < base.chunk_count()).then(|| base.get(idx).map(|(t, _)| t)).flatten();
                let changed = tag != base_tag;
                states.push(match tag {
                    None => ChunkMap::ZERO,
                    Some(t) if changed && on_server.contains(&t) => ChunkMap::UPLOADED,
                    Some(_) if changed => ChunkMap::DIRTY,
                    Some(t) if cache.contains(&t).await? => ChunkMap::CACHED,
                    Some(_) => ChunkMap::ABSENT,
                });
            }
            match kind {
                ImageKind::Disk => map.disk = states,
                _ => map.memory = states,
            }
        }
        Ok(map)
    }

    // ---- check / export ---------------------------------------------------------------------------

    /// Validate the local cache of a checked-out parcel: every chunk written here is cached, and (`full`)
    /// every cached chunk decodes with its key. With `repair`, every cached chunk is verified at least by its
    /// tag, and one that fails (or is missing) is fetched again (verified) from a lookaside directory or the
    /// server.
    pub async fn check(&mut self, name: &str, full: bool, repair: bool) -> Result<CheckReport, ClientError> {
        let o = self.open(name)?;
        let cache = self.cache()?;
        let sources = match repair {
            true => {
                let t = self.connect().await?;
                Some(self.sources(Some(t))?)
            }
            false => None,
        };
        let mut report = CheckReport::default();
        let mut decoder = ChunkDecoder::new();
        let mut checked = HashSet::new();
        for kind in ImageKind::ALL {
            let Some((base, work, _)) = self.keyrings(&o, kind)? else { continue };
            let base_set: HashSet<&Tag> = base.tags().iter().collect();
            for i in 0..work.chunk_count() {
                let idx = ChunkIndex(i);
                let Some((tag, key)) = work.get(idx) else { continue };
                if !checked.insert(tag) {
                    continue;
                }
                let what = format!("{} chunk {i} ({tag})", kind.name());
                let problem = match cache.get(&tag).await? {
                    None if !base_set.contains(&tag) => {
                        Some(format!("{what} was written here but is missing from the cache"))
                    }
                    None => None,
                    Some(stored) => {
                        let bad = if full {
                            decoder.decode(&tag, key, &stored, work.chunk_len(idx)).err()
                        } else if repair {
                            isr_format::codec::verify_tag(&tag, &stored).err()
                        } else {
                            None
                        };
                        bad.map(|e| format!("{what}: {e}"))
                    }
                };
                let Some(problem) = problem else { continue };
                let Some(sources) = &sources else {
                    report.problems.push(problem);
                    continue;
                };
                cache.evict(&tag)?;
                match sources.get_uncached(&tag).await? {
                    Some(stored) => {
                        decoder
                            .decode(&tag, key, &stored, work.chunk_len(idx))
                            .map_err(|e| ClientError::chunk(&tag, e))?;
                        cache.put_fetched(&tag, stored).await?;
                        report.repaired.push(problem);
                    }
                    None => report.problems.push(format!(
                        "{problem}; neither the server nor a lookaside directory has a copy (written here and never \
                         uploaded)"
                    )),
                }
            }
        }
        // The runtime images: opening one checks its blocks and mends what a crash left; --full verifies
        // every decoded clean chunk against the MAC of what was decoded into it.
        for kind in ImageKind::ALL {
            if !runtime_image_path(&o.dir, kind).exists() || is_running(&o.dir) {
                continue;
            }
            let img = self.working_image_from(&o, kind, self.sources(None)?)?;
            if full {
                let bad = img.verify_local().await?;
                for &i in &bad {
                    let problem = format!(
                        "{} chunk {i} in the runtime image does not match what was decoded",
                        kind.name()
                    );
                    if repair {
                        report.repaired.push(format!("{problem} (dropped: decoded again when read)"));
                    } else {
                        report.problems.push(problem);
                    }
                }
                if repair {
                    img.forget(&bad).await?;
                }
            }
            img.close().await?;
        }
        Ok(report)
    }

    /// Reconstruct the raw disk image of a version (default: the head) into `output`.
    pub async fn export(
        &mut self,
        name: &str,
        version: Option<u64>,
        output: &Path,
    ) -> Result<u64, ClientError> {
        valid_parcel_name(name)?;
        let t = self.connect().await?;
        let detail = t.parcel(name).await?;
        let wrap = self.secrets()?.wrap.clone();
        let keyroot = unwrap_keyroot(&detail.wrapped_keyroot, &wrap, "the server")?;
        let key = ParcelKey { user: &self.user, parcel: name, keyroot: &keyroot };
        let manifest =
            manifests::fetch(&t, &self.home, key, Asked::from_option(version, detail.head)).await?.manifest;
        let ring = Keyring::open(&t.keyring(name, &manifest.disk.keyring).await?, &keyroot)?;
        let sources = self.sources(Some(t.clone()))?;
        let cache = sources.cache().clone();
        let tmp = output.with_extension("isr-partial");
        let file = std::fs::File::create(&tmp)
            .map_err(|e| ClientError::io(format!("creating {}", tmp.display()), e))?;
        file.set_len(ring.image_len().0).map_err(|e| ClientError::io("sizing output", e))?;
        let file = Arc::new(file);
        let bar = self.progress.task("export", ring.image_len().0);
        let ring = Arc::new(ring);
        let results = futures::stream::iter(0..ring.chunk_count())
            .map(|i| {
                let (sources, cache, ring, file) =
                    (sources.clone(), cache.clone(), ring.clone(), file.clone());
                async move {
                    let idx = ChunkIndex(i);
                    let Some((tag, key)) = ring.get(idx).map(|(t, k)| (t, k.clone())) else { return Ok(0) };
                    let was_cached = cache.contains(&tag).await?;
                    let stored = sources.get(&tag).await?;
                    let len = ring.chunk_len(idx);
                    let offset = ring.chunk_size().offset_of(idx).0;
                    let decode_write =
                        |stored: Bytes, key: isr_format::ChunkKey, file: Arc<std::fs::File>| {
                            tokio::task::spawn_blocking(move || {
                                let plain = ChunkDecoder::new()
                                    .decode(&tag, &key, &stored, len)
                                    .map_err(|e| ClientError::chunk(&tag, e))?;
                                use std::os::unix::fs::FileExt;
                                file.write_all_at(&plain, offset)
                                    .map_err(|e| ClientError::io("writing output", e))?;
                                Ok::<u64, ClientError>(len as u64)
                            })
                        };
                    let first = decode_write(stored, key.clone(), file.clone())
                        .await
                        .map_err(|e| ClientError::Other(format!("export task: {e}")))?;
                    match first {
                        // A corrupt cached copy: a good one from a lookaside directory or the server instead.
                        Err(e @ ClientError::Integrity(_)) if was_cached => {
                            let good = sources.refetch(&tag, e).await?;
                            decode_write(good, key, file)
                                .await
                                .map_err(|e| ClientError::Other(format!("export task: {e}")))?
                        }
                        other => other,
                    }
                }
            })
            .buffer_unordered(FETCHES_IN_FLIGHT);
        futures::pin_mut!(results);
        while let Some(r) = results.next().await {
            match r {
                Ok(n) => bar.advance(n),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            }
        }
        drop(bar);
        file.sync_all().map_err(|e| ClientError::io("syncing output", e))?;
        std::fs::rename(&tmp, output)
            .map_err(|e| ClientError::io(format!("renaming to {}", output.display()), e))?;
        Ok(ring.image_len().0)
    }
}

// ---- helpers ---------------------------------------------------------------------------------------

fn not_checked_out(name: &str) -> ClientError {
    ClientError::Usage(format!("{name} is not checked out on this client: run `isr checkout {name}`"))
}

/// A lost lock, told with what the user can do: the local changes are kept, and `checkout` takes the lock
/// again when it is free.
fn lock_guidance(name: &str, e: ClientError) -> ClientError {
    match e {
        ClientError::LockLost(mut loss) => {
            let who = match &loss.holder_now {
                Some((holder, since)) => format!("{holder} holds it now (since {})", rfc3339(*since)),
                None => "it is free now".to_owned(),
            };
            loss.message = format!(
                "{}; {who}. Nothing can be checked in without the lock; the local changes to {name} are kept: \
                 `isr checkout {name}` takes the lock again when it is free",
                loss.message
            );
            ClientError::LockLost(loss)
        }
        other => other,
    }
}

/// Every stored chunk of an image with its plaintext length (for progress in bytes).
fn image_chunks(ring: &Keyring) -> impl Iterator<Item = (Tag, u64)> + '_ {
    (0..ring.chunk_count())
        .filter_map(move |i| ring.get(ChunkIndex(i)).map(|(t, _)| (t, ring.chunk_len(ChunkIndex(i)) as u64)))
}

/// Decode a hex wrapped keyroot (from `source`, for the message) and unwrap it with the password's key.
fn unwrap_keyroot(
    hex_wrapped: &str,
    wrap: &isr_format::KeyWrapKey,
    source: &str,
) -> Result<Keyroot, ClientError> {
    let bytes = hex::decode(hex_wrapped)
        .map_err(|_| ClientError::Integrity(format!("{source} holds a malformed wrapped keyroot")))?;
    Ok(WrappedKeyroot(bytes).unwrap(wrap)?)
}

/// An input file of `isr create`: a regular, readable, non-empty file.
fn check_input_file(path: &Path, what: &str) -> Result<(), ClientError> {
    let meta =
        std::fs::metadata(path).map_err(|e| ClientError::Usage(format!("{what} {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(ClientError::Usage(format!("{what} {} is not a regular file", path.display())));
    }
    if meta.len() == 0 {
        return Err(ClientError::Usage(format!("{what} {} is empty", path.display())));
    }
    std::fs::File::open(path).map_err(|e| ClientError::Usage(format!("{what} {}: {e}", path.display())))?;
    Ok(())
}

/// A raw image to import: the file itself, or a raw conversion made with `qemu-img` for other formats.
struct RawImage {
    path: PathBuf,
    temp: bool,
}

impl RawImage {
    fn open(path: &Path, tmp_dir: &Path) -> Result<RawImage, ClientError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| ClientError::io(format!("disk image {}", path.display()), e))?;
        if !meta.is_file() {
            return Err(ClientError::Usage(format!("disk image {} is not a regular file", path.display())));
        }
        let format = detect_format(path)?;
        if format == "raw" {
            return Ok(RawImage { path: path.to_owned(), temp: false });
        }
        std::fs::create_dir_all(tmp_dir).map_err(|e| ClientError::io("creating temp dir", e))?;
        let out = tmp_dir.join(format!("import-{}.raw", std::process::id()));
        let status = std::process::Command::new("qemu-img")
            .args(["convert", "-f", &format, "-O", "raw"])
            .arg(path)
            .arg(&out)
            .status()
            .map_err(|e| ClientError::io("running qemu-img (install qemu-utils)", e))?;
        if !status.success() {
            let _ = std::fs::remove_file(&out);
            return Err(ClientError::Other(format!(
                "qemu-img could not convert {} from {format}",
                path.display()
            )));
        }
        Ok(RawImage { path: out, temp: true })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RawImage {
    fn drop(&mut self) {
        if self.temp {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The image format by its magic bytes (qcow2, vmdk, vdi, vhdx; anything else is raw).
fn detect_format(path: &Path) -> Result<String, ClientError> {
    let mut head = [0u8; 512];
    let mut f =
        std::fs::File::open(path).map_err(|e| ClientError::io(format!("opening {}", path.display()), e))?;
    let n = f.read(&mut head).map_err(|e| ClientError::io("reading image header", e))?;
    let h = &head[..n];
    Ok(if h.starts_with(b"QFI\xfb") {
        "qcow2"
    } else if h.starts_with(b"KDMV") {
        "vmdk"
    } else if h.len() >= 68 && h[64..68] == [0x7f, 0x10, 0xda, 0xbe] {
        "vdi"
    } else if h.starts_with(b"vhdxfile") {
        "vhdx"
    } else {
        "raw"
    }
    .to_owned())
}

/// Stream a file through the encoder on all cores and upload the chunks the server lacks.
async fn upload_image(
    progress: &dyn Progress,
    t: &Transport,
    secret: &ConvergenceSecret,
    path: &Path,
    chunk_size: ChunkSize,
    what: &str,
    transfer: &mut Transfer,
) -> Result<Keyring, ClientError> {
    let len = std::fs::metadata(path).map_err(|e| ClientError::io(format!("{}", path.display()), e))?.len();
    if len == 0 {
        return Err(ClientError::Usage(format!("{} is empty", path.display())));
    }
    let mut ring = Keyring::new(chunk_size, ImageLen(len))?;
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<Result<(u64, Option<isr_format::EncodedChunk>), ClientError>>(64);
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let path_owned = path.to_owned();
    let secret = secret.clone();
    let producer =
        tokio::task::spawn_blocking(move || encode_file(&path_owned, chunk_size, len, workers, secret, tx));
    let bar = progress.task(what, len);
    let mut uploaded: HashSet<Tag> = HashSet::new();
    let mut batch: Vec<isr_format::EncodedChunk> = Vec::new();
    transfer.image_bytes += len;
    loop {
        let next = rx.recv().await;
        let done = next.is_none();
        if let Some(item) = next {
            let (i, enc) = item?;
            bar.advance(ring.chunk_len(ChunkIndex(i)) as u64);
            if let Some(e) = enc {
                ring.set(ChunkIndex(i), Some((e.tag, e.key.clone())));
                if uploaded.insert(e.tag) {
                    batch.push(e);
                }
            }
        }
        if batch.len() >= 256 || (done && !batch.is_empty()) {
            let tags: Vec<Tag> = batch.iter().map(|e| e.tag).collect();
            let missing: HashSet<Tag> = t.missing(&tags).await?.into_iter().collect();
            let to_send: Vec<_> =
                std::mem::take(&mut batch).into_iter().filter(|e| missing.contains(&e.tag)).collect();
            let sent = futures::stream::iter(to_send)
                .map(|e| async move {
                    let n = e.stored.len() as u64;
                    t.put_chunk(&e.tag, Bytes::from(e.stored)).await.map(|_| n)
                })
                .buffer_unordered(UPLOADS_IN_FLIGHT)
                .collect::<Vec<_>>()
                .await;
            for r in sent {
                transfer.bytes += r?;
                transfer.chunks += 1;
            }
        }
        if done {
            break;
        }
    }
    producer.await.map_err(|e| ClientError::Other(format!("reader task: {e}")))??;
    drop(bar);
    Ok(ring)
}

/// Read `path` chunk by chunk and encode on `workers` threads, sending results in any order.
pub(crate) fn encode_file(
    path: &Path,
    chunk_size: ChunkSize,
    len: u64,
    workers: usize,
    secret: ConvergenceSecret,
    tx: tokio::sync::mpsc::Sender<Result<(u64, Option<isr_format::EncodedChunk>), ClientError>>,
) -> Result<(), ClientError> {
    let mut f =
        std::fs::File::open(path).map_err(|e| ClientError::io(format!("opening {}", path.display()), e))?;
    let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(workers * 4);
    let work_rx = std::sync::Mutex::new(work_rx);
    let n = chunk_size.chunk_count(ImageLen(len));
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (rx, tx, secret) = (&work_rx, tx.clone(), secret.clone());
            s.spawn(move || {
                let mut enc = ChunkEncoder::new(secret);
                loop {
                    let job = rx.lock().expect("work queue").recv();
                    let Ok((i, data)) = job else { break };
                    let r = enc
                        .encode(&data)
                        .map(|e| (i, e))
                        .map_err(|e| ClientError::Other(format!("encoding chunk {i}: {e}")));
                    if tx.blocking_send(r).is_err() {
                        break;
                    }
                }
            });
        }
        let mut result = Ok(());
        for i in 0..n {
            let clen = chunk_size.chunk_len(ImageLen(len), ChunkIndex(i));
            let mut buf = vec![0u8; clen];
            if let Err(e) = f.read_exact(&mut buf) {
                result = Err(ClientError::io(format!("reading {} at chunk {i}", path.display()), e));
                break;
            }
            if work_tx.send((i, buf)).is_err() {
                break;
            }
        }
        drop(work_tx);
        result
    })
}

async fn upload_from_cache(
    progress: &dyn Progress,
    t: &Transport,
    cache: &ChunkCache,
    tags: &[Tag],
    transfer: &mut Transfer,
) -> Result<(), ClientError> {
    let total: u64 = tags
        .iter()
        .filter_map(|tag| std::fs::metadata(cache.store().path_of(tag)).ok())
        .map(|m| m.len())
        .sum();
    let bar = progress.task("upload", total);
    let results = futures::stream::iter(tags.iter().copied())
        .map(|tag| async move {
            let stored = cache.get(&tag).await?.ok_or_else(|| {
                ClientError::Integrity(format!(
                    "chunk {tag} written on this client is missing from the cache"
                ))
            })?;
            let n = stored.len() as u64;
            t.put_chunk(&tag, stored).await?;
            Ok::<u64, ClientError>(n)
        })
        .buffer_unordered(UPLOADS_IN_FLIGHT);
    futures::pin_mut!(results);
    while let Some(r) = results.next().await {
        let n = r?;
        transfer.bytes += n;
        transfer.chunks += 1;
        bar.advance(n);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn commit_with_retry(
    t: &Transport,
    cache: &ChunkCache,
    name: &str,
    lock_id: &str,
    base_version: u64,
    manifest: &[u8],
    client: &str,
    comment: &str,
    transfer: &mut Transfer,
    fresh: Option<&[(ImageKind, Keyring)]>,
) -> Result<u64, ClientError> {
    for _ in 0..4 {
        match t.commit(name, lock_id, base_version, manifest, client, comment, transfer.bytes).await? {
            Ok(v) => return Ok(v),
            Err(CommitRefusal::MissingChunks(missing)) => {
                if fresh.is_some() {
                    // A create does not keep its chunks locally: the server lost some of them meanwhile.
                    return Err(ClientError::Server(format!(
                        "the server lost {} chunks during the upload (a concurrent gc?): run the create again",
                        missing.len()
                    )));
                }
                upload_from_cache(&progress::Quiet, t, cache, &missing, transfer).await?;
            }
        }
    }
    Err(ClientError::Server("the server kept refusing the commit for missing chunks".into()))
}

/// Fetch into the cache every distinct stored chunk of `chunks` that it lacks (from a lookaside directory or
/// the server), several in flight.
async fn fetch_missing(
    progress: &dyn Progress,
    sources: &ChunkSources,
    chunks: &[(Tag, u64)],
    what: &str,
) -> Result<Transfer, ClientError> {
    let wanted = sources.not_cached(chunks).await;
    // Progress in image bytes (what the chunks decode to): the stored sizes are known only once fetched.
    let bar = progress.task(what, wanted.iter().map(|(_, n)| n).sum());
    let mut transfer = Transfer::default();
    sources
        .prefetch(&wanted, FETCHES_IN_FLIGHT, |stored, plain| {
            transfer.bytes += stored;
            transfer.chunks += 1;
            bar.advance(plain);
        })
        .await?;
    Ok(transfer)
}
