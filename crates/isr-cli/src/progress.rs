//! Progress bars on a terminal (bytes, rate, time left), silence otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use isr_client::progress::{Progress, ProgressTask};
use std::io::IsTerminal;

/// Draws a bar per task on stderr when it is a terminal.
#[derive(Debug, Default)]
pub struct Terminal;

struct Bar(ProgressBar);

impl ProgressTask for Bar {
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Terminal {
    fn task(&self, what: &str, total_bytes: u64) -> Box<dyn ProgressTask> {
        if !std::io::stderr().is_terminal() {
            return Box::new(Bar(ProgressBar::hidden()));
        }
        let bar = ProgressBar::new(total_bytes);
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:>8} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta} left",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_owned());
        Box::new(Bar(bar))
    }
}
