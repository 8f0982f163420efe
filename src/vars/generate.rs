//! `clan vars generate`: runs a machine's missing generators on the workstation, in
//! dependency order, each in a private temporary directory that is removed afterwards
//! (also on failure and Ctrl-C); stores public files as values and secret files encrypted.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use zeroize::Zeroizing;

use super::clan_core_store::ClanCoreStore;
use super::{
    GeneratorDecl, MachineVars, Repo, Secret, UserIdentity, VarsSettings, decrypt_with, encrypt,
    write_atomically,
};
use crate::error::{Error, Hint};

/// Which store keeps a machine's vars, as generation sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// This tool's age store.
    Age,
    /// The sops store in clan-core's layout, written here (the clan's generators are this
    /// library's: [`super::sops_store`]).
    Sops,
    /// One of clan-core's stores with clan-core's generators: read, never written.
    ClanCore(ClanCoreStore),
}

impl Kept {
    fn of(vars: &MachineVars) -> Kept {
        match super::clan_core_store_of(vars) {
            None => Kept::Age,
            Some(ClanCoreStore::Sops) if vars.generated_here() => Kept::Sops,
            Some(store) => Kept::ClanCore(store),
        }
    }
}

/// What a generation needs besides the machine: the repository, the clan's settings, and
/// the user's identity (looked for only when something must be decrypted).
pub struct Generation<'a> {
    /// The clan's directory.
    pub repo: &'a Repo,
    /// `vars.settings`.
    pub settings: &'a VarsSettings,
    /// Regenerate even what exists.
    pub regenerate: bool,
    /// Only this generator (and what it needs).
    pub only: Option<String>,
    /// Run generators in the sandbox ([`sandboxed`]); off only with `--no-sandbox`.
    pub sandbox: bool,
    user: OnceLock<UserIdentity>,
}

impl<'a> Generation<'a> {
    /// A generation in `repo` with `settings`.
    pub fn new(repo: &'a Repo, settings: &'a VarsSettings) -> Generation<'a> {
        Generation {
            repo,
            settings,
            regenerate: false,
            only: None,
            sandbox: true,
            user: OnceLock::new(),
        }
    }

    /// The user's identity, found once.
    pub fn user(&self) -> Result<&UserIdentity, Error> {
        if let Some(user) = self.user.get() {
            return Ok(user);
        }
        let found = UserIdentity::find()?;
        Ok(self.user.get_or_init(|| found))
    }

    /// Generates what `machine` lacks (everything selected with `regenerate`); returns the
    /// generators that ran. Shared generators made by another machine are shared with this
    /// one (their secrets encrypted to its key too).
    pub fn machine(&self, machine: &str, vars: &MachineVars) -> Result<Vec<String>, Error> {
        vars.check(machine)?;
        super::check_store(self.settings, machine, vars)?;
        let kept = Kept::of(vars);
        match kept {
            // clan-core's stores, with clan-core's generators: read and deployed here,
            // never written.
            Kept::ClanCore(store) => {
                super::clan_core_store::check_complete(
                    store,
                    self.repo,
                    machine,
                    vars,
                    self.regenerate,
                )?;
                return Ok(Vec::new());
            }
            Kept::Sops => {
                // Secrets whose recipients differ from their links (`vars fix` first), or
                // vars kept in the age layout.
                super::sops_store::check_before_generating(self.repo, machine, vars, "generated")?;
            }
            Kept::Age => {
                // Secrets in the earlier layout would read as missing: moved first, by
                // `vars fix`.
                self.repo.check_layout()?;
                // Secrets without their key: nothing is generated (nor said to be complete).
                let secrets = self.repo.secrets_of(machine);
                if !secrets.is_empty() && !self.repo.has_key(machine) {
                    return Err(self.repo.key_missing(machine, &secrets));
                }
            }
        }
        if let Some(only) = &self.only
            && !vars.generators.contains_key(only)
        {
            return Err(Error::usage(format!(
                "machine {machine} has no vars generator {only:?} (from --generator); it has: {}",
                vars.generators
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let order = super::dependency_order(&vars.generators)?;
        let mut run: BTreeSet<String> = BTreeSet::new();
        for g in &order {
            let decl = &vars.generators[g];
            let selected = self.only.as_ref().is_none_or(|o| o == g);
            // A changed validation makes it (and what depends on it) run again.
            let missing = !super::generated(self.repo, machine, vars, g, decl)
                || !self.repo.validation_current(machine, g, decl);
            let dep_runs = decl.dependencies.iter().any(|d| run.contains(d));
            if (selected && (self.regenerate || missing))
                || dep_runs
                || (missing && self.needed_by_selection(g, vars))
            {
                run.insert(g.clone());
            }
        }
        // A var that exists in another store's layout is generated already: never make a
        // new one beside it.
        for g in order
            .iter()
            .filter(|g| kept == Kept::Age && run.contains(*g))
        {
            let decl = &vars.generators[g];
            for f in decl
                .files
                .iter()
                .filter(|(_, file)| file.secret)
                .map(|(f, _)| f)
            {
                if let Some(found) = self.repo.foreign_secret(machine, g, decl, f) {
                    return Err(Error::usage(format!(
                        "machine {machine}'s secret {g}/{f} exists in the sops layout ({}), while its clan selects the age store (clan.core.vars.settings.secretStore = \"age\"): refusing to generate a new one beside it",
                        found.display()
                    ))
                    .code("vars.foreign-layout")
                    .hint(Hint::text(
                        "the clan's secrets are in the sops store, the default: remove secretStore = \"age\" from the clan (README, Secrets)",
                    )));
                }
            }
        }
        let mut written = Vec::new();
        // A shared sops secret another machine made, not yet for this one: this machine
        // needs its key for it.
        let joins = kept == Kept::Sops
            && vars.generators.iter().any(|(g, decl)| {
                decl.share
                    && !run.contains(g)
                    && super::generated(self.repo, machine, vars, g, decl)
                    && !super::sops_store::shared_with(self.repo, machine, g, decl)
            });
        // Whoever writes into the sops store must be one of its users (the links name them).
        let writer = if kept == Kept::Sops && (!run.is_empty() || joins) {
            Some(super::sops_store::Writer::of(self.repo, self.user()?)?)
        } else {
            None
        };
        if !run.is_empty() || joins {
            match &writer {
                Some(writer) => {
                    written.extend(
                        super::sops_store::ensure_machine_key(self.repo, machine, vars, writer)?.1,
                    );
                }
                None => {
                    self.repo.ensure_machine_key(machine, self.settings)?;
                }
            }
        }
        // Shared generators that exist but were made for other machines: shared with this
        // one first, so the generators that depend on them can read them.
        for (g, decl) in vars
            .generators
            .iter()
            .filter(|(g, decl)| decl.share && !run.contains(*g))
        {
            if super::generated(self.repo, machine, vars, g, decl) {
                written.extend(match kept {
                    Kept::Sops => super::sops_store::share_with(
                        self.repo,
                        machine,
                        vars,
                        g,
                        decl,
                        self.user()?,
                    )?,
                    _ => self.share_with(machine, g, decl)?,
                });
            }
        }
        for g in order.iter().filter(|g| run.contains(*g)) {
            eprintln!("{machine}: generating {g}…");
            let files = self.run_generator(machine, g, vars, kept)?;
            let decl = &vars.generators[g];
            written.extend(match &writer {
                Some(writer) => self.store_sops(machine, vars, g, &files, writer)?,
                None => self.store_files(machine, g, decl, &files)?,
            });
            written.extend(self.store_validation(machine, g, decl)?);
        }
        // Everything generate made is tracked, the machine's key included: a checkout
        // without it could not decrypt the secrets (and must not make a new key).
        if !written.is_empty() && kept == Kept::Age {
            written.extend(
                [
                    self.repo.machine_pub(machine),
                    self.repo.machine_key(machine),
                    Repo::recipients_path(&self.repo.machine_key(machine)),
                ]
                .into_iter()
                .filter(|p| p.is_file()),
            );
        }
        git_add(&self.repo.root, &written);
        Ok(run.into_iter().collect())
    }

    /// Whether generator `g` is a (transitive) dependency of the `--generator` selection.
    fn needed_by_selection(&self, g: &str, vars: &MachineVars) -> bool {
        let Some(only) = &self.only else {
            return true;
        };
        let mut stack = vec![only.as_str()];
        let mut seen = BTreeSet::new();
        while let Some(n) = stack.pop() {
            if !seen.insert(n) {
                continue;
            }
            if let Some(decl) = vars.generators.get(n) {
                if decl.dependencies.iter().any(|d| d == g) {
                    return true;
                }
                stack.extend(decl.dependencies.iter().map(String::as_str));
            }
        }
        false
    }

    /// The machine's private key, decrypted (for its secret inputs and shared files).
    fn machine_identity(&self, machine: &str) -> Result<age::x25519::Identity, Error> {
        self.repo.machine_identity(machine, self.user()?)
    }

    /// A generated file's content: a value, or a secret decrypted with the machine's key.
    pub fn read_file(
        &self,
        machine: &str,
        g: &str,
        decl: &GeneratorDecl,
        f: &str,
    ) -> Result<Secret, Error> {
        let file = &decl.files[f];
        if !file.secret {
            let path = self.repo.value_path(machine, g, decl, f);
            return std::fs::read(&path)
                .map(Zeroizing::new)
                .map_err(|e| Error::new(format!("cannot read {}: {e}", path.display())));
        }
        let path = self.repo.secret_path(machine, g, decl, f);
        let encrypted = std::fs::read(&path)
            .map_err(|e| Error::new(format!("cannot read {}: {e}", path.display())))?;
        // A secret that is not deployed is encrypted to the people (clan-core's age store;
        // earlier versions of this tool encrypted it to the machine too).
        if !file.deploy
            && let Ok(plain) = self.user()?.decrypt(&encrypted)
        {
            return Ok(plain);
        }
        let identity = self.machine_identity(machine)?;
        decrypt_with(std::slice::from_ref(&identity), &encrypted).map_err(|e| {
            Error::usage(format!(
                "cannot decrypt {} with machine {machine}'s key: {e}",
                path.display()
            ))
            .hint(Hint::text(format!(
                "regenerate it: `{}`",
                crate::hint::command(
                    "vars generate",
                    machine,
                    &["--generator", g, "--regenerate"]
                )
            )))
        })
    }

    /// Runs generator `g` of `machine` in a private directory; returns its files.
    fn run_generator(
        &self,
        machine: &str,
        g: &str,
        vars: &MachineVars,
        kept: Kept,
    ) -> Result<BTreeMap<String, Secret>, Error> {
        let decl = &vars.generators[g];
        let dir = private_dir()?;
        let (out, prompts, input) = (
            dir.path().join("out"),
            dir.path().join("prompts"),
            dir.path().join("in"),
        );
        for d in [&out, &prompts, &input] {
            std::fs::create_dir(d)
                .map_err(|e| Error::new(format!("cannot create {}: {e}", d.display())))?;
        }
        // Answers first: nothing runs before every question is answered.
        for (p, prompt) in &decl.prompts {
            let answer = ask(machine, g, p, prompt)?;
            write_private(&prompts.join(p), &answer)?;
        }
        for dep in &decl.dependencies {
            let dep_decl = &vars.generators[dep];
            std::fs::create_dir(input.join(dep))
                .map_err(|e| Error::new(format!("cannot create $in/{dep}: {e}")))?;
            for f in dep_decl.files.keys() {
                let content = match kept {
                    Kept::Sops => super::clan_core_store::read(
                        ClanCoreStore::Sops,
                        self.repo,
                        machine,
                        dep,
                        dep_decl,
                        f,
                        self.user()?,
                    )?,
                    _ => self.read_file(machine, dep, dep_decl, f)?,
                };
                write_private(&input.join(dep).join(f), &content)?;
            }
        }
        let path = runtime_path(machine, g, decl)?;
        let script = dir.path().join("script.sh");
        std::fs::write(&script, &decl.script)
            .map_err(|e| Error::new(format!("cannot write the script: {e}")))?;
        let mut command = if self.sandbox {
            sandboxed(dir.path(), &path)?
        } else {
            let mut command = Command::new("bash");
            command
                .args(["-eu", "-o", "pipefail"])
                .arg(&script)
                .current_dir(dir.path())
                .env("out", &out)
                .env("prompts", &prompts)
                .env("in", &input)
                .env("PATH", path);
            command
        };
        let output = crate::process::run(&mut command, None).map_err(|e| {
            if e.kind() == std::io::ErrorKind::Interrupted {
                crate::error::interrupted(&format!(
                    "while generator {g} of {machine} ran (nothing of it was stored)"
                ))
            } else {
                Error::new(format!(
                    "cannot run bash for generator {g} of {machine}: {e}"
                ))
            }
        })?;
        if !output.status.success() {
            return Err(Error::new(format!(
                "generator {g} of machine {machine} failed ({}); nothing of it was stored",
                output
                    .status
                    .code()
                    .map_or("killed".into(), |c| format!("exit {c}"))
            ))
            .detail(String::from_utf8_lossy(&output.stderr).to_string())
            .code(GENERATOR_FAILED)
            .hint(Hint::text(format!(
                "fix clan.core.vars.generators.{g}.script, then run `{}`",
                crate::hint::command("vars generate", machine, &[])
            ))));
        }
        // Persisted answers the script did not write become their files.
        for (p, prompt) in &decl.prompts {
            if prompt.persist && !out.join(p).exists() {
                let answer = Zeroizing::new(std::fs::read(prompts.join(p)).unwrap_or_default());
                write_private(&out.join(p), &answer)?;
            }
        }
        let produced: BTreeSet<String> = std::fs::read_dir(&out)
            .map_err(|e| Error::new(format!("cannot read $out: {e}")))?
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        let declared: BTreeSet<String> = decl.files.keys().cloned().collect();
        let missing: Vec<&String> = declared.difference(&produced).collect();
        let extra: Vec<&String> = produced.difference(&declared).collect();
        if !missing.is_empty() || !extra.is_empty() {
            let mut what = Vec::new();
            if !missing.is_empty() {
                what.push(format!(
                    "it did not write {}",
                    missing
                        .iter()
                        .map(|s| format!("$out/{s}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if !extra.is_empty() {
                what.push(format!(
                    "it wrote undeclared {}",
                    extra
                        .iter()
                        .map(|s| format!("$out/{s}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            return Err(Error::usage(format!(
                "generator {g} of machine {machine}: {}; nothing of it was stored",
                what.join("; ")
            ))
            .hint(Hint::text(format!(
                "the script must write exactly clan.core.vars.generators.{g}.files: {}",
                declared.iter().cloned().collect::<Vec<_>>().join(", ")
            ))));
        }
        let mut files = BTreeMap::new();
        for f in declared {
            let content = Zeroizing::new(
                std::fs::read(out.join(&f))
                    .map_err(|e| Error::new(format!("cannot read $out/{f}: {e}")))?,
            );
            files.insert(f, content);
        }
        Ok(files)
    }

    /// Stores a generator's files in the sops store: values as they are, secrets as
    /// clan-core writes them ([`super::sops_store::write_secret`]).
    fn store_sops(
        &self,
        machine: &str,
        vars: &MachineVars,
        g: &str,
        files: &BTreeMap<String, Secret>,
        writer: &super::sops_store::Writer,
    ) -> Result<Vec<PathBuf>, Error> {
        let decl = &vars.generators[g];
        let mut written = Vec::new();
        for (f, content) in files {
            if decl.files[f].secret {
                written.extend(super::sops_store::write_secret(
                    self.repo, machine, vars, g, decl, f, content, writer,
                )?);
            } else {
                let path = self.repo.value_path(machine, g, decl, f);
                write_atomically(&path, content)?;
                written.push(path);
            }
        }
        Ok(written)
    }

    /// What generator `g` was made from, as clan-core records it (its validation hash).
    fn store_validation(
        &self,
        machine: &str,
        g: &str,
        decl: &GeneratorDecl,
    ) -> Result<Vec<PathBuf>, Error> {
        let mut written = Vec::new();
        let validation = self.repo.validation_path(machine, g, decl);
        match &decl.validation_hash {
            Some(hash) => {
                write_atomically(&validation, hash.as_bytes())?;
                written.push(validation);
            }
            None if validation.exists() => {
                std::fs::remove_file(&validation).map_err(|e| {
                    Error::new(format!("cannot remove {}: {e}", validation.display()))
                })?;
                written.push(validation);
            }
            None => {}
        }
        Ok(written)
    }

    /// `clan vars set`: file `f` of generator `g` becomes `value` (a secret encrypted as
    /// generate would, to the machine's key and its sharers'; in clan-core's sops store, as
    /// clan-core writes it, see [`super::clan_core_store::set`]); staged in git. Returns the
    /// paths written.
    pub fn set(
        &self,
        machine: &str,
        vars: &MachineVars,
        g: &str,
        f: &str,
        value: Secret,
    ) -> Result<Vec<PathBuf>, Error> {
        vars.check(machine)?;
        super::check_store(self.settings, machine, vars)?;
        if super::clan_core_store_of(vars) == Some(ClanCoreStore::Sops) {
            let written =
                super::clan_core_store::set(self.repo, machine, vars, g, f, &value, self.user()?)?;
            git_add(&self.repo.root, &written);
            return Ok(written);
        }
        self.repo.check_layout()?;
        let secrets = self.repo.secrets_of(machine);
        if !secrets.is_empty() && !self.repo.has_key(machine) {
            return Err(self.repo.key_missing(machine, &secrets));
        }
        let decl = &vars.generators[g];
        let written =
            self.store_files(machine, g, decl, &BTreeMap::from([(f.to_string(), value)]))?;
        let mut staged = written.clone();
        staged.extend([
            self.repo.machine_pub(machine),
            self.repo.machine_key(machine),
            Repo::recipients_path(&self.repo.machine_key(machine)),
        ]);
        git_add(&self.repo.root, &staged);
        Ok(written)
    }

    /// Writes a generator's files as clan-core's age store does: values as they are; a
    /// deployed secret encrypted to the machine's key (a shared one to every sharing
    /// machine's, listed beside it); a secret that is not deployed encrypted to the people
    /// of `vars.settings.recipients`, listed beside it. Returns the paths written.
    fn store_files(
        &self,
        machine: &str,
        g: &str,
        decl: &GeneratorDecl,
        files: &BTreeMap<String, Secret>,
    ) -> Result<Vec<PathBuf>, Error> {
        let mut machines = vec![self.repo.ensure_machine_key(machine, self.settings)?];
        if decl.share && decl.files.values().any(|f| f.secret && f.deploy) {
            for other in self.sharers(machine, g, decl)? {
                if let Some(r) = self.repo.machine_recipient(&other)? {
                    machines.push(r);
                }
            }
        }
        let mut written = Vec::new();
        for (f, content) in files {
            let file = &decl.files[f];
            if !file.secret {
                let path = self.repo.value_path(machine, g, decl, f);
                write_atomically(&path, content)?;
                written.push(path);
                continue;
            }
            let path = self.repo.secret_path(machine, g, decl, f);
            let people;
            let recipients = if file.deploy {
                &machines
            } else {
                people = super::parse_recipients(self.settings, machine)?;
                &people
            };
            write_atomically(&path, &encrypt(recipients, content)?)?;
            // Whose keys open it, beside it, where that can change (as clan-core keeps it).
            if decl.share || !file.deploy {
                written.push(Repo::write_recipients(&path, recipients)?);
            }
            written.push(path);
        }
        Ok(written)
    }

    /// The other machines whose keys decrypt shared generator `g`'s existing secrets.
    fn sharers(&self, machine: &str, g: &str, decl: &GeneratorDecl) -> Result<Vec<String>, Error> {
        let Some((f, _)) = decl
            .files
            .iter()
            .find(|(_, file)| file.secret && file.deploy)
        else {
            return Ok(Vec::new());
        };
        let Ok(encrypted) = std::fs::read(self.repo.secret_path(machine, g, decl, f)) else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        for other in self.repo.machines_with_keys() {
            if other == machine {
                continue;
            }
            if let Ok(identity) = self.repo.machine_identity(&other, self.user()?)
                && decrypt_with(std::slice::from_ref(&identity), &encrypted).is_ok()
            {
                found.push(other);
            }
        }
        Ok(found)
    }

    /// Makes shared generator `g`'s secrets decryptable by `machine` too, if they are not.
    fn share_with(
        &self,
        machine: &str,
        g: &str,
        decl: &GeneratorDecl,
    ) -> Result<Vec<PathBuf>, Error> {
        // Only deployed secrets are encrypted to machines (the others to people).
        let Some((probe, _)) = decl
            .files
            .iter()
            .find(|(_, file)| file.secret && file.deploy)
        else {
            return Ok(Vec::new());
        };
        let probe_path = self.repo.secret_path(machine, g, decl, probe);
        let encrypted = std::fs::read(&probe_path)
            .map_err(|e| Error::new(format!("cannot read {}: {e}", probe_path.display())))?;
        self.repo.ensure_machine_key(machine, self.settings)?;
        let own = self.machine_identity(machine)?;
        if decrypt_with(std::slice::from_ref(&own), &encrypted).is_ok() {
            return Ok(Vec::new());
        }
        let sharers = self.sharers(machine, g, decl)?;
        let Some(reader) = sharers.first() else {
            return Err(Error::usage(format!(
                "shared generator {g}: no machine key you can decrypt opens {}",
                probe_path.display()
            ))
            .hint(Hint::text(format!(
                "regenerate it: `{}`",
                crate::hint::command(
                    "vars generate",
                    machine,
                    &["--generator", g, "--regenerate"]
                )
            ))));
        };
        eprintln!("{machine}: sharing {g} (made for {})…", sharers.join(", "));
        let mut files = BTreeMap::new();
        for (f, file) in &decl.files {
            if file.secret && file.deploy {
                files.insert(f.clone(), self.read_file(reader, g, decl, f)?);
            }
        }
        let mut recipients = vec![self.repo.ensure_machine_key(machine, self.settings)?];
        for other in &sharers {
            if let Some(r) = self.repo.machine_recipient(other)? {
                recipients.push(r);
            }
        }
        let mut written = Vec::new();
        for (f, content) in &files {
            let path = self.repo.secret_path(machine, g, decl, f);
            write_atomically(&path, &encrypt(&recipients, content)?)?;
            written.push(Repo::write_recipients(&path, &recipients)?);
            written.push(path);
        }
        Ok(written)
    }
}

/// Re-encrypts every machine key of the repository (or of `machines`) to its current
/// recipients; secrets are left as they are. Returns the machines whose key was rewritten.
pub fn fix_keys(
    repo: &Repo,
    settings: &VarsSettings,
    user: &UserIdentity,
    machines: &[String],
) -> Result<Vec<String>, Error> {
    let all = repo.machines_with_keys();
    let names: Vec<&String> = if machines.is_empty() {
        all.iter().collect()
    } else {
        machines.iter().collect()
    };
    let mut fixed = Vec::new();
    for m in names {
        let recipients = super::parse_recipients(settings, m)?;
        let private = repo.machine_private_key(m, user)?;
        write_atomically(&repo.machine_key(m), &encrypt(&recipients, &private)?)?;
        let sidecar = Repo::write_recipients(&repo.machine_key(m), &recipients)?;
        fixed.push(m.clone());
        git_add(&repo.root, &[repo.machine_key(m), sidecar]);
    }
    Ok(fixed)
}

/// Re-encrypts each secret of `machine` that is not deployed (in the age store, encrypted to
/// the people of `vars.settings.recipients`, listed beside it) whose listed recipients are not
/// the current ones, as clan-core's age `fix` does; opened with the user's key, else the
/// machine's (earlier versions of this tool encrypted them to the machine). Returns the vars
/// re-encrypted (`gen/file`).
pub fn fix_undeployed(
    repo: &Repo,
    settings: &VarsSettings,
    user: &UserIdentity,
    machine: &str,
    vars: &MachineVars,
) -> Result<Vec<String>, Error> {
    let mut done = Vec::new();
    for (g, decl) in &vars.generators {
        for (f, _) in decl
            .files
            .iter()
            .filter(|(_, file)| file.secret && !file.deploy)
        {
            let path = repo.secret_path(machine, g, decl, f);
            if !path.is_file() {
                continue;
            }
            let recipients = super::parse_recipients(settings, machine)?;
            let open = |encrypted: &[u8]| match user.decrypt(encrypted) {
                Ok(plain) => Ok(plain),
                Err(_) => {
                    let identity = repo.machine_identity(machine, user)?;
                    decrypt_with(std::slice::from_ref(&identity), encrypted).map_err(|e| {
                        Error::usage(format!(
                            "cannot decrypt {} with your key or machine {machine}'s: {e}; nothing of it was changed",
                            path.display()
                        ))
                    })
                }
            };
            if reencrypt_unless_listed(repo, &path, &recipients, open)? {
                done.push(format!("{g}/{f}"));
            }
        }
    }
    Ok(done)
}

/// A shared generator whose secrets `vars fix` encrypted anew ([`fix_all_shared`]).
pub struct SharedFixed {
    /// The generator.
    pub generator: String,
    /// Its vars re-encrypted (`gen/file`).
    pub vars: Vec<String>,
    /// The machines that share it now.
    pub machines: Vec<String>,
}

/// `vars fix`'s shared pass in the age store: each shared generator of `generators`, its
/// deployed secrets re-encrypted to exactly the machines of `every` (every machine of the
/// clan, for the age store) that declare it ([`fix_shared`]). Returns each generator whose
/// secrets changed.
pub fn fix_all_shared(
    repo: &Repo,
    user: &UserIdentity,
    every: &BTreeMap<String, Option<MachineVars>>,
    generators: &BTreeSet<String>,
) -> Result<Vec<SharedFixed>, Error> {
    let mut sharers: BTreeMap<&String, (&GeneratorDecl, Vec<String>)> = BTreeMap::new();
    for (machine, vars) in every {
        let Some(vars) = vars
            .as_ref()
            .filter(|v| v.clan_core != Some(ClanCoreStore::Sops))
        else {
            continue;
        };
        for (g, decl) in vars
            .generators
            .iter()
            .filter(|(g, d)| d.share && generators.contains(*g))
        {
            sharers
                .entry(g)
                .or_insert_with(|| (decl, Vec::new()))
                .1
                .push(machine.clone());
        }
    }
    let mut fixed = Vec::new();
    for (g, (decl, machines)) in sharers {
        let rekeyed = fix_shared(repo, user, g, decl, &machines)?;
        if !rekeyed.is_empty() {
            fixed.push(SharedFixed {
                generator: g.clone(),
                vars: rekeyed,
                machines,
            });
        }
    }
    Ok(fixed)
}

/// Re-encrypts each deployed secret of shared generator `g` to exactly the keys of
/// `machines` (those that declare it; one without a key yet gets it when it generates), as
/// clan-core's age `fix` does: a machine that no longer declares it can no longer read it.
/// Opened with a machine key your key opens. Returns the vars re-encrypted (`gen/file`).
pub fn fix_shared(
    repo: &Repo,
    user: &UserIdentity,
    g: &str,
    decl: &GeneratorDecl,
    machines: &[String],
) -> Result<Vec<String>, Error> {
    let mut recipients = Vec::new();
    for m in machines {
        if let Some(r) = repo.machine_recipient(m)? {
            recipients.push(r);
        }
    }
    if recipients.is_empty() {
        return Ok(Vec::new());
    }
    let mut done = Vec::new();
    for (f, _) in decl.files.iter().filter(|(_, f)| f.secret && f.deploy) {
        // A shared secret's path is the same for every machine.
        let path = repo.secret_path(&machines[0], g, decl, f);
        if !path.is_file() {
            continue;
        }
        let open = |encrypted: &[u8]| {
            repo.machines_with_keys()
                .iter()
                .filter_map(|m| repo.machine_identity(m, user).ok())
                .find_map(|identity| decrypt_with(std::slice::from_ref(&identity), encrypted).ok())
                .ok_or_else(|| {
                    Error::usage(format!(
                        "no machine key that your key opens decrypts {}: nothing of it was changed",
                        path.display()
                    ))
                })
        };
        if reencrypt_unless_listed(repo, &path, &recipients, open)? {
            done.push(format!("{g}/{f}"));
        }
    }
    Ok(done)
}

/// Encrypts the age secret at `path` anew to exactly `recipients` (opened with `open`),
/// its sidecar listing them, staged in git; unless the sidecar lists them already. Returns
/// whether it did.
fn reencrypt_unless_listed(
    repo: &Repo,
    path: &Path,
    recipients: &[age::x25519::Recipient],
    open: impl FnOnce(&[u8]) -> Result<Secret, Error>,
) -> Result<bool, Error> {
    let mut wanted: Vec<String> = recipients.iter().map(|r| r.to_string()).collect();
    wanted.sort();
    wanted.dedup();
    let listed = std::fs::read_to_string(Repo::recipients_path(path)).unwrap_or_default();
    let mut current: Vec<String> = listed.lines().map(str::to_string).collect();
    current.sort();
    if current == wanted {
        return Ok(false);
    }
    let encrypted = std::fs::read(path)
        .map_err(|e| Error::new(format!("cannot read {}: {e}", path.display())))?;
    let plain = open(&encrypted)?;
    write_atomically(path, &encrypt(recipients, &plain)?)?;
    let sidecar = Repo::write_recipients(path, recipients)?;
    git_add(&repo.root, &[path.to_path_buf(), sidecar]);
    Ok(true)
}

/// Moves every secret of the repository from this tool's earlier layout to clan-core's age
/// layout ([`Repo::old_layout`]), changing no secret, and writes the recipients sidecar of
/// each shared one (the machines whose keys, opened with `user`, decrypt it). A secret
/// present in both layouts with different contents stops everything before anything moves.
/// Returns the moves made (old, new).
pub fn migrate_old_layout(
    repo: &Repo,
    user: &UserIdentity,
) -> Result<Vec<(PathBuf, PathBuf)>, Error> {
    let old = repo.old_layout();
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| Error::new(format!("cannot read {}: {e}", p.display())))
    };
    for (from, to) in &old {
        if to.exists() && read(from)? != read(to)? {
            return Err(Error::usage(format!(
                "{} and {} hold different versions of one secret: nothing was moved",
                from.display(),
                to.display()
            ))
            .code("vars.old-layout-conflict")
            .hint(Hint::text(
                "keep the one the target uses (`clan vars get` reads the new one), delete the other, and run `clan vars fix` again",
            )));
        }
    }
    let shared = repo.root.join("secrets/clan-vars/shared");
    let machines: Vec<(String, age::x25519::Identity, age::x25519::Recipient)> =
        if old.iter().any(|(_, to)| to.starts_with(&shared)) {
            repo.machines_with_keys()
                .into_iter()
                .filter_map(|m| {
                    let identity = repo.machine_identity(&m, user).ok()?;
                    let public = repo.machine_recipient(&m).ok().flatten()?;
                    Some((m, identity, public))
                })
                .collect()
        } else {
            Vec::new()
        };
    for (from, to) in &old {
        let dir = to.parent().expect("a file in a directory");
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::new(format!("cannot create {}: {e}", dir.display())))?;
        if to.exists() {
            std::fs::remove_file(from)
        } else {
            std::fs::rename(from, to)
        }
        .map_err(|e| Error::new(format!("cannot move {}: {e}", from.display())))?;
        let mut added = vec![to.clone()];
        if to.starts_with(&shared) {
            let encrypted = read(to)?;
            let opened: Vec<age::x25519::Recipient> = machines
                .iter()
                .filter(|(_, identity, _)| {
                    decrypt_with(std::slice::from_ref(identity), &encrypted).is_ok()
                })
                .map(|(_, _, public)| public.clone())
                .collect();
            if !opened.is_empty() {
                added.push(Repo::write_recipients(to, &opened)?);
            }
        }
        git_move(&repo.root, from, &added);
    }
    Ok(old)
}

/// Stages a move in git, when the clan is a git repository: `from` gone, `added` tracked.
fn git_move(root: &Path, from: &Path, added: &[PathBuf]) {
    let mut paths = vec![from.to_path_buf()];
    paths.extend(added.iter().cloned());
    git_add(root, &paths);
}

/// A private (0700) temporary directory, in memory (/dev/shm) where there is one; removed
/// when dropped.
fn private_dir() -> Result<tempfile::TempDir, Error> {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir()
        && std::fs::metadata(shm).is_ok_and(|m| m.permissions().mode() & 0o002 != 0)
    {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::Builder::new()
        .prefix("clan-vars-")
        .tempdir_in(&base)
        .map_err(|e| {
            Error::new(format!(
                "cannot create a private directory in {}: {e}",
                base.display()
            ))
        })?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::new(format!("cannot make {} private: {e}", dir.path().display())))?;
    Ok(dir)
}

/// [`Error::code`] of a generator that failed. Its error output is shown on the terminal
/// only, never in `--json` (a script run with `set -x` prints what it handles).
pub const GENERATOR_FAILED: &str = "vars.generator-failed";

/// Where a generator's private directory is inside the sandbox.
const SANDBOX_DIR: &str = "/build";

/// The generator of private directory `dir` (holding `script.sh`, `out/`, `prompts/`, `in/`)
/// under bubblewrap, as clan-core runs generators: a new, empty root with the system's
/// programs and the Nix store read-only, no network (every namespace unshared), a clean
/// environment (`out`, `prompts`, `in`, `PATH`, and `HOME`/`TMPDIR` on a private tmpfs),
/// its answers and inputs read-only, and `$out` the only place it can write that outlives
/// it. Never the user's home, identity, agent socket or environment.
fn sandboxed(dir: &Path, path: &str) -> Result<Command, Error> {
    static BWRAP: OnceLock<bool> = OnceLock::new();
    let found = *BWRAP.get_or_init(|| {
        Command::new("bwrap")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !found {
        return Err(Error::usage(
            "generators run in a sandbox, and bubblewrap (bwrap) is not installed here",
        )
        .hint(Hint::text(
            "install bubblewrap (Debian, Ubuntu: apt install bubblewrap; NixOS: pkgs.bubblewrap), or pass --no-sandbox to run generators with your environment, home and network",
        )));
    }
    let inside = |rel: &str| format!("{SANDBOX_DIR}/{rel}");
    let mut command = Command::new("bwrap");
    command
        .args([
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
        ])
        .args(["--setenv", "PATH", path])
        .args(["--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp"])
        .args(["--setenv", "out", &inside("out")])
        .args(["--setenv", "prompts", &inside("prompts")])
        .args(["--setenv", "in", &inside("in")]);
    for system in [
        "/usr",
        "/bin",
        "/lib",
        "/lib64",
        "/nix/store",
        "/etc/passwd",
        "/etc/group",
    ] {
        command.args(["--ro-bind-try", system, system]);
    }
    command
        .args(["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"])
        .arg("--bind")
        .arg(dir)
        .arg(SANDBOX_DIR);
    for read_only in ["prompts", "in", "script.sh"] {
        command
            .arg("--ro-bind")
            .arg(dir.join(read_only))
            .arg(inside(read_only));
    }
    command
        .args(["--chdir", SANDBOX_DIR, "bash", "-eu", "-o", "pipefail"])
        .arg(inside("script.sh"));
    Ok(command)
}

/// Writes `bytes` to `path`, readable by this user only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| Error::new(format!("cannot write {}: {e}", path.display())))
}

/// PATH for a generator: its runtimeInputs' bin/ (built here first), then this one's.
fn runtime_path(machine: &str, g: &str, decl: &GeneratorDecl) -> Result<String, Error> {
    let drvs: Vec<&str> = decl
        .runtime_inputs
        .iter()
        .filter(|i| !Path::new(&i.out).exists())
        .filter_map(|i| i.drv.as_deref())
        .collect();
    if !drvs.is_empty() {
        let output =
            crate::process::run(Command::new("nix-store").arg("--realise").args(&drvs), None)
                .map_err(|e| Error::new(format!("cannot run nix-store: {e}")))?;
        if !output.status.success() {
            return Err(Error::new(format!(
                "building the runtimeInputs of generator {g} of {machine} failed"
            ))
            .detail(String::from_utf8_lossy(&output.stderr).to_string()));
        }
    }
    let mut parts: Vec<String> = decl
        .runtime_inputs
        .iter()
        .map(|i| format!("{}/bin", i.out))
        .collect();
    parts.push(std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()));
    Ok(parts.join(":"))
}

/// Asks prompt `p` on the terminal (hidden input for `hidden`); no terminal is an error.
fn ask(machine: &str, g: &str, p: &str, prompt: &super::PromptDecl) -> Result<Secret, Error> {
    let no_terminal = |e: std::io::Error| {
        Error::usage(format!(
            "generator {g} of machine {machine} asks {:?} (prompt {p}), and there is no terminal to ask on ({e})",
            crate::boundary::terminal_safe(&prompt.description)
        ))
        .hint(Hint::text(format!(
            "run `{}` in a terminal first; then deploys need no answers", crate::hint::command("vars generate", machine, &[])
        )))
    };
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(no_terminal)?;
    let label = format!(
        "{machine}/{g}: {}",
        crate::boundary::terminal_safe(&prompt.description)
    );
    let answer = match prompt.kind.as_str() {
        "hidden" => Zeroizing::new(
            rpassword::prompt_password(format!("{label} (hidden): "))
                .map_err(no_terminal)?
                .into_bytes(),
        ),
        "multiline" | "multiline-hidden" => {
            let hidden = prompt.kind == "multiline-hidden";
            let mut writer = &tty;
            let _ = writeln!(
                writer,
                "{label} ({}end with Ctrl-D on an empty line):",
                if hidden { "not shown; " } else { "" }
            );
            let _echo = hidden.then(|| EchoOff::on(&tty));
            let mut text = Zeroizing::new(String::new());
            let mut reader = std::io::BufReader::new(&tty);
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) => text.push_str(&line),
                    Err(e) => return Err(no_terminal(e)),
                }
            }
            Zeroizing::new(text.as_bytes().to_vec())
        }
        _ => {
            let mut writer = &tty;
            let _ = write!(writer, "{label}: ");
            let mut line = Zeroizing::new(String::new());
            std::io::BufReader::new(&tty)
                .read_line(&mut line)
                .map_err(no_terminal)?;
            Zeroizing::new(line.trim_end_matches(['\n', '\r']).as_bytes().to_vec())
        }
    };
    if crate::interrupt::requested() {
        return Err(crate::error::interrupted("while asking for vars"));
    }
    Ok(answer)
}

/// The terminal's echo, off while this lives (a hidden multi-line answer); put back on drop,
/// also when the answer fails.
struct EchoOff {
    fd: std::os::fd::RawFd,
    saved: Option<libc::termios>,
}

impl EchoOff {
    fn on(tty: &std::fs::File) -> EchoOff {
        use std::os::fd::AsRawFd;
        let fd = tty.as_raw_fd();
        // SAFETY: tcgetattr/tcsetattr on an open terminal descriptor with a termios this
        // function owns.
        let saved = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            (libc::tcgetattr(fd, &mut t) == 0).then_some(t)
        };
        if let Some(mut quiet) = saved {
            quiet.c_lflag &= !(libc::ECHO | libc::ECHONL);
            // SAFETY: as above.
            unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
        }
        EchoOff { fd, saved }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: puts back the settings read in `on`, on the same descriptor.
            unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, saved) };
        }
    }
}

/// `git add` of what was written (and `git rm --cached` of what was removed), when the clan
/// is a git work tree (flakes only see tracked files, and a clone only gets committed ones:
/// staged, the next commit carries them, as clan-core commits what it generates); quiet
/// otherwise.
pub(crate) fn git_add(root: &Path, paths: &[PathBuf]) {
    if paths.is_empty() || !root.join(".git").exists() {
        return;
    }
    let (present, gone): (Vec<&PathBuf>, Vec<&PathBuf>) =
        paths.iter().partition(|p| p.exists() || p.is_symlink());
    for (args, paths) in [
        (&["add", "--"][..], present),
        (
            &["rm", "-q", "--cached", "--ignore-unmatch", "--"][..],
            gone,
        ),
    ] {
        if paths.is_empty() {
            continue;
        }
        let _ = Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .args(paths)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vars::Recipients;

    fn user() -> (UserIdentity, VarsSettings) {
        let id = age::x25519::Identity::generate();
        let user = UserIdentity::parse(
            "test".into(),
            age::secrecy::ExposeSecret::expose_secret(&id.to_string()),
        )
        .unwrap();
        let settings = VarsSettings {
            recipients: Recipients {
                default: vec![id.to_public().to_string()],
                ..Default::default()
            },
            ..Default::default()
        };
        (user, settings)
    }

    #[test]
    fn the_earlier_layout_is_refused_then_moved_by_fix() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo {
            root: dir.path().to_path_buf(),
        };
        let (user, settings) = user();
        let m1 = repo.ensure_machine_key("m1", &settings).unwrap();
        let m2 = repo.ensure_machine_key("m2", &settings).unwrap();
        // As clan-core keeps it: the machine key's recipients beside it.
        let sidecar = std::fs::read_to_string(Repo::recipients_path(&repo.machine_key("m1")));
        assert_eq!(
            sidecar.unwrap(),
            format!("{}\n", settings.recipients.default[0])
        );
        let base = dir.path().join("secrets/clan-vars");
        let own = encrypt(std::slice::from_ref(&m1), b"token").unwrap();
        let shared = encrypt(&[m1.clone(), m2.clone()], b"psk").unwrap();
        write_atomically(&base.join("per-machine/m1/api/token.age"), &own).unwrap();
        write_atomically(&base.join("shared/wifi/psk.age"), &shared).unwrap();

        let refused = repo.check_layout().unwrap_err();
        assert_eq!(refused.stable_code(), "vars.old-layout");
        assert!(
            refused.message.contains("2 secret(s)"),
            "{}",
            refused.message
        );

        let moved = migrate_old_layout(&repo, &user).unwrap();
        assert_eq!(moved.len(), 2);
        repo.check_layout().unwrap();
        assert!(!base.join("per-machine/m1/api/token.age").exists());
        assert_eq!(
            std::fs::read(base.join("per-machine/m1/api/token/token.age")).unwrap(),
            own,
            "moved, not re-encrypted"
        );
        assert_eq!(
            std::fs::read(base.join("shared/wifi/psk/psk.age")).unwrap(),
            shared
        );
        let mut expected = [m1.to_string(), m2.to_string()];
        expected.sort();
        assert_eq!(
            std::fs::read_to_string(base.join("shared/wifi/psk/psk.age.recipients")).unwrap(),
            format!("{}\n", expected.join("\n"))
        );
        // Nothing left to move: a second fix is a no-op.
        assert!(migrate_old_layout(&repo, &user).unwrap().is_empty());
    }

    #[test]
    fn a_secret_in_both_layouts_with_two_versions_stops_the_move() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo {
            root: dir.path().to_path_buf(),
        };
        let (user, _) = user();
        let base = dir.path().join("secrets/clan-vars/per-machine/m");
        write_atomically(&base.join("api/token.age"), b"old").unwrap();
        write_atomically(&base.join("api/token/token.age"), b"new").unwrap();
        write_atomically(&base.join("db/pw.age"), b"pw").unwrap();
        let refused = migrate_old_layout(&repo, &user).unwrap_err();
        assert_eq!(refused.stable_code(), "vars.old-layout-conflict");
        assert!(base.join("db/pw.age").exists(), "nothing moved");
        // The same bytes in both: the old copy goes.
        write_atomically(&base.join("api/token.age"), b"new").unwrap();
        assert_eq!(migrate_old_layout(&repo, &user).unwrap().len(), 2);
        assert!(!base.join("api/token.age").exists());
        assert_eq!(std::fs::read(base.join("db/pw/pw.age")).unwrap(), b"pw");
    }
}
