//! The deploy plan: every command of a deploy, as data. `--dry-run` prints it; the executor
//! runs it; tests inspect it. No stage runs anything that is not a step here.

use std::fmt;

use std::collections::BTreeSet;

use crate::host::HostAddress;
use crate::resolve::{BuildLocation, ResolvedMachine, describe_build, describe_target};
use crate::ssh::{ACTIVATE, HostKeyCheck, Invocation, RemoteCommand, Side, SshHost};

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
            StepKind::Undo => "go back to the previous generation",
            StepKind::HealthCheck => "health check",
            StepKind::Revert => "unhealthy: go back to the previous generation",
            StepKind::MakeRootDir
            | StepKind::RemoveRootDir
            | StepKind::CheckBuilt
            | StepKind::CheckPresent => return None,
        })
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
    /// For how long a failed attempt is retried (the confirmation over fresh connections,
    /// until shortly before the target's watchdog would act).
    pub retry_within: Option<std::time::Duration>,
}

impl Step {
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
        let mut args = vec!["--check-validity", "--print-invalid"];
        args.extend_from_slice(outputs);
        let inv = Invocation::new("nix-store", args);
        Step {
            kind: StepKind::CheckBuilt,
            runner: match &self.builder {
                Builder::Local => Runner::Workstation(inv),
                Builder::Remote { role, host } => Runner::Remote {
                    role: *role,
                    host: host.clone(),
                    command: RemoteCommand::Run(inv),
                },
            },
            when: When::Always,
            on_failure: None,
            retry_within: None,
        }
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
    /// Unique id of this run.
    pub run_id: String,
    /// Host key policy of every hop.
    pub host_key_check: HostKeyCheck,
    /// Directory of the workstation's shared ssh connections; `None` turns sharing off.
    pub control_dir: Option<String>,
    /// Hosts (`user@host:port`) whose ssh config sets a ControlPath of its own, kept as is.
    pub own_control_path: BTreeSet<String>,
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
    /// `None`: the host's own `max-jobs`.
    pub build_jobs: Option<u16>,
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
        }
    }
}

/// `user@host:port`, what identifies one ssh connection.
pub fn connection_key(address: &HostAddress) -> String {
    format!("{}:{}", address.destination(), address.port.unwrap_or(22))
}

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
                    cleanup: Step {
                        kind: StepKind::RemoveRootDir,
                        runner: Runner::Workstation(Invocation::new("true", [] as [&str; 0])),
                        when: When::Always,
                        on_failure: None,
                        retry_within: None,
                    },
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
            second_hop.hop_control = Some(format!("{}/%C", hop_dir(&ctx.run_id, group)));
        }
        let present_check = Step {
            kind: StepKind::CheckPresent,
            runner: Runner::Remote {
                role: Role::Target,
                host: target.clone(),
                command: RemoteCommand::Run(Invocation::new(
                    "sh",
                    [
                        "-c",
                        TARGET_STATE,
                        "clan-target-state",
                        SYSTEM_PROFILE,
                        machine.out_path.as_str(),
                    ],
                )),
            },
            when: When::Always,
            on_failure: None,
            retry_within: None,
        };
        let mut steps = vec![present_check];
        steps.extend(machine_steps(
            &machine,
            &groups[group].builder,
            &second_hop,
            ctx,
        ));
        plans.push(MachinePlan {
            machine,
            group,
            action: ctx.activation.action,
            steps,
        });
    }
    for (g, group) in groups.iter_mut().enumerate() {
        let members: Vec<&ResolvedMachine> =
            group.members.iter().map(|&i| &plans[i].machine).collect();
        let (steps, cleanup) = group_steps(&group.builder, &members, g, ctx);
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

/// The GC-root directory of group `g` on its builder.
fn root_dir(ctx: &PlanContext, g: usize) -> String {
    format!("/tmp/clan-{}-build{g}", ctx.run_id)
}

/// The private directory of group `g`'s build host for its shared connections to the
/// targets (the second hop).
pub fn hop_dir(run_id: &str, g: usize) -> String {
    format!("/tmp/clan-{run_id}-hop{g}")
}

/// Makes the second hop's private directory, then runs the rest (`src/scripts/hop-dir.sh`).
pub const HOP_DIR: &str = include_str!("scripts/hop-dir.sh");

/// Ends the second hop's shared connections, removes their directory and the GC roots
/// (`src/scripts/hop-cleanup.sh`).
const HOP_CLEANUP: &str = include_str!("scripts/hop-cleanup.sh");

fn run_on(builder: &Builder, kind: StepKind, inv: Invocation) -> Step {
    Step {
        kind,
        runner: match builder {
            Builder::Local => Runner::Workstation(inv),
            Builder::Remote { role, host } => Runner::Remote {
                role: *role,
                host: host.clone(),
                command: RemoteCommand::Run(inv),
            },
        },
        when: When::Always,
        on_failure: None,
        retry_within: None,
    }
}

/// Copy every member's derivations in one go, make the root directory, realise them all.
fn group_steps(
    builder: &Builder,
    members: &[&ResolvedMachine],
    g: usize,
    ctx: &PlanContext,
) -> (Vec<Step>, Step) {
    let dir = root_dir(ctx, g);
    let drvs: Vec<&str> = members.iter().map(|m| m.drv_path.as_str()).collect();
    let mut steps = Vec::new();
    if let Builder::Remote { host, .. } = builder {
        let mut args = vec!["copy", "--derivation", "--to"];
        let url = host.store_url();
        args.push(&url);
        args.extend(drvs.iter().copied());
        steps.push(Step {
            kind: StepKind::CopyDerivations,
            runner: Runner::Workstation(
                nix(&args, ctx).with_env("NIX_SSHOPTS", host.nix_sshopts(Side::Workstation)),
            ),
            when: When::Always,
            on_failure: None,
            retry_within: None,
        });
    }
    steps.push(run_on(
        builder,
        StepKind::MakeRootDir,
        Invocation::new("mkdir", ["-m", "0700", &dir]),
    ));
    let root = format!("{dir}/system");
    let builders = members
        .first()
        .and_then(|m| m.builders.as_ref())
        .map(|b| b.value.to_nix());
    let mut realise = vec!["--realise"];
    realise.extend(ctx.nix_flags.iter().map(String::as_str));
    let build_jobs = ctx.build_jobs.map(|n| n.to_string());
    if let Some(n) = &build_jobs {
        realise.extend(["--max-jobs", n.as_str()]);
    }
    if let Some(builders) = &builders {
        realise.extend(["--option", "builders", builders.as_str()]);
    }
    realise.extend(drvs.iter().copied());
    // internal-json: the executor shows "N/M built" and turns the rest back into lines.
    realise.extend([
        "--add-root",
        &root,
        "--keep-going",
        "--log-format",
        "internal-json",
    ]);
    let mut realise = Invocation::new("nix-store", realise);
    if builders.is_some() {
        // Nix's connections to its builders (the third hop) follow the host key policy.
        let policy: Vec<String> = ctx
            .host_key_check
            .ssh_options()
            .into_iter()
            .flat_map(|(k, v)| ["-o".to_string(), format!("{k}={v}")])
            .chain(["-o".to_string(), "BatchMode=yes".to_string()])
            .collect();
        realise = realise.with_env("NIX_SSHOPTS", policy.join(" "));
    }
    steps.push(Step {
        kind: StepKind::Realise,
        runner: match builder {
            Builder::Local => Runner::Workstation(realise),
            Builder::Remote { role, host } => Runner::Remote {
                role: *role,
                host: host.clone(),
                command: RemoteCommand::UntilHangup(realise),
            },
        },
        when: When::Always,
        on_failure: None,
        retry_within: None,
    });
    let cleanup = match builder {
        Builder::Remote {
            role: Role::BuildHost,
            ..
        } if !ctx.copy_via_workstation => run_on(
            builder,
            StepKind::RemoveRootDir,
            Invocation::new(
                "sh",
                [
                    "-c",
                    HOP_CLEANUP,
                    "clan-hop-cleanup",
                    &hop_dir(&ctx.run_id, g),
                    &dir,
                ],
            ),
        ),
        _ => run_on(
            builder,
            StepKind::RemoveRootDir,
            Invocation::new("rm", ["-rf", "--", &dir]),
        ),
    };
    (steps, cleanup)
}

/// `nix copy` with `--substitute-on-destination` when targets may substitute.
fn copy_args(use_substitutes: bool) -> Vec<&'static str> {
    let mut args = vec!["copy"];
    if use_substitutes {
        args.push("--substitute-on-destination");
    }
    args
}

/// What a machine does once its system is built: copy to the target, activate.
fn machine_steps(
    machine: &ResolvedMachine,
    builder: &Builder,
    target: &SshHost,
    ctx: &PlanContext,
) -> Vec<Step> {
    let out = machine.out_path.as_str();
    let copy_args = || copy_args(ctx.use_substitutes);
    let url = target.store_url();
    let mut steps = Vec::new();
    let cache = machine
        .cache
        .as_ref()
        .filter(|_| machine.copy_mode.value == crate::boundary::CopyMode::Cache);
    match builder {
        Builder::Remote {
            role: Role::Target, ..
        } => {}
        _ if cache.is_some() => {
            let cache = cache.expect("checked");
            let upload = Invocation::new(
                "sh",
                [
                    "-c",
                    CACHE_UPLOAD,
                    "clan-cache-upload",
                    out,
                    cache.upload.as_str(),
                ],
            );
            steps.push(match builder {
                Builder::Remote { role, host } => Step {
                    kind: StepKind::CacheUpload,
                    runner: Runner::Remote {
                        role: *role,
                        host: host.clone(),
                        command: RemoteCommand::UntilHangup(upload),
                    },
                    when: When::TargetLacksSystem,
                    on_failure: None,
                    retry_within: None,
                },
                Builder::Local => Step {
                    kind: StepKind::CacheUpload,
                    runner: Runner::Workstation(upload),
                    when: When::TargetLacksSystem,
                    on_failure: None,
                    retry_within: None,
                },
            });
            // The target's own trusted-public-keys decide whether it accepts the paths.
            let mut realise = vec!["--realise".to_string(), out.to_string()];
            realise.extend(ctx.nix_flags.iter().cloned());
            realise.extend([
                "--option".into(),
                "extra-substituters".into(),
                cache.url.clone(),
            ]);
            steps.push(Step {
                kind: StepKind::CacheSubstitute,
                runner: Runner::Remote {
                    role: Role::Target,
                    host: target.clone(),
                    command: RemoteCommand::UntilHangup(Invocation::new("nix-store", realise)),
                },
                when: When::TargetLacksSystem,
                on_failure: None,
                retry_within: None,
            });
        }
        Builder::Local => {
            let mut args = copy_args();
            args.extend(["--to", &url, out]);
            steps.push(Step {
                kind: StepKind::CopyFromWorkstation,
                runner: Runner::Workstation(
                    nix(&args, ctx).with_env("NIX_SSHOPTS", target.nix_sshopts(Side::Workstation)),
                ),
                when: When::TargetLacksSystem,
                on_failure: None,
                retry_within: None,
            });
        }
        Builder::Remote { host, .. } if ctx.copy_via_workstation => {
            let from = host.store_url();
            let mut args = copy_args();
            args.extend(["--from", &from, "--to", &url, out]);
            steps.push(Step {
                kind: StepKind::RelayCopy,
                runner: Runner::Workstation(
                    nix(&args, ctx).with_env("NIX_SSHOPTS", relay_sshopts(host, target)),
                ),
                when: When::TargetLacksSystem,
                on_failure: None,
                retry_within: None,
            });
        }
        Builder::Remote { role, host } => {
            let mut args = copy_args();
            args.extend(["--to", &url, out]);
            let copy = nix(&args, ctx).with_env("NIX_SSHOPTS", target.nix_sshopts(Side::Nested));
            // With a shared connection, its private directory is made (and checked) first.
            let copy = match &target.hop_control {
                Some(path) => {
                    let dir = path.trim_end_matches("/%C");
                    let mut argv = vec![
                        "-c".to_string(),
                        HOP_DIR.to_string(),
                        "clan-hop-dir".to_string(),
                        dir.to_string(),
                    ];
                    argv.extend(copy.argv);
                    let mut wrapped = Invocation::new("sh", argv);
                    wrapped.env = copy.env;
                    wrapped
                }
                None => copy,
            };
            steps.push(Step {
                kind: StepKind::NestedCopy,
                runner: Runner::Remote {
                    role: *role,
                    host: host.clone(),
                    command: RemoteCommand::UntilHangup(copy),
                },
                when: When::TargetLacksSystem,
                on_failure: None,
                retry_within: None,
            });
        }
    }
    steps.extend(activation_steps(target, out, machine.secrets.as_ref(), ctx));
    if let Some(check) = &machine.health_check
        && ctx.activation.action != Action::DryActivate
    {
        let timeout = ctx.health_check_timeout.to_string();
        // After a failed health check (`--rollback-on-unhealthy`): back to the generation
        // the run found, the unhealthy one deleted.
        let revert =
            (ctx.rollback_on_unhealthy && ctx.activation.action.sets_profile()).then(|| {
                Box::new(Step {
                    kind: StepKind::Revert,
                    runner: Runner::Remote {
                        role: Role::Target,
                        host: target.clone(),
                        command: ctx.privileged(
                            target,
                            RemoteCommand::Script {
                                script: ACTIVATE,
                                args: vec!["revert".into(), ctx.run_id.clone()],
                                sudo: None,
                            },
                        ),
                    },
                    when: When::Always,
                    on_failure: None,
                    retry_within: None,
                })
            });
        steps.push(Step {
            kind: StepKind::HealthCheck,
            runner: Runner::Remote {
                role: Role::Target,
                host: target.clone(),
                command: RemoteCommand::Run(Invocation::new(
                    "timeout",
                    [timeout.as_str(), "sh", "-c", check.as_str()],
                )),
            },
            when: When::Always,
            on_failure: revert,
            retry_within: None,
        });
    }
    steps
}

/// `NIX_SSHOPTS` for a copy between two remote stores, which share one variable: both
/// connections go through the workstation's shared connections, which were opened with each
/// host's own options (the `%C` socket name tells the hosts apart).
fn relay_sshopts(builder: &SshHost, target: &SshHost) -> String {
    let mut flags = vec!["-o".to_string(), "BatchMode=yes".to_string()];
    if let Some(path) = builder
        .control_path
        .as_ref()
        .or(target.control_path.as_ref())
    {
        flags.extend([
            "-o".into(),
            "ControlMaster=no".into(),
            "-o".into(),
            format!("ControlPath={path}"),
        ]);
    }
    if let Some(port) = builder.address.port.or(target.address.port) {
        flags.extend(["-p".into(), port.to_string()]);
    }
    flags.join(" ")
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
}

impl Action {
    /// The argument of `switch-to-configuration`.
    pub fn word(self) -> &'static str {
        match self {
            Action::Switch => "switch",
            Action::Boot => "boot",
            Action::Test => "test",
            Action::DryActivate => "dry-activate",
        }
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

/// Signs a closure and copies it to a binary cache (`src/scripts/cache-upload.sh`).
/// Arguments: system, upload store URL.
const CACHE_UPLOAD: &str = include_str!("scripts/cache-upload.sh");

/// The change summary (`src/scripts/diff.sh`). Arguments: profile, new system.
const DIFF: &str = include_str!("scripts/diff.sh");

/// What the target has of the new system (`src/scripts/target-state.sh`): exit 0, it runs
/// it; 1, it has it; 2, it lacks it. Arguments: profile, new system.
const TARGET_STATE: &str = include_str!("scripts/target-state.sh");

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

/// Verify, summarise the change, lock the target, prepare (record the current generation,
/// arm the watchdog, set the profile), switch, confirm: the target's side is one script,
/// [`crate::ssh::ACTIVATE`]. The switch (and the watchdog) run as transient systemd units
/// where the target has systemd, so a dropped ssh connection cannot kill them half-way.
fn activation_steps(
    target: &SshHost,
    out: &str,
    secrets: Option<&crate::vars::upload::SecretsUpload>,
    ctx: &PlanContext,
) -> Vec<Step> {
    let activation = ctx.activation;
    let action = activation.action;
    let run_id = ctx.run_id.as_str();
    let on_target = |kind, command, when| Step {
        kind,
        runner: Runner::Remote {
            role: Role::Target,
            host: target.clone(),
            command,
        },
        when,
        on_failure: None,
        retry_within: None,
    };
    // Lock, profile, watchdog, switch and confirmation need root on the target.
    let activate = |args: &[&str]| {
        ctx.privileged(
            target,
            RemoteCommand::Script {
                script: ACTIVATE,
                args: args.iter().map(|a| a.to_string()).collect(),
                sudo: None,
            },
        )
    };
    let switch_bin = format!("{out}/bin/switch-to-configuration");
    let verify = Invocation::new(
        "test",
        [
            "-e",
            &format!("{out}/nixos-version"),
            "-a",
            "-x",
            &switch_bin,
        ],
    );
    let mut steps = vec![on_target(
        StepKind::VerifySystem,
        RemoteCommand::Run(verify),
        When::TargetNotRunning,
    )];
    if activation.diff {
        steps.push(on_target(
            StepKind::Diff,
            RemoteCommand::Run(Invocation::new(
                "sh",
                ["-c", DIFF, "clan-diff", SYSTEM_PROFILE, out],
            )),
            When::TargetNotRunning,
        ));
    }
    let watchdog = activation
        .rollback_timeout
        .filter(|_| action.changes_running_system());
    if action != Action::DryActivate {
        let lock_timeout = ctx.lock_timeout.to_string();
        steps.push(on_target(
            StepKind::LockTarget,
            activate(&["lock", run_id, &ctx.workstation, &lock_timeout]),
            When::Always,
        ));
        // Secrets go from this workstation straight to the target, under its lock, before
        // anything changes there: never through the build host.
        if let Some(upload) = secrets {
            steps.push(on_target(
                StepKind::UploadSecrets,
                ctx.privileged(
                    target,
                    RemoteCommand::Script {
                        script: crate::vars::upload::VARS_UPLOAD,
                        args: upload.args(),
                        sudo: None,
                    },
                ),
                When::Always,
            ));
        }
        let timeout = watchdog.unwrap_or(0).to_string();
        steps.push(on_target(
            StepKind::Prepare,
            activate(&["prepare", run_id, action.word(), out, &timeout]),
            if watchdog.is_some() {
                When::TargetNotRunning
            } else {
                When::Always
            },
        ));
        if watchdog.is_some() {
            // Re-activating the running system cannot cut the target off: no watchdog.
            steps.push(on_target(
                StepKind::Prepare,
                activate(&["prepare", run_id, action.word(), out, "0"]),
                When::TargetRunning,
            ));
        }
    }
    let mut switch = on_target(
        StepKind::Switch,
        activate(&["switch", run_id, action.word(), out]),
        When::Always,
    );
    // A failed switch: back to the generation recorded before the profile was touched.
    if action != Action::DryActivate {
        switch.on_failure = Some(Box::new(on_target(
            StepKind::Undo,
            activate(&["undo", run_id]),
            When::Always,
        )));
    }
    steps.push(switch);
    if watchdog.is_some() {
        // A fresh connection, not the shared one: it must prove that new logins still work.
        let mut fresh = target.clone();
        fresh.control_path = None;
        fresh.fresh = true;
        let confirm = ctx.privileged(
            &fresh,
            RemoteCommand::Script {
                script: ACTIVATE,
                args: vec!["confirm".into(), run_id.into()],
                sudo: None,
            },
        );
        steps.push(Step {
            kind: StepKind::Confirm,
            runner: Runner::Remote {
                role: Role::Target,
                command: confirm,
                host: fresh,
            },
            when: When::TargetNotRunning,
            on_failure: None,
            // Retried over fresh connections until shortly before the watchdog would act.
            retry_within: watchdog
                .map(|t| std::time::Duration::from_secs(u64::from(t.saturating_sub(3).max(1)))),
        });
    }
    steps
}

impl fmt::Display for DeployPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Deploy plan (run {}, host key check: {})",
            self.run_id, self.host_key_check
        )?;
        for plan in &self.machines {
            writeln!(f, "{}", describe_target(&plan.machine))?;
            writeln!(f, "{}", describe_build(&plan.machine))?;
        }
        let print_steps = |f: &mut fmt::Formatter<'_>, steps: &[Step]| -> fmt::Result {
            let mut stage = None;
            for step in steps {
                if stage != Some(step.kind.stage()) {
                    stage = Some(step.kind.stage());
                    writeln!(f, "  {}:", step.kind.stage())?;
                }
                writeln!(
                    f,
                    "    [{}] {}{}",
                    step.host_label(),
                    step.command_line(),
                    step.when.note()
                )?;
                if step.kind == StepKind::CheckPresent {
                    writeln!(
                        f,
                        "      (exit 1: no copy; exit 0, already running it: no copy, watchdog or summary)"
                    )?;
                }
                if let Some(within) = step.retry_within {
                    writeln!(
                        f,
                        "      (retried over fresh connections for up to {} s, before the target's watchdog would roll back)",
                        within.as_secs()
                    )?;
                }
                if let Some(undo) = &step.on_failure {
                    let what = match step.kind {
                        StepKind::HealthCheck => "the health check fails (--rollback-on-unhealthy)",
                        _ => "it fails",
                    };
                    writeln!(
                        f,
                        "      if {what}:\n        [{}] {}",
                        undo.host_label(),
                        undo.command_line()
                    )?;
                }
            }
            Ok(())
        };
        for group in &self.groups {
            let names: Vec<&str> = group
                .members
                .iter()
                .map(|&i| self.machines[i].machine.name.as_str())
                .collect();
            writeln!(
                f,
                "\nBuild on the {} for {}:",
                group.label(),
                names.join(", ")
            )?;
            print_steps(f, &group.steps)?;
            for &i in &group.members {
                let plan = &self.machines[i];
                writeln!(f, "Then {}, once its system is built:", plan.machine.name)?;
                print_steps(f, &plan.steps)?;
            }
            writeln!(f, "After all of them:")?;
            print_steps(f, std::slice::from_ref(&group.cleanup))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boundary::{MachineName, Origin, StoreDir, StorePath};
    use crate::resolve::{Resolved, Source};

    fn machine(name: &str, target: &str, build: BuildLocation) -> ResolvedMachine {
        ResolvedMachine {
            name: MachineName::parse(name, &Origin::CommandLine("test")).unwrap(),
            target: Resolved {
                value: target.parse().unwrap(),
                source: Source::Flag("--target-host"),
            },
            build: Resolved {
                value: build,
                source: Source::Flag("--build-host"),
            },
            forward_agent: Resolved {
                value: false,
                source: Source::Default,
            },
            system: None,
            copy_mode: Resolved {
                value: crate::boundary::CopyMode::Ssh,
                source: Source::Default,
            },
            cache: None,
            builders: None,
            health_check: None,
            secrets: None,
            drv_path: StorePath::parse_drv(
                &format!("/nix/store/00000000000000000000000000000000-d-{name}.drv"),
                &StoreDir::default(),
                &Origin::CommandLine("test"),
            )
            .unwrap(),
            out_path: StorePath::parse(
                &format!("/nix/store/00000000000000000000000000000000-o-{name}"),
                &StoreDir::default(),
                &Origin::CommandLine("test"),
            )
            .unwrap(),
        }
    }

    fn remote(s: &str) -> BuildLocation {
        BuildLocation::Remote(s.parse().unwrap())
    }

    fn ctx(check: HostKeyCheck) -> PlanContext {
        PlanContext {
            run_id: "r1".into(),
            host_key_check: check,
            control_dir: None,
            own_control_path: BTreeSet::new(),
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
        }
    }

    fn labels(steps: &[Step]) -> Vec<(StepKind, String)> {
        steps.iter().map(|s| (s.kind, s.host_label())).collect()
    }

    #[test]
    fn build_jobs_set_the_realises_max_jobs() {
        let realise = |build_jobs| {
            let mut ctx = ctx(HostKeyCheck::Strict);
            ctx.build_jobs = build_jobs;
            let plan = plan_deploy(vec![machine("m", "root@t", remote("root@b"))], &ctx);
            plan.groups[0].steps[2].command_line()
        };
        assert!(realise(None).starts_with("nix-store --realise /nix/store/"));
        assert!(realise(Some(8)).starts_with("nix-store --realise --max-jobs 8 /nix/store/"));
    }

    #[test]
    fn remote_build_host_copies_to_target_itself() {
        let plan = plan_deploy(
            vec![machine("m", "root@t?IdentityFile=/k", remote("root@b"))],
            &ctx(HostKeyCheck::AcceptNew),
        );
        let b = "build host root@b".to_string();
        let t = "target root@t?IdentityFile=/k".to_string();
        assert_eq!(
            labels(&plan.groups[0].steps),
            vec![
                (StepKind::CopyDerivations, "workstation".into()),
                (StepKind::MakeRootDir, b.clone()),
                (StepKind::Realise, b.clone()),
            ]
        );
        assert_eq!(
            labels(&plan.machines[0].steps)[..9],
            vec![
                (StepKind::CheckPresent, t.clone()),
                (StepKind::NestedCopy, b.clone()),
                (StepKind::VerifySystem, t.clone()),
                (StepKind::Diff, t.clone()),
                (StepKind::LockTarget, t.clone()),
                (StepKind::Prepare, t.clone()),
                (StepKind::Prepare, t.clone()),
                (StepKind::Switch, t.clone()),
                (StepKind::Confirm, t),
            ]
        );
        let lines: Vec<String> = plan.machines[0].steps[4..]
            .iter()
            .map(|s| format!("{} {:?}", s.command_line(), s.when))
            .collect();
        assert_eq!(
            lines,
            [
                "clan-activate lock r1 alice@ws 300 Always",
                "clan-activate prepare r1 switch /nix/store/00000000000000000000000000000000-o-m 30 TargetNotRunning",
                "clan-activate prepare r1 switch /nix/store/00000000000000000000000000000000-o-m 0 TargetRunning",
                "clan-activate switch r1 switch /nix/store/00000000000000000000000000000000-o-m Always",
                "clan-activate confirm r1 TargetNotRunning",
            ]
        );
        // Confirmation over a fresh connection, not the shared one.
        let confirm = plan.machines[0].steps.last().unwrap();
        assert_eq!(confirm.kind, StepKind::Confirm);
        let argv = confirm.local_argv();
        assert!(argv.contains(&"ControlPath=none".to_string()));
        assert!(argv.last().unwrap().ends_with(" confirm r1"));
        assert_eq!(
            plan.machines[0].steps[plan.machines[0].steps.len() - 2]
                .on_failure
                .as_ref()
                .unwrap()
                .command_line(),
            "clan-activate undo r1"
        );
        assert_eq!(plan.groups[0].cleanup.host_label(), b);
        // Builds and copies on remote hosts stop when the connection's input ends (Ctrl-C).
        let copy = plan.machines[0].steps[1].local_argv().pop().unwrap();
        assert!(copy.starts_with("sh -c "), "{copy}");
        // Through the build host's shared connection to the target, in its private directory.
        assert!(copy.contains(
            " sh env 'NIX_SSHOPTS=-o IdentityFile=/k -o StrictHostKeyChecking=accept-new -o BatchMode=yes \
             -o ControlMaster=auto -o ControlPath=/tmp/clan-r1-hop0/%C -o ControlPersist=60' sh -c "
        ), "{copy}");
        assert!(copy.ends_with(
            "' clan-hop-dir /tmp/clan-r1-hop0 \
             nix --extra-experimental-features nix-command copy --to ssh://root@t /nix/store/00000000000000000000000000000000-o-m"
        ));
        assert_eq!(
            plan.groups[0].cleanup.command_line(),
            "clan-hop-cleanup /tmp/clan-r1-hop0 /tmp/clan-r1-build0"
        );
        let realise = plan.groups[0].steps[2].local_argv().pop().unwrap();
        assert!(realise.starts_with("sh -c "), "{realise}");
        // People see the command, not the wrapper that stops it on hang-up.
        assert!(
            plan.groups[0].steps[2]
                .command_line()
                .starts_with("nix-store --realise ")
        );
        assert!(realise.ends_with(
            " sh nix-store --realise /nix/store/00000000000000000000000000000000-d-m.drv --add-root /tmp/clan-r1-build0/system --keep-going --log-format internal-json"
        ));
    }

    #[test]
    fn actions_choose_profile_switch_and_watchdog() {
        let kinds = |action: Action| {
            let mut c = ctx(HostKeyCheck::Strict);
            c.activation.action = action;
            c.activation.diff = false;
            let plan = plan_deploy(vec![machine("m", "root@t", BuildLocation::Target)], &c);
            let switch = plan.machines[0]
                .steps
                .iter()
                .find(|s| s.kind == StepKind::Switch)
                .unwrap()
                .command_line();
            let undo = plan.machines[0]
                .steps
                .iter()
                .find(|s| s.kind == StepKind::Switch)
                .unwrap()
                .on_failure
                .is_some();
            let kinds: Vec<StepKind> = plan.machines[0].steps[1..].iter().map(|s| s.kind).collect();
            (kinds, switch, undo)
        };
        use StepKind::*;
        let (k, switch, undo) = kinds(Action::Switch);
        assert_eq!(
            k,
            [VerifySystem, LockTarget, Prepare, Prepare, Switch, Confirm]
        );
        assert_eq!(
            switch,
            "clan-activate switch r1 switch /nix/store/00000000000000000000000000000000-o-m"
        );
        assert!(undo);
        let (k, switch, undo) = kinds(Action::Boot);
        assert_eq!(k, [VerifySystem, LockTarget, Prepare, Switch]);
        assert_eq!(
            switch,
            "clan-activate switch r1 boot /nix/store/00000000000000000000000000000000-o-m"
        );
        assert!(undo);
        let (k, switch, _) = kinds(Action::Test);
        assert_eq!(
            k,
            [VerifySystem, LockTarget, Prepare, Prepare, Switch, Confirm]
        );
        assert_eq!(
            switch,
            "clan-activate switch r1 test /nix/store/00000000000000000000000000000000-o-m"
        );
        // dry-activate changes nothing: no lock, no profile, nothing to undo.
        let (k, switch, undo) = kinds(Action::DryActivate);
        assert_eq!(k, [VerifySystem, Switch]);
        assert_eq!(
            switch,
            "clan-activate switch r1 dry-activate /nix/store/00000000000000000000000000000000-o-m"
        );
        assert!(!undo);
    }

    #[test]
    fn non_root_targets_activate_through_sudo() {
        let mut c = ctx(HostKeyCheck::Strict);
        let steps = |c: &PlanContext| {
            plan_deploy(vec![machine("m", "deploy@t", BuildLocation::Target)], c).machines[0]
                .steps
                .clone()
        };
        for step in steps(&c) {
            let privileged = matches!(
                step.kind,
                StepKind::LockTarget | StepKind::Prepare | StepKind::Switch | StepKind::Confirm
            );
            let argv = step.local_argv();
            let remote = argv.last().unwrap();
            assert_eq!(
                remote.starts_with("sudo --non-interactive -- sh -c "),
                privileged,
                "{:?}: {remote}",
                step.kind
            );
            assert_eq!(
                step.command_line().starts_with("sudo clan-activate "),
                privileged
            );
        }
        c.sudo_password.insert("deploy@t:22".into());
        let with_password = steps(&c);
        let switch = with_password
            .iter()
            .find(|s| s.kind == StepKind::Switch)
            .unwrap();
        let Runner::Remote { command, .. } = &switch.runner else {
            panic!()
        };
        assert!(command.reads_password());
        // The password goes to sudo through the wrapper, never on the command line.
        assert!(command.to_shell().starts_with("sh -c '# clan: runs `sudo"));
        assert!(
            command
                .to_shell()
                .contains("IFS= read -r CLAN_SUDO_PASSWORD")
        );
        // root needs no sudo.
        let root = plan_deploy(vec![machine("m", "root@t", BuildLocation::Target)], &c);
        assert!(
            root.machines[0]
                .steps
                .iter()
                .all(|s| !s.local_argv().last().unwrap().contains("sudo"))
        );
    }

    #[test]
    fn machines_sharing_a_build_host_build_together() {
        let plan = plan_deploy(
            vec![
                machine("a", "root@ta", remote("root@b")),
                machine("self", "root@ts", BuildLocation::Target),
                machine("c", "root@tc", remote("root@b")),
            ],
            &ctx(HostKeyCheck::Strict),
        );
        assert_eq!(plan.groups.len(), 2);
        assert_eq!(plan.groups[0].members, vec![0, 2]);
        assert_eq!(plan.groups[1].members, vec![1]);
        assert_eq!(
            plan.groups[0].steps[0].command_line(),
            "env 'NIX_SSHOPTS=-o StrictHostKeyChecking=yes' nix --extra-experimental-features nix-command \
             copy --derivation --to ssh://root@b /nix/store/00000000000000000000000000000000-d-a.drv /nix/store/00000000000000000000000000000000-d-c.drv"
        );
        assert!(
            plan.groups[0].steps[2].command_line().starts_with(
                "nix-store --realise /nix/store/00000000000000000000000000000000-d-a.drv /nix/store/00000000000000000000000000000000-d-c.drv --add-root"
            )
        );
        assert_eq!(
            plan.groups[0]
                .validity_step(&["/nix/store/00000000000000000000000000000000-o-a"])
                .command_line(),
            "nix-store --check-validity --print-invalid /nix/store/00000000000000000000000000000000-o-a"
        );
    }

    #[test]
    fn default_builds_on_target_without_second_hop() {
        let plan = plan_deploy(
            vec![machine("m", "root@t", BuildLocation::Target)],
            &ctx(HostKeyCheck::Strict),
        );
        assert_eq!(plan.groups[0].label(), "target root@t");
        assert!(plan.machines[0].steps.iter().all(|s| !matches!(
            s.kind,
            StepKind::NestedCopy | StepKind::CopyFromWorkstation | StepKind::RelayCopy
        )));
        let all: Vec<String> = plan.groups[0]
            .steps
            .iter()
            .chain(&plan.machines[0].steps)
            .map(Step::host_label)
            .collect();
        assert!(all.iter().all(|h| !h.starts_with("build host")));
    }

    #[test]
    fn local_build_copies_from_the_workstation() {
        let mut c = ctx(HostKeyCheck::Strict);
        c.use_substitutes = true;
        let plan = plan_deploy(
            vec![machine("m", "root@t?IdentityFile=/k", BuildLocation::Local)],
            &c,
        );
        assert_eq!(plan.groups[0].steps[0].kind, StepKind::MakeRootDir);
        let copy = &plan.machines[0].steps[1];
        assert_eq!(copy.kind, StepKind::CopyFromWorkstation);
        assert_eq!(copy.host_label(), "workstation");
        assert_eq!(
            copy.local_env(),
            [(
                "NIX_SSHOPTS".to_string(),
                "-o IdentityFile=/k -o StrictHostKeyChecking=yes".to_string()
            )]
        );
        assert!(
            copy.command_line()
                .contains("copy --substitute-on-destination --to ssh://root@t")
        );
    }

    #[test]
    fn relay_copies_through_the_workstation_over_shared_connections() {
        let mut c = ctx(HostKeyCheck::Strict);
        c.copy_via_workstation = true;
        c.control_dir = Some("/run/c".into());
        let plan = plan_deploy(vec![machine("m", "root@t", remote("root@b"))], &c);
        let relay = &plan.machines[0].steps[1];
        assert_eq!(relay.kind, StepKind::RelayCopy);
        assert_eq!(relay.host_label(), "workstation");
        assert_eq!(
            relay.command_line(),
            "env 'NIX_SSHOPTS=-o BatchMode=yes -o ControlMaster=no -o ControlPath=/run/c/%C' \
             nix --extra-experimental-features nix-command copy --from ssh://root@b --to ssh://root@t /nix/store/00000000000000000000000000000000-o-m"
        );
    }

    #[test]
    fn own_control_path_is_left_alone() {
        let mut c = ctx(HostKeyCheck::Strict);
        c.control_dir = Some("/run/c".into());
        c.own_control_path.insert("root@b:22".into());
        assert_eq!(
            c.ssh_host(&"root@b".parse().unwrap(), false).control_path,
            None
        );
        assert_eq!(
            c.ssh_host(&"root@t".parse().unwrap(), false)
                .control_path
                .as_deref(),
            Some("/run/c/%C")
        );
    }

    /// The `--dry-run` plan of a machine through a build host, as people read it: every
    /// step, its host, its condition, and the undo. Run ids and hashes are fixed here.
    #[test]
    fn dry_run_plan_snapshot() {
        let plan = plan_deploy(
            vec![
                machine(
                    "web1",
                    "root@web1.example.com",
                    remote("root@builder.example.com"),
                ),
                machine("db1", "deploy@db1.example.com:2222", BuildLocation::Target),
            ],
            &ctx(HostKeyCheck::AcceptNew),
        );
        insta::assert_snapshot!(plan.to_string());
    }
}
