//! `clan machines update`: evaluate → resolve → plan → preflight → execute → report.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Read};

use crate::cli::{LogFormat, UpdateArgs};
use crate::commands::machines::load_selection_skipping;
use crate::connection::Connections;
use crate::error::{Error, ExitKind, Hint};
use crate::execute::{Logs, RunOptions, exit_code, run_plan};
use crate::plan::{Activation, PlanContext, connection_key, plan_deploy};
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
pub fn run(args: &UpdateArgs) -> Result<i32, Error> {
    let result = deploy(args);
    if args.json
        && let Err(error) = &result
    {
        print_json(&report::failure_json(
            None,
            std::slice::from_ref(error),
            error.exit as i32,
        ));
    }
    result
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON always serializes")
    );
}

fn deploy(args: &UpdateArgs) -> Result<i32, Error> {
    let overrides = args.hosts.overrides(Some(&args.agent));
    let mut skipped = Some(Vec::new());
    let mut failed = Some(Vec::new());
    let machines: Vec<ResolvedMachine> = load_selection_skipping(
        &args.hosts.flake,
        &args.machines,
        &args.tags,
        &overrides,
        &args.hosts.nix_options()?,
        &mut skipped,
        &mut failed,
    )?
    .into_iter()
    .map(|loaded| loaded.machine)
    .collect();
    for (name, why) in skipped.unwrap_or_default() {
        eprintln!("{name}: skipped ({why})");
    }
    let failed = failed.unwrap_or_default();
    for (name, error) in &failed {
        eprintln!("{name}: evaluation failed: {}", error.message);
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

    let run_id = run_id();
    let connections = if args.dry_run {
        Connections::disabled()
    } else {
        Connections::new(&run_id)
    };
    let mut ctx = PlanContext {
        run_id: run_id.clone(),
        host_key_check: args.connect.host_key_check,
        control_dir: connections.dir(),
        own_control_path: own_control_paths(&machines),
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
    };
    if !args.dry_run {
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
    let plan = plan_deploy(machines, &ctx);
    if args.dry_run {
        print!("{plan}");
        eprintln!("Dry run: nothing was copied, built or activated.");
        return Ok(if failed.is_empty() {
            0
        } else {
            ExitKind::DeployFailed as i32
        });
    }

    if ctx.host_key_check == crate::ssh::HostKeyCheck::None {
        eprintln!("{}", host_key_none_warning(&plan));
    }
    for machine in &plan.machines {
        eprintln!("{}", describe_target(&machine.machine));
        eprintln!("{}", describe_build(&machine.machine));
        if let Some(warning) = describe_forward_agent(&machine.machine) {
            eprintln!("{warning}");
        }
    }
    if !args.no_preflight {
        eprintln!("Preflight: checking every hop…");
        let problems = preflight::run(&plan, &ctx, &connections);
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
            let code = ExitKind::DeployFailed as i32;
            if args.json {
                print_json(&report::failure_json(Some(&plan.run_id), &problems, code));
            }
            return Ok(code);
        }
        eprintln!("Preflight: all hops ok.");
    }
    let logs = Logs::create(&plan.run_id);
    let names: Vec<String> = plan
        .machines
        .iter()
        .map(|m| m.machine.name.to_string())
        .collect();
    let live =
        !args.verbose && args.log_format == LogFormat::Auto && std::io::stderr().is_terminal();
    let progress = Progress::new(&names, live, args.verbose);
    let options = RunOptions {
        jobs: usize::from(args.jobs),
        fail_fast: args.fail_fast,
    };
    let mut reports = run_plan(&plan, &connections, &logs, &progress, options);
    // Machines whose evaluation failed are reported with the others.
    reports.extend(
        failed
            .into_iter()
            .map(|(name, error)| crate::execute::MachineReport {
                name: name.to_string(),
                build_host: "-".into(),
                target: "-".into(),
                outcome: crate::execute::Outcome::Failed(error),
                stages: Default::default(),
                changes: None,
                log: None,
            }),
    );
    progress.close();
    let code = exit_code(&reports);
    for r in &reports {
        if let Some(changes) = &r.changes {
            eprintln!("\nChanges on {}:\n{}", r.name, changes.trim_end());
        }
    }
    eprintln!("\n{}", report::summary(&reports));
    if code != 0
        && let Some(dir) = logs.dir()
    {
        eprintln!("Logs of every machine and build: {}", dir.display());
    }
    if args.json {
        print_json(&report::json(&plan.run_id, &reports, code));
    }
    Ok(code)
}

/// Hosts whose ssh config sets a ControlPath: their own sharing is kept.
fn own_control_paths(machines: &[ResolvedMachine]) -> BTreeSet<String> {
    // Each connection once: a build host shared by a fleet is asked about once.
    let mut addresses = std::collections::BTreeMap::new();
    for m in machines {
        addresses.insert(connection_key(&m.target.value), &m.target.value);
        if let BuildLocation::Remote(addr) = &m.build.value {
            addresses.insert(connection_key(addr), addr);
        }
    }
    addresses
        .into_iter()
        .filter(|(_, a)| SshConfigLookup::has_own_control_path(a))
        .map(|(key, _)| key)
        .collect()
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
