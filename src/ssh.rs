//! How commands reach other hosts: ssh argument vectors, `NIX_SSHOPTS`, and the one place
//! where a remote command line is quoted.
//!
//! A remote command is an [`Invocation`] (environment + argv). [`Invocation::to_shell`]
//! quotes every word exactly once; nothing else in the crate builds a remote shell string.

use std::fmt;

use crate::host::HostAddress;

/// The host key policy, applied to every ssh connection of a deploy, including the one the
/// build host opens to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HostKeyCheck {
    /// Only connect to hosts whose key is already known; never add keys.
    #[default]
    Strict,
    /// Ask on the terminal for unknown keys (on the build host nobody can answer: strict there).
    Ask,
    /// Record unknown keys on first use; refuse changed ones.
    #[value(name = "accept-new", alias = "tofu")]
    AcceptNew,
    /// No host key checking at all. Unsafe: anyone on the path can impersonate the host.
    None,
}

impl HostKeyCheck {
    /// ssh `-o` options that implement the policy.
    pub fn ssh_options(self) -> Vec<(&'static str, &'static str)> {
        match self {
            HostKeyCheck::Strict => vec![("StrictHostKeyChecking", "yes")],
            HostKeyCheck::Ask => vec![("StrictHostKeyChecking", "ask")],
            HostKeyCheck::AcceptNew => vec![("StrictHostKeyChecking", "accept-new")],
            HostKeyCheck::None => vec![
                ("StrictHostKeyChecking", "no"),
                ("UserKnownHostsFile", "/dev/null"),
            ],
        }
    }
}

impl fmt::Display for HostKeyCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostKeyCheck::Strict => "strict",
            HostKeyCheck::Ask => "ask",
            HostKeyCheck::AcceptNew => "accept-new",
            HostKeyCheck::None => "none",
        })
    }
}

/// A command: environment variables and an argument vector, never a shell string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// Variables set for the command only.
    pub env: Vec<(String, String)>,
    /// Program and arguments.
    pub argv: Vec<String>,
}

impl Invocation {
    /// An invocation of `program` with `args` and no extra environment.
    pub fn new<I, S>(program: &str, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut argv = vec![program.to_string()];
        argv.extend(args.into_iter().map(Into::into));
        Invocation {
            env: Vec::new(),
            argv,
        }
    }

    /// Adds an environment variable.
    pub fn with_env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.to_string(), value.into()));
        self
    }

    /// The command as one POSIX shell line: `env NAME=VALUE … argv…`, every word quoted.
    pub fn to_shell(&self) -> String {
        let mut words: Vec<String> = Vec::new();
        if !self.env.is_empty() {
            words.push("env".into());
            words.extend(self.env.iter().map(|(k, v)| quote(&format!("{k}={v}"))));
        }
        words.extend(self.argv.iter().map(|w| quote(w)));
        words.join(" ")
    }
}

/// Quotes one word for a POSIX shell (the remote login shell parses it once).
pub fn quote(word: &str) -> String {
    shlex::try_quote(word)
        .expect(
            "command words never hold NUL bytes: they are checked addresses, names and store paths",
        )
        .into_owned()
}

/// A remote shell command: a plain invocation, or "this if the host runs systemd, else that".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteCommand {
    /// Run one invocation.
    Run(Invocation),
    /// Run `with_systemd` when `/run/systemd/system` exists on the host, else `without`.
    IfSystemd {
        /// What runs on a systemd host.
        with_systemd: Invocation,
        /// What runs elsewhere.
        without: Invocation,
    },
}

impl RemoteCommand {
    /// The shell line sent to the remote host.
    pub fn to_shell(&self) -> String {
        match self {
            RemoteCommand::Run(inv) => inv.to_shell(),
            RemoteCommand::IfSystemd {
                with_systemd,
                without,
            } => format!(
                "if test -d /run/systemd/system; then {}; else {}; fi",
                with_systemd.to_shell(),
                without.to_shell()
            ),
        }
    }
}

/// How to reach one host over ssh: its address (user already decided) and the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshHost {
    /// The address with its user filled in.
    pub address: HostAddress,
    /// Host key policy for connections to this host.
    pub host_key_check: HostKeyCheck,
}

impl SshHost {
    /// Options as ssh flags: the address's own options first (ssh keeps the first value it
    /// sees, so they win over the policy), then the host key policy.
    fn option_flags(&self, batch_mode: bool) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(port) = self.address.port {
            flags.push("-p".to_string());
            flags.push(port.to_string());
        }
        let policy = self
            .host_key_check
            .ssh_options()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let batch = batch_mode.then(|| ("BatchMode".to_string(), "yes".to_string()));
        for (name, value) in self
            .address
            .options
            .iter()
            .cloned()
            .chain(policy)
            .chain(batch)
        {
            flags.push("-o".to_string());
            flags.push(format!("{name}={value}"));
        }
        flags
    }

    /// The `ssh` argv that runs `command` on this host: no pseudo-terminal, no X11.
    pub fn ssh_argv(&self, command: &RemoteCommand) -> Vec<String> {
        let mut argv = vec!["ssh".to_string(), "-T".to_string(), "-x".to_string()];
        argv.extend(self.option_flags(false));
        argv.push("--".to_string());
        argv.push(self.address.destination());
        argv.push(command.to_shell());
        argv
    }

    /// The Nix store URL of this host (`ssh://user@host`); port and options travel in
    /// [`SshHost::nix_sshopts`], which every Nix version reads.
    pub fn store_url(&self) -> String {
        format!("ssh://{}", self.address.destination())
    }

    /// `NIX_SSHOPTS` for Nix's own ssh to this host. `batch_mode` is set for the nested
    /// hop on the build host, where no one can answer a prompt.
    pub fn nix_sshopts(&self, batch_mode: bool) -> String {
        self.option_flags(batch_mode).join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str, check: HostKeyCheck) -> SshHost {
        SshHost {
            address: s.parse().unwrap(),
            host_key_check: check,
        }
    }

    #[test]
    fn quoting_survives_a_real_shell() {
        let hostile = [
            "plain",
            "",
            "a b",
            "it's",
            "$(touch /tmp/x)",
            "`id`",
            "a;b",
            "new\nline",
            "\\",
        ];
        let inv = Invocation::new("printf", ["%s\\0"]).with_env("V", "x y");
        let mut inv = inv;
        inv.argv.extend(hostile.iter().map(|s| s.to_string()));
        let out = std::process::Command::new("sh")
            .args(["-c", &inv.to_shell()])
            .output()
            .unwrap();
        let words: Vec<&str> = std::str::from_utf8(&out.stdout)
            .unwrap()
            .split('\0')
            .collect();
        assert_eq!(&words[..hostile.len()], &hostile[..]);
    }

    #[test]
    fn ssh_argv_puts_address_options_before_policy() {
        let h = host(
            "deploy@t.example:2222?IdentityFile=/k",
            HostKeyCheck::AcceptNew,
        );
        let argv = h.ssh_argv(&RemoteCommand::Run(Invocation::new(
            "true",
            [] as [&str; 0],
        )));
        assert_eq!(
            argv,
            [
                "ssh",
                "-T",
                "-x",
                "-p",
                "2222",
                "-o",
                "IdentityFile=/k",
                "-o",
                "StrictHostKeyChecking=accept-new",
                "--",
                "deploy@t.example",
                "true"
            ]
        );
    }

    #[test]
    fn nested_options_carry_policy_and_batch_mode() {
        let h = host("root@t?IdentityFile=/root/.ssh/other", HostKeyCheck::None);
        assert_eq!(
            h.nix_sshopts(true),
            "-o IdentityFile=/root/.ssh/other -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes"
        );
        assert_eq!(h.store_url(), "ssh://root@t");
    }

    #[test]
    fn systemd_switch_is_one_conditional_line() {
        let cmd = RemoteCommand::IfSystemd {
            with_systemd: Invocation::new("systemd-run", ["--wait", "x"]),
            without: Invocation::new("/nix/store/abc/bin/switch-to-configuration", ["switch"]),
        };
        assert_eq!(
            cmd.to_shell(),
            "if test -d /run/systemd/system; then systemd-run --wait x; else /nix/store/abc/bin/switch-to-configuration switch; fi"
        );
    }
}
