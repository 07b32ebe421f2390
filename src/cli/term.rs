//! The terminal side of the command line: a status line on stderr redrawn in place (only when
//! stderr is a terminal, so scripts and `--json` consumers never see it), notes on stderr, and
//! stdout where a write that fails (a full disk) is an error naming stdout, not the panic
//! `println!` turns it into; a reader that has gone (`| head`) ends the process the way it ends
//! other Unix tools, by SIGPIPE.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Instant;

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

/// One status line on stderr.
pub struct StatusLine {
    enabled: bool,
    start: Instant,
    /// Print the elapsed time before each message, and nothing during the first second (short
    /// runs stay quiet).
    timed: bool,
    shown: Mutex<bool>,
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
            shown: Mutex::new(false),
        }
    }

    pub fn say(&self, msg: &str) {
        if !self.enabled {
            return;
        }
        let t = self.start.elapsed().as_secs_f64();
        if self.timed {
            if t <= 1.0 {
                return;
            }
            eprint!("\r\x1b[2K[{t:7.1}s] {msg}");
        } else {
            eprint!("\r\x1b[2K{msg}");
        }
        let _ = std::io::stderr().flush();
        *self.shown.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    pub fn clear(&self) {
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::replace(&mut *shown, false) {
            eprint!("\r\x1b[2K");
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
