//! How long jobs (distill, train, eval, profile, serve) report to whoever runs them. The library
//! never draws on the terminal itself: the command line installs a [`Ui`] that keeps a status line
//! on stderr, prints notes and writes the reports to stdout; without one (a server embedding the
//! library, a test) nothing is shown and reports go nowhere but the files a job writes.

use std::sync::OnceLock;

use crate::error::Result;

pub trait Ui: Send + Sync {
    /// The current step of a long job; replaces the previous one.
    fn status(&self, msg: &str);
    /// Progress of a long job: `done` of `total` units of `what`, and a `detail` (the ETA, the
    /// current step). Replaces the status. By default drawn as a text bar in the status.
    fn progress(&self, what: &str, done: usize, total: usize, detail: &str) {
        self.status(&format!(
            "{what} [{}] {done}/{total} {detail}",
            bar(done, total)
        ))
    }
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
    fn progress(&self, _: &str, _: usize, _: usize, _: &str) {}
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

/// See [`Ui::progress`].
pub fn progress(what: &str, done: usize, total: usize, detail: &str) {
    ui().progress(what, done, total, detail)
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

/// `mm:ss`, or `h:mm:ss` from an hour on: how progress lines and summaries show durations.
pub fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 60, s % 60)
    }
}

/// `ETA mm:ss` for the `left` units of a job whose `done` units (of this run) took `elapsed`
/// seconds; `ETA --:--` before the first is done.
pub fn eta(elapsed: f64, done: usize, left: usize) -> String {
    if done == 0 {
        return "ETA --:--".into();
    }
    format!("ETA {}", clock(elapsed / done as f64 * left as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_and_eta() {
        assert_eq!(clock(0.4), "00:00");
        assert_eq!(clock(83.0), "01:23");
        assert_eq!(clock(3723.0), "1:02:03");
        assert_eq!(eta(10.0, 0, 5), "ETA --:--");
        assert_eq!(eta(10.0, 2, 3), "ETA 00:15");
    }
}
