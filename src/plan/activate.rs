//! The target's side, as a [`Target`]: what it has of the system, the lock, the secrets, the
//! activation through `clan-activate` ([`ACTIVATE`]), its confirmation, the ways back and the
//! health check. Each operation is one method that renders one step.

use std::time::Duration;

use crate::activate::Command;

use super::{Action, PlanContext, Role, Runner, SYSTEM_PROFILE, Step, StepKind, When};
use crate::resolve::ResolvedMachine;
use crate::ssh::{Invocation, RemoteCommand, SshHost};

/// The change summary (`src/scripts/diff.sh`). Arguments: profile, new system.
const DIFF: &str = include_str!("../scripts/diff.sh");

/// What the target has of the new system (`src/scripts/target-state.sh`): exit 0, it runs
/// it; 1, it has it; 2, it lacks it. Arguments: profile, new system.
const TARGET_STATE: &str = include_str!("../scripts/target-state.sh");

/// The health check within its time limit (`src/scripts/health-check.sh`). Arguments:
/// seconds, check.
const HEALTH_CHECK: &str = include_str!("../scripts/health-check.sh");

/// A target reached over ssh, and one system for it.
pub(super) struct Target<'a> {
    /// How to reach it.
    pub host: &'a SshHost,
    /// The system's store path.
    pub out: &'a str,
    /// The run.
    pub ctx: &'a PlanContext,
}

impl Target<'_> {
    fn step(&self, kind: StepKind, command: RemoteCommand, when: When) -> Step {
        Step::new(
            kind,
            Runner::Remote {
                role: Role::Target,
                host: self.host.clone(),
                command,
            },
            when,
        )
    }

    /// `clan-activate ARGS` as root (through sudo for other users).
    fn activate(&self, kind: StepKind, command: Command<'_>, when: When) -> Step {
        let command = self.ctx.privileged(self.host, command.remote());
        self.step(kind, command, when)
    }

    /// What the target has of the system ([`super::TargetState`]).
    pub fn state(&self) -> Step {
        self.step(
            StepKind::CheckPresent,
            RemoteCommand::Run(Invocation::new(
                "sh",
                [
                    "-c",
                    TARGET_STATE,
                    "clan-target-state",
                    SYSTEM_PROFILE,
                    self.out,
                ],
            )),
            When::Always,
        )
    }

    /// Checks that the system is a NixOS system (with the specialisation asked for, if
    /// one is) before anything changes.
    pub fn verify(&self) -> Step {
        let switch = format!("{}/bin/switch-to-configuration", self.out);
        let version = format!("{}/nixos-version", self.out);
        let mut test = vec!["-e".to_string(), version, "-a".into(), "-x".into(), switch];
        if let Some(name) = &self.ctx.specialisation {
            test.extend([
                "-a".into(),
                "-x".into(),
                format!(
                    "{}/specialisation/{name}/bin/switch-to-configuration",
                    self.out
                ),
            ]);
        }
        // A specialisation is checked also where the target runs the system already.
        let when = if self.ctx.specialisation.is_some() {
            When::Always
        } else {
            When::TargetNotRunning
        };
        self.step(
            StepKind::VerifySystem,
            RemoteCommand::Run(Invocation::new("test", test)),
            when,
        )
    }

    /// What the new system changes against the running one, computed on the target.
    pub fn diff(&self) -> Step {
        self.step(
            StepKind::Diff,
            RemoteCommand::Run(Invocation::new(
                "sh",
                ["-c", DIFF, "clan-diff", SYSTEM_PROFILE, self.out],
            )),
            When::TargetNotRunning,
        )
    }

    /// The target's deploy lock, held until the machine is done, or until the workstation
    /// has been silent for [`crate::activate::LOCK_STALE`] seconds.
    pub fn lock(&self) -> Step {
        self.activate(
            StepKind::LockTarget,
            Command::Lock {
                run: &self.ctx.run_id,
                who: &self.ctx.workstation,
                wait: self.ctx.lock_timeout,
                stale: crate::activate::LOCK_STALE.as_secs(),
            },
            When::Always,
        )
    }

    /// The machine's key and encrypted secrets, from the workstation straight to the
    /// target (never through the build host), under its lock.
    pub fn upload_secrets(&self, upload: &crate::vars::upload::SecretsUpload) -> Step {
        let command = self.ctx.privileged(
            self.host,
            RemoteCommand::Script {
                script: crate::vars::upload::VARS_UPLOAD,
                args: upload.args(),
                sudo: None,
            },
        );
        self.step(StepKind::UploadSecrets, command, When::Always)
    }

    /// Stand down what earlier runs left, record the current generation, arm a watchdog
    /// of `watchdog` seconds (0: none), set the profile.
    pub fn prepare(&self, watchdog: u32, when: When) -> Step {
        let action = self.ctx.activation.action.word();
        self.activate(
            StepKind::Prepare,
            Command::Prepare {
                run: &self.ctx.run_id,
                action,
                toplevel: self.out,
                watchdog,
            },
            when,
        )
    }

    /// `switch-to-configuration ACTION`; if it fails, back to the recorded generation.
    pub fn switch(&self) -> Step {
        let action = self.ctx.activation.action;
        let mut switch = self.activate(
            StepKind::Switch,
            Command::Switch {
                run: &self.ctx.run_id,
                action: action.word(),
                toplevel: self.out,
                specialisation: self.ctx.specialisation.as_deref(),
                no_check: self.ctx.no_check,
            },
            When::Always,
        );
        if action != Action::DryActivate {
            switch.on_failure = Some(Box::new(self.activate(
                StepKind::Undo,
                Command::Undo {
                    run: &self.ctx.run_id,
                },
                When::Always,
            )));
            switch.on_lost = Some(Box::new(self.outcome()));
        }
        switch
    }

    /// `clan-activate outcome`: how the switch ended (waiting for it while it runs), over
    /// fresh connections, retried for as long as the confirmation would be (a minute
    /// without a watchdog).
    fn outcome(&self) -> Step {
        let mut step = self.fresh(
            StepKind::SwitchOutcome,
            Command::Outcome {
                run: &self.ctx.run_id,
            },
        );
        step.retry_within = Some(retry_window(watchdog_of(self.ctx).unwrap_or(60)));
        step
    }

    /// `clan-activate WORD RUN` over a fresh connection, not the shared one (it must prove
    /// that new logins work, or reach a target whose shared connection was lost).
    fn fresh(&self, kind: StepKind, command: Command<'_>) -> Step {
        let mut fresh = self.host.clone();
        fresh.control_path = None;
        fresh.fresh = true;
        let command = self.ctx.privileged(&fresh, command.remote());
        Step::new(
            kind,
            Runner::Remote {
                role: Role::Target,
                command,
                host: fresh,
            },
            When::TargetNotRunning,
        )
    }

    /// Over a fresh connection, not the shared one (it must prove that new logins still
    /// work), retried until shortly before the watchdog of `watchdog` seconds would act.
    pub fn confirm(&self, watchdog: u32) -> Step {
        let mut confirm = self.fresh(
            StepKind::Confirm,
            Command::Confirm {
                run: &self.ctx.run_id,
            },
        );
        confirm.retry_within = Some(retry_window(watchdog));
        confirm
    }

    /// The machine's health check, within `--health-check-timeout`; with
    /// `--rollback-on-unhealthy`, a failure goes back to the generation the run found
    /// (the unhealthy one deleted).
    pub fn health_check(&self, check: &str) -> Step {
        let timeout = self.ctx.health_check_timeout.to_string();
        let mut step = self.step(
            StepKind::HealthCheck,
            RemoteCommand::Run(Invocation::new(
                "sh",
                [
                    "-c",
                    HEALTH_CHECK,
                    "clan-health-check",
                    timeout.as_str(),
                    check,
                ],
            )),
            When::Always,
        );
        if self.ctx.rollback_on_unhealthy && self.ctx.activation.action.sets_profile() {
            step.on_failure = Some(Box::new(self.activate(
                StepKind::Revert,
                Command::Revert {
                    run: &self.ctx.run_id,
                },
                When::Always,
            )));
        }
        step
    }
}

/// How long a question over fresh connections is retried when the target's watchdog waits
/// `watchdog` seconds: until shortly before it would act.
fn retry_window(watchdog: u32) -> Duration {
    Duration::from_secs(u64::from(watchdog.saturating_sub(3).max(1)))
}

/// The seconds the target's watchdog waits for a confirmation, if this run arms one.
pub(super) fn watchdog_of(ctx: &PlanContext) -> Option<u32> {
    let activation = ctx.activation;
    activation
        .rollback_timeout
        .filter(|_| activation.action.changes_running_system())
}

/// Verify, summarise the change, lock the target, upload the secrets, prepare (record the
/// current generation, arm the watchdog, set the profile), switch, confirm, check health.
/// The switch (and the watchdog) run as transient systemd units where the target has
/// systemd, so a dropped ssh connection cannot kill them half-way.
pub(super) fn activation_steps(machine: &ResolvedMachine, target: &Target<'_>) -> Vec<Step> {
    let activation = target.ctx.activation;
    let action = activation.action;
    let mut steps = vec![target.verify()];
    if activation.diff {
        steps.push(target.diff());
    }
    let watchdog = watchdog_of(target.ctx);
    if action != Action::DryActivate {
        steps.push(target.lock());
        if let Some(upload) = &machine.secrets {
            steps.push(target.upload_secrets(upload));
        }
        match watchdog {
            Some(seconds) => {
                steps.push(target.prepare(seconds, When::TargetNotRunning));
                // Re-activating the running system cannot cut the target off: no watchdog.
                steps.push(target.prepare(0, When::TargetRunning));
            }
            None => steps.push(target.prepare(0, When::Always)),
        }
    }
    steps.push(target.switch());
    if let Some(seconds) = watchdog {
        steps.push(target.confirm(seconds));
    }
    if let Some(check) = &machine.health_check
        && action != Action::DryActivate
    {
        steps.push(target.health_check(check.as_str()));
    }
    steps
}
