//! Clan vars with the age backend: what machines declare, where the repository keeps the
//! values, the user's age identity, machine keys, and encryption.
//!
//! Layout (clan-core's, relative to the clan's directory):
//! - public files: `vars/per-machine/<m>/<decl>/<file>/value`, `vars/shared/<decl>/<file>/value`
//! - secret files, encrypted to machine keys:
//!   `secrets/clan-vars/per-machine/<m>/<decl>/<file>.age`, `secrets/clan-vars/shared/<decl>/<file>.age`
//! - machine keys: `secrets/age-keys/machines/<m>/pub` (age public key) and `key.age` (the
//!   private key, encrypted to the people in `vars.settings.recipients`).
//!
//! Where a secret exists: in the generator's private temporary directory while it runs
//! (removed after), in this process's memory (zeroed when dropped), encrypted in the
//! repository, in the ssh channel to the target, and on the target (encrypted in its secret
//! location, decrypted at activation). Never on the build host, in the store, in a log or on
//! a command line.

pub mod clan_core_store;
pub mod generate;
pub mod sops;
pub mod upload;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::error::{Error, Hint};

/// Secret bytes, wiped from memory when dropped.
pub type Secret = Zeroizing<Vec<u8>>;

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
    /// Kept in one of clan-core's stores ([`clan_core_store`], decided where the clan's
    /// settings are known).
    #[serde(skip)]
    pub clan_core: Option<clan_core_store::ClanCoreStore>,
    /// `clan.core.vars.generators`.
    pub generators: BTreeMap<String, GeneratorDecl>,
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
    /// `runtimeInputs` are not read, and this tool does not run it ([`foreign_store`]).
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
fn protected_location(location: &str) -> Option<&'static str> {
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

/// Refuses a machine whose secrets live in a store this tool does not keep: clan-core's
/// sops store (its default), and any store chosen through clan-core's own library (its
/// `secretModule`), whose age store too keeps files at other paths and decrypts them from
/// the system closure. Generating or uploading with this tool's store would make new
/// secrets beside the user's and hand the target keys that open none of them.
pub fn check_store(
    settings: &VarsSettings,
    machine: &str,
    vars: &MachineVars,
) -> Result<(), Error> {
    match foreign_store(settings, machine, vars) {
        None => Ok(()),
        Some(which) => Err(Error::usage(format!(
            "{which}: nothing was generated or uploaded"
        ))
        .code("vars.store-unsupported")
        .hint(Hint::text(
            "deploy without secrets (--no-secrets; the target keeps the ones it has) and manage vars with clan-core's CLI; this tool makes and uploads secrets for clans on its own library (see the README's Secrets section)",
        ))),
    }
}

/// Which of clan-core's stores keeps the machine's vars, if one does: sops when the clan
/// says `vars.settings.secretStore = "sops"` or clan-core's library chooses its sops module
/// (its default), age when clan-core's library chooses its age module. This tool reads and
/// deploys both ([`clan_core_store`]); its own age store is chosen by `secretStore = "age"`
/// (or nothing) on its own library.
pub fn clan_core_store(
    settings: &VarsSettings,
    vars: &MachineVars,
) -> Option<clan_core_store::ClanCoreStore> {
    use clan_core_store::ClanCoreStore;
    // The machine's own choice (clan-core's library sets it on every machine) wins over the
    // clan's default.
    match vars.secret_module.as_deref() {
        Some(module) if module.ends_with(".sops") => Some(ClanCoreStore::Sops),
        Some(module) if module.ends_with(".age") => Some(ClanCoreStore::Age),
        Some(_) => None,
        None => (settings.secret_store.as_deref() == Some("sops")).then_some(ClanCoreStore::Sops),
    }
}

/// Where the machine's key goes on the target for sops-nix: `secretUploadDirectory`
/// (clan-core's default `/var/lib/sops-nix`).
pub fn sops_upload_directory(vars: &MachineVars) -> String {
    vars.sops_upload_directory
        .clone()
        .unwrap_or_else(|| "/var/lib/sops-nix".into())
}

/// Which store, not kept by this tool, holds the machine's secrets, and where that choice
/// comes from, in words (see [`check_store`]); `None`: this tool's own age store.
pub fn foreign_store(settings: &VarsSettings, machine: &str, vars: &MachineVars) -> Option<String> {
    let module_attr =
        || format!("nixosConfigurations.{machine}.config.clan.core.vars.settings.secretModule");
    if clan_core_store(settings, vars).is_some() {
        return None;
    }
    let (store, from, why) = match (&settings.secret_store, &vars.secret_module) {
        // The machine's own choice first, as in clan_core_store.
        (_, Some(module)) => (
            format!("{module:?}"),
            module_attr(),
            "which this tool does not support yet (only its own age store and clan-core's sops and age stores)",
        ),
        (Some(store), None) if store != "age" => (
            format!("{store:?}"),
            "vars.settings.secretStore".to_string(),
            "which this tool does not support yet (only its own age store and clan-core's sops and age stores)",
        ),
        // clan-core's library, whose secretModule did not evaluate: its generators are
        // still clan-core's, never run here with an empty script.
        _ if vars.generators.values().any(|g| g.from_clan_core) => (
            "of clan-core's library".to_string(),
            format!(
                "nixosConfigurations.{machine}.config.clan.core.vars.generators, which carry clan-core's finalScript"
            ),
            "whose generators this tool does not run yet (only its own library's)",
        ),
        _ => return None,
    };
    Some(format!(
        "machine {machine} keeps its vars in the secret store {store} (from {from}), {why}"
    ))
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
                if !self.generators.contains_key(dep) {
                    return Err(refuse(
                        format!("generators.{g}.dependencies"),
                        dep,
                        "no generator of this machine has that name",
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
                        format!("{}/{g}/{f}.age", scope(machine, decl)),
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

/// The clan's directory, where vars are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repo {
    /// Its root (the flake's directory).
    pub root: PathBuf,
}

impl Repo {
    /// A public file's value.
    pub fn value_path(&self, machine: &str, g: &str, decl: &GeneratorDecl, f: &str) -> PathBuf {
        self.root
            .join("vars")
            .join(scope(machine, decl))
            .join(g)
            .join(f)
            .join("value")
    }

    /// A secret file, encrypted.
    pub fn secret_path(&self, machine: &str, g: &str, decl: &GeneratorDecl, f: &str) -> PathBuf {
        self.root
            .join("secrets/clan-vars")
            .join(scope(machine, decl))
            .join(g)
            .join(format!("{f}.age"))
    }

    /// A machine's age public key.
    pub fn machine_pub(&self, machine: &str) -> PathBuf {
        self.root
            .join("secrets/age-keys/machines")
            .join(machine)
            .join("pub")
    }

    /// A machine's private key, encrypted to the recipients.
    pub fn machine_key(&self, machine: &str) -> PathBuf {
        self.root
            .join("secrets/age-keys/machines")
            .join(machine)
            .join("key.age")
    }

    /// Machines that have a key in the repository.
    pub fn machines_with_keys(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.join("secrets/age-keys/machines"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("key.age").is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }

    /// Where generator `g`'s validation hash is kept (clan-core's `.validation-hash`, beside
    /// its public values).
    pub fn validation_path(&self, machine: &str, g: &str, decl: &GeneratorDecl) -> PathBuf {
        self.root
            .join("vars")
            .join(scope(machine, decl))
            .join(g)
            .join(".validation-hash")
    }

    /// Whether the stored validation hash is the declared one (as clan-core decides: no
    /// hash declared and none stored is valid too).
    pub fn validation_current(&self, machine: &str, g: &str, decl: &GeneratorDecl) -> bool {
        let stored = std::fs::read_to_string(self.validation_path(machine, g, decl))
            .ok()
            .map(|s| s.trim().to_string());
        stored == decl.validation_hash
    }

    /// Whether every file of generator `g` is in the repository.
    pub fn generated(&self, machine: &str, g: &str, decl: &GeneratorDecl) -> bool {
        decl.files.iter().all(|(f, file)| {
            if file.secret {
                self.secret_path(machine, g, decl, f).is_file()
            } else {
                self.value_path(machine, g, decl, f).is_file()
            }
        })
    }

    /// The machine's public key, if it has one.
    pub fn machine_recipient(
        &self,
        machine: &str,
    ) -> Result<Option<age::x25519::Recipient>, Error> {
        let path = self.machine_pub(machine);
        match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map(Some).map_err(|_| {
                Error::usage(format!(
                    "{} is not an age public key (age1…)",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::new(format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Where another store keeps file `f` of generator `g`, if a file is there: clan-core's
    /// sops layout (`vars/<scope>/<g>/<f>/secret`) or its age layout
    /// (`secrets/clan-vars/<scope>/<g>/<f>/<f>.age`).
    pub fn foreign_secret(
        &self,
        machine: &str,
        g: &str,
        decl: &GeneratorDecl,
        f: &str,
    ) -> Option<PathBuf> {
        let scope = scope(machine, decl);
        [
            self.root
                .join("vars")
                .join(&scope)
                .join(g)
                .join(f)
                .join("secret"),
            self.root
                .join("secrets/clan-vars")
                .join(&scope)
                .join(g)
                .join(f)
                .join(format!("{f}.age")),
        ]
        .into_iter()
        .find(|p| p.exists())
    }

    /// Whether both halves of the machine's key are in the repository.
    pub fn has_key(&self, machine: &str) -> bool {
        self.machine_pub(machine).is_file() && self.machine_key(machine).is_file()
    }

    /// The files under `secrets/clan-vars/per-machine/<machine>`: secrets encrypted to that
    /// machine's key.
    pub fn secrets_of(&self, machine: &str) -> Vec<PathBuf> {
        fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, found);
                } else {
                    found.push(path);
                }
            }
        }
        let mut found = Vec::new();
        walk(
            &self
                .root
                .join("secrets/clan-vars/per-machine")
                .join(machine),
            &mut found,
        );
        found.sort();
        found
    }

    /// The machine's public key, made (with its private key encrypted to the machine's
    /// recipients) when it has none yet. A key is a fact, never a default: when the
    /// repository already holds secrets for the machine (encrypted to a key it must have
    /// had), or half of a key, no new key is made: that would leave those secrets, and the
    /// target that holds the old key, unable to decrypt.
    pub fn ensure_machine_key(
        &self,
        machine: &str,
        settings: &VarsSettings,
    ) -> Result<age::x25519::Recipient, Error> {
        if let Some(recipient) = self.machine_recipient(machine)? {
            if !self.machine_key(machine).is_file() {
                return Err(self.key_missing(machine, &[]));
            }
            return Ok(recipient);
        }
        let secrets = self.secrets_of(machine);
        if !secrets.is_empty() || self.machine_key(machine).exists() {
            return Err(self.key_missing(machine, &secrets));
        }
        let recipients = parse_recipients(settings, machine)?;
        let identity = age::x25519::Identity::generate();
        let private = Zeroizing::new(
            age::secrecy::ExposeSecret::expose_secret(&identity.to_string()).to_string(),
        );
        let encrypted = encrypt(&recipients, private.as_bytes())?;
        write_atomically(&self.machine_key(machine), &encrypted)?;
        write_atomically(
            &self.machine_pub(machine),
            format!("{}\n", identity.to_public()).as_bytes(),
        )?;
        Ok(identity.to_public())
    }

    /// The error of a machine whose key is (partly) missing while its secrets are there.
    pub fn key_missing(&self, machine: &str, secrets: &[PathBuf]) -> Error {
        let missing: Vec<String> = [self.machine_pub(machine), self.machine_key(machine)]
            .into_iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        let held = match secrets.len() {
            0 => String::new(),
            n => format!(
                " while the repository holds {n} secret(s) encrypted to its key (e.g. {})",
                secrets[0].display()
            ),
        };
        Error::usage(format!(
            "machine {machine}'s key is missing ({}){held}: refusing to make a new one, which would leave those secrets and the target's key unable to decrypt anything",
            missing.join(", ")
        ))
        .hint(Hint::text(format!(
            "the key is most likely untracked in another checkout: commit secrets/age-keys/machines/{machine}/ there (git add), or copy it here; to start over on purpose, delete secrets/clan-vars/per-machine/{machine}/ and generate again"
        )))
    }

    /// Every secret uploaded to `machine` decrypts with the machine key that would be
    /// uploaded with it: checked before anything is built, so an upload never hands the
    /// target a key that opens none of its secrets.
    pub fn check_upload(
        &self,
        machine: &str,
        vars: &MachineVars,
        user: &UserIdentity,
    ) -> Result<(), Error> {
        let files = vars.uploaded_files(machine);
        if files.is_empty() {
            return Ok(());
        }
        let identity = self.machine_identity(machine, user)?;
        for (g, f, rel) in files {
            let path = self.root.join("secrets/clan-vars").join(&rel);
            let encrypted = std::fs::read(&path).map_err(|e| {
                Error::usage(format!(
                    "machine {machine}'s secret {g}/{f} is missing ({}: {e})",
                    path.display()
                ))
                .hint(Hint::text(format!(
                    "run `{}`",
                    crate::hint::command("vars generate", machine, &[])
                )))
            })?;
            decrypt_with(std::slice::from_ref(&identity), &encrypted).map_err(|e| {
                Error::usage(format!(
                    "machine {machine}'s secret {g}/{f} ({}) does not decrypt with the machine key that would be uploaded with it ({}): {e}; nothing was uploaded",
                    path.display(),
                    self.machine_key(machine).display()
                ))
                .hint(Hint::text(format!(
                    "the key was replaced, or the secret was encrypted to another key: restore the machine's key from where the secrets were made, or regenerate with `{}`", crate::hint::command("vars generate", machine, &["--generator", &g, "--regenerate"])
                )))
            })?;
        }
        Ok(())
    }

    /// The machine's private key, decrypted with the user's identity.
    pub fn machine_identity(
        &self,
        machine: &str,
        user: &UserIdentity,
    ) -> Result<age::x25519::Identity, Error> {
        let text = self.machine_private_key(machine, user)?;
        let text = std::str::from_utf8(&text).unwrap_or("");
        text.trim().parse().map_err(|_| {
            Error::usage(format!(
                "{} does not hold an age private key",
                self.machine_key(machine).display()
            ))
        })
    }

    /// The machine's private key as text (`AGE-SECRET-KEY-1…`), decrypted.
    pub fn machine_private_key(&self, machine: &str, user: &UserIdentity) -> Result<Secret, Error> {
        let path = self.machine_key(machine);
        let secrets = self.secrets_of(machine);
        if !path.is_file() && !secrets.is_empty() {
            return Err(self.key_missing(machine, &secrets));
        }
        let encrypted = std::fs::read(&path).map_err(|e| {
            Error::usage(format!(
                "machine {machine} has no key in the repository ({}: {e})",
                path.display()
            ))
            .hint(Hint::text(format!(
                "run `{}`: it makes the machine's key",
                crate::hint::command("vars generate", machine, &[])
            )))
        })?;
        user.decrypt(&encrypted).map_err(|e| {
            Error::usage(format!(
                "cannot decrypt {} with your age identity ({}): {e}",
                path.display(),
                user.source
            ))
            .hint(Hint::text(format!(
                "your public key must be in vars.settings.recipients (default or hosts.{machine}); someone who can decrypt it runs `clan vars fix` after adding it"
            )))
        })
    }
}

/// The machine's recipients from the settings, parsed; none is an error.
pub fn parse_recipients(
    settings: &VarsSettings,
    machine: &str,
) -> Result<Vec<age::x25519::Recipient>, Error> {
    let (keys, from) = settings.recipients_of(machine);
    if keys.is_empty() {
        return Err(Error::usage(format!(
            "no one may decrypt machine {machine}'s secrets: {from} is empty"
        ))
        .hint(Hint::text(
            "set vars.settings.recipients.default = [ \"age1…\" ] in the clan (your public key: `age-keygen -y` of your identity file)",
        )));
    }
    keys.iter()
        .map(|k| {
            k.trim().parse::<age::x25519::Recipient>().map_err(|_| {
                Error::usage(format!(
                    "invalid age public key {:?} (from the flake, {from}): an age X25519 recipient, age1…",
                    crate::boundary::terminal_safe(k)
                ))
            })
        })
        .collect()
}

/// Encrypts `plaintext` to every recipient.
pub fn encrypt(recipients: &[age::x25519::Recipient], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|_| Error::new("cannot encrypt: no usable recipient"))?;
    let mut out = Vec::new();
    let mut writer = encryptor
        .wrap_output(&mut out)
        .map_err(|e| Error::new(format!("cannot encrypt: {e}")))?;
    std::io::Write::write_all(&mut writer, plaintext)
        .and_then(|()| writer.finish().map(|_| ()))
        .map_err(|e| Error::new(format!("cannot encrypt: {e}")))?;
    Ok(out)
}

/// Why a decryption failed, in words (age's own messages go through a localizer that can
/// panic in some environments, so they are never formatted).
fn decrypt_failure(e: &age::DecryptError) -> String {
    match e {
        age::DecryptError::NoMatchingKeys => "no identity given matches its recipients".into(),
        age::DecryptError::Io(io) => format!("cannot read it: {}", io.kind()),
        age::DecryptError::UnknownFormat | age::DecryptError::InvalidHeader => {
            "it is not an age file".into()
        }
        _ => "it is damaged or not for these identities".into(),
    }
}

/// Decrypts `ciphertext` with any of `identities`.
pub fn decrypt_with(
    identities: &[age::x25519::Identity],
    ciphertext: &[u8],
) -> Result<Secret, String> {
    let decryptor = age::Decryptor::new_buffered(ciphertext).map_err(|e| decrypt_failure(&e))?;
    let mut reader = decryptor
        .decrypt(identities.iter().map(|i| i as &dyn age::Identity))
        .map_err(|e| decrypt_failure(&e))?;
    let mut plain = Zeroizing::new(Vec::new());
    reader
        .read_to_end(&mut plain)
        .map_err(|_| "it is damaged (its payload does not authenticate)".to_string())?;
    Ok(plain)
}

/// Writes `bytes` to `path` (its directories made): aside first, then renamed, so the file
/// is whole or absent. Files are 0644: everything written is public or encrypted.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path.parent().expect("a file in a directory");
    let fail = |e: std::io::Error| Error::new(format!("cannot write {}: {e}", path.display()));
    std::fs::create_dir_all(dir).map_err(fail)?;
    let aside = dir.join(format!(
        ".{}.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("new"),
        std::process::id()
    ));
    std::fs::write(&aside, bytes).map_err(fail)?;
    std::fs::rename(&aside, path).map_err(fail)
}

/// The user's age identity, as clan-core looks for it.
pub struct UserIdentity {
    /// Where it came from, for messages (never its content).
    pub source: String,
    identities: Vec<age::x25519::Identity>,
}

impl UserIdentity {
    /// Decrypts with it.
    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Secret, String> {
        decrypt_with(&self.identities, ciphertext)
    }

    /// Its public keys.
    pub fn recipients(&self) -> Vec<String> {
        self.identities
            .iter()
            .map(|i| i.to_public().to_string())
            .collect()
    }

    /// Parses an identity file's text (comments and empty lines skipped).
    pub fn parse(source: String, text: &str) -> Result<UserIdentity, Error> {
        let mut identities = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with("AGE-PLUGIN-") {
                return Err(Error::usage(format!(
                    "{source}, line {}: age plugin identities are not supported by this tool",
                    n + 1
                ))
                .hint(Hint::text("use an X25519 identity (age-keygen)")));
            }
            match line.parse::<age::x25519::Identity>() {
                Ok(identity) => identities.push(identity),
                Err(_) => {
                    return Err(Error::usage(format!(
                        "{source}, line {}: not an age identity (AGE-SECRET-KEY-1…)",
                        n + 1
                    )));
                }
            }
        }
        if identities.is_empty() {
            return Err(Error::usage(format!("{source} holds no age identity")));
        }
        Ok(UserIdentity { source, identities })
    }

    /// From `AGE_KEY`, `AGE_KEYFILE`, `SOPS_AGE_KEY`, `SOPS_AGE_KEY_FILE` (where sops and
    /// clan-core's sops store look), `~/.config/age/identities`,
    /// `~/.config/sops/age/keys.txt` or `~/.age/key.txt`: the first that is set or exists.
    pub fn find() -> Result<UserIdentity, Error> {
        for (key_var, file_var) in [
            ("AGE_KEY", "AGE_KEYFILE"),
            ("SOPS_AGE_KEY", "SOPS_AGE_KEY_FILE"),
        ] {
            if let Ok(key) = std::env::var(key_var)
                && !key.trim().is_empty()
            {
                return UserIdentity::parse(key_var.into(), &key);
            }
            if let Ok(file) = std::env::var(file_var)
                && !file.is_empty()
            {
                let path = PathBuf::from(file);
                let text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
                    Error::usage(format!(
                        "{file_var}={}: cannot read it: {e}",
                        path.display()
                    ))
                })?);
                return UserIdentity::parse(format!("{file_var}={}", path.display()), &text);
            }
        }
        let mut candidates = Vec::new();
        if let Some(home) = std::env::var_os("HOME") {
            let home = PathBuf::from(home);
            candidates.push(home.join(".config/age/identities"));
            candidates.push(home.join(".config/sops/age/keys.txt"));
            candidates.push(home.join(".age/key.txt"));
        }
        for path in &candidates {
            if path.is_file() {
                let text =
                    Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                        Error::usage(format!("cannot read {}: {e}", path.display()))
                    })?);
                return UserIdentity::parse(path.display().to_string(), &text);
            }
        }
        Err(Error::usage(
            "no age identity: AGE_KEY, AGE_KEYFILE, SOPS_AGE_KEY and SOPS_AGE_KEY_FILE are unset, and none of ~/.config/age/identities, ~/.config/sops/age/keys.txt, ~/.age/key.txt exists",
        )
        .hint(Hint::text(
            "make one with `age-keygen -o ~/.config/sops/age/keys.txt`, and put its public key in vars.settings.recipients",
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator(deps: &[&str]) -> GeneratorDecl {
        GeneratorDecl {
            dependencies: deps.iter().map(|d| d.to_string()).collect(),
            ..GeneratorDecl::default()
        }
    }

    #[test]
    fn dependencies_come_first_and_cycles_are_named() {
        let mut gens = BTreeMap::new();
        gens.insert("a".to_string(), generator(&["b"]));
        gens.insert("b".to_string(), generator(&["c"]));
        gens.insert("c".to_string(), generator(&[]));
        assert_eq!(dependency_order(&gens).unwrap(), ["c", "b", "a"]);
        gens.insert("c".to_string(), generator(&["a"]));
        let e = dependency_order(&gens).unwrap_err();
        assert!(e.message.contains("a → b → c → a"), "{}", e.message);
    }

    #[test]
    fn encryption_round_trip_and_wrong_identity() {
        let machine = age::x25519::Identity::generate();
        let other = age::x25519::Identity::generate();
        let ct = encrypt(&[machine.to_public(), other.to_public()], b"s3cret").unwrap();
        assert_eq!(
            &**decrypt_with(std::slice::from_ref(&machine), &ct).unwrap(),
            b"s3cret"
        );
        assert_eq!(&**decrypt_with(&[other], &ct).unwrap(), b"s3cret");
        assert!(decrypt_with(&[age::x25519::Identity::generate()], &ct).is_err());
    }

    #[test]
    fn identity_files_parse_and_plugins_are_refused() {
        let id = age::x25519::Identity::generate();
        let text = format!(
            "# created: today\n# public key: {}\n{}\n",
            id.to_public(),
            age::secrecy::ExposeSecret::expose_secret(&id.to_string())
        );
        let user = UserIdentity::parse("f".into(), &text).unwrap();
        assert_eq!(user.recipients(), [id.to_public().to_string()]);
        assert!(UserIdentity::parse("f".into(), "AGE-PLUGIN-YUBIKEY-1XYZ").is_err());
        let e = UserIdentity::parse("f".into(), "garbage").err().unwrap();
        assert!(!e.message.contains("garbage"), "{}", e.message);
    }

    #[test]
    fn stores_kept_here_and_the_others() {
        let sops = MachineVars {
            secret_module: Some("clan_lib.vars.secret_modules.sops".into()),
            ..MachineVars::default()
        };
        let age = MachineVars {
            secret_module: Some("clan_lib.vars.secret_modules.age".into()),
            secret_location: "/x".into(),
            ..MachineVars::default()
        };
        let default = VarsSettings::default();
        use clan_core_store::ClanCoreStore;
        // clan-core's sops store (its default), chosen by its library or by the clan.
        assert!(check_store(&default, "db", &sops).is_ok());
        assert_eq!(clan_core_store(&default, &sops), Some(ClanCoreStore::Sops));
        let flake_sops = VarsSettings {
            secret_store: Some("sops".into()),
            ..VarsSettings::default()
        };
        assert_eq!(
            clan_core_store(&flake_sops, &MachineVars::default()),
            Some(ClanCoreStore::Sops)
        );
        assert!(check_store(&flake_sops, "db", &MachineVars::default()).is_ok());
        assert_eq!(sops_upload_directory(&sops), "/var/lib/sops-nix");
        // clan-core's age store, chosen by its library.
        assert!(check_store(&default, "db", &age).is_ok());
        assert_eq!(clan_core_store(&default, &age), Some(ClanCoreStore::Age));
        // The machine's choice wins over the clan's default.
        assert_eq!(clan_core_store(&flake_sops, &age), Some(ClanCoreStore::Age));
        // This tool's own age store: nothing of clan-core's chosen.
        assert_eq!(clan_core_store(&default, &MachineVars::default()), None);
        let own_age = VarsSettings {
            secret_store: Some("age".into()),
            ..VarsSettings::default()
        };
        assert_eq!(clan_core_store(&own_age, &MachineVars::default()), None);
        // Another store of clan-core's: refused, by name.
        let pass = MachineVars {
            secret_module: Some("clan_lib.vars.secret_modules.password_store".into()),
            ..MachineVars::default()
        };
        let refused = check_store(&default, "db", &pass).unwrap_err();
        assert_eq!(refused.code, Some("vars.store-unsupported"));
        assert!(
            refused.message.contains(
                "(from nixosConfigurations.db.config.clan.core.vars.settings.secretModule)"
            ),
            "{}",
            refused.message
        );
        assert!(check_store(&default, "db", &MachineVars::default()).is_ok());
        let mut from_clan_core = MachineVars::default();
        from_clan_core.generators.insert(
            "openssh".into(),
            GeneratorDecl {
                from_clan_core: true,
                ..GeneratorDecl::default()
            },
        );
        let refused = check_store(&default, "db", &from_clan_core).unwrap_err();
        assert_eq!(refused.code, Some("vars.store-unsupported"));
        let vault = VarsSettings {
            secret_store: Some("vault".into()),
            ..VarsSettings::default()
        };
        assert!(check_store(&vault, "db", &MachineVars::default()).is_err());
    }

    #[test]
    fn protected_secret_locations_are_refused() {
        for bad in [
            "/etc",
            "/etc/",
            "/var/lib",
            "/home",
            "/root/.ssh",
            "/home/alice",
            "/nix/store/x",
            "/proc/1",
            "/srv",
        ] {
            assert!(protected_location(bad).is_some(), "{bad}");
        }
        for good in [
            "/etc/secret-vars",
            "/var/lib/clan-vars",
            "/root/secret-vars",
            "/srv/important",
            "/home/alice/secrets",
        ] {
            assert_eq!(protected_location(good), None, "{good}");
        }
    }

    #[test]
    fn names_from_the_flake_are_checked() {
        let file = FileDecl {
            secret: true,
            deploy: true,
            owner: "root".into(),
            group: "root".into(),
            mode: "0400".into(),
            needed_for: "services".into(),
        };
        let mut decl = GeneratorDecl::default();
        decl.files.insert("ok".into(), file.clone());
        let vars = MachineVars {
            secret_location: "/etc/secret-vars".into(),
            generators: BTreeMap::from([("g".to_string(), decl.clone())]),
            ..MachineVars::default()
        };
        vars.check("m").unwrap();
        assert!(
            vars.check("../../etc").is_err(),
            "a machine name that leaves vars/"
        );
        for bad in ["..", "a/b", "", "x y", "$(id)"] {
            let mut v = vars.clone();
            v.generators.insert(bad.to_string(), decl.clone());
            assert!(v.check("m").is_err(), "{bad:?}");
            let mut v = vars.clone();
            v.generators
                .get_mut("g")
                .unwrap()
                .files
                .insert(bad.to_string(), file.clone());
            assert!(v.check("m").is_err(), "{bad:?}");
        }
        for (out, drv) in [
            ("--option", None),
            ("/nix/store/x:/tmp/evil", None),
            ("/nix/store/abc-tool", Some("--option post-build-hook /x")),
            ("/nix/store/abc-tool", Some("/nix/store/abc-tool")),
        ] {
            let mut v = vars.clone();
            v.generators.get_mut("g").unwrap().runtime_inputs = vec![RuntimeInput {
                out: out.into(),
                drv: drv.map(str::to_string),
            }];
            assert!(v.check("m").is_err(), "{out} {drv:?}");
        }
        let mut v = vars.clone();
        v.generators.get_mut("g").unwrap().runtime_inputs = vec![RuntimeInput {
            out: "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-tool-1.0".into(),
            drv: Some("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-tool-1.0.drv".into()),
        }];
        v.check("m").unwrap();
        for (owner, mode, loc) in [
            ("-rf", "0400", "/etc/s"),
            ("root", "999", "/etc/s"),
            ("root", "0400", "relative"),
            ("root", "0400", "/"),
            ("root", "0400", "/etc/../x"),
        ] {
            let mut v = vars.clone();
            v.secret_location = loc.into();
            let f = v
                .generators
                .get_mut("g")
                .unwrap()
                .files
                .get_mut("ok")
                .unwrap();
            f.owner = owner.into();
            f.mode = mode.into();
            assert!(v.check("m").is_err(), "{owner} {mode} {loc}");
        }
    }
}
