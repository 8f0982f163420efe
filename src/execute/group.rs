//! A build group: its derivations copied once, one batch realise, and meanwhile the builder
//! asked which toplevels are valid, so each machine goes on as soon as its own is built.

use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use super::step::{quiet, run_in_session, run_step};
use super::{Built, LogSink, interrupted};
use crate::connection::Connections;
use crate::diagnostics::diagnose;
use crate::plan::{BuildGroup, Builder, DeployPlan, Step};
use crate::progress::Progress;

/// Copies, realises and follows one build group; reports each member as soon as its
/// toplevel is valid on the builder, or why it is not.
pub(super) fn run_group(
    plan: &DeployPlan,
    group: &BuildGroup,
    sink: &LogSink,
    progress: &Progress,
    connections: &Connections,
    built: &mpsc::Sender<Built>,
) {
    let started = Instant::now();
    let label = group.label();
    for &i in &group.members {
        progress.stage(i, &format!("building on the {label}"));
    }
    let fail_all = |step: &Step, output: &str, code: Option<i32>, members: &[usize]| {
        for &i in members {
            let error = diagnose(&plan.machines[i].machine, step, output, code);
            let _ = built.send((i, Err(error)));
        }
    };
    let (realise, setup) = group.steps.split_last().expect("a group always realises");
    let stop_all = |members: &[usize], when: &str| {
        for &i in members {
            let _ = built.send((i, Err(interrupted(&plan.machines[i].machine.name, when))));
        }
    };
    for step in setup {
        if crate::interrupt::requested() {
            return stop_all(&group.members, "before its build");
        }
        let (code, output) = run_step(step, &label, Some(sink), progress, connections);
        if code != Some(0) {
            return fail_all(step, &output, code, &group.members);
        }
    }

    // Nix's build count says when a build finished, and the builder is asked then; the
    // timer only catches what that misses.
    let poll = if group_polls_cheaply(group) {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(2)
    };
    // The realise runs while the builder is asked, now and then, what is built so far.
    // A new line only when another build finished (plain output would repeat it otherwise).
    let last_done = Mutex::new(None);
    // A build that finished may be a member's system: the builder is asked at once (and
    // once more shortly after, should its output not be registered yet).
    let finished = std::sync::atomic::AtomicBool::new(false);
    let on_builds = |done: u64, expected: u64| {
        let mut last = last_done.lock().expect("progress lock");
        // From the first finished build on: "0/N built" says nothing the stage line does not.
        if expected > 0 && done > 0 && *last != Some(done) {
            let quarter = |n: u64| (n * 4) / expected;
            let before = last.map_or(0, quarter);
            *last = Some(done);
            finished.store(true, std::sync::atomic::Ordering::SeqCst);
            if progress.is_live() {
                // Each member's line is redrawn in place.
                for &i in &group.members {
                    progress.stage(
                        i,
                        &format!("building on the {label}: {done}/{expected} built"),
                    );
                }
            } else if quarter(done) > before || done == expected {
                // Plain output: one line for the group, each quarter of the way.
                progress.event(&format!("[{label}] {done}/{expected} built"));
            }
        }
    };
    let (code, output, pending) = thread::scope(|scope| {
        let handle = scope.spawn(|| {
            run_in_session(
                realise,
                &label,
                Some(sink),
                progress,
                connections,
                Some(&on_builds),
                None,
            )
        });
        let mut pending: Vec<usize> = group.members.clone();
        let mut next_poll = Instant::now() + poll;
        let mut polls = 0;
        while !handle.is_finished() {
            let event = finished.swap(false, std::sync::atomic::Ordering::SeqCst);
            if (event || Instant::now() >= next_poll) && !pending.is_empty() {
                let before = pending.len();
                pending = report_valid(plan, group, pending, started, connections, built);
                next_poll = if event && pending.len() == before && group_polls_cheaply(group) {
                    Instant::now() + Duration::from_millis(50)
                } else {
                    Instant::now() + poll
                };
            }
            thread::sleep(crate::process::poll_interval(polls));
            polls += 1;
        }
        let (code, output) = handle.join().expect("realise thread");
        (code, output, pending)
    });
    // A realise that succeeded built every toplevel it was given: nothing to ask.
    let pending = if code == Some(0) {
        for &i in &pending {
            let _ = built.send((i, Ok(started.elapsed())));
        }
        Vec::new()
    } else {
        report_valid(plan, group, pending, started, connections, built)
    };
    if !pending.is_empty() && crate::interrupt::requested() {
        return stop_all(&pending, "during its build");
    }
    if !pending.is_empty() {
        fail_all(realise, &output, code.or(Some(1)), &pending);
    }
}

/// Whether asking the builder is cheap: local, or over a shared connection.
fn group_polls_cheaply(group: &BuildGroup) -> bool {
    match &group.builder {
        Builder::Local => true,
        Builder::Remote { host, .. } => host.control_path.is_some(),
    }
}

/// Sends every pending member whose toplevel is valid; returns those still pending.
fn report_valid(
    plan: &DeployPlan,
    group: &BuildGroup,
    pending: Vec<usize>,
    started: Instant,
    connections: &Connections,
    built: &mpsc::Sender<Built>,
) -> Vec<usize> {
    let outputs: Vec<&str> = pending
        .iter()
        .map(|&i| plan.machines[i].machine.out_path().as_str())
        .collect();
    let step = group.validity_step(&outputs);
    let Ok(out) = quiet(&step, connections) else {
        return pending;
    };
    // Exit 0 or 1 both list the invalid paths; anything else (ssh failed) tells nothing.
    if !matches!(out.status.code(), Some(0 | 1)) {
        return pending;
    }
    let invalid = String::from_utf8_lossy(&out.stdout);
    let invalid: Vec<&str> = invalid.lines().map(str::trim).collect();
    let mut still = Vec::new();
    for i in pending {
        if invalid.contains(&plan.machines[i].machine.out_path().as_str()) {
            still.push(i);
        } else {
            let _ = built.send((i, Ok(started.elapsed())));
        }
    }
    still
}
