//! `clan ssh MACHINE [-- COMMAND…]`: the machine's target, reached as a deploy reaches it
//! (its resolved address, user, port and address options, and the host key policy), with the
//! user's own ssh, config and agent. clan's process becomes that ssh, so its terminal, exit
//! status and signals are the user's.

use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::cli::SshArgs;
use crate::commands::machines::load_machine;
use crate::error::{Error, ExitKind};
use crate::ssh::{Side, SshHost};

/// The ssh argv for `args`'s machine at `target` (no pseudo-terminal flag: ssh decides, as
/// for a login typed by hand).
pub fn ssh_argv(target: &SshHost, command: &[String]) -> Vec<String> {
    let mut argv = vec!["ssh".to_string()];
    argv.extend(target.option_flags(Side::Workstation));
    argv.push("--".into());
    argv.push(target.address.destination());
    argv.extend(command.iter().cloned());
    argv
}

/// Runs the command: on success this process is ssh and never returns.
pub fn run(args: &SshArgs) -> Result<ExitKind, Error> {
    let machine = load_machine(&args.hosts, &args.machine)?;
    let target = SshHost::new(machine.target.value.clone(), args.connect.host_key_check);
    eprintln!(
        "{}: ssh to {} ({})",
        machine.name, machine.target.value, machine.target.source
    );
    let argv = ssh_argv(&target, &args.command);
    let error = Command::new(&argv[0]).args(&argv[1..]).exec();
    Err(Error::new(format!("cannot run ssh: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssh::HostKeyCheck;

    #[test]
    fn the_deploys_address_and_policy_then_the_command() {
        let target = SshHost::new(
            "deploy@db.example.com:2222?IdentityFile=/k"
                .parse()
                .unwrap(),
            HostKeyCheck::Strict,
        );
        let argv = ssh_argv(&target, &["uname".into(), "-a".into()]);
        let shown = argv.join(" ");
        assert!(
            shown.starts_with("ssh -p 2222 -o IdentityFile=/k -o StrictHostKeyChecking=yes"),
            "{shown}"
        );
        assert!(
            shown.ends_with(" -- deploy@db.example.com uname -a"),
            "{shown}"
        );
        assert!(!argv.contains(&"-T".to_string()), "{shown}");
    }
}
