//! The activation gate of a streamed fleet deploy: machines build while others are still
//! being evaluated, but none activates (takes its target's lock, uploads secrets, touches
//! the profile) before every machine's values have passed the trust boundary. A value
//! refused there stops the run with exit 2 before any activation, as it does when the
//! machines are evaluated all at once. Open unless a streamed deploy closes it.

use std::sync::{Condvar, Mutex};

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Activations go ahead.
    Open,
    /// Wait: evaluations are still arriving.
    Closed,
    /// No activation: a value was refused (the machines it names).
    Refused(String),
}

static STATE: Mutex<State> = Mutex::new(State::Open);
static CHANGED: Condvar = Condvar::new();

fn set(state: State) {
    *STATE.lock().unwrap_or_else(|e| e.into_inner()) = state;
    CHANGED.notify_all();
}

/// Activations wait until [`open`] or [`refuse`].
pub fn close() {
    set(State::Closed);
}

/// Activations go ahead.
pub fn open() {
    set(State::Open);
}

/// No activation in this run: the values of `machines` were refused.
pub fn refuse(machines: &str) {
    set(State::Refused(machines.to_string()));
}

/// Whether activations may start now: `None` while the gate is closed.
fn poll(state: &State) -> Option<Result<(), String>> {
    match state {
        State::Open => Some(Ok(())),
        State::Refused(machines) => Some(Err(machines.clone())),
        // Ctrl-C ends the wait (the caller then stops as interrupted).
        State::Closed if crate::interrupt::requested() => Some(Ok(())),
        State::Closed => None,
    }
}

/// Waits until activations may start: `Err` with the refused machines' names if none may.
pub fn wait() -> Result<(), String> {
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(verdict) = poll(&state) {
            return verdict;
        }
        state = CHANGED
            .wait_timeout(state, std::time::Duration::from_millis(200))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Option<Result<(), String>> {
        poll(&STATE.lock().unwrap())
    }

    // One test for the one global: closed waits, open goes, refused says who.
    #[test]
    fn closed_waits_until_opened_or_refused() {
        close();
        assert_eq!(now(), None, "a closed gate lets activations go");
        let waiter = std::thread::spawn(wait);
        open();
        assert_eq!(waiter.join().unwrap(), Ok(()));
        close();
        let waiter = std::thread::spawn(wait);
        refuse("db");
        assert_eq!(waiter.join().unwrap(), Err("db".to_string()));
        open();
        assert_eq!(now(), Some(Ok(())));
    }
}
