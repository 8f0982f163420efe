//! Which machines a command acts on: the command line checked, the flake evaluated once
//! (all at once, or streamed machine by machine), each machine's hosts resolved.

use std::path::Path;

use crate::boundary::{MachineName, Origin, StoreDir, Tag};
use crate::error::{Error, Hint};
use crate::eval::{FlakeRef, MachineFacts, NixOptions, evaluate};
use crate::resolve::{
    Overrides, ResolvedMachine, Source, SshConfigLookup, check_machine_name, parse_address,
    resolve_machine,
};

/// A machine as the flake describes it, and with its hosts decided.
pub struct LoadedMachine {
    /// What the flake says.
    pub facts: MachineFacts,
    /// What was decided.
    pub machine: ResolvedMachine,
}

/// Checks the command line, evaluates `flake` once for `names` (all machines if empty) and
/// resolves every machine's hosts. Their systems are not evaluated (the commands that
/// reach a machine without deploying need none): one `nix eval`, and a flake whose systems
/// cannot be built here is still served.
pub fn load_machines(
    flake: &Path,
    names: &[String],
    overrides: &Overrides,
    nix: &NixOptions,
) -> Result<Vec<LoadedMachine>, Error> {
    load(
        flake,
        names,
        &[],
        overrides,
        nix,
        &mut None,
        &mut None,
        false,
    )
}

/// For a deploy: like [`load_machines`], selecting the named machines filtered by `tags`,
/// with their systems evaluated; with `skipped` given and no names, the default selection
/// of [`default_selection`], the machines left out pushed to `skipped`.
pub fn load_selection_skipping(
    flake: &Path,
    names: &[String],
    tags: &[String],
    overrides: &Overrides,
    nix: &NixOptions,
    skipped: &mut Option<Vec<(String, &'static str)>>,
    failed: &mut Option<Vec<(MachineName, Error)>>,
) -> Result<Vec<LoadedMachine>, Error> {
    load(flake, names, tags, overrides, nix, skipped, failed, true)
}

#[allow(clippy::too_many_arguments)]
fn load(
    flake: &Path,
    names: &[String],
    tags: &[String],
    overrides: &Overrides,
    nix: &NixOptions,
    skipped: &mut Option<Vec<(String, &'static str)>>,
    failed: &mut Option<Vec<(MachineName, Error)>>,
    systems: bool,
) -> Result<Vec<LoadedMachine>, Error> {
    let flake = check_command_line(flake, names, tags, overrides)?;
    eprintln!("Evaluating {} on this workstation…", flake.shown);
    let mut evaluation = if systems {
        evaluate(&flake, names, tags, nix)?
    } else {
        crate::eval::evaluate_declarations(&flake, names, nix)?
    };
    if crate::interrupt::requested() {
        return Err(crate::error::interrupted("while evaluating the flake"));
    }
    let flake = &flake.shown;
    check_names(&evaluation)?;
    // Machines whose own evaluation failed: the caller reports them and goes on with the
    // others, or (without `failed`) the first one stops the run.
    let evaluation_failures = std::mem::take(&mut evaluation.failed);
    if !evaluation_failures.is_empty() {
        match failed {
            Some(failed) => {
                for (name, error) in evaluation_failures {
                    let name = MachineName::parse(&name, &Origin::Flake("machines".into()))
                        .map_err(|e| Error::usage(e.to_string()))?;
                    failed.push((name, error));
                }
            }
            None => {
                let (_, error) = evaluation_failures.into_iter().next().expect("not empty");
                return Err(error);
            }
        }
    }
    check_index(&evaluation, names, tags, overrides, flake)?;
    if names.is_empty()
        && let Some(skipped) = skipped
    {
        *skipped = default_selection(&mut evaluation, overrides);
    }
    for (name, facts) in &evaluation.selected {
        for warning in &facts.warnings {
            eprintln!(
                "{name}: warning: {}",
                crate::boundary::terminal_safe(warning)
            );
        }
    }
    let users = SshConfigLookup;
    let machines = resolve_evaluation(evaluation, overrides, &users)?;
    if systems {
        check_outputs(&machines)?;
    }
    Ok(machines)
}

/// A selection evaluated machine by machine, as each evaluation finishes.
pub struct Streamed {
    /// The index: names, tags, the selection, the store directory.
    pub index: crate::eval::Evaluation,
    /// Each selected machine's own evaluation.
    pub evaluated: std::sync::mpsc::Receiver<crate::eval::Evaluated>,
    /// Whether machines without a targetHost, or requiring an explicit update, are skipped.
    default_selection: bool,
}

/// One machine of a [`Streamed`] selection: deployed, skipped (why), or failed.
pub enum StreamedMachine {
    /// Goes on to its build.
    Ready(Box<ResolvedMachine>),
    /// Left out of the default selection.
    Skipped(MachineName, &'static str),
    /// Its evaluation, or a check of what it says, failed.
    Failed(MachineName, Error),
}

impl Streamed {
    /// How many machines will arrive.
    pub fn expected(&self) -> usize {
        self.index.selected_names.len()
    }

    /// Checks and resolves one evaluated machine, as [`load_selection_skipping`] does for all.
    pub fn resolve(
        &self,
        (name, facts): crate::eval::Evaluated,
        overrides: &Overrides,
    ) -> StreamedMachine {
        let checked = match MachineName::parse(&name, &Origin::Flake("machines".into())) {
            Ok(n) => n,
            Err(e) => {
                let fallback =
                    MachineName::parse("invalid", &Origin::CommandLine("-")).expect("a valid name");
                return StreamedMachine::Failed(
                    fallback,
                    Error::usage(e.to_string()).code(crate::error::REFUSED),
                );
            }
        };
        let facts = match facts {
            Ok(facts) => facts,
            Err(error) => return StreamedMachine::Failed(checked, error),
        };
        let mut one = crate::eval::Evaluation {
            machines: self.index.machines.clone(),
            tags: self.index.tags.clone(),
            selected: [(name.clone(), facts)].into_iter().collect(),
            store_dir: self.index.store_dir.clone(),
            selected_names: vec![name.clone()],
            vars_settings: self.index.vars_settings.clone(),
            failed: Default::default(),
        };
        if self.default_selection
            && let Some((_, why)) = default_selection(&mut one, overrides).into_iter().next()
        {
            return StreamedMachine::Skipped(checked, why);
        }
        for warning in one.selected.values().flat_map(|f| &f.warnings) {
            eprintln!(
                "{name}: warning: {}",
                crate::boundary::terminal_safe(warning)
            );
        }
        let resolved = resolve_evaluation(one, overrides, &SshConfigLookup).and_then(|m| {
            check_outputs(&m)?;
            Ok(m)
        });
        match resolved {
            Ok(mut machines) => match machines.pop() {
                Some(loaded) => StreamedMachine::Ready(Box::new(loaded.machine)),
                None => StreamedMachine::Failed(checked, Error::new("no machine was resolved")),
            },
            // A value of the flake that its checks refused (not a failed evaluation).
            Err(error) if error.exit == crate::error::ExitKind::Usage => {
                StreamedMachine::Failed(checked, error.code(crate::error::REFUSED))
            }
            Err(error) => StreamedMachine::Failed(checked, error),
        }
    }
}

/// Like [`load_selection_skipping`], but streaming: the index is evaluated and checked now; each
/// selected machine's own evaluation arrives later through [`Streamed::evaluated`].
pub fn stream_selection(
    flake: &Path,
    names: &[String],
    tags: &[String],
    overrides: &Overrides,
    nix: &NixOptions,
) -> Result<Streamed, Error> {
    let flake = check_command_line(flake, names, tags, overrides)?;
    eprintln!("Evaluating {} on this workstation…", flake.shown);
    let (index, evaluated) = crate::eval::evaluate_stream(&flake, names, tags, nix)?;
    if crate::interrupt::requested() {
        return Err(crate::error::interrupted("while evaluating the flake"));
    }
    check_names(&index)?;
    check_index(&index, names, tags, overrides, &flake.shown)?;
    Ok(Streamed {
        index,
        evaluated,
        default_selection: names.is_empty(),
    })
}

/// The command line's names, tags, addresses and flake, checked before the (slow)
/// evaluation.
pub(crate) fn check_command_line(
    flake: &Path,
    names: &[String],
    tags: &[String],
    overrides: &Overrides,
) -> Result<FlakeRef, Error> {
    for name in names {
        check_machine_name(name)?;
    }
    for tag in tags {
        Tag::parse(tag, &Origin::CommandLine("--tags")).map_err(|e| Error::usage(e.to_string()))?;
    }
    if let Some(value) = &overrides.build_host {
        parse_address(value, &Source::Flag("--build-host"))?;
    }
    if let Some(value) = &overrides.target_host {
        parse_address(value, &Source::Flag("--target-host"))?;
    }
    flake_ref(flake)
}

/// What the index evaluation allows to check: unknown names, tags no machine has, and
/// `--target-host` with several machines.
fn check_index(
    evaluation: &crate::eval::Evaluation,
    names: &[String],
    tags: &[String],
    overrides: &Overrides,
    flake: &str,
) -> Result<(), Error> {
    if let Some(unknown) = names.iter().find(|m| !evaluation.machines.contains(m)) {
        return Err(Error::usage(format!(
            "unknown machine {unknown:?} (from the command line): the flake {flake} defines {}",
            if evaluation.machines.is_empty() {
                "no machines".to_string()
            } else {
                evaluation.machines.join(", ")
            }
        ))
        .hint(Hint::text(
            "machines come from inventory.machines and machines in clan.nix",
        )));
    }
    if !tags.is_empty() && evaluation.selected_names.is_empty() {
        let mut known: Vec<&String> = evaluation.tags.values().flatten().collect();
        known.sort();
        known.dedup();
        return Err(Error::usage(format!(
            "no {} has all the tags {} (from --tags); tags in the flake: {}",
            if names.is_empty() { "machine" } else { "named machine" },
            tags.join(", "),
            if known.is_empty() {
                "none".to_string()
            } else {
                known
                    .iter()
                    .map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ))
        .hint(Hint::text(
            "--tags selects the machines that have every tag given (as clan-core does); tags come from inventory.machines.<name>.tags",
        )));
    }
    if overrides.target_host.is_some() && evaluation.selected_names.len() > 1 {
        return Err(Error::usage(format!(
            "--target-host names one address, but {} machines are selected ({}): name one machine",
            evaluation.selected_names.len(),
            evaluation.selected_names.join(", ")
        )));
    }
    Ok(())
}

/// `clan machines update` without machine names, as clan-core does it: every selected
/// machine that has a targetHost somewhere and does not require an explicit update. The
/// others are returned as (name, why), to be listed as skipped.
pub fn default_selection(
    evaluation: &mut crate::eval::Evaluation,
    overrides: &Overrides,
) -> Vec<(String, &'static str)> {
    let mut skipped = Vec::new();
    evaluation.selected.retain(|name, facts| {
        let why = if facts.machine_class.as_deref().is_some_and(|c| c != "nixos") {
            Some("its machineClass is not nixos: this tool deploys NixOS machines only")
        } else if facts.require_explicit_update {
            Some("requireExplicitUpdate is set: name it to update it")
        } else if overrides.target_host.is_none()
            && facts.inventory_target_host.is_none()
            && facts.config_target_host.is_none()
        {
            Some("no targetHost is set")
        } else {
            None
        };
        if let Some(why) = why {
            skipped.push((name.clone(), why));
        }
        why.is_none()
    });
    skipped
}

/// Every value of an evaluation through the boundary ([`crate::boundary`]): each machine
/// name and tag the flake defines (one bad name stops the run, named with where it came
/// from), the store directory, then each selected machine's hosts, system and store paths.
pub fn resolve_evaluation(
    evaluation: crate::eval::Evaluation,
    overrides: &Overrides,
    users: &dyn crate::resolve::UserLookup,
) -> Result<Vec<LoadedMachine>, Error> {
    let refused = |e: crate::boundary::Refused| Error::usage(e.to_string());
    check_names(&evaluation)?;
    let store = match &evaluation.store_dir {
        Some(dir) => {
            StoreDir::parse(dir, &Origin::Flake("builtins.storeDir".into())).map_err(refused)?
        }
        None => StoreDir::default(),
    };
    let settings = evaluation.vars_settings.clone().unwrap_or_default();
    evaluation
        .selected
        .into_iter()
        .map(|(name, mut facts)| {
            let name =
                MachineName::parse(&name, &Origin::Flake("machines".into())).map_err(refused)?;
            if let Some(vars) = &mut facts.vars {
                vars.clan_core = crate::vars::clan_core_store_of(vars);
            }
            // Secrets this run would generate or upload, kept in a store this tool does not
            // keep: stop here (also in --dry-run), before anything is made beside them.
            if let (Some(root), Some(vars)) = (&overrides.vars_repo, &facts.vars) {
                crate::vars::check_store(&settings, &name, vars)?;
                // clan-core's stores are not written here: what it lacks stops the run
                // (the dry run too, as the real run would stop).
                if let Some(store) = vars.clan_core {
                    let repo = crate::vars::Repo { root: root.clone() };
                    if store == crate::vars::clan_core_store::ClanCoreStore::Sops
                        && vars.generated_here()
                    {
                        // The sops store written here: what it lacks is generated by the
                        // run, and secrets whose links changed stop it (and its dry run).
                        crate::vars::sops_store::check_before_generating(
                            &repo,
                            &name,
                            vars,
                            "generated or uploaded",
                        )?;
                    } else {
                        crate::vars::clan_core_store::check_complete(
                            store, &repo, &name, vars, false,
                        )?;
                    }
                }
            }
            let machine = resolve_machine(&name, &facts, &store, overrides, users)?;
            Ok(LoadedMachine { facts, machine })
        })
        .collect()
}

/// Every machine name and tag the flake defines, through the boundary.
fn check_names(evaluation: &crate::eval::Evaluation) -> Result<(), Error> {
    let refused = |e: crate::boundary::Refused| Error::usage(e.to_string());
    for name in evaluation.machines.iter().chain(evaluation.selected.keys()) {
        MachineName::parse(name, &Origin::Flake("machines".into())).map_err(refused)?;
    }
    for (name, tags) in &evaluation.tags {
        MachineName::parse(name, &Origin::Flake("inventory.machines".into())).map_err(refused)?;
        for tag in tags {
            Tag::parse(
                tag,
                &Origin::Flake(format!("inventory.machines.{name}.tags")),
            )
            .map_err(refused)?;
        }
    }
    Ok(())
}

/// Each toplevel's `outPath` must be an output of its `drvPath`, as the workstation's store
/// says (`nix-store -q --outputs`, local and cheap): a flake cannot make the target activate
/// a path other than what the build produces.
fn check_outputs(machines: &[LoadedMachine]) -> Result<(), Error> {
    for loaded in machines {
        let m = &loaded.machine;
        if let Some(class) = loaded
            .facts
            .machine_class
            .as_deref()
            .filter(|c| *c != "nixos")
        {
            return Err(Error::usage(format!(
                "machine {} is a {} machine (inventory.machines.{}.machineClass): this tool deploys NixOS machines only; nothing was built",
                m.name,
                crate::boundary::terminal_safe(class),
                m.name
            ))
            .code("machine.not-nixos")
            .hint(Hint::text(format!(
                "deploy it with clan-core's CLI (clan machines update {}), and leave it out here (without names, it is skipped)",
                m.name
            ))));
        }
        if m.toplevel.is_none() {
            return Err(Error::usage(format!(
                "{}: the flake gave no system.build.toplevel for it: it is not a system this tool can build",
                m.name
            )));
        }
        // The derivation as the store holds it, read here: a process per machine costs
        // more than the rest of this check. Nix is asked when the file is not there (another
        // store) or not in the format read here.
        if let Some(outputs) = std::fs::read(m.drv_path().as_str())
            .ok()
            .and_then(|text| drv_outputs(&text))
        {
            if outputs.iter().any(|o| o == m.out_path().as_str()) {
                continue;
            }
            return Err(not_an_output(m, String::new()));
        }
        let out = crate::process::run(
            std::process::Command::new("nix-store").args([
                "-q",
                "--outputs",
                m.drv_path().as_str(),
            ]),
            None,
        )
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::Interrupted => {
                crate::error::interrupted("while evaluating the flake")
            }
            _ => Error::new(format!("cannot run nix-store: {e}")),
        })?;
        let outputs = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !outputs.lines().any(|l| l.trim() == m.out_path().as_str()) {
            return Err(not_an_output(
                m,
                String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
            ));
        }
    }
    Ok(())
}

/// `m`'s toplevel is not what its derivation builds.
fn not_an_output(m: &ResolvedMachine, detail: String) -> Error {
    Error::usage(format!(
        "{}: the toplevel's outPath {} is not an output of its drvPath {} (from the flake): refusing to deploy it",
        m.name,
        m.out_path(),
        m.drv_path()
    ))
    .detail(detail)
}

/// The output paths a derivation file names (Nix's ATerm format, `Derive([("out","/nix/store/…",…),…],…)`,
/// the same from Nix 2.8 to today's), or None when `text` is not in that format.
pub fn drv_outputs(text: &[u8]) -> Option<Vec<String>> {
    let mut rest = std::str::from_utf8(text).ok()?.strip_prefix("Derive([")?;
    // One quoted string, with ATerm's escapes; the text after it.
    fn quoted(s: &str) -> Option<(String, &str)> {
        let s = s.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => return Some((value, &s[i + 1..])),
                '\\' => value.push(match chars.next()?.1 {
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    other => other,
                }),
                c => value.push(c),
            }
        }
        None
    }
    let mut outputs = Vec::new();
    loop {
        rest = rest.strip_prefix('(')?;
        let (_name, after) = quoted(rest)?;
        let (path, after) = quoted(after.strip_prefix(',')?)?;
        let (_algo, after) = quoted(after.strip_prefix(',')?)?;
        let (_hash, after) = quoted(after.strip_prefix(',')?)?;
        outputs.push(path);
        rest = after.strip_prefix(')')?;
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else {
            rest.strip_prefix(']')?;
            return Some(outputs);
        }
    }
}

/// The flake reference for nix. A local directory with a plain absolute path is passed as
/// that path. One whose path holds characters a flake reference reads otherwise (`#` a
/// fragment, `?` a query, `%`, whitespace…) is evaluated from inside it as `.`: Nix 2.8
/// does not percent-decode `path:` URLs, so this is the one spelling every version reads
/// the same. Anything with a scheme (`github:`, `git+https:`, `path:`) is passed as given.
/// A path that does not exist is named in the error.
pub fn flake_ref(path: &Path) -> Result<FlakeRef, Error> {
    let text = path.display().to_string();
    let has_scheme = text.split_once(':').is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && !scheme.contains('/')
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    if !path.exists() && has_scheme {
        return Ok(FlakeRef {
            reference: text.clone(),
            dir: None,
            shown: text,
        });
    }
    if !path.is_dir() {
        return Err(Error::usage(if path.exists() {
            format!("the flake {text:?} (from --flake) is not a directory")
        } else {
            format!("the flake directory {text:?} (from --flake) does not exist")
        })
        .hint(Hint::text(
            "pass the directory that holds flake.nix, or a flake reference such as github:owner/repo",
        )));
    }
    let abs = path
        .canonicalize()
        .map_err(|e| Error::usage(format!("cannot open the flake directory {text:?}: {e}")))?;
    let shown = crate::boundary::terminal_safe(&abs.display().to_string());
    let plain = abs.to_str().is_some_and(|a| {
        a.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '+'))
    });
    Ok(if plain {
        FlakeRef {
            reference: abs.display().to_string(),
            dir: None,
            shown,
        }
    } else {
        FlakeRef {
            reference: ".".into(),
            dir: Some(abs),
            shown,
        }
    })
}

/// The clan's directory (where `vars/` and `secrets/` are): the flake's, after the flake's
/// own checks (and messages).
pub fn clan_dir(flake: &Path) -> Result<std::path::PathBuf, Error> {
    flake_ref(flake)?;
    std::fs::canonicalize(flake).map_err(|e| {
        Error::usage(format!(
            "cannot open the flake directory {} (from --flake): {e}",
            flake.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_derivations_outputs_are_read_from_its_file() {
        let drv = br#"Derive([("dev","/nix/store/aaa-x-dev","",""),("out","/nix/store/bbb-x","","")],[("/nix/store/ccc-y.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","echo \"(\\)\""],[("out","/nix/store/bbb-x")])"#;
        assert_eq!(
            super::drv_outputs(drv),
            Some(vec![
                "/nix/store/aaa-x-dev".to_string(),
                "/nix/store/bbb-x".to_string()
            ])
        );
        // A fixed-output derivation names its hash in the output.
        let fixed = br#"Derive([("out","/nix/store/ddd-src","r:sha256","0abc")],[],[],"builtin","builtin:fetchurl",[],[])"#;
        assert_eq!(
            super::drv_outputs(fixed),
            Some(vec!["/nix/store/ddd-src".to_string()])
        );
        // Anything else is left to Nix.
        for other in [
            &b"DrvWithVersion(\"xp-dyn-drv\",[(\"out\",\"/nix/store/e\",\"\",\"\")])"[..],
            b"Derive([(\"out\",\"/nix/store/e\"",
            b"",
            b"\xff\xfe",
        ] {
            assert_eq!(super::drv_outputs(other), None);
        }
    }

    use super::*;
    use crate::eval::Evaluation;
    use crate::host::HostAddress;
    use crate::plan::{PlanContext, Runner, plan_deploy};
    use crate::ssh::{HostKeyCheck, Invocation, RemoteCommand};
    use proptest::prelude::*;

    struct Users;
    impl crate::resolve::UserLookup for Users {
        fn configured_user(&self, _: &HostAddress) -> Option<String> {
            None
        }
        fn local_user(&self) -> String {
            "alice".into()
        }
    }

    /// Flags the plan itself uses; any other word starting with '-' would be a value that
    /// became an option.
    const FLAGS: &[&str] = &[
        "--extra-experimental-features",
        "--derivation",
        "--to",
        "--from",
        "--realise",
        "--add-root",
        "--keep-going",
        "--log-format",
        "--option",
        "--check-validity",
        "--print-invalid",
        "--substitute-on-destination",
        "--",
        // clan-activate switch: no specialisation (never a value of the flake).
        "-",
        "-m",
        "-rf",
        "-e",
        "-a",
        "-x",
        "-c",
        "-o",
        "-p",
    ];

    /// The data words of an invocation: its argv without the text of `sh -c SCRIPT`, and
    /// its environment values split as `NIX_SSHOPTS` is.
    fn data_words(inv: &Invocation) -> Vec<String> {
        let mut words: Vec<String> = inv
            .argv
            .iter()
            .enumerate()
            .filter(|(i, _)| !(*i == 2 && inv.argv[0] == "sh" && inv.argv[1] == "-c"))
            .map(|(_, w)| w.clone())
            .collect();
        for (_, value) in &inv.env {
            words.extend(value.split_whitespace().map(str::to_string));
        }
        words
    }

    fn hostile() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("../../../../tmp/x".to_string()),
            Just("--option post-build-hook /tmp/x".to_string()),
            Just("/tmp/x".to_string()),
            Just("root@t?PKCS11Provider=/tmp/x.so".to_string()),
            Just("root@t?StrictHostKeyChecking=no".to_string()),
            Just("a\u{1b}[2Kb".to_string()),
            Just("web;curl x|sh".to_string()),
            "[a-z]{1,8}",
            "root@[a-z]{1,6}(:[0-9]{1,5})?",
            "/nix/store/[0-9a-z]{32}-[a-z.-]{1,10}",
            "\\PC{0,24}",
            // Valid ones too, so that plans get made and checked.
            "/nix/store/[0-9a-df-np-sv-z]{32}-[a-z]{1,8}(\\.drv)?",
            "/nix/store/[0-9a-df-np-sv-z]{32}-[a-z]{1,8}\\.drv",
            "(root|deploy)@[a-z]{1,6}(\\?(IdentityFile|ProxyJump|ForwardAgent|PKCS11Provider)=[a-z/-]{1,8})?",
            "x86_64-linux",
        ]
    }

    /// Mostly `valid`, sometimes anything hostile.
    fn mostly(valid: &'static str) -> impl Strategy<Value = String> {
        prop_oneof![3 => proptest::string::string_regex(valid).unwrap(), 1 => hostile()]
    }

    fn facts_json() -> impl Strategy<Value = serde_json::Value> {
        (
            proptest::option::of(mostly(
                "(root|deploy)@[a-z]{1,6}(\\?(IdentityFile|ProxyJump|ForwardAgent|PKCS11Provider|Port)=[a-z0-9/-]{1,8})?",
            )),
            proptest::option::of(mostly("(root@)?(b|localhost)[a-z]{0,3}")),
            proptest::option::of(mostly("x86_64-linux|aarch64-linux")),
            mostly("/nix/store/[0-9a-df-np-sv-z]{32}-[a-z]{1,8}\\.drv"),
            mostly("/nix/store/[0-9a-df-np-sv-z]{32}-[a-z]{1,8}"),
        )
            .prop_map(|(target, build, system, drv, out)| {
                serde_json::json!({
                    "inventoryTargetHost": target,
                    "inventoryBuildHost": build,
                    "configTargetHost": null,
                    "configBuildHost": null,
                    "system": system,
                    "toplevelDrv": drv,
                    "toplevelOut": out,
                })
            })
    }

    static PLANS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    #[test]
    fn the_fuzz_makes_plans() {
        the_whole_boundary_holds();
        assert!(
            PLANS.load(std::sync::atomic::Ordering::Relaxed) > 20,
            "the fuzz rarely got past the boundary: it checks nothing"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        // An evaluation with arbitrary strings in every field goes through the boundary and
        // the planner without a panic, and no command of the resulting plan carries a value
        // that could become an option or a second word.
        #[test]
        fn the_whole_boundary_holds(
            names in proptest::collection::vec(mostly("[a-z][a-z0-9.-]{0,8}"), 1..3),
            tags in proptest::collection::vec(mostly("[a-z]{1,5}"), 0..2),
            facts in proptest::collection::vec(facts_json(), 1..3),
            store in mostly("/nix/store"),
        ) {
            let mut selected = serde_json::Map::new();
            for (name, f) in names.iter().zip(&facts) {
                selected.insert(name.clone(), f.clone());
            }
            let json = serde_json::json!({
                "storeDir": store,
                "machines": names,
                "tags": { names[0].clone(): tags },
                "selected": selected,
            });
            let Ok(evaluation) = serde_json::from_value::<Evaluation>(json) else {
                return Ok(());
            };
            let Ok(loaded) = resolve_evaluation(evaluation, &Overrides::default(), &Users) else {
                return Ok(());
            };
            let ctx = PlanContext {
                control_dir: Some("/tmp/clan-ssh-x".into()),
                rollback_on_unhealthy: true,
                ..PlanContext::example("0123456789abcdef", HostKeyCheck::Strict)
            };
            let plan = plan_deploy(loaded.into_iter().map(|l| l.machine).collect(), &ctx);
            let mut steps: Vec<&crate::plan::Step> = Vec::new();
            for g in &plan.groups {
                steps.extend(&g.steps);
                steps.push(&g.cleanup);
            }
            for m in &plan.machines {
                for step in &m.steps {
                    steps.push(step);
                    steps.extend(step.on_failure.as_deref());
                    steps.extend(step.on_lost.as_deref());
                }
            }
            PLANS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for step in steps {
                let words = match &step.runner {
                    Runner::Workstation(inv) => data_words(inv),
                    Runner::Remote { command, .. } => match command {
                        RemoteCommand::Run(inv) | RemoteCommand::UntilHangup(inv) => data_words(inv),
                        RemoteCommand::Script { args, .. } => args.clone(),
                        RemoteCommand::Probes(_) => Vec::new(),
                    },
                };
                for word in words {
                    prop_assert!(
                        !word.chars().any(|c| c.is_control() || c.is_whitespace()),
                        "{:?} in {:?}", word, step.kind
                    );
                    prop_assert!(
                        !word.starts_with('-') || FLAGS.contains(&word.as_str()),
                        "{:?} in {:?} would be an option", word, step.kind
                    );
                }
                // The ssh command line itself never lets a value become an ssh flag: the
                // destination follows "--".
                let argv = step.local_argv();
                if argv[0] == "ssh" {
                    let dashdash = argv.iter().position(|w| w == "--").unwrap();
                    prop_assert!(!argv[dashdash + 1].starts_with('-'));
                }
            }
        }
    }
}
