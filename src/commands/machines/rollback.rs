//! `clan machines rollback`: switch a machine back to its previous system generation.

use crate::cli::RollbackArgs;
use crate::commands::machines::load_machine;
use crate::error::{Error, ExitKind, Hint};
use crate::ssh::{ACTIVATE, RemoteCommand, SshHost, run_remote, run_remote_with_input};
use crate::sudo;

/// Runs the command; returns the exit code.
pub fn run(args: &RollbackArgs) -> Result<ExitKind, Error> {
    let machine = &load_machine(&args.hosts, &args.machine)?;
    let target = SshHost::new(machine.target.value.clone(), args.connect.host_key_check);
    eprintln!(
        "{}: rolling back to the previous generation on {}",
        machine.name, target.address
    );
    // The same way back as the watchdog's and a failed switch's, under the deploy lock.
    let rollback = RemoteCommand::Script {
        script: ACTIVATE,
        args: vec![
            "rollback".into(),
            crate::commands::machines::update::run_id(),
            args.lock_timeout.to_string(),
        ],
        sudo: None,
    };
    // The profile and the switch need root: sudo, with the password asked once if needed.
    let as_root = sudo::AsRoot::ask(&machine.name, &target)?;
    let out = match as_root.password() {
        None => run_remote(&target, &as_root.command(rollback)),
        Some(_) => run_remote_with_input(&target, &as_root.command(rollback), &as_root.input(b"")),
    }
    .map_err(|e| Error::new(format!("cannot run ssh: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stdout.lines().filter(|l| !l.starts_with("clan: ")) {
        println!("{line}");
    }
    let profile = stdout
        .lines()
        .find_map(|l| l.strip_prefix("clan: profile "))
        .map(str::to_string);
    match out.status.code() {
        Some(0) => {
            eprintln!(
                "{}: rolled back: the system profile points to generation {}",
                machine.name,
                profile.as_deref().unwrap_or("?")
            );
            Ok(ExitKind::Success)
        }
        Some(75) => Err(Error::new(format!(
            "{}: {} is being deployed by {}; nothing was changed",
            machine.name,
            target.address,
            stdout
                .lines()
                .find_map(|l| l.strip_prefix("clan: busy "))
                .map(crate::diagnostics::describe_holder)
                .unwrap_or_else(|| "another deploy".into())
        ))
        .hint(Hint::text(
            "wait for that deploy to end, or wait longer with --lock-timeout SECONDS",
        ))),
        Some(3) => Err(Error::new(format!(
            "{}: there is no previous generation to roll back to on {}",
            machine.name, target.address
        ))
        .detail(stderr.trim_end())),
        code => Err(Error::new(format!(
            "{}: rolling back on {} failed{}",
            machine.name,
            target.address,
            code.map(|c| format!(" (exit {c})")).unwrap_or_default()
        ))
        .detail(format!("{stdout}{stderr}"))
        .hint(Hint::text(
            "if the profile already moved, the next boot uses the previous generation",
        ))
        .exit(ExitKind::PartiallyApplied)),
    }
}
