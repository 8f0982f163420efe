//! Command-line definitions. Every flag is defined once, here; `--help` is generated from
//! these doc comments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use clap_complete::engine::{ArgValueCompleter, CompletionCandidate};

use crate::plan::Action;
use crate::ssh::HostKeyCheck;

/// Deploy NixOS machines from a clan flake, optionally building on a separate build host.
#[derive(Debug, Parser)]
#[command(name = "clan", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: TopCommand,
}

/// Top-level command groups.
#[derive(Debug, Subcommand)]
pub enum TopCommand {
    /// Manage the machines of a clan.
    #[command(subcommand, visible_alias = "m")]
    Machines(MachinesCommand),
    /// Generate, inspect and upload the machines' vars (secrets and public values).
    #[command(subcommand, visible_alias = "v")]
    Vars(VarsCommand),
    /// Log in to a machine's target (or run COMMAND there) with the address, user and host
    /// key policy a deploy would use.
    Ssh(SshArgs),
    /// Print the shell completion script for SHELL (e.g. `clan completions bash >
    /// /etc/bash_completion.d/clan`): it asks clan for the words as you type, so flags come
    /// from this command line's definition and machine names and tags from the clan's flake.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Arguments of `clan ssh`.
#[derive(Debug, Args)]
pub struct SshArgs {
    /// The machine whose target to reach.
    #[arg(value_name = "MACHINE", add = ArgValueCompleter::new(complete_machines))]
    pub machine: String,

    /// Flake and host overrides, as for update (`--target-host` reaches another address).
    #[command(flatten)]
    pub hosts: HostArgs,

    /// Host key policy for the connection.
    #[command(flatten)]
    pub connect: ConnectArgs,

    /// What to run there instead of a login shell (after `--`).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `clan vars …`
#[derive(Debug, Subcommand)]
pub enum VarsCommand {
    /// Run the generators a machine lacks, here, and store their files (secrets encrypted).
    Generate(VarsGenerateArgs),
    /// List a machine's vars: public values, and secrets as ********.
    List(VarsMachineArgs),
    /// Print one var of a machine (a secret decrypted with your age identity).
    Get(VarsGetArgs),
    /// Check that a machine's vars are complete and that you can decrypt its key.
    Check(VarsMachineArgs),
    /// Set one var of a machine to what you type (hidden) or what standard input holds.
    Set(VarsGetArgs),
    /// Send a machine's key and encrypted secrets straight to it (never via a build host).
    Upload(VarsUploadArgs),
    /// Mend the vars' recipients: this tool's age store re-encrypts machine keys to the
    /// current vars.settings.recipients (and moves secrets from its earlier layout);
    /// clan-core's sops store re-encrypts each secret to exactly the keys its links name.
    Fix(VarsFixArgs),
    /// Make your age key if you have none (kept where sops looks), and add its public key
    /// to the clan as a sops user (`sops/users/<user>/key.json`), as clan-core's keygen.
    Keygen(VarsKeygenArgs),
}

/// Arguments of `clan vars keygen`.
#[derive(Debug, Args)]
pub struct VarsKeygenArgs {
    /// Your name in the clan (default: $USER).
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// Replace the keys the clan has for that user.
    #[arg(long)]
    pub force: bool,

    /// The flake, as for update.
    #[command(flatten)]
    pub hosts: HostArgs,
}

/// Arguments of `clan vars generate`.
#[derive(Debug, Args)]
pub struct VarsGenerateArgs {
    /// Machines to generate for (default: every machine of the clan).
    #[arg(value_name = "MACHINE", add = ArgValueCompleter::new(complete_machines))]
    pub machines: Vec<String>,

    /// Only this generator (and the ones it depends on, if missing).
    #[arg(long, short = 'g', value_name = "GENERATOR")]
    pub generator: Option<String>,

    /// Run the generators again even where their files exist (and those that depend on them).
    #[arg(long, short = 'r')]
    pub regenerate: bool,

    /// Run generators without the sandbox: they see your environment, home and network.
    #[arg(long)]
    pub no_sandbox: bool,

    /// The flake, as for update.
    #[command(flatten)]
    pub hosts: HostArgs,
}

/// Arguments naming one machine.
#[derive(Debug, Args)]
pub struct VarsMachineArgs {
    /// The machine.
    #[arg(value_name = "MACHINE", add = ArgValueCompleter::new(complete_machines))]
    pub machine: String,

    /// The flake, as for update.
    #[command(flatten)]
    pub hosts: HostArgs,
}

/// Arguments of `clan vars get`.
#[derive(Debug, Args)]
pub struct VarsGetArgs {
    /// The machine.
    #[arg(value_name = "MACHINE", add = ArgValueCompleter::new(complete_machines))]
    pub machine: String,

    /// The var: GENERATOR/FILE.
    #[arg(value_name = "GENERATOR/FILE")]
    pub var: String,

    /// The flake, as for update.
    #[command(flatten)]
    pub hosts: HostArgs,
}

/// Arguments of `clan vars fix`.
#[derive(Debug, Args)]
pub struct VarsFixArgs {
    /// Machines whose keys to re-encrypt (default: every machine with a key).
    #[arg(value_name = "MACHINE", add = ArgValueCompleter::new(complete_machines))]
    pub machines: Vec<String>,

    /// The flake, as for update.
    #[command(flatten)]
    pub hosts: HostArgs,
}

/// `clan machines …`
#[derive(Debug, Subcommand)]
pub enum MachinesCommand {
    /// Evaluate here, build on the build host, copy to the target and activate.
    #[command(visible_alias = "u")]
    Update(UpdateArgs),
    /// Build machines' systems where a deploy would build them (the build host), and stop:
    /// nothing is copied to or run on a target (`update --action build`; for CI).
    Build(UpdateArgs),
    /// List the clan's machines and their tags (with --tags, those having every tag).
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show where a machine deploys to and builds, every source consulted, and which won.
    Show(ShowArgs),
    /// Set up the second hop: a key on the build host, authorized on the target, and the
    /// target's verified host key in the build host's known_hosts.
    SetupBuildHost(SetupBuildHostArgs),
    /// Make the build host's binary-cache signing key (for --copy-mode cache), once, and
    /// print its public key.
    SetupCache(SetupCacheArgs),
    /// Switch a machine back to its previous system generation.
    Rollback(RollbackArgs),
    /// List a machine's system generations on its target, the current one marked.
    Generations(OnTargetArgs),
}

/// Arguments of `clan machines setup-cache`.
#[derive(Debug, Args)]
pub struct SetupCacheArgs {
    /// The machine whose build host signs its closures.
    #[arg(value_name = "MACHINE", add = ArgValueCompleter::new(complete_machines))]
    pub machine: String,

    /// The key's name, as targets will see it in trusted-public-keys.
    #[arg(long, value_name = "NAME", default_value = "clan-cache-1")]
    pub key_name: String,

    /// Open this cache store once from the build host (creates a file:// cache), else the
    /// machine's deploy.cache.upload, if any.
    #[arg(long, value_name = "STORE_URL")]
    pub upload: Option<String>,

    /// Flake and host overrides, as for update.
    #[command(flatten)]
    pub hosts: HostArgs,

    /// Host key policy for the connection to the build host.
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Arguments of `clan machines rollback`.
/// Arguments of `clan machines rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The machine, its flake, host overrides and lock timeout.
    #[command(flatten)]
    pub on: OnTargetArgs,

    /// Go back to this generation of the system profile (default: the newest one older
    /// than the current one).
    #[arg(long, value_name = "GENERATION")]
    pub to: Option<u32>,
}

/// Arguments of `clan vars upload`.
/// Arguments of `clan vars upload`.
#[derive(Debug, Args)]
pub struct VarsUploadArgs {
    /// The machine, its flake and host overrides, and how to reach its target.
    #[command(flatten)]
    pub on: OnTargetArgs,

    /// Write what the target would receive into this local directory instead (as clan-core's
    /// --directory: for an installer's extra files); files already there are never replaced.
    #[arg(long, value_name = "DIR")]
    pub directory: Option<PathBuf>,
}

/// Arguments of a command that acts on one machine's target under its deploy lock
/// (`clan machines rollback`, `clan vars upload`).
#[derive(Debug, Args)]
pub struct OnTargetArgs {
    /// The machine.
    #[arg(value_name = "MACHINE", add = ArgValueCompleter::new(complete_machines))]
    pub machine: String,

    /// Flake and host overrides, as for update.
    #[command(flatten)]
    pub hosts: HostArgs,

    /// Host key policy for every ssh hop, the build host's own copy to the target included.
    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Seconds to wait for a deploy of the same target to release its lock.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub lock_timeout: u32,
}

/// Where the hosts come from: the flake and the command-line overrides.
#[derive(Debug, Clone, Args)]
pub struct HostArgs {
    /// Path of the clan flake (default: $CLAN_DIR, else the nearest directory from here up
    /// that has a flake.nix, as clan-core finds it).
    #[arg(long, value_name = "PATH", default_value_os_t = default_flake(), hide_default_value = true)]
    pub flake: PathBuf,

    /// Build on this host instead of the configured build host ('localhost': build on this machine).
    #[arg(long, value_name = "HOST")]
    pub build_host: Option<String>,

    /// Deploy to this address instead of the configured targetHost (one machine only).
    #[arg(long, value_name = "HOST")]
    pub target_host: Option<String>,

    /// Nix remote builders behind the build host for this deploy (Nix's `builders` syntax,
    /// e.g. 'ssh://root@b1 x86_64-linux ; ssh://root@b2').
    #[arg(long, value_name = "SPEC")]
    pub builders: Option<String>,

    /// How the closure reaches the targets: the build host copies it over ssh, or signs it
    /// into a binary cache the targets substitute from (default: the inventory's, else ssh).
    #[arg(long, value_enum, value_name = "MODE")]
    pub copy_mode: Option<crate::boundary::CopyMode>,

    /// With --copy-mode cache: the Nix store URL the build host copies to.
    #[arg(long, value_name = "STORE_URL")]
    pub cache_upload: Option<String>,

    /// With --copy-mode cache: the substituter URL the targets fetch from.
    #[arg(long, value_name = "URL")]
    pub cache_url: Option<String>,

    /// With --copy-mode cache: the cache's public key (name:base64) the targets must trust.
    #[arg(long, value_name = "KEY")]
    pub cache_key: Option<String>,

    /// Pass `--option NAME VALUE` to every Nix call (evaluation, copies, builds).
    #[arg(long = "option", num_args = 2, value_names = ["NAME", "VALUE"], action = clap::ArgAction::Append)]
    pub nix_option: Vec<String>,

    /// Show Nix's evaluation trace when evaluating the flake fails.
    #[arg(long)]
    pub show_trace: bool,

    /// Machines evaluated at once, each in its own `nix eval` (default: one per core, fewer
    /// when memory is short: about 1.5 GiB each).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub eval_jobs: Option<u16>,
}

/// How this workstation's ssh connections check host keys.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Host key policy for every ssh hop, the build host's own copy to the target included.
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = HostKeyCheck::Strict)]
    pub host_key_check: HostKeyCheck,
}

/// Arguments of `clan machines show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Machines to show (default: every machine of the clan).
    #[arg(value_name = "MACHINE", add = ArgValueCompleter::new(complete_machines))]
    pub machines: Vec<String>,

    /// Flake and host overrides, as for update.
    #[command(flatten)]
    pub hosts: HostArgs,

    /// Agent forwarding override, as for update.
    #[command(flatten)]
    pub agent: AgentArgs,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `clan machines list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only the machines that have all of these tags (clan-core's computed `all`, `nixos`
    /// and `darwin` included).
    #[arg(long, num_args = 1.., value_name = "TAG", add = ArgValueCompleter::new(complete_tags))]
    pub tags: Vec<String>,

    /// The flake, as for update.
    #[command(flatten)]
    pub hosts: HostArgs,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `clan machines setup-build-host`.
#[derive(Debug, Args)]
pub struct SetupBuildHostArgs {
    /// The machine whose build host is set up to reach its target.
    #[arg(value_name = "MACHINE", add = ArgValueCompleter::new(complete_machines))]
    pub machine: String,

    /// Flake and host overrides, as for update.
    #[command(flatten)]
    pub hosts: HostArgs,

    /// Host key policy for every ssh hop, the build host's own copy to the target included.
    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Print what would change on which host, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Arguments of `clan machines update`.
#[derive(Debug, Clone, Args)]
pub struct UpdateArgs {
    /// Machines to update (default: every machine of the clan).
    #[arg(value_name = "MACHINE", add = ArgValueCompleter::new(complete_machines))]
    pub machines: Vec<String>,

    /// Flake and host overrides.
    #[command(flatten)]
    pub hosts: HostArgs,

    /// Agent forwarding override.
    #[command(flatten)]
    pub agent: AgentArgs,

    /// Host key policy for every ssh hop, the build host's own copy to the target included.
    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Print every step with its host and exact command, then stop without running any.
    #[arg(long)]
    pub dry_run: bool,

    /// Skip the checks of every ssh hop, Nix and the build host's system before the build.
    #[arg(long)]
    pub no_preflight: bool,

    /// Copy the closure build host → this machine → target, for a build host that cannot reach the target.
    #[arg(long)]
    pub copy_via_workstation: bool,

    /// Also update the machines that have one of these tags (inventory.machines.<m>.tags).
    #[arg(long, value_name = "TAG", num_args = 1.., add = ArgValueCompleter::new(complete_tags))]
    pub tags: Vec<String>,

    /// Builds each build host runs at once (passed as the realise's --max-jobs). Default: the
    /// host's own max-jobs, raised to one build per machine deployed at once (at most --jobs)
    /// when it is lower but not 0; the preflight asks the host.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub build_jobs: Option<u16>,

    /// How many machines copy to their targets and activate at once (and, unless
    /// --build-jobs is given, the fewest builds a build host runs at once for its machines).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: u16,

    /// Stop starting new work after the first failure (by default the others go on).
    #[arg(long)]
    pub fail_fast: bool,

    /// Let each target fetch paths from its own substituters instead of from the build host.
    #[arg(long)]
    pub use_substitutes: bool,

    /// Print a JSON report of what happened to each machine on stdout.
    #[arg(long)]
    pub json: bool,

    /// What activation does: switch (profile and now), boot (profile only), test (now only), dry-activate.
    #[arg(long, value_enum, value_name = "ACTION", default_value_t = Action::Switch)]
    pub action: Action,

    /// Do not print what the new system changes against the current one before activating.
    #[arg(long)]
    pub no_diff: bool,

    /// Switch again on targets that run this very system already (by default they are up
    /// to date: nothing is built, copied or activated there).
    #[arg(long)]
    pub reactivate: bool,

    /// Do not generate missing vars or upload secrets (the targets keep the secrets they have).
    #[arg(long)]
    pub no_secrets: bool,

    /// Run vars generators without the sandbox: they see your environment, home and network.
    #[arg(long)]
    pub no_sandbox: bool,

    /// Do not arm the target's watchdog that rolls back when it is unreachable after activation.
    #[arg(long)]
    pub no_rollback: bool,

    /// Activate this NixOS specialisation of the new system (its
    /// specialisation/NAME/bin/switch-to-configuration); the profile is the system itself.
    #[arg(long, value_name = "NAME", value_parser = parse_specialisation)]
    pub specialisation: Option<String>,

    /// Skip NixOS's pre-switch checks (switch inhibitors): NIXOS_NO_CHECK=1 for the switch.
    #[arg(long)]
    pub no_check: bool,

    /// Seconds the target waits for a fresh ssh login after activation before it rolls back by itself.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(5..))]
    pub rollback_timeout: u32,

    /// Seconds to wait for another deploy of the same target to release its lock.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub lock_timeout: u32,

    /// Roll out in batches of N machines (or N% of them), one batch after the other.
    #[arg(long, value_name = "N|N%")]
    pub batch_size: Option<BatchSize>,

    /// Deploy these machines first, alone; if one fails, nothing else is started.
    #[arg(long, value_name = "MACHINE", add = ArgValueCompleter::new(complete_machines))]
    pub canary: Vec<String>,

    /// Stop starting batches once more than N machines failed (default 0).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_failures: usize,

    /// Seconds a machine's health check (deploy.healthCheck) may take.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub health_check_timeout: u32,

    /// When a machine's health check fails, go back to its previous generation.
    #[arg(long)]
    pub rollback_on_unhealthy: bool,

    /// Progress display: live lines on a terminal (auto), or one plain line per event.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// Show every command and its output (plain lines), not one line per step; the run's
    /// log always has them.
    #[arg(short, long, visible_alias = "debug")]
    pub verbose: bool,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Live lines when stderr is a terminal, plain lines otherwise.
    Auto,
    /// One plain line per event, no terminal codes.
    Plain,
}

/// `--forward-agent` / `--no-forward-agent`.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Forward your ssh agent to the build host for its copy to the target (root there can use your keys).
    #[arg(long, overrides_with = "no_forward_agent")]
    pub forward_agent: bool,

    /// Do not forward your ssh agent, whatever the inventory or machine configuration says.
    #[arg(long, overrides_with = "forward_agent")]
    pub no_forward_agent: bool,
}

impl AgentArgs {
    /// `Some(true)` for `--forward-agent`, `Some(false)` for `--no-forward-agent`.
    pub fn forward_agent_override(&self) -> Option<bool> {
        match (self.forward_agent, self.no_forward_agent) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

impl HostArgs {
    /// The flags that decide what a command acts on: the flake (absolute, unless it
    /// is the current directory or a flake reference), the host overrides and Nix options.
    pub fn hint_context(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if self.flake.as_os_str() != "." {
            let shown = self.flake.display().to_string();
            let absolute = if shown.contains(':') {
                shown
            } else {
                std::path::absolute(&self.flake)
                    .map(|p| p.display().to_string())
                    .unwrap_or(shown)
            };
            flags.extend(["--flake".to_string(), absolute]);
        }
        for (flag, value) in [
            ("--target-host", &self.target_host),
            ("--build-host", &self.build_host),
        ] {
            if let Some(value) = value {
                flags.extend([flag.to_string(), value.clone()]);
            }
        }
        for pair in self.nix_option.chunks(2) {
            flags.push("--option".into());
            flags.extend(pair.iter().cloned());
        }
        flags
    }

    /// The overrides these flags and `agent` make.
    /// `--option` and `--show-trace`, checked: option names are plain words; values hold no
    /// control characters.
    pub fn nix_options(&self) -> Result<crate::eval::NixOptions, crate::error::Error> {
        let mut options = Vec::new();
        for pair in self.nix_option.chunks(2) {
            let [name, value] = pair else { continue };
            let name_ok = !name.is_empty()
                && name.starts_with(|c: char| c.is_ascii_alphabetic())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !name_ok || value.chars().any(char::is_control) {
                return Err(crate::error::Error::usage(format!(
                    "invalid --option {:?} {:?}: the name is a Nix setting (letters, digits, '-'), the value one line",
                    name, value
                )));
            }
            options.push((name.clone(), value.clone()));
        }
        Ok(crate::eval::NixOptions {
            options,
            show_trace: self.show_trace,
            eval_jobs: self
                .eval_jobs
                .map_or_else(crate::eval::default_eval_jobs, usize::from),
            vars: None,
        })
    }

    pub fn overrides(&self, agent: Option<&AgentArgs>) -> crate::resolve::Overrides {
        crate::resolve::Overrides {
            build_host: self.build_host.clone(),
            target_host: self.target_host.clone(),
            forward_agent: agent.and_then(AgentArgs::forward_agent_override),
            builders: self.builders.clone(),
            copy_mode: self.copy_mode,
            cache: crate::resolve::CacheOverrides {
                upload: self.cache_upload.clone(),
                url: self.cache_url.clone(),
                key: self.cache_key.clone(),
            },
            vars_repo: None,
        }
    }
}

/// `--specialisation NAME`: a directory name of the system's `specialisation/`.
fn parse_specialisation(value: &str) -> Result<String, String> {
    let ok = value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.len() <= 255
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(value.to_string())
    } else {
        Err("a specialisation name: a letter or digit, then letters, digits, . _ - (a directory of the system's specialisation/)".into())
    }
}

/// `--batch-size`: a number of machines, or a percentage of the selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    /// This many machines per batch.
    Machines(usize),
    /// This percentage of the machines per batch (at least one).
    Percent(u8),
}

impl std::str::FromStr for BatchSize {
    type Err = String;
    fn from_str(s: &str) -> Result<BatchSize, String> {
        let bad =
            || format!("{s:?} is not a batch size: N (machines) or N% (of the selection), N > 0");
        if let Some(p) = s.strip_suffix('%') {
            let p: u8 = p.parse().map_err(|_| bad())?;
            if p == 0 || p > 100 {
                return Err(bad());
            }
            Ok(BatchSize::Percent(p))
        } else {
            let n: usize = s.parse().map_err(|_| bad())?;
            if n == 0 {
                return Err(bad());
            }
            Ok(BatchSize::Machines(n))
        }
    }
}

impl BatchSize {
    /// Machines per batch for a rollout of `total`.
    pub fn of(self, total: usize) -> usize {
        match self {
            BatchSize::Machines(n) => n,
            BatchSize::Percent(p) => (total * usize::from(p)).div_ceil(100).max(1),
        }
    }
}

/// The clan's machines and their tags, for the shell's completion (`COMPLETE=SHELL clan …`):
/// one cheap evaluation of the flake `--flake` would default to; nothing when it fails.
fn completion_index() -> Option<crate::eval::Evaluation> {
    let flake = crate::select::flake_ref(&default_flake()).ok()?;
    // No flake here: nothing to evaluate (and no Nix started).
    if let Some(dir) = &flake.dir
        && !dir.join("flake.nix").is_file()
    {
        return None;
    }
    crate::eval::evaluate_index(&flake, &[], &crate::eval::NixOptions::default()).ok()
}

/// Completes a machine name from the clan's machines.
fn complete_machines(current: &std::ffi::OsStr) -> Vec<CompletionCandidate> {
    let current = current.to_string_lossy();
    completion_index()
        .map(|index| index.machines)
        .unwrap_or_default()
        .into_iter()
        // Through the trust boundary: a name from the flake reaches the terminal.
        .filter(|name| {
            crate::boundary::MachineName::parse(
                name,
                &crate::boundary::Origin::Flake("machines".into()),
            )
            .is_ok()
        })
        .filter(|name| name.starts_with(current.as_ref()))
        .map(CompletionCandidate::new)
        .collect()
}

/// Completes a tag from the clan's machines' tags (the computed ones included).
fn complete_tags(current: &std::ffi::OsStr) -> Vec<CompletionCandidate> {
    let current = current.to_string_lossy();
    let mut tags: Vec<String> = completion_index()
        .map(|index| index.tags.into_values().flatten().collect())
        .unwrap_or_default();
    tags.sort();
    tags.dedup();
    tags.into_iter()
        .filter(|tag| {
            crate::boundary::Tag::parse(tag, &crate::boundary::Origin::Flake("tags".into())).is_ok()
        })
        .filter(|tag| tag.starts_with(current.as_ref()))
        .map(CompletionCandidate::new)
        .collect()
}

/// The flake when `--flake` is not given, as clan-core finds it: `$CLAN_DIR`, else the
/// current directory or the nearest one above it that has a `flake.nix`, else `.`.
pub fn default_flake() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLAN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let here = PathBuf::from(".");
    if here.join("flake.nix").exists() {
        return here;
    }
    std::env::current_dir()
        .ok()
        .and_then(|cwd| {
            cwd.ancestors()
                .skip(1)
                .find(|d| d.join("flake.nix").is_file())
                .map(std::path::Path::to_path_buf)
        })
        .unwrap_or(here)
}

#[cfg(test)]
mod tests {
    use super::BatchSize;

    #[test]
    fn batch_sizes() {
        assert_eq!("2".parse(), Ok(BatchSize::Machines(2)));
        assert_eq!("25%".parse(), Ok(BatchSize::Percent(25)));
        for bad in ["0", "0%", "101%", "-1", "x", "%"] {
            assert!(bad.parse::<BatchSize>().is_err(), "{bad}");
        }
        assert_eq!(BatchSize::Percent(25).of(10), 3);
        assert_eq!(BatchSize::Percent(1).of(3), 1);
        assert_eq!(BatchSize::Machines(4).of(2), 4);
    }
}
