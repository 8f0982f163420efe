//! Child processes that Ctrl-C can stop: each runs in a process group of its own (so the
//! terminal's SIGINT reaches clan only, which decides), is polled together with the
//! interrupt flag, and is stopped with its whole group when Ctrl-C was pressed. Used for
//! the work before the deploy proper (evaluation, preflight probes, sudo checks); the
//! deploy's own steps stop as `execute` decides (builds and copies, not activations).

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The error of a process that Ctrl-C stopped.
pub fn interrupted() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Interrupted, "interrupted by Ctrl-C")
}

/// Starts `command` the one way clan starts children: in a process group of its own (the
/// terminal's Ctrl-C reaches clan only, which decides what stops), its output piped, its
/// standard input piped when it gets `input`, else none.
pub fn spawn(command: &mut Command, input: bool) -> std::io::Result<std::process::Child> {
    command
        .stdin(if input { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
}

/// Runs `command` to its end, with `input` on its standard input (else none), and returns
/// its output; stops it (SIGTERM to its group, SIGKILL after 5 s) and returns
/// [`interrupted`] if Ctrl-C is pressed meanwhile.
pub fn run(command: &mut Command, input: Option<&[u8]>) -> std::io::Result<Output> {
    run_watching(command, input, &mut |_, _| true)
}

/// [`run`], with each line of the child's standard error given to `watch` (the line, the
/// child's pid) as it comes; when `watch` says false, the child is stopped (SIGTERM to its
/// group) and its output so far returned with the status it ended with. Its standard error
/// is returned whole as well.
pub fn run_watching(
    command: &mut Command,
    input: Option<&[u8]>,
    watch: &mut dyn FnMut(&str, u32) -> bool,
) -> std::io::Result<Output> {
    if crate::interrupt::requested() {
        return Err(interrupted());
    }
    let mut child = spawn(command, input.is_some())?;
    // Written from a thread of its own: a large input and a chatty child cannot block each
    // other. Dropping the pipe afterwards ends the child's input.
    let writer = match (input, child.stdin.take()) {
        (Some(input), Some(stdin)) => {
            let input = zeroize::Zeroizing::new(input.to_vec());
            Some(thread::spawn(move || {
                let _ = feed(stdin, &input);
            }))
        }
        _ => None,
    };
    let read = |stream: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut stream) = stream {
                let _ = stream.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = read(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    // Standard error line by line, each line passed on as it comes.
    let (lines, stderr_lines) = std::sync::mpsc::channel::<Vec<u8>>();
    let stderr = child.stderr.take().map(|s| {
        thread::spawn(move || {
            let mut reader = std::io::BufReader::new(s);
            loop {
                let mut line = Vec::new();
                match std::io::BufRead::read_until(&mut reader, b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if lines.send(line).is_err() {
                            return;
                        }
                    }
                }
            }
        })
    });
    let mut stderr_bytes = Vec::new();
    let mut watched = true;
    let mut take_lines = |stderr_bytes: &mut Vec<u8>, watched: &mut bool, pid: u32| {
        while let Ok(line) = stderr_lines.try_recv() {
            if *watched {
                let text = String::from_utf8_lossy(&line);
                if !watch(text.trim_end_matches('\n'), pid) {
                    *watched = false;
                    signal_group(pid, libc::SIGTERM);
                }
            }
            stderr_bytes.extend_from_slice(&line);
        }
    };
    let mut stopping: Option<Instant> = None;
    let mut polls = 0;
    let status = loop {
        take_lines(&mut stderr_bytes, &mut watched, child.id());
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if crate::interrupt::requested() {
            match stopping {
                None => {
                    signal_group(child.id(), libc::SIGTERM);
                    stopping = Some(Instant::now());
                }
                Some(since) if since.elapsed() > Duration::from_secs(5) => {
                    signal_group(child.id(), libc::SIGKILL);
                }
                Some(_) => {}
            }
        }
        thread::sleep(poll_interval(polls));
        polls += 1;
    };
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    if let Some(reader) = stderr {
        let _ = reader.join();
    }
    take_lines(&mut stderr_bytes, &mut watched, child.id());
    let output = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr_bytes,
    };
    if stopping.is_some() {
        return Err(interrupted());
    }
    Ok(output)
}

/// How long to sleep before the `n`th check of a running child: short at first (most
/// remote steps end within milliseconds, and each step's end is on the critical path), then
/// longer, so a long build is checked 50 times a second at most.
pub fn poll_interval(n: u32) -> Duration {
    match n {
        0..=49 => Duration::from_millis(1),
        50..=99 => Duration::from_millis(5),
        _ => Duration::from_millis(20),
    }
}

/// Writes `data` to a child's input from a thread of its own (see [`write_to_child`]).
pub fn feed(mut input: std::process::ChildStdin, data: &[u8]) -> std::io::Result<()> {
    write_to_child(&mut input, data)
}

/// Writes `data` to a child's input with SIGPIPE blocked meanwhile: a child that is gone
/// makes the write fail (EPIPE) instead of killing clan, whose SIGPIPE is the default (for
/// `clan … | head`). The SIGPIPE such a write raises for this thread is taken before the
/// mask is restored, so it is never delivered later.
pub fn write_to_child(input: &mut std::process::ChildStdin, data: &[u8]) -> std::io::Result<()> {
    // SAFETY: changes and restores this thread's signal mask only, and takes a pending
    // SIGPIPE of this thread; the sets are initialised before use.
    unsafe {
        let mut pipe: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut pipe);
        libc::sigaddset(&mut pipe, libc::SIGPIPE);
        let mut before: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &pipe, &mut before);
        let result = input.write_all(data).and_then(|()| input.flush());
        if matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe) {
            let now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            libc::sigtimedwait(&pipe, std::ptr::null_mut(), &now);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
        result
    }
}

/// Sends `signal` to the process group that `leader` leads.
fn signal_group(leader: u32, signal: libc::c_int) {
    if let Ok(pgid) = libc::pid_t::try_from(leader)
        && pgid > 1
    {
        // SAFETY: kill(2) has no memory effects; a negative pid names one process group.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_input_pass_through() {
        let out = run(
            Command::new("sh").args(["-c", "read l; echo \"got $l\"; echo err >&2"]),
            Some(b"x\n"),
        )
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "got x\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
        assert!(out.status.success());
    }

    #[test]
    fn a_watcher_sees_each_line_as_it_comes_and_can_stop_the_child() {
        let mut seen = Vec::new();
        let out = run_watching(
            Command::new("sh").args(["-c", "echo one >&2; echo two >&2; exec sleep 30"]),
            None,
            &mut |line, _| {
                seen.push(line.to_string());
                line != "two"
            },
        )
        .unwrap();
        assert_eq!(seen, ["one", "two"]);
        assert_eq!(String::from_utf8_lossy(&out.stderr), "one\ntwo\n");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&out.status),
            Some(libc::SIGTERM)
        );
    }
}
