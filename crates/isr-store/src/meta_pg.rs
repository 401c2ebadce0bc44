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
//!
//! The store's methods, rules and statements are [`crate::meta_tx`], [`crate::rules`] and [`crate::sql`];
//! this module is the pool, the transactions, the row locks and the `gc_lock` row.

use crate::meta::*;
use crate::meta_tx::{Arg, Backend, MetaTx, RowLock, Rows, Value, Values};
use crate::rules::{self, GcExclusion};
use crate::sql::{self, Dialect};
use async_trait::async_trait;
use futures::{pin_mut, TryStreamExt};
use isr_format::Tag;
use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, Row};

/// At most this many connections per [`PgMetaStore`] (requests beyond wait for one).
pub const PG_MAX_CONNECTIONS: usize = 16;
/// Idle connections kept for reuse.
const POOL_IDLE: usize = 8;
/// Key of the advisory lock that serializes schema creation between processes.
const SCHEMA_LOCK_KEY: i64 = 0x4953_525f_5343_4831; // "ISR_SCH1"

/// The schema in PostgreSQL's dialect: the shared tables, the columns added since (`ADD COLUMN IF NOT EXISTS`
/// migrates older databases), the `gc_lock` row of the commit/sweep exclusion, the shared indexes.
fn schema() -> String {
    let mut s = sql::tables(Dialect::Postgres);
    for (table, column, decl) in sql::added_columns(Dialect::Postgres) {
        s.push_str(&format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {decl};\n"));
    }
    s.push_str("CREATE TABLE IF NOT EXISTS gc_lock (id INTEGER PRIMARY KEY CHECK (id = 1));\n");
    s.push_str("INSERT INTO gc_lock (id) VALUES (1) ON CONFLICT DO NOTHING;\n");
    s.push_str(sql::indexes());
    s
}

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

/// A parameter as tokio-postgres binds it (a NULL as the type its column has).
fn pg_arg(a: &Arg) -> &(dyn ToSql + Sync) {
    static NULL_TEXT: Option<&str> = None;
    static NULL_BLOB: Option<&[u8]> = None;
    match a {
        Arg::Int(v) => v,
        Arg::Text(s) => s,
        Arg::Blob(b) => b,
        Arg::NullText => &NULL_TEXT,
        Arg::NullBlob => &NULL_BLOB,
    }
}

/// One row as [`Values`], by the types of its columns.
fn values(row: &Row) -> Result<Values, MetaError> {
    let mut out = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let ty = col.type_();
        let v = if *ty == Type::INT8 {
            row.try_get::<_, Option<i64>>(i)?.map(Value::Int)
        } else if *ty == Type::INT4 {
            row.try_get::<_, Option<i32>>(i)?.map(|v| Value::Int(v.into()))
        } else if *ty == Type::TEXT || *ty == Type::VARCHAR {
            row.try_get::<_, Option<String>>(i)?.map(Value::Text)
        } else if *ty == Type::BYTEA {
            row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob)
        } else {
            return Err(MetaError::Database(format!("unexpected column type {ty} ({i})")));
        };
        out.push(v.unwrap_or(Value::Null));
    }
    Ok(Values(out))
}

/// A transaction (or, for [`TxKind::Each`], a pooled connection). Dropped unfinished (a cancelled request),
/// its connection is closed rather than pooled, which rolls the transaction back.
pub(crate) struct PgTx {
    conn: Conn,
    open: bool,
}

impl Drop for PgTx {
    fn drop(&mut self) {
        if self.open {
            self.conn.client.take();
        }
    }
}

#[async_trait]
impl MetaTx for PgTx {
    async fn exec(&mut self, sql: &'static str, args: Vec<Arg>) -> Result<u64, MetaError> {
        let params: Vec<_> = args.iter().map(pg_arg).collect();
        Ok(self.conn.client().execute(sql, &params).await?)
    }

    async fn query(&mut self, sql: &'static str, lock: Option<RowLock>, args: Vec<Arg>) -> Rows {
        let sql = match lock {
            None => sql.to_owned(),
            Some(RowLock::Share) => format!("{sql} FOR SHARE"),
            Some(RowLock::UpdateOf(table)) => format!("{sql} FOR UPDATE OF {table}"),
        };
        let params: Vec<_> = args.iter().map(pg_arg).collect();
        self.conn.client().query(&sql, &params).await?.iter().map(values).collect()
    }

    /// Streamed: one keyring in memory at a time.
    async fn keyring_tags(&mut self, sql: &'static str, args: Vec<Arg>) -> Result<HashSet<Tag>, MetaError> {
        let rows = self.conn.client().query_raw(sql, args.iter().map(pg_arg)).await?;
        pin_mut!(rows);
        let mut tags = HashSet::new();
        while let Some(row) = rows.try_next().await? {
            rules::keyring_tags(sql::tag(row.try_get(0)?)?, row.try_get(1)?, &mut tags)?;
        }
        Ok(tags)
    }

    /// Open from before `BEGIN` is sent: a request cancelled meanwhile leaves no doubt for the pool.
    async fn control(&mut self, sql: &'static str, open_after: bool) -> Result<(), MetaError> {
        self.open = true;
        self.conn.client().batch_execute(sql).await?;
        self.open = open_after;
        Ok(())
    }

    fn is_open(&self) -> bool {
        self.open
    }
}

#[async_trait]
impl Backend for PgMetaStore {
    type Tx = PgTx;
    /// Statements of [`crate::sql`] are written in this dialect: they need no rendering.
    const DIALECT: Dialect = Dialect::Postgres;

    async fn connect(&self) -> Result<PgTx, MetaError> {
        Ok(PgTx { conn: self.conn().await?, open: false })
    }

    /// The `gc_lock` row, `FOR SHARE` or `FOR UPDATE`, first in the transaction (lock order: `gc_lock`, then
    /// parcel rows).
    async fn exclude_gc(&self, tx: &mut PgTx, how: GcExclusion) -> Result<(), MetaError> {
        let sql = match how {
            GcExclusion::Exclusive => "SELECT id FROM gc_lock WHERE id = 1 FOR UPDATE",
            GcExclusion::Shared => "SELECT id FROM gc_lock WHERE id = 1 FOR SHARE",
        };
        tx.conn.client().query_one(sql, &[]).await?;
        Ok(())
    }
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
        tx.batch_execute(&schema()).await?;
        tx.commit().await?;
        Ok(store)
    }

    async fn conn(&self) -> Result<Conn, MetaError> {
        self.pool.get().await
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
