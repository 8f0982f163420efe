//! Uploading a machine's vars: its private key (decrypted here, in memory) and its
//! encrypted secrets, as one tar on the standard input of one ssh session **to the target**,
//! never to or through the build host. The target swaps them in atomically
//! (`src/scripts/vars-upload.sh`).

use std::sync::OnceLock;

use zeroize::Zeroizing;

use super::{MachineVars, Repo, Secret, UserIdentity};
use crate::error::{Error, Hint};
use crate::ssh::Script;

/// The target's side of an upload (`src/scripts/vars-upload.sh`). Arguments: location,
/// number of files.
pub const VARS_UPLOAD: Script = Script {
    name: "clan-vars-upload",
    text: include_str!("../scripts/vars-upload.sh"),
};

/// What is uploaded to a machine, without any content: what a plan shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretsUpload {
    /// The machine.
    pub machine: String,
    /// The clan's directory.
    pub repo: Repo,
    /// `clan.core.vars.age.secretLocation` on the target.
    pub location: String,
    /// The files, relative to the location (`per-machine/<m>/<decl>/<file>.age`, …);
    /// `key.txt` comes on top.
    pub files: Vec<String>,
    /// A clan-core store: only the machine's key goes (to `location`: sops'
    /// `secretUploadDirectory`, age's `secretLocation`); the secrets are in the system
    /// closure, where clan-core's modules decrypt them.
    pub clan_core: Option<super::clan_core_store::ClanCoreStore>,
    /// On clan-core's library, the secrets needed for activation, which clan-core uploads
    /// decrypted (its modules read them at `<location>/activation/<scope>/<gen>/<file>`):
    /// each as (generator, file, its declaration). This library's activation decrypts them on
    /// the target instead.
    pub decrypted: Vec<(String, String, super::GeneratorDecl)>,
}

impl SecretsUpload {
    /// What `machine` uploads, if it has secrets to upload.
    pub fn of(repo: &Repo, machine: &str, vars: &MachineVars) -> Option<SecretsUpload> {
        if let Some(store) = vars.clan_core {
            let location = match store {
                super::clan_core_store::ClanCoreStore::Sops => super::sops_upload_directory(vars),
                super::clan_core_store::ClanCoreStore::Age => vars.secret_location.clone(),
            };
            let decrypted = if vars.generated_here() {
                Vec::new()
            } else {
                vars.generators
                    .iter()
                    .flat_map(|(g, decl)| {
                        decl.files
                            .iter()
                            .filter(|(_, file)| file.uploaded() && file.needed_for == "activation")
                            .map(move |(f, _)| (g.clone(), f.clone(), decl.clone()))
                    })
                    .collect()
            };
            return (!vars.uploaded_files(machine).is_empty()).then(|| SecretsUpload {
                machine: machine.to_string(),
                repo: repo.clone(),
                location,
                files: Vec::new(),
                clan_core: Some(store),
                decrypted,
            });
        }
        let files: Vec<String> = vars
            .uploaded_files(machine)
            .into_iter()
            .map(|(_, _, rel)| rel)
            .collect();
        (!files.is_empty()).then(|| SecretsUpload {
            machine: machine.to_string(),
            repo: repo.clone(),
            location: vars.secret_location.clone(),
            files,
            clan_core: None,
            decrypted: Vec::new(),
        })
    }

    /// Files sent, the key included.
    pub fn count(&self) -> usize {
        self.files.len() + self.decrypted.len() + 1
    }

    /// The script's arguments.
    pub fn args(&self) -> Vec<String> {
        vec![self.location.clone(), self.count().to_string()]
    }

    /// The tar the target receives, in memory: the machine's key, decrypted with the user's
    /// identity, the encrypted secrets as they are in the repository, and on clan-core's
    /// library its secrets needed for activation, decrypted (as clan-core uploads them).
    pub fn bundle(&self, user: &UserIdentity) -> Result<Secret, Error> {
        let key = if let Some(store) = self.clan_core {
            super::clan_core_store::machine_key(store, &self.repo, &self.machine, user)?
        } else {
            self.repo.machine_private_key(&self.machine, user)?
        };
        let mut encrypted = Vec::new();
        for rel in &self.files {
            let path = self.repo.root.join("secrets/clan-vars").join(rel);
            let bytes = std::fs::read(&path).map_err(|e| {
                Error::usage(format!(
                    "machine {}'s secret {} is missing ({e})",
                    self.machine,
                    path.display()
                ))
                .hint(Hint::text(format!(
                    "run `{}`",
                    crate::hint::command("vars generate", &self.machine, &[])
                )))
            })?;
            encrypted.push((rel.clone(), bytes));
        }
        // Plaintext, as clan-core uploads these: wiped when dropped.
        let mut decrypted = Vec::new();
        if let Some(store) = self.clan_core {
            for (g, f, decl) in &self.decrypted {
                let rel = format!("activation/{}/{g}/{f}", super::scope(&self.machine, decl));
                let plain = super::clan_core_store::read(
                    store,
                    &self.repo,
                    &self.machine,
                    g,
                    decl,
                    f,
                    user,
                )?;
                decrypted.push((rel, plain));
            }
        }
        // Room for everything up front: the buffer that holds the key is never reallocated,
        // so no copy of it is left behind unwiped.
        let capacity = 10240
            + 2048
            + key.len()
            + encrypted.iter().map(|(_, b)| 2048 + b.len()).sum::<usize>()
            + decrypted.iter().map(|(_, b)| 2048 + b.len()).sum::<usize>();
        let mut buffer = Zeroizing::new(Vec::with_capacity(capacity));
        let mut tar = tar::Builder::new(&mut *buffer);
        let mut add = |path: &str, bytes: &[u8]| -> Result<(), Error> {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o400);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, path, bytes)
                .map_err(|e| Error::new(format!("cannot pack {path}: {e}")))
        };
        add("key.txt", &key)?;
        for (rel, bytes) in &encrypted {
            add(rel, bytes)?;
        }
        for (rel, bytes) in &decrypted {
            add(rel, bytes)?;
        }
        tar.finish()
            .map_err(|e| Error::new(format!("cannot pack the secrets: {e}")))?;
        drop(tar);
        Ok(buffer)
    }
}

/// Writes the files of an upload `bundle` into the local directory `dir` (made if missing;
/// directories 0700, files 0600), as the target would hold them; returns how many were
/// written. A file already there with other content is never replaced: then nothing is
/// written. Files already there with the same content are left as they are.
pub fn unpack_into(bundle: &[u8], dir: &std::path::Path) -> Result<usize, Error> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let fail = |what: String| Error::new(format!("{}: {what}", dir.display()));
    let mut files = Vec::new();
    let mut archive = tar::Archive::new(bundle);
    for entry in archive.entries().map_err(|e| fail(e.to_string()))? {
        let mut entry = entry.map_err(|e| fail(e.to_string()))?;
        let path = entry.path().map_err(|e| fail(e.to_string()))?.into_owned();
        // The bundle is made here, but its paths still never leave `dir`.
        if path.is_absolute()
            || path
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(fail(format!("refusing the path {}", path.display())));
        }
        let mut content = Zeroizing::new(Vec::new());
        std::io::Read::read_to_end(&mut entry, &mut content).map_err(|e| fail(e.to_string()))?;
        files.push((path, content));
    }
    let conflicts: Vec<String> = files
        .iter()
        .filter(|(path, content)| {
            std::fs::read(dir.join(path)).is_ok_and(|there| there != content.as_slice())
                || dir.join(path).is_dir()
        })
        .map(|(path, _)| path.display().to_string())
        .collect();
    if !conflicts.is_empty() {
        return Err(Error::usage(format!(
            "{} already holds other versions of {}: nothing was written",
            dir.display(),
            conflicts.join(", ")
        ))
        .hint(Hint::text("move them away, or give an empty directory")));
    }
    let mut written = 0;
    for (path, content) in &files {
        let dest = dir.join(path);
        if dest.exists() {
            continue;
        }
        if let Some(parent) = dest.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| fail(e.to_string()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&dest)
            .map_err(|e| fail(format!("{}: {e}", path.display())))?;
        std::io::Write::write_all(&mut file, content).map_err(|e| fail(e.to_string()))?;
        written += 1;
    }
    Ok(written)
}

/// The user's identity, looked for once per run.
pub fn user_identity() -> Result<&'static UserIdentity, Error> {
    static FOUND: OnceLock<Result<UserIdentity, Error>> = OnceLock::new();
    FOUND
        .get_or_init(UserIdentity::find)
        .as_ref()
        .map_err(Clone::clone)
}

/// What the target said when the upload failed, as an error.
pub fn upload_error(machine: &str, target: &str, code: Option<i32>, output: &str) -> Error {
    let why = if code == Some(255) {
        "the ssh connection broke"
    } else {
        "the target refused it"
    };
    Error::new(format!(
        "uploading the secrets of {machine} to {target} failed ({why}); the target keeps its previous secrets, nothing was activated"
    ))
    .detail(output.trim_end().to_string())
    .hint(Hint::text(format!(
        "run `{}` or the deploy again once {target} is reachable", crate::hint::command("vars upload", machine, &[])
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundle_holds_the_key_and_the_encrypted_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo {
            root: dir.path().to_path_buf(),
        };
        let user_id = age::x25519::Identity::generate();
        let user = UserIdentity::parse(
            "test".into(),
            age::secrecy::ExposeSecret::expose_secret(&user_id.to_string()),
        )
        .unwrap();
        let settings = super::super::VarsSettings {
            recipients: super::super::Recipients {
                default: vec![user_id.to_public().to_string()],
                ..Default::default()
            },
            ..Default::default()
        };
        repo.ensure_machine_key("m", &settings).unwrap();
        let rel = "per-machine/m/g/f/f.age";
        super::super::write_atomically(&repo.root.join("secrets/clan-vars").join(rel), b"CT")
            .unwrap();
        let upload = SecretsUpload {
            machine: "m".into(),
            repo: repo.clone(),
            location: "/etc/secret-vars".into(),
            files: vec![rel.into()],
            clan_core: None,
            decrypted: Vec::new(),
        };
        assert_eq!(upload.args(), ["/etc/secret-vars", "2"]);
        let bundle = upload.bundle(&user).unwrap();
        let mut archive = tar::Archive::new(&bundle[..]);
        let mut names = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            assert_eq!(entry.header().mode().unwrap(), 0o400);
            names.push(entry.path().unwrap().display().to_string());
        }
        assert_eq!(names, ["key.txt", rel]);

        // --directory: the same files, private, in a local directory; never replaced.
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("extra");
        assert_eq!(unpack_into(&bundle, &dir).unwrap(), 2);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("key.txt")), 0o600);
        assert_eq!(mode(&dir.join("per-machine")), 0o700);
        assert_eq!(std::fs::read(dir.join(rel)).unwrap(), b"CT");
        assert_eq!(
            unpack_into(&bundle, &dir).unwrap(),
            0,
            "the same files again"
        );
        std::fs::write(dir.join("key.txt"), "the user's own key").unwrap();
        std::fs::remove_file(dir.join(rel)).unwrap();
        let refused = unpack_into(&bundle, &dir).unwrap_err();
        assert!(refused.message.contains("key.txt"), "{}", refused.message);
        assert_eq!(
            std::fs::read_to_string(dir.join("key.txt")).unwrap(),
            "the user's own key"
        );
        assert!(!dir.join(rel).exists(), "written beside a refused file");
        let machine = repo.machine_identity("m", &user).unwrap();
        assert_eq!(
            machine.to_public().to_string(),
            std::fs::read_to_string(repo.machine_pub("m"))
                .unwrap()
                .trim()
        );
    }
}
