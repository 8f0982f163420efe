//! One machine after its build: its steps in order (copy, lock, secrets, activation,
//! confirmation), with one arm per operation that does more than run a command.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::lock::{LockGuard, hold_lock};
use super::step::{quiet, retry, run_in_session, run_step};
use super::{LogSink, Outcome, interrupted, with_log};
use crate::activate::{Exit, Word};
use crate::connection::Connections;
use crate::diagnostics::diagnose;
use crate::error::{Error, ExitKind, Hint};
use crate::plan::{Action, MachinePlan, Stage, Step, StepKind, TargetState};
use crate::progress::Progress;

/// Copies one machine's system to its target and activates it: its steps in order, each
/// where its [`When`] holds for what the target has of the system. `known`: what the
/// target has, when the run asked already (the present check is then not asked again).
///
/// [`When`]: crate::plan::When
pub(super) fn run_machine(
    plan: &MachinePlan,
    i: usize,
    known: Option<TargetState>,
    sink: &LogSink,
    progress: &Progress,
    connections: &Connections,
    stages: &mut BTreeMap<Stage, Duration>,
) -> (Outcome, Option<String>) {
    let mut run = MachineRun {
        plan,
        name: plan.machine.name.as_str(),
        i,
        sink,
        progress,
        connections,
        state: known.unwrap_or(TargetState::Absent),
        known: known.is_some(),
        lock: None,
        changes: None,
        activated: false,
    };
    let mut current = None;
    let mut gate_passed = false;
    for step in &plan.steps {
        if !step.when.holds(run.state) {
            continue;
        }
        // Nothing on the target changes before every machine's values were checked.
        let activates = matches!(step.kind, StepKind::LockTarget | StepKind::UploadSecrets)
            || step.kind.changes_target_system();
        if activates && !gate_passed {
            if let Err(refused) = super::gate::wait() {
                let error = Error::usage(format!(
                    "{}: not activated: a value of {refused} was refused (see above), which stops the run before any activation",
                    run.name
                ))
                .code("run.stopped-by-refusal");
                return (Outcome::Failed(error), run.changes);
            }
            gate_passed = true;
        }
        let stage = step.kind.stage();
        // Until the profile or the running system is touched, Ctrl-C stops the machine;
        // from then on, activation finishes.
        if !step.kind.changes_target_system() && crate::interrupt::requested() {
            let error = interrupted(run.name, "before its activation");
            return (Outcome::Failed(error), run.changes);
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
            return (Outcome::Failed(with_log(error, sink)), run.changes);
        }
    }
    let outcome = if run.activated {
        Outcome::Deployed
    } else {
        Outcome::DryActivated
    };
    (outcome, run.changes)
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
    /// Whether `state` was known before the machine's run (its check is then skipped).
    known: bool,
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
            StepKind::CheckPresent if self.known => Ok(()),
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
                if code == Some(255)
                    && let Some(ask) = &step.on_lost
                {
                    return self.after_lost_session(step, ask, &output);
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

    /// The ssh session was lost while `step` (the switch) ran: a restarted sshd, a broken
    /// connection. Nothing is undone before the target, asked over fresh connections
    /// (`ask`), says how the switch ended: a switch that succeeded goes on to its
    /// confirmation; one that failed is undone; a target that cannot be reached is left to
    /// its watchdog, and the error says when that acts.
    fn after_lost_session(&self, step: &Step, ask: &Step, output: &str) -> Result<(), Error> {
        let name = self.name;
        let lost_at = std::time::SystemTime::now();
        self.progress.event(&format!(
            "[{name}] the ssh session to the target ended during the switch: asking the target how the switch ended, over a fresh connection"
        ));
        let (code, answer) = self.run(ask);
        match Exit::from_code(code) {
            Some(Exit::Done) => {
                self.progress.event(&format!(
                    "[{name}] the switch succeeded on the target (its session was lost, not the switch)"
                ));
                Ok(())
            }
            Some(Exit::Failed | Exit::NeverStarted | Exit::Killed) => {
                let said = format!(
                    "{}
{}",
                    output.trim_end(),
                    answer.trim_end()
                );
                let error = diagnose(&self.plan.machine, step, &said, Some(1));
                Err(match &step.on_failure {
                    Some(undo) => self.undo(undo, error),
                    None => error,
                })
            }
            Some(Exit::RolledBack | Exit::NotPending) => Err(with_log(
                diagnose(&self.plan.machine, ask, &answer, code),
                self.sink,
            )),
            _ => Err(self.unreachable_after_switch(lost_at)),
        }
    }

    /// The target cannot be reached after a lost session during its switch: how the switch
    /// ended is unknown, so nothing was undone; its watchdog (if any) decides.
    fn unreachable_after_switch(&self, lost_at: std::time::SystemTime) -> Error {
        let name = self.name;
        let target = &self.plan.machine.target.value;
        let error = Error::new(format!(
            "{name}: the ssh session to the target {target} ended during the switch, and the target cannot be reached again: how the switch ended is unknown, so nothing was undone"
        ))
        .exit(ExitKind::PartiallyApplied);
        match self.plan.watchdog {
            Some(seconds) => {
                let at = lost_at + Duration::from_secs(u64::from(seconds));
                error.hint(Hint::text(format!(
                    "its watchdog rolls it back to the previous generation {seconds} s after the switch ends (at about {} UTC if it ended when the session did), unless this activation is confirmed; once the target answers, run the same command again: it takes the unconfirmed activation over and confirms it",
                    utc_clock(at)
                )))
            }
            None => error.hint(Hint::text(format!(
                "nothing rolls it back by itself (--no-rollback): once the target answers, run the same command again, or go back with {}",
                crate::hint::command("machines rollback", name, &[])
            ))),
        }
    }

    /// After a failed switch: the target goes back to the generation it had before (see
    /// `clan-activate undo`); the error says where the profile points now.
    fn undo(&self, undo: &Step, error: Error) -> Error {
        let (code, output) = self.run(undo);
        let name = self.name;
        let said = Exit::from_code(code);
        if said == Some(Exit::RolledBack) {
            let rolled = Word::RolledBack
                .find(&output)
                .and_then(|l| l.strip_prefix("profile "))
                .unwrap_or("the previous generation");
            return error.hint(Hint::text(format!(
                "the target's watchdog had rolled it back already: it is back on generation {rolled}; nothing more is needed"
            )));
        }
        if said == Some(Exit::NotPending) {
            return error.hint(Hint::text(
                "another deploy took the target over before this one could go back: check who else deploys it",
            ));
        }
        match (said, went_back_to(&output)) {
            (Some(Exit::Done), Some(profile)) => {
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
            (Some(Exit::NoGeneration), _) => error.hint(Hint::text(
                "there is no previous generation to go back to (a first deploy): the profile still points to the failed system",
            )),
            _ => error.hint(Hint::text(format!(
                "going back to the previous generation failed too ({}): check the target, e.g. {}",
                output.trim(),
                crate::hint::command("machines rollback", name, &[])
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
            return error.code("health.unhealthy").hint(Hint::text(format!(
                "it runs the new system; go back with {}, or deploy with --rollback-on-unhealthy",
                crate::hint::command("machines rollback", name, &[])
            )));
        };
        let (code, out) = self.run(revert);
        match (Exit::from_code(code), went_back_to(&out)) {
            (Some(Exit::Done), Some(profile)) => {
                let (generation, path) = profile.split_once(' ').unwrap_or((&profile, ""));
                Error {
                    message: format!(
                        "{}; rolled back to generation {generation} ({path}) (--rollback-on-unhealthy)",
                        error.message
                    ),
                    ..error
                }
                .code("health.rolled-back")
                .hint(Hint::text(
                    "the unhealthy generation was deleted; nothing more is needed to undo this deploy",
                ))
            }
            (Some(Exit::LockLost), _) => error.code("lock.lost").hint(Hint::text(
                "nothing was rolled back: this deploy no longer holds the target's lock (it heard nothing from this workstation for a while), and another deploy may have taken the target over since; check the target before anything else",
            )),
            _ => error.hint(Hint::text(format!(
                "rolling back failed too ({}): check the target, e.g. {}",
                out.trim(),
                crate::hint::command("machines rollback", name, &[])
            ))),
        }
    }
}

/// The time of day of `at`, in UTC (`HH:MM:SS`).
fn utc_clock(at: std::time::SystemTime) -> String {
    let secs = at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Where `clan-activate undo` or `revert` says the profile points now: `GENERATION PATH`.
fn went_back_to(output: &str) -> Option<String> {
    Word::Profile.find(output).map(str::to_string)
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
    let (code, output) = run_in_session(
        step,
        name,
        Some(sink),
        progress,
        connections,
        None,
        Some(&bundle),
    );
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
