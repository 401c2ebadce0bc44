//! [`MetaStore`] on an embedded SQLite database (WAL mode, `synchronous=FULL`).
//!
//! Several processes may open the same file (a `serve` and an administrator's `gc`): every write transaction
//! is `BEGIN IMMEDIATE`, which SQLite serializes across processes, and waits up to a minute for another
//! writer. So every [`rules::GcExclusion`] is simply a write transaction: a commit's chunk check and a gc
//! sweep batch each hold one, which is what makes them mutually exclusive.
//!
//! The store's methods, rules and statements are [`crate::meta_tx`], [`crate::rules`] and [`crate::sql`];
//! this module is the connection pool, the transactions (each step on the blocking thread pool) and the
//! rusqlite calls.

use crate::meta::*;
use crate::meta_tx::{Arg, Backend, MetaTx, RowLock, Rows, Value, Values};
use crate::rules;
use crate::sql::{self, Dialect};
use async_trait::async_trait;
use isr_format::Tag;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params_from_iter, Connection};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Pool = Arc<Mutex<Vec<Connection>>>;

/// Creates what a database lacks (tables, the columns added after the first release, indexes) in one write
/// transaction, so two processes opening an old database at once do not both add them.
fn migrate(conn: &mut Connection) -> Result<(), MetaError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(&sql::tables(Dialect::Sqlite))?;
    for (table, column, decl) in sql::added_columns(Dialect::Sqlite) {
        let present: bool = tx
            .prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?
            .exists([column])?;
        if !present {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    tx.execute_batch(sql::indexes())?;
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
    pool: Pool,
}

fn open_conn(path: &Path) -> Result<Connection, MetaError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(60))?;
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
    Ok(conn)
}

impl SqliteMetaStore {
    /// Opens (creating if needed) the database at `path`, private to its owner (mode 0600), and adds
    /// columns an older database lacks.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, MetaError> {
        let path = path.into();
        make_private(&path)?;
        let mut conn = open_conn(&path)?;
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
}

/// Returns a connection to the pool. One still inside a transaction (an error path that could not roll
/// back, a cancelled request) is closed instead, which rolls the transaction back.
fn give(pool: &Pool, conn: Connection) {
    if !conn.is_autocommit() {
        return;
    }
    if let Ok(mut p) = pool.lock() {
        if p.len() < POOL_IDLE {
            p.push(conn);
        }
    }
}

impl rusqlite::ToSql for Arg {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Arg::Int(v) => ToSqlOutput::from(*v),
            Arg::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Arg::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Arg::NullText | Arg::NullBlob => ToSqlOutput::Owned(rusqlite::types::Value::Null),
        })
    }
}

/// One row as [`Values`].
fn values(r: &rusqlite::Row<'_>, columns: usize) -> Result<Values, MetaError> {
    (0..columns)
        .map(|i| {
            Ok(match r.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(v) => Value::Int(v),
                ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                ValueRef::Real(v) => {
                    return Err(MetaError::Database(format!("unexpected real column {i}: {v}")))
                }
            })
        })
        .collect::<Result<Vec<_>, MetaError>>()
        .map(Values)
}

/// A transaction (or, for [`TxKind::Each`], a pooled connection) whose every step runs on the blocking thread
/// pool. Dropped unfinished, its connection is closed, which rolls back.
pub(crate) struct SqliteTx {
    pool: Pool,
    /// Out while a step runs; gone if a step's task failed.
    conn: Option<Connection>,
}

impl SqliteTx {
    /// Runs `f` on the connection on the blocking thread pool.
    async fn step<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> Result<T, MetaError> + Send + 'static,
    ) -> Result<T, MetaError> {
        let mut conn = self
            .conn
            .take()
            .ok_or_else(|| MetaError::Database("connection lost by an earlier step".into()))?;
        let (conn, r) = tokio::task::spawn_blocking(move || {
            let r = f(&mut conn);
            (conn, r)
        })
        .await
        .map_err(|e| MetaError::Database(format!("database task failed: {e}")))?;
        self.conn = Some(conn);
        r
    }
}

impl Drop for SqliteTx {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            give(&self.pool, c);
        }
    }
}

#[async_trait]
impl MetaTx for SqliteTx {
    async fn exec(&mut self, sql: &'static str, args: Vec<Arg>) -> Result<u64, MetaError> {
        self.step(move |c| {
            Ok(c.prepare_cached(&Dialect::Sqlite.render(sql))?.execute(params_from_iter(args.iter()))? as u64)
        })
        .await
    }

    /// No row locks: a write transaction already excludes every other writer.
    async fn query(&mut self, sql: &'static str, _: Option<RowLock>, args: Vec<Arg>) -> Rows {
        self.step(move |c| {
            let mut st = c.prepare_cached(&Dialect::Sqlite.render(sql))?;
            let columns = st.column_count();
            let mut rows = st.query(params_from_iter(args.iter()))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(values(r, columns)?);
            }
            Ok(out)
        })
        .await
    }

    /// Parsed on the blocking thread, one keyring in memory at a time.
    async fn keyring_tags(&mut self, sql: &'static str, args: Vec<Arg>) -> Result<HashSet<Tag>, MetaError> {
        self.step(move |c| {
            let mut st = c.prepare_cached(&Dialect::Sqlite.render(sql))?;
            let mut rows = st.query(params_from_iter(args.iter()))?;
            let mut tags = HashSet::new();
            while let Some(r) = rows.next()? {
                let hash = sql::tag(&r.get::<_, Vec<u8>>(0)?)?;
                rules::keyring_tags(hash, &r.get::<_, Vec<u8>>(1)?, &mut tags)?;
            }
            Ok(tags)
        })
        .await
    }

    /// SQLite knows by itself whether a transaction is open.
    async fn control(&mut self, sql: &'static str, _: bool) -> Result<(), MetaError> {
        self.step(move |c| Ok(c.execute_batch(sql)?)).await
    }

    fn is_open(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| !c.is_autocommit())
    }
}

#[async_trait]
impl Backend for SqliteMetaStore {
    type Tx = SqliteTx;
    const DIALECT: Dialect = Dialect::Sqlite;

    async fn connect(&self) -> Result<SqliteTx, MetaError> {
        Ok(SqliteTx { pool: self.pool.clone(), conn: Some(self.take()?) })
    }

    /// Nothing beyond `BEGIN IMMEDIATE`, which excludes every other writer.
    async fn exclude_gc(&self, _: &mut SqliteTx, _: rules::GcExclusion) -> Result<(), MetaError> {
        Ok(())
    }
}
