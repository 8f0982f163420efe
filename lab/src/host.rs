//! What a lab host is: how it is asked for ([`HostSpec`]) and what a test can read of it
//! ([`Host`]).

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command};

/// How a host is set up.
#[derive(Debug, Clone)]
pub struct HostSpec {
    pub(crate) name: String,
    pub(crate) nix_system: Option<String>,
    pub(crate) current_nix: bool,
    pub(crate) max_jobs: Option<u32>,
    pub(crate) daemon_trusted_users: Option<Vec<String>>,
    pub(crate) kind: HostKind,
}

/// What runs a lab host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostKind {
    /// A mount namespace with its own `/nix`, `/root`, `/etc/nix`, `/home` and `/run`, and
    /// an `sshd` of its own; no init system.
    #[default]
    Namespace,
    /// A container booted with systemd as PID 1 (`systemd-nspawn -b`), as on NixOS: sshd
    /// runs as `ssh.service`, `systemd-run` works, `/run` is its own.
    Systemd,
}

impl std::fmt::Display for HostKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostKind::Namespace => "namespace",
            HostKind::Systemd => "systemd",
        })
    }
}

impl HostSpec {
    /// A host with the machine's own Nix system.
    pub fn new(name: &str) -> HostSpec {
        HostSpec {
            name: name.to_string(),
            nix_system: None,
            current_nix: false,
            max_jobs: None,
            daemon_trusted_users: None,
            kind: HostKind::Namespace,
        }
    }

    /// Runs the host as `kind` (see [`HostKind`]).
    pub fn kind(mut self, kind: HostKind) -> HostSpec {
        self.kind = kind;
        self
    }

    /// Runs a `nix-daemon` on the host, so users other than root can use Nix, trusting
    /// root and `trusted` (`trusted-users`).
    pub fn nix_daemon(mut self, trusted: &[&str]) -> HostSpec {
        self.daemon_trusted_users = Some(trusted.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Sets `max-jobs` in the host's nix.conf (builds at once).
    pub fn max_jobs(mut self, jobs: u32) -> HostSpec {
        self.max_jobs = Some(jobs);
        self
    }

    /// Runs a current Nix (2.26, from `scripts/fetch-current-nix`) on this host instead of
    /// the system's 2.8: `nix`, `nix-store` and `nix-env` in its `/usr/local/bin`.
    pub fn current_nix(mut self) -> HostSpec {
        self.current_nix = true;
        self
    }

    /// Sets `system = …` in the host's nix.conf (e.g. `aarch64-linux`).
    pub fn nix_system(mut self, system: &str) -> HostSpec {
        self.nix_system = Some(system.to_string());
        self
    }
}

/// One simulated host.
#[derive(Debug)]
pub struct Host {
    /// Its name in the lab.
    pub name: String,
    /// Its loopback address.
    pub ip: String,
    /// Its directory: `nix/`, `root/`, `etc-nix/`, `home/`, `sshd/`.
    pub dir: PathBuf,
    /// What runs it.
    pub kind: HostKind,
    pub(crate) sshd: Option<Child>,
    pub(crate) daemon: Option<Child>,
    pub(crate) container: Option<Child>,
}

impl Host {
    /// The host's `/root` as seen from outside its namespace.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The host's `/nix` as seen from outside its namespace.
    pub fn nix(&self) -> PathBuf {
        self.dir.join("nix")
    }

    /// Whether `store_path` (`/nix/store/…`) is in this host's store.
    pub fn has_path(&self, store_path: &str) -> bool {
        let rel = store_path.trim_start_matches("/nix/");
        fs::symlink_metadata(self.nix().join(rel)).is_ok()
    }

    /// Where `/nix/var/nix/profiles/system` points, resolved to a store path.
    pub fn system_profile(&self) -> Option<String> {
        let profiles = self.nix().join("var/nix/profiles");
        let generation = fs::read_link(profiles.join("system")).ok()?;
        let target = fs::read_link(profiles.join(generation)).ok()?;
        Some(target.display().to_string())
    }

    /// The lines `switch-to-configuration` recorded on this host: `<toplevel> <action>`.
    pub fn switch_log(&self) -> Vec<String> {
        fs::read_to_string(self.root().join("switch-to-configuration.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Whether this host's known_hosts holds a key for `host` (hashed entries included).
    pub fn knows_host(&self, host: &str) -> bool {
        Command::new("ssh-keygen")
            .arg("-F")
            .arg(host)
            .arg("-f")
            .arg(self.root().join(".ssh/known_hosts"))
            .output()
            .map(|o| o.status.success() && !o.stdout.is_empty())
            .unwrap_or(false)
    }

    /// How many times the shared fixture dependency was built on this host.
    pub fn shared_builds(&self) -> usize {
        fs::read_to_string(self.root().join("shared-builds.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// The sshd log.
    pub fn sshd_log(&self) -> String {
        fs::read_to_string(self.dir.join("sshd/sshd.log")).unwrap_or_default()
    }

    /// Successful ssh logins to this host, by source address (from sshd's log).
    pub fn logins_by_source(&self) -> BTreeMap<String, usize> {
        self.sshd_lines_by_source("Accepted publickey for ")
    }

    /// Sessions (commands run, shells) this host's sshd started, by source address: each
    /// round trip over a connection is one (sshd's `Starting session` lines, LogLevel
    /// VERBOSE).
    pub fn sessions_by_source(&self) -> BTreeMap<String, usize> {
        self.sshd_lines_by_source("Starting session: ")
    }

    /// How many of this host's sshd log lines hold `marker`, by the source address after it.
    fn sshd_lines_by_source(&self, marker: &str) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for line in self.sshd_log().lines() {
            if let Some(rest) = line.split(marker).nth(1)
                && let Some(from) = rest.split(" from ").nth(1)
                && let Some(ip) = from.split_whitespace().next()
            {
                *counts.entry(ip.to_string()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Number of store paths in this host's store.
    pub fn store_entries(&self) -> usize {
        fs::read_dir(self.nix().join("store"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name() != ".links")
                    .count()
            })
            .unwrap_or(0)
    }
}
