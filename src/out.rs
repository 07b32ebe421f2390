//! Standard output for the commands. A write that fails (a full disk) is an error naming stdout,
//! not the panic `println!` turns it into; a reader that has gone (`| head`) ends the process the
//! way it ends other Unix tools, by SIGPIPE.

use std::io::Write;

use crate::error::{Error, Result};

/// Writes `args` to stdout and flushes, so a failure shows at the line that caused it.
pub fn write(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|_| out.flush())
        .map_err(|e| Error::io("<stdout>", e))
}

/// `println!` that returns a [`crate::Result`] instead of panicking.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

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
