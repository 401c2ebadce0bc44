//! isr-server: users, parcels, versions and locks in a [`isr_store::MetaStore`], encrypted chunks in a
//! [`isr_store::ChunkStore`], both behind the HTTP API documented in `docs/api.md`.
//!
//! - [`storage`]: opening the stores from `--data` / `--database` / `--chunks` / `--config`.
//! - [`chunks`]: the chunk store as the server uses it (batched presence checks, ages for gc).
//! - [`auth`]: login secrets, session tokens, failed-login throttling.
//! - [`api`]: the HTTP routes; [`server`]: the accept loop (TLS, graceful shutdown).
//! - [`admin`]: `gc`, `check`, user management: what the administrator's subcommands do.
//! - [`metrics`]: counters for `GET /metrics`.
//! - [`stats`]: usage figures (`isr-server stats`, the `isr_parcel_*` gauges).
//! - [`recovery`]: IT's recovery key: `recovery init`, `export`, password resets that rewrap keyroots.
//! - [`tls`]: `isr-server tls init`, a private CA and a server certificate it signs.

pub mod admin;
pub mod api;
pub mod auth;
pub mod chunks;
pub mod error;
pub mod metrics;
pub mod recovery;
pub mod server;
pub mod stats;
pub mod storage;
pub mod tls;

pub use api::{router, AppState, ServerSettings};
pub use error::ServerError;
pub use server::{load_tls, run};
pub use storage::{Deployment, Storage, StorageConfig};

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `unix` as an RFC 3339 UTC timestamp (`2026-11-02T14:03:09Z`).
pub fn rfc3339(unix: i64) -> String {
    let (y, m, d) = civil_date(unix);
    let secs = unix.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// The UTC calendar date (year, month 1-12, day 1-31) of `unix`.
pub fn civil_date(unix: i64) -> (i64, i64, i64) {
    let days = unix.div_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_formats() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_800_000_000), "2027-01-15T08:00:00Z");
    }
}
