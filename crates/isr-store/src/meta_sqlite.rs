//! [`MetaStore`] on an embedded SQLite database (WAL mode, `synchronous=FULL`).
//!
//! Several processes may open the same file (a `serve` and an administrator's `gc`): every write runs in a
//! `BEGIN IMMEDIATE` transaction, which SQLite serializes across processes, and waits up to a minute for
//! another writer. A commit's chunk check and a gc sweep batch each hold such a transaction, which is what
//! makes them mutually exclusive.

use crate::meta::*;
use async_trait::async_trait;
use bytes::Bytes;
use isr_format::{KeyringTags, Tag};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    login_hash TEXT NOT NULL,
    created_unix INTEGER NOT NULL,
    failed_logins INTEGER NOT NULL DEFAULT 0,
    last_failed_unix INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tokens (
    hash BLOB PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires_unix INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS parcels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created_unix INTEGER NOT NULL,
    head INTEGER NOT NULL DEFAULT 0,
    wrapped_keyroot BLOB NOT NULL,
    recovery_keyroot BLOB,
    lock_id TEXT,
    lock_holder TEXT,
    lock_client_id TEXT,
    lock_since INTEGER,
    broken_lock_id TEXT,
    broken_by TEXT,
    broken_unix INTEGER,
    network_policy TEXT,
    UNIQUE (user_id, name)
);
CREATE TABLE IF NOT EXISTS keyrings (
    parcel_id INTEGER NOT NULL REFERENCES parcels(id) ON DELETE CASCADE,
    hash BLOB NOT NULL,
    data BLOB NOT NULL,
    created_unix INTEGER NOT NULL,
    PRIMARY KEY (parcel_id, hash)
);
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    parcel_id INTEGER NOT NULL REFERENCES parcels(id) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    created_unix INTEGER NOT NULL,
    client TEXT NOT NULL,
    bytes_uploaded INTEGER NOT NULL,
    comment TEXT NOT NULL,
    manifest BLOB NOT NULL,
    UNIQUE (parcel_id, number)
);
CREATE TABLE IF NOT EXISTS version_keyrings (
    version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    parcel_id INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (version_id, hash)
);
CREATE INDEX IF NOT EXISTS version_keyrings_by_hash ON version_keyrings (parcel_id, hash);
CREATE INDEX IF NOT EXISTS tokens_by_expiry ON tokens (expires_unix);
"#;

/// Columns added after the first release: (table, column, declaration). Databases created before them get
/// them on open.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("parcels", "broken_lock_id", "TEXT"),
    ("parcels", "broken_by", "TEXT"),
    ("parcels", "broken_unix", "INTEGER"),
    ("parcels", "network_policy", "TEXT"),
];

/// Adds the [`ADDED_COLUMNS`] a database lacks, in one write transaction (so two processes opening an old
/// database at once do not both add them).
fn migrate(conn: &mut Connection) -> Result<(), MetaError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for (table, column, decl) in ADDED_COLUMNS {
        let present: bool = tx
            .prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?
            .exists([column])?;
        if !present {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The database file and its `-wal` / `-shm` companions readable by their owner only. SQLite gives the
/// companions the main file's mode when it creates them; this also repairs files made before that rule.
fn make_private(path: &Path) -> Result<(), MetaError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let private = |p: &Path| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| MetaError::Database(format!("making {} private: {e}", p.display())))
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| MetaError::Database(format!("creating {}: {e}", path.display())))?;
    private(path)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut companion = path.as_os_str().to_owned();
        companion.push(suffix);
        let companion = PathBuf::from(companion);
        if companion.exists() {
            private(&companion)?;
        }
    }
    Ok(())
}

/// Idle connections kept for reuse.
const POOL_IDLE: usize = 16;

impl From<rusqlite::Error> for MetaError {
    fn from(e: rusqlite::Error) -> Self {
        MetaError::Database(e.to_string())
    }
}

/// The embedded metadata store: one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteMetaStore {
    path: PathBuf,
    pool: Arc<Mutex<Vec<Connection>>>,
}

fn open_conn(path: &Path) -> Result<Connection, MetaError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(60))?;
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
    Ok(conn)
}

type Tx<'a> = rusqlite::Transaction<'a>;

fn tag_of(blob: Vec<u8>) -> Result<Tag, MetaError> {
    let arr: [u8; 32] =
        blob.try_into().map_err(|_| MetaError::Database("stored hash is not 32 bytes".into()))?;
    Ok(Tag(arr))
}

fn lock_from(
    id: Option<String>,
    holder: Option<String>,
    client: Option<String>,
    since: Option<i64>,
) -> Option<LockInfo> {
    Some(LockInfo {
        lock_id: id?,
        holder: holder.unwrap_or_default(),
        client_id: client.unwrap_or_default(),
        since_unix: since.unwrap_or(0),
    })
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

fn parcel_row(conn: &Connection, user: &str, parcel: &str) -> Result<ParcelRow, MetaError> {
    let name = format!("{user}/{parcel}");
    conn.query_row(
        "SELECT p.id, p.head, p.lock_id, p.lock_holder, p.lock_client_id, p.lock_since,
                p.broken_lock_id, p.broken_by, p.broken_unix
         FROM parcels p JOIN users u ON u.id = p.user_id WHERE u.name = ?1 AND p.name = ?2",
        params![user, parcel],
        |r| {
            let broken = r.get::<_, Option<String>>(6)?.map(|lock_id| BrokenLock {
                lock_id,
                by: r.get::<_, Option<String>>(7).ok().flatten().unwrap_or_default(),
                unix: r.get::<_, Option<i64>>(8).ok().flatten().unwrap_or(0),
            });
            Ok(ParcelRow {
                id: r.get(0)?,
                head: r.get::<_, i64>(1)? as u64,
                lock: lock_from(r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?),
                broken,
                name: name.clone(),
            })
        },
    )
    .optional()?
    .ok_or_else(|| MetaError::NoSuchParcel(name.clone()))
}

fn user_id(conn: &Connection, name: &str) -> Result<i64, MetaError> {
    conn.query_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0))
        .optional()?
        .ok_or_else(|| MetaError::NoSuchUser(name.to_owned()))
}

/// The stored tags of the keyrings of one version.
fn version_tags(conn: &Connection, version_id: i64, into: &mut HashSet<Tag>) -> Result<(), MetaError> {
    let mut st = conn.prepare_cached(
        "SELECT k.hash, k.data FROM version_keyrings vk
         JOIN keyrings k ON k.parcel_id = vk.parcel_id AND k.hash = vk.hash WHERE vk.version_id = ?1",
    )?;
    let mut rows = st.query([version_id])?;
    while let Some(r) = rows.next()? {
        let hash = tag_of(r.get(0)?)?;
        let data: Vec<u8> = r.get(1)?;
        let tags =
            KeyringTags::parse(&data).map_err(|e| MetaError::BadKeyring { hash, reason: e.to_string() })?;
        into.extend(tags.stored_tags().copied());
    }
    Ok(())
}

fn head_version_id(conn: &Connection, parcel_id: i64, head: u64) -> Result<Option<i64>, MetaError> {
    Ok(conn
        .query_row(
            "SELECT id FROM versions WHERE parcel_id = ?1 AND number = ?2",
            params![parcel_id, head as i64],
            |r| r.get(0),
        )
        .optional()?)
}

fn insert_version(
    tx: &Connection,
    parcel_id: i64,
    number: u64,
    v: (&[u8], &str, &str, u64, i64),
    keyrings: &[Tag],
) -> Result<(), MetaError> {
    let (manifest, client, comment, bytes_uploaded, now) = v;
    tx.execute(
        "INSERT INTO versions (parcel_id, number, created_unix, client, bytes_uploaded, comment, manifest)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![parcel_id, number as i64, now, client, bytes_uploaded as i64, comment, manifest],
    )?;
    let vid = tx.last_insert_rowid();
    for k in keyrings.iter().collect::<HashSet<_>>() {
        tx.execute(
            "INSERT INTO version_keyrings (version_id, parcel_id, hash) VALUES (?1, ?2, ?3)",
            params![vid, parcel_id, &k.0[..]],
        )?;
    }
    tx.execute("UPDATE parcels SET head = ?2 WHERE id = ?1", params![parcel_id, number as i64])?;
    Ok(())
}

impl SqliteMetaStore {
    /// Opens (creating if needed) the database at `path`, private to its owner (mode 0600), and adds
    /// columns an older database lacks.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, MetaError> {
        let path = path.into();
        make_private(&path)?;
        let mut conn = open_conn(&path)?;
        conn.execute_batch(SCHEMA)?;
        migrate(&mut conn)?;
        Ok(SqliteMetaStore { path, pool: Arc::new(Mutex::new(vec![conn])) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn take(&self) -> Result<Connection, MetaError> {
        let pooled = self.pool.lock().map_err(|_| MetaError::Database("pool poisoned".into()))?.pop();
        match pooled {
            Some(c) => Ok(c),
            None => open_conn(&self.path),
        }
    }

    fn give(&self, conn: Connection) {
        // A connection still inside a transaction (an error path that could not roll back) is closed,
        // which rolls the transaction back.
        if !conn.is_autocommit() {
            return;
        }
        if let Ok(mut p) = self.pool.lock() {
            if p.len() < POOL_IDLE {
                p.push(conn);
            }
        }
    }

    /// Runs `f` on a pooled connection on the blocking thread pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, MetaError> + Send + 'static,
    ) -> Result<T, MetaError> {
        let conn = self.take()?;
        let (conn, r) = self.run(conn, f).await?;
        self.give(conn);
        r
    }

    async fn run<T: Send + 'static>(
        &self,
        mut conn: Connection,
        f: impl FnOnce(&mut Connection) -> Result<T, MetaError> + Send + 'static,
    ) -> Result<(Connection, Result<T, MetaError>), MetaError> {
        tokio::task::spawn_blocking(move || {
            let r = f(&mut conn);
            (conn, r)
        })
        .await
        .map_err(|e| MetaError::Database(format!("database task failed: {e}")))
    }

    /// Runs `f` in an IMMEDIATE (write) transaction, committing on success.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, MetaError> + Send + 'static,
    ) -> Result<T, MetaError> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let r = f(&tx)?;
            tx.commit()?;
            Ok(r)
        })
        .await
    }

    async fn rollback_and_give(&self, conn: Connection) {
        if let Ok((conn, _)) = self.run(conn, |c| Ok(c.execute_batch("ROLLBACK")?)).await {
            self.give(conn);
        }
    }
}

fn begin_immediate(c: &mut Connection) -> Result<(), MetaError> {
    c.execute_batch("BEGIN IMMEDIATE")?;
    Ok(())
}

/// Runs `f` after `BEGIN IMMEDIATE`; rolls back if it fails, leaving the transaction open otherwise.
fn in_open_tx<T>(
    c: &mut Connection,
    f: impl FnOnce(&Connection) -> Result<T, MetaError>,
) -> Result<T, MetaError> {
    begin_immediate(c)?;
    let r = f(c);
    if r.is_err() {
        let _ = c.execute_batch("ROLLBACK");
    }
    r
}

#[async_trait]
impl MetaStore for SqliteMetaStore {
    async fn setting_or_init(&self, key: &str, init: String) -> Result<String, MetaError> {
        let key = key.to_owned();
        self.write(move |tx| {
            tx.execute("INSERT OR IGNORE INTO settings (key, value) VALUES (?1, ?2)", params![key, init])?;
            Ok(tx.query_row("SELECT value FROM settings WHERE key = ?1", [&key], |r| r.get(0))?)
        })
        .await
    }

    async fn setting(&self, key: &str) -> Result<Option<String>, MetaError> {
        let key = key.to_owned();
        self.with(move |c| {
            Ok(c.query_row("SELECT value FROM settings WHERE key = ?1", [&key], |r| r.get(0)).optional()?)
        })
        .await
    }

    async fn add_user(&self, name: &str, login_hash: &str, now_unix: i64) -> Result<(), MetaError> {
        let (name, hash) = (name.to_owned(), login_hash.to_owned());
        self.write(move |tx| {
            let n = tx.execute(
                "INSERT OR IGNORE INTO users (name, login_hash, created_unix) VALUES (?1, ?2, ?3)",
                params![name, hash, now_unix],
            )?;
            if n == 0 {
                return Err(MetaError::UserExists(name));
            }
            Ok(())
        })
        .await
    }

    async fn set_login_hash(&self, name: &str, login_hash: &str) -> Result<(), MetaError> {
        let (name, hash) = (name.to_owned(), login_hash.to_owned());
        self.write(move |tx| {
            let n = tx.execute(
                "UPDATE users SET login_hash = ?2, failed_logins = 0 WHERE name = ?1",
                params![name, hash],
            )?;
            if n == 0 {
                return Err(MetaError::NoSuchUser(name));
            }
            Ok(())
        })
        .await
    }

    async fn remove_user(&self, name: &str) -> Result<(), MetaError> {
        let name = name.to_owned();
        self.write(move |tx| {
            let id = user_id(tx, &name)?;
            // Cascades: tokens, parcels -> keyrings, versions -> version_keyrings.
            tx.execute("DELETE FROM users WHERE id = ?1", [id])?;
            Ok(())
        })
        .await
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>, MetaError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, login_hash, created_unix FROM users ORDER BY name")?;
            let rows = st.query_map([], |r| {
                Ok(UserRecord { name: r.get(0)?, login_hash: r.get(1)?, created_unix: r.get(2)? })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn user(&self, name: &str) -> Result<Option<UserRecord>, MetaError> {
        let name = name.to_owned();
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT name, login_hash, created_unix FROM users WHERE name = ?1",
                [&name],
                |r| Ok(UserRecord { name: r.get(0)?, login_hash: r.get(1)?, created_unix: r.get(2)? }),
            )
            .optional()?)
        })
        .await
    }

    async fn login_failures(&self, name: &str) -> Result<LoginFailures, MetaError> {
        let name = name.to_owned();
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT failed_logins, last_failed_unix FROM users WHERE name = ?1",
                [&name],
                |r| Ok(LoginFailures { count: r.get::<_, i64>(0)? as u32, last_unix: r.get(1)? }),
            )
            .optional()?
            .unwrap_or_default())
        })
        .await
    }

    async fn record_login_failure(&self, name: &str, now_unix: i64) -> Result<u32, MetaError> {
        let name = name.to_owned();
        self.write(move |tx| {
            tx.execute(
                "UPDATE users SET failed_logins = failed_logins + 1, last_failed_unix = ?2 WHERE name = ?1",
                params![name, now_unix],
            )?;
            Ok(tx
                .query_row("SELECT failed_logins FROM users WHERE name = ?1", [&name], |r| r.get::<_, i64>(0))
                .optional()?
                .unwrap_or(0) as u32)
        })
        .await
    }

    async fn reserve_login_attempt(
        &self,
        name: &str,
        seen: LoginFailures,
        now_unix: i64,
    ) -> Result<bool, MetaError> {
        let name = name.to_owned();
        self.write(move |tx| {
            let n = tx.execute(
                "UPDATE users SET failed_logins = failed_logins + 1, last_failed_unix = ?4
                 WHERE name = ?1 AND failed_logins = ?2 AND last_failed_unix = ?3",
                params![name, seen.count as i64, seen.last_unix, now_unix],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn clear_login_failures(&self, name: &str) -> Result<(), MetaError> {
        let name = name.to_owned();
        self.with(move |c| {
            c.execute("UPDATE users SET failed_logins = 0 WHERE name = ?1 AND failed_logins != 0", [&name])?;
            Ok(())
        })
        .await
    }

    async fn add_token(&self, token_hash: [u8; 32], user: &str, expires_unix: i64) -> Result<(), MetaError> {
        let user = user.to_owned();
        self.write(move |tx| {
            let uid = user_id(tx, &user)?;
            tx.execute(
                "INSERT INTO tokens (hash, user_id, expires_unix) VALUES (?1, ?2, ?3)",
                params![&token_hash[..], uid, expires_unix],
            )?;
            Ok(())
        })
        .await
    }

    async fn token(&self, token_hash: [u8; 32], now_unix: i64) -> Result<Option<(String, i64)>, MetaError> {
        self.with(move |c| {
            Ok(c.prepare_cached(
                "SELECT u.name, t.expires_unix FROM tokens t JOIN users u ON u.id = t.user_id
                 WHERE t.hash = ?1 AND t.expires_unix > ?2",
            )?
            .query_row(params![&token_hash[..], now_unix], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
        })
        .await
    }

    async fn purge_expired_tokens(&self, now_unix: i64) -> Result<u64, MetaError> {
        self.with(move |c| Ok(c.execute("DELETE FROM tokens WHERE expires_unix <= ?1", [now_unix])? as u64))
            .await
    }

    async fn list_parcels(&self, user: Option<&str>) -> Result<Vec<ParcelInfo>, MetaError> {
        let user = user.map(str::to_owned);
        self.with(move |c| {
            let mut st = c.prepare(
                "SELECT u.name, p.name, p.head, p.created_unix, p.lock_id, p.lock_holder, p.lock_client_id,
                        p.lock_since
                 FROM parcels p JOIN users u ON u.id = p.user_id
                 WHERE ?1 IS NULL OR u.name = ?1 ORDER BY u.name, p.name",
            )?;
            let rows = st.query_map([&user], |r| {
                Ok(ParcelInfo {
                    user: r.get(0)?,
                    name: r.get(1)?,
                    head: r.get::<_, i64>(2)? as u64,
                    created_unix: r.get(3)?,
                    lock: lock_from(r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn parcel(&self, user: &str, parcel: &str) -> Result<ParcelDetail, MetaError> {
        let (user, parcel) = (user.to_owned(), parcel.to_owned());
        self.with(move |c| {
            c.query_row(
                "SELECT p.head, p.created_unix, p.lock_id, p.lock_holder, p.lock_client_id, p.lock_since,
                        p.wrapped_keyroot, p.recovery_keyroot, p.network_policy
                 FROM parcels p JOIN users u ON u.id = p.user_id WHERE u.name = ?1 AND p.name = ?2",
                params![user, parcel],
                |r| {
                    Ok((
                        ParcelDetail {
                            info: ParcelInfo {
                                user: user.clone(),
                                name: parcel.clone(),
                                head: r.get::<_, i64>(0)? as u64,
                                created_unix: r.get(1)?,
                                lock: lock_from(r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?),
                            },
                            wrapped_keyroot: r.get(6)?,
                            recovery_keyroot: r.get(7)?,
                            network_policy: None,
                        },
                        r.get::<_, Option<String>>(8)?,
                    ))
                },
            )
            .optional()?
            .ok_or_else(|| MetaError::NoSuchParcel(format!("{user}/{parcel}")))
            .and_then(|(mut detail, policy)| {
                detail.network_policy = policy_column(policy)?;
                Ok(detail)
            })
        })
        .await
    }

    async fn create_parcel(&self, p: NewParcel) -> Result<(), MetaError> {
        self.write(move |tx| {
            let uid = user_id(tx, &p.user)?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO parcels (user_id, name, created_unix, wrapped_keyroot, recovery_keyroot,
                     lock_id, lock_holder, lock_client_id, lock_since)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    uid,
                    p.name,
                    p.now_unix,
                    p.wrapped_keyroot,
                    p.recovery_keyroot,
                    p.lock.lock_id,
                    p.lock.holder,
                    p.lock.client_id,
                    p.lock.since_unix
                ],
            )?;
            if n == 0 {
                return Err(MetaError::ParcelExists(format!("{}/{}", p.user, p.name)));
            }
            Ok(())
        })
        .await
    }

    async fn set_wrapped_keyroot(&self, user: &str, parcel: &str, wrapped: &[u8]) -> Result<(), MetaError> {
        let (user, parcel, wrapped) = (user.to_owned(), parcel.to_owned(), wrapped.to_vec());
        self.write(move |tx| {
            let p = parcel_row(tx, &user, &parcel)?;
            tx.execute("UPDATE parcels SET wrapped_keyroot = ?2 WHERE id = ?1", params![p.id, wrapped])?;
            Ok(())
        })
        .await
    }

    async fn set_network_policy(
        &self,
        user: &str,
        parcel: &str,
        policy: Option<NetworkPolicy>,
    ) -> Result<(), MetaError> {
        let (user, parcel) = (user.to_owned(), parcel.to_owned());
        self.write(move |tx| {
            let p = parcel_row(tx, &user, &parcel)?;
            tx.execute(
                "UPDATE parcels SET network_policy = ?2 WHERE id = ?1",
                params![p.id, policy.map(NetworkPolicy::as_str)],
            )?;
            Ok(())
        })
        .await
    }

    async fn delete_parcel(
        &self,
        user: &str,
        parcel: &str,
        client_id: Option<&str>,
    ) -> Result<(), MetaError> {
        let (user, parcel, client_id) = (user.to_owned(), parcel.to_owned(), client_id.map(str::to_owned));
        self.write(move |tx| {
            let p = parcel_row(tx, &user, &parcel)?;
            if p.head != 0 {
                return Err(MetaError::HasVersions(p.name));
            }
            if let Some(lock) = p.lock {
                if client_id.as_deref() != Some(lock.client_id.as_str()) {
                    return Err(MetaError::Locked { parcel: p.name, lock });
                }
            }
            tx.execute("DELETE FROM parcels WHERE id = ?1", [p.id])?;
            Ok(())
        })
        .await
    }

    async fn acquire_lock(&self, user: &str, parcel: &str, lock: LockInfo) -> Result<LockInfo, MetaError> {
        let (user, parcel) = (user.to_owned(), parcel.to_owned());
        self.write(move |tx| {
            let p = parcel_row(tx, &user, &parcel)?;
            match p.lock {
                Some(held) if held.client_id == lock.client_id => Ok(held),
                Some(held) => Err(MetaError::Locked { parcel: format!("{user}/{parcel}"), lock: held }),
                None => {
                    tx.execute(
                        "UPDATE parcels SET lock_id = ?2, lock_holder = ?3, lock_client_id = ?4, lock_since = ?5
                         WHERE id = ?1",
                        params![p.id, lock.lock_id, lock.holder, lock.client_id, lock.since_unix],
                    )?;
                    Ok(lock)
                }
            }
        })
        .await
    }

    async fn release_lock(&self, user: &str, parcel: &str, how: LockRelease) -> Result<(), MetaError> {
        let (user, parcel) = (user.to_owned(), parcel.to_owned());
        self.write(move |tx| {
            let p = parcel_row(tx, &user, &parcel)?;
            match &how {
                LockRelease::Id(id) => p.check_lock(id)?,
                LockRelease::Force { by, now_unix } => {
                    let Some(held) = &p.lock else { return Ok(()) };
                    tx.execute(
                        "UPDATE parcels SET broken_lock_id = ?2, broken_by = ?3, broken_unix = ?4 WHERE id = ?1",
                        params![p.id, held.lock_id, by, now_unix],
                    )?;
                }
            }
            tx.execute(
                "UPDATE parcels SET lock_id = NULL, lock_holder = NULL, lock_client_id = NULL, lock_since = NULL
                 WHERE id = ?1",
                [p.id],
            )?;
            Ok(())
        })
        .await
    }

    async fn confirm_lock(&self, user: &str, parcel: &str, lock_id: &str) -> Result<LockInfo, MetaError> {
        let (user, parcel, lock_id) = (user.to_owned(), parcel.to_owned(), lock_id.to_owned());
        self.with(move |c| {
            let p = parcel_row(c, &user, &parcel)?;
            p.check_lock(&lock_id)?;
            Ok(p.lock.expect("check_lock passes only for the current lock"))
        })
        .await
    }

    async fn broken_lock(&self, user: &str, parcel: &str) -> Result<Option<BrokenLock>, MetaError> {
        let (user, parcel) = (user.to_owned(), parcel.to_owned());
        self.with(move |c| Ok(parcel_row(c, &user, &parcel)?.broken)).await
    }

    async fn locks_held(&self) -> Result<u64, MetaError> {
        self.with(|c| {
            Ok(c.query_row("SELECT COUNT(*) FROM parcels WHERE lock_id IS NOT NULL", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
        })
        .await
    }

    async fn put_keyring(
        &self,
        user: &str,
        parcel: &str,
        lock_id: &str,
        hash: Tag,
        data: Bytes,
    ) -> Result<bool, MetaError> {
        let (user, parcel, lock_id) = (user.to_owned(), parcel.to_owned(), lock_id.to_owned());
        let now = crate::meta_sqlite::now_unix();
        self.write(move |tx| {
            let p = parcel_row(tx, &user, &parcel)?;
            p.check_lock(&lock_id)?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO keyrings (parcel_id, hash, data, created_unix) VALUES (?1, ?2, ?3, ?4)",
                params![p.id, &hash.0[..], &data[..], now],
            )?;
            if n == 0 {
                // Already there: refresh its age so a purge of abandoned uploads leaves it alone.
                tx.execute(
                    "UPDATE keyrings SET created_unix = ?3 WHERE parcel_id = ?1 AND hash = ?2",
                    params![p.id, &hash.0[..], now],
                )?;
            }
            Ok(n == 1)
        })
        .await
    }

    async fn keyring(&self, user: &str, parcel: &str, hash: Tag) -> Result<Option<Bytes>, MetaError> {
        let (user, parcel) = (user.to_owned(), parcel.to_owned());
        self.with(move |c| {
            let p = parcel_row(c, &user, &parcel)?;
            let data: Option<Vec<u8>> = c
                .query_row(
                    "SELECT data FROM keyrings WHERE parcel_id = ?1 AND hash = ?2",
                    params![p.id, &hash.0[..]],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(data.map(Bytes::from))
        })
        .await
    }

    async fn versions(&self, user: &str, parcel: &str) -> Result<Vec<VersionInfo>, MetaError> {
        let (user, parcel) = (user.to_owned(), parcel.to_owned());
        self.with(move |c| {
            let p = parcel_row(c, &user, &parcel)?;
            let mut st = c.prepare(
                "SELECT number, created_unix, client, bytes_uploaded, comment FROM versions
                 WHERE parcel_id = ?1 ORDER BY number",
            )?;
            let rows = st.query_map([p.id], |r| {
                Ok(VersionInfo {
                    version: r.get::<_, i64>(0)? as u64,
                    created_unix: r.get(1)?,
                    client: r.get(2)?,
                    bytes_uploaded: r.get::<_, i64>(3)? as u64,
                    comment: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn manifest(&self, user: &str, parcel: &str, which: VersionSel) -> Result<(u64, Bytes), MetaError> {
        let (user, parcel) = (user.to_owned(), parcel.to_owned());
        self.with(move |c| {
            let p = parcel_row(c, &user, &parcel)?;
            let number = match which {
                VersionSel::Head => p.head,
                VersionSel::Number(n) => n,
            };
            let m: Option<Vec<u8>> = c
                .query_row(
                    "SELECT manifest FROM versions WHERE parcel_id = ?1 AND number = ?2",
                    params![p.id, number as i64],
                    |r| r.get(0),
                )
                .optional()?;
            match m {
                Some(m) => Ok((number, Bytes::from(m))),
                None => Err(MetaError::NoSuchVersion { parcel: format!("{user}/{parcel}"), version: number }),
            }
        })
        .await
    }

    async fn commit_version(&self, v: NewVersion, chunks: &dyn ChunkPresence) -> Result<u64, MetaError> {
        let v = Arc::new(v);
        let conn = self.take()?;
        // Stage 1, inside the write transaction: lock, base, keyrings; the tags to look for.
        let v1 = v.clone();
        let (conn, checked) = self
            .run(conn, move |c| {
                in_open_tx(c, |c| {
                    let p = parcel_row(c, &v1.user, &v1.parcel)?;
                    p.check_lock(&v1.lock_id)?;
                    if v1.base_version != p.head {
                        return Err(MetaError::StaleBase { base: v1.base_version, head: p.head });
                    }
                    // Chunks named by the head version are present (gc never sweeps them): look only for the
                    // others.
                    let mut known = HashSet::new();
                    if let Some(hid) = head_version_id(c, p.id, p.head)? {
                        version_tags(c, hid, &mut known)?;
                    }
                    let mut needed = HashSet::new();
                    let mut missing_keyrings = Vec::new();
                    let mut st =
                        c.prepare_cached("SELECT data FROM keyrings WHERE parcel_id = ?1 AND hash = ?2")?;
                    for hash in v1.keyrings.iter().collect::<HashSet<_>>() {
                        let data: Option<Vec<u8>> =
                            st.query_row(params![p.id, &hash.0[..]], |r| r.get(0)).optional()?;
                        let Some(data) = data else {
                            missing_keyrings.push(*hash);
                            continue;
                        };
                        let tags = KeyringTags::parse(&data)
                            .map_err(|e| MetaError::BadKeyring { hash: *hash, reason: e.to_string() })?;
                        needed.extend(tags.stored_tags().filter(|t| !known.contains(t)).copied());
                    }
                    if !missing_keyrings.is_empty() {
                        missing_keyrings.sort();
                        return Err(MetaError::MissingKeyrings(missing_keyrings));
                    }
                    let mut needed: Vec<Tag> = needed.into_iter().collect();
                    needed.sort();
                    Ok((p.id, p.head, needed))
                })
            })
            .await?;
        let (parcel_id, head, needed) = match checked {
            Ok(x) => x,
            Err(e) => {
                self.give(conn);
                return Err(e);
            }
        };
        // Stage 2, still inside the transaction (gc sweeps are excluded): are the chunks there?
        let missing = match chunks.missing(needed).await {
            Ok(m) => m,
            Err(e) => {
                self.rollback_and_give(conn).await;
                return Err(e);
            }
        };
        if !missing.is_empty() {
            self.rollback_and_give(conn).await;
            return Err(MetaError::MissingChunks(missing));
        }
        // Stage 3: make the version visible.
        let (conn, r) = self
            .run(conn, move |c| {
                let r = (|| {
                    // Still inside the BEGIN IMMEDIATE of stage 1.
                    let number = head + 1;
                    insert_version(
                        c,
                        parcel_id,
                        number,
                        (&v.manifest, &v.client, &v.comment, v.bytes_uploaded, v.now_unix),
                        &v.keyrings,
                    )?;
                    c.execute_batch("COMMIT")?;
                    Ok(number)
                })();
                if r.is_err() && !c.is_autocommit() {
                    let _ = c.execute_batch("ROLLBACK");
                }
                r
            })
            .await?;
        self.give(conn);
        r
    }

    async fn rollback(&self, r: Rollback) -> Result<u64, MetaError> {
        self.write(move |tx| {
            let name = format!("{}/{}", r.user, r.parcel);
            let p = parcel_row(tx, &r.user, &r.parcel)?;
            match (&r.lock_id, p.lock.clone()) {
                (Some(id), _) => p.check_lock(id)?,
                (None, Some(lock)) => return Err(MetaError::Locked { parcel: name, lock }),
                (None, None) => {}
            }
            let (vid, manifest): (i64, Vec<u8>) = tx
                .query_row(
                    "SELECT id, manifest FROM versions WHERE parcel_id = ?1 AND number = ?2",
                    params![p.id, r.version as i64],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?
                .ok_or(MetaError::NoSuchVersion { parcel: name, version: r.version })?;
            let keyrings = {
                let mut st = tx.prepare("SELECT hash FROM version_keyrings WHERE version_id = ?1")?;
                let hashes = st.query_map([vid], |row| row.get::<_, Vec<u8>>(0))?;
                hashes.map(|h| tag_of(h?)).collect::<Result<Vec<_>, MetaError>>()?
            };
            let number = p.head + 1;
            let comment = format!("rollback to version {}", r.version);
            insert_version(tx, p.id, number, (&manifest, &r.client, &comment, 0, r.now_unix), &keyrings)?;
            Ok(number)
        })
        .await
    }

    async fn prune(&self, user: &str, parcel: &str, keep: u64) -> Result<PruneStats, MetaError> {
        if keep == 0 {
            return Err(MetaError::Invalid("--keep must be at least 1 (the head is never pruned)".into()));
        }
        let (user, parcel) = (user.to_owned(), parcel.to_owned());
        self.write(move |tx| {
            let p = parcel_row(tx, &user, &parcel)?;
            let doomed: Vec<i64> = {
                let mut st = tx.prepare(
                    "SELECT id FROM versions WHERE parcel_id = ?1 ORDER BY number DESC LIMIT -1 OFFSET ?2",
                )?;
                let rows = st.query_map(params![p.id, keep as i64], |r| r.get(0))?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            let mut hashes: HashSet<Vec<u8>> = HashSet::new();
            for vid in &doomed {
                let mut st = tx.prepare_cached("SELECT hash FROM version_keyrings WHERE version_id = ?1")?;
                for h in st.query_map([vid], |r| r.get::<_, Vec<u8>>(0))? {
                    hashes.insert(h?);
                }
                tx.execute("DELETE FROM versions WHERE id = ?1", [vid])?;
            }
            let mut keyrings_deleted = 0;
            for h in hashes {
                keyrings_deleted += tx.execute(
                    "DELETE FROM keyrings WHERE parcel_id = ?1 AND hash = ?2 AND NOT EXISTS
                       (SELECT 1 FROM version_keyrings WHERE parcel_id = ?1 AND hash = ?2)",
                    params![p.id, h],
                )? as u64;
            }
            Ok(PruneStats { versions_deleted: doomed.len() as u64, keyrings_deleted })
        })
        .await
    }

    async fn referenced_keyrings(&self) -> Result<Vec<(String, String, Tag)>, MetaError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT DISTINCT u.name, p.name, vk.hash FROM version_keyrings vk
                 JOIN parcels p ON p.id = vk.parcel_id JOIN users u ON u.id = p.user_id
                 ORDER BY u.name, p.name",
            )?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, Vec<u8>>(2)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (u, p, h) = row?;
                out.push((u, p, tag_of(h)?));
            }
            Ok(out)
        })
        .await
    }

    async fn purge_unreferenced_keyrings(&self, before_unix: i64) -> Result<u64, MetaError> {
        self.write(move |tx| {
            Ok(tx.execute(
                "DELETE FROM keyrings WHERE created_unix < ?1 AND NOT EXISTS
                   (SELECT 1 FROM version_keyrings vk WHERE vk.parcel_id = keyrings.parcel_id
                      AND vk.hash = keyrings.hash)",
                [before_unix],
            )? as u64)
        })
        .await
    }

    async fn gc_mark(&self) -> Result<GcMark, MetaError> {
        self.with(|c| {
            // One read transaction: a consistent snapshot of versions and their keyrings.
            let tx = c.transaction()?;
            let mut mark = GcMark::default();
            {
                let mut st = tx.prepare("SELECT id FROM versions")?;
                for id in st.query_map([], |r| r.get::<_, i64>(0))? {
                    mark.versions_seen.insert(id?);
                }
                let mut st = tx.prepare(
                    "SELECT k.hash, k.data FROM keyrings k WHERE EXISTS
                       (SELECT 1 FROM version_keyrings vk WHERE vk.parcel_id = k.parcel_id AND vk.hash = k.hash)",
                )?;
                let mut rows = st.query([])?;
                while let Some(r) = rows.next()? {
                    let hash = tag_of(r.get(0)?)?;
                    let data: Vec<u8> = r.get(1)?;
                    let tags = KeyringTags::parse(&data)
                        .map_err(|e| MetaError::BadKeyring { hash, reason: e.to_string() })?;
                    mark.referenced.extend(tags.stored_tags().copied());
                }
            }
            tx.commit()?;
            Ok(mark)
        })
        .await
    }

    async fn gc_sweep(
        &self,
        mark: &GcMark,
        candidates: Vec<Tag>,
        sweeper: &dyn ChunkSweeper,
    ) -> Result<Vec<Tag>, MetaError> {
        let conn = self.take()?;
        let seen = mark.versions_seen.clone();
        let (conn, checked) = self
            .run(conn, move |c| {
                in_open_tx(c, |c| {
                    let new: Vec<i64> = {
                        let mut st = c.prepare("SELECT id FROM versions")?;
                        let ids = st.query_map([], |r| r.get::<_, i64>(0))?;
                        ids.filter(|id| !id.as_ref().is_ok_and(|id| seen.contains(id)))
                            .collect::<Result<Vec<_>, _>>()?
                    };
                    let mut referenced = HashSet::new();
                    for vid in new {
                        version_tags(c, vid, &mut referenced)?;
                    }
                    Ok(candidates.into_iter().filter(|t| !referenced.contains(t)).collect::<Vec<_>>())
                })
            })
            .await?;
        let doomed = match checked {
            Ok(d) => d,
            Err(e) => {
                self.give(conn);
                return Err(e);
            }
        };
        let r = sweeper.delete(doomed.clone()).await;
        self.rollback_and_give(conn).await;
        r.map(|()| doomed)
    }
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
