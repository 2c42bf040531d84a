//! Graceful stop on SIGINT / SIGTERM for the long commands (`tune`, `train-sr`).
//!
//! After [`install`], the first signal only raises a flag that the training loops poll between
//! optimizer steps ([`requested`]): the current step finishes, a checkpoint is written and the
//! command exits with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM). A second
//! signal exits at once with the same status; whatever was last written atomically (the previous
//! checkpoint) is intact, since every output is staged and renamed.
//!
//! Without [`install`] (library use, tests) nothing is registered and [`requested`] stays `None`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The number of the first signal received (0: none).
static RECEIVED: AtomicUsize = AtomicUsize::new(0);
/// Set by the first signal; arms the immediate exit of the second.
static ARMED: AtomicBool = AtomicBool::new(false);
static INSTALLED: std::sync::Once = std::sync::Once::new();

/// A termination signal that asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal(pub i32);

impl Signal {
    /// The conventional exit status of a process stopped by this signal (128 + its number).
    pub fn exit_code(self) -> i32 {
        128 + self.0
    }

    pub fn name(self) -> &'static str {
        match self.0 {
            2 => "SIGINT",
            15 => "SIGTERM",
            _ => "signal",
        }
    }
}

/// Registers the handlers (once per process; later calls do nothing).
pub fn install() -> std::io::Result<()> {
    let mut result = Ok(());
    INSTALLED.call_once(|| result = register());
    result
}

#[cfg(unix)]
fn register() -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    for sig in [SIGINT, SIGTERM] {
        // Order matters: the exit is checked before this signal arms it.
        flag::register_conditional_shutdown(sig, 128 + sig, &ARMED)?;
        // The first signal's number wins (a later one does not overwrite it: it exits).
        flag::register_usize(sig, &RECEIVED, sig as usize)?;
        flag::register(sig, &ARMED)?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn register() -> std::io::Result<()> {
    Ok(())
}

/// The signal received since [`install`], if any.
pub fn requested() -> Option<Signal> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        n => Some(Signal(n as i32)),
    }
}

/// A command that stopped because of a signal, after saving what it could. The CLI exits with
/// [`Signal::exit_code`].
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {}: {message}", signal.name())]
pub struct Interrupted {
    pub signal: Signal,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::Signal;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(Signal(2).exit_code(), 130);
        assert_eq!(Signal(15).exit_code(), 143);
        assert_eq!(Signal(2).name(), "SIGINT");
    }
}
