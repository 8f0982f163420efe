//! Output that cannot kill a run. `clan machines update … | head -3`, a CI log reader that
//! goes away, a closed pipe: with SIGPIPE's default, the next line clan writes would end it
//! mid-deploy (ssh masters and temporary directories left behind, an activation cut off);
//! with SIGPIPE ignored, `println!` would panic instead. So a command that changes hosts
//! writes its standard output and error through a relay: a pipe of its own, read by a
//! thread that passes everything on to the real destination and, once that is closed,
//! discards the rest. The run goes on as if detached, its log file has everything, and it
//! finishes or rolls back cleanly. Terminals are left alone (a closed terminal hangs up,
//! which is Ctrl-C's business). Read-only commands do not use it: `clan machines show |
//! head -1` ends quietly, as any command-line tool does.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::time::Duration;

/// The relays of this process's standard output and error; [`Relays::finish`] passes on
/// what is left before the process exits.
pub struct Relays {
    done: Vec<mpsc::Receiver<()>>,
}

/// Puts standard output and error (those that are not terminals) behind relays. A panic
/// passes on what it printed before the process ends, as [`Relays::finish`] does.
pub fn relay() -> Relays {
    let mut done = Vec::new();
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        if let Some(rx) = relay_fd(fd) {
            done.push(rx);
        }
    }
    if !done.is_empty() {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            // The message is in the relay: give it a moment to reach the real output.
            std::thread::sleep(Duration::from_millis(200));
        }));
    }
    Relays { done }
}

fn relay_fd(fd: RawFd) -> Option<mpsc::Receiver<()>> {
    // SAFETY: isatty, fcntl, pipe2 and dup2 on descriptors this process owns; every new
    // descriptor is owned by an OwnedFd (closed on drop) or installed as `fd`.
    unsafe {
        if libc::isatty(fd) == 1 {
            return None;
        }
        let original = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3);
        if original < 0 {
            return None;
        }
        let original = OwnedFd::from_raw_fd(original);
        let mut ends = [0; 2];
        if libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return None;
        }
        let (read, write) = (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1]));
        // The write end becomes `fd` (without close-on-exec: children that inherit clan's
        // output write to the relay too).
        if libc::dup2(write.as_raw_fd(), fd) < 0 {
            return None;
        }
        drop(write);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            pass_on(read, original);
            let _ = tx.send(());
        });
        Some(rx)
    }
}

/// Copies `from` to `to` until `from` ends; once `to` is closed, discards the rest.
fn pass_on(from: OwnedFd, to: OwnedFd) {
    use std::io::{Read, Write};
    // SIGPIPE blocked in this thread only: a closed destination fails the write (EPIPE)
    // instead of ending the process; the signal stays pending here, never delivered.
    // SAFETY: changes this thread's signal mask; the set is initialised before use.
    unsafe {
        let mut pipe: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut pipe);
        libc::sigaddset(&mut pipe, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &pipe, std::ptr::null_mut());
    }
    let mut from = std::fs::File::from(from);
    let mut to = Some(std::fs::File::from(to));
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if let Some(out) = &mut to
            && out.write_all(&buf[..n]).is_err()
        {
            to = None;
        }
    }
}

impl Relays {
    /// Closes this process's ends of the relays and waits (two seconds at most: a child
    /// that inherited them may hold them longer) until everything written was passed on.
    pub fn finish(self) {
        if self.done.is_empty() {
            return;
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: opens /dev/null and installs it as standard output and error.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if null >= 0 {
                libc::dup2(null, libc::STDOUT_FILENO);
                libc::dup2(null, libc::STDERR_FILENO);
                libc::close(null);
            }
        }
        for rx in self.done {
            let _ = rx.recv_timeout(Duration::from_secs(2));
        }
    }
}
