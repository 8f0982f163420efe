//! Execution: runs a [`DeployPlan`] step by step, streaming each command's output with the
//! machine's name in front, and turns a failure into a diagnosis. After a failure only the
//! clean-up steps of that machine still run.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::connection::Connections;
use crate::diagnostics::diagnose;
use crate::error::{Error, Hint};
use crate::plan::{DeployPlan, MachinePlan, Runner, Step};

/// How one machine's deploy ended.
#[derive(Debug)]
pub enum Outcome {
    /// The new system is active.
    Deployed {
        /// Wall time of the deploy.
        elapsed: Duration,
    },
    /// It failed; the error says where and what to do.
    Failed(Error),
}

/// Every command and its full output, for when the summary is not enough.
#[derive(Debug)]
pub struct Log {
    path: Option<std::path::PathBuf>,
    file: Mutex<Option<std::fs::File>>,
}

impl Log {
    /// A log for run `run_id` under `$XDG_STATE_HOME/clan/logs` (or `~/.local/state/clan/logs`).
    pub fn create(run_id: &str) -> Log {
        let dir = std::env::var_os("XDG_STATE_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".local/state"))
            })
            .map(|d| d.join("clan/logs"));
        let opened = dir.and_then(|dir| {
            std::fs::create_dir_all(&dir).ok()?;
            let path = dir.join(format!("deploy-{run_id}.log"));
            let file = std::fs::File::create(&path).ok()?;
            Some((path, file))
        });
        let (path, file) = match opened {
            Some((path, file)) => (Some(path), Some(file)),
            None => (None, None),
        };
        Log {
            path,
            file: Mutex::new(file),
        }
    }

    fn write(&self, text: &str) {
        if let Some(file) = self.file.lock().expect("log lock").as_mut() {
            let _ = file.write_all(text.as_bytes());
        }
    }

    /// Where the log is, if it could be created.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }
}

/// Runs every machine of `plan`, one after the other, over the shared `connections`.
pub fn run_plan(plan: &DeployPlan, connections: &Connections, log: &Log) -> Vec<(String, Outcome)> {
    plan.machines
        .iter()
        .map(|m| (m.machine.name.clone(), run_machine(m, connections, log)))
        .collect()
}

fn run_machine(plan: &MachinePlan, connections: &Connections, log: &Log) -> Outcome {
    let name = &plan.machine.name;
    let started = Instant::now();
    // Shared connections first: workstation steps (nix copy) use them too. A failure is not
    // fatal here: ssh then connects on its own, and that connection's error is diagnosed.
    for step in &plan.steps {
        if let Runner::Remote { host, .. } = &step.runner {
            let _ = connections.open(host);
        }
    }
    let mut failure: Option<Error> = None;
    for step in &plan.steps {
        if failure.is_some() && !step.kind.always_runs() {
            continue;
        }
        let header = format!(
            "[{name}] {}: {} ({})",
            step.kind.stage(),
            step.command_line(),
            step.host_label()
        );
        eprintln!("{header}");
        log.write(&format!("{header}\n$ {}\n", step.local_argv().join(" ")));
        let (code, output) = run_step(name, step);
        log.write(&format!("{output}(exit {code:?})\n\n"));
        if code != Some(0) {
            let mut error = diagnose(&plan.machine, step, &output, code);
            if let Some(path) = log.path() {
                error = error.hint(Hint::text(format!("full log: {}", path.display())));
            }
            if failure.is_none() {
                failure = Some(error);
            } else {
                eprintln!("[{name}] warning: clean-up failed: {}", error.message);
            }
        }
    }
    match failure {
        Some(error) => Outcome::Failed(error),
        None => Outcome::Deployed {
            elapsed: started.elapsed(),
        },
    }
}

/// Runs one step, echoing its output as `[machine]   | line`; returns exit code and output.
fn run_step(name: &str, step: &Step) -> (Option<i32>, String) {
    let argv = step.local_argv();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(step.local_env().iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => return (None, format!("cannot run {}: {e}", argv[0])),
    };
    let collected = Arc::new(Mutex::new(String::new()));
    let readers: Vec<_> = [
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
    .map(|stream| {
        let collected = Arc::clone(&collected);
        let prefix = format!("[{name}]   | ");
        thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
                let mut all = collected.lock().expect("output lock");
                all.push_str(&line);
                all.push('\n');
            }
        })
    })
    .collect();
    for reader in readers {
        let _ = reader.join();
    }
    let code = child.wait().ok().and_then(|s| s.code());
    let output = collected.lock().expect("output lock").clone();
    (code, output)
}
