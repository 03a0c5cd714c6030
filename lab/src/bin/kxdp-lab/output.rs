//! Writing to stdout without panicking: a closed pipe (`kxdp-lab call … | head -1`) ends the
//! command quietly, any other failed write is an error that says it was stdout.

/// Stdout was closed before everything was written: the reader has what it wanted, so the
/// command ends quietly.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub struct StdoutClosed;

/// The error of a failed write to stdout: [`StdoutClosed`] for a closed pipe, else the
/// I/O error, saying it was stdout.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("write to stdout")
    }
}

/// `print!` that returns a failed write as an error (see [`stdout_error`]) instead of
/// panicking, as `print!` does.
macro_rules! out {
    ($($arg:tt)*) => {
        std::io::Write::write_fmt(&mut std::io::stdout(), format_args!($($arg)*))
            .map_err($crate::output::stdout_error)?
    };
}

/// `println!` likewise.
macro_rules! outln {
    () => {
        out!("\n")
    };
    ($($arg:tt)*) => {
        out!("{}\n", format_args!($($arg)*))
    };
}
