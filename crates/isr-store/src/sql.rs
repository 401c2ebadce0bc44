//! The metadata schema and statements, written once and rendered per SQL dialect, and the decoding of their
//! rows (over [`Columns`]).
//!
//! Statements are written with PostgreSQL's numbered placeholders (`$1`); [`Dialect::render`] turns them into
//! SQLite's (`?1`). Both dialects accept everything else they use: `ON CONFLICT ... DO NOTHING`, `RETURNING`,
//! `CAST(... AS TEXT)`. What only one dialect has (row locks, PostgreSQL's `gc_lock` row, SQLite's pragmas)
//! stays with its backend.

use crate::meta::{LockInfo, LoginFailures, MetaError, ParcelDetail, ParcelInfo, UserRecord, VersionInfo};
use crate::meta_tx::TxKind;
use crate::rules::{HeldRow, ParcelRow};
use isr_format::Tag;
use std::borrow::Cow;

/// The SQL dialect a statement or the schema is rendered for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// `sql` with this dialect's placeholders: `$N` stays for PostgreSQL and becomes `?N` for SQLite (whose `$N`
    /// would be a named parameter, numbered by first appearance rather than by N).
    pub(crate) fn render(self, sql: &str) -> Cow<'_, str> {
        match self {
            Dialect::Postgres => Cow::Borrowed(sql),
            Dialect::Sqlite => {
                let bytes = sql.as_bytes();
                let mut out = String::with_capacity(sql.len());
                for (i, ch) in sql.char_indices() {
                    let numbered = ch == '$' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
                    out.push(if numbered { '?' } else { ch });
                }
                Cow::Owned(out)
            }
        }
    }

    /// The statement that begins a transaction of `kind` (none for statements on their own).
    pub(crate) fn begin(self, kind: TxKind) -> Option<&'static str> {
        match (self, kind) {
            (_, TxKind::Each) => None,
            // Deferred: the snapshot is taken by the first read and kept until the end.
            (Dialect::Sqlite, TxKind::Snapshot) => Some("BEGIN"),
            // Every writer excludes every other, gc sweeps included ([`crate::rules::GcExclusion`]).
            (Dialect::Sqlite, TxKind::Write(_)) => Some("BEGIN IMMEDIATE"),
            (Dialect::Postgres, TxKind::Snapshot) => Some("BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ"),
            // READ COMMITTED: each statement sees what committed before it, so a sweep that waited for the
            // gc_lock row sees every commit that held it.
            (Dialect::Postgres, TxKind::Write(_)) => Some("BEGIN"),
        }
    }

    /// The schema's type words in this dialect: an auto-numbered 64-bit key, a 64-bit integer, bytes.
    fn types(self) -> [(&'static str, &'static str); 3] {
        match self {
            Dialect::Sqlite => {
                [("{serial}", "INTEGER PRIMARY KEY AUTOINCREMENT"), ("{int}", "INTEGER"), ("{blob}", "BLOB")]
            }
            Dialect::Postgres => {
                [("{serial}", "BIGSERIAL PRIMARY KEY"), ("{int}", "BIGINT"), ("{blob}", "BYTEA")]
            }
        }
    }

    fn types_of(self, text: &str) -> String {
        self.types().iter().fold(text.to_owned(), |s, (word, ty)| s.replace(word, ty))
    }
}

/// The tables as a new database gets them (the columns of [`ADDED_COLUMNS`] follow through the migration).
/// `IF NOT EXISTS` also adds a newer table (`held_chunks`) to an existing database when it is opened.
const TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id {serial},
    name TEXT NOT NULL UNIQUE,
    login_hash TEXT NOT NULL,
    created_unix {int} NOT NULL,
    failed_logins {int} NOT NULL DEFAULT 0,
    last_failed_unix {int} NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tokens (
    hash {blob} PRIMARY KEY,
    user_id {int} NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires_unix {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS parcels (
    id {serial},
    user_id {int} NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created_unix {int} NOT NULL,
    head {int} NOT NULL DEFAULT 0,
    wrapped_keyroot {blob} NOT NULL,
    recovery_keyroot {blob},
    lock_id TEXT,
    lock_holder TEXT,
    lock_client_id TEXT,
    lock_since {int},
    UNIQUE (user_id, name)
);
CREATE TABLE IF NOT EXISTS keyrings (
    parcel_id {int} NOT NULL REFERENCES parcels(id) ON DELETE CASCADE,
    hash {blob} NOT NULL,
    data {blob} NOT NULL,
    created_unix {int} NOT NULL,
    PRIMARY KEY (parcel_id, hash)
);
CREATE TABLE IF NOT EXISTS versions (
    id {serial},
    parcel_id {int} NOT NULL REFERENCES parcels(id) ON DELETE CASCADE,
    number {int} NOT NULL,
    created_unix {int} NOT NULL,
    client TEXT NOT NULL,
    bytes_uploaded {int} NOT NULL,
    comment TEXT NOT NULL,
    manifest {blob} NOT NULL,
    UNIQUE (parcel_id, number)
);
CREATE TABLE IF NOT EXISTS version_keyrings (
    version_id {int} NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    parcel_id {int} NOT NULL,
    hash {blob} NOT NULL,
    PRIMARY KEY (version_id, hash)
);
CREATE TABLE IF NOT EXISTS chunk_index (
    tag {blob} PRIMARY KEY,
    present {int} NOT NULL,
    size {int} NOT NULL,
    since_unix {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS held_chunks (
    parcel_id {int} NOT NULL REFERENCES parcels(id) ON DELETE CASCADE,
    lock_id TEXT NOT NULL,
    tag {blob} NOT NULL,
    since_unix {int} NOT NULL,
    ended_unix {int},
    PRIMARY KEY (parcel_id, lock_id, tag)
);
"#;

/// Columns added after the first release: (table, column, type). Databases created before them get them on
/// open, as new ones do right after [`TABLES`].
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("parcels", "broken_lock_id", "TEXT"),
    ("parcels", "broken_by", "TEXT"),
    ("parcels", "broken_unix", "{int}"),
    ("parcels", "network_policy", "TEXT"),
];

/// Every index, on every backend; `IF NOT EXISTS` also adds a newer one to an existing database on open.
const INDEXES: &str = "
CREATE INDEX IF NOT EXISTS version_keyrings_by_hash ON version_keyrings (parcel_id, hash);
CREATE INDEX IF NOT EXISTS tokens_by_expiry ON tokens (expires_unix);
CREATE INDEX IF NOT EXISTS tokens_by_user ON tokens (user_id);
CREATE INDEX IF NOT EXISTS held_chunks_by_tag ON held_chunks (tag);
";

/// `CREATE TABLE IF NOT EXISTS` of every table, in `d`.
pub(crate) fn tables(d: Dialect) -> String {
    d.types_of(TABLES)
}

/// The columns added after the first release, with their types in `d`: (table, column, type).
pub(crate) fn added_columns(d: Dialect) -> Vec<(&'static str, &'static str, String)> {
    ADDED_COLUMNS.iter().map(|(t, c, ty)| (*t, *c, d.types_of(ty))).collect()
}

/// `CREATE INDEX IF NOT EXISTS` of every index (after the tables and added columns).
pub(crate) fn indexes() -> &'static str {
    INDEXES
}

// ---------------------------------------------------------------------------------------------------------
// Statements, shared by both backends (rendered with [`Dialect::render`]).

pub(crate) const SETTING_INIT: &str =
    "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING";
pub(crate) const SETTING: &str = "SELECT value FROM settings WHERE key = $1";

pub(crate) const ADD_USER: &str = "INSERT INTO users (name, login_hash, created_unix) VALUES ($1, $2, $3)
     ON CONFLICT (name) DO NOTHING";
pub(crate) const SET_LOGIN_HASH: &str = "UPDATE users SET login_hash = $2, failed_logins = 0 WHERE name = $1";
/// Cascades: tokens, parcels -> keyrings, held_chunks, versions -> version_keyrings.
pub(crate) const REMOVE_USER: &str = "DELETE FROM users WHERE name = $1";
/// Decoded by [`user_record`].
pub(crate) const LIST_USERS: &str = "SELECT name, login_hash, created_unix FROM users ORDER BY name";
/// Decoded by [`user_record`].
pub(crate) const USER: &str = "SELECT name, login_hash, created_unix FROM users WHERE name = $1";
/// `FOR SHARE` on PostgreSQL: the user stays until the parcel is created.
pub(crate) const USER_ID: &str = "SELECT id FROM users WHERE name = $1";

/// Decoded by [`login_failures`].
pub(crate) const LOGIN_FAILURES: &str = "SELECT failed_logins, last_failed_unix FROM users WHERE name = $1";
pub(crate) const RECORD_LOGIN_FAILURE: &str =
    "UPDATE users SET failed_logins = failed_logins + 1, last_failed_unix = $2 WHERE name = $1
     RETURNING failed_logins";
pub(crate) const RESERVE_LOGIN_ATTEMPT: &str =
    "UPDATE users SET failed_logins = failed_logins + 1, last_failed_unix = $4
     WHERE name = $1 AND failed_logins = $2 AND last_failed_unix = $3";
pub(crate) const CLEAR_LOGIN_FAILURES: &str =
    "UPDATE users SET failed_logins = 0 WHERE name = $1 AND failed_logins != 0";

/// Inserts nothing (0 rows) for an unknown user.
pub(crate) const ADD_TOKEN: &str =
    "INSERT INTO tokens (hash, user_id, expires_unix) SELECT $1, id, $3 FROM users WHERE name = $2";
pub(crate) const TOKEN: &str = "SELECT u.name, t.expires_unix FROM tokens t JOIN users u ON u.id = t.user_id
     WHERE t.hash = $1 AND t.expires_unix > $2";
pub(crate) const PURGE_EXPIRED_TOKENS: &str = "DELETE FROM tokens WHERE expires_unix <= $1";

/// Decoded by [`parcel_info`]; `$1` NULL lists every user's parcels.
pub(crate) const LIST_PARCELS: &str =
    "SELECT u.name, p.name, p.head, p.created_unix, p.lock_id, p.lock_holder, p.lock_client_id, p.lock_since
     FROM parcels p JOIN users u ON u.id = p.user_id
     WHERE CAST($1 AS TEXT) IS NULL OR u.name = $1 ORDER BY u.name, p.name";
/// Decoded by [`parcel_detail`].
pub(crate) const PARCEL_DETAIL: &str =
    "SELECT p.head, p.created_unix, p.lock_id, p.lock_holder, p.lock_client_id, p.lock_since,
            p.wrapped_keyroot, p.recovery_keyroot, p.network_policy
     FROM parcels p JOIN users u ON u.id = p.user_id WHERE u.name = $1 AND p.name = $2";
/// Decoded by [`parcel_row`]; PostgreSQL appends `FOR UPDATE OF p` when the row is to change.
pub(crate) const PARCEL_ROW: &str =
    "SELECT p.id, p.head, p.lock_id, p.lock_holder, p.lock_client_id, p.lock_since,
            p.broken_lock_id, p.broken_by, p.broken_unix
     FROM parcels p JOIN users u ON u.id = p.user_id WHERE u.name = $1 AND p.name = $2";
pub(crate) const CREATE_PARCEL: &str =
    "INSERT INTO parcels (user_id, name, created_unix, wrapped_keyroot, recovery_keyroot,
         lock_id, lock_holder, lock_client_id, lock_since)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (user_id, name) DO NOTHING";
/// `$1/$2` user and parcel; 0 rows for no such parcel.
pub(crate) const SET_WRAPPED_KEYROOT: &str = "UPDATE parcels SET wrapped_keyroot = $3 WHERE id =
     (SELECT p.id FROM parcels p JOIN users u ON u.id = p.user_id WHERE u.name = $1 AND p.name = $2)";
/// `$1/$2` user and parcel; 0 rows for no such parcel.
pub(crate) const SET_NETWORK_POLICY: &str = "UPDATE parcels SET network_policy = $3 WHERE id =
     (SELECT p.id FROM parcels p JOIN users u ON u.id = p.user_id WHERE u.name = $1 AND p.name = $2)";
/// Cascades: keyrings, versions, held chunks.
pub(crate) const DELETE_PARCEL: &str = "DELETE FROM parcels WHERE id = $1";

pub(crate) const SET_LOCK: &str =
    "UPDATE parcels SET lock_id = $2, lock_holder = $3, lock_client_id = $4, lock_since = $5 WHERE id = $1";
pub(crate) const CLEAR_LOCK: &str =
    "UPDATE parcels SET lock_id = NULL, lock_holder = NULL, lock_client_id = NULL, lock_since = NULL
     WHERE id = $1";
pub(crate) const RECORD_BREAK: &str =
    "UPDATE parcels SET broken_lock_id = $2, broken_by = $3, broken_unix = $4 WHERE id = $1";
pub(crate) const LOCKS_HELD: &str = "SELECT COUNT(*) FROM parcels WHERE lock_id IS NOT NULL";

pub(crate) const INSERT_KEYRING: &str = "INSERT INTO keyrings (parcel_id, hash, data, created_unix)
     VALUES ($1, $2, $3, $4) ON CONFLICT (parcel_id, hash) DO NOTHING";
/// An upload of a keyring already there refreshes its age, so a purge of abandoned uploads leaves it alone.
pub(crate) const REFRESH_KEYRING: &str =
    "UPDATE keyrings SET created_unix = $3 WHERE parcel_id = $1 AND hash = $2";
pub(crate) const KEYRING: &str = "SELECT data FROM keyrings WHERE parcel_id = $1 AND hash = $2";

/// Decoded by [`version_info`].
pub(crate) const VERSIONS: &str = "SELECT number, created_unix, client, bytes_uploaded, comment FROM versions
     WHERE parcel_id = $1 ORDER BY number";
pub(crate) const MANIFEST: &str = "SELECT manifest FROM versions WHERE parcel_id = $1 AND number = $2";
pub(crate) const VERSION_ID: &str = "SELECT id FROM versions WHERE parcel_id = $1 AND number = $2";
pub(crate) const VERSION_AND_MANIFEST: &str =
    "SELECT id, manifest FROM versions WHERE parcel_id = $1 AND number = $2";
/// A parcel's versions, newest first (what a prune keeps and drops).
pub(crate) const VERSIONS_NEWEST_FIRST: &str =
    "SELECT id FROM versions WHERE parcel_id = $1 ORDER BY number DESC";
pub(crate) const VERSION_KEYRING_HASHES: &str = "SELECT hash FROM version_keyrings WHERE version_id = $1";
pub(crate) const INSERT_VERSION: &str =
    "INSERT INTO versions (parcel_id, number, created_unix, client, bytes_uploaded, comment, manifest)
     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id";
pub(crate) const INSERT_VERSION_KEYRING: &str =
    "INSERT INTO version_keyrings (version_id, parcel_id, hash) VALUES ($1, $2, $3)";
pub(crate) const SET_HEAD: &str = "UPDATE parcels SET head = $2 WHERE id = $1";
pub(crate) const DELETE_VERSION: &str = "DELETE FROM versions WHERE id = $1";
/// The keyring `$2` of parcel `$1`, unless a version still references it.
pub(crate) const DELETE_KEYRING_IF_UNREFERENCED: &str =
    "DELETE FROM keyrings WHERE parcel_id = $1 AND hash = $2 AND NOT EXISTS
       (SELECT 1 FROM version_keyrings vk WHERE vk.parcel_id = $1 AND vk.hash = $2)";

pub(crate) const REFERENCED_KEYRINGS: &str =
    "SELECT DISTINCT u.name, p.name, vk.hash FROM version_keyrings vk
     JOIN parcels p ON p.id = vk.parcel_id JOIN users u ON u.id = p.user_id
     ORDER BY u.name, p.name";
pub(crate) const PURGE_UNREFERENCED_KEYRINGS: &str =
    "DELETE FROM keyrings WHERE created_unix < $1 AND NOT EXISTS
       (SELECT 1 FROM version_keyrings vk WHERE vk.parcel_id = keyrings.parcel_id
          AND vk.hash = keyrings.hash)";
pub(crate) const ALL_VERSION_IDS: &str = "SELECT id FROM versions";

// The chunk index of a store that cannot answer presence cheaply (S3): a row per chunk, pending (`present`
// 0) from before a PUT writes the object, present (1) once the store has acknowledged it. See
// `MetaStore::chunk_intent` for the protocol with gc.

/// A pending row for a chunk about to be written; an existing pending row gets the new time, a present row
/// stays present (its object exists).
pub(crate) const CHUNK_INTENT: &str = "INSERT INTO chunk_index (tag, present, size, since_unix)
     VALUES ($1, 0, 0, $2)
     ON CONFLICT (tag) DO UPDATE SET since_unix = excluded.since_unix WHERE chunk_index.present = 0";
/// Only an existing row: one a sweep removed meanwhile stays removed (the chunk is then reported missing).
pub(crate) const CHUNK_STORED: &str = "UPDATE chunk_index SET present = 1, size = $2 WHERE tag = $1";
pub(crate) const CHUNK_FORGET: &str = "DELETE FROM chunk_index WHERE tag = $1";
/// A row that says present for an object that is not there (found by `check`).
pub(crate) const CHUNK_FORGET_PRESENT: &str = "DELETE FROM chunk_index WHERE tag = $1 AND present = 1";
pub(crate) const CHUNK_INDEX_ALL: &str = "SELECT tag, present, since_unix FROM chunk_index";

/// Tags per [`chunk_rows_in`] or [`held_rows_in`] query (a shorter batch repeats its first tag).
pub(crate) const IN_BATCH: usize = 256;

/// `$1, $2, ..., $IN_BATCH`.
fn in_batch_params() -> String {
    (1..=IN_BATCH).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

static CHUNK_ROWS_IN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("SELECT tag, present, since_unix FROM chunk_index WHERE tag IN ({})", in_batch_params())
});

/// The index rows (tag, present, since) of [`IN_BATCH`] tags.
pub(crate) fn chunk_rows_in() -> &'static str {
    CHUNK_ROWS_IN.as_str()
}

// Chunks held by a parcel's lock ahead of the version that will reference them (`MetaStore::hold_chunks`);
// gc decides on each row with `rules::hold`.

/// A hold; one the same lock already has stays as it is.
pub(crate) const HOLD_CHUNK: &str = "INSERT INTO held_chunks (parcel_id, lock_id, tag, since_unix)
     VALUES ($1, $2, $3, $4) ON CONFLICT (parcel_id, lock_id, tag) DO NOTHING";
/// Every hold with its parcel's current lock, decoded by [`held_row`].
pub(crate) const HELD_ALL: &str = "SELECT h.parcel_id, h.lock_id, h.tag, h.ended_unix, p.lock_id
     FROM held_chunks h JOIN parcels p ON p.id = h.parcel_id";
/// A gc run records that a hold's lock ended.
pub(crate) const HOLD_ENDED: &str =
    "UPDATE held_chunks SET ended_unix = $4 WHERE parcel_id = $1 AND lock_id = $2 AND tag = $3";
pub(crate) const HOLD_FORGET: &str =
    "DELETE FROM held_chunks WHERE parcel_id = $1 AND lock_id = $2 AND tag = $3";

static HELD_ROWS_IN: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{HELD_ALL} WHERE h.tag IN ({})", in_batch_params()));

/// The holds of [`IN_BATCH`] tags, decoded by [`held_row`].
pub(crate) fn held_rows_in() -> &'static str {
    HELD_ROWS_IN.as_str()
}

/// A row of [`HELD_ALL`] or [`held_rows_in`].
pub(crate) fn held_row(r: &dyn Columns) -> Result<HeldRow, MetaError> {
    Ok(HeldRow {
        parcel_id: r.int(0)?,
        lock_id: r.text(1)?,
        tag: tag(&r.blob(2)?)?,
        ended_unix: r.opt_int(3)?,
        current_lock: r.opt_text(4)?,
    })
}

/// A row of [`chunk_rows_in`] or [`CHUNK_INDEX_ALL`]: tag, present, since.
pub(crate) fn chunk_row(r: &dyn Columns) -> Result<(Tag, bool, i64), MetaError> {
    Ok((tag(&r.blob(0)?)?, r.int(1)? != 0, r.int(2)?))
}
/// Hash and bytes of every keyring some version references (gc's mark).
pub(crate) const REFERENCED_KEYRING_DATA: &str = "SELECT k.hash, k.data FROM keyrings k WHERE EXISTS
       (SELECT 1 FROM version_keyrings vk WHERE vk.parcel_id = k.parcel_id AND vk.hash = k.hash)";
/// Hash and bytes of the keyrings of version `$1`.
pub(crate) const VERSION_KEYRING_DATA: &str = "SELECT k.hash, k.data FROM version_keyrings vk
     JOIN keyrings k ON k.parcel_id = vk.parcel_id AND k.hash = vk.hash WHERE vk.version_id = $1";

// ---------------------------------------------------------------------------------------------------------
// Rows

/// The columns of one result row (a wrong type or index is a database error).
pub(crate) trait Columns {
    fn int(&self, i: usize) -> Result<i64, MetaError>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, MetaError>;
    fn text(&self, i: usize) -> Result<String, MetaError>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, MetaError>;
    fn blob(&self, i: usize) -> Result<Vec<u8>, MetaError>;
    fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>, MetaError>;
}

/// The verdict on a statement that changes one row: `none` when it changed nothing (no such row, or one
/// already there).
pub(crate) fn changed(rows: u64, none: impl FnOnce() -> MetaError) -> Result<(), MetaError> {
    if rows == 0 {
        Err(none())
    } else {
        Ok(())
    }
}

/// A stored 32-byte hash.
pub(crate) fn tag(blob: &[u8]) -> Result<Tag, MetaError> {
    let arr: [u8; 32] =
        blob.try_into().map_err(|_| MetaError::Database("stored hash is not 32 bytes".into()))?;
    Ok(Tag(arr))
}

/// A number stored as a signed 64-bit integer (versions, heads, byte counts).
fn count(v: i64) -> u64 {
    v as u64
}

/// A version number as stored; numbers beyond `i64::MAX` exist nowhere, so they are clamped (and not found).
pub(crate) fn number(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// The lock of four columns (id, holder, client id, since) starting at `at`.
fn lock_at(r: &dyn Columns, at: usize) -> Result<Option<LockInfo>, MetaError> {
    let Some(lock_id) = r.opt_text(at)? else { return Ok(None) };
    Ok(Some(LockInfo {
        lock_id,
        holder: r.opt_text(at + 1)?.unwrap_or_default(),
        client_id: r.opt_text(at + 2)?.unwrap_or_default(),
        since_unix: r.opt_int(at + 3)?.unwrap_or(0),
    }))
}

/// A row of [`USER`] or [`LIST_USERS`].
pub(crate) fn user_record(r: &dyn Columns) -> Result<UserRecord, MetaError> {
    Ok(UserRecord { name: r.text(0)?, login_hash: r.text(1)?, created_unix: r.int(2)? })
}

/// A row of [`LOGIN_FAILURES`].
pub(crate) fn login_failures(r: &dyn Columns) -> Result<LoginFailures, MetaError> {
    Ok(LoginFailures { count: r.int(0)? as u32, last_unix: r.int(1)? })
}

/// A row of [`TOKEN`]: user and expiry.
pub(crate) fn token(r: &dyn Columns) -> Result<(String, i64), MetaError> {
    Ok((r.text(0)?, r.int(1)?))
}

/// A row of [`LIST_PARCELS`].
pub(crate) fn parcel_info(r: &dyn Columns) -> Result<ParcelInfo, MetaError> {
    Ok(ParcelInfo {
        user: r.text(0)?,
        name: r.text(1)?,
        head: count(r.int(2)?),
        created_unix: r.int(3)?,
        lock: lock_at(r, 4)?,
    })
}

/// A row of [`PARCEL_DETAIL`] of `user/parcel`.
pub(crate) fn parcel_detail(r: &dyn Columns, user: &str, parcel: &str) -> Result<ParcelDetail, MetaError> {
    Ok(ParcelDetail {
        info: ParcelInfo {
            user: user.to_owned(),
            name: parcel.to_owned(),
            head: count(r.int(0)?),
            created_unix: r.int(1)?,
            lock: lock_at(r, 2)?,
        },
        wrapped_keyroot: r.blob(6)?,
        recovery_keyroot: r.opt_blob(7)?,
        network_policy: crate::meta::policy_column(r.opt_text(8)?)?,
    })
}

/// A row of [`PARCEL_ROW`] of `user/parcel`.
pub(crate) fn parcel_row(r: &dyn Columns, user: &str, parcel: &str) -> Result<ParcelRow, MetaError> {
    let broken = match r.opt_text(6)? {
        Some(lock_id) => Some(crate::meta::BrokenLock {
            lock_id,
            by: r.opt_text(7)?.unwrap_or_default(),
            unix: r.opt_int(8)?.unwrap_or(0),
        }),
        None => None,
    };
    Ok(ParcelRow {
        id: r.int(0)?,
        head: count(r.int(1)?),
        lock: lock_at(r, 2)?,
        broken,
        name: format!("{user}/{parcel}"),
    })
}

/// A row of [`VERSIONS`].
pub(crate) fn version_info(r: &dyn Columns) -> Result<VersionInfo, MetaError> {
    Ok(VersionInfo {
        version: count(r.int(0)?),
        created_unix: r.int(1)?,
        client: r.text(2)?,
        bytes_uploaded: count(r.int(3)?),
        comment: r.text(4)?,
    })
}

/// A row of [`REFERENCED_KEYRINGS`]: user, parcel, keyring hash.
pub(crate) fn referenced_keyring(r: &dyn Columns) -> Result<(String, String, Tag), MetaError> {
    Ok((r.text(0)?, r.text(1)?, tag(&r.blob(2)?)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_per_dialect() {
        let sql = "UPDATE t SET a = $2, b = '$x' WHERE id = $1 AND c = $10";
        assert_eq!(Dialect::Postgres.render(sql), sql);
        assert_eq!(Dialect::Sqlite.render(sql), "UPDATE t SET a = ?2, b = '$x' WHERE id = ?1 AND c = ?10");
    }

    #[test]
    fn one_schema_two_dialects() {
        let lite = tables(Dialect::Sqlite);
        let pg = tables(Dialect::Postgres);
        assert!(!lite.contains('{') && !pg.contains('{'), "every type word is rendered");
        assert!(lite.contains("id INTEGER PRIMARY KEY AUTOINCREMENT") && lite.contains("hash BLOB NOT NULL"));
        assert!(pg.contains("id BIGSERIAL PRIMARY KEY") && pg.contains("hash BYTEA NOT NULL"));
        assert_eq!(lite.lines().count(), pg.lines().count(), "the same tables and columns");
        assert!(added_columns(Dialect::Postgres)
            .iter()
            .any(|(_, c, ty)| *c == "broken_unix" && ty == "BIGINT"));
        assert!(indexes().contains("tokens_by_user"), "the index once only on PostgreSQL is on both");
    }
}
