//! The builder's side: where a build group builds, as a [`BuildBackend`]. It receives the
//! derivations, realises them under a GC root, says which toplevels are built, sends a
//! built system on towards a target, and cleans up. The workstation and a host over ssh
//! (a build host, or a target building for itself) implement it; a new place to build is
//! one more implementation.

use super::{Builder, PlanContext, Role, Runner, Step, StepKind, When, nix};
use crate::resolve::ResolvedMachine;
use crate::ssh::{Invocation, RemoteCommand, Side, SshHost};

/// The GC-root directory of group `g` on its builder.
fn root_dir(ctx: &PlanContext, g: usize) -> String {
    format!("/tmp/clan-{}-build{g}", ctx.scratch_id())
}

/// The private directory of group `g`'s build host for its shared connections to the
/// targets (the second hop).
pub fn hop_dir(run_id: &str, g: usize) -> String {
    format!("/tmp/clan-{run_id}-hop{g}")
}

/// Makes the second hop's private directory, then runs the rest (`src/scripts/hop-dir.sh`).
pub const HOP_DIR: &str = include_str!("../scripts/hop-dir.sh");

/// Ends the second hop's shared connections, removes their directory and the GC roots
/// (`src/scripts/hop-cleanup.sh`).
const HOP_CLEANUP: &str = include_str!("../scripts/hop-cleanup.sh");

/// A place that builds, rendered as steps.
pub trait BuildBackend {
    /// A command there. A `long` one (a build, a copy) ends when the deploy's connection
    /// does, so Ctrl-C stops it there too.
    fn run(&self, kind: StepKind, inv: Invocation, when: When, long: bool) -> Step;

    /// Copies the derivations of a group there from the workstation (`None`: they are
    /// there already).
    fn receive_derivations(&self, drvs: &[&str], ctx: &PlanContext) -> Option<Step>;

    /// Sends a built system to `target` (`None`: it is built there).
    fn send(&self, target: &SshHost, out: &str, ctx: &PlanContext) -> Option<Step>;

    /// Removes what group `g` left there.
    fn cleanup(&self, g: usize, ctx: &PlanContext) -> Step {
        self.run(
            StepKind::RemoveRootDir,
            Invocation::new("rm", ["-rf", "--", &root_dir(ctx, g)]),
            When::Always,
            false,
        )
    }
}

/// Builds on the workstation: no upload, the workstation's own copy to the target.
pub struct Workstation;

impl BuildBackend for Workstation {
    fn run(&self, kind: StepKind, inv: Invocation, when: When, _long: bool) -> Step {
        Step::new(kind, Runner::Workstation(inv), when)
    }

    fn receive_derivations(&self, _drvs: &[&str], _ctx: &PlanContext) -> Option<Step> {
        None
    }

    fn send(&self, target: &SshHost, out: &str, ctx: &PlanContext) -> Option<Step> {
        let url = target.store_url();
        let mut args = copy_args(ctx.use_substitutes);
        args.extend(["--to", &url, out]);
        Some(Step::new(
            StepKind::CopyFromWorkstation,
            Runner::Workstation(
                nix(&args, ctx).with_env("NIX_SSHOPTS", target.nix_sshopts(Side::Workstation)),
            ),
            When::TargetLacksSystem,
        ))
    }
}

/// Builds on a host over ssh: a build host, or a target that builds for itself.
pub struct OverSsh<'a> {
    /// Which host it is.
    pub role: Role,
    /// How to reach it.
    pub host: &'a SshHost,
}

impl BuildBackend for OverSsh<'_> {
    fn run(&self, kind: StepKind, inv: Invocation, when: When, long: bool) -> Step {
        let command = if long {
            RemoteCommand::UntilHangup(inv)
        } else {
            RemoteCommand::Run(inv)
        };
        Step::new(
            kind,
            Runner::Remote {
                role: self.role,
                host: self.host.clone(),
                command,
            },
            when,
        )
    }

    fn receive_derivations(&self, drvs: &[&str], ctx: &PlanContext) -> Option<Step> {
        let url = self.host.store_url();
        let mut args = vec!["copy", "--derivation", "--to", &url];
        args.extend(drvs.iter().copied());
        Some(Step::new(
            StepKind::CopyDerivations,
            Runner::Workstation(
                nix(&args, ctx).with_env("NIX_SSHOPTS", self.host.nix_sshopts(Side::Workstation)),
            ),
            When::Always,
        ))
    }

    fn send(&self, target: &SshHost, out: &str, ctx: &PlanContext) -> Option<Step> {
        if self.role == Role::Target {
            return None;
        }
        let url = target.store_url();
        let mut args = copy_args(ctx.use_substitutes);
        if ctx.copy_via_workstation {
            // build host → workstation → target, streamed through the workstation.
            let from = self.host.store_url();
            args.extend(["--from", &from, "--to", &url, out]);
            return Some(Step::new(
                StepKind::RelayCopy,
                Runner::Workstation(
                    nix(&args, ctx).with_env("NIX_SSHOPTS", relay_sshopts(self.host, target)),
                ),
                When::TargetLacksSystem,
            ));
        }
        // The second hop: the build host's own copy, with its own keys.
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
        Some(self.run(StepKind::NestedCopy, copy, When::TargetLacksSystem, true))
    }

    fn cleanup(&self, g: usize, ctx: &PlanContext) -> Step {
        if self.role == Role::Target || ctx.copy_via_workstation {
            return self.run(
                StepKind::RemoveRootDir,
                Invocation::new("rm", ["-rf", "--", &root_dir(ctx, g)]),
                When::Always,
                false,
            );
        }
        // The build host also ends its shared connections to the targets.
        self.run(
            StepKind::RemoveRootDir,
            Invocation::new(
                "sh",
                [
                    "-c",
                    HOP_CLEANUP,
                    "clan-hop-cleanup",
                    &hop_dir(&ctx.scratch_id(), g),
                    &root_dir(ctx, g),
                ],
            ),
            When::Always,
            false,
        )
    }
}

impl Builder {
    /// Its backend.
    pub fn backend(&self) -> Box<dyn BuildBackend + '_> {
        match self {
            Builder::Local => Box::new(Workstation),
            Builder::Remote { role, host } => Box::new(OverSsh { role: *role, host }),
        }
    }
}

/// A group's build: its derivations copied once, the root directory, one realise of all
/// its toplevels; and its clean-up.
pub(super) fn group_steps(
    builder: &Builder,
    members: &[&ResolvedMachine],
    g: usize,
    ctx: &PlanContext,
) -> (Vec<Step>, Step) {
    let backend = builder.backend();
    let dir = root_dir(ctx, g);
    let drvs: Vec<&str> = members.iter().map(|m| m.drv_path().as_str()).collect();
    let mut steps: Vec<Step> = backend
        .receive_derivations(&drvs, ctx)
        .into_iter()
        .collect();
    steps.push(backend.run(
        StepKind::MakeRootDir,
        Invocation::new("mkdir", ["-m", "0700", &dir]),
        When::Always,
        false,
    ));
    let root = format!("{dir}/system");
    let builders = members
        .first()
        .and_then(|m| m.builders.as_ref())
        .map(|b| b.value.to_nix());
    let mut realise = vec!["--realise"];
    realise.extend(ctx.nix_flags.iter().map(String::as_str));
    let host_key = match builder {
        Builder::Local => "localhost".to_string(),
        Builder::Remote { host, .. } => super::connection_key(&host.address),
    };
    // `--option max-jobs N` on the command line is the user's own choice.
    let own_option = ctx
        .nix_flags
        .chunks(3)
        .any(|o| o.len() == 3 && o[0] == "--option" && o[1] == "max-jobs");
    let build_jobs = super::build_slots(
        ctx.build_jobs,
        ctx.jobs,
        members.len(),
        ctx.builder_max_jobs
            .get(&host_key)
            .copied()
            .filter(|_| !own_option),
    )
    .map(|n| n.to_string());
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
    // A fleet's batches share what they build through Nix's locks: a build that another
    // realise holds is looked at again every second, not every 5 s (Nix's default), unless
    // the user chose otherwise.
    if !ctx
        .nix_flags
        .chunks(3)
        .any(|o| o.len() == 3 && o[0] == "--option" && o[1] == "build-poll-interval")
    {
        realise.extend(["--option", "build-poll-interval", "1"]);
    }
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
    steps.push(backend.run(StepKind::Realise, realise, When::Always, true));
    (steps, backend.cleanup(g, ctx))
}

/// The step that lists which of `outputs` are not yet valid on `builder`.
pub(super) fn poll_built(builder: &Builder, outputs: &[&str]) -> Step {
    let mut args = vec!["--check-validity", "--print-invalid"];
    args.extend_from_slice(outputs);
    builder.backend().run(
        StepKind::CheckBuilt,
        Invocation::new("nix-store", args),
        When::Always,
        false,
    )
}

/// `nix copy` with `--substitute-on-destination` when targets may substitute.
fn copy_args(use_substitutes: bool) -> Vec<&'static str> {
    let mut args = vec!["copy"];
    if use_substitutes {
        args.push("--substitute-on-destination");
    }
    args
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
