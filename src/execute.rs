//! Execution: runs a [`DeployPlan`] step by step, streaming each command's output with the
//! machine's name in front, and turns a failure into a diagnosis. After a failure only the
//! clean-up steps of that machine still run.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::diagnostics::diagnose;
use crate::error::Error;
use crate::plan::{DeployPlan, MachinePlan, Step};

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

/// Runs every machine of `plan`, one after the other.
pub fn run_plan(plan: &DeployPlan) -> Vec<(String, Outcome)> {
    plan.machines
        .iter()
        .map(|m| (m.machine.name.clone(), run_machine(m)))
        .collect()
}

fn run_machine(plan: &MachinePlan) -> Outcome {
    let name = &plan.machine.name;
    let started = Instant::now();
    let mut failure: Option<Error> = None;
    for step in &plan.steps {
        if failure.is_some() && !step.kind.always_runs() {
            continue;
        }
        eprintln!(
            "[{name}] {}: {} ({})",
            step.kind.stage(),
            step.command_line(),
            step.host_label()
        );
        let (code, output) = run_step(name, step);
        if code != Some(0) {
            let error = diagnose(&plan.machine, step, &output, code);
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
