//! Progress of long operations (create, checkout, hoard, sync, checkin, export), reported through a trait so
//! that each front end shows it its own way: the CLI draws a bar on a terminal, the web console streams it to
//! the page, and a library user who asks for nothing gets [`Quiet`].

use std::sync::Arc;

/// Where a long operation reports how far it got.
pub trait Progress: Send + Sync + std::fmt::Debug {
    /// A task `what` (e.g. "hoard", "upload") of `total_bytes` starts.
    fn task(&self, what: &str, total_bytes: u64) -> Box<dyn ProgressTask>;
}

/// One running task; dropping it ends it.
pub trait ProgressTask: Send + Sync {
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

struct QuietTask;

impl ProgressTask for QuietTask {
    fn advance(&self, _bytes: u64) {}
}

impl Progress for Quiet {
    fn task(&self, _what: &str, _total_bytes: u64) -> Box<dyn ProgressTask> {
        Box::new(QuietTask)
    }
}

/// The default sink of a client.
pub fn quiet() -> Arc<dyn Progress> {
    Arc::new(Quiet)
}
