//! Running one step: its process in a group of its own, its output streamed to the run's
//! log and turned into progress, stopped on Ctrl-C where the step allows it.

use std::io::{BufRead, BufReader, Read};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{LogSink, OnBuilds, sudo_password};
use crate::connection::Connections;
use crate::plan::{Runner, Step, StepKind};
use crate::progress::Progress;
use crate::ssh::RemoteCommand;

/// Runs a step over fresh connections (the confirmation) until it succeeds, gives a
/// definite answer (exit 4: the target's watchdog rolled back; 5: another deploy took
/// over), or `within` is nearly up.
pub(super) fn retry(
    step: &Step,
    within: Duration,
    name: &str,
    sink: &LogSink,
    progress: &Progress,
) -> (Option<i32>, String) {
    let deadline = Instant::now() + within;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (code, output) = if attempts == 1 {
            run_step_now(step, name, Some(sink), progress, None, None)
        } else {
            run_step_now(step, name, Some(sink), &Progress::silent(), None, None)
        };
        // A definite answer: the confirmation's (done, rolled back, taken over), or any
        // answer of the target to the question how the switch ended (only ssh's 255 is none).
        let said = crate::activate::Exit::from_code(code);
        let answered = match step.kind {
            StepKind::SwitchOutcome => said.is_some(),
            _ => matches!(
                said,
                Some(
                    crate::activate::Exit::Done
                        | crate::activate::Exit::RolledBack
                        | crate::activate::Exit::NotPending
                )
            ),
        };
        if answered || Instant::now() + Duration::from_secs(2) >= deadline {
            if attempts > 1 {
                let what = match step.kind {
                    StepKind::SwitchOutcome => "how the switch ended",
                    _ => "confirmation",
                };
                progress.event(&format!(
                    "[{name}] {what}: {attempts} attempts over a fresh connection"
                ));
            }
            return (code, output);
        }
        thread::sleep(Duration::from_secs(1));
    }
}

/// Runs a query step without showing it; its stdout, once its session slot is free.
pub(super) fn quiet(
    step: &Step,
    connections: &Connections,
) -> std::io::Result<std::process::Output> {
    let argv = step.local_argv();
    session_of(step, connections)
        .run(|| crate::process::run(Command::new(&argv[0]).args(&argv[1..]), None))
}

/// The session slot a step needs on its host's shared connection.
pub(super) fn session_of(step: &Step, connections: &Connections) -> crate::connection::Session {
    match &step.runner {
        Runner::Remote { host, .. } => connections.session(host),
        Runner::Workstation(_) => connections.session_free(),
    }
}

/// Runs one step, echoing its output as events; returns its exit code and output.
pub(super) fn run_step(
    step: &Step,
    label: &str,
    sink: Option<&LogSink>,
    progress: &Progress,
    connections: &Connections,
) -> (Option<i32>, String) {
    run_in_session(step, label, sink, progress, connections, None, None)
}

/// Runs one step once its session slot on its host's shared connection is free
/// ([`run_step_now`] with Nix's build counts to `on_builds` and `data` on its input); a
/// step whose ssh failed there gets what the connection said ([`with_master_said`]).
pub(super) fn run_in_session(
    step: &Step,
    label: &str,
    sink: Option<&LogSink>,
    progress: &Progress,
    connections: &Connections,
    on_builds: Option<OnBuilds<'_>>,
    data: Option<&[u8]>,
) -> (Option<i32>, String) {
    let (code, output) = session_of(step, connections)
        .run(|| run_step_now(step, label, sink, progress, on_builds, data));
    (
        code,
        with_master_said(step, connections, code, output, sink),
    )
}

/// A step whose ssh failed (exit 255) on a shared connection: what the connection's master
/// said is added to its output (and the log), as it says why the connection ended.
fn with_master_said(
    step: &Step,
    connections: &Connections,
    code: Option<i32>,
    mut output: String,
    sink: Option<&LogSink>,
) -> String {
    if code != Some(255) {
        return output;
    }
    let Runner::Remote { host, .. } = &step.runner else {
        return output;
    };
    if let Some(said) = connections.master_said(host) {
        let said = format!(
            "(the shared ssh connection to {}: {})\n",
            host.address,
            said.trim()
        );
        if let Some(sink) = sink {
            sink.write(&said);
        }
        output.push_str(&said);
    }
    output
}

/// Seconds since the Unix epoch, to the millisecond: when a step started, in the logs.
pub(crate) fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("@{:.3}", now.as_secs_f64())
}

/// A child's standard output and error, taken, to be read line by line.
pub(super) fn output_streams(child: &mut std::process::Child) -> Vec<Box<dyn Read + Send>> {
    [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect()
}

pub(super) fn run_step_now(
    step: &Step,
    label: &str,
    sink: Option<&LogSink>,
    progress: &Progress,
    on_builds: Option<OnBuilds<'_>>,
    data: Option<&[u8]>,
) -> (Option<i32>, String) {
    let header = format!(
        "[{label}] {}: {} ({})",
        step.kind.stage(),
        step.command_line(),
        step.host_label()
    );
    // One short line per step for people; the command itself with -v, and always in the log.
    if progress.verbose() {
        progress.event(&header);
    } else if let Some(what) = step.kind.describe()
        && !step.kind.said_by_its_stage()
    {
        progress.event(&format!("[{label}] {what} ({})", step.host_label()));
    }
    if let Some(sink) = sink {
        sink.write(&format!(
            "{} {header}\n$ {}\n",
            timestamp(),
            step.local_argv().join(" ")
        ));
    }
    let argv = step.local_argv();
    // Remote commands that stop when their input ends get an input we hold open.
    let hangup = matches!(
        &step.runner,
        Runner::Remote {
            command: RemoteCommand::UntilHangup(_),
            ..
        }
    );
    let password = match &step.runner {
        Runner::Remote { command, .. } if command.reads_password() => sudo_password(),
        _ => None,
    };
    let child = crate::process::spawn(
        Command::new(&argv[0])
            .args(&argv[1..])
            .envs(step.local_env().iter().map(|(k, v)| (k, v))),
        hangup || password.is_some() || data.is_some(),
    );
    let mut child = match child {
        Ok(child) => child,
        Err(e) => return (None, format!("cannot run {}: {e}", argv[0])),
    };
    let collected = Arc::new(Mutex::new(String::new()));
    let streams = output_streams(&mut child);
    let mut input = child.stdin.take();
    if let (Some(password), Some(stdin)) = (password, input.as_mut()) {
        let line = zeroize::Zeroizing::new(format!("{}\n", password.as_str()));
        let _ = crate::process::write_to_child(stdin, line.as_bytes());
        if !hangup && data.is_none() {
            input = None; // sudo has its line; the command gets end-of-file
        }
    }
    let code = thread::scope(|scope| {
        // Data for the command, from a thread of its own (the output is read meanwhile);
        // then end-of-file.
        if let Some(data) = data
            && let Some(stdin) = input.take()
        {
            scope.spawn(move || {
                let _ = crate::process::feed(stdin, data);
            });
        }
        for stream in streams {
            let collected = Arc::clone(&collected);
            scope.spawn(move || {
                let mut nix = crate::nixlog::Reader::default();
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let line = match nix.read(&line) {
                        crate::nixlog::Event::Text(text) => text,
                        crate::nixlog::Event::Builds { done, expected } => {
                            if let Some(on_builds) = on_builds {
                                on_builds(done, expected);
                            }
                            continue;
                        }
                        crate::nixlog::Event::Nothing => continue,
                    };
                    progress.output(label, &line);
                    let mut all = collected.lock().expect("output lock");
                    all.push_str(&line);
                    all.push('\n');
                }
            });
        }
        wait_or_stop(&mut child, &mut input, step.kind.stoppable())
    });
    let output = collected.lock().expect("output lock").clone();
    if let Some(sink) = sink {
        sink.write(&format!("{output}(exit {code:?})\n\n"));
    }
    (code, output)
}

/// Waits for `child`; after Ctrl-C, stops it if it is `stoppable` (builds and copies, not
/// activations): by ending its input (remote commands stop by themselves then), else by
/// SIGTERM to its process group, and SIGKILL if it lingers.
fn wait_or_stop(
    child: &mut std::process::Child,
    input: &mut Option<std::process::ChildStdin>,
    stoppable: bool,
) -> Option<i32> {
    let mut stopping_since: Option<Instant> = None;
    let mut polls = 0;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.code(),
            Ok(None) => {}
            Err(_) => return None,
        }
        if stoppable && crate::interrupt::requested() {
            match stopping_since {
                None => {
                    stopping_since = Some(Instant::now());
                    if input.take().is_none() {
                        terminate_group(child.id());
                    }
                }
                Some(since) if since.elapsed() > Duration::from_secs(15) => {
                    let _ = child.kill();
                }
                Some(_) => {}
            }
        }
        thread::sleep(crate::process::poll_interval(polls));
        polls += 1;
    }
}

/// SIGTERM to the process group that `leader` leads (children run with `process_group(0)`).
/// The syscall, not `/usr/bin/kill`: procps's `kill -TERM -PGID` reads the group as an
/// option and signals every process instead.
pub(super) fn terminate_group(leader: u32) {
    let Ok(pgid) = libc::pid_t::try_from(leader) else {
        return;
    };
    if pgid > 1 {
        // SAFETY: kill(2) has no memory effects; a negative pid names one process group.
        unsafe {
            libc::kill(-pgid, libc::SIGTERM);
        }
    }
}
