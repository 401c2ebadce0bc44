//! What the process running a parcel (`isr resume`, `isr disk`) does beside serving the guest: the
//! background upload of the disk's flushed changes ([`crate::trickle`]), the requests of other `isr`
//! processes on its control socket ([`crate::control`]: `isr sync` while it runs) and the periodic sync of
//! `--sync-every`. The caller's event loop polls [`Upkeep::next`] and runs the syncs it asks for (they need
//! the [`Client`]).

use crate::control::{ControlReply, ControlRequest, Incoming, SyncDone};
use crate::error::ClientError;
use crate::image::WorkingImage;
use crate::parcel::{Client, Opened};
use crate::parcel_files::ParcelFiles;
use crate::trickle::{RateLimit, ServerSink, Trickle};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long a stop waits for the background upload's batch in flight.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// How a running parcel keeps the server up to date.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpkeepOptions {
    /// Bound of the background upload in bytes per second; `Some(0)` turns it off; `None`: no bound (it
    /// still yields to the guest's own fetches).
    pub upload_rate: Option<u64>,
    /// Commit a crash-consistent version this often while the parcel runs.
    pub sync_every: Option<Duration>,
}

/// The bytes of a parcel's changes that are not on the server yet, as last recorded by a process that could
/// tell (it holds the parcel's key): the running process every second, the end of a run, a sync. Read without the key (`isr ls -l`). Not secret: the server learns the sizes of
/// the chunks it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnsentRecord {
    pub bytes: u64,
    pub at_unix: i64,
}

impl UnsentRecord {
    /// Record `bytes` for the parcel whose files are `files` (best effort: a report, not state).
    pub fn write(files: &ParcelFiles, bytes: u64) {
        let rec = UnsentRecord { bytes, at_unix: crate::home::now_unix() };
        if let Ok(json) = serde_json::to_vec(&rec) {
            if let Err(e) = crate::home::write_atomic(&files.unsent_record(), &json) {
                tracing::debug!(error = %e, "recording the unsent bytes");
            }
        }
    }

    /// The last record, if any (a missing or unreadable one is none).
    pub fn read(files: &ParcelFiles) -> Option<UnsentRecord> {
        serde_json::from_slice(&std::fs::read(files.unsent_record()).ok()?).ok()
    }
}

/// Parse a period such as `30m`, `2h`, `90s` or `1d` (a bare number is seconds; at least one second).
pub fn parse_period(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((at, c)) if c.is_ascii_alphabetic() => (&t[..at], c),
        _ => (t, 's'),
    };
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => return Err(format!("not a period: {s:?} (e.g. 30m, 2h, 90s)")),
    };
    let n: u64 = digits.trim().parse().map_err(|_| format!("not a period: {s:?} (e.g. 30m, 2h, 90s)"))?;
    match n.checked_mul(mult) {
        Some(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        _ => Err(format!("a period must be at least one second: {s:?}")),
    }
}

/// Something the caller's loop must act on.
#[derive(Debug)]
pub enum UpkeepEvent {
    /// `isr sync` asked over the control socket: run [`Upkeep::sync`] and answer.
    Control(Incoming),
    /// `--sync-every` is due.
    PeriodicSync,
}

/// The background work of one running parcel. Dropping it stops everything (prefer [`Upkeep::stop`]).
pub struct Upkeep {
    name: String,
    disk: Arc<WorkingImage>,
    /// A resumed VM's memory image (its base changes with a sync).
    memory: Option<Arc<WorkingImage>>,
    trickle: Arc<Trickle>,
    task: Option<tokio::task::JoinHandle<()>>,
    reporter: Option<tokio::task::JoinHandle<()>>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    control: Option<(tokio::net::UnixListener, PathBuf)>,
    every: Option<tokio::time::Interval>,
}

/// While the parcel runs, record the disk's unsent bytes (its dirty chunks) every second, for `isr ls -l`.
async fn report_unsent(
    files: ParcelFiles,
    disk: Arc<WorkingImage>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last = None;
    loop {
        let bytes = disk.dirty_bytes();
        if last != Some(bytes) {
            UnsentRecord::write(&files, bytes);
            last = Some(bytes);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

impl std::fmt::Debug for Upkeep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upkeep").field("parcel", &self.name).finish()
    }
}

impl Upkeep {
    /// Start the background upload of `disk` and listen on the parcel's control socket. Connected runs of a
    /// checked-out parcel only (a transient or disconnected run has nothing to send).
    pub async fn start(
        client: &mut Client,
        o: &Opened,
        disk: Arc<WorkingImage>,
        memory: Option<Arc<WorkingImage>>,
        opts: UpkeepOptions,
    ) -> Result<Upkeep, ClientError> {
        let name = o.state.parcel.clone();
        let transport = client.connect().await?;
        let limit = opts.upload_rate.filter(|&r| r > 0).map(|r| Arc::new(RateLimit::new(r)));
        let sink = ServerSink::new(transport, &name, &o.state.lock_id, limit, Some(disk.clone()));
        let trickle = Arc::new(Trickle::new(disk.clone(), Arc::new(sink))?);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = (opts.upload_rate != Some(0)).then(|| tokio::spawn(trickle.clone().run(stop_rx.clone())));
        let reporter = tokio::spawn(report_unsent(o.files.clone(), disk.clone(), stop_rx));
        let path = o.files.control_socket();
        let control = Some((crate::control::listen(&path)?, path));
        let every = opts.sync_every.map(|d| {
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        Ok(Upkeep { name, disk, memory, trickle, task, reporter: Some(reporter), stop_tx, control, every })
    }

    pub fn trickle(&self) -> &Trickle {
        &self.trickle
    }

    /// The next request or due sync (pending forever when there is none).
    pub async fn next(&mut self) -> UpkeepEvent {
        loop {
            let accept = async {
                match &self.control {
                    Some((l, _)) => l.accept().await.map(|(s, _)| s),
                    None => std::future::pending().await,
                }
            };
            let tick = async {
                match &mut self.every {
                    Some(i) => i.tick().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                s = accept => match s {
                    Ok(stream) => match Incoming::read(stream).await {
                        Ok(inc) => return UpkeepEvent::Control(inc),
                        Err(e) => tracing::debug!(error = %e, "control connection dropped"),
                    },
                    Err(e) => tracing::debug!(error = %e, "control accept"),
                },
                _ = tick => return UpkeepEvent::PeriodicSync,
            }
        }
    }

    /// Commit a crash-consistent version of the running parcel (see [`Client::sync_running`]).
    pub async fn sync(&self, client: &mut Client, message: &str) -> Result<SyncDone, ClientError> {
        let done = client
            .sync_running(&self.name, &self.disk, self.memory.as_deref(), &self.trickle, message)
            .await?;
        Ok(match done {
            Some((v, t)) => SyncDone { version: Some(v), chunks: t.chunks, bytes: t.bytes },
            None => SyncDone { version: None, chunks: 0, bytes: 0 },
        })
    }

    /// Act on an event: answer a control request, or run the periodic sync (whose failure is reported and
    /// tried again at the next period).
    pub async fn handle(&self, client: &mut Client, event: UpkeepEvent) {
        match event {
            UpkeepEvent::Control(inc) => {
                let reply = match &inc.request {
                    ControlRequest::Sync { message } => match self.sync(client, message).await {
                        Ok(done) => ControlReply::Synced(done),
                        Err(e) => ControlReply::from_error(&e),
                    },
                };
                inc.reply(&reply).await;
            }
            UpkeepEvent::PeriodicSync => match self.sync(client, "periodic sync (--sync-every)").await {
                Ok(SyncDone { version: Some(v), .. }) => {
                    eprintln!("isr: synced {} as version {v}", self.name)
                }
                Ok(_) => {}
                Err(e) => eprintln!("isr: the periodic sync of {} failed: {e}", self.name),
            },
        }
    }

    /// Stop the background upload (a round in flight finishes first) and the control socket.
    pub async fn stop(mut self) {
        let _ = self.stop_tx.send(true);
        if let Some(mut task) = self.task.take() {
            // A round ends between batches; one stuck on a server that does not answer is cut off (safe at any
            // point: nothing counts as sent before its upload succeeded).
            if tokio::time::timeout(STOP_WAIT, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
        if let Some(task) = self.reporter.take() {
            let _ = task.await;
        }
        if let Some((l, path)) = self.control.take() {
            drop(l);
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for Upkeep {
    fn drop(&mut self) {
        for task in [self.task.take(), self.reporter.take()].into_iter().flatten() {
            task.abort();
        }
        if let Some((_, path)) = self.control.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_parse() {
        assert_eq!(parse_period("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_period("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_period("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_period("1d").unwrap(), Duration::from_secs(86400));
        for bad in ["", "0", "0m", "m", "5w", "-1h", "1.5h", "99999999999999999999d"] {
            assert!(parse_period(bad).is_err(), "{bad:?} parsed");
        }
    }
}
