//! How long jobs (distill, train, eval, profile, serve) report to whoever runs them. The library
//! never draws on the terminal itself: the command line installs a [`Ui`] that keeps a status line
//! on stderr, prints notes and writes the reports to stdout; without one (a server embedding the
//! library, a test) nothing is shown and reports go nowhere but the files a job writes.

use std::sync::OnceLock;

use crate::error::Result;

pub trait Ui: Send + Sync {
    /// The current step of a long job; replaces the previous one.
    fn status(&self, msg: &str);
    /// Removes the status.
    fn clear(&self);
    /// A remark for the user (a skipped step, a redone shard).
    fn note(&self, msg: &str);
    /// A job's result, for standard output.
    fn out(&self, text: &str) -> Result<()>;
}

/// Shows nothing.
pub struct Quiet;

impl Ui for Quiet {
    fn status(&self, _: &str) {}
    fn clear(&self) {}
    fn note(&self, _: &str) {}
    fn out(&self, _: &str) -> Result<()> {
        Ok(())
    }
}

static UI: OnceLock<Box<dyn Ui>> = OnceLock::new();

/// Installs the process's [`Ui`] (once; later calls are ignored and return false).
pub fn install(ui: Box<dyn Ui>) -> bool {
    UI.set(ui).is_ok()
}

fn ui() -> &'static dyn Ui {
    UI.get().map_or(&Quiet, |u| u.as_ref())
}

pub fn say(msg: &str) {
    ui().status(msg)
}

pub fn clear() {
    ui().clear()
}

pub fn note(msg: &str) {
    ui().note(msg)
}

/// A line of a job's report.
pub fn out(line: &str) -> Result<()> {
    ui().out(&format!("{line}\n"))
}

/// A 24-character bar, `#` for the done share and `.` for the rest.
pub fn bar(done: usize, total: usize) -> String {
    const W: usize = 24;
    let fill = W * done.min(total) / total.max(1);
    (0..W).map(|i| if i < fill { '#' } else { '.' }).collect()
}
