//! `clan machines rollback`: switch a machine back to its previous system generation.

use crate::activate::{Command, Exit, Word, is_protocol_line};
use crate::cli::{OnTargetArgs, RollbackArgs};
use crate::commands::machines::load_machine;
use crate::diagnostics::{Hop, SshFailure, ssh_error, ssh_failure};
use crate::error::{Error, ExitKind, Hint};
use crate::ssh::{SshHost, run_remote, run_remote_with_input};
use crate::sudo;

/// The system profile's generations as the target lists them (`clan-activate generations`):
/// each with its system, and the current one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Generations {
    /// Generation number and system path, in the target's order.
    pub all: Vec<(u32, String)>,
    /// The one the profile points to.
    pub current: Option<u32>,
}

impl Generations {
    /// Reads the `clan: generation N PATH` and `clan: current N` lines.
    pub fn parse(output: &str) -> Generations {
        let mut found = Generations::default();
        for line in output.lines() {
            if let Some(rest) = Word::Generation.of(line)
                && let Some((n, path)) = rest.split_once(' ')
                && let Ok(n) = n.parse()
            {
                found.all.push((n, path.to_string()));
            } else if let Some(n) = Word::Current.of(line) {
                found.current = n.trim().parse().ok();
            }
        }
        found.all.sort();
        found
    }

    /// Where a rollback goes: generation `to`, or the newest one older than the current
    /// one; an error (for people) if there is none.
    pub fn target(&self, to: Option<u32>) -> Result<(u32, &str), String> {
        let current = self.current.ok_or("there is no system profile")?;
        let found = match to {
            Some(to) if to == current => {
                return Err(format!("generation {to} is the current one"));
            }
            Some(to) => self.all.iter().find(|(n, _)| *n == to),
            None => self.all.iter().rev().find(|(n, _)| *n < current),
        };
        found
            .map(|(n, p)| (*n, p.as_str()))
            .ok_or_else(|| match to {
                Some(to) => format!(
                    "there is no generation {to} (generations: {})",
                    self.all
                        .iter()
                        .map(|(n, _)| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => format!(
                    "there is no previous generation (none older than the current one, {current})"
                ),
            })
    }
}

/// `clan machines generations`: the target's system generations, the current one marked
/// (pairs with `rollback --to N`).
pub fn generations(on: &OnTargetArgs) -> Result<ExitKind, Error> {
    let machine = &load_machine(&on.hosts, &on.machine)?;
    let target = SshHost::new(machine.target.value.clone(), on.connect.host_key_check);
    let as_root = sudo::AsRoot::ask(&machine.name, &target)?;
    let run_id = crate::deploy::run_id();
    let listed = on_target(&target, &as_root, Command::Generations { run: &run_id })?;
    let found = Generations::parse(&String::from_utf8_lossy(&listed.stdout));
    if !listed.status.success() {
        return Err(Error::new(format!(
            "{}: cannot list the system generations on {}",
            machine.name, target.address
        ))
        .detail(String::from_utf8_lossy(&listed.stderr).trim_end()));
    }
    for (n, path) in &found.all {
        let mark = if Some(*n) == found.current {
            "  (current)"
        } else {
            ""
        };
        println!("{n:>4}  {path}{mark}");
    }
    Ok(ExitKind::Success)
}

/// Runs `command` of `clan-activate` on `target` as root (sudo, with the password given
/// once, for other users).
fn on_target(
    target: &SshHost,
    as_root: &sudo::AsRoot,
    command: Command<'_>,
) -> Result<std::process::Output, Error> {
    let command = as_root.command(command.remote());
    match as_root.password() {
        None => run_remote(target, &command),
        Some(_) => run_remote_with_input(target, &command, &as_root.input(b"")),
    }
    .map_err(|e| Error::new(format!("cannot run ssh: {e}")))
}

/// Runs the command; returns the exit code.
pub fn run(args: &RollbackArgs) -> Result<ExitKind, Error> {
    let on = &args.on;
    let machine = &load_machine(&on.hosts, &on.machine)?;
    let target = SshHost::new(machine.target.value.clone(), on.connect.host_key_check);
    let run_id = crate::deploy::run_id();
    // The profile and the switch need root: sudo, with the password asked once if needed.
    let as_root = sudo::AsRoot::ask(&machine.name, &target)?;
    let run = |command: Command<'_>| on_target(&target, &as_root, command);
    // First where it goes, shown before going there.
    let listed = run(Command::Generations { run: &run_id })?;
    let generations = Generations::parse(&String::from_utf8_lossy(&listed.stdout));
    if !listed.status.success() {
        return Err(Error::new(format!(
            "{}: cannot list the system generations on {}",
            machine.name, target.address
        ))
        .detail(String::from_utf8_lossy(&listed.stderr).trim_end()));
    }
    let (to, system) = generations.target(args.to).map_err(|why| {
        Error::new(format!(
            "{}: cannot roll back on {}: {why}",
            machine.name, target.address
        ))
        .exit(if args.to.is_some() {
            ExitKind::Usage
        } else {
            ExitKind::DeployFailed
        })
    })?;
    eprintln!(
        "{}: rolling back {} from generation {} to generation {to} ({system})",
        machine.name,
        target.address,
        generations.current.unwrap_or_default()
    );
    // The same way back as the watchdog's and a failed switch's, under the deploy lock.
    let out = run(Command::Rollback {
        run: &run_id,
        wait: on.lock_timeout,
        to,
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stdout.lines().filter(|l| !is_protocol_line(l)) {
        println!("{line}");
    }
    let profile = Word::Profile.find(&stdout).map(str::to_string);
    match Exit::from_code(out.status.code()) {
        Some(Exit::Done) => {
            eprintln!(
                "{}: rolled back: the system profile points to generation {}",
                machine.name,
                profile.as_deref().unwrap_or("?")
            );
            Ok(ExitKind::Success)
        }
        Some(Exit::LockBusy) => Err(Error::new(format!(
            "{}: {} is being deployed by {}; nothing was changed",
            machine.name,
            target.address,
            Word::Busy
                .find(&stdout)
                .map(crate::diagnostics::describe_holder)
                .unwrap_or_else(|| "another deploy".into())
        ))
        .hint(Hint::text(
            "wait for that deploy to end, or wait longer with --lock-timeout SECONDS",
        ))),
        Some(Exit::NoGeneration) => Err(Error::new(format!(
            "{}: there is no previous generation to roll back to on {}",
            machine.name, target.address
        ))
        .detail(stderr.trim_end())),
        // ssh could not log in: nothing ran on the target.
        _ if out.status.code() == Some(255)
            && matches!(
                ssh_failure(&stderr),
                Some(
                    SshFailure::HostKey
                        | SshFailure::ChangedHostKey
                        | SshFailure::PermissionDenied
                        | SshFailure::Unreachable
                )
            ) =>
        {
            let host = target.address.to_string();
            let failure = ssh_failure(&stderr).expect("matched above");
            Err(ssh_error(
                machine.name.as_str(),
                &host,
                &host,
                &Hop::WorkstationTo(host.clone()),
                failure,
                &stderr,
                |m| Error::new(format!("{m}; nothing was changed")).detail(stderr.trim_end()),
            ))
        }
        _ => Err(Error::new(format!(
            "{}: rolling back on {} failed{}",
            machine.name,
            target.address,
            out.status
                .code()
                .map(|c| format!(" (exit {c})"))
                .unwrap_or_default()
        ))
        .detail(format!("{stdout}{stderr}"))
        .hint(Hint::text(
            "if the profile already moved, the next boot uses the previous generation",
        ))
        .exit(ExitKind::PartiallyApplied)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTED: &str = "clan: generation 4 /nix/store/a-4\nclan: generation 6 /nix/store/a-6\nclan: generation 7 /nix/store/a-7\nclan: current 7\n";

    #[test]
    fn goes_to_the_newest_older_generation_or_the_one_asked_for() {
        let g = Generations::parse(LISTED);
        assert_eq!(g.current, Some(7));
        assert_eq!(g.target(None), Ok((6, "/nix/store/a-6")));
        assert_eq!(g.target(Some(4)), Ok((4, "/nix/store/a-4")));
        assert_eq!(
            g.target(Some(5)),
            Err("there is no generation 5 (generations: 4, 6, 7)".to_string())
        );
        assert_eq!(
            g.target(Some(7)),
            Err("generation 7 is the current one".to_string())
        );
        let first = Generations::parse("clan: generation 1 /nix/store/a-1\nclan: current 1\n");
        assert_eq!(
            first.target(None),
            Err("there is no previous generation (none older than the current one, 1)".to_string())
        );
        assert_eq!(
            Generations::parse("clan: current \n").target(None),
            Err("there is no system profile".to_string())
        );
    }
}
