//! The target's deploy lock, held by a process whose life is the deploy's ssh session.

use crate::activate::Word;
use std::io::{BufRead, BufReader};
use std::process::Command;
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use super::step::{output_streams, terminate_group, timestamp};
use super::{LogSink, sudo_password};
use crate::plan::{Runner, Step};
use crate::progress::Progress;

/// How often the workstation tells a target's lock that it is still there.
pub const LOCK_HEARTBEAT: Duration = Duration::from_secs(15);

pub use crate::activate::LOCK_STALE;

/// The target's deploy lock: `clan-activate lock` holds it until its standard input ends,
/// which is when this value is dropped, or when this process dies (the ssh session ends).
/// Meanwhile a thread sends it a byte every [`LOCK_HEARTBEAT`].
pub(crate) struct LockGuard {
    child: std::process::Child,
    input: Arc<Mutex<Option<std::process::ChildStdin>>>,
}

impl LockGuard {
    fn new(child: std::process::Child, input: Option<std::process::ChildStdin>) -> LockGuard {
        let input = Arc::new(Mutex::new(input));
        let beating = Arc::clone(&input);
        thread::spawn(move || {
            let mut last = Instant::now();
            loop {
                thread::sleep(Duration::from_millis(200));
                let mut input = beating.lock().unwrap_or_else(|e| e.into_inner());
                let Some(stdin) = input.as_mut() else {
                    return;
                };
                if last.elapsed() >= LOCK_HEARTBEAT {
                    last = Instant::now();
                    // The lock's session may be gone (the target let go of it): EPIPE.
                    if crate::process::write_to_child(stdin, b".").is_err() {
                        return;
                    }
                }
            }
        });
        LockGuard { child, input }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.input.lock().unwrap_or_else(|e| e.into_inner()).take();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a lock command says while it is being taken.
pub(crate) enum LockEvent<'a> {
    /// A line of its output.
    Line(&'a str),
    /// Someone else holds the lock (as `describe_holder` words it); it waits.
    Waiting(String),
    /// It ended without the lock, with this exit code.
    Ended(Option<i32>),
}

/// Runs the lock command `argv` (a sudo `password` first on its input, if any) and waits
/// until it says `clan: acquired`; returns the exit code and output if it never does (130
/// after Ctrl-C). Used by the deploy and by `clan vars upload`.
pub(crate) fn take_lock(
    argv: &[String],
    password: Option<&str>,
    mut on: impl FnMut(LockEvent<'_>),
) -> Result<LockGuard, (Option<i32>, String)> {
    let mut child = crate::process::spawn(Command::new(&argv[0]).args(&argv[1..]), true)
        .map_err(|e| (None, format!("cannot run {}: {e}", argv[0])))?;
    let mut input = child.stdin.take();
    if let (Some(password), Some(stdin)) = (password, input.as_mut()) {
        let line = zeroize::Zeroizing::new(format!("{password}\n"));
        let _ = crate::process::write_to_child(stdin, line.as_bytes());
    }
    let output = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel::<String>();
    for stream in output_streams(&mut child) {
        let (tx, output) = (tx.clone(), Arc::clone(&output));
        thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut all = output.lock().expect("output lock");
                all.push_str(&line);
                all.push('\n');
                drop(all);
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                on(LockEvent::Line(&line));
                if Word::Acquired.of(&line).is_some() {
                    return Ok(LockGuard::new(child, input));
                }
                if let Some(holder) = Word::Waiting.of(&line) {
                    on(LockEvent::Waiting(crate::diagnostics::describe_holder(
                        holder,
                    )));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if crate::interrupt::requested() {
                    input.take();
                    terminate_group(child.id());
                    let _ = child.wait();
                    return Err((Some(130), "interrupted".into()));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                input.take();
                let code = child.wait().ok().and_then(|s| s.code());
                let output = output.lock().expect("output lock").clone();
                on(LockEvent::Ended(code));
                return Err((code, output));
            }
        }
    }
}

/// Takes the target's deploy lock for a deploy step, logging what the target says.
pub(super) fn hold_lock(
    step: &Step,
    label: &str,
    sink: &LogSink,
    progress: &Progress,
) -> Result<LockGuard, (Option<i32>, String)> {
    let argv = step.local_argv();
    sink.write(&format!(
        "{} [{label}] {}: {} ({})\n$ {}\n",
        timestamp(),
        step.kind.stage(),
        step.command_line(),
        step.host_label(),
        argv.join(" ")
    ));
    let password = match &step.runner {
        Runner::Remote { command, .. } if command.reads_password() => sudo_password(),
        _ => None,
    };
    take_lock(
        &argv,
        password.as_deref().map(String::as_str),
        |event| match event {
            LockEvent::Line(line) => sink.write(&format!("{line}\n")),
            LockEvent::Waiting(holder) => progress.event(&format!(
                "[{label}] waiting for the target's deploy lock, held by {holder}"
            )),
            LockEvent::Ended(code) => sink.write(&format!(
                "(exit {})\n\n",
                code.map_or("none".into(), |c| c.to_string())
            )),
        },
    )
}
