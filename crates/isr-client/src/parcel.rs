//! The parcel lifecycle: what each `isr` command does, as library calls.

use crate::cache::ChunkCache;
use crate::error::ClientError;
use crate::home::{now_unix, valid_parcel_name, write_atomic, Home, LocalState, Session};
use crate::image::{WorkingImage, DEFAULT_MEMORY_CACHE};
use crate::manifests::{self, Asked, ParcelKey};
use crate::progress;
use crate::transport::{CommitRefusal, ParcelSummary, Transport, VersionInfo};
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

/// The local state of a parcel, as `isr stat` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ParcelStatus {
    pub parcel: String,
    pub state: &'static str,
    pub head_version: Option<u64>,
    pub base_version: Option<u64>,
    pub chunks: ChunkCounts,
    pub lock: Option<crate::transport::LockInfo>,
    pub memory_image: bool,
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
}

fn base_keyring_path(dir: &Path, kind: ImageKind) -> PathBuf {
    dir.join("keyrings").join(format!("base-{}", kind.name()))
}

pub fn work_keyring_path(dir: &Path, kind: ImageKind) -> PathBuf {
    dir.join("keyrings").join(format!("work-{}", kind.name()))
}

fn read_file(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::io(format!("reading {}", path.display()), e))
}

/// Whether a disk export or VM of the parcel is running (it holds `run.lock`).
pub fn is_running(dir: &Path) -> bool {
    let Ok(f) = std::fs::File::open(dir.join("run.lock")) else { return false };
    !try_flock(&f)
}

fn try_flock(f: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a valid open descriptor has no memory-safety preconditions.
    #[allow(unsafe_code)]
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    r == 0
}

/// Held while a disk export or VM runs; released (by the kernel, even on kill -9) when dropped.
#[derive(Debug)]
pub struct RunGuard {
    _file: std::fs::File,
}

impl RunGuard {
    pub fn acquire(dir: &Path) -> Result<RunGuard, ClientError> {
        let path = dir.join("run.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ClientError::io(format!("opening {}", path.display()), e))?;
        if !try_flock(&f) {
            return Err(ClientError::Other("the parcel is already running on this client".into()));
        }
        Ok(RunGuard { _file: f })
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
        Client { home, user, server, ca_pem, password, secrets: None, transport: None, session: None }
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

    /// Import a disk image (raw, or anything `qemu-img` reads) as version 1 of a new parcel.
    pub async fn create(
        &mut self,
        name: &str,
        disk: &Path,
        opts: &CreateOptions,
    ) -> Result<(u64, Transfer), ClientError> {
        valid_parcel_name(name)?;
        let t = self.connect().await?;
        let id = self.home.identity()?;
        let wrap = self.secrets()?.wrap.clone();
        let raw = RawImage::open(disk, &self.home.root().join("tmp"))?;
        let (keyroot, lock_id) = {
            let keyroot = Keyroot::random();
            let wrapped = WrappedKeyroot::wrap(&keyroot, &wrap);
            let recovery = match self.session.as_ref().and_then(|s| s.recovery_pubkey.clone()) {
                Some(hexkey) => Some(WrappedKeyroot::seal_for_recovery(
                    &keyroot,
                    &RecoveryPublicKey::from_hex(&hexkey).map_err(|e| ClientError::Server(e.to_string()))?,
                )),
                None => None,
            };
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
        let secret = self.convergence_secret()?;
        let mut transfer = Transfer::default();
        let mut images: Vec<(ImageKind, Keyring)> = Vec::new();
        let disk_ring = upload_image(&t, &secret, raw.path(), opts.chunk_size, "disk", &mut transfer).await?;
        images.push((ImageKind::Disk, disk_ring));
        if let Some(k) = &opts.kernel {
            images.push((
                ImageKind::Kernel,
                upload_image(&t, &secret, k, opts.chunk_size, "kernel", &mut transfer).await?,
            ));
        }
        if let Some(i) = &opts.initrd {
            images.push((
                ImageKind::Initrd,
                upload_image(&t, &secret, i, opts.chunk_size, "initrd", &mut transfer).await?,
            ));
        }
        let mut refs = std::collections::HashMap::new();
        for (kind, ring) in &images {
            let sealed = Bytes::from(ring.seal(&keyroot));
            let hash = Tag(*blake3::hash(&sealed).as_bytes());
            t.put_keyring(name, &hash, sealed).await?;
            refs.insert(*kind, ImageRef { len: ring.image_len(), keyring: hash });
        }
        let manifest = Manifest {
            vm: VmDescription { memory_mib: opts.memory_mib, cpus: opts.cpus, append: opts.append.clone() },
            chunk_size: opts.chunk_size,
            disk: refs[&ImageKind::Disk],
            memory: None,
            kernel: refs.get(&ImageKind::Kernel).copied(),
            initrd: refs.get(&ImageKind::Initrd).copied(),
            created_unix: now_unix(),
            comment: opts.comment.clone(),
        };
        let key = ParcelKey { user: &self.user, parcel: name, keyroot: &keyroot };
        let sealed = manifests::seal_for_commit(&manifest, key, 0)?;
        let version = commit_with_retry(
            &t,
            &self.cache()?,
            name,
            &lock_id,
            0,
            &sealed,
            &id.name,
            &opts.comment,
            &mut transfer,
            Some(&images),
        )
        .await?;
        manifests::record_commit(&self.home, key, version)?;
        t.unlock(name, Some(&lock_id)).await?;
        Ok((version, transfer))
    }

    // ---- checkout ---------------------------------------------------------------------------------

    /// Take the lock and fetch what a resume needs. A parcel this client already holds is a no-op.
    pub async fn checkout(&mut self, name: &str, version: Option<u64>) -> Result<LocalState, ClientError> {
        valid_parcel_name(name)?;
        if let Some(st) = self.home.local_state(&self.user, name)? {
            if version.is_none_or(|v| v == st.base_version) {
                return Ok(st);
            }
            return Err(ClientError::Usage(format!(
                "{name} is already checked out here at version {}: check it in or discard it first",
                st.base_version
            )));
        }
        let t = self.connect().await?;
        let id = self.home.identity()?;
        let lock_id = t.lock(name, &id.name, &id.client_id).await?;
        let result = self.fetch_version(&t, name, version, lock_id.clone()).await;
        if result.is_err() {
            let _ = t.unlock(name, Some(&lock_id)).await;
        }
        result
    }

    async fn fetch_version(
        &mut self,
        t: &Transport,
        name: &str,
        version: Option<u64>,
        lock_id: String,
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
        let dir = self.home.parcel_dir(&self.user, name);
        let _ = std::fs::remove_dir_all(&dir);
        let cache = self.cache()?;
        for (kind, r) in manifest.images() {
            let bytes = t.keyring(name, &r.keyring).await?;
            let ring = Keyring::open(&bytes, &keyroot)?;
            write_atomic(&base_keyring_path(&dir, kind), &bytes)?;
            if kind != ImageKind::Disk {
                // Memory, kernel and initrd are needed whole to start the VM.
                fetch_missing(t, &cache, ring.tags(), kind.name()).await?;
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
        };
        self.home.save_local_state(&st)?;
        Ok(st)
    }

    /// Open a checked-out parcel: unwrap the keyroot and authenticate manifest and keyrings.
    pub fn open(&mut self, name: &str) -> Result<Opened, ClientError> {
        valid_parcel_name(name)?;
        let state = self.home.local_state(&self.user, name)?.ok_or_else(|| {
            ClientError::Usage(format!("{name} is not checked out on this client: run `isr checkout {name}`"))
        })?;
        let wrap = self.secrets()?.wrap.clone();
        let keyroot = unwrap_keyroot(&state.wrapped_keyroot, &wrap, "the local state")?;
        let dir = self.home.parcel_dir(&self.user, name);
        let manifest_bytes = read_file(&dir.join("base.manifest"))?;
        let key = ParcelKey { user: &self.user, parcel: name, keyroot: &keyroot };
        let manifest = manifests::open_local(&self.home, key, state.base_version, &manifest_bytes)?;
        Ok(Opened { state, dir, keyroot, manifest, manifest_bytes })
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
        let (base, work, _) = self
            .keyrings(o, kind)?
            .ok_or_else(|| ClientError::Other(format!("the parcel has no {} image", kind.name())))?;
        Ok(Arc::new(WorkingImage::new(
            work,
            base.tags().to_vec(),
            o.keyroot.clone(),
            work_keyring_path(&o.dir, kind),
            self.cache()?,
            server,
            self.convergence_secret()?,
            DEFAULT_MEMORY_CACHE,
        )))
    }

    // ---- sync / checkin / discard -----------------------------------------------------------------

    /// Upload local changes as a new version and keep the lock.
    pub async fn sync(&mut self, name: &str, comment: &str) -> Result<Option<(u64, Transfer)>, ClientError> {
        let o = self.open(name)?;
        if is_running(&o.dir) {
            return Err(ClientError::Other(format!(
                "{name} is running: suspend it (or stop `isr disk`) before syncing"
            )));
        }
        let t = self.connect().await?;
        let id = self.home.identity()?;
        let cache = self.cache()?;
        let mut changed: Vec<(ImageKind, Keyring, Keyring)> = Vec::new();
        let mut any_modified = false;
        for kind in ImageKind::ALL {
            if kind == ImageKind::Memory
                && o.state.memory_dropped
                && !work_keyring_path(&o.dir, kind).exists()
            {
                any_modified = true;
                continue;
            }
            if let Some((base, work, modified)) = self.keyrings(&o, kind)? {
                any_modified |= modified;
                changed.push((kind, base, work));
            }
        }
        if !any_modified {
            return Ok(None);
        }
        let mut transfer = Transfer::default();
        let mut new_tags: Vec<Tag> = Vec::new();
        let mut seen = HashSet::new();
        for (_, base, work) in &changed {
            let base_set: HashSet<&Tag> = base.tags().iter().collect();
            for tag in work.tags() {
                if !tag.is_zero() && !base_set.contains(tag) && seen.insert(*tag) {
                    new_tags.push(*tag);
                }
            }
        }
        let missing = t.missing(&new_tags).await?;
        upload_from_cache(&t, &cache, &missing, &mut transfer).await?;
        let mut manifest = o.manifest.clone();
        manifest.memory = None;
        let mut sealed_by_kind = Vec::new();
        for (kind, _, work) in &changed {
            let work_path = work_keyring_path(&o.dir, *kind);
            let bytes = if work_path.exists() {
                read_file(&work_path)?
            } else {
                read_file(&base_keyring_path(&o.dir, *kind))?
            };
            let hash = Tag(*blake3::hash(&bytes).as_bytes());
            if work_path.exists() {
                t.put_keyring(name, &hash, Bytes::from(bytes.clone())).await?;
            }
            let r = ImageRef { len: work.image_len(), keyring: hash };
            match kind {
                ImageKind::Disk => manifest.disk = r,
                ImageKind::Memory => manifest.memory = Some(r),
                ImageKind::Kernel => manifest.kernel = Some(r),
                ImageKind::Initrd => manifest.initrd = Some(r),
            }
            sealed_by_kind.push((*kind, bytes));
        }
        manifest.created_unix = now_unix();
        manifest.comment = comment.to_owned();
        let key = ParcelKey { user: &self.user, parcel: name, keyroot: &o.keyroot };
        let base = o.state.head_at_checkout;
        let sealed = manifests::seal_for_commit(&manifest, key, base)?;
        let committed = match manifests::check_commit_base(&self.home, key, base) {
            Ok(()) => {
                commit_with_retry(
                    &t,
                    &cache,
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
                let head = manifests::fetch(&t, &self.home, key, Asked::Head { at_least: base }).await?;
                let same = head.manifest.images().map(|(k, r)| (k, r.keyring)).collect::<Vec<_>>()
                    == manifest.images().map(|(k, r)| (k, r.keyring)).collect::<Vec<_>>();
                if !same {
                    return Err(ClientError::StaleBase(msg));
                }
                // Its manifest (bound to its own number) becomes the base.
                (head.version, head.bytes.to_vec())
            }
            Err(e) => return Err(e),
        };
        manifests::record_commit(&self.home, key, version)?;
        // Record the new base: keyrings first, then the manifest, then the state that points at them.
        for (kind, bytes) in &sealed_by_kind {
            write_atomic(&base_keyring_path(&o.dir, *kind), bytes)?;
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
        for (kind, _) in &sealed_by_kind {
            let _ = std::fs::remove_file(work_keyring_path(&o.dir, *kind));
        }
        Ok(Some((version, transfer)))
    }

    /// Sync, then release the lock; the parcel leaves this client (its chunks stay in the cache).
    pub async fn checkin(
        &mut self,
        name: &str,
        comment: &str,
    ) -> Result<Option<(u64, Transfer)>, ClientError> {
        let synced = self.sync(name, comment).await?;
        let st = self
            .home
            .local_state(&self.user, name)?
            .ok_or_else(|| ClientError::Other("local state vanished".into()))?;
        let t = self.connect().await?;
        t.unlock(name, Some(&st.lock_id)).await?;
        let dir = self.home.parcel_dir(&self.user, name);
        std::fs::remove_dir_all(&dir)
            .map_err(|e| ClientError::io(format!("removing {}", dir.display()), e))?;
        Ok(synced)
    }

    /// Drop local changes: back to the base version.
    pub fn discard(&mut self, name: &str) -> Result<(), ClientError> {
        let o = self.open(name)?;
        if is_running(&o.dir) {
            return Err(ClientError::Other(format!("{name} is running: stop it before discarding")));
        }
        for kind in ImageKind::ALL {
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

    /// Fetch every chunk of the parcel into the cache.
    pub async fn hoard(&mut self, name: &str) -> Result<Transfer, ClientError> {
        let o = self.open(name)?;
        let t = self.connect().await?;
        let cache = self.cache()?;
        let mut tags = Vec::new();
        for kind in ImageKind::ALL {
            if let Some((base, work, _)) = self.keyrings(&o, kind)? {
                tags.extend_from_slice(base.tags());
                tags.extend_from_slice(work.tags());
            }
        }
        fetch_missing(&t, &cache, &tags, "hoard").await
    }

    /// How many distinct stored chunks of a checked-out parcel are not in the cache.
    pub async fn missing_locally(&mut self, o: &Opened) -> Result<u64, ClientError> {
        let cache = self.cache()?;
        let mut seen = HashSet::new();
        let mut n = 0;
        for kind in ImageKind::ALL {
            if let Some((_, work, _)) = self.keyrings(o, kind)? {
                for tag in work.tags() {
                    if !tag.is_zero() && seen.insert(*tag) && !cache.contains(tag).await? {
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }

    // ---- rollback / unlock ------------------------------------------------------------------------

    /// Make version `version` the content of a new head: its manifest re-sealed for head + 1 and committed
    /// like any version (its keyrings and chunks are already on the server). Uses this client's lock when the
    /// parcel is checked out here (the local base then moves to the new head), else takes the lock for the
    /// commit and releases it.
    pub async fn rollback(&mut self, name: &str, version: u64) -> Result<u64, ClientError> {
        valid_parcel_name(name)?;
        let local = self.home.local_state(&self.user, name)?;
        if let Some(st) = &local {
            let dir = self.home.parcel_dir(&self.user, name);
            if ImageKind::ALL.iter().any(|k| work_keyring_path(&dir, *k).exists()) || is_running(&dir) {
                return Err(ClientError::Other(format!(
                    "{name} has local changes here: check them in or discard them before a rollback (base {})",
                    st.base_version
                )));
            }
        }
        let t = self.connect().await?;
        let id = self.home.identity()?;
        let lock_id = match &local {
            Some(st) => st.lock_id.clone(),
            None => t.lock(name, &id.name, &id.client_id).await?,
        };
        let committed = self.commit_rollback(&t, name, version, &lock_id, &id.name).await;
        if local.is_none() {
            let released = t.unlock(name, Some(&lock_id)).await;
            // A failed commit is the error to report; after a good one, a failed release is.
            if committed.is_ok() {
                released?;
            }
        }
        let v = committed?;
        if let Some(st) = local {
            // Still holding the lock: move the local base to the new head.
            self.fetch_version(&t, name, Some(v), st.lock_id).await?;
        }
        Ok(v)
    }

    async fn commit_rollback(
        &mut self,
        t: &Transport,
        name: &str,
        version: u64,
        lock_id: &str,
        client: &str,
    ) -> Result<u64, ClientError> {
        let detail = t.parcel(name).await?;
        let wrap = self.secrets()?.wrap.clone();
        let keyroot = unwrap_keyroot(&detail.wrapped_keyroot, &wrap, "the server")?;
        let key = ParcelKey { user: &self.user, parcel: name, keyroot: &keyroot };
        let mut manifest = manifests::fetch(t, &self.home, key, Asked::Version(version)).await?.manifest;
        let comment = format!("rollback to version {version}");
        manifest.comment = comment.clone();
        manifest.created_unix = now_unix();
        let base = detail.head;
        manifests::check_commit_base(&self.home, key, base)?;
        let sealed = manifests::seal_for_commit(&manifest, key, base)?;
        let mut transfer = Transfer::default();
        let v = commit_with_retry(
            t,
            &self.cache()?,
            name,
            lock_id,
            base,
            &sealed,
            client,
            &comment,
            &mut transfer,
            None,
        )
        .await?;
        manifests::record_commit(&self.home, key, v)?;
        Ok(v)
    }

    pub async fn unlock_force(&mut self, name: &str) -> Result<(), ClientError> {
        let t = self.connect().await?;
        t.unlock(name, None).await
    }

    // ---- listing ----------------------------------------------------------------------------------

    pub async fn list(&mut self) -> Result<Vec<(ParcelSummary, &'static str)>, ClientError> {
        let t = self.connect().await?;
        let mut out = Vec::new();
        for p in t.parcels().await? {
            let state = self.local_state_name(&p.name)?;
            out.push((p, state));
        }
        Ok(out)
    }

    pub async fn versions(&mut self, name: &str) -> Result<Vec<VersionInfo>, ClientError> {
        let t = self.connect().await?;
        t.versions(name).await
    }

    fn local_state_name(&self, name: &str) -> Result<&'static str, ClientError> {
        let Some(st) = self.home.local_state(&self.user, name)? else { return Ok("absent") };
        let dir = self.home.parcel_dir(&self.user, name);
        if is_running(&dir) {
            return Ok("running");
        }
        let modified =
            st.memory_dropped || ImageKind::ALL.iter().any(|k| work_keyring_path(&dir, *k).exists());
        Ok(if modified { "modified" } else { "unmodified" })
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
        Ok((cached, work.diff(&base).len() as u64, work.chunk_count()))
    }

    pub async fn stat(&mut self, name: &str) -> Result<ParcelStatus, ClientError> {
        valid_parcel_name(name)?;
        let t = self.connect().await?;
        let detail = t.parcel(name).await?;
        let state = self.local_state_name(name)?;
        let mut status = ParcelStatus {
            parcel: name.to_owned(),
            state,
            head_version: Some(detail.head),
            base_version: None,
            chunks: ChunkCounts::default(),
            lock: detail.lock,
            memory_image: false,
        };
        if state == "absent" {
            return Ok(status);
        }
        let o = self.open(name)?;
        status.base_version = Some(o.state.base_version);
        let (cached, dirty, total) = self.local_chunk_counts(&o).await?;
        status.chunks = ChunkCounts { cached, dirty, total };
        status.memory_image = !o.state.memory_dropped
            && (o.manifest.memory.is_some() || work_keyring_path(&o.dir, ImageKind::Memory).exists());
        Ok(status)
    }

    // ---- check / export ---------------------------------------------------------------------------

    /// Validate the local cache of a checked-out parcel. Returns the problems found (empty = healthy).
    pub async fn check(&mut self, name: &str, full: bool) -> Result<Vec<String>, ClientError> {
        let o = self.open(name)?;
        let cache = self.cache()?;
        let mut problems = Vec::new();
        let mut decoder = ChunkDecoder::new();
        for kind in ImageKind::ALL {
            let Some((base, work, _)) = self.keyrings(&o, kind)? else { continue };
            let base_set: HashSet<&Tag> = base.tags().iter().collect();
            for i in 0..work.chunk_count() {
                let Some((tag, key)) = work.get(ChunkIndex(i)) else { continue };
                let local = cache.get(&tag).await?;
                match local {
                    None if !base_set.contains(&tag) => problems.push(format!(
                        "{} chunk {i} ({tag}) was written here but is missing from the cache",
                        kind.name()
                    )),
                    None => {}
                    Some(stored) if full => {
                        if let Err(e) = decoder.decode(&tag, key, &stored, work.chunk_len(ChunkIndex(i))) {
                            problems.push(format!("{} chunk {i}: {e}", kind.name()));
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(problems)
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
        let cache = self.cache()?;
        let tmp = output.with_extension("isr-partial");
        let file = std::fs::File::create(&tmp)
            .map_err(|e| ClientError::io(format!("creating {}", tmp.display()), e))?;
        file.set_len(ring.image_len().0).map_err(|e| ClientError::io("sizing output", e))?;
        let file = Arc::new(file);
        let bar = progress::bytes(ring.image_len().0, "export");
        let ring = Arc::new(ring);
        let results = futures::stream::iter(0..ring.chunk_count())
            .map(|i| {
                let (t, cache, ring, file) = (t.clone(), cache.clone(), ring.clone(), file.clone());
                async move {
                    let idx = ChunkIndex(i);
                    let Some((tag, key)) = ring.get(idx).map(|(t, k)| (t, k.clone())) else { return Ok(0) };
                    let stored = cache.get_or_fetch(&tag, Some(&t)).await?;
                    let len = ring.chunk_len(idx);
                    let offset = ring.chunk_size().offset_of(idx).0;
                    tokio::task::spawn_blocking(move || {
                        let plain = ChunkDecoder::new()
                            .decode(&tag, &key, &stored, len)
                            .map_err(|e| ClientError::chunk(&tag, e))?;
                        use std::os::unix::fs::FileExt;
                        file.write_all_at(&plain, offset)
                            .map_err(|e| ClientError::io("writing output", e))?;
                        Ok::<u64, ClientError>(len as u64)
                    })
                    .await
                    .map_err(|e| ClientError::Other(format!("export task: {e}")))?
                }
            })
            .buffer_unordered(FETCHES_IN_FLIGHT);
        futures::pin_mut!(results);
        while let Some(r) = results.next().await {
            match r {
                Ok(n) => bar.inc(n),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            }
        }
        bar.finish_and_clear();
        file.sync_all().map_err(|e| ClientError::io("syncing output", e))?;
        std::fs::rename(&tmp, output)
            .map_err(|e| ClientError::io(format!("renaming to {}", output.display()), e))?;
        Ok(ring.image_len().0)
    }
}

// ---- helpers ---------------------------------------------------------------------------------------

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
    let bar = progress::bytes(len, what);
    let mut uploaded: HashSet<Tag> = HashSet::new();
    let mut batch: Vec<isr_format::EncodedChunk> = Vec::new();
    transfer.image_bytes += len;
    loop {
        let next = rx.recv().await;
        let done = next.is_none();
        if let Some(item) = next {
            let (i, enc) = item?;
            bar.inc(ring.chunk_len(ChunkIndex(i)) as u64);
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
    bar.finish_and_clear();
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
    t: &Transport,
    cache: &ChunkCache,
    tags: &[Tag],
    transfer: &mut Transfer,
) -> Result<(), ClientError> {
    let bar = progress::bytes(tags.len() as u64, "upload");
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
        .buffer_unordered(UPLOADS_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    for r in results {
        transfer.bytes += r?;
        transfer.chunks += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
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
                upload_from_cache(t, cache, &missing, transfer).await?;
            }
        }
    }
    Err(ClientError::Server("the server kept refusing the commit for missing chunks".into()))
}

/// Fetch every distinct stored chunk of `tags` that the cache lacks, several in flight.
async fn fetch_missing(
    t: &Transport,
    cache: &ChunkCache,
    tags: &[Tag],
    what: &str,
) -> Result<Transfer, ClientError> {
    let mut wanted = Vec::new();
    let mut seen = HashSet::new();
    for tag in tags {
        if !tag.is_zero() && seen.insert(*tag) && !cache.contains(tag).await? {
            wanted.push(*tag);
        }
    }
    let bar = progress::bytes(wanted.len() as u64, what);
    let results = futures::stream::iter(wanted)
        .map(|tag| async move {
            let b = t.get_chunk(&tag).await?;
            let n = b.len() as u64;
            cache.put_fetched(&tag, b).await?;
            Ok::<u64, ClientError>(n)
        })
        .buffer_unordered(FETCHES_IN_FLIGHT);
    futures::pin_mut!(results);
    let mut transfer = Transfer::default();
    while let Some(r) = results.next().await {
        transfer.bytes += r?;
        transfer.chunks += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(transfer)
}
