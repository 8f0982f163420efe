//! The deploy plan: every command of a deploy, as data. `--dry-run` prints it; the executor
//! runs it; tests inspect it. No stage runs anything that is not a step here.
//!
//! - `mod.rs`: the types ([`StepKind`], [`Step`], [`MachinePlan`], [`BuildGroup`],
//!   [`DeployPlan`]) and [`plan_deploy`], which puts a deploy together;
//! - `build.rs`: where a group builds, a [`BuildBackend`] (the workstation, a host over ssh);
//! - `deliver.rs`: how a system reaches its target (sent by its builder, or a binary cache);
//! - `activate.rs`: the target's operations (state, lock, secrets, activation, confirmation,
//!   the ways back, the health check);
//! - `display.rs`: the plan as `--dry-run` prints it.
//!
//! A new operation is a [`StepKind`] (its stage and how it is described), one method that
//! renders it where it runs, a place in [`plan_deploy`]'s order, and an arm in
//! `execute/machine.rs` only if it does more than run a command that must succeed.

use std::fmt;

use std::collections::{BTreeMap, BTreeSet};

use crate::host::HostAddress;
use crate::resolve::{BuildLocation, ResolvedMachine};
use crate::ssh::{HostKeyCheck, Invocation, RemoteCommand, Side, SshHost};

mod activate;
mod build;
mod deliver;
mod display;

pub use build::{BuildBackend, HOP_DIR, OverSsh, Workstation, hop_dir};

/// The system profile on NixOS.
pub const SYSTEM_PROFILE: &str = "/nix/var/nix/profiles/system";

/// The stages of a deploy, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Copy the derivation closure from the workstation to the build host.
    CopyDerivations,
    /// Realise the toplevel on the build host.
    Build,
    /// Copy the closure to the target (from the build host, or from the workstation).
    CopyToTarget,
    /// Verify, set the profile and switch on the target.
    Activate,
    /// Remove temporary GC roots; runs even after a failure.
    Cleanup,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::CopyDerivations => "copy derivations",
            Stage::Build => "build",
            Stage::CopyToTarget => "copy to target",
            Stage::Activate => "activate",
            Stage::Cleanup => "clean up",
        })
    }
}

/// What a step does, for messages and for classifying its failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// `nix copy --derivation` from the workstation to the build host.
    CopyDerivations,
    /// Create the temporary directory that holds the GC root.
    MakeRootDir,
    /// `nix-store --realise`.
    Realise,
    /// The build host's own `nix copy` to the target (the second hop).
    NestedCopy,
    /// `nix copy` from the workstation to the target (local builds).
    CopyFromWorkstation,
    /// `nix copy --from builder --to target` on the workstation (`--copy-via-workstation`).
    RelayCopy,
    /// Sign the closure and copy it to the binary cache (`--copy-mode cache`).
    CacheUpload,
    /// The target substitutes the closure from the binary cache.
    CacheSubstitute,
    /// Check that the toplevel is a NixOS system.
    VerifySystem,
    /// Take the target's deploy lock, held until the machine is done.
    LockTarget,
    /// Send the machine's key and encrypted secrets from the workstation to the target.
    UploadSecrets,
    /// Under the lock: stand down what earlier runs left, record the current generation,
    /// arm the watchdog, set the profile.
    Prepare,
    /// `switch-to-configuration ACTION`.
    Switch,
    /// Remove the temporary GC root directory.
    RemoveRootDir,
    /// Ask the builder which toplevels are built so far.
    CheckBuilt,
    /// Ask the target whether it already has the system.
    CheckPresent,
    /// Show what the new system changes against the current one.
    Diff,
    /// Reach the target over a fresh connection; it stands its watchdog down and says so.
    Confirm,
    /// After the ssh session was lost during the switch: ask the target, over fresh
    /// connections, how the switch really ended (waiting for it if it still runs).
    SwitchOutcome,
    /// Undo a failed switch: back to the recorded generation, the failed one deleted.
    Undo,
    /// Run the machine's health check on the target after a confirmed activation.
    HealthCheck,
    /// After a failed health check (`--rollback-on-unhealthy`): back to the generation the
    /// run found, the unhealthy one deleted.
    Revert,
}

/// When a step of a machine runs, depending on what the target has of its system
/// ([`TargetState`], asked first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Always.
    Always,
    /// When the system is not in the target's store (copies).
    TargetLacksSystem,
    /// When the target does not run the system yet.
    TargetNotRunning,
    /// When the target runs it already (re-activation: no watchdog).
    TargetRunning,
}

impl When {
    /// Whether a step with this condition runs for a target in `state`.
    pub fn holds(self, state: TargetState) -> bool {
        match self {
            When::Always => true,
            When::TargetLacksSystem => state == TargetState::Absent,
            When::TargetNotRunning => state != TargetState::Running,
            When::TargetRunning => state == TargetState::Running,
        }
    }

    fn note(self) -> &'static str {
        match self {
            When::Always => "",
            When::TargetLacksSystem => "   (if the target lacks the system)",
            When::TargetNotRunning => "   (unless the target runs the system already)",
            When::TargetRunning => "   (if the target runs the system already)",
        }
    }
}

impl StepKind {
    /// The stage the step belongs to.
    pub fn stage(self) -> Stage {
        match self {
            StepKind::CopyDerivations => Stage::CopyDerivations,
            StepKind::MakeRootDir | StepKind::Realise | StepKind::CheckBuilt => Stage::Build,
            StepKind::NestedCopy
            | StepKind::CopyFromWorkstation
            | StepKind::RelayCopy
            | StepKind::CacheUpload
            | StepKind::CacheSubstitute
            | StepKind::CheckPresent => Stage::CopyToTarget,
            StepKind::VerifySystem
            | StepKind::Diff
            | StepKind::LockTarget
            | StepKind::UploadSecrets
            | StepKind::Prepare
            | StepKind::Switch
            | StepKind::Confirm
            | StepKind::SwitchOutcome
            | StepKind::Undo
            | StepKind::HealthCheck
            | StepKind::Revert => Stage::Activate,
            StepKind::RemoveRootDir => Stage::Cleanup,
        }
    }

    /// What the step does, for people: one short phrase (the command is in the log, and
    /// with `-v` on the terminal). `None` for steps too small to mention.
    pub fn describe(self) -> Option<&'static str> {
        Some(match self {
            StepKind::CopyDerivations => "copy the derivations to the builder",
            StepKind::Realise => "build",
            StepKind::NestedCopy => "copy the closure, build host → target",
            StepKind::CopyFromWorkstation => "copy the closure, workstation → target",
            StepKind::RelayCopy => "copy the closure, build host → workstation → target",
            StepKind::CacheUpload => "sign the closure and copy it to the binary cache",
            StepKind::CacheSubstitute => "substitute the closure from the binary cache",
            StepKind::VerifySystem => "check that it is a NixOS system",
            StepKind::Diff => "compute what changes",
            StepKind::LockTarget => "take the target's deploy lock",
            StepKind::UploadSecrets => "upload the secrets, workstation → target",
            StepKind::Prepare => "record the current generation, arm the watchdog, set the profile",
            StepKind::Switch => "switch-to-configuration",
            StepKind::Confirm => "confirm over a fresh ssh connection",
            StepKind::SwitchOutcome => "ask how the switch ended, over a fresh ssh connection",
            StepKind::Undo => "go back to the previous generation",
            StepKind::HealthCheck => "health check",
            StepKind::Revert => "unhealthy: go back to the previous generation",
            StepKind::MakeRootDir
            | StepKind::RemoveRootDir
            | StepKind::CheckBuilt
            | StepKind::CheckPresent => return None,
        })
    }

    /// Whether its machine's stage line (building, copying to the target, activating,
    /// deployed) says all a person needs of it: plain output then gives it no line of its
    /// own (`-v` does, and the run's log always has it). Steps of a build group, secrets,
    /// health checks and every way back keep their line.
    pub fn said_by_its_stage(self) -> bool {
        matches!(
            self,
            StepKind::NestedCopy
                | StepKind::CopyFromWorkstation
                | StepKind::RelayCopy
                | StepKind::CacheSubstitute
                | StepKind::VerifySystem
                | StepKind::Diff
                | StepKind::LockTarget
                | StepKind::Prepare
                | StepKind::Switch
                | StepKind::Confirm
        )
    }

    /// Whether Ctrl-C stops it: builds and copies, not activation (it finishes) and not
    /// clean-up (it must run).
    pub fn stoppable(self) -> bool {
        !matches!(self.stage(), Stage::Activate | Stage::Cleanup)
    }

    /// Whether a failure from this step on may leave the target half-updated.
    pub fn changes_target_system(self) -> bool {
        matches!(
            self,
            StepKind::Prepare
                | StepKind::Switch
                | StepKind::Confirm
                | StepKind::SwitchOutcome
                | StepKind::Undo
                | StepKind::HealthCheck
                | StepKind::Revert
        )
    }
}

/// The role of the host a step runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The separate build host.
    BuildHost,
    /// The target (which may also be the build host).
    Target,
}

/// Where a step runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runner {
    /// On the workstation, as a local process.
    Workstation(Invocation),
    /// On a remote host, through one ssh invocation.
    Remote {
        /// Which host it is.
        role: Role,
        /// How to reach it.
        host: SshHost,
        /// What runs there.
        command: RemoteCommand,
    },
}

/// One command of the deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What it does.
    pub kind: StepKind,
    /// Where and how it runs.
    pub runner: Runner,
    /// When it runs.
    pub when: When,
    /// What runs if it fails: the undo of a failed switch, the revert after a failed health
    /// check. Part of the plan, so `--dry-run` shows it.
    pub on_failure: Option<Box<Step>>,
    /// What runs if the ssh session to its host was lost while it ran (ssh's exit 255): the
    /// question of how it really ended (the switch). Part of the plan, so `--dry-run` shows it.
    pub on_lost: Option<Box<Step>>,
    /// For how long a failed attempt is retried (the confirmation over fresh connections,
    /// until shortly before the target's watchdog would act).
    pub retry_within: Option<std::time::Duration>,
}

impl Step {
    /// A step with nothing to undo and no retries.
    pub fn new(kind: StepKind, runner: Runner, when: When) -> Step {
        Step {
            kind,
            runner,
            when,
            on_failure: None,
            on_lost: None,
            retry_within: None,
        }
    }

    /// The host it runs on, for messages.
    pub fn host_label(&self) -> String {
        match &self.runner {
            Runner::Workstation(_) => "workstation".into(),
            Runner::Remote { role, host, .. } => match role {
                Role::BuildHost => format!("build host {}", host.address),
                Role::Target => format!("target {}", host.address),
            },
        }
    }

    /// The command as it runs on that host.
    pub fn command_line(&self) -> String {
        match &self.runner {
            Runner::Workstation(inv) => inv.to_shell(),
            Runner::Remote { command, .. } => command.summary(),
        }
    }

    /// The local argv that performs the step (the ssh call for remote steps).
    pub fn local_argv(&self) -> Vec<String> {
        match &self.runner {
            Runner::Workstation(inv) => inv.argv.clone(),
            Runner::Remote { host, command, .. } => host.ssh_argv(Side::Workstation, command),
        }
    }

    /// Environment for the local process.
    pub fn local_env(&self) -> &[(String, String)] {
        match &self.runner {
            Runner::Workstation(inv) => &inv.env,
            Runner::Remote { .. } => &[],
        }
    }
}

/// The plan for one machine, after its build: copy to the target, activate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachinePlan {
    /// The machine with its hosts decided.
    pub machine: ResolvedMachine,
    /// Index of its build group in [`DeployPlan::groups`].
    pub group: usize,
    /// How the target is activated.
    pub action: Action,
    /// How long the target's watchdog waits for the confirmation after the switch ends,
    /// in seconds (`None`: no watchdog).
    pub watchdog: Option<u32>,
    /// Its steps once its system is built, in order. The first asks the target what it
    /// has of the system ([`StepKind::CheckPresent`], giving a [`TargetState`]); the
    /// others run when their [`When`] holds for that state. What undoes a failed step
    /// and how long a step is retried are part of the step.
    pub steps: Vec<Step>,
}

impl MachinePlan {
    /// The step that asks the target what it has of the system.
    pub fn present_check(&self) -> &Step {
        self.steps
            .iter()
            .find(|s| s.kind == StepKind::CheckPresent)
            .expect("every machine plan starts with its present check")
    }
}

/// Where a build group builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Builder {
    /// On the workstation.
    Local,
    /// On a remote host (a build host, or a target building for itself).
    Remote {
        /// Which host it is.
        role: Role,
        /// How to reach it.
        host: SshHost,
    },
}

/// Machines that build on the same host, built together: one derivation copy, one
/// `nix-store --realise --keep-going` with every toplevel, so shared dependencies are
/// copied and built once and the host's own parallelism is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildGroup {
    /// Where it builds.
    pub builder: Builder,
    /// Indices of its machines in [`DeployPlan::machines`].
    pub members: Vec<usize>,
    /// Copy derivations, create the GC-root directory, realise.
    pub steps: Vec<Step>,
    /// Remove the GC-root directory, after every member is done (also after failures).
    pub cleanup: Step,
}

impl BuildGroup {
    /// The step that lists which of `outputs` are not yet valid on the builder.
    pub fn validity_step(&self, outputs: &[&str]) -> Step {
        build::poll_built(&self.builder, outputs)
    }

    /// Who builds, for messages.
    pub fn label(&self) -> String {
        match &self.builder {
            Builder::Local => "workstation".into(),
            Builder::Remote {
                role: Role::BuildHost,
                host,
            } => format!("build host {}", host.address),
            Builder::Remote {
                role: Role::Target,
                host,
            } => format!("target {}", host.address),
        }
    }
}

/// The plan for a deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployPlan {
    /// Unique id of this run; names temporary directories and the activation unit.
    pub run_id: String,
    /// Host key policy of every hop.
    pub host_key_check: HostKeyCheck,
    /// Builds, one group per build host.
    pub groups: Vec<BuildGroup>,
    /// One plan per machine.
    pub machines: Vec<MachinePlan>,
}

/// `nix SUBCOMMAND` with the experimental features the old-style commands need, enabled per
/// call so that hosts need no nix.conf change, and the run's `--option` flags.
fn nix(args: &[&str], ctx: &PlanContext) -> Invocation {
    let mut all: Vec<String> = vec!["--extra-experimental-features".into(), "nix-command".into()];
    let (subcommand, rest) = args.split_first().expect("a nix subcommand");
    all.push(subcommand.to_string());
    all.extend(ctx.nix_flags.iter().cloned());
    all.extend(rest.iter().map(|a| a.to_string()));
    Invocation::new("nix", all)
}

/// What a plan needs besides the machine: the run, the host key policy, connection sharing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanContext {
    /// Unique id of this run: the same in its messages, its log directory and on targets.
    pub run_id: String,
    /// The batch of a streamed deploy, whose build groups' temporary directories are named
    /// apart from other batches' (`/tmp/clan-RUN-bN-build0`); `None` for one plan.
    pub batch: Option<u8>,
    /// Host key policy of every hop.
    pub host_key_check: HostKeyCheck,
    /// Directory of the workstation's shared ssh connections; `None` turns sharing off.
    pub control_dir: Option<String>,
    /// Hosts (`user@host:port`) whose ssh config sets a ControlPath of its own, kept as is.
    pub own_control_path: BTreeSet<String>,
    /// Hosts (`user@host:port`) whose ssh config sets keep-alives: clan adds none.
    pub own_keepalive: BTreeSet<String>,
    /// Copy the closure build host → workstation → target instead of the direct second hop.
    pub copy_via_workstation: bool,
    /// Let targets fetch paths from their own substituters (`nix copy -s`).
    pub use_substitutes: bool,
    /// How targets are activated.
    pub activation: Activation,
    /// Targets (`user@host:port`) whose user needs a password for sudo; other non-root
    /// target users use `sudo --non-interactive`.
    pub sudo_password: BTreeSet<String>,
    /// Who deploys, as the target's lock shows it to other deploys (`user@host`, checked).
    pub workstation: String,
    /// Seconds a deploy waits for another deploy's lock on the same target.
    pub lock_timeout: u32,
    /// `--option NAME VALUE` flags for every Nix copy and build.
    pub nix_flags: Vec<String>,
    /// Seconds a machine's health check may take.
    pub health_check_timeout: u32,
    /// Go back to the previous generation when the health check fails.
    pub rollback_on_unhealthy: bool,
    /// `--build-jobs`: builds each build host runs at once (its realise's `--max-jobs`);
    /// `None`: [`build_slots`] decides.
    pub build_jobs: Option<u16>,
    /// `--jobs`: machines copied and activated at once.
    pub jobs: u16,
    /// Each build host's own `max-jobs`, by connection key (`localhost` for this machine),
    /// as the preflight learnt it; empty without a preflight.
    pub builder_max_jobs: BTreeMap<String, u32>,
    /// `--specialisation`: the specialisation of the new system that is activated.
    pub specialisation: Option<String>,
    /// `--no-check`: NixOS's switch inhibitors are not checked.
    pub no_check: bool,
}

impl PlanContext {
    /// How a privileged command runs on `target`: as is for root, else through sudo.
    pub fn privileged(&self, target: &SshHost, command: RemoteCommand) -> RemoteCommand {
        if target.address.user.as_deref().is_none_or(|u| u == "root") {
            command
        } else {
            command.sudo(
                self.sudo_password
                    .contains(&connection_key(&target.address)),
            )
        }
    }
}

impl PlanContext {
    /// What names this plan's temporary directories on builders: the run id, with the
    /// batch of a streamed deploy.
    pub fn scratch_id(&self) -> String {
        match self.batch {
            Some(b) => format!("{}-b{b}", self.run_id),
            None => self.run_id.clone(),
        }
    }

    /// How the workstation reaches `address`.
    pub fn ssh_host(&self, address: &HostAddress, forward_agent: bool) -> SshHost {
        let control_path = match &self.control_dir {
            Some(dir) if !self.own_control_path.contains(&connection_key(address)) => {
                Some(format!("{dir}/%C"))
            }
            _ => None,
        };
        SshHost {
            address: address.clone(),
            host_key_check: self.host_key_check,
            control_path,
            forward_agent,
            fresh: false,
            hop_control: None,
            keepalive: !self.own_keepalive.contains(&connection_key(address)),
        }
    }
}

#[cfg(test)]
impl PlanContext {
    /// A context for unit tests: run `run_id`, host key policy `check`, nothing shared.
    pub(crate) fn example(run_id: &str, check: HostKeyCheck) -> PlanContext {
        PlanContext {
            run_id: run_id.into(),
            batch: None,
            host_key_check: check,
            control_dir: None,
            own_control_path: BTreeSet::new(),
            own_keepalive: BTreeSet::new(),
            copy_via_workstation: false,
            use_substitutes: false,
            activation: Activation::default(),
            sudo_password: BTreeSet::new(),
            workstation: "alice@ws".into(),
            lock_timeout: 300,
            nix_flags: Vec::new(),
            health_check_timeout: 60,
            rollback_on_unhealthy: false,
            build_jobs: None,
            jobs: 8,
            builder_max_jobs: BTreeMap::new(),
            specialisation: None,
            no_check: false,
        }
    }
}

/// The `--max-jobs` of a build group's realise, if any: `--build-jobs` when given; else one
/// build slot for each of the group's machines deployed at once (at most `--jobs`) when the
/// build host's own `max-jobs` (`host_max_jobs`, learnt in the preflight) is lower but not
/// 0 (0: it leaves every build to its Nix builders); else none, and the host's own setting
/// applies.
///
/// A machine's own derivations mostly build one after another (each needs the one before),
/// so a host with fewer slots than machines makes machines queue for slots, as separate
/// `nixos-rebuild` runs, each with the host's `max-jobs`, would not.
pub fn build_slots(
    build_jobs: Option<u16>,
    jobs: u16,
    members: usize,
    host_max_jobs: Option<u32>,
) -> Option<u32> {
    if let Some(n) = build_jobs {
        return Some(u32::from(n));
    }
    let at_once = u32::try_from(members.min(usize::from(jobs))).unwrap_or(u32::MAX);
    host_max_jobs
        .filter(|own| *own > 0 && *own < at_once)
        .map(|_| at_once)
}

pub use crate::host::connection_key;

/// Plans the deploy of `machines`: build groups, then each machine's copy and activation.
pub fn plan_deploy(machines: Vec<ResolvedMachine>, ctx: &PlanContext) -> DeployPlan {
    let mut groups: Vec<BuildGroup> = Vec::new();
    let mut group_keys: Vec<String> = Vec::new();
    let mut plans = Vec::new();
    for (index, machine) in machines.into_iter().enumerate() {
        let target = ctx.ssh_host(&machine.target.value, false);
        let (key, builder) = match &machine.build.value {
            BuildLocation::Local => ("local".to_string(), Builder::Local),
            BuildLocation::Target => (
                format!("target {}", connection_key(&target.address)),
                Builder::Remote {
                    role: Role::Target,
                    host: target.clone(),
                },
            ),
            BuildLocation::Remote(address) => (
                format!("build host {}", connection_key(address)),
                Builder::Remote {
                    role: Role::BuildHost,
                    host: ctx.ssh_host(address, machine.forward_agent.value),
                },
            ),
        };
        // Machines with other remote builders cannot share a realise.
        let key = match &machine.builders {
            Some(b) => format!("{key} with builders {}", b.value.to_nix()),
            None => key,
        };
        let group = match group_keys.iter().position(|k| *k == key) {
            Some(g) => g,
            None => {
                group_keys.push(key);
                groups.push(BuildGroup {
                    builder,
                    members: Vec::new(),
                    steps: Vec::new(),
                    cleanup: Step::new(
                        StepKind::RemoveRootDir,
                        Runner::Workstation(Invocation::new("true", [] as [&str; 0])),
                        When::Always,
                    ),
                });
                groups.len() - 1
            }
        };
        groups[group].members.push(index);
        // The build host's copy to the target shares the connection its preflight opened.
        let mut second_hop = target.clone();
        if matches!(
            groups[group].builder,
            Builder::Remote {
                role: Role::BuildHost,
                ..
            }
        ) && !ctx.copy_via_workstation
        {
            second_hop.hop_control = Some(format!("{}/%C", hop_dir(&ctx.scratch_id(), group)));
        }
        let builder = &groups[group].builder;
        let on_target = activate::Target {
            host: &second_hop,
            out: machine.out_path().as_str(),
            ctx,
        };
        // `build`: nothing after the build, nothing on the target.
        let mut steps = Vec::new();
        if ctx.activation.action.reaches_target() {
            steps.push(on_target.state());
            steps.extend(deliver::delivery_steps(&machine, builder, &second_hop, ctx));
            steps.extend(activate::activation_steps(&machine, &on_target));
        }
        plans.push(MachinePlan {
            machine,
            group,
            action: ctx.activation.action,
            watchdog: activate::watchdog_of(ctx),
            steps,
        });
    }
    for (g, group) in groups.iter_mut().enumerate() {
        let members: Vec<&ResolvedMachine> =
            group.members.iter().map(|&i| &plans[i].machine).collect();
        let (steps, cleanup) = build::group_steps(&group.builder, &members, g, ctx);
        group.steps = steps;
        group.cleanup = cleanup;
    }
    DeployPlan {
        run_id: ctx.run_id.clone(),
        host_key_check: ctx.host_key_check,
        groups,
        machines: plans,
    }
}

/// What activation does, as `nixos-rebuild` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Action {
    /// Set the system profile and switch to the new system now.
    #[default]
    Switch,
    /// Set the system profile; the new system runs from the next boot.
    Boot,
    /// Switch to the new system now without touching the profile (the next boot is the old one).
    Test,
    /// Set nothing; show what switching would do.
    DryActivate,
    /// Build the system where it builds, and stop: nothing is copied to the target or run
    /// there (`nixos-rebuild build`; `clan machines build`).
    Build,
}

impl Action {
    /// The argument of `switch-to-configuration`.
    pub fn word(self) -> &'static str {
        match self {
            Action::Switch => "switch",
            Action::Boot => "boot",
            Action::Test => "test",
            Action::DryActivate => "dry-activate",
            Action::Build => "build",
        }
    }

    /// Whether the run reaches the target at all (every action but `build`).
    pub fn reaches_target(self) -> bool {
        self != Action::Build
    }

    /// Whether the system profile is set.
    pub fn sets_profile(self) -> bool {
        matches!(self, Action::Switch | Action::Boot)
    }

    /// Whether the running system changes (and may cut the target off).
    pub fn changes_running_system(self) -> bool {
        matches!(self, Action::Switch | Action::Test)
    }
}

/// How the target is activated: action, change summary, rollback watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activation {
    /// What to do.
    pub action: Action,
    /// Show what changes against the current system first.
    pub diff: bool,
    /// Seconds the target waits for a fresh connection before it rolls back by itself;
    /// `None`: no watchdog.
    pub rollback_timeout: Option<u32>,
}

impl Default for Activation {
    fn default() -> Activation {
        Activation {
            action: Action::Switch,
            diff: true,
            rollback_timeout: Some(30),
        }
    }
}

/// What a target has of the system being deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// Not in its store: copy it.
    Absent,
    /// In its store: no copy.
    Present,
    /// It runs it already: no copy; re-activating it changes nothing that could cut the
    /// target off, so no watchdog, no change summary, and no check that it is NixOS.
    Running,
}

impl TargetState {
    /// The state from the exit code of [`MachinePlan::present_check`].
    pub fn from_exit(code: Option<i32>) -> TargetState {
        match code {
            Some(0) => TargetState::Running,
            Some(1) => TargetState::Present,
            _ => TargetState::Absent,
        }
    }
}

#[cfg(test)]
mod tests;
