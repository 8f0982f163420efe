//! `clan machines update` (and `build`): flags → evaluation → [`crate::deploy`] → what the
//! user reads. The deploy itself, each of its phases once, is the library's.

use std::collections::BTreeSet;
use std::io::IsTerminal;

use crate::cli::{LogFormat, UpdateArgs};
use crate::connection::Connections;
use crate::deploy::{Deployment, Settings, rollout_batches, run_id, workstation_identity};
use crate::error::{Error, ExitKind, Hint};
use crate::execute::{Logs, MachineReport, Outcome, RunOptions, exit_code};
use crate::plan::{Action, Activation, PlanContext};
use crate::report;
use crate::resolve::ResolvedMachine;
use crate::select::{load_selection_skipping, stream_selection};

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
    if args.no_secrets {
        return Ok(nix);
    }
    let repo = crate::vars::Repo {
        root: crate::commands::machines::clan_dir(&args.hosts.flake)?,
    };
    if args.dry_run {
        // Nothing is generated. A system that carries its secrets (the sops store) cannot
        // be evaluated before they exist: said so, by name, instead of Nix's error.
        nix.vars = Some(crate::eval::VarsHook(std::sync::Arc::new(
            move |name, facts, _| {
                let Some(vars) = facts.vars.as_ref().filter(|_| facts.drv_path.is_empty()) else {
                    return Ok(());
                };
                let missing = crate::vars::not_generated(&repo, name, vars);
                if missing.is_empty() {
                    return Ok(());
                }
                Err(Error::usage(format!(
                    "its system carries vars that are not generated yet ({}): the deploy generates them first, then evaluates the system with them; a dry run generates nothing, so it cannot show this system",
                    missing.join(", ")
                ))
                .code("vars.not-generated")
                .hint(Hint::text(format!(
                    "run `{}` (or the deploy), then the dry run shows the whole plan",
                    crate::hint::command("vars generate", name, &[])
                ))))
            },
        )));
        return Ok(nix);
    }
    // One at a time (prompts), and each machine's shared generators compared with those of
    // the machines before it.
    let one_at_a_time = std::sync::Mutex::new(crate::vars::SharedDefinitions::default());
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
            let mut shared = one_at_a_time.lock().unwrap_or_else(|e| e.into_inner());
            shared.check(name, vars)?;
            let settings = settings.cloned().unwrap_or_default();
            let generate = || {
                let mut generation = crate::vars::generate::Generation::new(&repo, &settings);
                generation.sandbox = sandbox;
                generation.machine(name, vars)
            };
            if !crate::vars::not_generated(&repo, name, vars).is_empty() {
                // In a fleet, the live lines are on the screen by now: prompts and messages
                // go between them.
                crate::progress::with_terminal(generate)?;
            } else {
                generate()?;
            }
            if !vars.uploaded_files(name).is_empty() {
                // The upload's key opens every secret it goes with: found out now, before
                // any build.
                let user = crate::vars::upload::user_identity()?;
                if let Some(store) = crate::vars::clan_core_store_of(vars) {
                    crate::vars::clan_core_store::check_upload(store, &repo, name, vars, user)?;
                } else {
                    repo.check_upload(name, vars, user)?;
                }
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
    let overrides = update_overrides(args)?;
    let nix = update_nix_options(args)?;
    let several = !(args.machines.len() == 1 && args.tags.is_empty());
    let run_id = run_id();
    // A fleet streams: machines go on as their evaluations finish.
    if several && !args.dry_run && args.canary.is_empty() && args.batch_size.is_none() {
        let streamed = stream_selection(
            &args.hosts.flake,
            &args.machines,
            &args.tags,
            &overrides,
            &nix,
        )?;
        let deployment = deployment(args, &run_id, Connections::new(&run_id))?;
        let reports = deployment.stream(&streamed, &overrides)?;
        return Ok(finish(args, &deployment, &reports));
    }
    // One machine, a dry run or a rolling deploy: every machine is evaluated first.
    let mut skipped = Some(Vec::new());
    let mut failed = Some(Vec::new());
    let machines: Vec<ResolvedMachine> = load_selection_skipping(
        &args.hosts.flake,
        &args.machines,
        &args.tags,
        &overrides,
        &nix,
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
    let batch_size = args.batch_size.map(|size| size.of(machines.len()));
    let (batches, canaries) = rollout_batches(&machines, &args.canary, batch_size)?;
    if args.dry_run {
        let ctx = plan_context(args, &run_id, &Connections::disabled())?;
        let plan = crate::deploy::preview(machines, &ctx)?;
        print!("{plan}");
        if batches.len() > 1 {
            println!("\nRollout, one batch after the other:");
            for (b, batch) in batches.iter().enumerate() {
                let names: Vec<&str> = batch.iter().map(|m| m.name.as_str()).collect();
                let canary = if b == 0 && canaries > 0 {
                    " (canary)"
                } else {
                    ""
                };
                println!("  batch {}{canary}: {}", b + 1, names.join(", "));
            }
        }
        eprintln!("Dry run: nothing was copied, built or activated.");
        return Ok(if failed.is_empty() {
            ExitKind::Success
        } else {
            ExitKind::DeployFailed
        });
    }
    let deployment = deployment(args, &run_id, Connections::new(&run_id))?;
    let mut reports = deployment.rollout(&batches, canaries)?;
    // Machines whose evaluation failed are reported with the others.
    reports.extend(
        failed
            .into_iter()
            .map(|(name, error)| MachineReport::not_run(&name, "-".into(), Outcome::Failed(error))),
    );
    Ok(finish(args, &deployment, &reports))
}

/// The run's deploy from the flags.
fn deployment(
    args: &UpdateArgs,
    run_id: &str,
    connections: Connections,
) -> Result<Deployment, Error> {
    let settings = Settings {
        reactivate: args.reactivate,
        preflight: !args.no_preflight,
        run: RunOptions {
            jobs: usize::from(args.jobs),
            fail_fast: args.fail_fast,
        },
        max_failures: args.max_failures,
        live: !args.verbose
            && args.log_format == LogFormat::Auto
            && std::io::stderr().is_terminal(),
        verbose: args.verbose,
    };
    let ctx = plan_context(args, run_id, &connections)?;
    Ok(Deployment::new(settings, ctx, connections))
}

/// The end of a run for people and scripts: each machine's change summary, the summary
/// table, where the logs are when something failed, and the `--json` report. Returns the
/// exit code.
fn finish(args: &UpdateArgs, deployment: &Deployment, reports: &[MachineReport]) -> ExitKind {
    let code = exit_code(reports);
    let logs: &Logs = deployment.logs();
    let run_id = deployment.run_id();
    // No machine got past its preflight: what it found, instead of a table of failures.
    let (problems, preflight_log) = deployment.preflight_problems();
    if !problems.is_empty()
        && reports
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Failed(_)))
    {
        eprintln!(
            "\nPreflight found {} problem(s); nothing was copied, built or activated.",
            problems.len()
        );
        if let Some(log) = preflight_log {
            eprintln!("Full output: {}", log.display());
        }
        if args.json {
            print_json(&report::json(run_id, reports, code));
        }
        return code;
    }
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
        specialisation: args.specialisation.clone(),
        no_check: args.no_check,
    })
}
