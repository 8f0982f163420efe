//! `clan machines update`: evaluate → resolve → plan → preflight → execute → report.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Read};

use crate::cli::{LogFormat, UpdateArgs};
use crate::commands::machines::load_selection_skipping;
use crate::connection::Connections;
use crate::error::{Error, ExitKind, Hint};
use crate::execute::{Logs, MachineReport, Outcome, RunOptions, exit_code, run_plan};
use crate::plan::{Action, Activation, PlanContext, connection_key, plan_deploy};
use crate::preflight;
use crate::progress::Progress;
use crate::report;
use crate::resolve::{
    BuildLocation, ResolvedMachine, SshConfigLookup, describe_build, describe_forward_agent,
    describe_target,
};
use crate::ssh::SshHost;
use crate::sudo;

/// Runs the command; returns the process exit code. With `--json`, a report is printed on
/// every exit path: a deploy's, or the errors that ended the run before it.
pub fn run(args: &UpdateArgs) -> Result<ExitKind, Error> {
    let result = deploy(args);
    if args.json
        && let Err(error) = &result
    {
        print_json(&report::failure_json(
            None,
            std::slice::from_ref(error),
            error.exit,
        ));
    }
    result
}

/// The command line's overrides; the clan's directory for vars unless `--no-secrets`.
fn update_overrides(args: &UpdateArgs) -> Result<crate::resolve::Overrides, Error> {
    let mut overrides = args.hosts.overrides(Some(&args.agent));
    if !args.no_secrets {
        overrides.vars_repo = Some(crate::commands::machines::clan_dir(&args.hosts.flake)?);
    }
    Ok(overrides)
}

/// Nix options; unless `--no-secrets` or `--dry-run`, each machine's missing vars are
/// generated as it is evaluated (as clan-core does before an update), one machine at a
/// time (prompts), and the user's identity is checked against its key.
fn update_nix_options(args: &UpdateArgs) -> Result<crate::eval::NixOptions, Error> {
    let mut nix = args.hosts.nix_options()?;
    if args.no_secrets || args.dry_run {
        return Ok(nix);
    }
    let repo = crate::vars::Repo {
        root: crate::commands::machines::clan_dir(&args.hosts.flake)?,
    };
    let one_at_a_time = std::sync::Mutex::new(());
    let sandbox = !args.no_sandbox;
    if args.no_sandbox {
        eprintln!(
            "warning: --no-sandbox: vars generators run with your environment, home directory and network"
        );
    }
    nix.vars = Some(crate::eval::VarsHook(std::sync::Arc::new(
        move |name, facts, settings| {
            let Some(vars) = &facts.vars else {
                return Ok(());
            };
            let _turn = one_at_a_time.lock().unwrap_or_else(|e| e.into_inner());
            let settings = settings.cloned().unwrap_or_default();
            let generate = || {
                let mut generation = crate::vars::generate::Generation::new(&repo, &settings);
                generation.sandbox = sandbox;
                generation.machine(name, vars)
            };
            let missing = vars
                .generators
                .iter()
                .any(|(g, decl)| !repo.generated(name, g, decl));
            if missing {
                // In a fleet, the live lines are on the screen by now: prompts and messages
                // go between them.
                crate::progress::with_terminal(generate)?;
            } else {
                generate()?;
            }
            if !vars.uploaded_files(name).is_empty() {
                // The upload's key opens every secret it goes with: found out now, before
                // any build.
                repo.check_upload(name, vars, crate::vars::upload::user_identity()?)?;
            }
            Ok(())
        },
    )));
    Ok(nix)
}

/// `clan machines build`: the deploy with `--action build` (whatever `--action` says).
pub fn build(args: &UpdateArgs) -> Result<ExitKind, Error> {
    if args.action != Action::Switch && args.action != Action::Build {
        return Err(Error::usage(format!(
            "clan machines build takes no --action {} (from the command line): it only builds",
            args.action.word()
        )));
    }
    run(&UpdateArgs {
        action: Action::Build,
        ..args.clone()
    })
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON always serializes")
    );
}

fn deploy(args: &UpdateArgs) -> Result<ExitKind, Error> {
    let several = !(args.machines.len() == 1 && args.tags.is_empty());
    if several && !args.dry_run && args.canary.is_empty() && args.batch_size.is_none() {
        return deploy_streaming(args);
    }
    let overrides = update_overrides(args)?;
    let mut skipped = Some(Vec::new());
    let mut failed = Some(Vec::new());
    let machines: Vec<ResolvedMachine> = load_selection_skipping(
        &args.hosts.flake,
        &args.machines,
        &args.tags,
        &overrides,
        &update_nix_options(args)?,
        &mut skipped,
        &mut failed,
    )?
    .into_iter()
    .map(|loaded| loaded.machine)
    .collect();
    for (name, why) in skipped.unwrap_or_default() {
        crate::progress::line(&format!("{name}: skipped ({why})"));
    }
    let failed = failed.unwrap_or_default();
    for (name, error) in &failed {
        crate::progress::line(&format!("{name}: evaluation failed: {}", error.message));
    }
    if machines.is_empty() {
        if let Some((_, error)) = failed.into_iter().next() {
            return Err(error);
        }
        return Err(Error::usage(
            "no machine to update: none is selected, or every one was skipped (see above)",
        ));
    }
    if args.copy_via_workstation {
        check_relay(&machines)?;
    }
    let (mut batches, canaries) = rollout_batches(&machines, &args.canary, args.batch_size)?;

    let run_id = run_id();
    let connections = if args.dry_run {
        Connections::disabled()
    } else {
        Connections::new(&run_id)
    };
    let mut ctx = plan_context(args, &run_id, &connections)?;
    (ctx.own_control_path, ctx.own_keepalive) = own_ssh_settings(&machines);
    if !args.dry_run && args.action.reaches_target() {
        let targets: Vec<(String, SshHost)> = machines
            .iter()
            .map(|m| (m.name.to_string(), ctx.ssh_host(&m.target.value, false)))
            .collect();
        ctx.sudo_password = sudo::needs_password(&targets, &connections)?;
        if !ctx.sudo_password.is_empty() {
            let password = sudo::read_password(&ctx.sudo_password)?;
            if !args.no_preflight {
                sudo::check_password(&targets, &ctx.sudo_password, &password, &connections)?;
            }
            crate::execute::set_sudo_password(password);
        }
    }
    if crate::interrupt::requested() {
        return Err(crate::error::interrupted("before the deploy began"));
    }
    let mut plan = plan_deploy(machines, &ctx);
    if args.dry_run {
        warn(&plan, &ctx);
        print!("{plan}");
        if batches.len() > 1 {
            println!("\nRollout, one batch after the other:");
            for (w, wave) in batches.iter().enumerate() {
                let names: Vec<&str> = wave.iter().map(|m| m.name.as_str()).collect();
                println!(
                    "  batch {}{}: {}",
                    w + 1,
                    if w == 0 && canaries > 0 {
                        " (canary)"
                    } else {
                        ""
                    },
                    names.join(", ")
                );
            }
        }
        eprintln!("Dry run: nothing was copied, built or activated.");
        return Ok(if failed.is_empty() {
            ExitKind::Success
        } else {
            ExitKind::DeployFailed
        });
    }

    // Machines whose target runs this very system have nothing to do (rolling deploys and
    // --reactivate switch again).
    let mut up_to_date = Vec::new();
    let mut lacking = BTreeSet::new();
    if !args.reactivate && batches.len() == 1 {
        let (done, rest, without) =
            split_up_to_date(&plan, &connections, &|line| eprintln!("{line}"));
        lacking = without;
        for report in &done {
            eprintln!(
                "{}: up to date: {} runs this system already (--reactivate switches to it again)",
                report.name, report.target
            );
        }
        if !done.is_empty() {
            if rest.is_empty() {
                let logs = Logs::create(&plan.run_id);
                return Ok(finish(args, &plan.run_id, &done, &logs));
            }
            batches = vec![rest.clone()];
            plan = plan_deploy(rest, &ctx);
        }
        up_to_date = done;
    }
    announce(&plan, &ctx);
    if !args.no_preflight {
        eprintln!("Preflight: checking every hop…");
        let findings = preflight::run(&plan, &ctx, &connections);
        let problems = findings.problems;
        if crate::interrupt::requested() {
            return Err(crate::error::interrupted("during the preflight"));
        }
        if !problems.is_empty() {
            for problem in &problems {
                eprintln!("\n{problem}");
            }
            eprintln!(
                "\nPreflight found {} problem(s); nothing was copied, built or activated.",
                problems.len()
            );
            // Every failure names where its full output is.
            let text: String = problems.iter().map(|p| format!("{p}\n\n")).collect();
            if let Some(log) = Logs::create(&plan.run_id).write("preflight", &text) {
                eprintln!("Full output: {}", log.display());
            }
            let code = ExitKind::DeployFailed;
            if args.json {
                print_json(&report::failure_json(Some(&plan.run_id), &problems, code));
            }
            return Ok(code);
        }
        eprintln!("Preflight: all hops ok.");
        // What the build hosts said of their max-jobs sets how many builds run at once.
        ctx.builder_max_jobs = findings.max_jobs;
        plan = plan_deploy(plan.machines.into_iter().map(|m| m.machine).collect(), &ctx);
    }
    let logs = Logs::create(&plan.run_id);
    let live =
        !args.verbose && args.log_format == LogFormat::Auto && std::io::stderr().is_terminal();
    let options = RunOptions {
        jobs: usize::from(args.jobs),
        fail_fast: args.fail_fast,
    };
    // One batch, or a rolling deploy: canaries, then batches; each batch is planned and run
    // on its own, and a failed canary or too many failures stop the batches after it.
    let mut reports = Vec::new();
    let waves = &batches;
    for (w, wave) in waves.iter().enumerate() {
        let wave_plan = if waves.len() == 1 {
            plan.clone()
        } else {
            plan_deploy(wave.clone(), &ctx)
        };
        if waves.len() > 1 {
            let names: Vec<&str> = wave.iter().map(|m| m.name.as_str()).collect();
            eprintln!(
                "Batch {} of {}{}: {}",
                w + 1,
                waves.len(),
                if w == 0 && canaries > 0 {
                    " (canary)"
                } else {
                    ""
                },
                names.join(", ")
            );
        }
        let names: Vec<String> = wave_plan
            .machines
            .iter()
            .map(|m| m.machine.name.to_string())
            .collect();
        let progress = Progress::new(&names, live, args.verbose);
        reports.extend(run_plan(
            &wave_plan,
            &connections,
            &logs,
            &progress,
            options,
            &lacking,
        ));
        progress.close();
        let failures = reports
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
            .count();
        let canary_failed = w == 0 && canaries > 0 && failures > 0;
        if w + 1 < waves.len()
            && (canary_failed || failures > args.max_failures || crate::interrupt::requested())
        {
            let why = if canary_failed {
                "the canary failed".to_string()
            } else if crate::interrupt::requested() {
                "interrupted".to_string()
            } else {
                format!(
                    "{failures} machine(s) failed, more than --max-failures {}",
                    args.max_failures
                )
            };
            eprintln!("Rollout stopped after batch {}: {why}.", w + 1);
            for m in waves[w + 1..].iter().flatten() {
                reports.push(MachineReport::not_run(
                    &m.name,
                    m.target.value.to_string(),
                    Outcome::NotStarted(format!(
                        "the rollout stopped after batch {}: {why}",
                        w + 1
                    )),
                ));
            }
            break;
        }
    }
    reports.extend(up_to_date);
    // Machines whose evaluation failed are reported with the others.
    reports.extend(
        failed
            .into_iter()
            .map(|(name, error)| MachineReport::not_run(&name, "-".into(), Outcome::Failed(error))),
    );
    Ok(finish(args, &plan.run_id, &reports, &logs))
}

/// Splits off the machines with nothing to do ([`crate::execute::up_to_date`]): their
/// reports, and the machines left to deploy.
/// A machine whose target runs the system but has an activation that an earlier run left
/// unconfirmed is not up to date: `say` gets a line about it, and it is deployed again.
fn split_up_to_date(
    plan: &crate::plan::DeployPlan,
    connections: &Connections,
    say: &dyn Fn(&str),
) -> (Vec<MachineReport>, Vec<ResolvedMachine>, BTreeSet<String>) {
    let checked = crate::execute::up_to_date(plan, connections);
    for (&i, runs) in &checked.pending {
        let m = &plan.machines[i].machine;
        let runs = if runs.iter().any(|r| r == "unknown") {
            "whose records this user cannot read".to_string()
        } else {
            format!("of run {}", runs.join(", "))
        };
        say(&format!(
            "{}: not up to date: {} has an activation {runs} that was never confirmed (its watchdog would roll it back): deploying takes it over and confirms",
            m.name, m.target.value
        ));
    }
    let mut reports = Vec::new();
    let mut rest = Vec::new();
    let lacking = checked
        .lacking
        .iter()
        .map(|&i| plan.machines[i].machine.name.to_string())
        .collect();
    for (i, m) in plan.machines.iter().enumerate() {
        if checked.up_to_date.contains(&i) {
            reports.push(MachineReport::not_run(
                &m.machine.name,
                m.machine.target.value.to_string(),
                Outcome::UpToDate,
            ));
        } else {
            rest.push(m.machine.clone());
        }
    }
    (reports, rest, lacking)
}

/// Hosts whose ssh config sets a ControlPath (their own sharing is kept) and hosts whose
/// ssh config sets keep-alives (clan adds none): `ssh -G` once per host, all at once.
fn own_ssh_settings(machines: &[ResolvedMachine]) -> (BTreeSet<String>, BTreeSet<String>) {
    // Each connection once: a build host shared by a fleet is asked about once.
    let mut addresses = std::collections::BTreeMap::new();
    for m in machines {
        addresses.insert(connection_key(&m.target.value), &m.target.value);
        if let BuildLocation::Remote(addr) = &m.build.value {
            addresses.insert(connection_key(addr), addr);
        }
    }
    // Sixteen at a time: a large fleet does not start hundreds of ssh processes at once.
    let addresses: Vec<(String, &crate::host::HostAddress)> = addresses.into_iter().collect();
    let mut settings: Vec<(String, crate::resolve::OwnSshSettings)> = Vec::new();
    for chunk in addresses.chunks(16) {
        std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|(key, addr)| {
                    scope.spawn(move || (key.clone(), SshConfigLookup::own_settings(addr)))
                })
                .collect();
            settings.extend(handles.into_iter().filter_map(|h| h.join().ok()));
        });
    }
    let pick = |f: fn(&crate::resolve::OwnSshSettings) -> bool| {
        settings
            .iter()
            .filter(|(_, s)| f(s))
            .map(|(k, _)| k.clone())
            .collect()
    };
    (pick(|s| s.control_path), pick(|s| s.keepalive))
}

/// The relay shares one `NIX_SSHOPTS` between both ends, so they must agree on the port.
fn check_relay(machines: &[ResolvedMachine]) -> Result<(), Error> {
    for m in machines {
        if let BuildLocation::Remote(builder) = &m.build.value
            && builder.port.unwrap_or(22) != m.target.value.port.unwrap_or(22)
        {
            return Err(Error::usage(format!(
                "{}: --copy-via-workstation needs the build host {builder} and the target {} on the same ssh port",
                m.name, m.target.value
            ))
            .hint(Hint::text(
                "set the port in ~/.ssh/config (Host … Port …) instead of in the address",
            )));
        }
    }
    Ok(())
}

/// Before anything runs: where each machine goes and builds, and why; the agent and
/// `--host-key-check none` warnings.
fn announce(plan: &crate::plan::DeployPlan, ctx: &PlanContext) {
    if ctx.host_key_check == crate::ssh::HostKeyCheck::None {
        crate::progress::line(&host_key_none_warning(plan));
    }
    for machine in &plan.machines {
        crate::progress::line(&describe_target(&machine.machine));
        crate::progress::line(&describe_build(&machine.machine));
        if let Some(warning) = describe_forward_agent(&machine.machine) {
            crate::progress::line(&warning);
        }
    }
}

/// The warnings [`announce`] gives, for `--dry-run`: it shows every warning the real run
/// would.
fn warn(plan: &crate::plan::DeployPlan, ctx: &PlanContext) {
    if ctx.host_key_check == crate::ssh::HostKeyCheck::None {
        crate::progress::line(&host_key_none_warning(plan));
    }
    for machine in &plan.machines {
        if let Some(warning) = describe_forward_agent(&machine.machine) {
            crate::progress::line(&warning);
        }
    }
}

/// The end of a run for people and scripts: each machine's change summary, the summary
/// table, where the logs are when something failed, and the `--json` report. Returns the
/// exit code.
fn finish(args: &UpdateArgs, run_id: &str, reports: &[MachineReport], logs: &Logs) -> ExitKind {
    let code = exit_code(reports);
    for r in reports {
        if let Some(changes) = &r.changes {
            eprintln!(
                "\nChanges on {}:\n{}",
                r.name,
                crate::progress::colours_if_wanted(changes.trim_end())
            );
        }
    }
    eprint!("\n{}", report::summary(reports));
    if code != ExitKind::Success
        && let Some(dir) = logs.dir()
    {
        eprintln!("Logs of every machine and build: {}", dir.display());
    }
    if args.json {
        print_json(&report::json(run_id, reports, code));
    }
    code
}

/// The run's planning context from the flags (connections per host and sudo are filled in
/// later, per machine set).
fn plan_context(
    args: &UpdateArgs,
    run_id: &str,
    connections: &Connections,
) -> Result<PlanContext, Error> {
    Ok(PlanContext {
        run_id: run_id.to_string(),
        batch: None,
        host_key_check: args.connect.host_key_check,
        control_dir: connections.dir(),
        own_control_path: BTreeSet::new(),
        own_keepalive: BTreeSet::new(),
        copy_via_workstation: args.copy_via_workstation,
        use_substitutes: args.use_substitutes,
        activation: Activation {
            action: args.action,
            diff: !args.no_diff,
            rollback_timeout: (!args.no_rollback).then_some(args.rollback_timeout),
        },
        sudo_password: BTreeSet::new(),
        workstation: workstation_identity(),
        lock_timeout: args.lock_timeout,
        nix_flags: args.hosts.nix_options()?.flags(),
        health_check_timeout: args.health_check_timeout,
        rollback_on_unhealthy: args.rollback_on_unhealthy,
        build_jobs: args.build_jobs,
        jobs: args.jobs,
        builder_max_jobs: Default::default(),
    })
}

/// 16 hex digits from the kernel's random source: names temporary roots and units.
pub fn run_id() -> String {
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    if bytes == [0; 8] {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        bytes = (t.as_nanos() as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `user@host` of this workstation, as a target's lock shows it to other deploys: only
/// letters, digits and `.-_` (anything else becomes `_`).
pub fn workstation_identity() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "?".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let clean = |s: &str| -> String {
        let s: String = s
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if s.is_empty() { "unknown".into() } else { s }
    };
    format!("{}@{}", clean(&user), clean(&host))
}

/// One line naming every host whose key `--host-key-check none` leaves unchecked.
pub fn host_key_none_warning(plan: &crate::plan::DeployPlan) -> String {
    let mut hosts = std::collections::BTreeSet::new();
    for m in &plan.machines {
        hosts.insert(m.machine.target.value.destination());
        if let BuildLocation::Remote(builder) = &m.machine.build.value {
            hosts.insert(builder.destination());
        }
    }
    format!(
        "warning: --host-key-check none: host keys are not checked for {} (nor on the build host's copies to targets): anyone on the network path can impersonate these hosts",
        hosts.into_iter().collect::<Vec<_>>().join(", ")
    )
}

/// The batches of a deploy: everything at once; or the canaries alone first, then the others
/// in batches of `--batch-size`. Returns the batches and how many canaries lead.
pub fn rollout_batches(
    machines: &[ResolvedMachine],
    canary: &[String],
    batch_size: Option<crate::cli::BatchSize>,
) -> Result<(Vec<Vec<ResolvedMachine>>, usize), Error> {
    for name in canary {
        if !machines.iter().any(|m| m.name.as_str() == name) {
            return Err(Error::usage(format!(
                "the canary {name:?} (from --canary) is not one of the machines being deployed"
            )));
        }
    }
    let (first, rest): (Vec<ResolvedMachine>, Vec<ResolvedMachine>) = machines
        .iter()
        .cloned()
        .partition(|m| canary.iter().any(|c| c == m.name.as_str()));
    let mut batches = Vec::new();
    let canaries = first.len();
    if !first.is_empty() {
        batches.push(first);
    }
    match batch_size {
        Some(size) => {
            let size = size.of(machines.len());
            batches.extend(rest.chunks(size).map(<[ResolvedMachine]>::to_vec));
        }
        None if !rest.is_empty() => batches.push(rest),
        None => {}
    }
    Ok((batches, canaries))
}

/// How long machines that finished evaluating wait for others before their build starts:
/// those that finish close together build in one batch, but no machine waits longer than
/// [`STREAM_MAX_WAIT`] after its own evaluation.
const STREAM_WINDOW: std::time::Duration = std::time::Duration::from_millis(500);

/// The longest a machine waits, once evaluated, for others to join its batch.
const STREAM_MAX_WAIT: std::time::Duration = std::time::Duration::from_millis(1000);

/// A deploy of several machines that streams: each machine is evaluated on its own, and
/// machines go on to their preflight, build, copy and activation as soon as they (and any
/// that finish within [`STREAM_WINDOW`] of them) are evaluated, while the others are still
/// being evaluated. Each such batch is planned, checked and run on its own, concurrently.
fn deploy_streaming(args: &UpdateArgs) -> Result<ExitKind, Error> {
    use crate::commands::machines::{StreamedMachine, stream_selection};
    let overrides = update_overrides(args)?;
    let nix = update_nix_options(args)?;
    let streamed = stream_selection(
        &args.hosts.flake,
        &args.machines,
        &args.tags,
        &overrides,
        &nix,
    )?;
    let run_id = run_id();
    let connections = Connections::new(&run_id);
    let base = plan_context(args, &run_id, &connections)?;
    let logs = Logs::create(&run_id);
    let live =
        !args.verbose && args.log_format == LogFormat::Auto && std::io::stderr().is_terminal();
    let names = streamed.index.selected_names.clone();
    let progress = Progress::new(&names, live, args.verbose);
    let options = RunOptions {
        jobs: usize::from(args.jobs),
        fail_fast: args.fail_fast,
    };
    let sudo_lock = std::sync::Mutex::new(());
    // --fail-fast across batches: once a machine failed, later batches do not start.
    let failed_seen = std::sync::atomic::AtomicBool::new(false);
    let expected = streamed.expected();
    // No activation before every machine's values passed the trust boundary.
    crate::execute::gate::close();
    let mut refused: Vec<String> = Vec::new();
    let mut early: Vec<MachineReport> = Vec::new();
    let mut skipped_any = false;
    let mut reports: Vec<MachineReport> = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let mut pending: Vec<ResolvedMachine> = Vec::new();
        let mut received = 0;
        let mut wave: u8 = 0;
        let mut first_pending: Option<std::time::Instant> = None;
        while received < expected {
            let wait = match first_pending {
                None => std::time::Duration::from_secs(24 * 3600),
                Some(since) => STREAM_WINDOW.min(STREAM_MAX_WAIT.saturating_sub(since.elapsed())),
            };
            let mut window_closed = false;
            match streamed.evaluated.recv_timeout(wait) {
                Ok(evaluated) => {
                    received += 1;
                    match streamed.resolve(evaluated, &overrides) {
                        StreamedMachine::Ready(m) => {
                            first_pending.get_or_insert_with(std::time::Instant::now);
                            pending.push(*m);
                        }
                        StreamedMachine::Skipped(name, why) => {
                            skipped_any = true;
                            crate::progress::line(&format!("{name}: skipped ({why})"));
                            if let Some(i) = names.iter().position(|n| n == name.as_str()) {
                                progress.finish(i, false, &format!("skipped ({why})"));
                            }
                        }
                        StreamedMachine::Failed(name, error) => {
                            let is_refused = error.code == Some(crate::error::REFUSED);
                            if is_refused {
                                refused.push(name.to_string());
                                crate::progress::line(&format!("error: {}", error.message));
                                // Machines still building stop before their activation.
                                crate::execute::gate::refuse(&refused.join(", "));
                            } else {
                                crate::progress::line(&format!(
                                    "{name}: evaluation failed: {}",
                                    error.message
                                ));
                            }
                            if let Some(i) = names.iter().position(|n| n == name.as_str()) {
                                let why = if is_refused {
                                    "refused (see above)"
                                } else {
                                    "evaluation failed"
                                };
                                progress.finish(i, false, why);
                            }
                            early.push(MachineReport::not_run(
                                &name,
                                "-".into(),
                                Outcome::Failed(error),
                            ));
                        }
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => window_closed = true,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => received = expected,
            }
            if crate::interrupt::requested() {
                break;
            }
            let waited_enough = first_pending.is_some_and(|t| t.elapsed() >= STREAM_MAX_WAIT);
            if !pending.is_empty() && (window_closed || waited_enough || received >= expected) {
                first_pending = None;
                let machines = std::mem::take(&mut pending);
                if args.fail_fast && failed_seen.load(std::sync::atomic::Ordering::SeqCst) {
                    for m in &machines {
                        if let Some(i) = names.iter().position(|n| n == m.name.as_str()) {
                            progress.finish(i, false, "skipped (--fail-fast)");
                        }
                        early.push(MachineReport::not_run(
                            &m.name,
                            m.target.value.to_string(),
                            Outcome::Skipped,
                        ));
                    }
                    continue;
                }
                let failed_seen = &failed_seen;
                let (base, connections, logs, progress, names, sudo_lock) =
                    (&base, &connections, &logs, &progress, &names, &sudo_lock);
                let this = wave;
                wave = wave.wrapping_add(1);
                handles.push(scope.spawn(move || {
                    let reports = run_wave(
                        args,
                        base,
                        this,
                        machines,
                        connections,
                        logs,
                        progress,
                        names,
                        sudo_lock,
                        options,
                    );
                    if reports
                        .iter()
                        .any(|r| matches!(r.outcome, Outcome::Failed(_)))
                    {
                        failed_seen.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    reports
                }));
            }
        }
        // Every machine is checked: activations go ahead, unless a value was refused.
        if refused.is_empty() {
            crate::execute::gate::open();
        }
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("wave thread"))
            .collect()
    });
    crate::execute::gate::open();
    progress.close();
    reports.extend(early);
    if crate::interrupt::requested() && reports.is_empty() {
        return Err(crate::error::interrupted("while evaluating the flake"));
    }
    if reports.is_empty() {
        return Err(Error::usage(if skipped_any {
            "no machine to update: every one was skipped (see above)"
        } else {
            "no machine to update: none is selected"
        }));
    }
    // In the order of the selection.
    reports.sort_by_key(|r| {
        names
            .iter()
            .position(|n| *n == r.name)
            .unwrap_or(usize::MAX)
    });
    Ok(finish(args, &run_id, &reports, &logs))
}

/// One streamed batch: the run's id with its number (naming its builders' temporary directories), sudo,
/// plan, preflight (a machine with a problem fails alone) and run.
#[allow(clippy::too_many_arguments)]
fn run_wave(
    args: &UpdateArgs,
    base: &PlanContext,
    wave: u8,
    machines: Vec<ResolvedMachine>,
    connections: &Connections,
    logs: &Logs,
    progress: &Progress,
    all_names: &[String],
    sudo_lock: &std::sync::Mutex<()>,
    options: RunOptions,
) -> Vec<MachineReport> {
    let failed_all = |machines: &[ResolvedMachine], error: &Error| -> Vec<MachineReport> {
        machines
            .iter()
            .map(|m| {
                MachineReport::not_run(
                    &m.name,
                    m.target.value.to_string(),
                    Outcome::Failed(error.clone()),
                )
            })
            .collect()
    };
    let mut ctx = base.clone();
    // One run id everywhere (messages, logs, targets); the batch names its builders'
    // temporary directories apart.
    ctx.batch = Some(wave);
    (ctx.own_control_path, ctx.own_keepalive) = own_ssh_settings(&machines);
    if args.copy_via_workstation
        && let Err(error) = check_relay(&machines)
    {
        return failed_all(&machines, &error);
    }
    // `build` never runs anything as root on a target.
    if args.action.reaches_target() {
        // One prompt at a time; the password is asked once for the run.
        let _sudo = sudo_lock.lock().unwrap_or_else(|e| e.into_inner());
        let targets: Vec<(String, SshHost)> = machines
            .iter()
            .map(|m| (m.name.to_string(), ctx.ssh_host(&m.target.value, false)))
            .collect();
        let result = sudo::needs_password(&targets, connections).and_then(|needs| {
            if !needs.is_empty() && !crate::execute::has_sudo_password() {
                let password = sudo::read_password(&needs)?;
                if !args.no_preflight {
                    sudo::check_password(&targets, &needs, &password, connections)?;
                }
                crate::execute::set_sudo_password(password);
            }
            Ok(needs)
        });
        match result {
            Ok(needs) => ctx.sudo_password = needs,
            Err(error) => return failed_all(&machines, &error),
        }
    }
    let mut plan = plan_deploy(machines, &ctx);
    let mut reports = Vec::new();
    let mut lacking = BTreeSet::new();
    if !args.reactivate {
        let (done, rest, without) =
            split_up_to_date(&plan, connections, &|line| progress.event(line));
        lacking = without;
        for report in done {
            if let Some(i) = all_names.iter().position(|n| *n == report.name) {
                progress.finish(
                    i,
                    true,
                    "up to date: it runs this system already (--reactivate switches again)",
                );
            }
            reports.push(report);
        }
        if rest.is_empty() {
            return reports;
        }
        if rest.len() < plan.machines.len() {
            plan = plan_deploy(rest, &ctx);
        }
    }
    announce(&plan, &ctx);
    if !args.no_preflight {
        let findings = preflight::run(&plan, &ctx, connections);
        let problems = findings.problems;
        ctx.builder_max_jobs = findings.max_jobs;
        for problem in &problems {
            crate::progress::line(&format!("\n{problem}"));
        }
        // A problem names its machine ("preflight: NAME: …"); one that names none stops
        // the whole batch.
        let of = |name: &str| {
            problems
                .iter()
                .find(|p| p.message.starts_with(&format!("preflight: {name}: ")))
        };
        let all_named = problems.iter().all(|p| {
            plan.machines.iter().any(|m| {
                p.message
                    .starts_with(&format!("preflight: {}: ", m.machine.name))
            })
        });
        let (bad, good): (Vec<ResolvedMachine>, Vec<ResolvedMachine>) = plan
            .machines
            .iter()
            .map(|m| m.machine.clone())
            .partition(|m| !all_named || of(&m.name).is_some());
        for m in &bad {
            let error = of(&m.name).cloned().unwrap_or_else(|| problems[0].clone());
            if let Some(i) = all_names.iter().position(|n| n == m.name.as_str()) {
                progress.finish(i, false, "preflight failed");
            }
            reports.extend(failed_all(std::slice::from_ref(m), &error));
        }
        if good.is_empty() {
            return reports;
        }
        // Planned again: without the machines the preflight failed, and with what the build
        // hosts said of their max-jobs (how many builds run at once).
        plan = plan_deploy(good, &ctx);
    }
    let names: Vec<String> = plan
        .machines
        .iter()
        .map(|m| m.machine.name.to_string())
        .collect();
    let progress = progress.subset(all_names, &names);
    reports.extend(run_plan(
        &plan,
        connections,
        logs,
        &progress,
        options,
        &lacking,
    ));
    reports
}
