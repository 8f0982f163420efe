//! Preflight: before anything is copied or built, check every hop of every machine the way
//! the deploy will use it, in one probe per host (through the shared connection):
//! the workstation can log in to the build host and the target without a prompt; the build
//! host can log in to the target with the options and host key policy of the copy; the build
//! host's Nix can build the target's system; Nix exists on both; the target's system profile
//! can be set. Every failure is reported with its hop and its fix, before any build starts.

use std::collections::BTreeMap;
use std::process::Command;

use crate::boundary::MachineName;
use crate::connection::Connections;
use crate::diagnostics::{Hop, SshFailure, ssh_error, ssh_failure};
use crate::error::{Error, Hint};
use crate::plan::{DeployPlan, PlanContext, connection_key};
use crate::resolve::{BuildLocation, ResolvedMachine};
use crate::ssh::{Invocation, RemoteCommand, Side, SshHost, parse_probes};

/// Whether the system profile can be set (`src/scripts/profile-writable.sh`).
const PROFILE_WRITABLE: &str = include_str!("scripts/profile-writable.sh");

/// Probe names.
const NIX: &str = "nix";
const SYSTEM: &str = "system";
const CONFIG: &str = "config";
const PROFILE: &str = "profile";
const CACHE_PING: &str = "cache-";

/// Where a probe runs.
#[derive(Debug, Clone)]
enum ProbeHost {
    Local,
    Remote(SshHost),
}

impl ProbeHost {
    fn key(&self) -> String {
        match self {
            ProbeHost::Local => "localhost".into(),
            ProbeHost::Remote(host) => connection_key(&host.address),
        }
    }
}

/// Results of all probes on one host: login failure, or each probe's status and output.
type HostResults = Result<BTreeMap<String, (i32, String)>, String>;

fn nested_probe_name(target: &SshHost) -> String {
    format!("hop-{}", connection_key(&target.address))
}

/// The host's Nix settings (`system`, `extra-platforms`, `trusted-public-keys`);
/// `show-config` exists from Nix 2.8 to today's.
fn nix_config() -> Invocation {
    Invocation::new(
        "nix",
        [
            "--extra-experimental-features",
            "nix-command",
            "show-config",
        ],
    )
}

fn builder_probe_name(builder: &crate::boundary::BuilderSpec) -> String {
    format!("nixbuilder-{}", connection_key(&builder.address))
}

/// The probes one host runs: what it needs to be a build host or a target, and, run apart
/// so they overlap, its second hops.
#[derive(Default)]
struct Probes(Vec<(String, Invocation)>, Vec<(String, Invocation)>);

impl Probes {
    fn add(&mut self, name: &str, inv: Invocation) {
        if !self.0.iter().any(|(n, _)| n == name) {
            self.0.push((name.to_string(), inv));
        }
    }

    fn as_builder(&mut self) {
        self.add(NIX, Invocation::new("nix-store", ["--version"]));
        self.add(
            SYSTEM,
            Invocation::new(
                "nix-instantiate",
                ["--eval", "--json", "-E", "builtins.currentSystem"],
            ),
        );
        // Only to read extra-platforms.
        self.add(CONFIG, nix_config());
    }

    /// A target that substitutes from `cache`: its Nix settings (trusted-public-keys) and
    /// whether it reaches the cache.
    fn as_cache_client(&mut self, cache: &crate::boundary::CacheSettings) {
        self.add(CONFIG, nix_config());
        self.add(
            &format!("{CACHE_PING}{}", cache.url),
            Invocation::new(
                "nix",
                [
                    "--extra-experimental-features",
                    "nix-command",
                    "store",
                    "ping",
                    "--store",
                    cache.url.as_str(),
                ],
            ),
        );
    }

    /// `root`: the profile is set as this user; otherwise through sudo, already checked.
    fn as_target(&mut self, root: bool) {
        self.add(NIX, Invocation::new("nix-store", ["--version"]));
        if !root {
            return;
        }
        // The first existing directory on the way to the profiles must be writable.
        self.add(
            PROFILE,
            Invocation::new("sh", ["-c", PROFILE_WRITABLE, "clan-profile-writable"]),
        );
    }

    /// The build host logs in to each Nix builder as Nix's build hook will (the third hop):
    /// the builder's key file if the spec names one, the host key policy, no prompts; and
    /// runs `nix-store --version` there.
    fn as_third_hop_to(
        &mut self,
        builder: &crate::boundary::BuilderSpec,
        policy: crate::ssh::HostKeyCheck,
    ) {
        let mut argv = vec!["-T".to_string(), "-x".into()];
        if let Some(port) = builder.address.port {
            argv.extend(["-p".into(), port.to_string()]);
        }
        if let Some(key) = builder.fields.get(1).filter(|k| *k != "-") {
            argv.extend(["-i".into(), key.clone()]);
        }
        for (k, v) in policy.ssh_options() {
            argv.extend(["-o".into(), format!("{k}={v}")]);
        }
        argv.extend([
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "ConnectTimeout=15".into(),
            "--".into(),
            builder.address.destination(),
            "nix-store --version".into(),
        ]);
        let name = builder_probe_name(builder);
        if !self.1.iter().any(|(n, _)| *n == name) {
            self.1.push((name, Invocation::new("ssh", argv)));
        }
    }

    /// The build host logs in to the target exactly as the copy will: same options, same
    /// host key policy, no prompts.
    /// With a shared connection (`hop_control`), its private directory `dir` is made first.
    fn as_second_hop_to(&mut self, target: &SshHost, dir: &str) {
        let mut argv = vec![
            "-c".to_string(),
            crate::plan::HOP_DIR.to_string(),
            "clan-hop-dir".into(),
            dir.into(),
            "ssh".into(),
            "-T".into(),
            "-x".into(),
        ];
        argv.extend(target.option_flags(Side::Nested));
        argv.extend(["-o".into(), "ConnectTimeout=15".into(), "--".into()]);
        argv.push(target.address.destination());
        argv.push("true".into());
        let name = nested_probe_name(target);
        if !self.1.iter().any(|(n, _)| *n == name) {
            self.1.push((name, Invocation::new("sh", argv)));
        }
    }
}

/// What the preflight found.
#[derive(Debug, Default)]
pub struct Findings {
    /// One error per problem, with the machine whose hops it is about.
    pub problems: Vec<(MachineName, Error)>,
    /// Each build host's own `max-jobs`, by connection key (`localhost` for this machine).
    pub max_jobs: BTreeMap<String, u32>,
}

/// `max-jobs` from `nix show-config`'s output.
fn max_jobs_setting(config: &str) -> Option<u32> {
    config
        .lines()
        .find_map(|l| l.strip_prefix("max-jobs = "))
        .and_then(|v| v.trim().parse().ok())
}

/// What each target host of `plan`'s machines is checked for (its own probes, by connection
/// key): the up-to-date check asks them in its round trip, and the preflight takes the
/// answers ([`run`]'s `answered`).
pub fn target_probes(
    plan: &DeployPlan,
    ctx: &PlanContext,
) -> BTreeMap<String, Vec<(String, Invocation)>> {
    let targets: Vec<String> = plan
        .machines
        .iter()
        .map(|m| connection_key(&ctx.ssh_host(&m.machine.target.value, false).address))
        .collect();
    // Only what a target answers at once, from its own store: a no-op deploy asks them too.
    probes_by_host(plan, ctx)
        .into_iter()
        .filter(|(key, _)| targets.contains(key))
        .map(|(key, (_, probes))| {
            let cheap = probes
                .0
                .into_iter()
                .filter(|(name, _)| name == NIX || name == PROFILE)
                .collect();
            (key, cheap)
        })
        .collect()
}

/// Runs the preflight for every machine of `plan`. `answered`: hosts whose own probes were
/// answered already (in the up-to-date check's round trip), by connection key: they are not
/// asked again when every probe of theirs is there.
pub fn run(
    plan: &DeployPlan,
    ctx: &PlanContext,
    connections: &Connections,
    answered: &BTreeMap<String, BTreeMap<String, (i32, String)>>,
) -> Findings {
    let hosts = probes_by_host(plan, ctx);
    // Every host's own probes that were not answered yet, and each second hop apart (they
    // may each wait on a slow target), all at once; the second hops share their build host's
    // connection.
    let results: BTreeMap<String, HostResults> = std::thread::scope(|scope| {
        let handles: Vec<_> = hosts
            .iter()
            .flat_map(|(key, (host, probes))| {
                let own: Vec<(String, Invocation)> = probes
                    .0
                    .iter()
                    .filter(|(name, _)| !answered.get(key).is_some_and(|a| a.contains_key(name)))
                    .cloned()
                    .collect();
                (!own.is_empty())
                    .then_some(own)
                    .into_iter()
                    .chain(probes.1.iter().map(|hop| vec![hop.clone()]))
                    .map(move |list| {
                        scope.spawn(move || (key.clone(), probe(host, list, connections)))
                    })
            })
            .collect();
        let mut merged: BTreeMap<String, HostResults> = hosts
            .keys()
            .filter_map(|key| Some((key.clone(), Ok(answered.get(key)?.clone()))))
            .collect();
        for handle in handles {
            let (key, result) = handle.join().expect("probe thread");
            match (merged.get_mut(&key), result) {
                (None, result) => {
                    merged.insert(key, result);
                }
                (Some(Ok(all)), Ok(more)) => all.extend(more),
                (Some(slot @ Ok(_)), Err(e)) => *slot = Err(e),
                (Some(Err(_)), _) => {}
            }
        }
        merged
    });

    let mut findings = Findings::default();
    for m in &plan.machines {
        let name = &m.machine.name;
        findings.problems.extend(
            check_machine(&m.machine, ctx, &results)
                .into_iter()
                .map(|problem| (name.clone(), problem)),
        );
    }
    for (key, result) in &results {
        if let Ok(probes) = result
            && let Some((0, config)) = probes.get(CONFIG)
            && let Some(n) = max_jobs_setting(config)
        {
            findings.max_jobs.insert(key.clone(), n);
        }
    }
    findings
}

/// What each host of `plan` must be checked for, by connection key.
fn probes_by_host(plan: &DeployPlan, ctx: &PlanContext) -> BTreeMap<String, (ProbeHost, Probes)> {
    // Collect what each host must be checked for.
    let mut hosts: BTreeMap<String, (ProbeHost, Probes)> = BTreeMap::new();
    // `build`: only the hops to where it builds (a target that builds for itself included).
    let reaches_target = ctx.activation.action.reaches_target();
    for m in &plan.machines {
        let machine = &m.machine;
        let target = ctx.ssh_host(&machine.target.value, false);
        let root = target.address.user.as_deref().is_none_or(|u| u == "root");
        if reaches_target {
            let target_probes = probes_of(&mut hosts, ProbeHost::Remote(target.clone()));
            target_probes.as_target(root);
            if let Some(cache) = &machine.cache {
                target_probes.as_cache_client(cache);
            }
        }
        let build_probes = match &machine.build.value {
            BuildLocation::Target => {
                let probes = probes_of(&mut hosts, ProbeHost::Remote(target));
                probes.as_builder();
                probes
            }
            BuildLocation::Local => {
                let probes = probes_of(&mut hosts, ProbeHost::Local);
                probes.as_builder();
                probes
            }
            BuildLocation::Remote(address) => {
                let builder = probes_of(
                    &mut hosts,
                    ProbeHost::Remote(ctx.ssh_host(address, machine.forward_agent.value)),
                );
                builder.as_builder();
                if reaches_target && !ctx.copy_via_workstation && machine.cache.is_none() {
                    // The login opens the build host's shared connection the copy will use.
                    let mut hop = target.clone();
                    let dir = crate::plan::hop_dir(&ctx.scratch_id(), m.group);
                    hop.hop_control = Some(format!("{dir}/%C"));
                    builder.as_second_hop_to(&hop, &dir);
                }
                builder
            }
        };
        if let Some(builders) = &machine.builders {
            for spec in builders.value.specs() {
                build_probes.as_third_hop_to(spec, ctx.host_key_check);
            }
        }
    }

    hosts
}

fn probes_of(hosts: &mut BTreeMap<String, (ProbeHost, Probes)>, host: ProbeHost) -> &mut Probes {
    let key = host.key();
    &mut hosts.entry(key).or_insert((host, Probes::default())).1
}

fn probe(
    host: &ProbeHost,
    probes: Vec<(String, Invocation)>,
    connections: &Connections,
) -> HostResults {
    let script = RemoteCommand::Probes(probes);
    let (argv, session) = match host {
        ProbeHost::Local => (
            vec!["sh".to_string(), "-c".into(), script.to_shell()],
            connections.session_free(),
        ),
        ProbeHost::Remote(ssh) => {
            connections.open(ssh)?;
            (
                ssh.ssh_argv(Side::WorkstationBatch, &script),
                connections.session(ssh),
            )
        }
    };
    let output = session
        .run(|| crate::process::run(Command::new(&argv[0]).args(&argv[1..]), None))
        .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    let parsed = parse_probes(&String::from_utf8_lossy(&output.stdout));
    if parsed.is_empty() {
        // Nothing ran: the login itself failed.
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(parsed)
}

fn check_machine(
    machine: &ResolvedMachine,
    ctx: &PlanContext,
    results: &BTreeMap<String, HostResults>,
) -> Vec<Error> {
    let name = &machine.name;
    let target = ctx.ssh_host(&machine.target.value, false);
    let target_label = target.address.to_string();
    let mut errors = Vec::new();
    let get = |key: &str| results.get(key).expect("every host was probed");

    // Workstation → target (not probed for `build`, unless it builds there).
    let target_results = results.get(&connection_key(&target.address));
    let target_reachable = target_results.is_some_and(Result::is_ok);
    match target_results {
        None => {}
        Some(Err(raw)) => errors.push(login_error(name, &target_label, raw)),
        Some(Ok(probes)) => {
            if failed(probes, NIX) {
                errors.push(
                    Error::new(format!(
                        "preflight: {name}: nix is not installed or not on PATH on the target {target_label}"
                    ))
                    .detail(output(probes, NIX))
                    .hint(Hint::text("the target must run Nix (NixOS does)"))
                    .code("preflight.target-without-nix"),
                );
            }
            if let Some(cache) = &machine.cache {
                let ping = format!("{CACHE_PING}{}", cache.url);
                if failed(probes, &ping) {
                    errors.push(
                        Error::new(format!(
                            "preflight: {name}: the target {target_label} cannot reach the binary cache {}",
                            cache.url
                        ))
                        .detail(output(probes, &ping))
                        .hint(Hint::text(
                            "the target substitutes from the cache itself: check the URL from the target's side (deploy.cache.url), or deploy with --copy-mode ssh",
                        ))
                        .code("preflight.cache-unreachable"),
                    );
                }
                let trusted = output(probes, CONFIG)
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .filter(|(k, _)| k.trim() == "trusted-public-keys")
                    .any(|(_, v)| v.split_whitespace().any(|k| k == cache.public_key));
                if !trusted {
                    errors.push(
                        Error::new(format!(
                            "preflight: {name}: the target {target_label} does not trust the binary cache's key {}",
                            cache.public_key
                        ))
                        .hint(Hint::text(format!(
                            "in the machine's NixOS configuration: nix.settings.trusted-public-keys = [ \"{}\" ]; (and nix.settings.substituters = [ \"{}\" ]; to use it for everything); deploy that with --copy-mode ssh once",
                            cache.public_key, cache.url
                        )))
                        .code("preflight.cache-key-untrusted"),
                    );
                }
            }
            if failed(probes, PROFILE) {
                errors.push(
                    Error::new(format!(
                        "preflight: {name}: user {} cannot set the system profile on the target {target_label} (/nix/var/nix/profiles is not writable)",
                        target.address.user.as_deref().unwrap_or("root")
                    ))
                    .hint(Hint::text(format!(
                        "deploy as root: set deploy.targetHost = \"root@{}\"",
                        target.address.host_for_url()
                    )))
                    .code("preflight.profile-not-writable"),
                );
            }
        }
    }

    // The build host.
    let (builder_key, builder_label) = match &machine.build.value {
        BuildLocation::Target => (connection_key(&target.address), target_label.clone()),
        BuildLocation::Local => ("localhost".to_string(), "this machine".to_string()),
        BuildLocation::Remote(address) => (connection_key(address), address.to_string()),
    };
    match get(&builder_key) {
        Err(raw) => {
            if !matches!(machine.build.value, BuildLocation::Target) {
                errors.push(login_error(name, &builder_label, raw));
            }
        }
        Ok(probes) => {
            if failed(probes, NIX) {
                errors.push(
                    Error::new(format!(
                        "preflight: {name}: nix is not installed or not on PATH on the build host {builder_label}"
                    ))
                    .detail(output(probes, NIX))
                    .code("preflight.build-host-without-nix"),
                );
            } else if let Some(error) = system_error(machine, &builder_label, probes) {
                errors.push(error);
            }
            for spec in machine.builders.iter().flat_map(|b| b.value.specs()) {
                let hop = builder_probe_name(spec);
                if failed(probes, &hop) {
                    errors.push(third_hop_error(
                        name,
                        &builder_label,
                        spec,
                        &output(probes, &hop),
                    ));
                }
                let systems = spec.fields.first().filter(|s| *s != "-");
                if let (Some(systems), Some(wanted)) = (systems, &machine.system)
                    && !systems.split(',').any(|s| s == wanted.as_str())
                {
                    errors.push(Error::new(format!(
                        "preflight: {name}: the Nix builder {} builds for {systems}, but the target is {wanted}",
                        spec.address
                    )).hint(Hint::text("name a builder of the target's system, or add it to that builder's systems field")).code("preflight.builder-system-mismatch"));
                }
            }
            if let BuildLocation::Remote(_) = &machine.build.value
                && !ctx.copy_via_workstation
                && machine.cache.is_none()
            {
                let hop = nested_probe_name(&target);
                if failed(probes, &hop) {
                    errors.push(second_hop_error(
                        name,
                        &builder_label,
                        &target_label,
                        &output(probes, &hop),
                        target_reachable,
                    ));
                }
            }
        }
    }
    errors
}

fn failed(probes: &BTreeMap<String, (i32, String)>, name: &str) -> bool {
    probes.get(name).is_some_and(|(status, _)| *status != 0)
}

fn output(probes: &BTreeMap<String, (i32, String)>, name: &str) -> String {
    probes
        .get(name)
        .map(|(_, out)| out.trim_end().to_string())
        .unwrap_or_default()
}

fn login_error(name: &str, host: &str, raw: &str) -> Error {
    let failure = ssh_failure(raw).unwrap_or(SshFailure::Unreachable);
    ssh_error(
        name,
        host,
        host,
        &Hop::WorkstationTo(host.to_string()),
        failure,
        raw,
        |m| Error::new(format!("preflight: {m}")).detail(raw.trim_end()),
    )
}

fn second_hop_error(
    name: &str,
    builder: &str,
    target: &str,
    raw: &str,
    target_reachable_from_workstation: bool,
) -> Error {
    let failure = ssh_failure(raw).unwrap_or(SshFailure::Unreachable);
    let mut error = ssh_error(
        name,
        builder,
        target,
        &Hop::BuilderToTarget,
        failure,
        raw,
        |m| Error::new(format!("preflight: {m}")).detail(raw.trim_end()),
    );
    if failure == SshFailure::Unreachable && target_reachable_from_workstation {
        error = error.hint(Hint::text(format!(
            "this workstation reaches the target: copy through it with {}",
            crate::hint::command("machines update", name, &["--copy-via-workstation"])
        )));
    }
    error
}

/// The build host's systems (`system` plus `extra-platforms`) must include the target's.
fn system_error(
    machine: &ResolvedMachine,
    builder: &str,
    probes: &BTreeMap<String, (i32, String)>,
) -> Option<Error> {
    let wanted = machine.system.as_deref()?;
    let (status, out) = probes.get(SYSTEM)?;
    if *status != 0 {
        return None;
    }
    let system: String = serde_json::from_str(out.trim()).ok()?;
    let extra: Vec<String> = probes
        .get(CONFIG)
        .filter(|(status, _)| *status == 0)
        .and_then(|(_, config)| {
            config
                .lines()
                .find_map(|l| l.strip_prefix("extra-platforms = "))
                .map(|v| v.split_whitespace().map(str::to_string).collect())
        })
        .unwrap_or_default();
    if system == wanted || extra.iter().any(|p| p == wanted) {
        return None;
    }
    let name = &machine.name;
    Some(
        Error::new(format!(
            "preflight: {name}: the build host {builder} builds {system} systems (extra platforms: {}) and cannot build this {wanted} system",
            if extra.is_empty() { "none".to_string() } else { extra.join(", ") }
        ))
        .hint(Hint::text(format!(
            "pick a build host whose system is {wanted} (deploy.buildHost in the inventory, or --build-host)"
        )))
        .hint(Hint::text(format!(
            "or build on this workstation: {}",
            crate::hint::command("machines update", name.as_str(), &["--build-host", "localhost"])
        )))
        .code("preflight.system-mismatch"),
    )
}

/// The third hop failed: the build host cannot use a Nix builder as Nix's build hook would.
fn third_hop_error(
    name: &str,
    build_host: &str,
    builder: &crate::boundary::BuilderSpec,
    raw: &str,
) -> Error {
    let b = builder.address.to_string();
    let host = builder.address.host_for_url();
    let base = |m: String| Error::new(format!("preflight: {m}")).detail(raw.trim_end());
    let code = match ssh_failure(raw) {
        Some(SshFailure::HostKey) => "third-hop.host-key-unknown",
        Some(SshFailure::ChangedHostKey) => "third-hop.host-key-changed",
        Some(SshFailure::PermissionDenied) => "third-hop.permission-denied",
        _ if raw.contains("nix-store") && raw.contains("not found") => {
            "third-hop.builder-without-nix"
        }
        _ => "third-hop.unreachable",
    };
    let error = match ssh_failure(raw) {
        Some(SshFailure::HostKey) => base(format!(
            "{name}: host key verification failed on the third hop (build host {build_host} → Nix builder {b}): the build host has no known_hosts entry for the builder"
        ))
        .hint(Hint::text(format!(
            "record it on the build host after checking it: ssh {build_host} 'ssh-keyscan {host} >> ~/.ssh/known_hosts', or re-run with --host-key-check accept-new"
        ))),
        Some(SshFailure::ChangedHostKey) => base(format!(
            "{name}: the Nix builder {b} presented a different host key to the build host {build_host} than the one it knows: someone may be impersonating it"
        ))
        .hint(Hint::text(format!(
            "check the builder's real key; only if it is the real one: ssh {build_host} 'ssh-keygen -R {host}'"
        ))),
        Some(SshFailure::PermissionDenied) => base(format!(
            "{name}: permission denied on the third hop (build host {build_host} → Nix builder {b}): the build host has no key that the builder accepts"
        ))
        .hint(Hint::text(format!(
            "authorize the build host's key for {} on {host}, or name a key in the builder's third field",
            builder.address.user.as_deref().unwrap_or("root")
        ))),
        _ if raw.contains("nix-store") && raw.contains("not found") => base(format!(
            "{name}: the Nix builder {b} has no nix-store on its PATH"
        )),
        _ => base(format!(
            "{name}: the build host {build_host} cannot reach the Nix builder {b}"
        ))
        .hint(Hint::text("the build host opens its own ssh connection to each builder: check the address and that it is reachable from there")),
    };
    error.code(code)
}

#[cfg(test)]
mod tests {
    use super::max_jobs_setting;

    #[test]
    fn max_jobs_is_read_from_show_config() {
        let config = "keep-going = false\nmax-free = 0\nmax-jobs = 4\nmax-silent-time = 0\n";
        assert_eq!(max_jobs_setting(config), Some(4));
        assert_eq!(max_jobs_setting("max-jobs = 0\n"), Some(0));
        assert_eq!(max_jobs_setting("max-free = 12\n"), None);
        assert_eq!(max_jobs_setting("max-jobs = auto\n"), None);
    }
}
