//! [`MetaStore`] on PostgreSQL, shared by several server processes.
//!
//! Concurrency rests on row locks inside READ COMMITTED transactions:
//! - every change of a parcel's state (lock, commit, rollback, prune, delete) first takes its row with
//!   `SELECT ... FOR UPDATE`, so two processes serialize on the parcel and each re-reads what the other
//!   committed;
//! - the single row of `gc_lock` is the commit/sweep exclusion of [`MetaStore::commit_version`] and
//!   [`MetaStore::gc_sweep`]: commits and rollbacks hold it `FOR SHARE` (they run in parallel with each
//!   other) from before their checks until they commit; a gc sweep batch and the purge of abandoned keyrings
//!   hold it `FOR UPDATE`, and read the versions only after they have it, so they see every commit that
//!   checked its chunks before them, and no commit checks chunks while they run.
//!
//! Lock order: `gc_lock` before a parcel row. Nothing takes `gc_lock` while holding a parcel row, so no
//! deadlock is possible between them.
//!
//! The schema is created on open, idempotently and under a transaction-scoped advisory lock, so any number of
//! processes may open the same database at once. Connections come from a small pool of this module
//! ([`PG_MAX_CONNECTIONS`] per store); TLS to the database is not supported (`sslmode=disable` or `prefer`).

use crate::meta::*;
use async_trait::async_trait;
use bytes::Bytes;
use futures::{pin_mut, TryStreamExt};
use isr_format::{KeyringTags, Tag};
use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, NoTls, Row, Transaction};

/// At most this many connections per [`PgMetaStore`] (requests beyond wait for one).
pub const PG_MAX_CONNECTIONS: usize = 16;
/// Idle connections kept for reuse.
const POOL_IDLE: usize = 8;
/// Key of the advisory lock that serializes schema creation between processes.
const SCHEMA_LOCK_KEY: i64 = 0x4953_525f_5343_4831; // "ISR_SCH1"

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    login_hash TEXT NOT NULL,
    created_unix BIGINT NOT NULL,
    failed_logins BIGINT NOT NULL DEFAULT 0,
    last_failed_unix BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tokens (
    hash BYTEA PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires_unix BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS parcels (
    id BIGSERIAL PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created_unix BIGINT NOT NULL,
    head BIGINT NOT NULL DEFAULT 0,
    wrapped_keyroot BYTEA NOT NULL,
    recovery_keyroot BYTEA,
    lock_id TEXT,
    lock_holder TEXT,
    lock_client_id TEXT,
    lock_since BIGINT,
    UNIQUE (user_id, name)
);
-- Added after the first release (ADD COLUMN IF NOT EXISTS migrates older databases on open).
ALTER TABLE parcels ADD COLUMN IF NOT EXISTS broken_lock_id TEXT;
ALTER TABLE parcels ADD COLUMN IF NOT EXISTS broken_by TEXT;
ALTER TABLE parcels ADD COLUMN IF NOT EXISTS broken_unix BIGINT;
ALTER TABLE parcels ADD COLUMN IF NOT EXISTS network_policy TEXT;
CREATE TABLE IF NOT EXISTS keyrings (
    parcel_id BIGINT NOT NULL REFERENCES parcels(id) ON DELETE CASCADE,
    hash BYTEA NOT NULL,
    data BYTEA NOT NULL,
    created_unix BIGINT NOT NULL,
    PRIMARY KEY (parcel_id, hash)
);
CREATE TABLE IF NOT EXISTS versions (
    id BIGSERIAL PRIMARY KEY,
    parcel_id BIGINT NOT NULL REFERENCES parcels(id) ON DELETE CASCADE,
    number BIGINT NOT NULL,
    created_unix BIGINT NOT NULL,
    client TEXT NOT NULL,
    bytes_uploaded BIGINT NOT NULL,
    comment TEXT NOT NULL,
    manifest BYTEA NOT NULL,
    UNIQUE (parcel_id, number)
);
CREATE TABLE IF NOT EXISTS version_keyrings (
    version_id BIGINT NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    parcel_id BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    PRIMARY KEY (version_id, hash)
);
CREATE TABLE IF NOT EXISTS gc_lock (id INTEGER PRIMARY KEY CHECK (id = 1));
INSERT INTO gc_lock (id) VALUES (1) ON CONFLICT DO NOTHING;
CREATE INDEX IF NOT EXISTS version_keyrings_by_hash ON version_keyrings (parcel_id, hash);
CREATE INDEX IF NOT EXISTS tokens_by_expiry ON tokens (expires_unix);
CREATE INDEX IF NOT EXISTS tokens_by_user ON tokens (user_id);
"#;

impl From<tokio_postgres::Error> for MetaError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The Display of a server error is only "db error"; its detail is in the source.
        match e.as_db_error() {
            Some(db) => MetaError::Database(format!("{}: {}", db.code().code(), db.message())),
            None => MetaError::Database(e.to_string()),
        }
    }
}

/// A small connection pool: idle clients and a cap on open connections.
struct Pool {
    config: tokio_postgres::Config,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
}

/// A pooled connection; returns to the pool when dropped unless the connection broke. A transaction
/// dropped unfinished (an error or a cancelled request) has already queued its ROLLBACK, which the server
/// runs before anything the next user sends.
struct Conn {
    client: Option<Client>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("a pooled connection holds a client until dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !c.is_closed() {
                if let Ok(mut idle) = self.pool.idle.lock() {
                    if idle.len() < POOL_IDLE {
                        idle.push(c);
                    }
                }
            }
        }
    }
}

impl Pool {
    async fn connect(&self) -> Result<Client, MetaError> {
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("postgres connection closed: {e}");
            }
        });
        Ok(client)
    }

    async fn get(self: &Arc<Self>) -> Result<Conn, MetaError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| MetaError::Database("connection pool closed".into()))?;
        loop {
            let pooled = self.idle.lock().map_err(|_| MetaError::Database("pool poisoned".into()))?.pop();
            match pooled {
                Some(c) if c.is_closed() => continue,
                Some(c) => return Ok(Conn { client: Some(c), pool: self.clone(), _permit: permit }),
                None => break,
            }
        }
        let client = self.connect().await?;
        Ok(Conn { client: Some(client), pool: self.clone(), _permit: permit })
    }
}

/// The PostgreSQL metadata store. Cheap to clone (the clones share one pool).
#[derive(Clone)]
pub struct PgMetaStore {
    pool: Arc<Pool>,
    url: String,
}

impl std::fmt::Debug for PgMetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgMetaStore").field("url", &redact(&self.url)).finish_non_exhaustive()
    }
}

/// The URL without its password (for messages and logs).
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn tag_of(blob: &[u8]) -> Result<Tag, MetaError> {
    let arr: [u8; 32] =
        blob.try_into().map_err(|_| MetaError::Database("stored hash is not 32 bytes".into()))?;
    Ok(Tag(arr))
}

fn lock_from(row: &Row, at: usize) -> Option<LockInfo> {
    Some(LockInfo {
        lock_id: row.get::<_, Option<String>>(at)?,
        holder: row.get::<_, Option<String>>(at + 1).unwrap_or_default(),
        client_id: row.get::<_, Option<String>>(at + 2).unwrap_or_default(),
        since_unix: row.get::<_, Option<i64>>(at + 3).unwrap_or(0),
    })
}

fn keyring_tags(hash: &[u8], data: &[u8], into: &mut HashSet<Tag>) -> Result<(), MetaError> {
    let hash = tag_of(hash)?;
    let tags = KeyringTags::parse(data).map_err(|e| MetaError::BadKeyring { hash, reason: e.to_string() })?;
    into.extend(tags.stored_tags().copied());
    Ok(())
}

struct ParcelRow {
    id: i64,
    head: u64,
    lock: Option<LockInfo>,
    broken: Option<BrokenLock>,
    /// `user/parcel`, for errors.
    name: String,
}

impl ParcelRow {
    /// [`check_lock`] against this row.
    fn check_lock(&self, lock_id: &str) -> Result<(), MetaError> {
        check_lock(&self.name, lock_id, self.lock.as_ref(), self.broken.as_ref())
    }
}

/// A parcel's row; `FOR UPDATE` locks it until the transaction ends.
async fn parcel_row<C: GenericClient + Sync>(
    c: &C,
    user: &str,
    parcel: &str,
    for_update: bool,
) -> Result<ParcelRow, MetaError> {
    let sql = if for_update {
        "SELECT p.id, p.head, p.lock_id, p.lock_holder, p.lock_client_id, p.lock_since,
                p.broken_lock_id, p.broken_by, p.broken_unix
         FROM parcels p JOIN users u ON u.id = p.user_id WHERE u.name = $1 AND p.name = $2 FOR UPDATE OF p"
    } else {
        "SELECT p.id, p.head, p.lock_id, p.lock_holder, p.lock_client_id, p.lock_since,
                p.broken_lock_id, p.broken_by, p.broken_unix
         FROM parcels p JOIN users u ON u.id = p.user_id WHERE u.name = $1 AND p.name = $2"
    };
    let name = format!("{user}/{parcel}");
    let row =
        c.query_opt(sql, &[&user, &parcel]).await?.ok_or_else(|| MetaError::NoSuchParcel(name.clone()))?;
    let broken = row.get::<_, Option<String>>(6).map(|lock_id| BrokenLock {
        lock_id,
        by: row.get::<_, Option<String>>(7).unwrap_or_default(),
        unix: row.get::<_, Option<i64>>(8).unwrap_or(0),
    });
    Ok(ParcelRow {
        id: row.get(0),
        head: row.get::<_, i64>(1) as u64,
        lock: lock_from(&row, 2),
        broken,
        name,
    })
}

/// Takes the commit/sweep exclusion: shared by commits, exclusive for sweeps.
async fn gc_lock(tx: &Transaction<'_>, exclusive: bool) -> Result<(), MetaError> {
    let sql = if exclusive {
        "SELECT id FROM gc_lock WHERE id = 1 FOR UPDATE"
    } else {
        "SELECT id FROM gc_lock WHERE id = 1 FOR SHARE"
    };
    tx.query_one(sql, &[]).await?;
    Ok(())
}

/// Adds the stored tags of every keyring that one of `version_ids` references, streaming the rows.
async fn versions_tags<C: GenericClient + Sync>(
    c: &C,
    version_ids: &[i64],
    into: &mut HashSet<Tag>,
) -> Result<(), MetaError> {
    if version_ids.is_empty() {
        return Ok(());
    }
    let ids: &(dyn ToSql + Sync) = &version_ids;
    let rows = c
        .query_raw(
            "SELECT k.hash, k.data FROM keyrings k WHERE EXISTS
               (SELECT 1 FROM version_keyrings vk WHERE vk.parcel_id = k.parcel_id AND vk.hash = k.hash
                  AND vk.version_id = ANY($1))",
            [ids],
        )
        .await?;
    pin_mut!(rows);
    while let Some(row) = rows.try_next().await? {
        keyring_tags(row.get(0), row.get(1), into)?;
    }
    Ok(())
}

async fn insert_version(
    tx: &Transaction<'_>,
    parcel_id: i64,
    number: u64,
    v: (&[u8], &str, &str, u64, i64),
    keyrings: &[Tag],
) -> Result<(), MetaError> {
    let (manifest, client, comment, bytes_uploaded, now) = v;
    let vid: i64 = tx
        .query_one(
            "INSERT INTO versions (parcel_id, number, created_unix, client, bytes_uploaded, comment, manifest)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            &[&parcel_id, &(number as i64), &now, &client, &(bytes_uploaded as i64), &comment, &manifest],
        )
        .await?
        .get(0);
    let hashes: Vec<&[u8]> =
        keyrings.iter().collect::<HashSet<_>>().into_iter().map(|k| &k.0[..]).collect::<Vec<_>>();
    if !hashes.is_empty() {
        tx.execute(
            "INSERT INTO version_keyrings (version_id, parcel_id, hash) SELECT $1, $2, h FROM unnest($3::bytea[]) h",
            &[&vid, &parcel_id, &hashes],
        )
        .await?;
    }
    tx.execute("UPDATE parcels SET head = $2 WHERE id = $1", &[&parcel_id, &(number as i64)]).await?;
    Ok(())
}

impl PgMetaStore {
    /// Connects to `postgres://user[:password]@host[:port]/database` (or a libpq key=value string) and
    /// creates the schema if needed. Safe to call from several processes at once.
    pub async fn open(url: &str) -> Result<Self, MetaError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| MetaError::Invalid(format!("bad PostgreSQL URL {}: {e}", redact(url))))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("isr-server");
        }
        let pool = Arc::new(Pool {
            config,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(PG_MAX_CONNECTIONS)),
        });
        let store = PgMetaStore { pool, url: url.to_owned() };
        let mut conn = store.conn().await?;
        let tx = conn.client().transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY]).await?;
        tx.batch_execute(SCHEMA).await?;
        tx.commit().await?;
        Ok(store)
    }

    async fn conn(&self) -> Result<Conn, MetaError> {
        self.pool.get().await
    }
}

#[async_trait]
impl MetaStore for PgMetaStore {
    async fn setting_or_init(&self, key: &str, init: String) -> Result<String, MetaError> {
        let mut conn = self.conn().await?;
        let c = conn.client();
        // Two statements: the insert waits for a concurrent insert of the same key to commit, and the select
        // (a new snapshot) then sees whichever value won.
        c.execute(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            &[&key, &init],
        )
        .await?;
        Ok(c.query_one("SELECT value FROM settings WHERE key = $1", &[&key]).await?.get(0))
    }

    async fn setting(&self, key: &str) -> Result<Option<String>, MetaError> {
        let mut conn = self.conn().await?;
        let row = conn.client().query_opt("SELECT value FROM settings WHERE key = $1", &[&key]).await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn add_user(&self, name: &str, login_hash: &str, now_unix: i64) -> Result<(), MetaError> {
        let mut conn = self.conn().await?;
        let n = conn
            .client()
            .execute(
                "INSERT INTO users (name, login_hash, created_unix) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &login_hash, &now_unix],
            )
            .await?;
        if n == 0 {
            return Err(MetaError::UserExists(name.to_owned()));
        }
        Ok(())
    }

    async fn set_login_hash(&self, name: &str, login_hash: &str) -> Result<(), MetaError> {
        let mut conn = self.conn().await?;
        let n = conn
            .client()
            .execute(
                "UPDATE users SET login_hash = $2, failed_logins = 0 WHERE name = $1",
                &[&name, &login_hash],
            )
            .await?;
        if n == 0 {
            return Err(MetaError::NoSuchUser(name.to_owned()));
        }
        Ok(())
    }

    async fn remove_user(&self, name: &str) -> Result<(), MetaError> {
        let mut conn = self.conn().await?;
        // Cascades: tokens, parcels -> keyrings, versions -> version_keyrings.
        let n = conn.client().execute("DELETE FROM users WHERE name = $1", &[&name]).await?;
        if n == 0 {
            return Err(MetaError::NoSuchUser(name.to_owned()));
        }
        Ok(())
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>, MetaError> {
        let mut conn = self.conn().await?;
        let rows = conn
            .client()
            .query("SELECT name, login_hash, created_unix FROM users ORDER BY name", &[])
            .await?;
        Ok(rows
            .iter()
            .map(|r| UserRecord { name: r.get(0), login_hash: r.get(1), created_unix: r.get(2) })
            .collect())
    }

    async fn user(&self, name: &str) -> Result<Option<UserRecord>, MetaError> {
        let mut conn = self.conn().await?;
        let row = conn
            .client()
            .query_opt("SELECT name, login_hash, created_unix FROM users WHERE name = $1", &[&name])
            .await?;
        Ok(row.map(|r| UserRecord { name: r.get(0), login_hash: r.get(1), created_unix: r.get(2) }))
    }

    async fn login_failures(&self, name: &str) -> Result<LoginFailures, MetaError> {
        let mut conn = self.conn().await?;
        let row = conn
            .client()
            .query_opt("SELECT failed_logins, last_failed_unix FROM users WHERE name = $1", &[&name])
            .await?;
        Ok(row
            .map(|r| LoginFailures { count: r.get::<_, i64>(0) as u32, last_unix: r.get(1) })
            .unwrap_or_default())
    }

    async fn record_login_failure(&self, name: &str, now_unix: i64) -> Result<u32, MetaError> {
        let mut conn = self.conn().await?;
        let row = conn
            .client()
            .query_opt(
                "UPDATE users SET failed_logins = failed_logins + 1, last_failed_unix = $2 WHERE name = $1
                 RETURNING failed_logins",
                &[&name, &now_unix],
            )
            .await?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u32).unwrap_or(0))
    }

    async fn reserve_login_attempt(
        &self,
        name: &str,
        seen: LoginFailures,
        now_unix: i64,
    ) -> Result<bool, MetaError> {
        let mut conn = self.conn().await?;
        let n = conn
            .client()
            .execute(
                "UPDATE users SET failed_logins = failed_logins + 1, last_failed_unix = $4
                 WHERE name = $1 AND failed_logins = $2 AND last_failed_unix = $3",
                &[&name, &i64::from(seen.count), &seen.last_unix, &now_unix],
            )
            .await?;
        Ok(n == 1)
    }

    async fn clear_login_failures(&self, name: &str) -> Result<(), MetaError> {
        let mut conn = self.conn().await?;
        conn.client()
            .execute("UPDATE users SET failed_logins = 0 WHERE name = $1 AND failed_logins != 0", &[&name])
            .await?;
        Ok(())
    }

    async fn add_token(&self, token_hash: [u8; 32], user: &str, expires_unix: i64) -> Result<(), MetaError> {
        let mut conn = self.conn().await?;
        let n = conn
            .client()
            .execute(
                "INSERT INTO tokens (hash, user_id, expires_unix) SELECT $1, id, $3 FROM users WHERE name = $2",
                &[&&token_hash[..], &user, &expires_unix],
            )
            .await?;
        if n == 0 {
            return Err(MetaError::NoSuchUser(user.to_owned()));
        }
        Ok(())
    }

    async fn token(&self, token_hash: [u8; 32], now_unix: i64) -> Result<Option<(String, i64)>, MetaError> {
        let mut conn = self.conn().await?;
        let row = conn
            .client()
            .query_opt(
                "SELECT u.name, t.expires_unix FROM tokens t JOIN users u ON u.id = t.user_id
                 WHERE t.hash = $1 AND t.expires_unix > $2",
                &[&&token_hash[..], &now_unix],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    async fn purge_expired_tokens(&self, now_unix: i64) -> Result<u64, MetaError> {
        let mut conn = self.conn().await?;
        Ok(conn.client().execute("DELETE FROM tokens WHERE expires_unix <= $1", &[&now_unix]).await?)
    }

    async fn list_parcels(&self, user: Option<&str>) -> Result<Vec<ParcelInfo>, MetaError> {
        let mut conn = self.conn().await?;
        let rows = conn
            .client()
            .query(
                "SELECT u.name, p.name, p.head, p.created_unix, p.lock_id, p.lock_holder, p.lock_client_id,
                        p.lock_since
                 FROM parcels p JOIN users u ON u.id = p.user_id
                 WHERE $1::text IS NULL OR u.name = $1 ORDER BY u.name, p.name",
                &[&user],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ParcelInfo {
                user: r.get(0),
                name: r.get(1),
                head: r.get::<_, i64>(2) as u64,
                created_unix: r.get(3),
                lock: lock_from(r, 4),
            })
            .collect())
    }

    async fn parcel(&self, user: &str, parcel: &str) -> Result<ParcelDetail, MetaError> {
        let mut conn = self.conn().await?;
        let r = conn
            .client()
            .query_opt(
                "SELECT p.head, p.created_unix, p.lock_id, p.lock_holder, p.lock_client_id, p.lock_since,
                        p.wrapped_keyroot, p.recovery_keyroot, p.network_policy
                 FROM parcels p JOIN users u ON u.id = p.user_id WHERE u.name = $1 AND p.name = $2",
                &[&user, &parcel],
            )
            .await?
            .ok_or_else(|| MetaError::NoSuchParcel(format!("{user}/{parcel}")))?;
        Ok(ParcelDetail {
            info: ParcelInfo {
                user: user.to_owned(),
                name: parcel.to_owned(),
                head: r.get::<_, i64>(0) as u64,
                created_unix: r.get(1),
                lock: lock_from(&r, 2),
            },
            wrapped_keyroot: r.get(6),
            recovery_keyroot: r.get(7),
            network_policy: policy_column(r.get(8))?,
        })
    }

    async fn create_parcel(&self, p: NewParcel) -> Result<(), MetaError> {
        let mut conn = self.conn().await?;
        let tx = conn.client().transaction().await?;
        let uid: i64 = tx
            .query_opt("SELECT id FROM users WHERE name = $1 FOR SHARE", &[&p.user])
            .await?
            .ok_or_else(|| MetaError::NoSuchUser(p.user.clone()))?
            .get(0);
        let n = tx
            .execute(
                "INSERT INTO parcels (user_id, name, created_unix, wrapped_keyroot, recovery_keyroot,
                     lock_id, lock_holder, lock_client_id, lock_since)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (user_id, name) DO NOTHING",
                &[
                    &uid,
                    &p.name,
                    &p.now_unix,
                    &p.wrapped_keyroot,
                    &p.recovery_keyroot,
                    &p.lock.lock_id,
                    &p.lock.holder,
                    &p.lock.client_id,
                    &p.lock.since_unix,
                ],
            )
            .await?;
        if n == 0 {
            return Err(MetaError::ParcelExists(format!("{}/{}", p.user, p.name)));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn set_wrapped_keyroot(&self, user: &str, parcel: &str, wrapped: &[u8]) -> Result<(), MetaError> {
        let mut conn = self.conn().await?;
        let n = conn
            .client()
            .execute(
                "UPDATE parcels p SET wrapped_keyroot = $3 FROM users u
                 WHERE u.id = p.user_id AND u.name = $1 AND p.name = $2",
                &[&user, &parcel, &wrapped],
            )
            .await?;
        if n == 0 {
            return Err(MetaError::NoSuchParcel(format!("{user}/{parcel}")));
        }
        Ok(())
    }

    async fn set_network_policy(
        &self,
        user: &str,
        parcel: &str,
        policy: Option<NetworkPolicy>,
    ) -> Result<(), MetaError> {
        let mut conn = self.conn().await?;
        let n = conn
            .client()
            .execute(
                "UPDATE parcels p SET network_policy = $3 FROM users u
                 WHERE u.id = p.user_id AND u.name = $1 AND p.name = $2",
                &[&user, &parcel, &policy.map(NetworkPolicy::as_str)],
            )
            .await?;
        if n == 0 {
            return Err(MetaError::NoSuchParcel(format!("{user}/{parcel}")));
        }
        Ok(())
    }

    async fn delete_parcel(
        &self,
        user: &str,
        parcel: &str,
        client_id: Option<&str>,
    ) -> Result<(), MetaError> {
        let mut conn = self.conn().await?;
        let tx = conn.client().transaction().await?;
        let p = parcel_row(&tx, user, parcel, true).await?;
        if p.head != 0 {
            return Err(MetaError::HasVersions(p.name));
        }
        if let Some(lock) = p.lock {
            if client_id != Some(lock.client_id.as_str()) {
                return Err(MetaError::Locked { parcel: p.name, lock });
            }
        }
        tx.execute("DELETE FROM parcels WHERE id = $1", &[&p.id]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn acquire_lock(&self, user: &str, parcel: &str, lock: LockInfo) -> Result<LockInfo, MetaError> {
        let mut conn = self.conn().await?;
        let tx = conn.client().transaction().await?;
        let p = parcel_row(&tx, user, parcel, true).await?;
        match p.lock {
            Some(held) if held.client_id == lock.client_id => Ok(held),
            Some(held) => Err(MetaError::Locked { parcel: format!("{user}/{parcel}"), lock: held }),
            None => {
                tx.execute(
                    "UPDATE parcels SET lock_id = $2, lock_holder = $3, lock_client_id = $4, lock_since = $5
                     WHERE id = $1",
                    &[&p.id, &lock.lock_id, &lock.holder, &lock.client_id, &lock.since_unix],
                )
                .await?;
                tx.commit().await?;
                Ok(lock)
            }
        }
    }

    async fn release_lock(&self, user: &str, parcel: &str, how: LockRelease) -> Result<(), MetaError> {
        let mut conn = self.conn().await?;
        let tx = conn.client().transaction().await?;
        let p = parcel_row(&tx, user, parcel, true).await?;
        match &how {
            LockRelease::Id(id) => p.check_lock(id)?,
            LockRelease::Force { by, now_unix } => {
                let Some(held) = &p.lock else { return Ok(()) };
                tx.execute(
                    "UPDATE parcels SET broken_lock_id = $2, broken_by = $3, broken_unix = $4 WHERE id = $1",
                    &[&p.id, &held.lock_id, by, now_unix],
                )
                .await?;
            }
        }
        tx.execute(
            "UPDATE parcels SET lock_id = NULL, lock_holder = NULL, lock_client_id = NULL, lock_since = NULL
             WHERE id = $1",
            &[&p.id],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn confirm_lock(&self, user: &str, parcel: &str, lock_id: &str) -> Result<LockInfo, MetaError> {
        let mut conn = self.conn().await?;
        let p = parcel_row(conn.client(), user, parcel, false).await?;
        p.check_lock(lock_id)?;
        Ok(p.lock.expect("check_lock passes only for the current lock"))
    }

    async fn broken_lock(&self, user: &str, parcel: &str) -> Result<Option<BrokenLock>, MetaError> {
        let mut conn = self.conn().await?;
        Ok(parcel_row(conn.client(), user, parcel, false).await?.broken)
    }

    async fn locks_held(&self) -> Result<u64, MetaError> {
        let mut conn = self.conn().await?;
        let n: i64 = conn
            .client()
            .query_one("SELECT COUNT(*) FROM parcels WHERE lock_id IS NOT NULL", &[])
            .await?
            .get(0);
        Ok(n as u64)
    }

    async fn put_keyring(
        &self,
        user: &str,
        parcel: &str,
        lock_id: &str,
        hash: Tag,
        data: Bytes,
    ) -> Result<bool, MetaError> {
        let now = crate::meta_sqlite::now_unix();
        let mut conn = self.conn().await?;
        let tx = conn.client().transaction().await?;
        // The row locked: a concurrent break of the lock waits for this upload, or this upload sees it.
        let p = parcel_row(&tx, user, parcel, true).await?;
        p.check_lock(lock_id)?;
        let n = tx
            .execute(
                "INSERT INTO keyrings (parcel_id, hash, data, created_unix) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (parcel_id, hash) DO NOTHING",
                &[&p.id, &&hash.0[..], &&data[..], &now],
            )
            .await?;
        if n == 0 {
            // Already there: refresh its age so a purge of abandoned uploads leaves it alone.
            tx.execute(
                "UPDATE keyrings SET created_unix = $3 WHERE parcel_id = $1 AND hash = $2",
                &[&p.id, &&hash.0[..], &now],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    async fn keyring(&self, user: &str, parcel: &str, hash: Tag) -> Result<Option<Bytes>, MetaError> {
        let mut conn = self.conn().await?;
        let c = conn.client();
        let p = parcel_row(c, user, parcel, false).await?;
        let row = c
            .query_opt("SELECT data FROM keyrings WHERE parcel_id = $1 AND hash = $2", &[&p.id, &&hash.0[..]])
            .await?;
        Ok(row.map(|r| Bytes::from(r.get::<_, Vec<u8>>(0))))
    }

    async fn versions(&self, user: &str, parcel: &str) -> Result<Vec<VersionInfo>, MetaError> {
        let mut conn = self.conn().await?;
        let c = conn.client();
        let p = parcel_row(c, user, parcel, false).await?;
        let rows = c
            .query(
                "SELECT number, created_unix, client, bytes_uploaded, comment FROM versions
                 WHERE parcel_id = $1 ORDER BY number",
                &[&p.id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| VersionInfo {
                version: r.get::<_, i64>(0) as u64,
                created_unix: r.get(1),
                client: r.get(2),
                bytes_uploaded: r.get::<_, i64>(3) as u64,
                comment: r.get(4),
            })
            .collect())
    }

    async fn manifest(&self, user: &str, parcel: &str, which: VersionSel) -> Result<(u64, Bytes), MetaError> {
        let mut conn = self.conn().await?;
        let c = conn.client();
        // One snapshot for the head and its manifest (a concurrent prune cannot slip between them).
        let tx = c
            .build_transaction()
            .read_only(true)
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead);
        let tx = tx.start().await?;
        let p = parcel_row(&tx, user, parcel, false).await?;
        let number = match which {
            VersionSel::Head => p.head,
            VersionSel::Number(n) => n,
        };
        let row = tx
            .query_opt(
                "SELECT manifest FROM versions WHERE parcel_id = $1 AND number = $2",
                &[&p.id, &(number.min(i64::MAX as u64) as i64)],
            )
            .await?;
        tx.commit().await?;
        match row {
            Some(r) => Ok((number, Bytes::from(r.get::<_, Vec<u8>>(0)))),
            None => Err(MetaError::NoSuchVersion { parcel: format!("{user}/{parcel}"), version: number }),
        }
    }

    async fn commit_version(&self, v: NewVersion, chunks: &dyn ChunkPresence) -> Result<u64, MetaError> {
        let mut conn = self.conn().await?;
        let tx = conn.client().transaction().await?;
        // The commit/sweep exclusion first (lock order: gc_lock, then the parcel row), held until COMMIT.
        gc_lock(&tx, false).await?;
        let p = parcel_row(&tx, &v.user, &v.parcel, true).await?;
        p.check_lock(&v.lock_id)?;
        if v.base_version != p.head {
            return Err(MetaError::StaleBase { base: v.base_version, head: p.head });
        }
        // Chunks named by the head version are present (gc never sweeps them): look only for the others.
        let mut known = HashSet::new();
        if let Some(row) = tx
            .query_opt(
                "SELECT id FROM versions WHERE parcel_id = $1 AND number = $2",
                &[&p.id, &(p.head as i64)],
            )
            .await?
        {
            versions_tags(&tx, &[row.get::<_, i64>(0)], &mut known).await?;
        }
        let wanted: Vec<Tag> = v.keyrings.iter().copied().collect::<HashSet<_>>().into_iter().collect();
        let hashes: Vec<&[u8]> = wanted.iter().map(|t| &t.0[..]).collect();
        // FOR SHARE: no prune can delete these keyrings before this version references them.
        let rows = tx
            .query(
                "SELECT hash, data FROM keyrings WHERE parcel_id = $1 AND hash = ANY($2) FOR SHARE",
                &[&p.id, &hashes],
            )
            .await?;
        let mut found = HashSet::new();
        let mut needed = HashSet::new();
        for row in &rows {
            let hash: &[u8] = row.get(0);
            found.insert(tag_of(hash)?);
            keyring_tags(hash, row.get(1), &mut needed)?;
        }
        drop(rows);
        let mut missing_keyrings: Vec<Tag> = wanted.iter().filter(|t| !found.contains(t)).copied().collect();
        if !missing_keyrings.is_empty() {
            missing_keyrings.sort();
            return Err(MetaError::MissingKeyrings(missing_keyrings));
        }
        let mut needed: Vec<Tag> = needed.into_iter().filter(|t| !known.contains(t)).collect();
        needed.sort();
        // Still inside the transaction (gc sweeps are excluded): are the chunks there?
        let missing = chunks.missing(needed).await?;
        if !missing.is_empty() {
            return Err(MetaError::MissingChunks(missing));
        }
        let number = p.head + 1;
        insert_version(
            &tx,
            p.id,
            number,
            (&v.manifest, &v.client, &v.comment, v.bytes_uploaded, v.now_unix),
            &v.keyrings,
        )
        .await?;
        tx.commit().await?;
        Ok(number)
    }

    async fn rollback(&self, r: Rollback) -> Result<u64, MetaError> {
        let name = format!("{}/{}", r.user, r.parcel);
        let mut conn = self.conn().await?;
        let tx = conn.client().transaction().await?;
        // A new version that references chunks: the same exclusion as a commit.
        gc_lock(&tx, false).await?;
        let p = parcel_row(&tx, &r.user, &r.parcel, true).await?;
        match (&r.lock_id, p.lock.clone()) {
            (Some(id), _) => p.check_lock(id)?,
            (None, Some(lock)) => return Err(MetaError::Locked { parcel: name, lock }),
            (None, None) => {}
        }
        let row = tx
            .query_opt(
                "SELECT id, manifest FROM versions WHERE parcel_id = $1 AND number = $2",
                &[&p.id, &(r.version.min(i64::MAX as u64) as i64)],
            )
            .await?
            .ok_or(MetaError::NoSuchVersion { parcel: name, version: r.version })?;
        let (vid, manifest): (i64, Vec<u8>) = (row.get(0), row.get(1));
        let keyrings = tx
            .query("SELECT hash FROM version_keyrings WHERE version_id = $1", &[&vid])
            .await?
            .iter()
            .map(|row| tag_of(row.get(0)))
            .collect::<Result<Vec<_>, _>>()?;
        let number = p.head + 1;
        let comment = format!("rollback to version {}", r.version);
        insert_version(&tx, p.id, number, (&manifest, &r.client, &comment, 0, r.now_unix), &keyrings).await?;
        tx.commit().await?;
        Ok(number)
    }

    async fn prune(&self, user: &str, parcel: &str, keep: u64) -> Result<PruneStats, MetaError> {
        if keep == 0 {
            return Err(MetaError::Invalid("--keep must be at least 1 (the head is never pruned)".into()));
        }
        let keep = keep.min(i64::MAX as u64) as i64;
        let mut conn = self.conn().await?;
        let tx = conn.client().transaction().await?;
        let p = parcel_row(&tx, user, parcel, true).await?;
        let doomed: Vec<i64> = tx
            .query(
                "SELECT id FROM versions WHERE parcel_id = $1 ORDER BY number DESC OFFSET $2",
                &[&p.id, &keep],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if doomed.is_empty() {
            return Ok(PruneStats::default());
        }
        let hashes: Vec<Vec<u8>> = tx
            .query("SELECT DISTINCT hash FROM version_keyrings WHERE version_id = ANY($1)", &[&doomed])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.execute("DELETE FROM versions WHERE id = ANY($1)", &[&doomed]).await?;
        let keyrings_deleted = tx
            .execute(
                "DELETE FROM keyrings k WHERE k.parcel_id = $1 AND k.hash = ANY($2) AND NOT EXISTS
                   (SELECT 1 FROM version_keyrings vk WHERE vk.parcel_id = $1 AND vk.hash = k.hash)",
                &[&p.id, &hashes],
            )
            .await?;
        tx.commit().await?;
        Ok(PruneStats { versions_deleted: doomed.len() as u64, keyrings_deleted })
    }

    async fn referenced_keyrings(&self) -> Result<Vec<(String, String, Tag)>, MetaError> {
        let mut conn = self.conn().await?;
        let rows = conn
            .client()
            .query(
                "SELECT DISTINCT u.name, p.name, vk.hash FROM version_keyrings vk
                 JOIN parcels p ON p.id = vk.parcel_id JOIN users u ON u.id = p.user_id
                 ORDER BY u.name, p.name",
                &[],
            )
            .await?;
        rows.iter().map(|r| Ok((r.get(0), r.get(1), tag_of(r.get(2))?))).collect()
    }

    async fn purge_unreferenced_keyrings(&self, before_unix: i64) -> Result<u64, MetaError> {
        let mut conn = self.conn().await?;
        let tx = conn.client().transaction().await?;
        // Exclusive: a commit in flight has checked its keyrings but not yet referenced them; wait for it,
        // then decide on a snapshot taken after it committed.
        gc_lock(&tx, true).await?;
        let n = tx
            .execute(
                "DELETE FROM keyrings WHERE created_unix < $1 AND NOT EXISTS
                   (SELECT 1 FROM version_keyrings vk WHERE vk.parcel_id = keyrings.parcel_id
                      AND vk.hash = keyrings.hash)",
                &[&before_unix],
            )
            .await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn gc_mark(&self) -> Result<GcMark, MetaError> {
        let mut conn = self.conn().await?;
        // One read-only REPEATABLE READ transaction: a consistent snapshot of versions and their keyrings.
        let tx = conn
            .client()
            .build_transaction()
            .read_only(true)
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await?;
        let mut mark = GcMark::default();
        for r in tx.query("SELECT id FROM versions", &[]).await? {
            mark.versions_seen.insert(r.get(0));
        }
        let rows = tx
            .query_raw(
                "SELECT k.hash, k.data FROM keyrings k WHERE EXISTS
                   (SELECT 1 FROM version_keyrings vk WHERE vk.parcel_id = k.parcel_id AND vk.hash = k.hash)",
                std::iter::empty::<&(dyn ToSql + Sync)>(),
            )
            .await?;
        {
            pin_mut!(rows);
            while let Some(row) = rows.try_next().await? {
                keyring_tags(row.get(0), row.get(1), &mut mark.referenced)?;
            }
        }
        tx.commit().await?;
        Ok(mark)
    }

    async fn gc_sweep(
        &self,
        mark: &GcMark,
        candidates: Vec<Tag>,
        sweeper: &dyn ChunkSweeper,
    ) -> Result<Vec<Tag>, MetaError> {
        let mut conn = self.conn().await?;
        let tx = conn.client().transaction().await?;
        gc_lock(&tx, true).await?;
        // READ COMMITTED: this statement's snapshot is taken after the lock was granted, so it sees every
        // version whose commit checked its chunks before this sweep.
        let new: Vec<i64> = tx
            .query("SELECT id FROM versions", &[])
            .await?
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .filter(|id| !mark.versions_seen.contains(id))
            .collect();
        let mut referenced = HashSet::new();
        versions_tags(&tx, &new, &mut referenced).await?;
        let doomed: Vec<Tag> = candidates.into_iter().filter(|t| !referenced.contains(t)).collect();
        // Deleted while the exclusion is held; the transaction wrote nothing.
        let r = sweeper.delete(doomed.clone()).await;
        tx.rollback().await?;
        r.map(|()| doomed)
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h:5/db"), "postgres://u:***@h:5/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("host=h user=u"), "host=h user=u");
    }
}
