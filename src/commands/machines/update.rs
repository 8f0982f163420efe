//! `clan machines update`: evaluate → resolve → plan → execute → report.

use std::io::Read;

use crate::cli::UpdateArgs;
use crate::error::{Error, ExitKind, Hint};
use crate::eval::evaluate;
use crate::execute::{Outcome, run_plan};
use crate::plan::{DeployPlan, plan_machine};
use crate::resolve::{
    Overrides, Source, SshConfigLookup, check_machine_name, describe_build, describe_target,
    parse_address, resolve_machine,
};

/// Runs the command; returns the process exit code.
pub fn run(args: &UpdateArgs) -> Result<i32, Error> {
    for name in &args.machines {
        check_machine_name(name)?;
    }
    // Check the flags' addresses before the (slow) evaluation.
    if let Some(value) = &args.build_host {
        parse_address(value, &Source::Flag("--build-host"))?;
    }
    if let Some(value) = &args.target_host {
        parse_address(value, &Source::Flag("--target-host"))?;
    }

    let flake = flake_ref(args)?;
    eprintln!("Evaluating {flake} on this workstation…");
    let evaluation = evaluate(&flake, &args.machines)?;
    let unknown: Vec<&String> = args
        .machines
        .iter()
        .filter(|m| !evaluation.machines.contains(m))
        .collect();
    if let Some(first) = unknown.first() {
        return Err(Error::usage(format!(
            "unknown machine {first:?} (from the command line): the flake {flake} defines {}",
            if evaluation.machines.is_empty() {
                "no machines".to_string()
            } else {
                evaluation.machines.join(", ")
            }
        ))
        .hint(Hint::text(
            "machines come from inventory.machines and machines in clan.nix",
        )));
    }

    let overrides = Overrides {
        build_host: args.build_host.clone(),
        target_host: args.target_host.clone(),
    };
    let users = SshConfigLookup;
    let resolved = evaluation
        .selected
        .iter()
        .map(|(name, facts)| resolve_machine(name, facts, &overrides, &users))
        .collect::<Result<Vec<_>, _>>()?;

    let run_id = run_id();
    let plan = DeployPlan {
        run_id: run_id.clone(),
        host_key_check: args.host_key_check,
        machines: resolved
            .into_iter()
            .map(|m| plan_machine(m, &run_id, args.host_key_check))
            .collect(),
    };
    if args.dry_run {
        print!("{plan}");
        eprintln!("Dry run: nothing was copied, built or activated.");
        return Ok(0);
    }

    for machine in &plan.machines {
        eprintln!("{}", describe_target(&machine.machine));
        eprintln!("{}", describe_build(&machine.machine));
    }
    let outcomes = run_plan(&plan);
    Ok(report(&outcomes))
}

/// Prints the summary and returns the exit code: the worst outcome wins.
fn report(outcomes: &[(String, Outcome)]) -> i32 {
    let mut exit = 0;
    eprintln!();
    for (name, outcome) in outcomes {
        match outcome {
            Outcome::Deployed { elapsed } => {
                eprintln!("{name}: deployed ({:.1}s)", elapsed.as_secs_f64());
            }
            Outcome::Failed(error) => {
                eprintln!("{error}");
                exit = exit.max(match error.exit {
                    ExitKind::PartiallyApplied => 3,
                    _ => 1,
                });
            }
        }
    }
    exit
}

/// The flake reference for nix: an existing local directory becomes an absolute path.
fn flake_ref(args: &UpdateArgs) -> Result<String, Error> {
    let path = &args.flake;
    if path.is_dir() {
        let abs = path.canonicalize().map_err(|e| {
            Error::usage(format!(
                "cannot open the flake directory {}: {e}",
                path.display()
            ))
        })?;
        return Ok(abs.display().to_string());
    }
    let text = path.display().to_string();
    if text.contains(':') {
        Ok(text) // a flake URL such as github:owner/repo
    } else {
        Err(Error::usage(format!(
            "the flake {text:?} (from --flake) is not a directory"
        )))
    }
}

/// 16 hex digits from the kernel's random source: names temporary roots and units.
fn run_id() -> String {
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
