//! Where the clan's repository keeps vars in this tool's age store, and its machine keys.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::{
    GeneratorDecl, MachineVars, Secret, UserIdentity, VarsSettings, decrypt_with, encrypt,
    parse_recipients, scope,
};
use crate::error::{Error, Hint};

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

    /// A secret file, encrypted: `secrets/clan-vars/<scope>/<g>/<f>/<f>.age`, clan-core's
    /// age layout (a folder per file).
    pub fn secret_path(&self, machine: &str, g: &str, decl: &GeneratorDecl, f: &str) -> PathBuf {
        self.root
            .join("secrets/clan-vars")
            .join(scope(machine, decl))
            .join(g)
            .join(f)
            .join(format!("{f}.age"))
    }

    /// Where this tool's earlier layout kept a secret: `secrets/clan-vars/<scope>/<g>/<f>.age`.
    pub fn old_secret_path(
        &self,
        machine: &str,
        g: &str,
        decl: &GeneratorDecl,
        f: &str,
    ) -> PathBuf {
        self.root
            .join("secrets/clan-vars")
            .join(scope(machine, decl))
            .join(g)
            .join(format!("{f}.age"))
    }

    /// The secrets of the repository still in this tool's earlier layout (a file
    /// `<g>/<f>.age` where clan-core's layout has a folder `<g>/<f>/`), with where each
    /// belongs now.
    pub fn old_layout(&self) -> Vec<(PathBuf, PathBuf)> {
        fn entries(dir: &Path) -> Vec<PathBuf> {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .collect();
            found.sort();
            found
        }
        let base = self.root.join("secrets/clan-vars");
        let mut generator_dirs = entries(&base.join("shared"));
        for machine in entries(&base.join("per-machine")) {
            generator_dirs.extend(entries(&machine));
        }
        let mut old = Vec::new();
        for dir in generator_dirs.iter().filter(|d| d.is_dir()) {
            for path in entries(dir) {
                let Some(f) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".age"))
                else {
                    continue;
                };
                if path.is_file() && !f.is_empty() {
                    let new = dir.join(f).join(format!("{f}.age"));
                    old.push((path, new));
                }
            }
        }
        old
    }

    /// Refuses a repository with secrets in this tool's earlier layout: they would read as
    /// missing, and be generated again beside the user's. `clan vars fix` moves them.
    pub fn check_layout(&self) -> Result<(), Error> {
        let old = self.old_layout();
        let Some((first, new)) = old.first() else {
            return Ok(());
        };
        Err(Error::usage(format!(
            "the repository holds {} secret(s) in this tool's earlier layout (e.g. {}, which now belongs at {}): nothing was read, generated or uploaded",
            old.len(),
            first.display(),
            new.display()
        ))
        .code("vars.old-layout")
        .hint(Hint::text(
            "run `clan vars fix`: it moves them to clan-core's age layout (secrets/clan-vars/<scope>/<gen>/<file>/<file>.age), changing no secret; commit the result",
        )))
    }

    /// The recipients sidecar of an encrypted file (`<file>.age.recipients`, as clan-core
    /// writes beside machine keys and shared secrets).
    pub fn recipients_path(encrypted: &Path) -> PathBuf {
        let mut name = encrypted.as_os_str().to_owned();
        name.push(".recipients");
        PathBuf::from(name)
    }

    /// Writes the sidecar of `encrypted`: its recipients, sorted, one per line.
    pub fn write_recipients(
        encrypted: &Path,
        recipients: &[age::x25519::Recipient],
    ) -> Result<PathBuf, Error> {
        let mut lines: Vec<String> = recipients.iter().map(|r| r.to_string()).collect();
        lines.sort();
        lines.dedup();
        let path = Self::recipients_path(encrypted);
        write_atomically(&path, format!("{}\n", lines.join("\n")).as_bytes())?;
        Ok(path)
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

    /// Where clan-core's sops store keeps file `f` of generator `g`
    /// (`vars/<scope>/<g>/<f>/secret`), if a file is there. (Its age layout is this
    /// store's.)
    pub fn foreign_secret(
        &self,
        machine: &str,
        g: &str,
        decl: &GeneratorDecl,
        f: &str,
    ) -> Option<PathBuf> {
        Some(
            self.root
                .join("vars")
                .join(scope(machine, decl))
                .join(g)
                .join(f)
                .join("secret"),
        )
        .filter(|p| p.exists())
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
        Self::write_recipients(&self.machine_key(machine), &recipients)?;
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
