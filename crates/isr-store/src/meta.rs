//! Server metadata: users, login tokens, parcels, locks, keyrings and versions, behind the async
//! [`MetaStore`] trait.
//!
//! Every piece of state that several server processes must agree on (locks, tokens, failed-login counters, the
//! deployment's settings) lives behind this trait, never in process memory, so several `isr-server serve`
//! processes can share one database. The embedded backend is [`crate::SqliteMetaStore`], the shared one
//! [`crate::PgMetaStore`]; both implement the trait through one implementation over a small transaction
//! interface (`meta_tx.rs`), with the rules in `rules.rs` and the schema and statements in `sql.rs` (see the
//! notes on [`MetaStore::commit_version`] and [`MetaStore::gc_sweep`] for how each backend locks).

use async_trait::async_trait;
use bytes::Bytes;
use isr_format::Tag;
use std::collections::HashSet;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("user {0} already exists")]
    UserExists(String),
    #[error("no such user: {0}")]
    NoSuchUser(String),
    #[error("no such parcel: {0}")]
    NoSuchParcel(String),
    #[error("parcel {0} already exists")]
    ParcelExists(String),
    #[error("no such version {version} of parcel {parcel}")]
    NoSuchVersion { parcel: String, version: u64 },
    #[error("parcel {parcel} is locked by {}", lock.holder)]
    Locked { parcel: String, lock: LockInfo },
    #[error("the lock id does not match the lock of parcel {0} (released or never held)")]
    LockMismatch(String),
    /// The caller's lock was broken (`unlock --force`, `isr-server unlock`); `current` is whoever holds the
    /// parcel now, if anyone.
    #[error("your lock on {parcel} was broken by {} at unix time {}", broken.by, broken.unix)]
    LockBroken { parcel: String, broken: Box<BrokenLock>, current: Option<Box<LockInfo>> },
    #[error("parcel {0} has versions: it can only be deleted with its user (isr-server user remove)")]
    HasVersions(String),
    #[error("base version {base} is not the head {head}")]
    StaleBase { base: u64, head: u64 },
    #[error("keyrings not uploaded for this parcel: {}", hexes(.0))]
    MissingKeyrings(Vec<Tag>),
    #[error("stored keyring {hash} is corrupt: {reason}")]
    BadKeyring { hash: Tag, reason: String },
    #[error("{} chunks are missing from the chunk store", .0.len())]
    MissingChunks(Vec<Tag>),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("chunk store error during a metadata operation: {0}")]
    Chunks(#[from] crate::StoreError),
    #[error("metadata database error: {0}")]
    Database(String),
}

fn hexes(tags: &[Tag]) -> String {
    tags.iter().map(|t| t.to_hex()).collect::<Vec<_>>().join(", ")
}

/// A registered user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    /// argon2id PHC string of the user's login secret.
    pub login_hash: String,
    pub created_unix: i64,
}

/// Failed-login bookkeeping of one user (shared by every server process).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoginFailures {
    pub count: u32,
    pub last_unix: i64,
}

/// Who holds a parcel's lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockInfo {
    /// Hex id handed to the holder; it proves ownership on commit and release.
    pub lock_id: String,
    /// Human-readable client name.
    pub holder: String,
    /// Stable client identity (hex); re-locking with the same id is idempotent.
    pub client_id: String,
    pub since_unix: i64,
}

/// The latest forced release of a parcel's lock: whose lock it was, who broke it and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokenLock {
    pub lock_id: String,
    /// Display name of the breaker: a client's name, or the administrator.
    pub by: String,
    pub unix: i64,
}

/// The one rule every operation that carries a lock id follows (commit, keyring upload, release by id,
/// rollback with an id, confirmation), for every backend: `id` must be the parcel's current lock. Otherwise
/// the caller learns why: its lock was broken (and by whom), someone else holds the parcel, or the id is
/// simply unknown (released, or never held).
pub fn check_lock(
    parcel: &str,
    id: &str,
    current: Option<&LockInfo>,
    broken: Option<&BrokenLock>,
) -> Result<(), MetaError> {
    match (current, broken) {
        (Some(held), _) if held.lock_id == id => Ok(()),
        (_, Some(b)) if b.lock_id == id => Err(MetaError::LockBroken {
            parcel: parcel.to_owned(),
            broken: Box::new(b.clone()),
            current: current.cloned().map(Box::new),
        }),
        (Some(held), _) => Err(MetaError::Locked { parcel: parcel.to_owned(), lock: held.clone() }),
        (None, _) => Err(MetaError::LockMismatch(parcel.to_owned())),
    }
}

/// A parcel as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParcelInfo {
    pub user: String,
    pub name: String,
    /// Newest version number; 0 before the first version.
    pub head: u64,
    pub created_unix: i64,
    pub lock: Option<LockInfo>,
}

/// A parcel with its wrapped keyroots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParcelDetail {
    pub info: ParcelInfo,
    pub wrapped_keyroot: Vec<u8>,
    pub recovery_keyroot: Option<Vec<u8>>,
    /// IT's network policy for the parcel's VM; `None` = unset (the user chooses).
    pub network_policy: Option<NetworkPolicy>,
}

/// The administrator's network policy of a parcel (`isr-server parcel policy USER/P --network none|nat`),
/// stored as its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkPolicy {
    /// No working network: the client's VM gets no network back end and its link is down.
    None,
    /// User-mode NAT allowed (the user may still choose `--network none`).
    Nat,
}

impl NetworkPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkPolicy::None => "none",
            NetworkPolicy::Nat => "nat",
        }
    }

    /// A stored or typed name; anything else is [`MetaError::Invalid`].
    pub fn parse(s: &str) -> Result<NetworkPolicy, MetaError> {
        match s {
            "none" => Ok(NetworkPolicy::None),
            "nat" => Ok(NetworkPolicy::Nat),
            other => Err(MetaError::Invalid(format!("network policy {other:?} (expected none or nat)"))),
        }
    }
}

impl std::fmt::Display for NetworkPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored policy column: NULL is unset; an unknown name (a newer server's policy, a hand edit) is refused
/// rather than read as "unset", which would lift a restriction.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn policy_column(stored: Option<String>) -> Result<Option<NetworkPolicy>, MetaError> {
    stored.as_deref().map(NetworkPolicy::parse).transpose().map_err(|e| match e {
        MetaError::Invalid(why) => MetaError::Database(format!("stored {why}")),
        e => e,
    })
}

/// A version as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: u64,
    pub created_unix: i64,
    pub client: String,
    pub bytes_uploaded: u64,
    pub comment: String,
}

/// Which version to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionSel {
    Head,
    Number(u64),
}

/// A new parcel, created locked by its creator.
#[derive(Clone, Debug)]
pub struct NewParcel {
    pub user: String,
    pub name: String,
    pub wrapped_keyroot: Vec<u8>,
    pub recovery_keyroot: Option<Vec<u8>>,
    pub lock: LockInfo,
    pub now_unix: i64,
}

/// How a lock is released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockRelease {
    /// Only if the lock still has this id ([`check_lock`]).
    Id(String),
    /// Whatever holds it (administrator or `isr unlock --force`); the broken lock is remembered on the
    /// parcel (the latest break only) so its holder is told, not just refused. Breaking an unlocked parcel
    /// changes nothing.
    Force { by: String, now_unix: i64 },
}

/// A version to commit.
#[derive(Clone, Debug)]
pub struct NewVersion {
    pub user: String,
    pub parcel: String,
    pub lock_id: String,
    pub base_version: u64,
    /// Manifest bytes exactly as the client sent them (already parsed by the caller).
    pub manifest: Bytes,
    /// The keyring hashes the manifest names.
    pub keyrings: Vec<Tag>,
    pub client: String,
    pub comment: String,
    pub bytes_uploaded: u64,
    pub now_unix: i64,
}

/// A rollback: a new head that repeats an old version's manifest.
#[derive(Clone, Debug)]
pub struct Rollback {
    pub user: String,
    pub parcel: String,
    pub version: u64,
    /// The caller's lock id: when given it must be the current lock ([`check_lock`]); without one the
    /// parcel must be unlocked.
    pub lock_id: Option<String>,
    pub client: String,
    pub now_unix: i64,
}

/// What a prune removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneStats {
    pub versions_deleted: u64,
    pub keyrings_deleted: u64,
}

pub use crate::rules::{apply_keep_policy, KeepDecision, KeepPolicy};

/// What a prune by policy decided (every version, newest first) and removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyPrune {
    pub decisions: Vec<KeepDecision>,
    pub stats: PruneStats,
}

/// The mark phase of garbage collection: every non-zero tag referenced by a version, and which versions
/// were seen (so the sweep can re-check versions committed after the snapshot).
#[derive(Clone, Debug, Default)]
pub struct GcMark {
    pub referenced: HashSet<Tag>,
    pub versions_seen: HashSet<i64>,
}

/// What one gc sweep batch ([`MetaStore::gc_sweep`]) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// The tags deleted.
    pub deleted: Vec<Tag>,
    /// Candidates spared because a parcel's lock holds them ([`MetaStore::hold_chunks`]).
    pub held: Vec<Tag>,
}

/// Answers which chunks the chunk store lacks; called by [`MetaStore::commit_version`] while it holds the
/// commit/sweep exclusion.
#[async_trait]
pub trait ChunkPresence: Send + Sync {
    async fn missing(&self, tags: Vec<Tag>) -> Result<Vec<Tag>, MetaError>;
    /// True when presence is the metadata's chunk index ([`MetaStore::chunk_intent`]) rather than the store:
    /// the commit then reads the index in its own transaction and does not call [`ChunkPresence::missing`].
    fn indexed(&self) -> bool {
        false
    }
}

/// Deletes chunks; called by [`MetaStore::gc_sweep`] while it holds the commit/sweep exclusion.
#[async_trait]
pub trait ChunkSweeper: Send + Sync {
    async fn delete(&self, tags: Vec<Tag>) -> Result<(), MetaError>;
}

/// The metadata store. All methods are atomic; `user`/`parcel` pairs scope every parcel operation, so a
/// parcel of another user is indistinguishable from a missing one ([`MetaError::NoSuchParcel`]).
#[async_trait]
pub trait MetaStore: Send + Sync + std::fmt::Debug + 'static {
    /// The value of a deployment setting, storing `init` first if it has none (atomic across processes).
    async fn setting_or_init(&self, key: &str, init: String) -> Result<String, MetaError>;
    /// The value of a deployment setting, if it has one.
    async fn setting(&self, key: &str) -> Result<Option<String>, MetaError>;

    async fn add_user(&self, name: &str, login_hash: &str, now_unix: i64) -> Result<(), MetaError>;
    async fn set_login_hash(&self, name: &str, login_hash: &str) -> Result<(), MetaError>;
    /// Removes the user with all parcels, versions, keyrings and tokens (chunks go at the next gc).
    async fn remove_user(&self, name: &str) -> Result<(), MetaError>;
    async fn list_users(&self) -> Result<Vec<UserRecord>, MetaError>;
    async fn user(&self, name: &str) -> Result<Option<UserRecord>, MetaError>;

    async fn login_failures(&self, name: &str) -> Result<LoginFailures, MetaError>;
    /// Records one failed login; returns the new count.
    async fn record_login_failure(&self, name: &str, now_unix: i64) -> Result<u32, MetaError>;
    /// Counts a login attempt as failed *before* it is verified, if the user's failures are still `seen`
    /// (compare and set, so of several processes or tasks that saw the same state exactly one gets the slot):
    /// count + 1, last = `now_unix`. Returns false when the state changed meanwhile (re-read and decide
    /// again). A successful login then clears the count.
    async fn reserve_login_attempt(
        &self,
        name: &str,
        seen: LoginFailures,
        now_unix: i64,
    ) -> Result<bool, MetaError>;
    async fn clear_login_failures(&self, name: &str) -> Result<(), MetaError>;

    /// Stores a session token by its hash.
    async fn add_token(&self, token_hash: [u8; 32], user: &str, expires_unix: i64) -> Result<(), MetaError>;
    /// The user and expiry of an unexpired token.
    async fn token(&self, token_hash: [u8; 32], now_unix: i64) -> Result<Option<(String, i64)>, MetaError>;
    async fn purge_expired_tokens(&self, now_unix: i64) -> Result<u64, MetaError>;

    /// Parcels of one user, or of everyone (`None`), by user then name.
    async fn list_parcels(&self, user: Option<&str>) -> Result<Vec<ParcelInfo>, MetaError>;
    async fn parcel(&self, user: &str, parcel: &str) -> Result<ParcelDetail, MetaError>;
    async fn create_parcel(&self, p: NewParcel) -> Result<(), MetaError>;
    async fn set_wrapped_keyroot(&self, user: &str, parcel: &str, wrapped: &[u8]) -> Result<(), MetaError>;
    /// Sets (or with `None` clears) the parcel's network policy.
    async fn set_network_policy(
        &self,
        user: &str,
        parcel: &str,
        policy: Option<NetworkPolicy>,
    ) -> Result<(), MetaError>;
    /// Deletes a parcel that has no version (an undone `create`), unless another client (`client_id`
    /// differs) holds its lock. A parcel with versions is refused ([`MetaError::HasVersions`]): its history
    /// goes only with its user.
    async fn delete_parcel(&self, user: &str, parcel: &str, client_id: Option<&str>)
        -> Result<(), MetaError>;

    /// Locks a parcel for `lock`'s client, or returns the lock that client already holds.
    async fn acquire_lock(&self, user: &str, parcel: &str, lock: LockInfo) -> Result<LockInfo, MetaError>;
    async fn release_lock(&self, user: &str, parcel: &str, how: LockRelease) -> Result<(), MetaError>;
    /// The current lock, if `lock_id` is it ([`check_lock`] otherwise).
    async fn confirm_lock(&self, user: &str, parcel: &str, lock_id: &str) -> Result<LockInfo, MetaError>;
    /// The latest break of the parcel's lock, if any.
    async fn broken_lock(&self, user: &str, parcel: &str) -> Result<Option<BrokenLock>, MetaError>;
    async fn locks_held(&self) -> Result<u64, MetaError>;

    /// Stores a keyring for a parcel whose lock is `lock_id` ([`check_lock`]); returns true if it was new.
    /// The caller has verified hash and format.
    async fn put_keyring(
        &self,
        user: &str,
        parcel: &str,
        lock_id: &str,
        hash: Tag,
        data: Bytes,
    ) -> Result<bool, MetaError>;
    async fn keyring(&self, user: &str, parcel: &str, hash: Tag) -> Result<Option<Bytes>, MetaError>;

    /// Versions in ascending order.
    async fn versions(&self, user: &str, parcel: &str) -> Result<Vec<VersionInfo>, MetaError>;
    /// A version's number and manifest bytes.
    async fn manifest(&self, user: &str, parcel: &str, which: VersionSel) -> Result<(u64, Bytes), MetaError>;

    /// Makes a new version visible as the head, after checking (in this order) the lock, the base version, that
    /// every keyring was uploaded for the parcel, and that `chunks` holds every tag those keyrings name.
    ///
    /// The check of the chunks and the insert are one critical section that excludes [`MetaStore::gc_sweep`]
    /// (SQLite: one `BEGIN IMMEDIATE` transaction; PostgreSQL: a transaction holding `SELECT ... FOR UPDATE` on
    /// the single gc-lock row), so a sweep can never delete a chunk between the check and the insert.
    async fn commit_version(&self, v: NewVersion, chunks: &dyn ChunkPresence) -> Result<u64, MetaError>;
    /// A new head repeating version `r.version`'s manifest and keyrings.
    async fn rollback(&self, r: Rollback) -> Result<u64, MetaError>;
    /// Deletes all but the newest `keep` (≥ 1) versions and the keyrings only they referenced.
    async fn prune(&self, user: &str, parcel: &str, keep: u64) -> Result<PruneStats, MetaError>;
    /// Deletes the versions `policy` does not keep ([`apply_keep_policy`]: never the head) and the keyrings
    /// only they referenced; the decision is made on the versions read in the same transaction.
    async fn prune_by_policy(
        &self,
        user: &str,
        parcel: &str,
        policy: &KeepPolicy,
    ) -> Result<PolicyPrune, MetaError>;

    /// Every keyring referenced by any version, as (user, parcel, hash), for `check` (which then reads each
    /// with [`MetaStore::keyring`]).
    async fn referenced_keyrings(&self) -> Result<Vec<(String, String, Tag)>, MetaError>;
    /// Deletes keyrings that no version references and that were uploaded before `before_unix` (left behind
    /// by commits that never happened). Returns how many.
    async fn purge_unreferenced_keyrings(&self, before_unix: i64) -> Result<u64, MetaError>;

    /// Keeps `tags` from gc on behalf of the parcel's lock `lock_id` ([`check_lock`]: refused unless it is
    /// the current lock): chunks a client uploads under its lock ahead of the version that will reference
    /// them (trickle reintegration). A sweep spares a held tag while its lock is the parcel's lock and for
    /// the gc grace period after a sweep first saw the lock ended (released, broken); see
    /// [`MetaStore::gc_sweep`]. Holding a tag the same lock already holds changes nothing. Under the shared
    /// gc exclusion (like a commit), so a sweep step either sees the hold or runs before it.
    async fn hold_chunks(
        &self,
        user: &str,
        parcel: &str,
        lock_id: &str,
        tags: &[Tag],
        now_unix: i64,
    ) -> Result<(), MetaError>;

    /// Garbage collection, mark phase (no lock held): tags referenced by all versions.
    async fn gc_mark(&self) -> Result<GcMark, MetaError>;
    /// Garbage collection, sweep of one batch: under the commit/sweep exclusion, drops from `candidates` the
    /// tags of versions not in `mark.versions_seen` (committed meanwhile), then deletes the rest through
    /// `sweeper`. Returns the tags deleted.
    ///
    /// In two steps, each under the exclusion: the first removes the doomed tags' chunk-index rows (sparing
    /// tags with a recent pending row: a PUT in flight) and commits; the second re-checks the versions
    /// committed since the mark and spares every tag that has an index row again (a PUT or `check --repair`
    /// since the first step), then deletes through `sweeper`. So an index row that says present never
    /// outlives its chunk, even if gc dies between the steps.
    ///
    /// Both steps also spare the tags a lock holds ([`MetaStore::hold_chunks`]; the rule is
    /// `rules::hold`): held by the parcel's current lock, by a lock whose end no run of
    /// [`MetaStore::gc_end_holds`] has recorded yet, or by one recorded ended less than `grace_secs` ago.
    /// So step 1 keeps their index rows and step 2 their chunks. Returns the tags deleted and those spared
    /// as held.
    async fn gc_sweep(
        &self,
        mark: &GcMark,
        candidates: Vec<Tag>,
        grace_secs: i64,
        sweeper: &dyn ChunkSweeper,
    ) -> Result<Swept, MetaError>;
    /// gc's bookkeeping of held chunks, once per run after the sweep batches, under the exclusive gc
    /// exclusion: every hold whose lock is no longer the parcel's lock gets its end recorded (now), and
    /// every hold recorded ended at least `grace_secs` ago is removed. Returns how many were removed. A lock
    /// release needs no hook of its own: the first run after it sees the lock gone.
    async fn gc_end_holds(&self, grace_secs: i64) -> Result<u64, MetaError>;

    /// The chunk index, for chunk stores that cannot answer "which of these 20,000 tags do you have" cheaply
    /// (S3: a request per tag). A row per chunk: *pending* from before the chunk's PUT writes the object,
    /// *present* once the store acknowledged it (S3 PUTs are durable when acknowledged). The protocol:
    ///
    /// 1. [`MetaStore::chunk_intent`] (under the shared gc exclusion, like a commit): pending rows;
    /// 2. the object is written (or found there: the store's create-only PUT says so);
    /// 3. [`MetaStore::chunk_stored`]: the rows become present, unless a sweep removed them meanwhile.
    ///
    /// A sweep ([`MetaStore::gc_sweep`]) removes rows before objects and spares any tag that has a row when it
    /// deletes. So a present row always has its object, and a PUT that races a sweep either sees its row
    /// spared or writes the object anew after the sweep. An object without a row (a crash between 2 and 3)
    /// is reported missing and uploaded again.
    ///
    /// Returns the tags of `tags` whose row already said present (a PUT of a chunk the index lacked is new to
    /// the deployment, as `missing` reported it, even if its object was there).
    async fn chunk_intent(&self, tags: &[Tag], now_unix: i64) -> Result<HashSet<Tag>, MetaError>;
    /// Step 3 of [`MetaStore::chunk_intent`]: (tag, stored size) rows become present.
    async fn chunk_stored(&self, chunks: &[(Tag, u64)]) -> Result<(), MetaError>;
    /// The tags of `tags` whose index row says present.
    async fn chunks_indexed(&self, tags: &[Tag]) -> Result<HashSet<Tag>, MetaError>;
    /// Every index row: (tag, present, since_unix).
    async fn chunk_index(&self) -> Result<Vec<(Tag, bool, i64)>, MetaError>;
    /// Removes the present rows of `tags` (chunks `check` found absent from the store); returns how many.
    async fn chunk_index_forget(&self, tags: &[Tag]) -> Result<u64, MetaError>;
}

/// A pending chunk-index row younger than this is a PUT in flight, which gc spares; an older one was left by
/// a writer that died.
pub const PENDING_CHUNK_GRACE_SECS: i64 = 3600;

pub use isr_wire::names::{valid_parcel_name, valid_user_name};
