//! Resolution: which host each machine deploys to and where it builds, with the source of
//! every choice, so a message can always say where a host came from.
//!
//! buildHost: `--build-host` > `inventory.machines.<m>.deploy.buildHost` >
//! `clan.core.networking.buildHost` > the target itself. `localhost` (also `127.0.0.1`,
//! `::1`, or `<you>@localhost`, with no port or options) builds on the workstation.
//! targetHost: `--target-host` > inventory `deploy.targetHost` > `clan.core.networking.targetHost`.
//!
//! An address without a user gets the `User` that the user's ssh config sets for that host
//! (`ssh -G`), else `root`, as clan does.

use std::fmt;
use std::process::Command;

use crate::boundary::{
    Builders, CacheSettings, CopyMode, MachineName, NixSystem, Origin, Refused, StoreDir, StorePath,
};
use crate::error::{Error, Hint};
use crate::eval::MachineFacts;
use crate::host::HostAddress;

/// Where a resolved value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag, e.g. `--build-host`.
    Flag(&'static str),
    /// `inventory.machines.<machine>.deploy.<attr>`.
    Inventory {
        /// Machine name.
        machine: String,
        /// `targetHost` or `buildHost`.
        attr: &'static str,
    },
    /// `clan.core.networking.<attr>` in the machine's configuration.
    MachineConfig {
        /// Machine name.
        machine: String,
        /// `targetHost` or `buildHost`.
        attr: &'static str,
    },
    /// Nothing set the target host: the default `root@<hostName>.<domain>` (clan-core's,
    /// from `meta.domain`).
    DomainDefault {
        /// Machine name.
        machine: String,
    },
    /// Nothing set the build host: build on the target.
    TargetFallback,
    /// Nothing set it: the default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, "{flag}"),
            Source::Inventory { machine, attr } => {
                write!(f, "inventory.machines.{machine}.deploy.{attr}")
            }
            Source::MachineConfig { machine, attr } => {
                write!(f, "clan.core.networking.{attr} in {machine}'s configuration")
            }
            Source::DomainDefault { machine } => write!(
                f,
                "the default of clan.core.networking.targetHost in {machine}'s configuration: root@<hostName>.<meta.domain>"
            ),
            Source::TargetFallback => f.write_str(
                "no buildHost set in --build-host, the inventory or clan.core.networking: building on the target",
            ),
            Source::Default => f.write_str("default"),
        }
    }
}

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved<T> {
    /// The value.
    pub value: T,
    /// Its source.
    pub source: Source,
}

/// Where a machine's system is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildLocation {
    /// On the workstation (`localhost`).
    Local,
    /// On the target itself: no second hop.
    Target,
    /// On a separate build host, which copies the closure to the target itself.
    Remote(HostAddress),
}

/// A machine with its hosts decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedMachine {
    /// Machine name.
    pub name: MachineName,
    /// Where the system goes, user filled in.
    pub target: Resolved<HostAddress>,
    /// Where the system is built.
    pub build: Resolved<BuildLocation>,
    /// Whether the workstation's ssh agent is forwarded to the build host.
    pub forward_agent: Resolved<bool>,
    /// The target's system, if the configuration names one.
    pub system: Option<NixSystem>,
    /// Nix remote builders behind the build host, and where they come from.
    pub builders: Option<Resolved<Builders>>,
    /// How the closure reaches the target, and why.
    pub copy_mode: Resolved<CopyMode>,
    /// The binary cache of `--copy-mode cache`.
    pub cache: Option<CacheSettings>,
    /// `deploy.healthCheck`: a shell command run on the target after activation.
    pub health_check: Option<String>,
    /// Its vars to upload straight to the target before activation (none: it has no
    /// secrets, or `--no-secrets`).
    pub secrets: Option<crate::vars::upload::SecretsUpload>,
    /// Its system (`config.system.build.toplevel`), when the command evaluated it: `machines
    /// update` does, the commands that only reach the machine (`show`, `rollback`, `vars
    /// upload`…) do not, so a flake whose systems cannot be built here is still served.
    pub toplevel: Option<Toplevel>,
}

/// A machine's system as the flake names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toplevel {
    /// `system.build.toplevel.drvPath`
    pub drv: StorePath,
    /// `system.build.toplevel.outPath`
    pub out: StorePath,
}

impl ResolvedMachine {
    /// The system's derivation. Only for a machine whose toplevel was evaluated: every
    /// deploy evaluates it and stops naming a machine without one (`check_outputs`).
    pub fn drv_path(&self) -> &StorePath {
        &self.system_paths().drv
    }

    /// The system's output path; see [`ResolvedMachine::drv_path`].
    pub fn out_path(&self) -> &StorePath {
        &self.system_paths().out
    }

    fn system_paths(&self) -> &Toplevel {
        self.toplevel
            .as_ref()
            .expect("a deploy evaluates every machine's toplevel before it plans")
    }
}

/// Command-line overrides that apply to every machine of a deploy.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--build-host`
    pub build_host: Option<String>,
    /// `--target-host`
    pub target_host: Option<String>,
    /// `--forward-agent` / `--no-forward-agent`
    pub forward_agent: Option<bool>,
    /// `--builders`
    pub builders: Option<String>,
    /// `--copy-mode`
    pub copy_mode: Option<CopyMode>,
    /// `--cache-upload`, `--cache-url`, `--cache-key`
    pub cache: CacheOverrides,
    /// The clan's directory, whose vars are uploaded (`None`: no upload).
    pub vars_repo: Option<std::path::PathBuf>,
}

/// The binary cache's settings given on the command line, each one on its own (the rest
/// come from the inventory).
#[derive(Debug, Clone, Default)]
pub struct CacheOverrides {
    /// `--cache-upload`
    pub upload: Option<String>,
    /// `--cache-url`
    pub url: Option<String>,
    /// `--cache-key`
    pub key: Option<String>,
}

/// Looks up the user an ssh config sets for an address that names none.
pub trait UserLookup {
    /// The `User` the user's ssh configuration sets for `addr`, if it sets one.
    fn configured_user(&self, addr: &HostAddress) -> Option<String>;
    /// The user running this tool (for `localhost`).
    fn local_user(&self) -> String;
}

/// [`UserLookup`] that asks `ssh -G`.
pub struct SshConfigLookup;

impl SshConfigLookup {
    /// Every setting the user's ssh configuration gives `addr` (`ssh -G`: lower-case
    /// keyword, value); the one place `ssh -G` runs.
    pub fn settings(addr: &HostAddress) -> Vec<(String, String)> {
        Self::ssh_g_all(&[], addr).unwrap_or_default()
    }

    /// Every setting `ssh -G ARGS` gives for `addr` (lower-case keyword, value).
    fn ssh_g_all(args: &[&str], addr: &HostAddress) -> Option<Vec<(String, String)>> {
        let mut cmd = Command::new("ssh");
        cmd.arg("-G").args(args);
        if let Some(user) = &addr.user {
            cmd.arg("-l").arg(user);
        }
        if let Some(port) = addr.port {
            cmd.arg("-p").arg(port.to_string());
        }
        for (name, value) in &addr.options {
            cmd.arg("-o").arg(format!("{name}={value}"));
        }
        let output = crate::process::run(cmd.arg("--").arg(&addr.host), None).ok()?;
        Some(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// One setting (lower-case keyword) of `ssh -G` for `addr`.
    fn ssh_g(args: &[&str], addr: &HostAddress, keyword: &str) -> Option<String> {
        Self::ssh_g_all(args, addr)?
            .into_iter()
            .find_map(|(k, v)| (k == keyword).then_some(v))
    }

    fn ssh_g_user(args: &[&str], addr: &HostAddress) -> Option<String> {
        Self::ssh_g(args, addr, "user")
    }

    /// What the user's ssh config (or the address's own options) already decides for
    /// `addr`, asked once: a ControlPath of its own, keep-alives of its own.
    pub fn own_settings(addr: &HostAddress) -> OwnSshSettings {
        let all = Self::settings(addr);
        let get = |key: &str| all.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        OwnSshSettings {
            control_path: get("controlpath").is_some_and(|p| p != "none"),
            keepalive: get("serveraliveinterval").is_some_and(|v| v != "0"),
        }
    }
}

/// Settings a host's ssh configuration makes itself, which clan then leaves alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnSshSettings {
    /// It sets a `ControlPath`: its own connection sharing is kept.
    pub control_path: bool,
    /// It sets `ServerAliveInterval`: clan adds no keep-alives of its own.
    pub keepalive: bool,
}

impl UserLookup for SshConfigLookup {
    fn configured_user(&self, addr: &HostAddress) -> Option<String> {
        // A User in the config shows as a difference from what ssh picks with no config.
        let with_config = Self::ssh_g_user(&[], addr)?;
        let without = Self::ssh_g_user(&["-F", "/dev/null"], addr)?;
        (with_config != without).then_some(with_config)
    }

    fn local_user(&self) -> String {
        std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| {
                let out = crate::process::run(Command::new("id").arg("-un"), None).ok()?;
                Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
            })
            .unwrap_or_else(|| "root".into())
    }
}

/// Parses `value` as a host address, naming it and its source on failure.
pub fn parse_address(value: &str, source: &Source) -> Result<HostAddress, Error> {
    value.parse().map_err(|e| {
        Error::usage(format!("invalid host address {value:?} in {source}: {e}")).hint(Hint::text(
            "the format is [user@]host[:port][?SSH_OPTION=VALUE&…], e.g. root@builder.example.com:22?IdentityFile=/path/to/key",
        ))
    })
}

/// The first of `candidates` that is set, parsed.
fn first_set(candidates: Candidates<String>) -> Result<Option<Resolved<HostAddress>>, Error> {
    for (source, value) in candidates {
        if let Some(value) = value {
            let value = parse_address(&value, &source)?;
            return Ok(Some(Resolved { value, source }));
        }
    }
    Ok(None)
}

fn fill_user(addr: HostAddress, users: &dyn UserLookup) -> HostAddress {
    if addr.user.is_some() {
        return addr;
    }
    let user = users
        .configured_user(&addr)
        .unwrap_or_else(|| "root".into());
    addr.with_default_user(&user)
}

/// The places a host setting can come from, highest priority first, with what each says.
pub type Candidates<T> = Vec<(Source, Option<T>)>;

/// Where targetHost can come from: `--target-host`, the inventory, the configuration.
pub fn target_candidates(
    name: &str,
    facts: &MachineFacts,
    overrides: &Overrides,
) -> Candidates<String> {
    vec![
        (Source::Flag("--target-host"), overrides.target_host.clone()),
        (
            inventory(name, "targetHost"),
            facts.inventory_target_host.clone(),
        ),
        (
            if facts.config_target_host_is_default {
                Source::DomainDefault {
                    machine: name.to_string(),
                }
            } else {
                config(name, "targetHost")
            },
            facts.config_target_host.clone(),
        ),
    ]
}

/// Where buildHost can come from: `--build-host`, the inventory, the configuration.
pub fn build_candidates(
    name: &str,
    facts: &MachineFacts,
    overrides: &Overrides,
) -> Candidates<String> {
    vec![
        (Source::Flag("--build-host"), overrides.build_host.clone()),
        (
            inventory(name, "buildHost"),
            facts.inventory_build_host.clone(),
        ),
        (config(name, "buildHost"), facts.config_build_host.clone()),
    ]
}

/// Where forwardAgent can come from: the flags, the inventory, the configuration.
pub fn forward_agent_candidates(
    name: &str,
    facts: &MachineFacts,
    overrides: &Overrides,
) -> Candidates<bool> {
    vec![
        (Source::Flag("--forward-agent"), overrides.forward_agent),
        (
            inventory(name, "forwardAgent"),
            facts.inventory_forward_agent,
        ),
        (config(name, "forwardAgent"), facts.config_forward_agent),
    ]
}

fn inventory(machine: &str, attr: &'static str) -> Source {
    Source::Inventory {
        machine: machine.to_string(),
        attr,
    }
}

fn config(machine: &str, attr: &'static str) -> Source {
    Source::MachineConfig {
        machine: machine.to_string(),
        attr,
    }
}

/// Decides target and build location for one machine.
pub fn resolve_machine(
    name: &MachineName,
    facts: &MachineFacts,
    store: &StoreDir,
    overrides: &Overrides,
    users: &dyn UserLookup,
) -> Result<ResolvedMachine, Error> {
    let attr = |what: &str| Origin::Flake(format!("machines.{name}.{what}"));
    let refused = |e: Refused| Error::usage(e.to_string());
    let system = facts
        .system
        .as_deref()
        .map(|s| NixSystem::parse(s, &attr("nixpkgs.hostPlatform")))
        .transpose()
        .map_err(refused)?;
    // Empty when the command did not evaluate the system (see `ResolvedMachine::toplevel`).
    let toplevel = if facts.drv_path.is_empty() && facts.out_path.is_empty() {
        None
    } else {
        Some(Toplevel {
            drv: StorePath::parse_drv(
                &facts.drv_path,
                store,
                &attr("config.system.build.toplevel.drvPath"),
            )
            .map_err(refused)?,
            out: StorePath::parse(
                &facts.out_path,
                store,
                &attr("config.system.build.toplevel.outPath"),
            )
            .map_err(refused)?,
        })
    };
    let health_check = match &facts.health_check {
        Some(check)
            if check.len() > 4096
                || check
                    .chars()
                    .any(|c| c.is_control() && c != '\n' && c != '\t') =>
        {
            return Err(Error::usage(format!(
                "invalid health check {check:?} (from the flake, inventory.machines.{name}.deploy.healthCheck): a shell command of at most 4096 characters, without control characters"
            )));
        }
        other => other.clone(),
    };
    let secrets = match (&overrides.vars_repo, &facts.vars) {
        (Some(root), Some(vars)) => {
            vars.check(name)?;
            let repo = crate::vars::Repo { root: root.clone() };
            if crate::vars::clan_core_store_of(vars).is_none() {
                repo.check_layout()?;
            }
            // Secrets without the key they were encrypted to: stop here (also in --dry-run),
            // before a new key could be made or anything uploaded.
            let secrets = repo.secrets_of(name);
            if !secrets.is_empty() && !repo.has_key(name) {
                return Err(repo.key_missing(name, &secrets));
            }
            crate::vars::upload::SecretsUpload::of(&repo, name, vars)
        }
        _ => None,
    };
    let builders = [
        (Source::Flag("--builders"), overrides.builders.clone()),
        (
            inventory(name, "builders"),
            facts.inventory_builders.clone(),
        ),
        (config(name, "builders"), facts.config_builders.clone()),
    ]
    .into_iter()
    .find_map(|(source, value)| value.map(|v| (source, v)))
    .map(|(source, value)| {
        let origin = match &source {
            Source::Flag(_) => Origin::CommandLine("--builders"),
            other => Origin::Flake(other.to_string()),
        };
        Builders::parse(&value, &origin)
            .map(|value| Resolved { value, source })
            .map_err(refused)
    })
    .transpose()?;
    let copy_mode = match (&overrides.copy_mode, &facts.inventory_copy_mode) {
        (Some(mode), _) => Resolved {
            value: *mode,
            source: Source::Flag("--copy-mode"),
        },
        (None, Some(mode)) => {
            let source = inventory(name, "copyMode");
            Resolved {
                value: CopyMode::parse(mode, &Origin::Flake(source.to_string()))
                    .map_err(refused)?,
                source,
            }
        }
        (None, None) => Resolved {
            value: CopyMode::Ssh,
            source: Source::Default,
        },
    };
    let cache = if copy_mode.value == CopyMode::Cache {
        let CacheOverrides { upload, url, key } = &overrides.cache;
        let pick =
            |flag: &Option<String>, inv: &Option<String>| flag.clone().or_else(|| inv.clone());
        match (
            pick(upload, &facts.inventory_cache_upload),
            pick(url, &facts.inventory_cache_url),
            pick(key, &facts.inventory_cache_key),
        ) {
            (Some(upload), Some(url), Some(key)) => Some(
                CacheSettings::parse(
                    &upload,
                    &url,
                    &key,
                    &Origin::Flake(format!(
                        "inventory.machines.{name}.deploy.cache or --cache-*"
                    )),
                )
                .map_err(refused)?,
            ),
            _ => {
                return Err(Error::usage(format!(
                    "{name}: --copy-mode cache ({}) needs a cache: its upload store, URL and public key",
                    copy_mode.source
                ))
                .hint(Hint::text(format!(
                    "set inventory.machines.{name}.deploy.cache.{{upload,url,publicKey}}, or pass --cache-upload, --cache-url and --cache-key; {} makes the key",
                    crate::hint::command("machines setup-cache", name.as_str(), &[])
                ))));
            }
        }
    } else {
        None
    };
    let name = name.as_str();
    let target = first_set(target_candidates(name, facts, overrides))?
        .ok_or_else(|| {
            Error::usage(format!("machine {name} has no targetHost")).hint(Hint::text(format!(
                "set inventory.machines.{name}.deploy.targetHost in clan.nix, clan.core.networking.targetHost in its configuration, or pass --target-host (with a domain, meta.domain or its networking.domain, it defaults to root@{name}.<domain>)"
            )))
        })?;
    let target = Resolved {
        value: fill_user(target.value, users),
        source: target.source,
    };

    let build = match first_set(build_candidates(name, facts, overrides))? {
        None => Resolved {
            value: BuildLocation::Target,
            source: Source::TargetFallback,
        },
        Some(Resolved { value, source }) if value.is_local(&users.local_user()) => Resolved {
            value: BuildLocation::Local,
            source,
        },
        Some(Resolved { value, source }) => {
            let value = fill_user(value, users);
            let same_as_target = value.destination() == target.value.destination()
                && value.port.unwrap_or(22) == target.value.port.unwrap_or(22);
            Resolved {
                value: if same_as_target {
                    BuildLocation::Target
                } else {
                    BuildLocation::Remote(value)
                },
                source,
            }
        }
    };

    let forward_agent = forward_agent_candidates(name, facts, overrides)
        .into_iter()
        .find_map(|(source, value)| value.map(|value| Resolved { value, source }))
        .unwrap_or(Resolved {
            value: false,
            source: Source::Default,
        });

    Ok(ResolvedMachine {
        name: MachineName::parse(name, &Origin::Flake("machines".into())).map_err(refused)?,
        target,
        build,
        forward_agent,
        system,
        builders,
        copy_mode,
        cache,
        health_check,
        secrets,
        toplevel,
    })
}

/// Checks a machine name given on the command line before it goes anywhere.
pub fn check_machine_name(name: &str) -> Result<MachineName, Error> {
    MachineName::parse(name, &Origin::CommandLine("the command line"))
        .map_err(|e| Error::usage(e.to_string()))
}

/// One line saying where a machine builds and why.
pub fn describe_build(machine: &ResolvedMachine) -> String {
    let name = &machine.name;
    match &machine.build.value {
        BuildLocation::Local => format!(
            "{name}: build on this machine (localhost) ({})",
            machine.build.source
        ),
        BuildLocation::Target => format!(
            "{name}: build on the target {} ({})",
            machine.target.value, machine.build.source
        ),
        BuildLocation::Remote(addr) => {
            format!("{name}: build on {addr} ({})", machine.build.source)
        }
    }
}

/// The warning printed when the agent is forwarded to a build host, if it is.
pub fn describe_forward_agent(machine: &ResolvedMachine) -> Option<String> {
    match (&machine.build.value, machine.forward_agent.value) {
        (BuildLocation::Remote(addr), true) => Some(format!(
            "warning: {}: your ssh agent is forwarded to the build host {addr} ({}): root there can use your keys while the deploy runs",
            machine.name, machine.forward_agent.source
        )),
        _ => None,
    }
}

/// One line saying where a machine deploys to and why.
pub fn describe_target(machine: &ResolvedMachine) -> String {
    format!(
        "{}: deploy to {} ({})",
        machine.name, machine.target.value, machine.target.source
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> MachineName {
        MachineName::parse(n, &Origin::CommandLine("test")).unwrap()
    }

    struct Users(Option<&'static str>);
    impl UserLookup for Users {
        fn configured_user(&self, _: &HostAddress) -> Option<String> {
            self.0.map(str::to_string)
        }
        fn local_user(&self) -> String {
            "alice".into()
        }
    }

    fn facts(inv_t: Option<&str>, inv_b: Option<&str>, cfg_b: Option<&str>) -> MachineFacts {
        MachineFacts {
            inventory_target_host: inv_t.map(Into::into),
            inventory_build_host: inv_b.map(Into::into),
            config_target_host: None,
            config_build_host: cfg_b.map(Into::into),
            inventory_forward_agent: None,
            config_forward_agent: None,
            system: Some("x86_64-linux".into()),
            require_explicit_update: false,
            warnings: Vec::new(),
            drv_path: "/nix/store/00000000000000000000000000000000-a.drv".into(),
            out_path: "/nix/store/00000000000000000000000000000000-a".into(),
            ..Default::default()
        }
    }

    fn build(f: &MachineFacts, cli: Option<&str>) -> Result<Resolved<BuildLocation>, Error> {
        let overrides = Overrides {
            build_host: cli.map(Into::into),
            ..Overrides::default()
        };
        resolve_machine(
            &name("m"),
            f,
            &StoreDir::default(),
            &overrides,
            &Users(None),
        )
        .map(|m| m.build)
    }

    #[test]
    fn build_host_precedence() {
        let all = facts(Some("root@t"), Some("root@inv"), Some("root@cfg"));
        let remote = |s: &str| BuildLocation::Remote(s.parse().unwrap());
        assert_eq!(
            build(&all, Some("root@cli")).unwrap().value,
            remote("root@cli")
        );
        assert_eq!(
            build(&all, None).unwrap(),
            Resolved {
                value: remote("root@inv"),
                source: Source::Inventory {
                    machine: "m".into(),
                    attr: "buildHost"
                }
            }
        );
        let cfg_only = facts(Some("root@t"), None, Some("root@cfg"));
        assert_eq!(
            build(&cfg_only, None).unwrap().source.to_string(),
            "clan.core.networking.buildHost in m's configuration"
        );
        let none = facts(Some("root@t"), None, None);
        assert_eq!(build(&none, None).unwrap().value, BuildLocation::Target);
        assert_eq!(
            build(&all, Some("localhost")).unwrap().value,
            BuildLocation::Local
        );
        assert_eq!(
            build(&all, Some("alice@localhost")).unwrap().value,
            BuildLocation::Local
        );
        assert_eq!(
            build(&all, Some("root@localhost")).unwrap().value,
            remote("root@localhost")
        );
        // Naming the target as build host is building on the target.
        assert_eq!(build(&all, Some("t")).unwrap().value, BuildLocation::Target);
    }

    #[test]
    fn missing_target_names_all_three_places() {
        let err = resolve_machine(
            &name("m"),
            &facts(None, None, None),
            &StoreDir::default(),
            &Overrides::default(),
            &Users(None),
        )
        .unwrap_err();
        assert_eq!(err.exit, crate::error::ExitKind::Usage);
        let text = err.to_string();
        for place in [
            "inventory.machines.m.deploy.targetHost",
            "clan.core.networking.targetHost",
            "--target-host",
        ] {
            assert!(text.contains(place), "{text}");
        }
    }

    #[test]
    fn bad_inventory_value_names_value_and_source() {
        let err = build(&facts(Some("root@t"), Some("root@b:99999"), None), None).unwrap_err();
        assert!(err.message.contains("\"root@b:99999\""), "{}", err.message);
        assert!(
            err.message
                .contains("inventory.machines.m.deploy.buildHost")
        );
        assert!(err.message.contains("port"));
    }

    #[test]
    fn default_user_comes_from_ssh_config_else_root() {
        let f = facts(Some("t"), None, None);
        let m = resolve_machine(
            &name("m"),
            &f,
            &StoreDir::default(),
            &Overrides::default(),
            &Users(None),
        )
        .unwrap();
        assert_eq!(m.target.value.user.as_deref(), Some("root"));
        let m = resolve_machine(
            &name("m"),
            &f,
            &StoreDir::default(),
            &Overrides::default(),
            &Users(Some("deploy")),
        )
        .unwrap();
        assert_eq!(m.target.value.user.as_deref(), Some("deploy"));
    }

    #[test]
    fn forward_agent_precedence() {
        let mut f = facts(Some("root@t"), Some("root@b"), None);
        let resolve = |f: &MachineFacts, cli| {
            let o = Overrides {
                forward_agent: cli,
                ..Overrides::default()
            };
            resolve_machine(&name("m"), f, &StoreDir::default(), &o, &Users(None))
                .unwrap()
                .forward_agent
        };
        assert!(!resolve(&f, None).value);
        assert_eq!(resolve(&f, None).source, Source::Default);
        f.config_forward_agent = Some(true);
        assert_eq!(
            resolve(&f, None).source.to_string(),
            "clan.core.networking.forwardAgent in m's configuration"
        );
        f.inventory_forward_agent = Some(false);
        assert!(!resolve(&f, None).value);
        assert!(resolve(&f, Some(true)).value);
        assert_eq!(
            resolve(&f, Some(true)).source,
            Source::Flag("--forward-agent")
        );
    }

    #[test]
    fn machine_names_are_checked() {
        assert!(check_machine_name("web-01.prod_a").is_ok());
        for bad in ["", "-x", "a;b", "$(id)", "a\nb", "a b"] {
            assert!(check_machine_name(bad).is_err(), "{bad:?}");
        }
    }
}
