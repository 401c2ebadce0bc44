//! The one implementation of [`MetaStore`]: every method written once, as the statements of [`crate::sql`]
//! and the decisions of [`crate::rules`], over a small transaction interface ([`Backend`], [`MetaTx`]) that
//! each backend implements with its own connections and locking ([`crate::SqliteMetaStore`],
//! [`crate::PgMetaStore`]).

use crate::meta::*;
use crate::rules::{self, Acquire, GcExclusion, ParcelRow, Release};
use crate::sql::{self, Columns, Dialect};
use async_trait::async_trait;
use bytes::Bytes;
use isr_format::Tag;
use std::collections::HashSet;

/// A statement parameter. NULLs carry their type (PostgreSQL checks a parameter's type even when NULL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Arg {
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
    NullText,
    NullBlob,
}

impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}
impl From<&str> for Arg {
    fn from(v: &str) -> Self {
        Arg::Text(v.to_owned())
    }
}
impl From<&String> for Arg {
    fn from(v: &String) -> Self {
        Arg::Text(v.clone())
    }
}
impl From<&[u8]> for Arg {
    fn from(v: &[u8]) -> Self {
        Arg::Blob(v.to_vec())
    }
}
impl From<&Vec<u8>> for Arg {
    fn from(v: &Vec<u8>) -> Self {
        Arg::Blob(v.clone())
    }
}
impl From<&Tag> for Arg {
    fn from(v: &Tag) -> Self {
        Arg::Blob(v.0.to_vec())
    }
}
impl From<Option<&str>> for Arg {
    fn from(v: Option<&str>) -> Self {
        v.map_or(Arg::NullText, Arg::from)
    }
}
impl From<&Option<Vec<u8>>> for Arg {
    fn from(v: &Option<Vec<u8>>) -> Self {
        v.as_ref().map_or(Arg::NullBlob, Arg::from)
    }
}

/// The parameters of a statement.
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$(Arg::from($a)),*] };
}

/// A column value as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

/// A result row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Values(pub Vec<Value>);

impl Values {
    fn at(&self, i: usize) -> Result<&Value, MetaError> {
        self.0.get(i).ok_or_else(|| MetaError::Database(format!("no column {i} in the row")))
    }

    fn wrong(i: usize, want: &str, got: &Value) -> MetaError {
        MetaError::Database(format!("column {i}: expected {want}, found {got:?}"))
    }
}

impl Columns for Values {
    fn int(&self, i: usize) -> Result<i64, MetaError> {
        self.opt_int(i)?.ok_or_else(|| Values::wrong(i, "an integer", &Value::Null))
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, MetaError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            other => Err(Values::wrong(i, "an integer", other)),
        }
    }
    fn text(&self, i: usize) -> Result<String, MetaError> {
        self.opt_text(i)?.ok_or_else(|| Values::wrong(i, "text", &Value::Null))
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, MetaError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Text(v) => Ok(Some(v.clone())),
            other => Err(Values::wrong(i, "text", other)),
        }
    }
    fn blob(&self, i: usize) -> Result<Vec<u8>, MetaError> {
        self.opt_blob(i)?.ok_or_else(|| Values::wrong(i, "bytes", &Value::Null))
    }
    fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>, MetaError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Blob(v) => Ok(Some(v.clone())),
            other => Err(Values::wrong(i, "bytes", other)),
        }
    }
}

/// How a transaction begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TxKind {
    /// No transaction: each statement on its own (reads of one row, single-statement writes).
    Each,
    /// A read-only transaction: every statement sees one snapshot.
    Snapshot,
    /// A write transaction, holding the gc exclusion from its start when given.
    Write(Option<GcExclusion>),
}

/// A row lock a query takes until its transaction ends, where the backend locks rows (PostgreSQL; SQLite's
/// write transactions exclude every other writer anyway).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowLock {
    /// `FOR SHARE`: the rows cannot change or go.
    Share,
    /// `FOR UPDATE OF` this table alias: the rows are this transaction's to change.
    UpdateOf(&'static str),
}

/// Rows read.
pub(crate) type Rows = Result<Vec<Values>, MetaError>;

/// One transaction of a backend (or, for [`TxKind::Each`], its connection).
#[async_trait]
pub(crate) trait MetaTx: Send {
    /// Runs a statement of [`crate::sql`]; the number of rows it changed.
    async fn exec(&mut self, sql: &'static str, args: Vec<Arg>) -> Result<u64, MetaError>;
    /// The rows of a query of [`crate::sql`], with `lock` on them.
    async fn query(&mut self, sql: &'static str, lock: Option<RowLock>, args: Vec<Arg>) -> Rows;
    /// The chunk tags of the keyrings that a (hash, bytes) query returns, without holding every keyring at
    /// once.
    async fn keyring_tags(&mut self, sql: &'static str, args: Vec<Arg>) -> Result<HashSet<Tag>, MetaError>;
    /// Runs `BEGIN ...`, `COMMIT` or `ROLLBACK`; a transaction is open after it when `open_after` (and
    /// counts as open while it runs).
    async fn control(&mut self, sql: &'static str, open_after: bool) -> Result<(), MetaError>;
    /// Whether a transaction is open (a connection dropped while one is, is closed rather than pooled).
    fn is_open(&self) -> bool;
}

/// A metadata database: its connections and its side of the gc exclusion.
#[async_trait]
pub(crate) trait Backend: Send + Sync + std::fmt::Debug + 'static {
    type Tx: MetaTx;
    const DIALECT: Dialect;
    /// A pooled connection, outside any transaction.
    async fn connect(&self) -> Result<Self::Tx, MetaError>;
    /// Takes the gc exclusion, right after `BEGIN` (before any row of the transaction).
    async fn exclude_gc(&self, tx: &mut Self::Tx, how: GcExclusion) -> Result<(), MetaError>;
}

/// Begins a transaction of `kind`.
async fn begin<B: Backend>(b: &B, kind: TxKind) -> Result<B::Tx, MetaError> {
    let mut tx = b.connect().await?;
    if let Some(sql) = B::DIALECT.begin(kind) {
        tx.control(sql, true).await?;
    }
    if let TxKind::Write(Some(how)) = kind {
        b.exclude_gc(&mut tx, how).await?;
    }
    Ok(tx)
}

/// Ends `tx` by the outcome of what ran in it: committed if it succeeded, rolled back if not (the error is
/// the one returned; a failed rollback ends the connection, which rolls back too).
async fn finish<T: MetaTx, R>(mut tx: T, r: Result<R, MetaError>) -> Result<R, MetaError> {
    if !tx.is_open() {
        return r;
    }
    match r {
        Ok(v) => tx.control("COMMIT", false).await.map(|()| v),
        Err(e) => {
            let _ = tx.control("ROLLBACK", false).await;
            Err(e)
        }
    }
}

/// The first row of a query, if any, decoded by `f`.
async fn first<T: MetaTx + ?Sized, R>(
    tx: &mut T,
    stmt: &'static str,
    lock: Option<RowLock>,
    args: Vec<Arg>,
    f: impl FnOnce(&dyn Columns) -> Result<R, MetaError> + Send,
) -> Result<Option<R>, MetaError> {
    tx.query(stmt, lock, args).await?.first().map(|r| f(r)).transpose()
}

/// Every row of a query, decoded by `f`.
async fn all<T: MetaTx + ?Sized, R>(
    tx: &mut T,
    stmt: &'static str,
    args: Vec<Arg>,
    f: impl FnMut(&dyn Columns) -> Result<R, MetaError> + Send,
) -> Result<Vec<R>, MetaError> {
    let mut f = f;
    tx.query(stmt, None, args).await?.iter().map(|r| f(r)).collect()
}

/// A statement on its own.
async fn exec_each<B: Backend>(b: &B, stmt: &'static str, args: Vec<Arg>) -> Result<u64, MetaError> {
    let mut tx = begin(b, TxKind::Each).await?;
    let r = tx.exec(stmt, args).await;
    finish(tx, r).await
}

/// The first row of a query on its own (of those that return at most one).
async fn first_each<B: Backend, R>(
    b: &B,
    stmt: &'static str,
    args: Vec<Arg>,
    f: impl FnMut(&dyn Columns) -> Result<R, MetaError> + Send,
) -> Result<Option<R>, MetaError> {
    Ok(all_each(b, stmt, args, f).await?.into_iter().next())
}

/// Every row of a query on its own.
async fn all_each<B: Backend, R>(
    b: &B,
    stmt: &'static str,
    args: Vec<Arg>,
    f: impl FnMut(&dyn Columns) -> Result<R, MetaError> + Send,
) -> Result<Vec<R>, MetaError> {
    let mut tx = begin(b, TxKind::Each).await?;
    let r = all(&mut tx, stmt, args, f).await;
    finish(tx, r).await
}

/// A parcel's row; with `lock`, the parcel is this transaction's until it ends.
async fn parcel_row<T: MetaTx + ?Sized>(
    tx: &mut T,
    user: &str,
    parcel: &str,
    lock: bool,
) -> Result<ParcelRow, MetaError> {
    let lock = lock.then_some(RowLock::UpdateOf("p"));
    first(tx, sql::PARCEL_ROW, lock, args![user, parcel], |r| sql::parcel_row(r, user, parcel))
        .await?
        .ok_or_else(|| MetaError::NoSuchParcel(format!("{user}/{parcel}")))
}

/// The keyring hashes one version references.
async fn version_keyrings<T: MetaTx + ?Sized>(tx: &mut T, version_id: i64) -> Result<Vec<Tag>, MetaError> {
    all(tx, sql::VERSION_KEYRING_HASHES, args![version_id], |r| sql::tag(&r.blob(0)?)).await
}

/// A new version row: manifest, client, comment, bytes uploaded, time.
struct VersionFields<'a> {
    manifest: &'a [u8],
    client: &'a str,
    comment: &'a str,
    bytes_uploaded: u64,
    now_unix: i64,
}

/// Adds version `number` of parcel `parcel_id` with its keyrings and makes it the head.
async fn insert_version<T: MetaTx + ?Sized>(
    tx: &mut T,
    parcel_id: i64,
    number: u64,
    v: VersionFields<'_>,
    keyrings: &[Tag],
) -> Result<(), MetaError> {
    let number = sql::number(number);
    let row = args![parcel_id, number, v.now_unix, v.client, v.bytes_uploaded as i64, v.comment, v.manifest];
    let vid = first(tx, sql::INSERT_VERSION, None, row, |r| r.int(0))
        .await?
        .ok_or_else(|| MetaError::Database("INSERT ... RETURNING gave no row".into()))?;
    for k in rules::distinct_keyrings(keyrings) {
        tx.exec(sql::INSERT_VERSION_KEYRING, args![vid, parcel_id, &k]).await?;
    }
    tx.exec(sql::SET_HEAD, args![parcel_id, number]).await?;
    Ok(())
}

#[async_trait]
impl<B: Backend> MetaStore for B {
    async fn setting_or_init(&self, key: &str, init: String) -> Result<String, MetaError> {
        // Two statements: the insert waits for a concurrent insert of the same key to commit, and the select
        // then sees whichever value won.
        exec_each(self, sql::SETTING_INIT, args![key, &init]).await?;
        first_each(self, sql::SETTING, args![key], |r| r.text(0))
            .await?
            .ok_or_else(|| MetaError::Database(format!("setting {key} vanished")))
    }

    async fn setting(&self, key: &str) -> Result<Option<String>, MetaError> {
        first_each(self, sql::SETTING, args![key], |r| r.text(0)).await
    }

    async fn add_user(&self, name: &str, login_hash: &str, now_unix: i64) -> Result<(), MetaError> {
        let n = exec_each(self, sql::ADD_USER, args![name, login_hash, now_unix]).await?;
        sql::changed(n, || MetaError::UserExists(name.to_owned()))
    }

    async fn set_login_hash(&self, name: &str, login_hash: &str) -> Result<(), MetaError> {
        let n = exec_each(self, sql::SET_LOGIN_HASH, args![name, login_hash]).await?;
        sql::changed(n, || MetaError::NoSuchUser(name.to_owned()))
    }

    async fn remove_user(&self, name: &str) -> Result<(), MetaError> {
        let n = exec_each(self, sql::REMOVE_USER, args![name]).await?;
        sql::changed(n, || MetaError::NoSuchUser(name.to_owned()))
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>, MetaError> {
        all_each(self, sql::LIST_USERS, args![], sql::user_record).await
    }

    async fn user(&self, name: &str) -> Result<Option<UserRecord>, MetaError> {
        first_each(self, sql::USER, args![name], sql::user_record).await
    }

    async fn login_failures(&self, name: &str) -> Result<LoginFailures, MetaError> {
        Ok(first_each(self, sql::LOGIN_FAILURES, args![name], sql::login_failures).await?.unwrap_or_default())
    }

    async fn record_login_failure(&self, name: &str, now_unix: i64) -> Result<u32, MetaError> {
        let n = first_each(self, sql::RECORD_LOGIN_FAILURE, args![name, now_unix], |r| r.int(0)).await?;
        Ok(n.unwrap_or(0) as u32)
    }

    async fn reserve_login_attempt(
        &self,
        name: &str,
        seen: LoginFailures,
        now_unix: i64,
    ) -> Result<bool, MetaError> {
        let row = args![name, i64::from(seen.count), seen.last_unix, now_unix];
        Ok(exec_each(self, sql::RESERVE_LOGIN_ATTEMPT, row).await? == 1)
    }

    async fn clear_login_failures(&self, name: &str) -> Result<(), MetaError> {
        exec_each(self, sql::CLEAR_LOGIN_FAILURES, args![name]).await.map(drop)
    }

    async fn add_token(&self, token_hash: [u8; 32], user: &str, expires_unix: i64) -> Result<(), MetaError> {
        let n = exec_each(self, sql::ADD_TOKEN, args![&token_hash[..], user, expires_unix]).await?;
        sql::changed(n, || MetaError::NoSuchUser(user.to_owned()))
    }

    async fn token(&self, token_hash: [u8; 32], now_unix: i64) -> Result<Option<(String, i64)>, MetaError> {
        first_each(self, sql::TOKEN, args![&token_hash[..], now_unix], sql::token).await
    }

    async fn purge_expired_tokens(&self, now_unix: i64) -> Result<u64, MetaError> {
        exec_each(self, sql::PURGE_EXPIRED_TOKENS, args![now_unix]).await
    }

    async fn list_parcels(&self, user: Option<&str>) -> Result<Vec<ParcelInfo>, MetaError> {
        all_each(self, sql::LIST_PARCELS, args![user], sql::parcel_info).await
    }

    async fn parcel(&self, user: &str, parcel: &str) -> Result<ParcelDetail, MetaError> {
        first_each(self, sql::PARCEL_DETAIL, args![user, parcel], |r| sql::parcel_detail(r, user, parcel))
            .await?
            .ok_or_else(|| MetaError::NoSuchParcel(format!("{user}/{parcel}")))
    }

    async fn create_parcel(&self, p: NewParcel) -> Result<(), MetaError> {
        let mut tx = begin(self, TxKind::Write(None)).await?;
        let r = async {
            // The user's row shared: the user stays until the parcel is created.
            let uid = first(&mut tx, sql::USER_ID, Some(RowLock::Share), args![&p.user], |r| r.int(0))
                .await?
                .ok_or_else(|| MetaError::NoSuchUser(p.user.clone()))?;
            let l = &p.lock;
            let row = args![
                uid,
                &p.name,
                p.now_unix,
                &p.wrapped_keyroot,
                &p.recovery_keyroot,
                &l.lock_id,
                &l.holder,
                &l.client_id,
                l.since_unix,
            ];
            let n = tx.exec(sql::CREATE_PARCEL, row).await?;
            sql::changed(n, || MetaError::ParcelExists(format!("{}/{}", p.user, p.name)))
        }
        .await;
        finish(tx, r).await
    }

    async fn set_wrapped_keyroot(&self, user: &str, parcel: &str, wrapped: &[u8]) -> Result<(), MetaError> {
        let n = exec_each(self, sql::SET_WRAPPED_KEYROOT, args![user, parcel, wrapped]).await?;
        sql::changed(n, || MetaError::NoSuchParcel(format!("{user}/{parcel}")))
    }

    async fn set_network_policy(
        &self,
        user: &str,
        parcel: &str,
        policy: Option<NetworkPolicy>,
    ) -> Result<(), MetaError> {
        let row = args![user, parcel, policy.map(NetworkPolicy::as_str)];
        let n = exec_each(self, sql::SET_NETWORK_POLICY, row).await?;
        sql::changed(n, || MetaError::NoSuchParcel(format!("{user}/{parcel}")))
    }

    async fn delete_parcel(
        &self,
        user: &str,
        parcel: &str,
        client_id: Option<&str>,
    ) -> Result<(), MetaError> {
        let mut tx = begin(self, TxKind::Write(None)).await?;
        let r = async {
            let p = parcel_row(&mut tx, user, parcel, true).await?;
            rules::delete(&p, client_id)?;
            tx.exec(sql::DELETE_PARCEL, args![p.id]).await.map(drop)
        }
        .await;
        finish(tx, r).await
    }

    async fn acquire_lock(&self, user: &str, parcel: &str, lock: LockInfo) -> Result<LockInfo, MetaError> {
        let mut tx = begin(self, TxKind::Write(None)).await?;
        let r = async {
            let p = parcel_row(&mut tx, user, parcel, true).await?;
            let decision = rules::acquire(&p, lock)?;
            if let Acquire::Take(l) = &decision {
                let row = args![p.id, &l.lock_id, &l.holder, &l.client_id, l.since_unix];
                tx.exec(sql::SET_LOCK, row).await?;
            }
            Ok(decision.lock())
        }
        .await;
        finish(tx, r).await
    }

    async fn release_lock(&self, user: &str, parcel: &str, how: LockRelease) -> Result<(), MetaError> {
        let mut tx = begin(self, TxKind::Write(None)).await?;
        let r = async {
            let p = parcel_row(&mut tx, user, parcel, true).await?;
            let Release::Clear { broken } = rules::release(&p, &how)? else { return Ok(()) };
            if let Some(b) = broken {
                tx.exec(sql::RECORD_BREAK, args![p.id, &b.lock_id, &b.by, b.unix]).await?;
            }
            tx.exec(sql::CLEAR_LOCK, args![p.id]).await.map(drop)
        }
        .await;
        finish(tx, r).await
    }

    async fn confirm_lock(&self, user: &str, parcel: &str, lock_id: &str) -> Result<LockInfo, MetaError> {
        let mut tx = begin(self, TxKind::Each).await?;
        let r = parcel_row(&mut tx, user, parcel, false).await;
        finish(tx, r).await?.confirm(lock_id)
    }

    async fn broken_lock(&self, user: &str, parcel: &str) -> Result<Option<BrokenLock>, MetaError> {
        let mut tx = begin(self, TxKind::Each).await?;
        let r = parcel_row(&mut tx, user, parcel, false).await;
        Ok(finish(tx, r).await?.broken)
    }

    async fn locks_held(&self) -> Result<u64, MetaError> {
        Ok(first_each(self, sql::LOCKS_HELD, args![], |r| r.int(0)).await?.unwrap_or(0) as u64)
    }

    async fn put_keyring(
        &self,
        user: &str,
        parcel: &str,
        lock_id: &str,
        hash: Tag,
        data: Bytes,
    ) -> Result<bool, MetaError> {
        let now = now_unix();
        let mut tx = begin(self, TxKind::Write(None)).await?;
        let r = async {
            // The row locked: a concurrent break of the lock waits for this upload, or this upload sees it.
            let p = parcel_row(&mut tx, user, parcel, true).await?;
            p.check_lock(lock_id)?;
            let new = tx.exec(sql::INSERT_KEYRING, args![p.id, &hash, &data[..], now]).await? == 1;
            if !new {
                tx.exec(sql::REFRESH_KEYRING, args![p.id, &hash, now]).await?;
            }
            Ok(new)
        }
        .await;
        finish(tx, r).await
    }

    async fn keyring(&self, user: &str, parcel: &str, hash: Tag) -> Result<Option<Bytes>, MetaError> {
        let mut tx = begin(self, TxKind::Each).await?;
        let r = async {
            let p = parcel_row(&mut tx, user, parcel, false).await?;
            let data = first(&mut tx, sql::KEYRING, None, args![p.id, &hash], |r| r.blob(0)).await?;
            Ok(data.map(Bytes::from))
        }
        .await;
        finish(tx, r).await
    }

    async fn versions(&self, user: &str, parcel: &str) -> Result<Vec<VersionInfo>, MetaError> {
        let mut tx = begin(self, TxKind::Each).await?;
        let r = async {
            let p = parcel_row(&mut tx, user, parcel, false).await?;
            all(&mut tx, sql::VERSIONS, args![p.id], sql::version_info).await
        }
        .await;
        finish(tx, r).await
    }

    async fn manifest(&self, user: &str, parcel: &str, which: VersionSel) -> Result<(u64, Bytes), MetaError> {
        // One snapshot for the head and its manifest (a concurrent prune cannot slip between them).
        let mut tx = begin(self, TxKind::Snapshot).await?;
        let r = async {
            let p = parcel_row(&mut tx, user, parcel, false).await?;
            let number = rules::version_number(&p, which);
            let m =
                first(&mut tx, sql::MANIFEST, None, args![p.id, sql::number(number)], |r| r.blob(0)).await?;
            m.map(|m| (number, Bytes::from(m))).ok_or_else(|| rules::no_such_version(&p, number))
        }
        .await;
        finish(tx, r).await
    }

    async fn commit_version(&self, v: NewVersion, chunks: &dyn ChunkPresence) -> Result<u64, MetaError> {
        // The commit/sweep exclusion from the start (before any parcel row), held until the end: a sweep can
        // never delete a chunk between the check and the insert.
        let mut tx = begin(self, TxKind::Write(Some(rules::COMMIT))).await?;
        let r = async {
            let p = parcel_row(&mut tx, &v.user, &v.parcel, true).await?;
            rules::commit_preconditions(&p, &v.lock_id, v.base_version)?;
            let mut known = HashSet::new();
            let head = first(&mut tx, sql::VERSION_ID, None, args![p.id, sql::number(p.head)], |r| r.int(0));
            if let Some(hid) = head.await? {
                known = tx.keyring_tags(sql::VERSION_KEYRING_DATA, args![hid]).await?;
            }
            let wanted = rules::distinct_keyrings(&v.keyrings);
            let mut found = Vec::new();
            for hash in &wanted {
                // Shared: no prune can delete the keyring before this version references it.
                let lock = Some(RowLock::Share);
                if let Some(data) =
                    first(&mut tx, sql::KEYRING, lock, args![p.id, hash], |r| r.blob(0)).await?
                {
                    found.push((*hash, data));
                }
            }
            let needed = rules::chunks_needed(&wanted, found.iter().map(|(h, d)| (*h, &d[..])), &known)?;
            let missing = if chunks.indexed() {
                // In this transaction: a sweep cannot remove rows until it ends.
                let present = index_rows(&mut tx, &needed).await?;
                needed.into_iter().filter(|t| present.get(t).is_none_or(|(p, _)| !p)).collect()
            } else {
                chunks.missing(needed).await?
            };
            rules::chunks_present(missing)?;
            let number = rules::next_version(p.head);
            let fields = VersionFields {
                manifest: &v.manifest,
                client: &v.client,
                comment: &v.comment,
                bytes_uploaded: v.bytes_uploaded,
                now_unix: v.now_unix,
            };
            insert_version(&mut tx, p.id, number, fields, &v.keyrings).await?;
            Ok(number)
        }
        .await;
        finish(tx, r).await
    }

    async fn rollback(&self, r: Rollback) -> Result<u64, MetaError> {
        let mut tx = begin(self, TxKind::Write(Some(rules::ROLLBACK))).await?;
        let res = async {
            let p = parcel_row(&mut tx, &r.user, &r.parcel, true).await?;
            rules::rollback_allowed(&p, r.lock_id.as_deref())?;
            let row = args![p.id, sql::number(r.version)];
            let found =
                first(&mut tx, sql::VERSION_AND_MANIFEST, None, row, |row| Ok((row.int(0)?, row.blob(1)?)))
                    .await?;
            let (vid, manifest) = rules::rollback_source(&p, r.version, found)?;
            let keyrings = version_keyrings(&mut tx, vid).await?;
            let number = rules::next_version(p.head);
            let comment = rules::rollback_comment(r.version);
            let fields = VersionFields {
                manifest: &manifest,
                client: &r.client,
                comment: &comment,
                bytes_uploaded: 0,
                now_unix: r.now_unix,
            };
            insert_version(&mut tx, p.id, number, fields, &keyrings).await?;
            Ok(number)
        }
        .await;
        finish(tx, res).await
    }

    async fn prune(&self, user: &str, parcel: &str, keep: u64) -> Result<PruneStats, MetaError> {
        let keep = rules::prune_keep(keep)?;
        let mut tx = begin(self, TxKind::Write(None)).await?;
        let r = async {
            let p = parcel_row(&mut tx, user, parcel, true).await?;
            let versions = all(&mut tx, sql::VERSIONS_NEWEST_FIRST, args![p.id], |r| r.int(0)).await?;
            let doomed = rules::prune_doomed(versions, keep);
            let mut hashes = HashSet::new();
            for vid in &doomed {
                hashes.extend(version_keyrings(&mut tx, *vid).await?);
                tx.exec(sql::DELETE_VERSION, args![*vid]).await?;
            }
            let mut keyrings_deleted = 0;
            for h in &hashes {
                keyrings_deleted += tx.exec(sql::DELETE_KEYRING_IF_UNREFERENCED, args![p.id, h]).await?;
            }
            Ok(PruneStats { versions_deleted: doomed.len() as u64, keyrings_deleted })
        }
        .await;
        finish(tx, r).await
    }

    async fn prune_by_policy(
        &self,
        user: &str,
        parcel: &str,
        policy: &KeepPolicy,
    ) -> Result<PolicyPrune, MetaError> {
        let mut tx = begin(self, TxKind::Write(None)).await?;
        let r = async {
            let p = parcel_row(&mut tx, user, parcel, true).await?;
            let versions = all(&mut tx, sql::VERSIONS, args![p.id], sql::version_info).await?;
            let times: Vec<(u64, i64)> = versions.iter().map(|v| (v.version, v.created_unix)).collect();
            let decisions = rules::policy_doomed(policy, &times)?;
            let mut hashes = HashSet::new();
            let mut stats = PruneStats::default();
            for d in decisions.iter().filter(|d| !d.kept()) {
                let row = args![p.id, sql::number(d.version)];
                let Some(vid) = first(&mut tx, sql::VERSION_ID, None, row, |r| r.int(0)).await? else {
                    continue;
                };
                hashes.extend(version_keyrings(&mut tx, vid).await?);
                tx.exec(sql::DELETE_VERSION, args![vid]).await?;
                stats.versions_deleted += 1;
            }
            for h in &hashes {
                stats.keyrings_deleted +=
                    tx.exec(sql::DELETE_KEYRING_IF_UNREFERENCED, args![p.id, h]).await?;
            }
            Ok(PolicyPrune { decisions, stats })
        }
        .await;
        finish(tx, r).await
    }

    async fn referenced_keyrings(&self) -> Result<Vec<(String, String, Tag)>, MetaError> {
        all_each(self, sql::REFERENCED_KEYRINGS, args![], sql::referenced_keyring).await
    }

    async fn purge_unreferenced_keyrings(&self, before_unix: i64) -> Result<u64, MetaError> {
        // Exclusive: a commit in flight has checked its keyrings but not yet referenced them; wait for it,
        // then decide on what it committed.
        let mut tx = begin(self, TxKind::Write(Some(rules::PURGE_KEYRINGS))).await?;
        let r = tx.exec(sql::PURGE_UNREFERENCED_KEYRINGS, args![before_unix]).await;
        finish(tx, r).await
    }

    async fn gc_mark(&self) -> Result<GcMark, MetaError> {
        // One snapshot of versions and their keyrings.
        let mut tx = begin(self, TxKind::Snapshot).await?;
        let r = async {
            let mut mark = GcMark::default();
            mark.versions_seen.extend(all(&mut tx, sql::ALL_VERSION_IDS, args![], |r| r.int(0)).await?);
            mark.referenced = tx.keyring_tags(sql::REFERENCED_KEYRING_DATA, args![]).await?;
            Ok(mark)
        }
        .await;
        finish(tx, r).await
    }

    async fn hold_chunks(
        &self,
        user: &str,
        parcel: &str,
        lock_id: &str,
        tags: &[Tag],
        now_unix: i64,
    ) -> Result<(), MetaError> {
        // Shared with commits, exclusive of sweeps: a sweep step either sees these holds or runs before them.
        let mut tx = begin(self, TxKind::Write(Some(rules::HOLD_CHUNKS))).await?;
        let r = async {
            // The row locked: a concurrent break of the lock waits for this hold, or this hold sees it.
            let p = parcel_row(&mut tx, user, parcel, true).await?;
            p.check_lock(lock_id)?;
            for t in tags {
                tx.exec(sql::HOLD_CHUNK, args![p.id, lock_id, t, now_unix]).await?;
            }
            Ok(())
        }
        .await;
        finish(tx, r).await
    }

    async fn gc_sweep(
        &self,
        mark: &GcMark,
        candidates: Vec<Tag>,
        grace_secs: i64,
        sweeper: &dyn ChunkSweeper,
    ) -> Result<Swept, MetaError> {
        // Step 1: the verdict, and the index rows of the doomed removed (committed before any object goes).
        let now = now_unix();
        let mut tx = begin(self, TxKind::Write(Some(rules::SWEEP))).await?;
        let r = async {
            let mut doomed = doomed_since_mark(&mut tx, mark, candidates).await?;
            // Held by a lock: neither the row nor the chunk goes.
            let held = held_tags(&mut tx, &doomed, now, grace_secs).await?;
            doomed.retain(|t| !held.contains(t));
            let rows = index_rows(&mut tx, &doomed).await?;
            doomed.retain(|t| {
                !rows.get(t).is_some_and(|(present, since)| rules::put_in_flight(*present, *since, now))
            });
            for t in doomed.iter().filter(|t| rows.contains_key(t)) {
                tx.exec(sql::CHUNK_FORGET, args![t]).await?;
            }
            Ok((doomed, held))
        }
        .await;
        let (doomed, mut held) = finish(tx, r).await?;
        // Step 2: re-checked, then deleted while the exclusion is held.
        let mut tx = begin(self, TxKind::Write(Some(rules::SWEEP))).await?;
        let r = async {
            // Read only once the exclusion is held: every version whose commit checked its chunks before this
            // step is seen (commits between the steps included).
            let mut doomed = doomed_since_mark(&mut tx, mark, doomed).await?;
            // Held since step 1: the chunk stays (its index row may be gone: reported missing, sent again).
            let held_now = held_tags(&mut tx, &doomed, now, grace_secs).await?;
            doomed.retain(|t| !held_now.contains(t));
            // A row again: a PUT (or a repair) began after step 1; its object stays.
            let rows = index_rows(&mut tx, &doomed).await?;
            doomed.retain(|t| !rows.contains_key(t));
            sweeper.delete(doomed.clone()).await?;
            Ok((doomed, held_now))
        }
        .await;
        // The transaction wrote nothing: ending it either way releases the exclusion.
        let (deleted, held_now) = finish(tx, r).await?;
        held.extend(held_now);
        let mut held: Vec<Tag> = held.into_iter().collect();
        held.sort();
        Ok(Swept { deleted, held })
    }

    async fn gc_end_holds(&self, grace_secs: i64) -> Result<u64, MetaError> {
        let now = now_unix();
        // Exclusive: no hold is added or checked meanwhile.
        let mut tx = begin(self, TxKind::Write(Some(rules::END_HOLDS))).await?;
        let r = async {
            let rows = all(&mut tx, sql::HELD_ALL, args![], sql::held_row).await?;
            let mut removed = 0;
            for row in &rows {
                let key = args![row.parcel_id, &row.lock_id, &row.tag];
                match rules::hold(row, now, grace_secs) {
                    rules::Hold::Locked | rules::Hold::Ended => {}
                    rules::Hold::Ending => {
                        let mut with_end = key;
                        with_end.push(Arg::from(now));
                        tx.exec(sql::HOLD_ENDED, with_end).await?;
                    }
                    rules::Hold::Expired => removed += tx.exec(sql::HOLD_FORGET, key).await?,
                }
            }
            Ok(removed)
        }
        .await;
        finish(tx, r).await
    }

    async fn chunk_intent(&self, tags: &[Tag], now_unix: i64) -> Result<HashSet<Tag>, MetaError> {
        // Shared with commits, exclusive of sweeps: a sweep step either saw this row or runs after it.
        let mut tx = begin(self, TxKind::Write(Some(rules::CHUNK_INTENT))).await?;
        let r = async {
            let rows = index_rows(&mut tx, tags).await?;
            for t in tags {
                tx.exec(sql::CHUNK_INTENT, args![t, now_unix]).await?;
            }
            Ok(rows.into_iter().filter(|(_, (present, _))| *present).map(|(t, _)| t).collect())
        }
        .await;
        finish(tx, r).await
    }

    async fn chunk_stored(&self, chunks: &[(Tag, u64)]) -> Result<(), MetaError> {
        if let [(t, size)] = chunks {
            return exec_each(self, sql::CHUNK_STORED, args![t, *size as i64]).await.map(drop);
        }
        let mut tx = begin(self, TxKind::Write(None)).await?;
        let r = async {
            for (t, size) in chunks {
                tx.exec(sql::CHUNK_STORED, args![t, *size as i64]).await?;
            }
            Ok(())
        }
        .await;
        finish(tx, r).await
    }

    async fn chunks_indexed(&self, tags: &[Tag]) -> Result<HashSet<Tag>, MetaError> {
        let mut tx = begin(self, TxKind::Each).await?;
        let r = index_rows(&mut tx, tags).await;
        let rows = finish(tx, r).await?;
        Ok(rows.into_iter().filter(|(_, (present, _))| *present).map(|(t, _)| t).collect())
    }

    async fn chunk_index(&self) -> Result<Vec<(Tag, bool, i64)>, MetaError> {
        all_each(self, sql::CHUNK_INDEX_ALL, args![], sql::chunk_row).await
    }

    async fn chunk_index_forget(&self, tags: &[Tag]) -> Result<u64, MetaError> {
        let mut tx = begin(self, TxKind::Write(None)).await?;
        let r = async {
            let mut n = 0;
            for t in tags {
                n += tx.exec(sql::CHUNK_FORGET_PRESENT, args![t]).await?;
            }
            Ok(n)
        }
        .await;
        finish(tx, r).await
    }
}

/// The candidates that no version committed since `mark` references (read under the sweep exclusion).
async fn doomed_since_mark<T: MetaTx + ?Sized>(
    tx: &mut T,
    mark: &GcMark,
    candidates: Vec<Tag>,
) -> Result<Vec<Tag>, MetaError> {
    let current = all(tx, sql::ALL_VERSION_IDS, args![], |r| r.int(0)).await?;
    let mut referenced = HashSet::new();
    for vid in rules::versions_since(mark, current) {
        referenced.extend(tx.keyring_tags(sql::VERSION_KEYRING_DATA, args![vid]).await?);
    }
    Ok(rules::sweep_doomed(candidates, &referenced))
}

/// The rows an `... IN ($1, ..., $IN_BATCH)` query of [`crate::sql`] returns for `tags`, in batches of
/// [`sql::IN_BATCH`].
async fn rows_in<T: MetaTx + ?Sized>(tx: &mut T, stmt: &'static str, tags: &[Tag]) -> Rows {
    let mut out = Vec::new();
    for batch in tags.chunks(sql::IN_BATCH) {
        let mut params: Vec<Arg> = batch.iter().map(Arg::from).collect();
        params.resize(sql::IN_BATCH, Arg::from(&batch[0]));
        out.extend(tx.query(stmt, None, params).await?);
    }
    Ok(out)
}

/// The chunk-index rows of `tags`: tag -> (present, since).
async fn index_rows<T: MetaTx + ?Sized>(
    tx: &mut T,
    tags: &[Tag],
) -> Result<std::collections::HashMap<Tag, (bool, i64)>, MetaError> {
    let mut out = std::collections::HashMap::with_capacity(tags.len());
    for row in rows_in(tx, sql::chunk_rows_in(), tags).await? {
        let (t, present, since) = sql::chunk_row(&row)?;
        out.insert(t, (present, since));
    }
    Ok(out)
}

/// The tags of `tags` that a lock holds from a sweep ([`rules::hold`]), read under the sweep exclusion.
async fn held_tags<T: MetaTx + ?Sized>(
    tx: &mut T,
    tags: &[Tag],
    now_unix: i64,
    grace_secs: i64,
) -> Result<HashSet<Tag>, MetaError> {
    let rows = rows_in(tx, sql::held_rows_in(), tags).await?;
    let held = rows.iter().map(|r| sql::held_row(r)).collect::<Result<Vec<_>, _>>()?;
    Ok(rules::held_tags(&held, now_unix, grace_secs))
}

/// The current time (keyring upload ages).
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_decode_by_type() {
        let row = Values(vec![Value::Int(3), Value::Null, Value::Text("t".into()), Value::Blob(vec![1])]);
        assert_eq!(row.int(0).unwrap(), 3);
        assert_eq!(row.opt_int(1).unwrap(), None);
        assert_eq!(row.opt_text(1).unwrap(), None);
        assert_eq!(row.text(2).unwrap(), "t");
        assert_eq!(row.blob(3).unwrap(), vec![1]);
        assert!(matches!(row.int(1), Err(MetaError::Database(_))), "NULL is not an integer");
        assert!(matches!(row.text(0), Err(MetaError::Database(_))));
        assert!(matches!(row.blob(9), Err(MetaError::Database(_))));
        assert_eq!(
            args![Some("x"), None::<&str>, &None::<Vec<u8>>],
            vec![Arg::Text("x".into()), Arg::NullText, Arg::NullBlob]
        );
    }
}
