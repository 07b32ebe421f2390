//! One status line on stderr, redrawn in place, shared by the long-running commands.
//!
//! It is drawn only when stderr is a terminal, so scripts and `--json` consumers never see it.

use std::cell::Cell;
use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct StatusLine {
    enabled: bool,
    start: Instant,
    /// Print the elapsed time before each message, and nothing during the first second (short
    /// runs stay quiet).
    timed: bool,
    shown: Cell<bool>,
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
            shown: Cell::new(false),
        }
    }

    /// Seconds since the line was made.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    pub fn say(&self, msg: &str) {
        if !self.enabled {
            return;
        }
        let t = self.elapsed();
        if self.timed {
            if t <= 1.0 {
                return;
            }
            eprint!("\r\x1b[2K[{t:7.1}s] {msg}");
        } else {
            eprint!("\r\x1b[2K{msg}");
        }
        let _ = std::io::stderr().flush();
        self.shown.set(true);
    }

    pub fn clear(&self) {
        if self.shown.replace(false) {
            eprint!("\r\x1b[2K");
        }
    }
}

impl Drop for StatusLine {
    fn drop(&mut self) {
        self.clear();
    }
}

/// A 24-character bar, `#` for the done share and `.` for the rest.
pub fn bar(done: usize, total: usize) -> String {
    const W: usize = 24;
    let fill = W * done.min(total) / total.max(1);
    (0..W).map(|i| if i < fill { '#' } else { '.' }).collect()
}
