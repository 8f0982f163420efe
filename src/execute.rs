//! Execution: runs a [`DeployPlan`].
//!
//! Each build group runs in its own thread: derivations copied once, one batch
//! `nix-store --realise --keep-going`, and meanwhile the builder is asked which toplevels are
//! valid so far. A machine whose toplevel is built goes on at once to its copy and
//! activation, at most `jobs` at a time, independently of the others. After a failure a
//! machine stops; the others go on unless `fail_fast`. Nothing is activated for a machine
//! whose build or copy failed. Every command's full output goes to the run's log directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::connection::{Connections, Semaphore};
use crate::diagnostics::diagnose;
use crate::error::{Error, ExitKind, Hint};
use std::os::unix::process::CommandExt;

use crate::plan::{
    Action, BuildGroup, Builder, DeployPlan, MachinePlan, Runner, Stage, Step, StepKind,
    TargetState,
};
use crate::progress::Progress;
use crate::ssh::RemoteCommand;

/// How one machine's deploy ended.
#[derive(Debug)]
pub enum Outcome {
    /// The new system is active.
    Deployed,
    /// `--action dry-activate` showed what switching would do; nothing changed.
    DryActivated,
    /// The target runs this very system already (and its profile points to it): nothing
    /// was built, copied or activated.
    UpToDate,
    /// It failed; the error says where and what to do.
    Failed(Error),
    /// Not attempted: `--fail-fast` stopped the run first.
    Skipped,
    /// Not started: a rolling deploy stopped before its batch (why).
    NotStarted(String),
}

/// What happened to one machine, for the summary and `--json`.
#[derive(Debug)]
pub struct MachineReport {
    /// Machine name.
    pub name: String,
    /// Where it was built.
    pub build_host: String,
    /// Where it was deployed.
    pub target: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Time spent in each stage.
    pub stages: BTreeMap<Stage, Duration>,
    /// What the new system changed against the previous one, if it was summarised.
    pub changes: Option<String>,
    /// Its log file.
    pub log: Option<PathBuf>,
}

impl MachineReport {
    /// A machine that never got to its build: evaluation, preflight or sudo failed, or a
    /// rollout stopped first. `target` is `-` when it was never resolved.
    pub fn not_run(name: &str, target: String, outcome: Outcome) -> MachineReport {
        MachineReport {
            name: name.to_string(),
            build_host: "-".into(),
            target,
            outcome,
            stages: BTreeMap::new(),
            changes: None,
            log: None,
        }
    }
}

/// The machines of `plan` that have nothing to do: their target runs the very system and
/// (for `switch`) its profile points to it, and they upload no secrets. One round trip
/// each, over the target's shared connection, all at once; a target that cannot be asked
/// is not up to date (the deploy then finds out why).
pub fn up_to_date(plan: &DeployPlan, connections: &Connections) -> BTreeSet<usize> {
    let candidates: Vec<usize> = plan
        .machines
        .iter()
        .enumerate()
        .filter(|(_, m)| {
            m.machine.secrets.is_none() && matches!(m.action, Action::Switch | Action::Test)
        })
        .map(|(i, _)| i)
        .collect();
    thread::scope(|scope| {
        let handles: Vec<_> = candidates
            .iter()
            .map(|&i| {
                scope.spawn(move || {
                    let m = &plan.machines[i];
                    let check = m.present_check();
                    if let Runner::Remote { host, .. } = &check.runner {
                        let _ = connections.open(host);
                    }
                    let Ok(out) = quiet(check, connections) else {
                        return None;
                    };
                    let running = out.status.code() == Some(0);
                    let profile = String::from_utf8_lossy(&out.stdout).contains("profile-current");
                    (running && (profile || m.action == Action::Test)).then_some(i)
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok().flatten())
            .collect()
    })
}

/// Knobs of a run.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Copies and activations at once.
    pub jobs: usize,
    /// Stop starting new work after the first failure.
    pub fail_fast: bool,
}

/// The run's log directory: one file per machine and per build group.
#[derive(Debug)]
pub struct Logs {
    dir: Option<PathBuf>,
}

impl Logs {
    /// `$XDG_STATE_HOME/clan/logs/<run>` (or `~/.local/state/clan/logs/<run>`).
    /// Directories are private (0700) and files 0600: logs hold build output and host names.
    pub fn create(run_id: &str) -> Logs {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
            .map(|d| d.join("clan/logs").join(run_id))
            .filter(|d| {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(d)
                    .is_ok()
            });
        // `recursive` applies the mode to every directory it creates; the run's own must be
        // private even when its parents existed.
        if let Some(d) = &dir {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700));
        }
        Logs { dir }
    }

    /// The log of machine `name` (a checked name: safe as a file name).
    fn machine(&self, name: &crate::boundary::MachineName) -> LogSink {
        self.sink(&format!("machine-{name}"))
    }

    /// The log of build group `g`.
    fn group(&self, g: usize) -> LogSink {
        self.sink(&format!("build-{g}"))
    }

    /// The directory, if it could be created.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn sink(&self, name: &str) -> LogSink {
        let path = self.dir.as_ref().map(|d| d.join(format!("{name}.log")));
        let file = path.as_ref().and_then(|p| {
            use std::os::unix::fs::OpenOptionsExt;
            // Appended to: a rolling deploy's batches share the run's log directory.
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(p)
                .ok()
        });
        LogSink {
            path,
            file: Mutex::new(file),
        }
    }
}

struct LogSink {
    path: Option<PathBuf>,
    file: Mutex<Option<File>>,
}

impl LogSink {
    fn write(&self, text: &str) {
        if let Some(file) = self.file.lock().expect("log lock").as_mut() {
            let _ = file.write_all(text.as_bytes());
        }
    }
}

/// How a machine ended, how long each stage took, what its activation changed.
type Ended = (Outcome, BTreeMap<Stage, Duration>, Option<String>);

/// A machine's build result, sent by its group: how long it took, or why it failed.
type Built = (usize, Result<Duration, Error>);

/// Runs the plan; returns one report per machine, in the plan's order.
pub fn run_plan(
    plan: &DeployPlan,
    connections: &Connections,
    logs: &Logs,
    progress: &Progress,
    options: RunOptions,
) -> Vec<MachineReport> {
    let stop = AtomicBool::new(false);
    let jobs = Semaphore::new(options.jobs);
    let sinks: Vec<LogSink> = plan
        .machines
        .iter()
        .map(|m| logs.machine(&m.machine.name))
        .collect();
    let results: Mutex<Vec<Option<Ended>>> =
        Mutex::new(plan.machines.iter().map(|_| None).collect());
    let record =
        |i: usize, outcome: Outcome, stages: BTreeMap<Stage, Duration>, changes: Option<String>| {
            let failed = matches!(outcome, Outcome::Failed(_));
            match &outcome {
                Outcome::Deployed => progress.finish(i, true, "deployed"),
                Outcome::DryActivated => progress.finish(i, true, "dry-activated"),
                Outcome::UpToDate => progress.finish(i, true, "up to date"),
                Outcome::Failed(e) => progress.finish(i, false, &format!("failed: {}", e.message)),
                Outcome::Skipped => progress.finish(i, false, "skipped (--fail-fast)"),
                Outcome::NotStarted(why) => progress.finish(i, false, why),
            }
            results.lock().expect("results lock")[i] = Some((outcome, stages, changes));
            if failed && options.fail_fast {
                stop.store(true, Ordering::SeqCst);
            }
        };

    // Shared connections first: every command of a host goes through them. A failure is not
    // fatal here: ssh then connects on its own, and that connection's error is diagnosed.
    let hosts: Vec<&crate::ssh::SshHost> = plan
        .groups
        .iter()
        .filter_map(|g| match &g.builder {
            Builder::Remote { host, .. } => Some(host),
            Builder::Local => None,
        })
        .chain(plan.machines.iter().flat_map(|m| {
            m.steps.iter().filter_map(|s| match &s.runner {
                Runner::Remote { host, .. } => Some(host),
                Runner::Workstation(_) => None,
            })
        }))
        .collect();
    thread::scope(|scope| {
        for host in hosts {
            scope.spawn(move || {
                let _ = connections.open(host);
            });
        }
    });

    thread::scope(|scope| {
        let (built_tx, built_rx) = mpsc::channel::<Built>();
        for (g, group) in plan.groups.iter().enumerate() {
            let tx = built_tx.clone();
            let sink = logs.group(g);
            scope.spawn(move || run_group(plan, group, &sink, progress, connections, &tx));
        }
        drop(built_tx);
        for (i, built) in built_rx {
            let mut stages = BTreeMap::new();
            match built {
                Err(error) => record(i, Outcome::Failed(with_log(error, &sinks[i])), stages, None),
                Ok(build_time) => {
                    stages.insert(Stage::Build, build_time);
                    let (jobs, stop, record, sinks) = (&jobs, &stop, &record, &sinks);
                    scope.spawn(move || {
                        let _permit = jobs.acquire();
                        if stop.load(Ordering::SeqCst) {
                            return record(i, Outcome::Skipped, stages, None);
                        }
                        if crate::interrupt::requested() {
                            let error =
                                interrupted(&plan.machines[i].machine.name, "after its build");
                            return record(i, Outcome::Failed(error), stages, None);
                        }
                        let mut changes = None;
                        let outcome = run_machine(
                            &plan.machines[i],
                            i,
                            &sinks[i],
                            progress,
                            connections,
                            &mut stages,
                            &mut changes,
                        );
                        record(i, outcome, stages, changes);
                    });
                }
            }
        }
    });

    // The GC roots go last: for machines that build on their target, only now does the
    // system profile hold the output.
    thread::scope(|scope| {
        for (g, group) in plan.groups.iter().enumerate() {
            scope.spawn(move || {
                let (code, output) = run_step(
                    &group.cleanup,
                    &format!("build{g}"),
                    None,
                    progress,
                    connections,
                );
                if code != Some(0) {
                    progress.event(&format!(
                        "warning: removing the temporary GC root on the {} failed: {}",
                        group.label(),
                        output.trim()
                    ));
                }
            });
        }
    });

    let results = results.into_inner().expect("results lock");
    plan.machines
        .iter()
        .zip(results)
        .zip(sinks)
        .map(|((m, result), sink)| {
            let (outcome, stages, changes) =
                result.unwrap_or((Outcome::Skipped, BTreeMap::new(), None));
            MachineReport {
                name: m.machine.name.to_string(),
                build_host: plan.groups[m.group].label(),
                target: m.machine.target.value.to_string(),
                outcome,
                stages,
                changes,
                log: sink.path,
            }
        })
        .collect()
}

/// The sudo password for targets that need one: read once, kept in memory only, written to
/// the standard input of the commands that ask sudo to read it.
static SUDO_PASSWORD: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Whether the run's sudo password was read already.
pub fn has_sudo_password() -> bool {
    SUDO_PASSWORD.get().is_some()
}

/// Sets the sudo password for this run.
pub fn set_sudo_password(password: String) {
    let _ = SUDO_PASSWORD.set(password);
}

/// What Ctrl-C left a machine in: stopped `when`, nothing activated.
fn interrupted(machine: &str, when: &str) -> Error {
    Error::new(format!(
        "{machine}: interrupted {when}: nothing was activated on its target"
    ))
    .exit(ExitKind::Interrupted)
}

fn with_log(error: Error, sink: &LogSink) -> Error {
    match &sink.path {
        Some(path) => error.hint(Hint::text(format!("full log: {}", path.display()))),
        None => error,
    }
}

/// Copies, realises and follows one build group; reports each member as soon as its
/// toplevel is valid on the builder, or why it is not.
fn run_group(
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

    let poll = if group_polls_cheaply(group) {
        Duration::from_millis(300)
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
            *last = Some(done);
            finished.store(true, std::sync::atomic::Ordering::SeqCst);
            for &i in &group.members {
                progress.stage(
                    i,
                    &format!("building on the {label}: {done}/{expected} built"),
                );
            }
        }
    };
    let (code, output, pending) = thread::scope(|scope| {
        let handle = scope.spawn(|| {
            session_of(realise, connections).run(|| {
                run_step_now(
                    realise,
                    &label,
                    Some(sink),
                    progress,
                    Some(&on_builds),
                    None,
                )
            })
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
    let pending = report_valid(plan, group, pending, started, connections, built);
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
        .map(|&i| plan.machines[i].machine.out_path.as_str())
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
        if invalid.contains(&plan.machines[i].machine.out_path.as_str()) {
            still.push(i);
        } else {
            let _ = built.send((i, Ok(started.elapsed())));
        }
    }
    still
}

/// Copies one machine's system to its target and activates it: its steps in order, each
/// where its [`When`] holds for what the target has of the system.
fn run_machine(
    plan: &MachinePlan,
    i: usize,
    sink: &LogSink,
    progress: &Progress,
    connections: &Connections,
    stages: &mut BTreeMap<Stage, Duration>,
    changes: &mut Option<String>,
) -> Outcome {
    let mut run = MachineRun {
        plan,
        name: plan.machine.name.as_str(),
        i,
        sink,
        progress,
        connections,
        state: TargetState::Absent,
        lock: None,
        changes: None,
        activated: false,
    };
    let mut current = None;
    for step in &plan.steps {
        if !step.when.holds(run.state) {
            continue;
        }
        let stage = step.kind.stage();
        // Until the profile or the running system is touched, Ctrl-C stops the machine;
        // from then on, activation finishes.
        if !step.kind.changes_target_system() && crate::interrupt::requested() {
            return Outcome::Failed(interrupted(run.name, "before its activation"));
        }
        if current != Some(stage) && step.kind.describe().is_some() {
            current = Some(stage);
            progress.stage(
                i,
                match stage {
                    Stage::CopyToTarget => "copying to the target",
                    _ => "activating",
                },
            );
        }
        let started = Instant::now();
        let result = run.step(step);
        *stages.entry(stage).or_default() += started.elapsed();
        if let Err(error) = result {
            *changes = run.changes;
            return Outcome::Failed(with_log(error, sink));
        }
    }
    *changes = run.changes;
    if run.activated {
        Outcome::Deployed
    } else {
        Outcome::DryActivated
    }
}

/// One machine's run through its steps: what the steps learnt so far.
struct MachineRun<'a> {
    plan: &'a MachinePlan,
    name: &'a str,
    i: usize,
    sink: &'a LogSink,
    progress: &'a Progress,
    connections: &'a Connections,
    /// What the target has of the system ([`StepKind::CheckPresent`]).
    state: TargetState,
    /// The target's deploy lock, held until this machine is done (dropped with the run).
    lock: Option<LockGuard>,
    /// What the new system changes ([`StepKind::Diff`]).
    changes: Option<String>,
    /// Whether anything was activated (not `dry-activate`).
    activated: bool,
}

impl MachineRun<'_> {
    /// Runs one step. Most steps are a command that must succeed; the operations below
    /// are the ones that do more with what their command says. A new operation that only
    /// runs a command needs no arm here.
    fn step(&mut self, step: &Step) -> Result<(), Error> {
        match step.kind {
            StepKind::CheckPresent => {
                self.state = TargetState::from_exit(
                    quiet(step, self.connections)
                        .ok()
                        .and_then(|o| o.status.code()),
                );
                match self.state {
                    TargetState::Running => self
                        .progress
                        .stage(self.i, "already running this system: re-activating"),
                    TargetState::Present => self
                        .progress
                        .stage(self.i, "already on the target: no copy"),
                    TargetState::Absent => {}
                }
                Ok(())
            }
            StepKind::LockTarget => {
                let lock = hold_lock(step, self.name, self.sink, self.progress).map_err(
                    |(code, output)| {
                        if crate::interrupt::requested() {
                            interrupted(self.name, "while waiting for its target's lock")
                        } else {
                            diagnose(&self.plan.machine, step, &output, code)
                        }
                    },
                )?;
                self.lock = Some(lock);
                Ok(())
            }
            StepKind::UploadSecrets => {
                upload_secrets(self.plan, step, self.sink, self.progress, self.connections)
            }
            StepKind::Diff => {
                // The summary is a courtesy: a Nix without diff-closures does not stop a
                // deploy.
                let (code, output) = self.run(step);
                if code == Some(0) {
                    self.changes = Some(output).filter(|c| !c.trim().is_empty());
                } else {
                    self.progress.event(&format!(
                        "[{}] warning: no change summary: {}",
                        self.name,
                        output.trim()
                    ));
                }
                Ok(())
            }
            StepKind::HealthCheck => match self.run(step) {
                (Some(0), _) => Ok(()),
                (code, output) => Err(self.unhealthy(step, code, &output)),
            },
            _ => {
                if step.kind == StepKind::Prepare {
                    self.activated = true;
                }
                let (code, output) = self.run(step);
                if code == Some(0) {
                    return Ok(());
                }
                if step.kind.stage() != Stage::Activate && crate::interrupt::requested() {
                    return Err(interrupted(self.name, "while copying to the target"));
                }
                let error = diagnose(&self.plan.machine, step, &output, code);
                Err(match &step.on_failure {
                    Some(undo) => self.undo(undo, error),
                    None => error,
                })
            }
        }
    }

    /// Runs a step's command, retried while it has time to (see [`Step::retry_within`]).
    fn run(&self, step: &Step) -> (Option<i32>, String) {
        match step.retry_within {
            Some(within) => retry(step, within, self.name, self.sink, self.progress),
            None => run_step(
                step,
                self.name,
                Some(self.sink),
                self.progress,
                self.connections,
            ),
        }
    }

    /// After a failed switch: the target goes back to the generation it had before (see
    /// `clan-activate undo`); the error says where the profile points now.
    fn undo(&self, undo: &Step, error: Error) -> Error {
        let (code, output) = self.run(undo);
        let name = self.name;
        match (code, went_back_to(&output)) {
            (Some(0), Some(profile)) => {
                let (generation, path) = profile.split_once(' ').unwrap_or((&profile, ""));
                error.hint(Hint::text(match self.plan.action {
                    Action::Test => format!(
                        "the system profile was not touched (--action test): it points to generation {generation} ({path}), which the target switched back to"
                    ),
                    Action::Boot => format!(
                        "the system profile points to generation {generation} again ({path}): the next boot is the previous system; the failed generation was deleted"
                    ),
                    _ => format!(
                        "the system profile points to generation {generation} again ({path}) and the target switched back to it; the failed generation was deleted, so neither a rollback nor the boot menu offers it"
                    ),
                }))
            }
            (Some(3), _) => error.hint(Hint::text(
                "there is no previous generation to go back to (a first deploy): the profile still points to the failed system",
            )),
            _ => error.hint(Hint::text(format!(
                "going back to the previous generation failed too ({}): check the target, e.g. clan machines rollback {}",
                output.trim(),
                crate::ssh::quote(name)
            ))),
        }
    }

    /// A failed health check: the machine runs its new system, confirmed, but is
    /// unhealthy. With `--rollback-on-unhealthy` its step goes back to the generation the
    /// run found.
    fn unhealthy(&self, step: &Step, code: Option<i32>, output: &str) -> Error {
        let name = self.name;
        let why = match code {
            Some(124) => "it did not finish in time".to_string(),
            Some(c) => format!("it exited {c}"),
            None => "it could not be run".to_string(),
        };
        let error = Error::new(format!(
            "{name}: the health check failed on its target ({why}): the machine is unhealthy"
        ))
        .detail(output.to_string())
        .exit(ExitKind::PartiallyApplied);
        let Some(revert) = &step.on_failure else {
            return error.hint(Hint::text(format!(
                "it runs the new system; go back with clan machines rollback {name}, or deploy with --rollback-on-unhealthy"
            )));
        };
        let (code, out) = self.run(revert);
        match (code, went_back_to(&out)) {
            (Some(0), Some(profile)) => error.hint(Hint::text(format!(
                "rolled back (--rollback-on-unhealthy): the system profile points to generation {profile} again; the unhealthy generation was deleted"
            ))),
            _ => error.hint(Hint::text(format!(
                "rolling back failed too ({}): check the target, e.g. clan machines rollback {name}",
                out.trim()
            ))),
        }
    }
}

/// Where `clan-activate undo` or `revert` says the profile points now: `GENERATION PATH`.
fn went_back_to(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| l.strip_prefix("clan: profile "))
        .map(str::to_string)
}

/// The target's deploy lock: `clan-activate lock` holds it until its standard input ends,
/// which is when this value is dropped, or when this process dies (the ssh session ends).
pub(crate) struct LockGuard {
    child: std::process::Child,
    input: Option<std::process::ChildStdin>,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.input.take();
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
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| (None, format!("cannot run {}: {e}", argv[0])))?;
    let mut input = child.stdin.take();
    if let (Some(password), Some(stdin)) = (password, input.as_mut()) {
        let _ = stdin.write_all(format!("{password}\n").as_bytes());
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
                if line == "clan: acquired" {
                    return Ok(LockGuard { child, input });
                }
                if let Some(holder) = line.strip_prefix("clan: waiting ") {
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
fn hold_lock(
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
        Runner::Remote { command, .. } if command.reads_password() => SUDO_PASSWORD.get(),
        _ => None,
    };
    take_lock(&argv, password.map(String::as_str), |event| match event {
        LockEvent::Line(line) => sink.write(&format!("{line}\n")),
        LockEvent::Waiting(holder) => progress.event(&format!(
            "[{label}] waiting for the target's deploy lock, held by {holder}"
        )),
        LockEvent::Ended(code) => sink.write(&format!(
            "(exit {})\n\n",
            code.map_or("none".into(), |c| c.to_string())
        )),
    })
}

/// Runs a step over fresh connections (the confirmation) until it succeeds, gives a
/// definite answer (exit 4: the target's watchdog rolled back; 5: another deploy took
/// over), or `within` is nearly up.
fn retry(
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
        if matches!(code, Some(0 | 4 | 5)) || Instant::now() + Duration::from_secs(2) >= deadline {
            if attempts > 1 {
                progress.event(&format!(
                    "[{name}] confirmation: {attempts} attempts over a fresh connection"
                ));
            }
            return (code, output);
        }
        thread::sleep(Duration::from_secs(1));
    }
}

/// Runs a query step without showing it; its stdout, once its session slot is free.
fn quiet(step: &Step, connections: &Connections) -> std::io::Result<std::process::Output> {
    let argv = step.local_argv();
    session_of(step, connections).run(|| {
        Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
    })
}

/// The session slot a step needs on its host's shared connection.
fn session_of(step: &Step, connections: &Connections) -> crate::connection::Session {
    match &step.runner {
        Runner::Remote { host, .. } => connections.session(host),
        Runner::Workstation(_) => connections.session_free(),
    }
}

/// Runs one step, echoing its output as events; returns its exit code and output.
fn run_step(
    step: &Step,
    label: &str,
    sink: Option<&LogSink>,
    progress: &Progress,
    connections: &Connections,
) -> (Option<i32>, String) {
    session_of(step, connections).run(|| run_step_now(step, label, sink, progress, None, None))
}

/// Uploads the machine's secrets: the bundle is made here, in memory, and written to the
/// standard input of the target's upload script (never logged: the log has the command and
/// what the target said).
fn upload_secrets(
    plan: &MachinePlan,
    step: &Step,
    sink: &LogSink,
    progress: &Progress,
    connections: &Connections,
) -> Result<(), Error> {
    let name = plan.machine.name.as_str();
    let upload = plan
        .machine
        .secrets
        .as_ref()
        .expect("an upload step comes with its upload");
    let user = crate::vars::upload::user_identity()?;
    let bundle = upload.bundle(user)?;
    let (code, output) = session_of(step, connections)
        .run(|| run_step_now(step, name, Some(sink), progress, None, Some(&bundle)));
    if code == Some(0) {
        return Ok(());
    }
    Err(crate::vars::upload::upload_error(
        name,
        &step.host_label(),
        code,
        &output,
    ))
}

/// Seconds since the Unix epoch, to the millisecond: when a step started, in the logs.
fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("@{:.3}", now.as_secs_f64())
}

/// A child's standard output and error, taken, to be read line by line.
fn output_streams(child: &mut std::process::Child) -> Vec<Box<dyn Read + Send>> {
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

/// Called with (builds done, builds expected) as a realise reports them.
type OnBuilds<'a> = &'a (dyn Fn(u64, u64) + Sync);

fn run_step_now(
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
    } else if let Some(what) = step.kind.describe() {
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
        Runner::Remote { command, .. } if command.reads_password() => SUDO_PASSWORD.get(),
        _ => None,
    };
    // A process group of its own: the terminal's Ctrl-C reaches clan only, which decides.
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(step.local_env().iter().map(|(k, v)| (k, v)))
        .stdin(if hangup || password.is_some() || data.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => return (None, format!("cannot run {}: {e}", argv[0])),
    };
    let collected = Arc::new(Mutex::new(String::new()));
    let streams = output_streams(&mut child);
    let mut input = child.stdin.take();
    if let (Some(password), Some(stdin)) = (password, input.as_mut()) {
        let _ = stdin.write_all(format!("{password}\n").as_bytes());
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
fn terminate_group(leader: u32) {
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

/// The exit code for a set of reports: 3 if a target may be half-updated, 1 if anything
/// else failed or was skipped, 0 if every machine was deployed.
pub fn exit_code(reports: &[MachineReport]) -> i32 {
    reports
        .iter()
        .map(|r| match &r.outcome {
            // Ctrl-C during an activation that then finished: still an interrupted run.
            Outcome::Deployed | Outcome::DryActivated | Outcome::UpToDate
                if crate::interrupt::requested() =>
            {
                130
            }
            Outcome::Deployed | Outcome::DryActivated | Outcome::UpToDate => 0,
            Outcome::Failed(e) if e.exit == ExitKind::Interrupted => 130,
            Outcome::Failed(e) if e.exit == ExitKind::PartiallyApplied => 3,
            Outcome::Failed(_) | Outcome::Skipped | Outcome::NotStarted(_) => 1,
        })
        .max()
        .unwrap_or(0)
}
