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

    /// This command through sudo: `--non-interactive` when no password is needed, else with
    /// the password read from the first line of standard input by a wrapper on the target
    /// and handed to sudo through `SUDO_ASKPASS` (`printenv` prints it): never on a command
    /// line, and never left on the command's standard input, also when a `NOPASSWD` rule
    /// means sudo does not ask for it. The rest of the input reaches the command.
    pub fn sudo(self, with_password: bool) -> Invocation {
        let mut argv = Vec::new();
        if with_password {
            argv.extend([
                "sh".to_string(),
                "-c".into(),
                SUDO_WITH_PASSWORD.into(),
                "sh".into(),
            ]);
        } else {
            argv.extend(["sudo".into(), "--non-interactive".into(), "--".into()]);
        }
        if !self.env.is_empty() {
            argv.push("env".into());
            argv.extend(self.env.iter().map(|(k, v)| format!("{k}={v}")));
        }
        argv.extend(self.argv);
        Invocation {
            env: Vec::new(),
            argv,
        }
    }

    /// Whether this command reads a sudo password from the first line of standard input.
    pub fn reads_password(&self) -> bool {
        self.argv.get(2).map(String::as_str) == Some(SUDO_WITH_PASSWORD)
    }

    /// Adds an environment variable.
    pub fn with_env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.to_string(), value.into()));
        self
    }

    /// The command in short, for people: one of clan's scripts (`sh -c '# clan: …' NAME
    /// ARGS…`) by its name and arguments; anything else as [`Invocation::to_shell`].
    pub fn summary(&self) -> String {
        match self.argv.as_slice() {
            [sh, c, text, name, args @ ..]
                if sh == "sh" && c == "-c" && text.starts_with("# clan:") =>
            {
                let mut words: Vec<String> = Vec::new();
                if !self.env.is_empty() {
                    words.push("env".into());
                    words.extend(self.env.iter().map(|(k, v)| quote(&format!("{k}={v}"))));
                }
                words.push(name.clone());
                words.extend(args.iter().map(|a| quote(a)));
                words.join(" ")
            }
            _ => self.to_shell(),
        }
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
    /// Run each invocation in turn, whatever the others did, framing each one's output
    /// (stderr included) with `@@clan-probe begin NAME` / `@@clan-probe end NAME STATUS`.
    Probes(Vec<(String, Invocation)>),
    /// Run one invocation that stops when the ssh connection's input ends: how a stopped
    /// deploy ends remote builds and copies without a pseudo-terminal.
    UntilHangup(Invocation),
    /// Run one of this crate's scripts with arguments (installed on the host first).
    Script {
        /// Which script.
        script: Script,
        /// Its arguments.
        args: Vec<String>,
        /// Through sudo: `Some(true)` with a password on standard input, `Some(false)`
        /// without one.
        sudo: Option<bool>,
    },
}

impl RemoteCommand {
    /// Every invocation through sudo (see [`Invocation::sudo`]).
    pub fn sudo(self, with_password: bool) -> RemoteCommand {
        match self {
            RemoteCommand::Run(inv) => RemoteCommand::Run(inv.sudo(with_password)),
            RemoteCommand::UntilHangup(inv) => RemoteCommand::UntilHangup(inv.sudo(with_password)),
            RemoteCommand::Probes(probes) => RemoteCommand::Probes(
                probes
                    .into_iter()
                    .map(|(name, inv)| (name, inv.sudo(with_password)))
                    .collect(),
            ),
            RemoteCommand::Script { script, args, .. } => RemoteCommand::Script {
                script,
                args,
                sudo: Some(with_password),
            },
        }
    }

    /// The command in short, for people: a script by its name and arguments.
    pub fn summary(&self) -> String {
        match self {
            RemoteCommand::Script { script, args, sudo } => {
                let mut words = Vec::new();
                if sudo.is_some() {
                    words.push("sudo".to_string());
                }
                words.push(script.name.to_string());
                words.extend(args.iter().map(|a| quote(a)));
                words.join(" ")
            }
            RemoteCommand::Run(inv) | RemoteCommand::UntilHangup(inv) => inv.summary(),
            other => other.to_shell(),
        }
    }

    /// Whether it reads a sudo password from standard input (once, first).
    pub fn reads_password(&self) -> bool {
        match self {
            RemoteCommand::Run(inv) | RemoteCommand::UntilHangup(inv) => inv.reads_password(),
            RemoteCommand::Probes(probes) => probes.iter().any(|(_, inv)| inv.reads_password()),
            RemoteCommand::Script { sudo, .. } => *sudo == Some(true),
        }
    }

    /// The shell line sent to the remote host.
    pub fn to_shell(&self) -> String {
        match self {
            RemoteCommand::Run(inv) => inv.to_shell(),
            RemoteCommand::UntilHangup(inv) => {
                format!("sh -c {} sh {}", quote(UNTIL_HANGUP), inv.to_shell())
            }
            RemoteCommand::Probes(probes) => probes
                .iter()
                .map(|(name, inv)| {
                    format!(
                        // The newline ends output that lacks one, so the marker starts a line.
                        "echo {begin}; {} </dev/null 2>&1; s=$?; echo; echo {end} \"$s\"",
                        inv.to_shell(),
                        begin = quote(&format!("{PROBE_MARK} begin {name}")),
                        end = quote(&format!("{PROBE_MARK} end {name}")),
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            RemoteCommand::Script { script, args, sudo } => match sudo {
                Some(with_password) => script.sudo_invocation(args, *with_password).to_shell(),
                None => script.invocation(args).to_shell(),
            },
        }
    }
}

/// Runs `sudo -- "$@"` with the password from the first line of standard input, for sudo
/// only (`src/scripts/sudo-with-password.sh`).
const SUDO_WITH_PASSWORD: &str = include_str!("scripts/sudo-with-password.sh");

/// A shell script of this crate (`src/scripts/`) that runs on a remote host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Script {
    /// What it is called in messages and on the host (`clan-activate`).
    pub name: &'static str,
    /// Its text.
    pub text: &'static str,
}

/// The target's side of an activation (`src/scripts/activate.sh`).
pub const ACTIVATE: Script = Script {
    name: "clan-activate",
    text: include_str!("scripts/activate.sh"),
};

impl Script {
    /// Where it is installed on a host: `/run/clan/NAME-HASH.sh`, the hash telling versions
    /// of the script apart.
    pub fn installed_path(&self) -> String {
        // FNV-1a, 64 bits: stable across builds and platforms.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.text.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("/run/clan/{}-{hash:016x}.sh", self.name)
    }

    /// The invocation that installs the script (root-only, once per version) and runs it
    /// with `args`.
    pub fn invocation(&self, args: &[String]) -> Invocation {
        let mut argv = vec![
            "-c".to_string(),
            INSTALL_SCRIPT.to_string(),
            self.name.to_string(),
            self.installed_path(),
            self.text.to_string(),
        ];
        argv.extend(args.iter().cloned());
        Invocation::new("sh", argv)
    }

    /// The invocation that runs the script as root through sudo by its fixed path,
    /// `/run/clan/NAME-HASH.sh`, installing it there first (through sudo, with
    /// [`SUDO_INSTALL`]) when it is not in place (`src/scripts/sudo-run.sh`). sudo sees two
    /// short commands at most, never the script's text: what its log shows and a sudoers
    /// rule ([`sudoers_rule`]) allows.
    pub fn sudo_invocation(&self, args: &[String], with_password: bool) -> Invocation {
        let mut argv = vec![
            "-c".to_string(),
            SUDO_RUN.to_string(),
            "clan-sudo".into(),
            if with_password { "1" } else { "0" }.into(),
            self.name.to_string(),
            self.text.to_string(),
            SUDO_INSTALL.to_string(),
        ];
        argv.extend(args.iter().cloned());
        Invocation::new("sh", argv)
    }
}

/// The fixed command that installs one of clan's scripts as root (`sh -c SUDO_INSTALL
/// clan-install NAME`, the file on standard input): at `/run/clan/NAME-HASH.sh`, HASH from
/// the file's sha256, 0755, in a root-owned 0755 `/run/clan`; only the names of the scripts
/// clan runs through sudo. One line without the characters sudoers treats specially (`,`
/// `:` `=` `\` `*` `?` `[`), so a sudoers rule can name it exactly ([`sudoers_rule`]).
pub const SUDO_INSTALL: &str = "umask 022; test -L /run/clan && exit 126; mkdir -p /run/clan && chown 0 /run/clan && chmod 0755 /run/clan && cat >/run/clan/.new.$$ && chmod 0755 /run/clan/.new.$$ || exit 1; case $1 in clan-activate|clan-vars-upload) mv -f /run/clan/.new.$$ /run/clan/$1-$(sha256sum </run/clan/.new.$$ | cut -c1-16).sh && exit 0;; esac; rm -f /run/clan/.new.$$; exit 126";

/// The scripts clan runs as root through sudo, by name (the names [`SUDO_INSTALL`] takes).
pub const SUDO_SCRIPTS: [&str; 2] = ["clan-activate", "clan-vars-upload"];

/// The sudoers line that lets `user` run exactly what a deploy runs as root on a target:
/// clan's scripts by their fixed paths, and the command that installs them.
pub fn sudoers_rule(user: &str) -> String {
    let mut commands: Vec<String> = SUDO_SCRIPTS
        .iter()
        .map(|name| format!("/run/clan/{name}-*.sh"))
        .collect();
    commands.extend(
        SUDO_SCRIPTS
            .iter()
            .map(|name| format!("/bin/sh -c {SUDO_INSTALL} clan-install {name}")),
    );
    format!("{user} ALL=(root) NOPASSWD: {}", commands.join(", "))
}

/// Runs one of clan's scripts as root through sudo (`src/scripts/sudo-run.sh`).
const SUDO_RUN: &str = include_str!("scripts/sudo-run.sh");

/// Installs a script and runs it (`src/scripts/install-script.sh`).
const INSTALL_SCRIPT: &str = include_str!("scripts/install-script.sh");

/// Runs "$@" until it ends or standard input does (`src/scripts/until-hangup.sh`).
const UNTIL_HANGUP: &str = include_str!("scripts/until-hangup.sh");

/// Marks the sections of a [`RemoteCommand::Probes`] script's output.
pub const PROBE_MARK: &str = "@@clan-probe";

/// How to reach one host over ssh from the workstation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshHost {
    /// The address with its user filled in.
    pub address: HostAddress,
    /// Host key policy for connections to this host.
    pub host_key_check: HostKeyCheck,
    /// The workstation's shared connection to this host (`ControlPath`), unless the user's
    /// ssh config has its own.
    pub control_path: Option<String>,
    /// Forward the workstation's ssh agent to this host.
    pub forward_agent: bool,
    /// A fresh connection, never a shared one (`ControlPath=none`, `ConnectTimeout=5`): to
    /// prove that new logins work.
    pub fresh: bool,
    /// The build host's shared connection to this host (second hop), a `ControlPath` in a
    /// private directory on the build host: the preflight's login opens it and the copy
    /// uses it, so the build host logs in once.
    pub hop_control: Option<String>,
    /// Ask the host for a sign of life every [`KEEPALIVE_INTERVAL`] seconds and give up
    /// after [`KEEPALIVE_COUNT`] unanswered ones, so a host or network that goes away ends
    /// the command within a minute instead of hanging the deploy. Off where the user's ssh
    /// config sets its own; an address's own `ServerAliveInterval` wins anyway.
    pub keepalive: bool,
}

/// Seconds between keep-alives (`ServerAliveInterval`).
pub const KEEPALIVE_INTERVAL: u32 = 15;
/// Unanswered keep-alives before ssh gives up (`ServerAliveCountMax`).
pub const KEEPALIVE_COUNT: u32 = 4;

fn keepalive_options() -> [(String, String); 2] {
    [
        ("ServerAliveInterval".into(), KEEPALIVE_INTERVAL.to_string()),
        ("ServerAliveCountMax".into(), KEEPALIVE_COUNT.to_string()),
    ]
}

/// Which ssh client connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The workstation's ssh, interactive prompts allowed.
    Workstation,
    /// The workstation's ssh where no prompt may hang the run (preflight).
    WorkstationBatch,
    /// The build host's ssh to the target (the second hop): never prompts, never uses the
    /// workstation's control socket.
    Nested,
}

impl SshHost {
    /// An ssh host without connection sharing or agent forwarding.
    pub fn new(address: HostAddress, host_key_check: HostKeyCheck) -> SshHost {
        SshHost {
            address,
            host_key_check,
            control_path: None,
            forward_agent: false,
            fresh: false,
            hop_control: None,
            keepalive: true,
        }
    }

    /// Options as ssh flags: the address's own options first (ssh keeps the first value it
    /// sees, so they win over ours), then the host key policy, then per-side options.
    pub fn option_flags(&self, side: Side) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(port) = self.address.port {
            flags.push("-p".to_string());
            flags.push(port.to_string());
        }
        let mut options: Vec<(String, String)> = self.address.options.clone();
        options.extend(
            self.host_key_check
                .ssh_options()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        if self.fresh {
            options.push(("ControlPath".into(), "none".into()));
            options.push(("ConnectTimeout".into(), "5".into()));
        }
        // On connections of their own: a shared connection's master has them (see
        // `master_argv`). The second hop too: the build host's copy to a target that went
        // away.
        if (self.keepalive && self.control_path.is_none()) || side == Side::Nested {
            options.extend(keepalive_options());
        }
        let batch = side == Side::Nested
            || (side == Side::WorkstationBatch && self.host_key_check != HostKeyCheck::Ask);
        if batch {
            options.push(("BatchMode".into(), "yes".into()));
        }
        if side == Side::Nested
            && let Some(path) = &self.hop_control
        {
            options.push(("ControlMaster".into(), "auto".into()));
            options.push(("ControlPath".into(), path.clone()));
            options.push(("ControlPersist".into(), "60".into()));
        }
        if side != Side::Nested {
            if let Some(path) = &self.control_path {
                options.push(("ControlMaster".into(), "no".into()));
                options.push(("ControlPath".into(), path.clone()));
            }
            if self.forward_agent {
                options.push(("ForwardAgent".into(), "yes".into()));
            }
        }
        for (name, value) in options {
            flags.push("-o".to_string());
            flags.push(format!("{name}={value}"));
        }
        flags
    }

    /// The `ssh` argv that runs `command` on this host: no pseudo-terminal, no X11.
    pub fn ssh_argv(&self, side: Side, command: &RemoteCommand) -> Vec<String> {
        let mut argv = vec!["ssh".to_string(), "-T".to_string(), "-x".to_string()];
        argv.extend(self.option_flags(side));
        argv.push("--".to_string());
        argv.push(self.address.destination());
        argv.push(command.to_shell());
        argv
    }

    /// The argv that starts the shared connection to this host in the background. ssh
    /// returns once logged in; the master then lives until `ssh -O exit` or 60 idle seconds.
    pub fn master_argv(&self) -> Option<Vec<String>> {
        self.control_path.as_ref()?;
        let mut argv = vec![
            "ssh".to_string(),
            "-f".into(),
            "-N".into(),
            "-T".into(),
            "-x".into(),
        ];
        let mut flags = self.option_flags(Side::WorkstationBatch);
        // Replace ControlMaster=no with the master's own settings.
        if let Some(i) = flags.iter().position(|f| f == "ControlMaster=no") {
            flags[i] = "ControlMaster=yes".into();
        }
        argv.extend(flags);
        argv.extend(["-o".into(), "ControlPersist=60".into()]);
        if self.keepalive {
            for (name, value) in keepalive_options() {
                argv.extend(["-o".into(), format!("{name}={value}")]);
            }
        }
        argv.push("--".into());
        argv.push(self.address.destination());
        Some(argv)
    }

    /// The argv that stops the shared connection.
    /// With every option of the address: `%C` in the socket's name hashes the host name,
    /// port and user ssh resolves, so `?HostName=` or a port must be given here too.
    pub fn exit_master_argv(&self) -> Option<Vec<String>> {
        self.control_path.as_ref()?;
        let mut argv = vec!["ssh".to_string()];
        argv.extend(self.option_flags(Side::WorkstationBatch));
        argv.extend(["-O".into(), "exit".into(), "--".into()]);
        argv.push(self.address.destination());
        Some(argv)
    }

    /// The Nix store URL of this host (`ssh://user@host`); port and options travel in
    /// [`SshHost::nix_sshopts`], which every Nix version reads.
    pub fn store_url(&self) -> String {
        format!("ssh://{}", self.address.destination())
    }

    /// `NIX_SSHOPTS` for Nix's own ssh to this host from `side`.
    pub fn nix_sshopts(&self, side: Side) -> String {
        self.option_flags(side).join(" ")
    }
}

/// Runs `command` on `host` from the workstation without prompts, capturing its output.
pub fn run_remote(
    host: &SshHost,
    command: &RemoteCommand,
) -> std::io::Result<std::process::Output> {
    let argv = host.ssh_argv(Side::WorkstationBatch, command);
    crate::process::run(std::process::Command::new(&argv[0]).args(&argv[1..]), None)
}

/// Like [`run_remote`], writing `input` to the command's standard input first (a sudo
/// password for `sudo --stdin`: on standard input, never on a command line).
pub fn run_remote_with_input(
    host: &SshHost,
    command: &RemoteCommand,
    input: &[u8],
) -> std::io::Result<std::process::Output> {
    let argv = host.ssh_argv(Side::WorkstationBatch, command);
    crate::process::run(
        std::process::Command::new(&argv[0]).args(&argv[1..]),
        Some(input),
    )
}

/// The output of a [`RemoteCommand::Probes`] run: each probe's exit status and output.
pub fn parse_probes(stdout: &str) -> std::collections::BTreeMap<String, (i32, String)> {
    let mut results = std::collections::BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix(PROBE_MARK) {
            let words: Vec<&str> = rest.split_whitespace().collect();
            match words.as_slice() {
                ["begin", name] => current = Some((name.to_string(), String::new())),
                ["end", name, status] => {
                    if let Some((_, mut output)) = current.take() {
                        // Drop the newline the script added before the marker.
                        output.pop();
                        if !output.is_empty() && !output.ends_with('\n') {
                            output.push('\n');
                        }
                        results.insert(name.to_string(), (status.parse().unwrap_or(-1), output));
                    }
                }
                _ => {}
            }
        } else if let Some((_, output)) = current.as_mut() {
            output.push_str(line);
            output.push('\n');
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host without keep-alives (tested on their own below).
    fn host(s: &str, check: HostKeyCheck) -> SshHost {
        let mut h = SshHost::new(s.parse().unwrap(), check);
        h.keepalive = false;
        h
    }

    #[test]
    fn keepalives_on_own_connections_the_master_and_the_second_hop() {
        let mut h = SshHost::new("root@t".parse().unwrap(), HostKeyCheck::Strict);
        let ka = "-o ServerAliveInterval=15 -o ServerAliveCountMax=4";
        // A connection of its own.
        assert_eq!(
            h.nix_sshopts(Side::Workstation),
            format!("-o StrictHostKeyChecking=yes {ka}")
        );
        // Shared: the master has them, its sessions need none.
        h.control_path = Some("/tmp/c/%C".into());
        assert!(!h.nix_sshopts(Side::Workstation).contains("ServerAlive"));
        assert!(h.master_argv().unwrap().join(" ").contains(ka));
        // The build host's copy to the target always has them.
        assert!(h.nix_sshopts(Side::Nested).contains(ka));
        // The user's ssh config sets its own: none of clan's on the workstation's side.
        h.keepalive = false;
        assert!(!h.master_argv().unwrap().join(" ").contains("ServerAlive"));
        h.control_path = None;
        assert!(!h.nix_sshopts(Side::Workstation).contains("ServerAlive"));
        // An address's own value comes first, and ssh keeps the first it sees.
        let mut h = SshHost::new(
            "root@t?ServerAliveInterval=2".parse().unwrap(),
            HostKeyCheck::Strict,
        );
        h.keepalive = true;
        let opts = h.nix_sshopts(Side::Workstation);
        assert!(opts.find("ServerAliveInterval=2") < opts.find("ServerAliveInterval=15"));
    }

    /// A shell function of `src/scripts/activate.sh`, by name, as text.
    fn activate_function(name: &str) -> String {
        let start = ACTIVATE
            .text
            .find(&format!("\n{name}() {{\n"))
            .expect("the function");
        let end = start + ACTIVATE.text[start..].find("\n}\n").expect("its end") + 3;
        ACTIVATE.text[start..end].to_string()
    }

    // A transient unit that could not start its command (systemd's EXIT_CGROUP, 219, seen
    // in the lab's containers) is tried again under a fresh name; the command's own failure
    // is not; systemd's codes three times in a row end it.
    #[test]
    fn activate_tries_a_unit_again_only_when_its_command_never_ran() {
        let dir = tempfile::tempdir().unwrap();
        // A systemd-run that answers the exit statuses listed in `statuses`, one per call,
        // and records each call's unit.
        let fake = dir.path().join("systemd-run");
        std::fs::write(
            &fake,
            "#!/bin/sh\nfor a; do case $a in --unit=*) echo \"${a#--unit=}\" >>\"$CALLS\";; esac; done\n\
             s=$(head -n 1 \"$STATUSES\"); sed -i 1d \"$STATUSES\"; exit \"$s\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let run = |statuses: &str| {
            let calls = dir.path().join("calls");
            let list = dir.path().join("statuses");
            let _ = std::fs::remove_file(&calls);
            std::fs::write(&list, statuses).unwrap();
            let script = format!(
                "{}\nin_unit clan-switch-r1 true",
                activate_function("in_unit")
            );
            let out = std::process::Command::new("sh")
                .args(["-c", &script])
                .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
                .env("CALLS", &calls)
                .env("STATUSES", &list)
                .output()
                .unwrap();
            let units = std::fs::read_to_string(&calls).unwrap_or_default();
            (
                out.status.code(),
                units.lines().map(str::to_string).collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            run("219\n0\n"),
            (
                Some(0),
                vec!["clan-switch-r1".into(), "clan-switch-r1-try2".into()]
            )
        );
        assert_eq!(run("1\n0\n"), (Some(1), vec!["clan-switch-r1".into()]));
        assert_eq!(
            run("219\n203\n219\n0\n"),
            (
                Some(219),
                vec![
                    "clan-switch-r1".into(),
                    "clan-switch-r1-try2".into(),
                    "clan-switch-r1-try3".into()
                ]
            )
        );
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
        let argv = h.ssh_argv(
            Side::Workstation,
            &RemoteCommand::Run(Invocation::new("true", [] as [&str; 0])),
        );
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
            h.nix_sshopts(Side::Nested),
            "-o IdentityFile=/root/.ssh/other -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ServerAliveInterval=15 -o ServerAliveCountMax=4 -o BatchMode=yes"
        );
        assert_eq!(h.store_url(), "ssh://root@t");
    }

    #[test]
    fn shared_connection_and_agent_only_on_the_workstation_side() {
        let mut h = host("root@b", HostKeyCheck::Strict);
        h.control_path = Some("/tmp/c/%C".into());
        h.forward_agent = true;
        assert_eq!(
            h.nix_sshopts(Side::Workstation),
            "-o StrictHostKeyChecking=yes -o ControlMaster=no -o ControlPath=/tmp/c/%C -o ForwardAgent=yes"
        );
        assert_eq!(
            h.nix_sshopts(Side::Nested),
            "-o StrictHostKeyChecking=yes -o ServerAliveInterval=15 -o ServerAliveCountMax=4 -o BatchMode=yes"
        );
        let master = h.master_argv().unwrap();
        assert!(master.contains(&"ControlMaster=yes".to_string()));
        assert!(master.contains(&"BatchMode=yes".to_string()));
        assert!(!master.contains(&"ControlMaster=no".to_string()));
        h.host_key_check = HostKeyCheck::Ask;
        assert!(!h.nix_sshopts(Side::WorkstationBatch).contains("BatchMode"));
    }

    #[test]
    fn probes_run_each_command_and_frame_its_output() {
        let cmd = RemoteCommand::Probes(vec![
            (
                "one".to_string(),
                Invocation::new("sh", ["-c", "echo out; echo err >&2; exit 3"]),
            ),
            ("two".to_string(), Invocation::new("echo", ["it's"])),
            (
                "three".to_string(),
                Invocation::new("printf", ["no-newline"]),
            ),
            ("four".to_string(), Invocation::new("true", [] as [&str; 0])),
        ]);
        let out = std::process::Command::new("sh")
            .args(["-c", &cmd.to_shell()])
            .output()
            .unwrap();
        let parsed = parse_probes(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(parsed["one"], (3, "out\nerr\n".to_string()));
        assert_eq!(parsed["two"], (0, "it's\n".to_string()));
        assert_eq!(parsed["three"], (0, "no-newline\n".to_string()));
        assert_eq!(parsed["four"], (0, String::new()));
    }

    #[test]
    fn until_hangup_stops_when_input_ends() {
        use std::io::Write;
        let cmd = RemoteCommand::UntilHangup(Invocation::new(
            "sh",
            ["-c", "echo started; sleep 30; echo finished"],
        ));
        let started = std::time::Instant::now();
        let mut child = std::process::Command::new("sh")
            .args(["-c", &cmd.to_shell()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "did not stop"
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "started\n");
        assert!(!out.status.success());
        // With input open until it ends, it runs to the end with its own status.
        let quick = RemoteCommand::UntilHangup(Invocation::new("sh", ["-c", "echo done; exit 3"]));
        let mut child = std::process::Command::new("sh")
            .args(["-c", &quick.to_shell()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let out = child.wait_with_output().unwrap();
        drop(stdin);
        let _ = std::io::stdout().flush();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn the_sudo_install_command_is_one_line_a_sudoers_rule_can_name() {
        assert!(!SUDO_INSTALL.contains(['\n', ',', ':', '=', '\\', '*', '?', '[', '"', '\'']));
        assert!(!SUDO_INSTALL.contains("  "));
        for script in [ACTIVATE, crate::vars::upload::VARS_UPLOAD] {
            assert!(SUDO_SCRIPTS.contains(&script.name), "{}", script.name);
            assert!(SUDO_INSTALL.contains(script.name), "{}", script.name);
        }
        let rule = sudoers_rule("deploy");
        assert!(rule.starts_with("deploy ALL=(root) NOPASSWD: /run/clan/clan-activate-*.sh, "));
        assert!(rule.ends_with(" clan-install clan-vars-upload"));
    }

    #[test]
    fn activation_script_refuses_bad_arguments_before_touching_anything() {
        let run = |args: &[&str]| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(ACTIVATE.text)
                .arg("clan-activate")
                .args(args)
                .output()
                .unwrap()
                .status
                .code()
        };
        assert_eq!(run(&[]), Some(2));
        assert_eq!(run(&["lock"]), Some(2));
        assert_eq!(run(&["lock", "../x", "w", "1"]), Some(2));
        assert_eq!(run(&["lock", "-rf", "w", "1"]), Some(2));
        assert_eq!(run(&["confirm", "ABC"]), Some(2));
        // It parses as a POSIX shell script.
        let syntax = std::process::Command::new("sh")
            .args(["-n", "-c", ACTIVATE.text])
            .status()
            .unwrap();
        assert!(syntax.success());
    }

    #[test]
    fn scripts_install_once_per_version_and_say_what_runs() {
        let cmd = RemoteCommand::Script {
            script: ACTIVATE,
            args: vec!["confirm".into(), "0123".into()],
            sudo: None,
        };
        assert_eq!(cmd.summary(), "clan-activate confirm 0123");
        let line = cmd.to_shell();
        assert!(line.starts_with("sh -c "));
        assert!(line.contains(&ACTIVATE.installed_path()));
        assert!(
            ACTIVATE
                .installed_path()
                .starts_with("/run/clan/clan-activate-")
        );
        assert!(line.ends_with(" confirm 0123"));
        let with_password = cmd.sudo(true);
        assert!(with_password.reads_password());
        assert_eq!(with_password.summary(), "sudo clan-activate confirm 0123");
    }
}
