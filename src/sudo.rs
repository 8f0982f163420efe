//! sudo on non-root targets: whether the user needs a password, and reading it once.

use std::collections::BTreeSet;
use std::io::IsTerminal;

use crate::connection::Connections;
use crate::error::{Error, Hint};
use crate::host::connection_key;
use crate::ssh::{RemoteCommand, SshHost, run_remote, run_remote_with_input};

/// What asks sudo on a target whether (and how) it lets the user act as root: clan's
/// activation script by its fixed path (installed first, if it is not), listing the
/// generations, which changes nothing. A command clan runs anyway, so a sudoers rule that
/// allows exactly clan's commands ([`crate::ssh::sudoers_rule`]) answers it as it will
/// answer the deploy.
fn probe() -> RemoteCommand {
    crate::activate::Command::Generations { run: "0" }.remote()
}

/// Which non-root targets need a password for sudo: asks each once ([`probe`], through
/// `sudo --non-interactive`).
/// Targets it cannot reach are left to the preflight, which explains them.
pub fn needs_password(
    targets: &[(String, SshHost)],
    connections: &Connections,
) -> Result<BTreeSet<String>, Error> {
    let mut needs = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for (name, target) in targets {
        let user = target.address.user.clone().unwrap_or_else(|| "root".into());
        if user == "root" || !seen.insert(connection_key(&target.address)) {
            continue;
        }
        if connections.open(target).is_err() {
            continue;
        }
        let probe = probe().sudo(false);
        let Ok(out) = connections
            .session(target)
            .run(|| run_remote(target, &probe))
        else {
            continue;
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) | Some(255) => {}
            _ if stderr.contains("password is required") => {
                needs.insert(connection_key(&target.address));
            }
            _ => {
                return Err(Error::usage(format!(
                    "{}: the target user {user} on {} cannot use sudo, which activation needs",
                    name, target.address
                ))
                .detail(stderr.trim_end())
                .hint(Hint::text(format!(
                    "let {user} run commands as root with sudo on the target, or deploy as root@{}",
                    target.address.host_for_url()
                ))));
            }
        }
    }
    Ok(needs)
}

/// How a command runs as root on one machine's target, for the commands that act on one
/// target (`clan machines rollback`, `clan vars upload`): as is for root, else through
/// sudo, with the password (asked once) when the user needs one.
pub struct AsRoot {
    root: bool,
    password: Option<zeroize::Zeroizing<String>>,
}

impl AsRoot {
    /// Finds out what `target` needs ([`probe`]), asking for the password if it must.
    pub fn ask(machine: &str, target: &SshHost) -> Result<AsRoot, Error> {
        if target.address.user.as_deref().is_none_or(|u| u == "root") {
            return Ok(AsRoot {
                root: true,
                password: None,
            });
        }
        let targets = [(machine.to_string(), target.clone())];
        let needs = needs_password(&targets, &Connections::disabled())?;
        let password = if needs.is_empty() {
            None
        } else {
            Some(zeroize::Zeroizing::new(read_password(&needs)?))
        };
        Ok(AsRoot {
            root: false,
            password,
        })
    }

    /// `command` as root.
    pub fn command(&self, command: RemoteCommand) -> RemoteCommand {
        if self.root {
            command
        } else {
            command.sudo(self.password.is_some())
        }
    }

    /// The sudo password, if one is needed (first on the command's input).
    pub fn password(&self) -> Option<&str> {
        self.password.as_ref().map(|p| p.as_str())
    }

    /// The command's input: the password line, if any, then `data`.
    pub fn input(&self, data: &[u8]) -> zeroize::Zeroizing<Vec<u8>> {
        let mut input = zeroize::Zeroizing::new(Vec::new());
        if let Some(password) = self.password() {
            input.extend_from_slice(format!("{password}\n").as_bytes());
        }
        input.extend_from_slice(data);
        input
    }
}

/// The sudo password, asked once: on the terminal without echo, else one line of standard
/// input (`clan machines update … < password-file`). Never on a command line, never logged.
pub fn read_password(targets: &BTreeSet<String>) -> Result<String, Error> {
    let list = targets.iter().cloned().collect::<Vec<_>>().join(", ");
    let password = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(format!("sudo password for {list}: "))
            .map_err(|e| Error::new(format!("cannot read the sudo password: {e}")))?
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map_err(|e| {
            Error::new(format!(
                "cannot read the sudo password from standard input: {e}"
            ))
        })?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    if password.is_empty() {
        return Err(Error::usage(format!(
            "sudo on {list} needs a password, and none was given"
        ))
        .hint(Hint::text(
            "run on a terminal to be asked, or give it on standard input; or allow the user sudo without a password",
        )));
    }
    Ok(password)
}

/// Checks `password` with sudo on every target that needs one (`sudo -k`: a cached earlier
/// success does not count), before anything is built: a wrong password stops the run here.
pub fn check_password(
    targets: &[(String, SshHost)],
    needs: &BTreeSet<String>,
    password: &str,
    connections: &Connections,
) -> Result<(), Error> {
    let mut seen = BTreeSet::new();
    for (name, target) in targets {
        let key = connection_key(&target.address);
        if !needs.contains(&key) || !seen.insert(key) {
            continue;
        }
        let probe = probe().sudo(true);
        let out = connections
            .session(target)
            .run(|| run_remote_with_input(target, &probe, format!("{password}\n").as_bytes()))
            .map_err(|e| Error::new(format!("cannot run ssh: {e}")))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(Error::new(format!(
                "{name}: sudo on {} refused the password (preflight); nothing was built or changed",
                target.address
            ))
            .detail(stderr.trim_end())
            .hint(Hint::text(
                "run again and type the target user's sudo password",
            )));
        }
    }
    Ok(())
}
