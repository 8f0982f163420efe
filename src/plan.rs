//! The deploy plan: every command of a deploy, as data. `--dry-run` prints it; the executor
//! runs it; tests inspect it. No stage runs anything that is not a step here.

use std::fmt;

use std::collections::BTreeSet;

use crate::host::HostAddress;
use crate::resolve::{BuildLocation, ResolvedMachine, describe_build, describe_target};
use crate::ssh::{HostKeyCheck, Invocation, RemoteCommand, Side, SshHost};

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
    /// Check that the toplevel is a NixOS system.
    VerifySystem,
    /// `nix-env -p /nix/var/nix/profiles/system --set`.
    SetProfile,
    /// `switch-to-configuration switch`.
    Switch,
    /// Remove the temporary GC root directory.
    RemoveRootDir,
}

impl StepKind {
    /// The stage the step belongs to.
    pub fn stage(self) -> Stage {
        match self {
            StepKind::CopyDerivations => Stage::CopyDerivations,
            StepKind::MakeRootDir | StepKind::Realise => Stage::Build,
            StepKind::NestedCopy | StepKind::CopyFromWorkstation | StepKind::RelayCopy => {
                Stage::CopyToTarget
            }
            StepKind::VerifySystem | StepKind::SetProfile | StepKind::Switch => Stage::Activate,
            StepKind::RemoveRootDir => Stage::Cleanup,
        }
    }

    /// Whether the step runs even after an earlier step failed.
    pub fn always_runs(self) -> bool {
        self == StepKind::RemoveRootDir
    }

    /// Whether a failure from this step on may leave the target half-updated.
    pub fn changes_target_system(self) -> bool {
        matches!(self, StepKind::SetProfile | StepKind::Switch)
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
            Runner::Remote { command, .. } => command.to_shell(),
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

/// The plan for one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachinePlan {
    /// The machine with its hosts decided.
    pub machine: ResolvedMachine,
    /// Its steps, in order.
    pub steps: Vec<Step>,
}

/// The plan for a deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployPlan {
    /// Unique id of this run; names temporary directories and the activation unit.
    pub run_id: String,
    /// Host key policy of every hop.
    pub host_key_check: HostKeyCheck,
    /// One plan per machine.
    pub machines: Vec<MachinePlan>,
}

/// `nix` with the experimental features the old-style commands need, enabled per call so
/// that hosts need no nix.conf change.
fn nix(args: &[&str]) -> Invocation {
    let mut all = vec!["--extra-experimental-features", "nix-command"];
    all.extend_from_slice(args);
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
        }
    }
}

/// `user@host:port`, what identifies one ssh connection.
pub fn connection_key(address: &HostAddress) -> String {
    format!("{}:{}", address.destination(), address.port.unwrap_or(22))
}

/// Builds the steps that deploy `machine`.
pub fn plan_machine(machine: ResolvedMachine, ctx: &PlanContext) -> MachinePlan {
    let target = ctx.ssh_host(&machine.target.value, false);
    let drv = machine.drv_path.as_str();
    let out = machine.out_path.as_str();
    let root_dir = format!("/tmp/clan-{}-{}", ctx.run_id, machine.name);
    let gc_root = format!("{root_dir}/system");
    let remote = |role: Role, host: &SshHost, kind: StepKind, inv: Invocation| Step {
        kind,
        runner: Runner::Remote {
            role,
            host: host.clone(),
            command: RemoteCommand::Run(inv),
        },
    };
    let local = |kind: StepKind, inv: Invocation| Step {
        kind,
        runner: Runner::Workstation(inv),
    };
    let mkdir = Invocation::new("mkdir", ["-m", "0700", &root_dir]);
    let realise = Invocation::new("nix-store", ["--realise", drv, "--add-root", &gc_root]);
    let rmdir = Invocation::new("rm", ["-rf", "--", &root_dir]);
    let copy_drvs_to = |host: &SshHost| {
        local(
            StepKind::CopyDerivations,
            nix(&["copy", "--derivation", "--to", &host.store_url(), drv])
                .with_env("NIX_SSHOPTS", host.nix_sshopts(Side::Workstation)),
        )
    };

    let mut steps = Vec::new();
    let cleanup = match &machine.build.value {
        BuildLocation::Remote(address) => {
            let builder = ctx.ssh_host(address, machine.forward_agent.value);
            steps.push(copy_drvs_to(&builder));
            steps.push(remote(
                Role::BuildHost,
                &builder,
                StepKind::MakeRootDir,
                mkdir,
            ));
            steps.push(remote(
                Role::BuildHost,
                &builder,
                StepKind::Realise,
                realise,
            ));
            if ctx.copy_via_workstation {
                steps.push(local(
                    StepKind::RelayCopy,
                    nix(&[
                        "copy",
                        "--from",
                        &builder.store_url(),
                        "--to",
                        &target.store_url(),
                        out,
                    ])
                    .with_env("NIX_SSHOPTS", relay_sshopts(&builder, &target)),
                ));
            } else {
                steps.push(remote(
                    Role::BuildHost,
                    &builder,
                    StepKind::NestedCopy,
                    nix(&["copy", "--to", &target.store_url(), out])
                        .with_env("NIX_SSHOPTS", target.nix_sshopts(Side::Nested)),
                ));
            }
            remote(Role::BuildHost, &builder, StepKind::RemoveRootDir, rmdir)
        }
        BuildLocation::Target => {
            steps.push(copy_drvs_to(&target));
            steps.push(remote(Role::Target, &target, StepKind::MakeRootDir, mkdir));
            steps.push(remote(Role::Target, &target, StepKind::Realise, realise));
            // The root may only go once the system profile holds the output.
            steps.extend(activation_steps(&target, out, &ctx.run_id));
            steps.push(remote(
                Role::Target,
                &target,
                StepKind::RemoveRootDir,
                rmdir,
            ));
            return MachinePlan { machine, steps };
        }
        BuildLocation::Local => {
            steps.push(local(StepKind::MakeRootDir, mkdir));
            steps.push(local(StepKind::Realise, realise));
            steps.push(local(
                StepKind::CopyFromWorkstation,
                nix(&["copy", "--to", &target.store_url(), out])
                    .with_env("NIX_SSHOPTS", target.nix_sshopts(Side::Workstation)),
            ));
            local(StepKind::RemoveRootDir, rmdir)
        }
    };
    steps.extend(activation_steps(&target, out, &ctx.run_id));
    steps.push(cleanup);
    MachinePlan { machine, steps }
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

/// Verify, set the profile, switch. The switch runs as a transient systemd unit where the
/// target has systemd, so a dropped ssh connection cannot kill it half-way.
fn activation_steps(target: &SshHost, out: &str, run_id: &str) -> Vec<Step> {
    let on_target = |kind, command| Step {
        kind,
        runner: Runner::Remote {
            role: Role::Target,
            host: target.clone(),
            command,
        },
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
    let set_profile = Invocation::new("nix-env", ["-p", SYSTEM_PROFILE, "--set", out]);
    vec![
        on_target(StepKind::VerifySystem, RemoteCommand::Run(verify)),
        on_target(StepKind::SetProfile, RemoteCommand::Run(set_profile)),
        on_target(
            StepKind::Switch,
            RemoteCommand::IfSystemd {
                with_systemd: systemd_switch(&switch_bin, run_id),
                without: Invocation::new(&switch_bin, ["switch"]),
            },
        ),
    ]
}

/// The switch as a transient unit that outlives the ssh session, piping its output back.
pub fn systemd_switch(switch_bin: &str, run_id: &str) -> Invocation {
    Invocation::new(
        "systemd-run",
        [
            "-E",
            "LOCALE_ARCHIVE",
            "-E",
            "NIXOS_INSTALL_BOOTLOADER",
            "--collect",
            "--no-ask-password",
            "--pipe",
            "--quiet",
            "--service-type=exec",
            &format!("--unit=clan-switch-to-configuration-{run_id}"),
            "--wait",
            switch_bin,
            "switch",
        ],
    )
}

impl fmt::Display for DeployPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Deploy plan (run {}, host key check: {})",
            self.run_id, self.host_key_check
        )?;
        for plan in &self.machines {
            writeln!(f)?;
            writeln!(f, "{}", describe_target(&plan.machine))?;
            writeln!(f, "{}", describe_build(&plan.machine))?;
            let mut stage = None;
            for step in &plan.steps {
                if stage != Some(step.kind.stage()) {
                    stage = Some(step.kind.stage());
                    writeln!(f, "  {}:", step.kind.stage())?;
                }
                writeln!(f, "    [{}] {}", step.host_label(), step.command_line())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::{Resolved, Source};

    fn machine(build: BuildLocation) -> ResolvedMachine {
        ResolvedMachine {
            name: "m".into(),
            target: Resolved {
                value: "root@t?IdentityFile=/k".parse().unwrap(),
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
            drv_path: "/nix/store/d-s.drv".into(),
            out_path: "/nix/store/o-s".into(),
        }
    }

    fn ctx(check: HostKeyCheck) -> PlanContext {
        PlanContext {
            run_id: "r1".into(),
            host_key_check: check,
            control_dir: None,
            own_control_path: BTreeSet::new(),
            copy_via_workstation: false,
        }
    }

    fn kinds(plan: &MachinePlan) -> Vec<(StepKind, String)> {
        plan.steps
            .iter()
            .map(|s| (s.kind, s.host_label()))
            .collect()
    }

    #[test]
    fn remote_build_host_copies_to_target_itself() {
        let plan = plan_machine(
            machine(BuildLocation::Remote("root@b".parse().unwrap())),
            &ctx(HostKeyCheck::AcceptNew),
        );
        let b = "build host root@b".to_string();
        let t = "target root@t?IdentityFile=/k".to_string();
        assert_eq!(
            kinds(&plan),
            vec![
                (StepKind::CopyDerivations, "workstation".into()),
                (StepKind::MakeRootDir, b.clone()),
                (StepKind::Realise, b.clone()),
                (StepKind::NestedCopy, b.clone()),
                (StepKind::VerifySystem, t.clone()),
                (StepKind::SetProfile, t.clone()),
                (StepKind::Switch, t),
                (StepKind::RemoveRootDir, b),
            ]
        );
        assert_eq!(
            plan.steps[3].command_line(),
            "env 'NIX_SSHOPTS=-o IdentityFile=/k -o StrictHostKeyChecking=accept-new -o BatchMode=yes' \
             nix --extra-experimental-features nix-command copy --to ssh://root@t /nix/store/o-s"
        );
        assert_eq!(
            plan.steps[2].command_line(),
            "nix-store --realise /nix/store/d-s.drv --add-root /tmp/clan-r1-m/system"
        );
    }

    #[test]
    fn default_builds_on_target_without_second_hop() {
        let plan = plan_machine(machine(BuildLocation::Target), &ctx(HostKeyCheck::Strict));
        assert!(plan.steps.iter().all(|s| s.kind != StepKind::NestedCopy));
        assert!(
            plan.steps
                .iter()
                .all(|s| !s.host_label().starts_with("build host"))
        );
        // The GC root goes only after the profile holds the system.
        let last = plan.steps.last().unwrap();
        assert_eq!(last.kind, StepKind::RemoveRootDir);
    }

    #[test]
    fn local_build_copies_from_the_workstation() {
        let plan = plan_machine(machine(BuildLocation::Local), &ctx(HostKeyCheck::Strict));
        let copy = plan
            .steps
            .iter()
            .find(|s| s.kind == StepKind::CopyFromWorkstation)
            .unwrap();
        assert_eq!(copy.host_label(), "workstation");
        assert_eq!(
            copy.local_env(),
            [(
                "NIX_SSHOPTS".to_string(),
                "-o IdentityFile=/k -o StrictHostKeyChecking=yes".to_string()
            )]
        );
    }

    #[test]
    fn relay_copies_through_the_workstation_over_shared_connections() {
        let mut c = ctx(HostKeyCheck::Strict);
        c.copy_via_workstation = true;
        c.control_dir = Some("/run/c".into());
        let plan = plan_machine(
            machine(BuildLocation::Remote("root@b".parse().unwrap())),
            &c,
        );
        assert!(plan.steps.iter().all(|s| s.kind != StepKind::NestedCopy));
        let relay = plan
            .steps
            .iter()
            .find(|s| s.kind == StepKind::RelayCopy)
            .unwrap();
        assert_eq!(relay.host_label(), "workstation");
        assert_eq!(
            relay.command_line(),
            "env 'NIX_SSHOPTS=-o BatchMode=yes -o ControlMaster=no -o ControlPath=/run/c/%C' \
             nix --extra-experimental-features nix-command copy --from ssh://root@b --to ssh://root@t /nix/store/o-s"
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

    #[test]
    fn switch_uses_systemd_run_only_where_systemd_runs() {
        let plan = plan_machine(machine(BuildLocation::Target), &ctx(HostKeyCheck::Strict));
        let switch = plan
            .steps
            .iter()
            .find(|s| s.kind == StepKind::Switch)
            .unwrap();
        assert_eq!(
            switch.command_line(),
            "if test -d /run/systemd/system; then systemd-run -E LOCALE_ARCHIVE -E NIXOS_INSTALL_BOOTLOADER \
             --collect --no-ask-password --pipe --quiet '--service-type=exec' \
             '--unit=clan-switch-to-configuration-r1' --wait /nix/store/o-s/bin/switch-to-configuration switch; \
             else /nix/store/o-s/bin/switch-to-configuration switch; fi"
        );
        let argv = switch.local_argv();
        assert_eq!(&argv[..3], ["ssh", "-T", "-x"]);
        assert!(!argv.contains(&"-t".to_string()), "never a pseudo-terminal");
    }
}
