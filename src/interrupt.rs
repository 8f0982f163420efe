//! Ctrl-C: the first one asks the run to stop (no new work; builds and copies stopped;
//! activations already running finish; clean-up runs); a second one quits at once.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler. Child processes run in process groups of their own, so the
/// terminal's SIGINT reaches this process only and it decides what stops.
pub fn install() {
    let _ = ctrlc::set_handler(|| {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            eprintln!("\nInterrupted again: quitting now; temporary GC roots may be left behind.");
            std::process::exit(crate::error::ExitKind::Interrupted.code());
        }
        eprintln!(
            "\nInterrupted: stopping builds and copies, letting running activations finish, cleaning up (Ctrl-C again to quit at once)…"
        );
    });
}

/// Whether Ctrl-C was pressed.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
