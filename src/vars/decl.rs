//! What machines declare (`clan.core.vars`, the clan's `vars.settings`), and its checks:
//! every name and setting that becomes a path or an argument is checked once, here.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::clan_core_store;
use crate::error::{Error, Hint};

/// `vars.settings` of the clan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VarsSettings {
    /// Only "age" here.
    #[serde(default)]
    pub secret_store: Option<String>,
    /// Who may decrypt machine keys.
    #[serde(default)]
    pub recipients: Recipients,
}

/// `vars.settings.recipients`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Recipients {
    /// Every machine's, unless `hosts` names the machine.
    #[serde(default)]
    pub default: Vec<String>,
    /// Per machine, instead of `default`.
    #[serde(default)]
    pub hosts: BTreeMap<String, Vec<String>>,
}

impl VarsSettings {
    /// The age public keys that may decrypt `machine`'s key, and the setting they come from.
    pub fn recipients_of(&self, machine: &str) -> (&[String], String) {
        match self.recipients.hosts.get(machine) {
            Some(keys) => (keys, format!("vars.settings.recipients.hosts.{machine}")),
            None => (
                &self.recipients.default,
                "vars.settings.recipients.default".into(),
            ),
        }
    }
}

/// What a machine declares (`clan.core.vars`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineVars {
    /// `clan.core.vars.age.secretLocation`.
    pub secret_location: String,
    /// clan-core's `clan.core.vars.settings.secretModule`, where a flake sets it.
    #[serde(default)]
    pub secret_module: Option<String>,
    /// clan-core's `clan.core.vars.sops.secretUploadDirectory`, where a flake sets it.
    #[serde(default)]
    pub sops_upload_directory: Option<String>,
    /// clan-core's `clan.core.sops.defaultGroups`: groups every sops secret of the machine
    /// is for too.
    #[serde(default)]
    pub sops_default_groups: Vec<String>,
    /// Kept in one of clan-core's stores ([`clan_core_store`], decided where the clan's
    /// settings are known).
    #[serde(skip)]
    pub clan_core: Option<clan_core_store::ClanCoreStore>,
    /// `clan.core.vars.generators`.
    pub generators: BTreeMap<String, GeneratorDecl>,
}

impl MachineVars {
    /// Whether this tool runs the machine's generators: they are its own library's, not
    /// clan-core's (whose `finalScript` it does not run).
    pub fn generated_here(&self) -> bool {
        !self.generators.values().any(|g| g.from_clan_core)
    }
}

/// The shared generators of a run, each as the first machine that declares it declares it:
/// as in clan-core, two machines may not declare one shared generator differently (its
/// files, apart from their owner, group and mode; its prompts, dependencies or validation),
/// since one shared value cannot come from two definitions.
#[derive(Debug, Default)]
pub struct SharedDefinitions(BTreeMap<String, (String, GeneratorDecl)>);

impl SharedDefinitions {
    /// Records `machine`'s shared generators; an error names the first one it declares
    /// differently from an earlier machine, and how.
    pub fn check(&mut self, machine: &str, vars: &MachineVars) -> Result<(), Error> {
        for (g, decl) in vars.generators.iter().filter(|(_, d)| d.share) {
            let Some((first, theirs)) = self.0.get(g) else {
                self.0
                    .insert(g.clone(), (machine.to_string(), decl.clone()));
                continue;
            };
            let what = |f: &FileDecl| (f.secret, f.deploy, f.needed_for.clone());
            let mut differ = Vec::new();
            if theirs.files.len() != decl.files.len()
                || theirs
                    .files
                    .iter()
                    .any(|(f, file)| decl.files.get(f).map(what) != Some(what(file)))
            {
                differ.push("files");
            }
            if theirs.prompts != decl.prompts {
                differ.push("prompts");
            }
            if theirs.dependencies != decl.dependencies {
                differ.push("dependencies");
            }
            if theirs.validation_hash != decl.validation_hash {
                differ.push("validation");
            }
            if !differ.is_empty() {
                return Err(Error::usage(format!(
                    "machines {first} and {machine} declare the shared generator {g} differently (in: {}): one shared value cannot come from two definitions; nothing of it was generated",
                    differ.join(", ")
                ))
                .code("vars.shared-differs")
                .hint(Hint::text(format!(
                    "make clan.core.vars.generators.{g} the same on both machines (owner, group and mode may differ)"
                ))));
            }
        }
        Ok(())
    }
}

/// One generator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GeneratorDecl {
    /// One value for every machine that shares it.
    #[serde(default)]
    pub share: bool,
    /// Generators whose files it reads.
    #[serde(default)]
    pub dependencies: Vec<String>,
    /// Its shell script.
    #[serde(default)]
    pub script: String,
    /// Packages on its PATH.
    #[serde(default)]
    pub runtime_inputs: Vec<RuntimeInput>,
    /// Made by clan-core's library (it has a `finalScript`): its `script` and
    /// `runtimeInputs` are not read, and this tool does not run it ([`super::foreign_store`]).
    #[serde(default)]
    pub from_clan_core: bool,
    /// sha256 of its `validation` (clan-core's `validationHash`): when it differs from the
    /// one stored beside its values, it runs again.
    #[serde(default)]
    pub validation_hash: Option<String>,
    /// Questions for the user.
    #[serde(default)]
    pub prompts: BTreeMap<String, PromptDecl>,
    /// What it must produce.
    #[serde(default)]
    pub files: BTreeMap<String, FileDecl>,
}

/// A package of `runtimeInputs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RuntimeInput {
    /// Its derivation, built on the workstation before the script runs.
    pub drv: Option<String>,
    /// Its output; `bin/` goes on PATH.
    pub out: String,
}

/// A prompt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PromptDecl {
    /// What is asked.
    pub description: String,
    /// `hidden`, `line` or `multiline`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Stored as a file of the same name.
    #[serde(default)]
    pub persist: bool,
}

/// A file a generator produces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileDecl {
    /// Encrypted (true) or a public value.
    pub secret: bool,
    /// Uploaded to the machine.
    pub deploy: bool,
    /// Owner on the target.
    pub owner: String,
    /// Group on the target.
    pub group: String,
    /// Mode on the target.
    pub mode: String,
    /// `partitioning`, `activation`, `users` or `services`.
    pub needed_for: String,
}

impl FileDecl {
    /// Whether `clan vars upload` sends it: a deployed secret needed at or after activation.
    pub fn uploaded(&self) -> bool {
        self.secret && self.deploy && self.needed_for != "partitioning"
    }
}

/// Why `location` may not hold uploaded secrets, if it may not: the upload replaces the
/// directory it names, so it must be one of its own, never a directory of the system or a
/// user's (the target's side also refuses any directory that clan did not make).
pub(crate) fn protected_location(location: &str) -> Option<&'static str> {
    const SYSTEM: &[&str] = &[
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/etc/ssh",
        "/home",
        "/lib",
        "/lib64",
        "/media",
        "/mnt",
        "/nix",
        "/nix/store",
        "/nix/var",
        "/opt",
        "/proc",
        "/root",
        "/root/.ssh",
        "/run",
        "/sbin",
        "/srv",
        "/sys",
        "/tmp",
        "/usr",
        "/var",
        "/var/lib",
        "/var/log",
    ];
    let trimmed = location.trim_end_matches('/');
    let mut parts = trimmed.split('/').skip(1);
    if SYSTEM.contains(&trimmed) {
        return Some(
            "a directory of the system, which the upload would replace: use a directory of its own, such as /etc/secret-vars",
        );
    }
    if matches!(parts.next(), Some("nix" | "proc" | "sys" | "dev")) {
        return Some(
            "inside /nix, /proc, /sys or /dev: use a directory of its own, such as /etc/secret-vars",
        );
    }
    if trimmed.starts_with("/home/") && trimmed.matches('/').count() == 2 {
        return Some(
            "a user's home directory, which the upload would replace: use a directory of its own, such as /etc/secret-vars",
        );
    }
    None
}

/// A name used as one path component: letters, digits, `.`, `_`, `-`, not `.` or `..`.
fn path_component_ok(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A path that can be neither an option nor more than one PATH entry: absolute, each
/// component a plain name.
fn store_like_path(path: &str) -> bool {
    path.len() > 1
        && path.len() <= 4096
        && path.starts_with('/')
        && path[1..].split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '+' | '-'))
        })
}

/// A user or group name as the target's tools take it.
fn account_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl MachineVars {
    /// Checks every name and setting that becomes a path or an argument, once: an error
    /// names the value and the option it comes from.
    pub fn check(&self, machine: &str) -> Result<(), Error> {
        // The machine's name is a path component of its vars too.
        crate::boundary::MachineName::parse(
            machine,
            &crate::boundary::Origin::Flake("machines".into()),
        )
        .map_err(|e| Error::usage(e.to_string()))?;
        let refuse = |attr: String, value: &str, rule: &str| {
            Error::usage(format!(
                "invalid {value:?} (from the flake, nixosConfigurations.{machine}.config.clan.core.vars.{attr}): {rule}",
                value = crate::boundary::terminal_safe(value)
            ))
        };
        for group in &self.sops_default_groups {
            if !path_component_ok(group) {
                return Err(Error::usage(format!(
                    "invalid {:?} (from the flake, nixosConfigurations.{machine}.config.clan.core.sops.defaultGroups): a group name, a path component of letters, digits and . _ -",
                    crate::boundary::terminal_safe(group)
                )));
            }
        }
        let locations = std::iter::once(("age.secretLocation", &self.secret_location)).chain(
            self.sops_upload_directory
                .iter()
                .map(|d| ("sops.secretUploadDirectory", d)),
        );
        for (attr, loc) in locations {
            if !loc.starts_with('/')
                || loc == "/"
                || loc.split('/').any(|c| c == "." || c == "..")
                || !loc.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '+' | '@')
                })
            {
                return Err(refuse(
                    attr.into(),
                    loc,
                    "an absolute directory path other than /, of letters, digits and / . _ - + @",
                ));
            }
            if let Some(why) = protected_location(loc) {
                return Err(refuse(attr.into(), loc, why));
            }
        }
        for (g, decl) in &self.generators {
            if !path_component_ok(g) {
                return Err(refuse(
                    format!("generators.{g:?}"),
                    g,
                    "a generator name is a path component: letters, digits, . _ -",
                ));
            }
            // Their paths become arguments of nix-store and entries of PATH.
            for input in &decl.runtime_inputs {
                for path in std::iter::once(&input.out).chain(&input.drv) {
                    if !store_like_path(path) {
                        return Err(refuse(
                            format!("generators.{g}.runtimeInputs"),
                            path,
                            "a store path: absolute, of letters, digits and / . _ + -",
                        ));
                    }
                }
                if input.drv.as_ref().is_some_and(|d| !d.ends_with(".drv")) {
                    return Err(refuse(
                        format!("generators.{g}.runtimeInputs"),
                        input.drv.as_deref().unwrap_or(""),
                        "a derivation path ends with .drv",
                    ));
                }
            }
            for dep in &decl.dependencies {
                let Some(theirs) = self.generators.get(dep) else {
                    return Err(refuse(
                        format!("generators.{g}.dependencies"),
                        dep,
                        "no generator of this machine has that name",
                    ));
                };
                // One value for every machine cannot come from one machine's own.
                if decl.share && !theirs.share {
                    return Err(refuse(
                        format!("generators.{g}.dependencies"),
                        dep,
                        "a shared generator (share = true) cannot depend on a generator of the machine's own: share that one too, or do not share this one",
                    ));
                }
            }
            for (p, prompt) in &decl.prompts {
                if !path_component_ok(p) {
                    return Err(refuse(
                        format!("generators.{g}.prompts"),
                        p,
                        "a prompt name is a path component: letters, digits, . _ -",
                    ));
                }
                if !matches!(
                    prompt.kind.as_str(),
                    "hidden" | "line" | "multiline" | "multiline-hidden"
                ) {
                    return Err(refuse(
                        format!("generators.{g}.prompts.{p}.type"),
                        &prompt.kind,
                        "one of hidden, line, multiline, multiline-hidden",
                    ));
                }
            }
            for (f, file) in &decl.files {
                let at = |o: &str| format!("generators.{g}.files.{f}.{o}");
                if !path_component_ok(f) {
                    return Err(refuse(
                        format!("generators.{g}.files"),
                        f,
                        "a file name is a path component: letters, digits, . _ -",
                    ));
                }
                if !account_ok(&file.owner) {
                    return Err(refuse(at("owner"), &file.owner, "a user name"));
                }
                if !account_ok(&file.group) {
                    return Err(refuse(at("group"), &file.group, "a group name"));
                }
                let mode = file.mode.strip_prefix('0').unwrap_or(&file.mode);
                if mode.len() != 3 || !mode.chars().all(|c| ('0'..='7').contains(&c)) {
                    return Err(refuse(at("mode"), &file.mode, "an octal mode like 0400"));
                }
                if !matches!(
                    file.needed_for.as_str(),
                    "partitioning" | "activation" | "users" | "services"
                ) {
                    return Err(refuse(
                        at("neededFor"),
                        &file.needed_for,
                        "one of partitioning, activation, users, services",
                    ));
                }
            }
        }
        dependency_order(&self.generators).map(|_| ())
    }

    /// The files `clan vars upload` sends: (generator, file, path in the secret location).
    pub fn uploaded_files(&self, machine: &str) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for (g, decl) in &self.generators {
            for (f, file) in &decl.files {
                if file.uploaded() {
                    out.push((
                        g.clone(),
                        f.clone(),
                        format!("{}/{g}/{f}/{f}.age", scope(machine, decl)),
                    ));
                }
            }
        }
        out
    }
}

/// The generators in an order where each comes after its dependencies; a cycle is an error
/// naming it.
pub fn dependency_order(
    generators: &BTreeMap<String, GeneratorDecl>,
) -> Result<Vec<String>, Error> {
    fn visit(
        name: &str,
        generators: &BTreeMap<String, GeneratorDecl>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), Error> {
        if done.contains(name) {
            return Ok(());
        }
        if let Some(at) = path.iter().position(|p| p == name) {
            let mut cycle = path[at..].to_vec();
            cycle.push(name.to_string());
            return Err(Error::usage(format!(
                "the vars generators depend on each other in a cycle: {}",
                cycle.join(" → ")
            ))
            .hint(Hint::text(
                "remove one of these from the others' clan.core.vars.generators.<name>.dependencies",
            )));
        }
        path.push(name.to_string());
        if let Some(decl) = generators.get(name) {
            for dep in &decl.dependencies {
                visit(dep, generators, path, done, order)?;
            }
        }
        path.pop();
        done.insert(name.to_string());
        order.push(name.to_string());
        Ok(())
    }
    let (mut done, mut order) = (BTreeSet::new(), Vec::new());
    for name in generators.keys() {
        visit(name, generators, &mut Vec::new(), &mut done, &mut order)?;
    }
    Ok(order)
}

/// `per-machine/<m>` or `shared`: where a generator's files are, under `vars/` and
/// `secrets/clan-vars/`.
pub fn scope(machine: &str, decl: &GeneratorDecl) -> String {
    if decl.share {
        "shared".into()
    } else {
        format!("per-machine/{machine}")
    }
}
