//! A thread for work that must not take CPU from the guest: the background upload's encoding of dirty
//! chunks (zstd, AES-GCM, BLAKE3: about a core's worth while a backlog lasts). It runs at the lowest
//! scheduling priority (nice 19), so on a busy machine the guest, QEMU and the guest's own I/O through isr go
//! first, and on an idle one it runs at full speed. What a user waits for (a sync, a check-in) does not use it.

use crate::error::ClientError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

/// The nice value of the background thread: the lowest priority an unprivileged thread can take.
pub const BACKGROUND_NICE: i32 = 19;

type Job = Box<dyn FnOnce() + Send>;

/// One low-priority thread running jobs in order. Dropping it ends the thread once its queue is empty.
#[derive(Debug)]
pub struct Background {
    jobs: mpsc::Sender<Job>,
    /// Jobs queued or running.
    pending: Arc<AtomicUsize>,
}

impl Background {
    /// Start the thread. Lowering its priority is best effort: where that fails it runs at normal priority
    /// (and says so once).
    pub fn start() -> Result<Background, ClientError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("isr-background".into())
            .spawn(move || {
                // Linux keeps the nice value per thread: `None` (the caller) is this thread alone.
                if let Err(e) = rustix::process::setpriority_process(None, BACKGROUND_NICE) {
                    tracing::warn!(error = %e, "background work runs at normal priority");
                }
                for job in queue {
                    // A panicking job fails only its own caller (its answer is dropped), not the thread.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .map_err(|e| ClientError::Other(format!("starting the background thread: {e}")))?;
        Ok(Background { jobs, pending: Arc::new(AtomicUsize::new(0)) })
    }

    /// How many jobs are queued or running.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Run `f` on the background thread, after the jobs queued before it, and wait for its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ClientError> {
        let (answer, result) = tokio::sync::oneshot::channel();
        let pending = self.pending.clone();
        pending.fetch_add(1, Ordering::SeqCst);
        let job = Box::new(move || {
            // Counted done before the caller hears of it, also when `f` panics: `done` is dropped (on an
            // unwind too) before `answer`, declared first.
            struct Done(Arc<AtomicUsize>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let answer = answer;
            let done = Done(pending);
            let result = f();
            drop(done);
            let _ = answer.send(result);
        });
        if self.jobs.send(job).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(ClientError::Other("the background thread has ended".into()));
        }
        result.await.map_err(|_| ClientError::Other("a background job panicked".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's nice value, from /proc (field 19 of its stat line).
    fn my_nice() -> i32 {
        let tid = rustix::thread::gettid().as_raw_nonzero().get();
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // The command name (field 2) may hold spaces: count from the closing parenthesis.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn jobs_run_in_order_at_the_lowest_priority_and_the_caller_keeps_its_own() {
        let before = my_nice();
        let bg = Background::start().unwrap();
        assert_eq!(bg.run(my_nice).await.unwrap(), BACKGROUND_NICE);
        assert_eq!(my_nice(), before, "the caller's priority changed");
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let runs = (0..20).map(|k| {
            let order = order.clone();
            bg.run(move || order.lock().unwrap().push(k))
        });
        for r in futures::future::join_all(runs).await {
            r.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone() {
        let bg = Background::start().unwrap();
        let e = bg.run(|| -> () { panic!("job fails") }).await.unwrap_err();
        assert!(e.to_string().contains("panicked"), "{e}");
        assert_eq!(bg.run(|| 7).await.unwrap(), 7, "the thread goes on after a panic");
        assert_eq!(bg.pending(), 0);
    }
}
