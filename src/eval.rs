//! Flake evaluation on the workstation: a cheap `nix eval --json` of the clan's names, tags
//! and selection, then the selected machines by evaluation workers, several machines in one
//! `nix eval` each. The build host never evaluates, so private flake inputs are only fetched here.

use std::collections::BTreeMap;
use std::process::Command;

use serde::Deserialize;

use crate::error::{Error, Hint};

/// Everything the deploy needs to know about one machine, as written in the flake.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineFacts {
    /// `inventory.machines.<m>.machineClass` (`nixos` when unset): this tool deploys NixOS
    /// machines only.
    #[serde(default)]
    pub machine_class: Option<String>,
    /// `inventory.machines.<m>.deploy.targetHost`
    pub inventory_target_host: Option<String>,
    /// `inventory.machines.<m>.deploy.buildHost`
    pub inventory_build_host: Option<String>,
    /// `clan.core.networking.targetHost`
    pub config_target_host: Option<String>,
    /// Whether that is the option's default (`root@<hostName>.<domain>`, the domain being the
    /// clan's `meta.domain` unless the machine sets its own): nothing defined it.
    #[serde(default)]
    pub config_target_host_is_default: bool,
    /// `clan.core.networking.buildHost`
    pub config_build_host: Option<String>,
    /// `inventory.machines.<m>.deploy.forwardAgent`
    #[serde(default)]
    pub inventory_forward_agent: Option<bool>,
    /// `clan.core.networking.forwardAgent`
    #[serde(default)]
    pub config_forward_agent: Option<bool>,
    /// The target's system (`nixpkgs.hostPlatform`, `nixpkgs.system` or the toplevel's).
    pub system: Option<String>,
    /// `inventory.machines.<m>.deploy.copyMode`
    #[serde(default)]
    pub inventory_copy_mode: Option<String>,
    /// `inventory.machines.<m>.deploy.cache.upload`
    #[serde(default)]
    pub inventory_cache_upload: Option<String>,
    /// `inventory.machines.<m>.deploy.cache.url`
    #[serde(default)]
    pub inventory_cache_url: Option<String>,
    /// `inventory.machines.<m>.deploy.cache.publicKey`
    #[serde(default)]
    pub inventory_cache_key: Option<String>,
    /// `inventory.machines.<m>.deploy.builders`
    #[serde(default)]
    pub inventory_builders: Option<String>,
    /// `clan.core.networking.builders`
    #[serde(default)]
    pub config_builders: Option<String>,
    /// `inventory.machines.<m>.deploy.healthCheck`: run on the target after activation.
    #[serde(default)]
    pub health_check: Option<String>,
    /// `inventory.machines.<m>.requireExplicitUpdate` or
    /// `clan.core.deployment.requireExplicitUpdate`: left out unless named.
    #[serde(default)]
    pub require_explicit_update: bool,
    /// The configuration's `warnings` (NixOS shows them at build time; so does clan).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// `clan.core.vars`, when the machine declares generators.
    #[serde(default)]
    pub vars: Option<crate::vars::MachineVars>,
    /// `system.build.toplevel.drvPath`
    #[serde(rename = "toplevelDrv")]
    pub drv_path: String,
    /// `system.build.toplevel.outPath`
    #[serde(rename = "toplevelOut")]
    pub out_path: String,
}

/// A flake as `nix eval` is given it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlakeRef {
    /// The reference on nix's command line.
    pub reference: String,
    /// The directory nix runs in (the reference is then `.`).
    pub dir: Option<std::path::PathBuf>,
    /// For messages.
    pub shown: String,
}

/// The result of evaluating a flake for a deploy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Evaluation {
    /// Every machine the flake defines.
    pub machines: Vec<String>,
    /// Tags of each machine from the inventory.
    pub tags: BTreeMap<String, Vec<String>>,
    /// Facts for the requested machines (all of them when none were requested).
    #[serde(default)]
    pub selected: BTreeMap<String, MachineFacts>,
    /// `builtins.storeDir`.
    #[serde(default, rename = "storeDir")]
    pub store_dir: Option<String>,
    /// The selection, by name (also when facts were not asked for).
    #[serde(default, rename = "selectedNames")]
    pub selected_names: Vec<String>,
    /// The clan's `vars.settings`.
    #[serde(default, rename = "varsSettings")]
    pub vars_settings: Option<crate::vars::VarsSettings>,
    /// Selected machines whose own evaluation failed, with why: the others go on.
    #[serde(skip)]
    pub failed: BTreeMap<String, Error>,
}

/// The `--apply` function. `@WANTED@` and `@TAGS@` become Nix lists of the requested names
/// and tags, `@SYSTEM@` the workstation's Nix system. The selection follows clan-core: with
/// tags, the machines having all of them (with names too: those names, filtered by the
/// tags); with neither, every machine. Unknown names are left out here and reported by the
/// caller, which gets the full machine and tag lists.
///
/// Two output shapes are read: this library's (`clanInternals.machines.<name>`) and
/// clan-core's (`clanInternals.machines.<system>.<name>`, the workstation's system first).
/// The platform is `nixpkgs.hostPlatform`, else `nixpkgs.system`, else the toplevel's
/// `system`; a NixOS hostPlatform that has no value (it throws) counts as unset.
const APPLY: &str = r#"ci:
let
  wanted = @WANTED@;
  wantedTags = @TAGS@;
  workstationSystem = @SYSTEM@;
  inventory = ci.inventory or (ci.inventoryClass.inventory or { });
  inventoryMachines = inventory.machines or { };
  raw = ci.machines or { };
  # clan-core: machines.<system>.<name>, no `config` one level down.
  systemsShaped = raw != { } && builtins.all (v: builtins.isAttrs v && !(v ? config) && !(v ? _type)) (builtins.attrValues raw);
  systems = builtins.attrNames raw;
  orderedSystems = (if builtins.elem workstationSystem systems then [ workstationSystem ] else [ ]) ++ builtins.filter (s: s != workstationSystem) systems;
  machines =
    if systemsShaped then
      builtins.foldl' (acc: sys: raw.${sys} // acc) { } (builtins.filter (s: builtins.isAttrs raw.${s}) orderedSystems)
    else raw;
  all = builtins.attrNames machines;
  # A machine's own tags, then the ones clan-core computes: `all`, and its class (`nixos`,
  # `darwin`); clan-core's own inventory lists them already.
  tagsOf = n:
    let
      inv = inventoryMachines.${n} or { };
      own = inv.tags or [ ];
      computed = [ "all" (inv.machineClass or "nixos") ];
    in own ++ builtins.filter (t: !(builtins.elem t own)) computed;
  hasAllTags = n: builtins.all (t: builtins.elem t (tagsOf n)) wantedTags;
  names =
    if wanted == [ ] then builtins.filter hasAllTags all
    else builtins.filter (n: builtins.elem n wanted && hasAllTags n) all;
  orNull = t: if t.success then t.value else null;
  facts = name:
    let
      inv = inventoryMachines.${name} or { };
      config = machines.${name}.config;
      net = config.clan.core.networking or { };
      hostPlatform = orNull (builtins.tryEval (config.nixpkgs.hostPlatform or null));
      legacySystem = orNull (builtins.tryEval (config.nixpkgs.system or null));
      # A system without one (clan-core's stub nixosSystem, a darwin machine) is still
      # shown and planned; only building it needs it.
      toplevel = config.system.build.toplevel or (throw "machine ${name} has no config.system.build.toplevel: it is not a NixOS system this tool can build");
      platform =
        if hostPlatform != null then (if builtins.isString hostPlatform then hostPlatform else hostPlatform.system or null)
        else if legacySystem != null then legacySystem
        else (config.system.build.toplevel or { }).system or null;
    in {
      machineClass = inv.machineClass or "nixos";
      inventoryTargetHost = inv.deploy.targetHost or null;
      inventoryBuildHost = inv.deploy.buildHost or null;
      configTargetHost = net.targetHost or null;
      configTargetHostIsDefault = tryOr false (((machines.${name}.options or { }).clan.core.networking.targetHost.highestPrio or 0) >= 1500);
      configBuildHost = net.buildHost or null;
      inventoryForwardAgent = inv.deploy.forwardAgent or null;
      healthCheck = inv.deploy.healthCheck or null;
      inventoryBuilders = inv.deploy.builders or null;
      inventoryCopyMode = inv.deploy.copyMode or null;
      inventoryCacheUpload = inv.deploy.cache.upload or null;
      inventoryCacheUrl = inv.deploy.cache.url or null;
      inventoryCacheKey = inv.deploy.cache.publicKey or null;
      configBuilders = net.builders or null;
      configForwardAgent = net.forwardAgent or null;
      requireExplicitUpdate = (inv.requireExplicitUpdate or false) || (config.clan.core.deployment.requireExplicitUpdate or false);
      system = if @TOPLEVEL@ == "yes" then platform else tryOr null platform;
      warnings = builtins.filter builtins.isString (orNull (builtins.tryEval (config.warnings or [ ])));
      vars =
        let v = config.clan.core.vars or null; in
        if v == null || (v.generators or { }) == { } then null else {
          secretLocation = v.age.secretLocation or "/etc/secret-vars";
          # clan-core's choice of secret store for the machine (its default: sops).
          secretModule = tryOr null ((v.settings or { }).secretModule or null);
          # Where clan-core's sops store puts the machine's key on the target.
          sopsUploadDirectory = tryOr null (if (v.sops or { }) ? secretUploadDirectory then toString v.sops.secretUploadDirectory else null);
          # clan-core's groups every sops secret of the machine is also for.
          sopsDefaultGroups = tryOr [ ] ((config.clan.core.sops or { }).defaultGroups or [ ]);
          generators = builtins.mapAttrs (_: g: let fromClanCore = g ? finalScript; in {
            share = g.share or false;
            dependencies = g.dependencies or [ ];
            validationHash = tryOr null (g.validationHash or null);
            # clan-core's generators carry `finalScript` (the script wrapped with its
            # runtimeInputs on PATH), which its CLI builds and runs: their script and
            # runtimeInputs are not read (they may not evaluate on this workstation), and
            # this tool does not run them (see vars::foreign_store).
            inherit fromClanCore;
            script = if fromClanCore then "" else if builtins.isPath (g.script or "") then builtins.readFile g.script else g.script or "";
            runtimeInputs = if fromClanCore then [ ] else map (p: { drv = p.drvPath or null; out = "${p}"; }) (g.runtimeInputs or [ ]);
            prompts = builtins.mapAttrs (_: p: { inherit (p) description type persist; }) (g.prompts or { });
            files = builtins.mapAttrs (_: f: { inherit (f) secret deploy owner group mode neededFor; }) (g.files or { });
          }) v.generators;
        };
      # Not `outPath`: JSON output would turn the whole set into that string. A `throw`
      # (an ungenerated var's value, say) leaves both empty: the caller generates the
      # missing vars, or evaluates again without this to show the error.
      toplevelDrv = if @TOPLEVEL@ == "no" then "" else if @TOPLEVEL@ == "try" then tryOr "" toplevel.drvPath else toplevel.drvPath;
      toplevelOut = if @TOPLEVEL@ == "no" then "" else if @TOPLEVEL@ == "try" then tryOr "" toplevel.outPath else toplevel.outPath;
    };
  tryOr = d: v: let t = builtins.tryEval v; in if t.success then t.value else d;
  index = {
    storeDir = builtins.storeDir;
    machines = all;
    tags = builtins.listToAttrs (map (n: { name = n; value = tagsOf n; }) all);
    selectedNames = names;
    # Only what the CLI reads (clan-core's settings also hold functions, which JSON cannot).
    varsSettings =
      let s = (ci.vars or { }).settings or null; in
      if s == null then null else {
        secretStore = tryOr null (s.secretStore or null);
        secretModule = tryOr null (s.secretModule or null);
        recipients = tryOr { } (s.recipients or { });
      };
  };
  # An evaluation worker's marker (`null`: none): its machines one after the other, each
  # machine's facts on standard error (a trace line starting with the marker) as soon as
  # they are known.
  marker = @STREAM@;
in index // {
  selected = if @FACTS@ then builtins.listToAttrs (map (n: { name = n; value = facts n; }) names) else { };
  streamed =
    if marker == null then 0
    else builtins.foldl' (count: n: builtins.trace (marker + " facts " + builtins.toJSON { name = n; facts = facts n; }) (count + 1)) 0 names;
}"#;

/// A Nix string literal for `s`: JSON escaping plus `$` escaped, so `${` never interpolates.
fn nix_string(s: &str) -> String {
    serde_json::to_string(s)
        .expect("a string always serializes")
        .replace('$', "\\$")
}

/// A Nix list of strings.
fn nix_list(items: &[String]) -> String {
    format!(
        "[ {} ]",
        items
            .iter()
            .map(|n| nix_string(n))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// Options for every Nix call of a run: `--option NAME VALUE` (checked: plain words) and
/// `--show-trace` for the evaluation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NixOptions {
    /// `--option NAME VALUE` pairs, in order.
    pub options: Vec<(String, String)>,
    /// Show Nix's evaluation trace on errors.
    pub show_trace: bool,
    /// Machines evaluated at once.
    pub eval_jobs: usize,
    /// Generates a machine's missing vars between its evaluations (`clan machines update`).
    pub vars: Option<VarsHook>,
}

/// Called with a machine's name, facts and the clan's vars settings after its evaluation:
/// generates what it lacks. Machines are evaluated again when their system needed them.
#[derive(Clone)]
pub struct VarsHook(pub std::sync::Arc<VarsFn>);

/// What a [`VarsHook`] calls.
pub type VarsFn = dyn Fn(&str, &MachineFacts, Option<&crate::vars::VarsSettings>) -> Result<(), Error>
    + Send
    + Sync;

impl std::fmt::Debug for VarsHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VarsHook")
    }
}

impl PartialEq for VarsHook {
    fn eq(&self, other: &VarsHook) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for VarsHook {}

/// How much of the selected machines one `nix eval` evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Depth {
    /// Names, tags and the selection only.
    Index,
    /// Facts without the toplevel (vars commands).
    Declarations,
    /// Facts; a toplevel that throws is left empty.
    TryToplevel,
    /// Facts; a toplevel that throws fails the evaluation, with Nix's message.
    Toplevel,
}

impl NixOptions {
    /// The flags for one Nix command: `--option NAME VALUE` for each.
    pub fn flags(&self) -> Vec<String> {
        self.options
            .iter()
            .flat_map(|(n, v)| ["--option".to_string(), n.clone(), v.clone()])
            .collect()
    }
}

/// The workstation's Nix system, as Nix names it (`x86_64-linux`).
pub fn workstation_system() -> String {
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    };
    format!("{}-{os}", std::env::consts::ARCH)
}

/// The `nix eval` argv for `flake`, the requested machines and tags (both empty: all).
pub fn eval_command(
    flake: &str,
    wanted: &[String],
    tags: &[String],
    nix: &NixOptions,
) -> Vec<String> {
    eval_command_with(flake, wanted, tags, nix, Depth::Toplevel)
}

/// [`eval_command`] to `depth`; [`Depth::Index`] evaluates no machine's configuration
/// (cheap).
fn eval_command_with(
    flake: &str,
    wanted: &[String],
    tags: &[String],
    nix: &NixOptions,
    depth: Depth,
) -> Vec<String> {
    eval_argv(flake, wanted, tags, nix, depth, None)
}

/// The `nix eval` argv; with `stream` (a marker), the machines' facts come as trace lines
/// that start with it, one machine after the other, instead of in the result.
fn eval_argv(
    flake: &str,
    wanted: &[String],
    tags: &[String],
    nix: &NixOptions,
    depth: Depth,
    stream: Option<&str>,
) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "nix".into(),
        "--extra-experimental-features".into(),
        "nix-command flakes".into(),
        "eval".into(),
        "--json".into(),
    ];
    if nix.show_trace {
        argv.push("--show-trace".into());
    }
    argv.extend(nix.flags());
    argv.extend([
        format!("{flake}#clanInternals"),
        "--apply".into(),
        APPLY
            .replace("@WANTED@", &nix_list(wanted))
            .replace("@TAGS@", &nix_list(tags))
            .replace("@SYSTEM@", &nix_string(&workstation_system()))
            .replace(
                "@FACTS@",
                if depth == Depth::Index || stream.is_some() {
                    "false"
                } else {
                    "true"
                },
            )
            .replace("@STREAM@", &stream.map_or("null".to_string(), nix_string))
            .replace(
                "@TOPLEVEL@",
                match depth {
                    Depth::TryToplevel => "\"try\"",
                    Depth::Declarations => "\"no\"",
                    Depth::Index | Depth::Toplevel => "\"yes\"",
                },
            ),
    ]);
    argv
}

/// How many machine evaluations run at once by default: one per core, and no more than
/// available memory allows at about 1.5 GiB per NixOS evaluation (MemAvailable).
pub fn default_eval_jobs() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let available_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    let by_memory = available_kib.map_or(cores, |kib| (kib / (1536 * 1024)) as usize);
    cores.min(by_memory).max(1)
}

/// Evaluates `flake` for the selection (the `wanted` machines, filtered by `tags`; all
/// machines when both are empty). One machine named: one `nix eval`. Otherwise a cheap
/// index evaluation (names, tags, selection), then the selected machines dealt out to at
/// most `jobs` evaluation workers ([`worker`]): one Nix start-up and flake lock per worker,
/// not per machine; a worker's memory stays bounded; a machine whose evaluation fails fails
/// alone ([`Evaluation::failed`]).
pub fn evaluate(
    flake_ref: &FlakeRef,
    wanted: &[String],
    tags: &[String],
    nix: &NixOptions,
) -> Result<Evaluation, Error> {
    let jobs = nix.eval_jobs;
    if wanted.len() == 1 && tags.is_empty() {
        return evaluate_one(flake_ref, wanted, tags, nix, true);
    }
    let mut index = evaluate_once(flake_ref, wanted, tags, nix, Depth::Index)?;
    let results = std::sync::Mutex::new(Vec::new());
    let settings = index.vars_settings.clone();
    std::thread::scope(|scope| {
        for names in partition(&index.selected_names, jobs) {
            let (results, settings) = (&results, &settings);
            scope.spawn(move || {
                worker(flake_ref, names, nix, settings.clone(), &mut |name, one| {
                    results.lock().expect("results").push((name, one));
                    true
                });
            });
        }
    });
    for (name, result) in results.into_inner().expect("results") {
        match result {
            Ok(facts) => {
                index.selected.insert(name, facts);
            }
            Err(error) => {
                index.failed.insert(name, error);
            }
        }
    }
    Ok(index)
}

/// The machines of `flake_ref` and their tags (the ones having every tag of `tags`
/// selected), without evaluating any machine's configuration: one cheap `nix eval`.
pub fn evaluate_index(
    flake_ref: &FlakeRef,
    tags: &[String],
    nix: &NixOptions,
) -> Result<Evaluation, Error> {
    evaluate_once(flake_ref, &[], tags, nix, Depth::Index)
}

/// What the selected machines declare (their vars, hosts…), without their systems: one
/// `nix eval` for the vars commands.
pub fn evaluate_declarations(
    flake_ref: &FlakeRef,
    wanted: &[String],
    nix: &NixOptions,
) -> Result<Evaluation, Error> {
    evaluate_once(flake_ref, wanted, &[], nix, Depth::Declarations)
}

/// A machine's own evaluation, as it finishes: its name and facts, or why it failed.
pub type Evaluated = (String, Result<MachineFacts, Error>);

/// Like [`evaluate`] for several machines, streaming: the index evaluation first (returned),
/// then each selected machine's facts from its evaluation worker (`nix.eval_jobs` of them),
/// sent as soon as Nix has them, so that a machine can go on to its build before the others
/// are evaluated.
pub fn evaluate_stream(
    flake_ref: &FlakeRef,
    wanted: &[String],
    tags: &[String],
    nix: &NixOptions,
) -> Result<(Evaluation, std::sync::mpsc::Receiver<Evaluated>), Error> {
    // The index alone first: the store is opened (made, on a new machine) by one Nix
    // process before the workers start, all at once.
    let index = evaluate_once(flake_ref, wanted, tags, nix, Depth::Index)?;
    let (tx, rx) = std::sync::mpsc::channel();
    for names in partition(&index.selected_names, nix.eval_jobs) {
        let (tx, flake_ref, nix, settings) = (
            tx.clone(),
            flake_ref.clone(),
            nix.clone(),
            index.vars_settings.clone(),
        );
        std::thread::spawn(move || {
            worker(&flake_ref, names, &nix, settings, &mut |name, result| {
                tx.send((name, result)).is_ok()
            });
        });
    }
    Ok((index, rx))
}

/// `names` dealt out to at most `jobs` evaluation workers (none empty).
fn partition(names: &[String], jobs: usize) -> Vec<Vec<String>> {
    let workers = jobs.max(1).min(names.len());
    let mut parts = vec![Vec::new(); workers];
    for (i, name) in names.iter().enumerate() {
        parts[i % workers].push(name.clone());
    }
    parts
}

/// A worker's `nix eval` is started again for the machines it has left once it holds more
/// than this (resident memory, KiB), whatever its first machine took: memory stays bounded
/// however many machines a worker has, as with nix-eval-jobs' `--max-memory-size`. About
/// what one NixOS evaluation may take ([`default_eval_jobs`]).
const WORKER_MEMORY_LIMIT_KIB: u64 = 1536 * 1024;

/// What a worker hands on: a machine's name and facts (or why they failed); false when
/// nobody wants more.
type Deliver<'a> = dyn FnMut(String, Result<MachineFacts, Error>) -> bool + 'a;

/// An evaluation worker: `names` evaluated in one `nix eval` (one Nix start-up and one
/// flake lock for them all), each machine's facts delivered as soon as Nix has them. With a
/// vars hook, a machine's missing vars are generated as it arrives (and it is evaluated
/// again when its system needed them). The `nix eval` is started again for the machines
/// left when it grows (see below); when it fails, the machine it was evaluating is
/// evaluated alone (its own error, or its facts if the failure was not its) and the rest go
/// on: one machine's error fails that machine only.
fn worker(
    flake_ref: &FlakeRef,
    mut names: Vec<String>,
    nix: &NixOptions,
    settings: Option<crate::vars::VarsSettings>,
    deliver: &mut Deliver<'_>,
) {
    // Nix evaluates them in the order of `attrNames`: bytewise.
    names.sort();
    let mut rest: std::collections::VecDeque<String> = names.into();
    let marker = format!("@@clan-{:016x}", nonce());
    let facts_line = format!("trace: {marker} facts ");
    let depth = if nix.vars.is_some() {
        Depth::TryToplevel
    } else {
        Depth::Toplevel
    };
    while !rest.is_empty() {
        if rest.len() == 1 || crate::interrupt::requested() {
            for name in std::mem::take(&mut rest) {
                let result = evaluate_machine(flake_ref, &name, nix);
                if !deliver(name, result) {
                    return;
                }
            }
            return;
        }
        let argv = eval_argv(
            &flake_ref.reference,
            &rest.iter().cloned().collect::<Vec<_>>(),
            &[],
            nix,
            depth,
            Some(&marker),
        );
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        if let Some(dir) = &flake_ref.dir {
            command.current_dir(dir);
        }
        let mut wanted_more = true;
        let mut restart = false;
        let mut first_machine_kib: Option<u64> = None;
        let output = crate::process::run_watching(&mut command, None, &mut |line, pid| {
            let Some(json) = line.strip_prefix(&facts_line) else {
                return true;
            };
            let Ok(Streamed { name, facts }) = serde_json::from_str::<Streamed>(json) else {
                return true;
            };
            let Some(at) = rest.iter().position(|n| *n == name) else {
                return true;
            };
            rest.remove(at);
            let result = arrived(flake_ref, &name, facts, nix, settings.as_ref());
            if !deliver(name, result) {
                wanted_more = false;
                return false;
            }
            // Started again once it holds more than twice what it held after its first
            // machine (at least 64 MiB): every machine evaluated stays in memory (the flake's
            // outputs keep it), and the collector's work on that heap soon costs more than a
            // fresh start (measured with bench/eval: NixOS-sized machines take 30% longer
            // each in a worker that keeps them all). Small machines share a worker to the
            // end.
            let resident = resident_kib(pid);
            let first = *first_machine_kib.get_or_insert(resident);
            if !rest.is_empty()
                && (resident > 2 * first.max(64 * 1024) || resident > WORKER_MEMORY_LIMIT_KIB)
            {
                restart = true;
                return false;
            }
            true
        });
        if !wanted_more {
            return;
        }
        match output {
            Ok(output) => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                print_warnings(&stderr);
                if !output.status.success() && !restart {
                    // The machine it was evaluating (the first one left) caused it, or not:
                    // evaluated alone, it says.
                    if let Some(name) = rest.pop_front() {
                        let result = evaluate_machine(flake_ref, &name, nix);
                        if !deliver(name, result) {
                            return;
                        }
                    }
                }
            }
            Err(e) => {
                let error = if e.kind() == std::io::ErrorKind::Interrupted {
                    crate::error::interrupted("while evaluating the flake")
                } else {
                    Error::new(format!(
                        "cannot run nix to evaluate {}: {e}",
                        flake_ref.shown
                    ))
                    .hint(Hint::text("install Nix (2.8 or newer) on this workstation"))
                };
                for name in std::mem::take(&mut rest) {
                    let error = named(&name, error.clone());
                    if !deliver(name, Err(error)) {
                        return;
                    }
                }
            }
        }
    }
}

/// One machine's facts as a worker's trace line carries them.
#[derive(Deserialize)]
struct Streamed {
    name: String,
    facts: MachineFacts,
}

/// A machine's facts from a worker, made final: with a vars hook, its missing vars are
/// generated, and it is evaluated again when its system needed them ([`evaluate_one`]).
fn arrived(
    flake_ref: &FlakeRef,
    name: &str,
    facts: MachineFacts,
    nix: &NixOptions,
    settings: Option<&crate::vars::VarsSettings>,
) -> Result<MachineFacts, Error> {
    let Some(hook) = &nix.vars else {
        return Ok(facts);
    };
    (hook.0)(name, &facts, settings).map_err(|error| named(name, error))?;
    if facts.drv_path.is_empty() {
        return evaluate_once(
            flake_ref,
            &[name.to_string()],
            &[],
            &NixOptions {
                vars: None,
                ..nix.clone()
            },
            Depth::Toplevel,
        )
        .and_then(|e| facts_of(e, name))
        .map_err(|error| named(name, error));
    }
    Ok(facts)
}

/// Machine `name`'s facts from an evaluation of it.
fn facts_of(mut evaluation: Evaluation, name: &str) -> Result<MachineFacts, Error> {
    evaluation
        .selected
        .remove(name)
        .ok_or_else(|| Error::usage(format!("evaluating machine {name} gave no facts")))
}

/// `error`, its message starting with the machine's name.
fn named(name: &str, error: Error) -> Error {
    Error {
        message: format!("{name}: {}", error.message),
        ..error
    }
}

/// A process's resident memory (KiB), 0 when it cannot be read.
fn resident_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A number the flake cannot guess: its trace lines cannot pass for a worker's.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// The evaluation of the one machine `wanted` names. With a vars hook: its toplevel
/// allowed to throw, its missing vars generated, and evaluated again when its toplevel
/// needed them (or to show why it threw). `name_hook_errors`: the hook's errors start with
/// the machine's name.
fn evaluate_one(
    flake_ref: &FlakeRef,
    wanted: &[String],
    tags: &[String],
    nix: &NixOptions,
    name_hook_errors: bool,
) -> Result<Evaluation, Error> {
    let Some(hook) = &nix.vars else {
        return evaluate_once(flake_ref, wanted, tags, nix, Depth::Toplevel);
    };
    let name = &wanted[0];
    let first = evaluate_once(flake_ref, wanted, tags, nix, Depth::TryToplevel)?;
    let Some(facts) = first.selected.get(name) else {
        return Ok(first);
    };
    (hook.0)(name, facts, first.vars_settings.as_ref()).map_err(|error| {
        if name_hook_errors {
            Error {
                message: format!("{name}: {}", error.message),
                ..error
            }
        } else {
            error
        }
    })?;
    if facts.drv_path.is_empty() {
        return evaluate_once(flake_ref, wanted, tags, nix, Depth::Toplevel);
    }
    Ok(first)
}

/// One machine's facts ([`evaluate_one`]), its errors starting with its name.
fn evaluate_machine(
    flake_ref: &FlakeRef,
    name: &str,
    nix: &NixOptions,
) -> Result<MachineFacts, Error> {
    evaluate_one(flake_ref, &[name.to_string()], &[], nix, false)
        .and_then(|e| facts_of(e, name))
        .map_err(|error| named(name, error))
}

fn evaluate_once(
    flake_ref: &FlakeRef,
    wanted: &[String],
    tags: &[String],
    nix: &NixOptions,
    depth: Depth,
) -> Result<Evaluation, Error> {
    let argv = eval_command_with(&flake_ref.reference, wanted, tags, nix, depth);
    let flake = flake_ref.shown.as_str();
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]);
    if let Some(dir) = &flake_ref.dir {
        command.current_dir(dir);
    }
    let output = crate::process::run(&mut command, None).map_err(|e| {
        if e.kind() == std::io::ErrorKind::Interrupted {
            return crate::error::interrupted("while evaluating the flake");
        }
        Error::new(format!("cannot run nix to evaluate {flake}: {e}"))
            .hint(Hint::text("install Nix (2.8 or newer) on this workstation"))
    })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(evaluation_error(flake, &stderr, nix.show_trace));
    }
    print_warnings(&stderr);
    serde_json::from_slice(&output.stdout).map_err(|e| {
        Error::usage(format!(
            "the flake {flake} evaluated to something unexpected: {e}"
        ))
    })
}

/// Nix's warnings from an evaluation, each one once in a run (several evaluations of one
/// flake give the same ones).
fn print_warnings(stderr: &str) {
    static SHOWN: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for line in stderr.lines().filter(|l| l.contains("warning:")) {
        let line = crate::progress::strip_control(line).trim().to_string();
        // Nix retries a store database that another evaluation holds (no daemon): its
        // "database is busy" notes say nothing the user can act on.
        if line.contains("creating lock file")
            || line.contains("updating lock file")
            || line.contains("is busy")
        {
            continue;
        }
        if SHOWN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(line.clone())
        {
            eprintln!("{line}");
        }
    }
}

/// An evaluation failure as the user sees it: exit 2, Nix's own lines, a hint that fits.
pub fn evaluation_error(flake: &str, stderr: &str, show_trace: bool) -> Error {
    // Line by line: Nix's errors keep their line breaks (its source excerpts, its traces).
    let stderr = crate::progress::strip_control_lines(stderr.trim_end());
    let mut error = Error::usage(format!("evaluating the flake {flake} failed"))
        .detail(stderr.clone())
        .code("eval.failed");
    if stderr.contains("does not provide attribute") && stderr.contains("clanInternals") {
        error = error.hint(Hint::text(
            "the flake must expose clanInternals: `inherit (clan.config) nixosConfigurations clanInternals;` with this repo's lib.clan, or clan-core's (see the README)",
        ));
    } else if stderr.contains("unsupported") && stderr.contains("Nix") && stderr.contains("version")
    {
        error = error.hint(Hint::text(
            "nixpkgs 25.11 and later need Nix 2.18 or newer to evaluate: upgrade Nix on this workstation",
        ));
    } else if !show_trace {
        error = error.hint(Hint::text(
            "run again with --show-trace for Nix's evaluation trace",
        ));
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_nix_string() {
        assert_eq!(nix_string("a\"${b}\n"), r#""a\"\${b}\n""#);
        let argv = eval_command(
            "/f",
            &["x".into(), "y$(z)".into()],
            &["web".into()],
            &NixOptions::default(),
        );
        assert_eq!(argv[5], "/f#clanInternals");
        assert!(argv[7].contains(r#"wanted = [ "x" "y\$(z)" ];"#));
        assert!(argv[7].contains(r#"wantedTags = [ "web" ];"#));
    }

    #[test]
    fn parses_the_evaluation() {
        let json = r#"{"machines":["m"],"tags":{"m":["web"]},"selected":{"m":{
            "inventoryTargetHost":"root@t","inventoryBuildHost":null,"configTargetHost":null,
            "configBuildHost":"root@b","system":"x86_64-linux",
            "toplevelDrv":"/nix/store/a-s.drv","toplevelOut":"/nix/store/b-s"}}}"#;
        let eval: Evaluation = serde_json::from_str(json).unwrap();
        assert_eq!(
            eval.selected["m"].config_build_host.as_deref(),
            Some("root@b")
        );
        assert_eq!(eval.tags["m"], vec!["web".to_string()]);
    }
}
