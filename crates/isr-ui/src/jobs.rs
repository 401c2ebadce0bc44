//! Jobs: one lifecycle operation started from the page, its progress, its outcome, and how to cancel it.

use isr_client::progress::{Progress, ProgressTask};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How a job stands.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum JobState {
    Running,
    Done { message: String },
    Failed { message: String, exit_code: i32 },
    Cancelled,
}

/// One task of a job (a job may run several: e.g. a check-in uploads, then commits).
#[derive(Debug)]
struct Task {
    what: String,
    total: u64,
    done: Arc<AtomicU64>,
    started: Instant,
}

/// What the page sees of a task.
#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    pub what: String,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub bytes_per_sec: f64,
    /// Seconds left at the current rate (None before anything moved).
    pub eta_secs: Option<f64>,
}

#[derive(Debug)]
struct Job {
    parcel: String,
    op: String,
    state: JobState,
    tasks: Vec<Task>,
    abort: Option<tokio::task::AbortHandle>,
}

/// What the page sees of a job.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: u64,
    pub parcel: String,
    pub op: String,
    #[serde(flatten)]
    pub state: JobState,
    pub tasks: Vec<TaskView>,
    pub cancellable: bool,
}

/// Every job of this console, newest last (finished ones are kept for the page to show; a bounded number).
#[derive(Debug, Default)]
pub struct Jobs {
    next: AtomicU64,
    jobs: Mutex<BTreeMap<u64, Job>>,
}

const KEEP_FINISHED: usize = 50;

impl Jobs {
    pub fn start(&self, parcel: &str, op: &str) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.insert(
            id,
            Job {
                parcel: parcel.to_owned(),
                op: op.to_owned(),
                state: JobState::Running,
                tasks: vec![],
                abort: None,
            },
        );
        // Forget the oldest finished jobs beyond the bound.
        let finished: Vec<u64> =
            jobs.iter().filter(|(_, j)| !matches!(j.state, JobState::Running)).map(|(id, _)| *id).collect();
        for id in finished.iter().take(finished.len().saturating_sub(KEEP_FINISHED)) {
            jobs.remove(id);
        }
        id
    }

    pub fn set_abort(&self, id: u64, abort: tokio::task::AbortHandle) {
        if let Some(j) = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&id) {
            j.abort = Some(abort);
        }
    }

    pub fn finish(&self, id: u64, state: JobState) {
        if let Some(j) = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&id) {
            if matches!(j.state, JobState::Running) {
                j.state = state;
            }
            j.abort = None;
        }
    }

    /// Cancel a running job: its task is dropped where it stands (every operation is safe to interrupt: a
    /// re-run finishes it). Returns whether there was something to cancel.
    pub fn cancel(&self, id: u64) -> bool {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(j) = jobs.get_mut(&id) else { return false };
        let Some(abort) = j.abort.take() else { return false };
        abort.abort();
        j.state = JobState::Cancelled;
        true
    }

    pub fn running_op(&self, parcel: &str) -> Option<String> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.values()
            .find(|j| j.parcel == parcel && matches!(j.state, JobState::Running))
            .map(|j| j.op.clone())
    }

    pub fn views(&self) -> Vec<JobView> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.iter()
            .map(|(id, j)| JobView {
                id: *id,
                parcel: j.parcel.clone(),
                op: j.op.clone(),
                state: j.state.clone(),
                tasks: j.tasks.iter().map(Task::view).collect(),
                cancellable: j.abort.is_some(),
            })
            .collect()
    }

    /// The progress sink for job `id`.
    pub fn progress(self: &Arc<Self>, id: u64) -> Arc<dyn Progress> {
        Arc::new(JobProgress { jobs: self.clone(), id })
    }
}

impl Task {
    fn view(&self) -> TaskView {
        let done = self.done.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        TaskView {
            what: self.what.clone(),
            total_bytes: self.total,
            done_bytes: done,
            bytes_per_sec: rate,
            eta_secs: (rate > 0.0).then(|| self.total.saturating_sub(done) as f64 / rate),
        }
    }
}

#[derive(Debug)]
struct JobProgress {
    jobs: Arc<Jobs>,
    id: u64,
}

struct Counter(Arc<AtomicU64>);

impl ProgressTask for Counter {
    fn advance(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Progress for JobProgress {
    fn task(&self, what: &str, total_bytes: u64) -> Box<dyn ProgressTask> {
        let done = Arc::new(AtomicU64::new(0));
        if let Some(j) = self.jobs.jobs.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&self.id) {
            j.tasks.push(Task {
                what: what.to_owned(),
                total: total_bytes,
                done: done.clone(),
                started: Instant::now(),
            });
        }
        Box::new(Counter(done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_rate_and_cancel() {
        let jobs = Arc::new(Jobs::default());
        let id = jobs.start("p", "hoard");
        let task = jobs.progress(id).task("hoard", 100);
        task.advance(40);
        let v = &jobs.views()[0];
        assert_eq!((v.tasks[0].done_bytes, v.tasks[0].total_bytes), (40, 100));
        assert!(v.tasks[0].eta_secs.is_some());
        assert!(!jobs.cancel(id), "no task handle yet: nothing to cancel");
        assert_eq!(jobs.running_op("p").as_deref(), Some("hoard"));
        jobs.finish(id, JobState::Done { message: "ok".into() });
        assert_eq!(jobs.running_op("p"), None);
    }
}
