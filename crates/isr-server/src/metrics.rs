//! Process-local counters exported as Prometheus text by `GET /metrics`, and the latest usage figures
//! ([`crate::stats`], recomputed by `serve` in the background) as `isr_parcel_*` gauges.
//!
//! The exposition stays hand-written: it is a few `writeln!`s, and a metrics crate (prometheus-client) is
//! not among the vendored dependencies of this offline build.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Chunks sent (by `GET /chunks/{tag}` or in a batched `chunks/fetch`).
    pub chunks_sent: AtomicU64,
    pub logins_failed: AtomicU64,
    /// Login requests received (well-formed ones).
    pub login_attempts: AtomicU64,
    /// Login secrets verified against a hash (each one a guess an attacker gets).
    pub login_verifications: AtomicU64,
    /// Chunks in the store: counted at startup and periodically, raised by every new upload.
    pub chunks_stored: AtomicI64,
    pub store_bytes: AtomicI64,
    /// The latest usage figures, if computed yet.
    usage: Mutex<Option<crate::stats::UsageReport>>,
}

/// A label value in the exposition format (backslash, quote and newline escaped).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, status)).or_default() += 1;
        }
    }

    pub fn add_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn add_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn chunk_sent(&self) {
        self.chunks_sent.fetch_add(1, Ordering::Relaxed);
    }

    pub fn chunk_stored(&self, bytes: usize) {
        self.chunks_stored.fetch_add(1, Ordering::Relaxed);
        self.store_bytes.fetch_add(bytes as i64, Ordering::Relaxed);
    }

    /// Replaces the usage figures rendered as `isr_parcel_*` gauges.
    pub fn set_usage(&self, report: crate::stats::UsageReport) {
        if let Ok(mut u) = self.usage.lock() {
            *u = Some(report);
        }
    }

    fn render_usage(&self, out: &mut String) {
        let Ok(guard) = self.usage.lock() else { return };
        let Some(r) = guard.as_ref() else { return };
        type Field = fn(&crate::stats::ParcelUsage) -> f64;
        let gauges: [(&str, &str, Field); 7] = [
            ("isr_parcel_versions", "Versions of the parcel.", |p| p.versions as f64),
            ("isr_parcel_checkins_per_day", "Versions committed in the last 30 days, per day.", |p| {
                p.checkins_per_day
            }),
            ("isr_parcel_unique_bytes", "Stored bytes of chunks only this parcel references.", |p| {
                p.unique_bytes as f64
            }),
            ("isr_parcel_shared_bytes", "Stored bytes of chunks this parcel shares with others.", |p| {
                p.shared_bytes as f64
            }),
            ("isr_parcel_logical_bytes", "Stored bytes of every version counted in full.", |p| {
                p.logical_bytes as f64
            }),
            ("isr_parcel_dedup_ratio", "Logical bytes over the bytes of distinct chunks.", |p| p.dedup_ratio),
            ("isr_parcel_checkins_measured", "Check-ins the check-in byte quantiles are over.", |p| {
                p.checkins_measured as f64
            }),
        ];
        for (name, help, field) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for p in &r.parcels {
                let _ = writeln!(
                    out,
                    "{name}{{user=\"{}\",parcel=\"{}\"}} {}",
                    label(&p.user),
                    label(&p.parcel),
                    field(p)
                );
            }
        }
        let name = "isr_parcel_checkin_bytes";
        let _ = writeln!(
            out,
            "# HELP {name} Stored bytes a check-in added to the parcel (quantiles).\n# TYPE {name} gauge"
        );
        for p in &r.parcels {
            for (q, v) in [("0.5", p.checkin_bytes_p50), ("0.95", p.checkin_bytes_p95)] {
                let _ = writeln!(
                    out,
                    "{name}{{user=\"{}\",parcel=\"{}\",quantile=\"{q}\"}} {v}",
                    label(&p.user),
                    label(&p.parcel)
                );
            }
        }
        for (name, help, v) in [
            (
                "isr_referenced_bytes",
                "Stored bytes of chunks any version references.",
                r.referenced_bytes as f64,
            ),
            (
                "isr_logical_bytes",
                "Stored bytes of every version of every parcel counted in full.",
                r.logical_bytes as f64,
            ),
            ("isr_dedup_ratio", "Logical bytes over referenced bytes, deployment-wide.", r.dedup_ratio),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
    }

    pub fn set_store(&self, chunks: u64, bytes: u64) {
        self.chunks_stored.store(chunks as i64, Ordering::Relaxed);
        self.store_bytes.store(bytes as i64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, locks_held: u64, logins_held_back: i64) -> String {
        let mut out = String::new();
        out.push_str("# HELP isr_http_requests_total HTTP requests answered, by route and status.\n");
        out.push_str("# TYPE isr_http_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(out, "isr_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
            }
        }
        let mut one = |name: &str, kind: &str, help: &str, value: i128| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        one(
            "isr_bytes_in_total",
            "counter",
            "Request body bytes received.",
            self.bytes_in.load(Ordering::Relaxed).into(),
        );
        one(
            "isr_bytes_out_total",
            "counter",
            "Response body bytes sent for chunks, keyrings and manifests.",
            self.bytes_out.load(Ordering::Relaxed).into(),
        );
        one(
            "isr_chunks_sent_total",
            "counter",
            "Chunks sent to clients, one by one or in batched fetches.",
            self.chunks_sent.load(Ordering::Relaxed).into(),
        );
        one(
            "isr_chunks_stored",
            "gauge",
            "Chunks in the chunk store.",
            self.chunks_stored.load(Ordering::Relaxed).into(),
        );
        one(
            "isr_store_bytes",
            "gauge",
            "Bytes of stored chunks.",
            self.store_bytes.load(Ordering::Relaxed).into(),
        );
        one(
            "isr_logins_failed_total",
            "counter",
            "Failed logins.",
            self.logins_failed.load(Ordering::Relaxed).into(),
        );
        one(
            "isr_login_attempts_total",
            "counter",
            "Login requests received.",
            self.login_attempts.load(Ordering::Relaxed).into(),
        );
        one(
            "isr_login_verifications_total",
            "counter",
            "Login secrets verified (attempts admitted by the throttle, and unknown users).",
            self.login_verifications.load(Ordering::Relaxed).into(),
        );
        one(
            "isr_logins_held_back",
            "gauge",
            "Login attempts currently held back by the throttle.",
            logins_held_back.into(),
        );
        one("isr_locks_held", "gauge", "Parcels currently locked.", locks_held.into());
        self.render_usage(&mut out);
        out
    }
}
