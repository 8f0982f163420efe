//! `clan vars …`: generate, list, get, check, upload and fix a clan's vars (age backend).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use crate::cli::{
    HostArgs, VarsFixArgs, VarsGenerateArgs, VarsGetArgs, VarsMachineArgs, VarsUploadArgs,
};
use crate::error::{Error, ExitKind, Hint};
use crate::vars::generate::Generation;
use crate::vars::upload::{SecretsUpload, VARS_UPLOAD, upload_error, user_identity};
use crate::vars::{MachineVars, Repo, VarsSettings};

/// The clan's vars as the flake declares them: the repository, the settings, and each
/// selected machine's declarations (`None`: it declares no generator).
struct Declared {
    repo: Repo,
    settings: VarsSettings,
    machines: BTreeMap<String, Option<MachineVars>>,
}

/// Evaluates what `names` (all machines if empty) declare, without their systems.
fn declared(hosts: &HostArgs, names: &[String]) -> Result<Declared, Error> {
    for name in names {
        crate::resolve::check_machine_name(name)?;
    }
    let flake = crate::commands::machines::flake_ref(&hosts.flake)?;
    let root = crate::commands::machines::clan_dir(&hosts.flake)?;
    eprintln!("Evaluating {} on this workstation…", flake.shown);
    let evaluation = crate::eval::evaluate_declarations(&flake, names, &hosts.nix_options()?)?;
    if let Some(unknown) = names.iter().find(|n| !evaluation.machines.contains(n)) {
        return Err(Error::usage(format!(
            "unknown machine {unknown:?} (from the command line): the flake {} defines {}",
            flake.shown,
            evaluation.machines.join(", ")
        )));
    }
    let settings = evaluation.vars_settings.unwrap_or_default();
    let mut machines = BTreeMap::new();
    for (name, mut facts) in evaluation.selected {
        if let Some(vars) = &mut facts.vars {
            vars.check(&name)?;
            vars.clan_core = crate::vars::clan_core_store_of(vars);
        }
        machines.insert(name, facts.vars);
    }
    Ok(Declared {
        repo: Repo { root },
        settings,
        machines,
    })
}

/// The one machine's declarations; one without generators is an error.
fn one(declared: &Declared, machine: &str) -> Result<MachineVars, Error> {
    declared
        .machines
        .get(machine)
        .cloned()
        .flatten()
        .ok_or_else(|| {
            Error::usage(format!(
                "machine {machine} declares no vars (clan.core.vars.generators is empty)"
            ))
        })
}

/// [`one`], for commands that read or write its secrets: a machine whose secrets live in
/// a store this tool does not keep is refused by name (`vars.store-unsupported`).
fn one_kept_here(declared: &Declared, machine: &str) -> Result<MachineVars, Error> {
    let vars = one(declared, machine)?;
    crate::vars::check_store(&declared.settings, machine, &vars)?;
    if vars.clan_core.is_none() {
        declared.repo.check_layout()?;
    }
    Ok(vars)
}

/// `clan vars generate`.
pub fn generate(args: &VarsGenerateArgs) -> Result<ExitKind, Error> {
    let declared = declared(&args.hosts, &args.machines)?;
    let mut generation = Generation::new(&declared.repo, &declared.settings);
    generation.regenerate = args.regenerate;
    generation.only = args.generator.clone();
    generation.sandbox = !args.no_sandbox;
    if args.no_sandbox {
        eprintln!(
            "warning: --no-sandbox: generators run with your environment, home directory and network"
        );
    }
    // Shared generators declared differently stop everything before anything is made.
    let mut shared = crate::vars::SharedDefinitions::default();
    for (machine, vars) in &declared.machines {
        if let Some(vars) = vars {
            shared.check(machine, vars)?;
        }
    }
    for (machine, vars) in &declared.machines {
        let Some(vars) = vars else {
            if !args.machines.is_empty() {
                eprintln!("{machine}: declares no vars");
            }
            continue;
        };
        let ran = generation.machine(machine, vars)?;
        if ran.is_empty() {
            eprintln!("{machine}: every var is generated");
        } else {
            eprintln!("{machine}: generated {}", ran.join(", "));
        }
    }
    Ok(ExitKind::Success)
}

/// `clan vars list`.
pub fn list(args: &VarsMachineArgs) -> Result<ExitKind, Error> {
    let declared = declared(&args.hosts, std::slice::from_ref(&args.machine))?;
    let vars = one(&declared, &args.machine)?;
    // Secrets in another store (clan-core's sops) are listed where that store keeps them,
    // never read, and never called "not generated" when they exist.
    let foreign = crate::vars::foreign_store(&declared.settings, &args.machine, &vars);
    if let Some(which) = &foreign {
        eprintln!("warning: {which}");
    } else if vars.clan_core.is_none() {
        declared.repo.check_layout()?;
    }
    let mut out = std::io::stdout().lock();
    for (g, decl) in &vars.generators {
        for (f, file) in &decl.files {
            let shown = if file.secret && foreign.is_some() {
                if declared
                    .repo
                    .foreign_secret(&args.machine, g, decl, f)
                    .is_some()
                {
                    "(kept in clan-core's store: not read here)".to_string()
                } else {
                    "(not generated)".to_string()
                }
            } else if file.secret {
                let path = if let Some(store) = vars.clan_core {
                    crate::vars::clan_core_store::secret_path(
                        store,
                        &declared.repo,
                        &args.machine,
                        g,
                        decl,
                        f,
                    )
                } else {
                    declared.repo.secret_path(&args.machine, g, decl, f)
                };
                // Present in the layout of the store the clan does not select: generated,
                // never "not generated" (the next generate refuses to make it again).
                let elsewhere = match vars.clan_core {
                    Some(crate::vars::clan_core_store::ClanCoreStore::Sops) => Some((
                        declared.repo.secret_path(&args.machine, g, decl, f),
                        "this tool's age layout, but the clan selects the sops store",
                    )),
                    Some(_) => None,
                    None => declared
                        .repo
                        .foreign_secret(&args.machine, g, decl, f)
                        .map(|p| (p, "the sops layout, but the clan selects the age store")),
                };
                if path.is_file() {
                    "********".to_string()
                } else if let Some((other, which)) = elsewhere.filter(|(p, _)| p.is_file()) {
                    format!(
                        "(in {which}: {})",
                        other
                            .strip_prefix(&declared.repo.root)
                            .unwrap_or(&other)
                            .display()
                    )
                } else {
                    "(not generated)".to_string()
                }
            } else {
                match std::fs::read(declared.repo.value_path(&args.machine, g, decl, f)) {
                    Ok(value) => {
                        let text = String::from_utf8_lossy(&value);
                        let line = text.lines().next().unwrap_or("");
                        let mut shown = crate::boundary::terminal_safe(line);
                        if text.lines().count() > 1 {
                            shown.push_str(" …");
                        }
                        shown
                    }
                    Err(_) => "(not generated)".to_string(),
                }
            };
            let _ = writeln!(out, "{g}/{f} {shown}");
        }
    }
    Ok(ExitKind::Success)
}

/// `clan vars get`.
pub fn get(args: &VarsGetArgs) -> Result<ExitKind, Error> {
    let Some((g, f)) = args.var.split_once('/') else {
        return Err(Error::usage(format!(
            "{:?} (from the command line) is not GENERATOR/FILE",
            args.var
        )));
    };
    let declared = declared(&args.hosts, std::slice::from_ref(&args.machine))?;
    let vars = one_kept_here(&declared, &args.machine)?;
    let Some(decl) = vars.generators.get(g).filter(|d| d.files.contains_key(f)) else {
        return Err(
            Error::usage(format!("machine {} has no var {g}/{f}", args.machine)).hint(Hint::text(
                format!(
                    "`{}` lists them",
                    crate::hint::command("vars list", &args.machine, &[])
                ),
            )),
        );
    };
    if let Some(store) = vars.clan_core {
        let missing =
            crate::vars::clan_core_store::missing(store, &declared.repo, &args.machine, &vars);
        if missing.contains(&format!("{} is not generated", args.var)) {
            return Err(Error::usage(format!(
                "{g}/{f} of machine {} is not generated yet ({} store, clan-core's layout)",
                args.machine,
                store.name()
            ))
            .hint(Hint::text(generate_hint(&vars, &args.machine))));
        }
        let content = crate::vars::clan_core_store::read(
            store,
            &declared.repo,
            &args.machine,
            g,
            decl,
            f,
            user_identity()?,
        )?;
        let _ = std::io::stdout().lock().write_all(&content);
        return Ok(ExitKind::Success);
    }
    let generation = Generation::new(&declared.repo, &declared.settings);
    let present = if decl.files[f].secret {
        declared.repo.secret_path(&args.machine, g, decl, f)
    } else {
        declared.repo.value_path(&args.machine, g, decl, f)
    }
    .is_file();
    if !present {
        return Err(Error::usage(format!(
            "{g}/{f} of machine {} is not generated yet",
            args.machine
        ))
        .hint(Hint::text(format!(
            "run `{}`",
            crate::hint::command("vars generate", &args.machine, &[])
        ))));
    }
    let content = generation.read_file(&args.machine, g, decl, f)?;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&content);
    Ok(ExitKind::Success)
}

/// `clan vars set`: one var, from the terminal (hidden) or standard input.
pub fn set(args: &VarsGetArgs) -> Result<ExitKind, Error> {
    let Some((g, f)) = args.var.split_once('/') else {
        return Err(Error::usage(format!(
            "{:?} (from the command line) is not GENERATOR/FILE",
            args.var
        )));
    };
    let declared = declared(&args.hosts, std::slice::from_ref(&args.machine))?;
    let vars = one(&declared, &args.machine)?;
    if !vars
        .generators
        .get(g)
        .is_some_and(|d| d.files.contains_key(f))
    {
        return Err(
            Error::usage(format!("machine {} has no var {g}/{f}", args.machine)).hint(Hint::text(
                format!(
                    "`{}` lists them",
                    crate::hint::command("vars list", &args.machine, &[])
                ),
            )),
        );
    }
    let value = read_value(&format!("{g}/{f} of machine {}", args.machine))?;
    let generation = Generation::new(&declared.repo, &declared.settings);
    let written = generation.set(&args.machine, &vars, g, f, value)?;
    eprintln!(
        "{}: {g}/{f} set ({}; staged)",
        args.machine,
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(ExitKind::Success)
}

/// A var's new value: typed on the terminal without echo (one line), else all of standard
/// input, as it is.
fn read_value(what: &str) -> Result<crate::vars::Secret, Error> {
    use std::io::{IsTerminal, Read};
    if std::io::stdin().is_terminal() {
        let typed = rpassword::prompt_password(format!("{what}: "))
            .map_err(|e| Error::new(format!("cannot read the value: {e}")))?;
        return Ok(zeroize::Zeroizing::new(typed.into_bytes()));
    }
    let mut value = zeroize::Zeroizing::new(Vec::new());
    std::io::stdin()
        .read_to_end(&mut value)
        .map_err(|e| Error::new(format!("cannot read the value from standard input: {e}")))?;
    Ok(value)
}

/// `clan vars check`: every problem, one line each; exit 1 if there is any.
pub fn check(args: &VarsMachineArgs) -> Result<ExitKind, Error> {
    let machine = &args.machine;
    let declared = declared(&args.hosts, std::slice::from_ref(machine))?;
    let vars = one_kept_here(&declared, machine)?;
    let mut problems = Vec::new();
    if let Some(store) = vars.clan_core {
        return check_clan_core(store, &declared.repo, machine, &vars);
    }
    if let Err(e) = crate::vars::parse_recipients(&declared.settings, machine) {
        problems.push(e.message);
    }
    let user = match crate::vars::UserIdentity::find() {
        Ok(user) => Some(user),
        Err(e) => {
            problems.push(e.message);
            None
        }
    };
    if let Some(user) = &user {
        if let Err(e) = declared.repo.machine_identity(machine, user) {
            problems.push(e.message);
        } else if let Err(e) = declared.repo.check_upload(machine, &vars, user) {
            problems.push(e.message);
        }
    }
    if !declared.repo.machine_pub(machine).is_file()
        && !declared.repo.secrets_of(machine).is_empty()
    {
        problems.push(format!(
            "machine {machine}'s key is missing ({}) while its secrets are in the repository",
            declared.repo.machine_pub(machine).display()
        ));
    }
    let generation = Generation::new(&declared.repo, &declared.settings);
    for (g, decl) in &vars.generators {
        for (f, file) in &decl.files {
            let generated = if file.secret {
                declared.repo.secret_path(machine, g, decl, f).is_file()
            } else {
                declared.repo.value_path(machine, g, decl, f).is_file()
            };
            if !generated {
                problems.push(format!("{g}/{f} is not generated"));
            } else if file.secret
                && decl.share
                && user.is_some()
                && generation.read_file(machine, g, decl, f).is_err()
            {
                problems.push(format!(
                    "{g}/{f} is shared, but not encrypted to machine {machine}'s key"
                ));
            }
        }
    }
    if problems.is_empty() {
        eprintln!("{machine}: vars complete, and your identity opens the machine's key");
        return Ok(ExitKind::Success);
    }
    eprintln!("{machine}: {} problem(s):", problems.len());
    for problem in &problems {
        eprintln!("  - {problem}");
    }
    eprintln!(
        "hint: `{}` makes what is missing; see the README's Secrets section for recipients and identities",
        crate::hint::command("vars generate", machine, &[])
    );
    Ok(ExitKind::DeployFailed)
}

/// [`check`] for a clan-core store: every var there, the machine's key opens with
/// the user's, and every secret the target needs is encrypted to the machine's key.
fn check_clan_core(
    store: crate::vars::clan_core_store::ClanCoreStore,
    repo: &Repo,
    machine: &str,
    vars: &MachineVars,
) -> Result<ExitKind, Error> {
    let mut problems = crate::vars::clan_core_store::missing(store, repo, machine, vars);
    match crate::vars::clan_core_store::recipient_problems(store, repo, machine, vars) {
        Ok(found) => problems.extend(found),
        Err(e) => problems.push(e.message),
    }
    if problems.is_empty() {
        match user_identity() {
            Err(e) => problems.push(e.message),
            Ok(user) => {
                if let Err(e) =
                    crate::vars::clan_core_store::check_upload(store, repo, machine, vars, user)
                {
                    problems.push(e.message);
                }
            }
        }
    }
    if problems.is_empty() {
        eprintln!(
            "{machine}: vars complete in the {} store (clan-core's layout), and your key opens the machine's key",
            store.name()
        );
        return Ok(ExitKind::Success);
    }
    eprintln!("{machine}: {} problem(s):", problems.len());
    for problem in &problems {
        eprintln!("  - {problem}");
    }
    eprintln!(
        "hint: `{}` re-encrypts secrets to the keys their links name (sops store); {}",
        crate::hint::command("vars fix", machine, &[]),
        generate_hint(vars, machine)
    );
    Ok(ExitKind::DeployFailed)
}

/// How a missing var of a sops or clan-core store is made: here, when the machine's
/// generators are this library's; else with clan-core's CLI.
fn generate_hint(vars: &MachineVars, machine: &str) -> String {
    if vars.generated_here() {
        format!(
            "`{}` makes missing vars",
            crate::hint::command("vars generate", machine, &[])
        )
    } else {
        format!("clan-core's CLI makes missing vars (clan vars generate {machine})")
    }
}

/// `clan vars fix`.
pub fn fix(args: &VarsFixArgs) -> Result<ExitKind, Error> {
    use crate::vars::clan_core_store::ClanCoreStore;
    let declared = declared(&args.hosts, &args.machines)?;
    let mut sops = Vec::new();
    let mut age = Vec::new();
    for (machine, vars) in &declared.machines {
        if let Some(vars) = vars {
            crate::vars::check_store(&declared.settings, machine, vars)?;
            match vars.clan_core {
                Some(ClanCoreStore::Sops) => sops.push((machine, vars)),
                // clan-core's age store is this tool's, file for file.
                Some(ClanCoreStore::Age) | None => age.push((machine, vars)),
            }
        }
    }
    // The sops store: each secret encrypted to exactly the keys its links name.
    if !sops.is_empty() {
        let user = user_identity()?;
        for (machine, vars) in sops {
            let changed = crate::vars::clan_core_store::fix(&declared.repo, machine, vars, user)?;
            crate::vars::generate::git_add(&declared.repo.root, &changed);
            let files = changed.iter().filter(|p| p.ends_with("secret")).count();
            eprintln!(
                "{machine}: {files} secret(s) re-encrypted, {} link(s) changed",
                changed.len() - files
            );
        }
        if age.is_empty() {
            return Ok(ExitKind::Success);
        }
    }
    let user = crate::vars::UserIdentity::find()?;
    let moved = crate::vars::generate::migrate_old_layout(&declared.repo, &user)?;
    if !moved.is_empty() {
        eprintln!(
            "moved {} secret(s) of the repository to clan-core's age layout (secrets/clan-vars/<scope>/<gen>/<file>/<file>.age); no secret changed",
            moved.len()
        );
    }
    let fixed =
        crate::vars::generate::fix_keys(&declared.repo, &declared.settings, &user, &args.machines)?;
    for machine in &fixed {
        let (keys, from) = declared.settings.recipients_of(machine);
        eprintln!(
            "{machine}: key re-encrypted to {} recipient(s) of {from}",
            keys.len()
        );
    }
    // Shared secrets: to exactly the machines that declare their generator now, which
    // takes every machine's declaration (evaluated again when only some were named).
    let shares = |vars: &MachineVars| {
        vars.generators
            .values()
            .any(|d| d.share && d.files.values().any(|f| f.secret && f.deploy))
    };
    if age.iter().any(|(_, vars)| shares(vars)) {
        let all;
        let every = if args.machines.is_empty() {
            &declared
        } else {
            all = self::declared(&args.hosts, &[])?;
            &all
        };
        let named: BTreeSet<String> = age
            .iter()
            .filter(|(_, v)| shares(v))
            .flat_map(|(_, v)| v.generators.keys().cloned())
            .collect();
        let fixed =
            crate::vars::generate::fix_all_shared(&declared.repo, &user, &every.machines, &named)?;
        for shared in fixed {
            eprintln!(
                "shared {}: {} re-encrypted to the machines that share it ({})",
                shared.generator,
                shared.vars.join(", "),
                shared.machines.join(", ")
            );
        }
    }
    // Secrets that are not deployed are encrypted to the people: to the current ones.
    for (machine, vars) in age {
        let rekeyed = crate::vars::generate::fix_undeployed(
            &declared.repo,
            &declared.settings,
            &user,
            machine,
            vars,
        )?;
        if !rekeyed.is_empty() {
            let (_, from) = declared.settings.recipients_of(machine);
            eprintln!(
                "{machine}: {} secret(s) not deployed re-encrypted to the recipients of {from}: {}",
                rekeyed.len(),
                rekeyed.join(", ")
            );
        }
    }
    Ok(ExitKind::Success)
}

/// `clan vars keygen`: the user's age key (made if there is none) added to the clan as a
/// sops user, as clan-core's keygen does.
pub fn keygen(args: &crate::cli::VarsKeygenArgs) -> Result<ExitKind, Error> {
    let user = match &args.user {
        Some(user) => user.clone(),
        None => std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| Error::usage("$USER is unset: name yourself with --user NAME"))?,
    };
    if user.is_empty()
        || user == "."
        || user == ".."
        || !user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(Error::usage(format!(
            "invalid user name {:?} (from --user or $USER): letters, digits and . _ -",
            crate::boundary::terminal_safe(&user)
        )));
    }
    let root = crate::commands::machines::clan_dir(&args.hosts.flake)?;
    let repo = Repo { root };
    let (identity, made) = crate::vars::UserIdentity::find_or_make()?;
    let keys = identity.recipients();
    match &made {
        Some(path) => eprintln!(
            "made your age key in {}: back it up, it is what opens this clan's secrets",
            path.display()
        ),
        None => eprintln!("your age key: {}", identity.source),
    }
    let written = crate::vars::sops_links::write_user_keys(&repo, &user, &keys, args.force)?;
    match &written {
        Some(path) => {
            crate::vars::generate::git_add(&repo.root, std::slice::from_ref(path));
            eprintln!("{user}: {} written (staged)", path.display());
        }
        None => eprintln!("{user}: the clan has this key already"),
    }
    // The public key, for people and scripts; this tool's own age store takes it in
    // vars.settings.recipients.
    for key in &keys {
        println!("{key}");
    }
    eprintln!(
        "hint: the sops store (the default) encrypts to the users in sops/users/; the age store (vars.settings.secretStore = \"age\") wants the key in vars.settings.recipients.default"
    );
    Ok(ExitKind::Success)
}

/// `clan vars upload`: generates what is missing, then sends the key and the encrypted
/// secrets to the machine's target over its own connection.
pub fn upload(upload_args: &VarsUploadArgs) -> Result<ExitKind, Error> {
    let args = &upload_args.on;
    let machine = &args.machine;
    let declared = declared(&args.hosts, std::slice::from_ref(machine))?;
    let vars = one(&declared, machine)?;
    Generation::new(&declared.repo, &declared.settings).machine(machine, &vars)?;
    let Some(upload) = SecretsUpload::of(&declared.repo, machine, &vars) else {
        eprintln!("{machine}: no secret to upload");
        return Ok(ExitKind::Success);
    };
    if let Some(dir) = &upload_args.directory {
        let bundle = upload.bundle(user_identity()?)?;
        let written = crate::vars::upload::unpack_into(&bundle, dir)?;
        eprintln!(
            "{machine}: {written} of {} files written to {} (as the target's {} would hold them)",
            upload.count(),
            dir.display(),
            upload.location
        );
        return Ok(ExitKind::Success);
    }
    let resolved = crate::commands::machines::load_machine(&args.hosts, machine)?;
    let target =
        crate::ssh::SshHost::new(resolved.target.value.clone(), args.connect.host_key_check);
    let bundle = upload.bundle(user_identity()?)?;
    let command = crate::ssh::RemoteCommand::Script {
        script: VARS_UPLOAD,
        args: upload.args(),
        sudo: None,
    };
    eprintln!(
        "{machine}: uploading {} files to {}:{} (straight to the target)",
        upload.count(),
        target.address,
        upload.location
    );
    // Root, or sudo (with the password asked once when it needs one).
    let as_root = crate::sudo::AsRoot::ask(machine, &target)?;
    // Under the target's deploy lock, as a deploy's upload is: never in the middle of one.
    let _lock = take_target_lock(&target, &as_root, args.lock_timeout)?;
    let out = crate::ssh::run_remote_with_input(
        &target,
        &as_root.command(command),
        &as_root.input(&bundle),
    )
    .map_err(|e| {
        if e.kind() == std::io::ErrorKind::Interrupted {
            crate::error::interrupted("during the upload (the target keeps its previous secrets)")
        } else {
            Error::new(format!("cannot run ssh: {e}"))
        }
    })?;
    if !out.status.success() {
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        return Err(upload_error(
            machine,
            &format!("target {}", target.address),
            out.status.code(),
            &output,
        ));
    }
    eprintln!(
        "{machine}: secrets in place on {}; they are decrypted at the next activation",
        target.address
    );
    Ok(ExitKind::Success)
}

/// Takes `target`'s deploy lock (`clan-activate lock`), as a deploy does; held until the
/// returned guard is dropped.
fn take_target_lock(
    target: &crate::ssh::SshHost,
    as_root: &crate::sudo::AsRoot,
    timeout: u32,
) -> Result<crate::execute::LockGuard, Error> {
    use crate::execute::LockEvent;
    let (run, who) = (
        crate::deploy::run_id(),
        crate::deploy::workstation_identity(),
    );
    let command = as_root.command(
        crate::activate::Command::Lock {
            run: &run,
            who: &who,
            wait: timeout,
            stale: crate::execute::LOCK_STALE.as_secs(),
        }
        .remote(),
    );
    let argv = target.ssh_argv(crate::ssh::Side::WorkstationBatch, &command);
    crate::execute::take_lock(&argv, as_root.password(), |event| {
        if let LockEvent::Waiting(holder) = event {
            eprintln!("waiting for the target's deploy lock, held by {holder}");
        }
    })
    .map_err(|(code, output)| {
        if code == Some(130) {
            return crate::error::interrupted("while waiting for the target's deploy lock");
        }
        Error::new(format!(
            "cannot take the deploy lock of {}{}; nothing was uploaded",
            target.address,
            match code {
                Some(c) if c == crate::activate::Exit::LockBusy.code() => {
                    " (another deploy holds it)".to_string()
                }
                Some(c) => format!(" (exit {c})"),
                None => String::new(),
            }
        ))
        .detail(output)
        .hint(Hint::text(
            "wait for that deploy to end, or wait longer with --lock-timeout SECONDS",
        ))
    })
}
