//! The terminal side of the command line: a status line on stderr redrawn in place (only when
//! stderr is a terminal, so scripts and `--json` consumers never see it), notes on stderr, and
//! stdout where a write that fails (a full disk) is an error naming stdout, not the panic
//! `println!` turns it into; a reader that has gone (`| head`) ends the process the way it ends
//! other Unix tools, by SIGPIPE.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::{Error, Result};

/// Writes `args` to stdout and flushes, so a failure shows at the line that caused it.
pub fn write(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|_| out.flush())
        .map_err(|e| Error::io("<stdout>", e))
}

/// `println!` that returns a [`Result`] instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::term::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

/// Restores the default action of SIGPIPE (Rust ignores it, which turns a closed pipe into a
/// write error on every later line): the process ends quietly when its reader goes away.
pub fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to its default has no preconditions; it is done once
    // at start, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// One status line on stderr, drawn by indicatif (a message, or a bar with its position and a
/// detail), only when stderr is a terminal.
pub struct StatusLine {
    enabled: bool,
    start: Instant,
    /// Print the elapsed time before each message, and nothing during the first second (short
    /// runs stay quiet).
    timed: bool,
    /// The line while it is shown.
    shown: Mutex<Option<ProgressBar>>,
}

impl StatusLine {
    /// `[   12.3s] message`, silent for the first second.
    pub fn timed() -> Self {
        Self::with(true)
    }

    /// The bare message, from the start.
    pub fn plain() -> Self {
        Self::with(false)
    }

    fn with(timed: bool) -> Self {
        StatusLine {
            enabled: std::io::stderr().is_terminal(),
            start: Instant::now(),
            timed,
            shown: Mutex::new(None),
        }
    }

    /// Draws `template` (indicatif's) with `set` applied to the line; the elapsed time first
    /// when timed.
    fn draw(&self, template: &str, set: impl FnOnce(&ProgressBar)) {
        if !self.enabled {
            return;
        }
        let t = self.start.elapsed().as_secs_f64();
        if self.timed && t <= 1.0 {
            return;
        }
        let template = if self.timed {
            format!("[{{prefix}}s] {template}")
        } else {
            template.to_string()
        };
        let Ok(style) = ProgressStyle::with_template(&template) else {
            return;
        };
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        let bar = shown.get_or_insert_with(|| {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        });
        bar.set_style(style.progress_chars("#>."));
        if self.timed {
            bar.set_prefix(format!("{t:7.1}"));
        }
        set(bar);
    }

    pub fn say(&self, msg: &str) {
        self.draw("{msg}", |bar| bar.set_message(msg.to_string()));
    }

    /// `what [####....] done/total detail`.
    pub fn progress(&self, what: &str, done: usize, total: usize, detail: &str) {
        let template = format!("{what} [{{bar:24}}] {{pos}}/{{len}} {{msg}}");
        self.draw(&template, |bar| {
            bar.set_length(total.max(done) as u64);
            bar.set_position(done as u64);
            bar.set_message(detail.to_string());
        });
    }

    pub fn clear(&self) {
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bar) = shown.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for StatusLine {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The library's jobs report through this: their status line, notes and report.
pub struct Terminal(pub StatusLine);

impl crate::status::Ui for Terminal {
    fn status(&self, msg: &str) {
        self.0.say(msg)
    }
    fn progress(&self, what: &str, done: usize, total: usize, detail: &str) {
        self.0.progress(what, done, total, detail)
    }
    fn clear(&self) {
        self.0.clear()
    }
    fn note(&self, msg: &str) {
        self.0.clear();
        eprintln!("{msg}");
    }
    fn out(&self, text: &str) -> Result<()> {
        self.0.clear();
        write(format_args!("{text}"))
    }
}
