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
        toplevel: Some(crate::resolve::Toplevel {
            drv: StorePath::parse_drv(
                &format!("/nix/store/00000000000000000000000000000000-d-{name}.drv"),
                &StoreDir::default(),
                &Origin::CommandLine("test"),
            )
            .unwrap(),
            out: StorePath::parse(
                &format!("/nix/store/00000000000000000000000000000000-o-{name}"),
                &StoreDir::default(),
                &Origin::CommandLine("test"),
            )
            .unwrap(),
        }),
    }
}

fn remote(s: &str) -> BuildLocation {
    BuildLocation::Remote(s.parse().unwrap())
}

fn ctx(check: HostKeyCheck) -> PlanContext {
    PlanContext::example("r1", check)
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
fn a_build_host_gets_a_slot_for_each_machine_deployed_at_once() {
    use crate::plan::build_slots;
    // --build-jobs decides alone.
    assert_eq!(build_slots(Some(3), 8, 16, Some(4)), Some(3));
    assert_eq!(build_slots(Some(3), 8, 16, None), Some(3));
    // The host's own max-jobs when it has a slot for every machine at once.
    assert_eq!(build_slots(None, 8, 4, Some(4)), None);
    assert_eq!(build_slots(None, 8, 1, Some(1)), None);
    assert_eq!(build_slots(None, 8, 16, Some(32)), None);
    // Raised to one per machine at once, at most --jobs.
    assert_eq!(build_slots(None, 8, 16, Some(4)), Some(8));
    assert_eq!(build_slots(None, 8, 6, Some(4)), Some(6));
    assert_eq!(build_slots(None, 16, 16, Some(1)), Some(16));
    // A host that leaves its builds to its Nix builders keeps doing so.
    assert_eq!(build_slots(None, 8, 16, Some(0)), None);
    // Not known (no preflight): the host's own setting.
    assert_eq!(build_slots(None, 8, 16, None), None);
}

#[test]
fn the_preflights_max_jobs_reaches_the_realise() {
    let machines = || {
        (1..=6)
            .map(|i| machine(&format!("m{i}"), &format!("root@t{i}"), remote("root@b")))
            .collect::<Vec<_>>()
    };
    let mut ctx = ctx(HostKeyCheck::Strict);
    let realise =
        |ctx: &PlanContext| plan_deploy(machines(), ctx).groups[0].steps[2].command_line();
    assert!(realise(&ctx).starts_with("nix-store --realise /nix/store/"));
    ctx.builder_max_jobs.insert("root@b:22".into(), 2);
    assert!(realise(&ctx).starts_with("nix-store --realise --max-jobs 6 /nix/store/"));
    ctx.jobs = 4;
    assert!(realise(&ctx).starts_with("nix-store --realise --max-jobs 4 /nix/store/"));
    // The user's own --option max-jobs wins.
    ctx.nix_flags = ["--option", "max-jobs", "0"].map(String::from).to_vec();
    assert!(realise(&ctx).starts_with("nix-store --realise --option max-jobs 0 /nix/store/"));
    ctx.nix_flags.clear();
    ctx.builder_max_jobs.insert("root@b:22".into(), 4);
    assert!(realise(&ctx).starts_with("nix-store --realise /nix/store/"));
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
            "clan-activate lock r1 alice@ws 300 60 Always",
            "clan-activate prepare r1 switch /nix/store/00000000000000000000000000000000-o-m 30 TargetNotRunning",
            "clan-activate prepare r1 switch /nix/store/00000000000000000000000000000000-o-m 0 TargetRunning",
            "clan-activate switch r1 switch /nix/store/00000000000000000000000000000000-o-m - 0 Always",
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
    assert!(
        copy.contains(
            " sh env 'NIX_SSHOPTS=-o IdentityFile=/k -o StrictHostKeyChecking=accept-new \
         -o ServerAliveInterval=15 -o ServerAliveCountMax=4 -o BatchMode=yes \
         -o ControlMaster=auto -o ControlPath=/tmp/clan-r1-hop0/%C -o ControlPersist=60' sh -c "
        ),
        "{copy}"
    );
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
        " sh nix-store --realise /nix/store/00000000000000000000000000000000-d-m.drv --add-root /tmp/clan-r1-build0/system --keep-going --log-format internal-json --option build-poll-interval 1"
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
        "clan-activate switch r1 switch /nix/store/00000000000000000000000000000000-o-m - 0"
    );
    assert!(undo);
    let (k, switch, undo) = kinds(Action::Boot);
    assert_eq!(k, [VerifySystem, LockTarget, Prepare, Switch]);
    assert_eq!(
        switch,
        "clan-activate switch r1 boot /nix/store/00000000000000000000000000000000-o-m - 0"
    );
    assert!(undo);
    let (k, switch, _) = kinds(Action::Test);
    assert_eq!(
        k,
        [VerifySystem, LockTarget, Prepare, Prepare, Switch, Confirm]
    );
    assert_eq!(
        switch,
        "clan-activate switch r1 test /nix/store/00000000000000000000000000000000-o-m - 0"
    );
    // dry-activate changes nothing: no lock, no profile, nothing to undo.
    let (k, switch, undo) = kinds(Action::DryActivate);
    assert_eq!(k, [VerifySystem, Switch]);
    assert_eq!(
        switch,
        "clan-activate switch r1 dry-activate /nix/store/00000000000000000000000000000000-o-m - 0"
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
        // Through clan's sudo wrapper, which runs the script by its fixed path.
        assert_eq!(
            remote.contains("runs one of clan's scripts as root through sudo")
                && remote.contains(" clan-sudo 0 clan-activate "),
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
    assert!(command.to_shell().contains(" clan-sudo 1 clan-activate "));
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
        "env 'NIX_SSHOPTS=-o StrictHostKeyChecking=yes -o ServerAliveInterval=15 -o ServerAliveCountMax=4' \
         nix --extra-experimental-features nix-command copy --derivation --to ssh://root@b /nix/store/00000000000000000000000000000000-d-a.drv /nix/store/00000000000000000000000000000000-d-c.drv"
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
            "-o IdentityFile=/k -o StrictHostKeyChecking=yes -o ServerAliveInterval=15 -o ServerAliveCountMax=4".to_string()
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

// What the target's side of an activation says becomes one error, by its exit code and its
// `clan:` lines (never by English): the wording people read after each outcome.
#[test]
fn target_side_diagnoses_snapshot() {
    let plan = plan_deploy(
        vec![machine("m", "root@t", BuildLocation::Target)],
        &ctx(HostKeyCheck::Strict),
    );
    let m = &plan.machines[0];
    let step = |kind: StepKind| -> &Step {
        m.steps
            .iter()
            .chain(m.steps.iter().filter_map(|s| s.on_lost.as_deref()))
            .chain(plan.groups.iter().flat_map(|g| &g.steps))
            .find(|s| s.kind == kind)
            .unwrap()
    };
    use crate::activate::Exit;
    let cases = [
        (
            StepKind::Confirm,
            Exit::RolledBack.code(),
            "clan: rolled-back profile 6 /nix/store/00000000000000000000000000000000-o-prev\n",
        ),
        (StepKind::Confirm, Exit::NotPending.code(), ""),
        (
            StepKind::Confirm,
            255,
            "ssh: connect to host t port 22: Connection refused\n",
        ),
        (
            StepKind::SwitchOutcome,
            Exit::RolledBack.code(),
            "clan: rolled-back profile 6 /nix/store/00000000000000000000000000000000-o-prev\n",
        ),
        (
            StepKind::LockTarget,
            Exit::LockBusy.code(),
            "clan: busy a1b2 alice@laptop 2026-12-06T06:00:00Z\n",
        ),
        (
            StepKind::Prepare,
            Exit::LockLost.code(),
            "clan: lock-lost\n",
        ),
        (StepKind::Switch, 1, "activating the configuration...\n"),
        (
            StepKind::Realise,
            1,
            "error: builder for '/nix/store/x-m.drv' failed with exit code 2\n",
        ),
    ];
    let shown: Vec<String> = cases
        .iter()
        .map(|(kind, code, output)| {
            let error = crate::diagnostics::diagnose(&m.machine, step(*kind), output, Some(*code));
            format!(
                "{kind:?} exit {code} → exit {} ({})\n{error}",
                error.exit.code(),
                error.code.unwrap_or("no code")
            )
        })
        .collect();
    insta::assert_snapshot!(shown.join("\n\n"));
}

#[test]
fn build_plans_the_build_and_nothing_on_the_target() {
    let mut c = ctx(HostKeyCheck::Strict);
    c.activation.action = Action::Build;
    let plan = plan_deploy(
        vec![machine(
            "m",
            "root@t",
            BuildLocation::Remote("root@b".parse().unwrap()),
        )],
        &c,
    );
    assert!(plan.machines[0].steps.is_empty());
    assert!(
        plan.groups[0]
            .steps
            .iter()
            .any(|s| s.kind == StepKind::Realise)
    );
    assert!(!plan.to_string().contains("root@t]"), "{plan}");
}
