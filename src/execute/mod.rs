//! Execution: runs a [`DeployPlan`].
//!
//! Each build group runs in its own thread: derivations copied once, one batch
//! `nix-store --realise --keep-going`, and meanwhile the builder is asked which toplevels are
//! valid so far. A machine whose toplevel is built goes on at once to its copy and
//! activation, at most `jobs` at a time, independently of the others. After a failure a
//! machine stops; the others go on unless `fail_fast`. Nothing is activated for a machine
//! whose build or copy failed. Every command's full output goes to the run's log directory.
//!
//! - `mod.rs`: the run as a whole (threads, reports, logs, exit code, up-to-date check);
//! - `group.rs`: a build group (derivation copy, realise, which toplevels are built);
//! - `machine.rs`: one machine's steps after its build, one arm per special operation;
//! - `lock.rs`: the target's deploy lock;
//! - `step.rs`: running one step's process (group, log, progress, Ctrl-C).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::connection::{Connections, Semaphore};
use crate::error::{Error, ExitKind, Hint};

use crate::plan::{Action, Builder, DeployPlan, Runner, Stage, TargetState};
use crate::progress::Progress;

pub mod gate;
mod group;
mod lock;
mod machine;
mod step;

use group::run_group;
use machine::run_machine;
pub(crate) use step::timestamp;
use step::{quiet, run_step};

pub use lock::{LOCK_HEARTBEAT, LOCK_STALE};
pub(crate) use lock::{LockEvent, LockGuard, take_lock};

/// How one machine's deploy ended.
#[derive(Debug)]
pub enum Outcome {
    /// The new system is active.
    Deployed,
    /// `--action dry-activate` showed what switching would do; nothing changed.
    DryActivated,
    /// `--action build` (`clan machines build`): built where it builds; the target was not
    /// reached.
    Built,
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

/// What the up-to-date check found ([`up_to_date`]), by machine index.
#[derive(Debug, Default)]
pub struct TargetsChecked {
    /// Machines with nothing to do.
    pub up_to_date: BTreeSet<usize>,
    /// Machines whose target lacks the system: the deploy need not ask again.
    pub lacking: BTreeSet<usize>,
    /// Machines whose target has activations that earlier runs left unconfirmed (their
    /// run ids, or `unknown`): not up to date, whatever it runs, until a deploy confirms.
    pub pending: BTreeMap<usize, Vec<String>>,
    /// The preflight's probes the targets answered in the same round trip, by connection
    /// key ([`crate::preflight::run`]).
    pub answered: BTreeMap<String, BTreeMap<String, (i32, String)>>,
}

/// The probe name the up-to-date check's answer has when it shares its round trip with the
/// preflight's probes.
const STATE_PROBE: &str = "clan-target-state";

/// The machines of `plan` that have nothing to do: their target runs the very system and
/// (for `switch`) its profile points to it, and they upload no secrets. One round trip
/// each, over the target's shared connection, all at once; a target that cannot be asked
/// is not up to date (the deploy then finds out why).
/// What ssh said when a target could not be asked is in the run's `up-to-date` log.
/// `also`: the preflight's probes of each target (by connection key), asked in the same
/// round trip; their answers are in [`TargetsChecked::answered`].
pub fn up_to_date(
    plan: &DeployPlan,
    connections: &Connections,
    logs: &Logs,
    also: &BTreeMap<String, Vec<(String, crate::ssh::Invocation)>>,
) -> TargetsChecked {
    let candidates: Vec<usize> = plan
        .machines
        .iter()
        .enumerate()
        .filter(|(_, m)| {
            m.machine.secrets.is_none() && matches!(m.action, Action::Switch | Action::Test)
        })
        .map(|(i, _)| i)
        .collect();
    type Answer = (
        TargetState,
        bool,
        Vec<String>,
        Option<(String, BTreeMap<String, (i32, String)>)>,
    );
    let states: Vec<(usize, Option<Answer>)> = thread::scope(|scope| {
        let handles: Vec<_> = candidates
            .iter()
            .map(|&i| {
                scope.spawn(move || {
                    let m = &plan.machines[i];
                    let check = m.present_check();
                    if let Runner::Remote { host, .. } = &check.runner {
                        let _ = connections.open(host);
                    }
                    // With the preflight's probes of this target, in one round trip.
                    let shared = match &check.runner {
                        Runner::Remote {
                            host,
                            command: crate::ssh::RemoteCommand::Run(state),
                            ..
                        } => also
                            .get(&crate::plan::connection_key(&host.address))
                            .map(|probes| (host, state, probes)),
                        _ => None,
                    };
                    let (out, answered) = match shared {
                        Some((host, state, probes)) => {
                            let mut probes = probes.clone();
                            probes.push((STATE_PROBE.to_string(), state.clone()));
                            let argv = host.ssh_argv(
                                crate::ssh::Side::Workstation,
                                &crate::ssh::RemoteCommand::Probes(probes),
                            );
                            let mut out = step::session_of(check, connections)
                                .run(|| {
                                    crate::process::run(
                                        std::process::Command::new(&argv[0]).args(&argv[1..]),
                                        None,
                                    )
                                })
                                .ok()?;
                            let mut answers =
                                crate::ssh::parse_probes(&String::from_utf8_lossy(&out.stdout));
                            // The state's exit and output, as if it had run alone; ssh's own
                            // failure (nothing answered) stays as it is.
                            if let Some((code, output)) = answers.remove(STATE_PROBE) {
                                out.status = std::os::unix::process::ExitStatusExt::from_raw(
                                    (code & 0xff) << 8,
                                );
                                out.stdout = output.into_bytes();
                            }
                            let key = crate::plan::connection_key(&host.address);
                            (out, (!answers.is_empty()).then_some((key, answers)))
                        }
                        None => (quiet(check, connections).ok()?, None),
                    };
                    let state = TargetState::from_exit(out.status.code());
                    let stdout = String::from_utf8_lossy(&out.stdout);
                    let profile = stdout.lines().any(|l| l == "profile-current");
                    let pending = stdout
                        .lines()
                        .filter_map(|l| l.strip_prefix("pending "))
                        .map(str::to_string)
                        .collect();
                    // Only an answer of the script counts (exit 0, 1 or 2), not ssh's 255.
                    if !matches!(out.status.code(), Some(0..=2)) {
                        logs.write(
                            "up-to-date",
                            &format!(
                                "{}: the target could not be asked (exit {:?}):\n{}\n",
                                m.machine.name,
                                out.status.code(),
                                String::from_utf8_lossy(&out.stderr).trim_end()
                            ),
                        );
                    }
                    matches!(out.status.code(), Some(0..=2))
                        .then_some((state, profile, pending, answered))
                })
            })
            .collect();
        candidates
            .iter()
            .zip(handles)
            .map(|(&i, h)| (i, h.join().ok().flatten()))
            .collect()
    });
    let mut checked = TargetsChecked::default();
    for (i, mut state) in states {
        if let Some((key, answers)) = state.as_mut().and_then(|s| s.3.take()) {
            checked.answered.insert(key, answers);
        }
        match state {
            Some((TargetState::Running, profile, ..))
                if profile || plan.machines[i].action == Action::Test =>
            {
                checked.up_to_date.insert(i);
            }
            Some((TargetState::Absent, ..)) => {
                checked.lacking.insert(i);
            }
            Some((_, _, pending, _)) if !pending.is_empty() => {
                checked.pending.insert(i, pending);
            }
            _ => {}
        }
    }
    checked
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

    /// Appends `text` to the run's log `name` (`<dir>/<name>.log`); its path, if written.
    pub fn write(&self, name: &str, text: &str) -> Option<PathBuf> {
        let sink = self.sink(name);
        sink.write(text);
        sink.path.filter(|p| p.exists())
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
/// `lacking`: machines whose target the up-to-date check found without the system; their
/// present check is not asked again. `stop`: with `--fail-fast`, set by the first failure
/// (of this plan or of another running beside it), after which no copy or activation starts.
pub fn run_plan(
    plan: &DeployPlan,
    connections: &Connections,
    logs: &Logs,
    progress: &Progress,
    options: RunOptions,
    lacking: &BTreeSet<String>,
    stop: &AtomicBool,
) -> Vec<MachineReport> {
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
                Outcome::Built => progress.finish(i, true, "built"),
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
                    // Built only: nothing follows on the target.
                    if plan.machines[i].steps.is_empty() {
                        record(i, Outcome::Built, stages, None);
                        continue;
                    }
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
                        let known = lacking
                            .contains(plan.machines[i].machine.name.as_str())
                            .then_some(TargetState::Absent);
                        let (outcome, changes) = run_machine(
                            &plan.machines[i],
                            i,
                            known,
                            &sinks[i],
                            progress,
                            connections,
                            &mut stages,
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

/// The sudo password for targets that need one: read once, kept in memory only while the
/// deploy runs ([`forget_sudo_password`] wipes it), written to the standard input of the
/// commands that ask sudo to read it.
static SUDO_PASSWORD: std::sync::Mutex<Option<zeroize::Zeroizing<String>>> =
    std::sync::Mutex::new(None);

/// The run's sudo password, if it was read (a copy, wiped when dropped).
fn sudo_password() -> Option<zeroize::Zeroizing<String>> {
    SUDO_PASSWORD
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Whether the run's sudo password was read already.
pub fn has_sudo_password() -> bool {
    sudo_password().is_some()
}

/// Sets the sudo password for this run (the first one given stays).
pub fn set_sudo_password(password: String) {
    let mut slot = SUDO_PASSWORD.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        *slot = Some(zeroize::Zeroizing::new(password));
    }
}

/// Wipes the sudo password from memory: the deploy that needed it is over.
pub fn forget_sudo_password() {
    SUDO_PASSWORD
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
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

/// Called with (builds done, builds expected) as a realise reports them.
type OnBuilds<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// The exit code for a set of reports: 3 if a target may be half-updated, 1 if anything
/// else failed or was skipped, 0 if every machine was deployed.
pub fn exit_code(reports: &[MachineReport]) -> ExitKind {
    reports
        .iter()
        .map(|r| match &r.outcome {
            // Ctrl-C during an activation that then finished: still an interrupted run.
            Outcome::Deployed | Outcome::DryActivated | Outcome::Built | Outcome::UpToDate
                if crate::interrupt::requested() =>
            {
                ExitKind::Interrupted
            }
            Outcome::Deployed | Outcome::DryActivated | Outcome::Built | Outcome::UpToDate => {
                ExitKind::Success
            }
            // One machine's bad input fails that machine: the run failed (1), not a usage
            // error of the whole command line.
            Outcome::Failed(e)
                if matches!(e.exit, ExitKind::Interrupted | ExitKind::PartiallyApplied) =>
            {
                e.exit
            }
            // A value the trust boundary refused stops the whole run (see [`gate`]).
            Outcome::Failed(e) if e.code == Some(crate::error::REFUSED) => ExitKind::Usage,
            Outcome::Failed(_) => ExitKind::DeployFailed,
            Outcome::Skipped | Outcome::NotStarted(_) => ExitKind::DeployFailed,
        })
        .max()
        .unwrap_or(ExitKind::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_exit_is_its_most_severe_machines() {
        let report = |outcome: Outcome| MachineReport::not_run("m", "root@m".into(), outcome);
        let failed = |exit: ExitKind| Outcome::Failed(Error::new("x").exit(exit));
        let refused = Outcome::Failed(Error::usage("x").code(crate::error::REFUSED));
        let cases: Vec<(Vec<Outcome>, i32)> = vec![
            (vec![], 0),
            (
                vec![Outcome::Deployed, Outcome::UpToDate, Outcome::Built],
                0,
            ),
            (vec![Outcome::Deployed, failed(ExitKind::DeployFailed)], 1),
            // One machine's bad input fails the run, not the command line.
            (vec![Outcome::Deployed, failed(ExitKind::Usage)], 1),
            (vec![Outcome::Deployed, refused], 2),
            (vec![Outcome::NotStarted("stopped".into())], 1),
            (vec![Outcome::Skipped, Outcome::Deployed], 1),
            (vec![failed(ExitKind::Interrupted), Outcome::Deployed], 130),
            // A target that may be half-updated outranks Ctrl-C.
            (
                vec![
                    failed(ExitKind::Interrupted),
                    failed(ExitKind::PartiallyApplied),
                ],
                3,
            ),
        ];
        for (outcomes, code) in cases {
            let shown = format!("{outcomes:?}");
            let reports: Vec<MachineReport> = outcomes.into_iter().map(report).collect();
            assert_eq!(exit_code(&reports).code(), code, "{shown}");
        }
    }
}
