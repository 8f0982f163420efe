//! The sops store written here: a clan on this repository's library with
//! `vars.settings.secretStore = "sops"` keeps its vars in clan-core's sops layout (see
//! [`super::clan_core_store`], which reads it), and `clan vars generate` writes them as
//! clan-core's does:
//! - the machine's key pair, made with its first secret: `sops/machines/<m>/key.json` (the
//!   public key) and `sops/secrets/<m>-age.key/secret` (the private key, sops-encrypted to the
//!   writing user and the default groups, linked as `users/<u>`, `groups/<g>`);
//! - each secret at `vars/<scope>/<gen>/<file>/secret`, encrypted to exactly the keys its
//!   links name: `machines/<m>` when it is deployed (every sharer's, for a shared one), the
//!   writing user's `users/<u>`, and the default groups;
//! - the writing user must be a sops user of the clan (`sops/users/<u>/key.json`, made by
//!   `clan vars keygen`), as in clan-core.
//!
//! A key is a fact, never a default: half a key pair, or secrets of the machine without its
//! key, stop the generation before anything is made.

use std::path::PathBuf;

use super::clan_core_store::{ClanCoreStore, machine_key_path, secret_path};
use super::{GeneratorDecl, MachineVars, Repo, UserIdentity, sops, sops_links};
use crate::error::{Error, Hint};

/// The user who writes: their sops user name in the clan and its keys.
pub struct Writer {
    /// `sops/users/<name>`.
    pub name: String,
    /// The age public keys of that user's `key.json`.
    pub keys: Vec<String>,
}

impl Writer {
    /// The sops user of the clan whose `key.json` holds one of `user`'s keys.
    pub fn of(repo: &Repo, user: &UserIdentity) -> Result<Writer, Error> {
        match sops_links::user_of(repo, &user.recipients())? {
            Some((name, keys)) => Ok(Writer { name, keys }),
            None => Err(Error::usage(format!(
                "your age key ({}) is no sops user of this clan (sops/users/<name>/key.json): the secrets could not be encrypted to you; nothing was written",
                user.source
            ))
            .code("vars.no-sops-user")
            .hint(Hint::text(
                "add yourself with `clan vars keygen` (it writes sops/users/<you>/key.json), then try again; to read secrets made before, have someone who can read them run `clan vars fix`",
            ))),
        }
    }

    fn link(&self) -> (&str, &[String]) {
        (&self.name, &self.keys)
    }
}

/// `sops/machines/<m>/key.json`.
pub fn machine_public_path(repo: &Repo, machine: &str) -> PathBuf {
    repo.root
        .join("sops/machines")
        .join(machine)
        .join("key.json")
}

/// The secrets of `machine` in the store (`vars/per-machine/<m>/<gen>/<file>/secret`).
fn secrets_of(repo: &Repo, machine: &str) -> Vec<PathBuf> {
    let root = repo.root.join("vars/per-machine").join(machine);
    let mut found: Vec<PathBuf> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|g| std::fs::read_dir(g.path()).into_iter().flatten().flatten())
        .map(|f| f.path().join("secret"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found
}

/// The machine's public key, made with its private key when it has neither (and no secret
/// of it exists). Returns the key and the paths written.
pub fn ensure_machine_key(
    repo: &Repo,
    machine: &str,
    vars: &MachineVars,
    writer: &Writer,
) -> Result<(age::x25519::Recipient, Vec<PathBuf>), Error> {
    let public = machine_public_path(repo, machine);
    let private = machine_key_path(ClanCoreStore::Sops, repo, machine);
    let dir = public.parent().expect("a file in a folder");
    if public.is_file() && private.is_file() {
        let keys = sops_links::read_keys(dir)?;
        let key = keys
            .first()
            .ok_or_else(|| Error::usage(format!("{} holds no age key", public.display())))?;
        let recipient = key
            .parse()
            .map_err(|_| Error::usage(format!("{} holds {key:?}, no age key", public.display())))?;
        return Ok((recipient, Vec::new()));
    }
    let secrets = secrets_of(repo, machine);
    if public.exists() || private.exists() || !secrets.is_empty() {
        let missing = [&public, &private]
            .into_iter()
            .filter(|p| !p.exists())
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ");
        return Err(Error::usage(format!(
            "machine {machine}'s key is incomplete in the sops store ({missing} missing{}): a new key would leave its secrets, and the target holding the old key, unable to decrypt; nothing was generated",
            if secrets.is_empty() {
                String::new()
            } else {
                format!(", while {} secret(s) of it exist", secrets.len())
            }
        ))
        .code("vars.key-missing")
        .hint(Hint::text(
            "restore the missing file from git (git log --all -- sops/), or, if the key is lost for good, delete the machine's secrets and sops/machines/<m> and generate again",
        )));
    }
    let identity = age::x25519::Identity::generate();
    let entries =
        serde_json::json!([{ "publickey": identity.to_public().to_string(), "type": "age" }]);
    let text = serde_json::to_string_pretty(&entries).expect("JSON always serializes") + "\n";
    super::write_atomically(&public, text.as_bytes())?;
    let key = zeroize::Zeroizing::new(format!(
        "{}\n",
        age::secrecy::ExposeSecret::expose_secret(&identity.to_string())
    ));
    let mut written = vec![public];
    written.extend(sops_links::write_secret(
        repo,
        &sops_links::FixSecret {
            dir: private.parent().expect("a file in a folder").to_path_buf(),
            var: format!("{machine}'s key"),
            machine,
            deploy: false,
        },
        &vars.sops_default_groups,
        writer.link(),
        key.as_bytes(),
    )?);
    Ok((identity.to_public(), written))
}

/// Writes secret `f` of generator `g` (the machine's link when deployed, the writer's and the
/// default groups'; a shared secret keeps its other machines' links), encrypted to exactly
/// the keys its links name. Returns the paths written.
#[allow(clippy::too_many_arguments)]
pub fn write_secret(
    repo: &Repo,
    machine: &str,
    vars: &MachineVars,
    g: &str,
    decl: &GeneratorDecl,
    f: &str,
    value: &[u8],
    writer: &Writer,
) -> Result<Vec<PathBuf>, Error> {
    let path = secret_path(ClanCoreStore::Sops, repo, machine, g, decl, f);
    sops_links::write_secret(
        repo,
        &sops_links::FixSecret {
            dir: path.parent().expect("a file in a folder").to_path_buf(),
            var: format!("{g}/{f}"),
            machine,
            deploy: decl.files[f].deploy,
        },
        &vars.sops_default_groups,
        writer.link(),
        value,
    )
}

/// Whether every deployed secret of shared generator `g` is for `machine` already (its
/// `machines/<m>` link is there).
pub fn shared_with(repo: &Repo, machine: &str, g: &str, decl: &GeneratorDecl) -> bool {
    decl.files
        .iter()
        .filter(|(_, file)| file.secret && file.deploy)
        .all(|(f, _)| {
            secret_path(ClanCoreStore::Sops, repo, machine, g, decl, f)
                .parent()
                .is_some_and(|dir| dir.join("machines").join(machine).is_symlink())
        })
}

/// Shares shared generator `g`'s existing secrets with `machine`: its link added where the
/// secret is deployed, and the secret encrypted anew to the linked keys (opened with the
/// user's key, which the writer's link names). Returns the paths changed.
pub fn share_with(
    repo: &Repo,
    machine: &str,
    vars: &MachineVars,
    g: &str,
    decl: &GeneratorDecl,
    user: &UserIdentity,
) -> Result<Vec<PathBuf>, Error> {
    let mut changed = Vec::new();
    for (f, file) in decl.files.iter().filter(|(_, file)| file.secret) {
        let path = secret_path(ClanCoreStore::Sops, repo, machine, g, decl, f);
        let dir = path.parent().expect("a file in a folder").to_path_buf();
        if !file.deploy || dir.join("machines").join(machine).is_symlink() {
            continue;
        }
        let open = |text: &str| {
            sops::decrypt(text, &user.identities).map_err(|e| {
                Error::usage(format!(
                    "cannot share {} with machine {machine}: your age key ({}) does not open it: {e}",
                    path.display(),
                    user.source
                ))
                .hint(Hint::text(
                    "someone whose key opens it (its users/ links) runs `clan vars generate` for this machine",
                ))
            })
        };
        changed.extend(sops_links::fix(
            repo,
            &sops_links::FixSecret {
                dir,
                var: format!("{g}/{f}"),
                machine,
                deploy: true,
            },
            &vars.sops_default_groups,
            &open,
        )?);
    }
    Ok(changed)
}

/// Before anything is generated for `machine` (and in the dry run, which predicts that):
/// every secret is encrypted to exactly the keys its links name, and no var that is missing
/// here exists in this tool's age layout ([`age_layout_file`]), which would mean the clan
/// keeps its vars there.
pub fn check_before_generating(
    repo: &Repo,
    machine: &str,
    vars: &MachineVars,
    done: &str,
) -> Result<(), Error> {
    super::clan_core_store::check_recipients(ClanCoreStore::Sops, repo, machine, vars, done)?;
    let missing = vars
        .generators
        .iter()
        .any(|(g, decl)| !super::generated(repo, machine, vars, g, decl));
    match age_layout_file(repo, machine, vars).filter(|_| missing) {
        None => Ok(()),
        Some(found) => Err(Error::usage(format!(
            "machine {machine}'s vars exist in this tool's age layout ({}), while its clan selects the sops store (clan.core.vars.settings.secretStore, from vars.settings.secretStore, whose default is sops): refusing to generate new secrets beside them; nothing was {done}",
            found.display()
        ))
        .code("vars.foreign-layout")
        .hint(Hint::text(
            "keep the age store: set vars.settings.secretStore = \"age\" in the clan (README, Secrets)",
        ))),
    }
}

/// The first file of `machine` in this tool's age layout, where the clan selects the sops
/// store: its secrets or key live there, and generating into the sops store would make new
/// ones beside them.
pub fn age_layout_file(repo: &Repo, machine: &str, vars: &MachineVars) -> Option<PathBuf> {
    let key = [repo.machine_pub(machine), repo.machine_key(machine)]
        .into_iter()
        .find(|p| p.exists());
    key.or_else(|| repo.secrets_of(machine).into_iter().next())
        .or_else(|| {
            vars.generators.iter().find_map(|(g, decl)| {
                decl.files
                    .keys()
                    .map(|f| repo.secret_path(machine, g, decl, f))
                    .find(|p| p.exists())
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vars::FileDecl;
    use std::path::Path;

    fn clan() -> (tempfile::TempDir, Repo, UserIdentity, Writer) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo {
            root: dir.path().to_path_buf(),
        };
        let id = age::x25519::Identity::generate();
        let user = UserIdentity::parse(
            "test".into(),
            age::secrecy::ExposeSecret::expose_secret(&id.to_string()),
        )
        .unwrap();
        sops_links::write_user_keys(&repo, "admin", &user.recipients(), false).unwrap();
        let writer = Writer::of(&repo, &user).unwrap();
        (dir, repo, user, writer)
    }

    /// A machine with one shared generator `ca` (secret `key`) and one of its own, `api`.
    fn vars() -> MachineVars {
        let secret = FileDecl {
            secret: true,
            deploy: true,
            ..FileDecl::default()
        };
        let mut vars = MachineVars {
            secret_module: Some("clan_lib.vars.secret_modules.sops".into()),
            ..MachineVars::default()
        };
        let mut ca = GeneratorDecl {
            share: true,
            ..GeneratorDecl::default()
        };
        ca.files.insert("key".into(), secret.clone());
        vars.generators.insert("ca".into(), ca);
        let mut api = GeneratorDecl::default();
        api.files.insert("token".into(), secret);
        vars.generators.insert("api".into(), api);
        vars
    }

    fn machine_identity(repo: &Repo, machine: &str, user: &UserIdentity) -> age::x25519::Identity {
        let key =
            crate::vars::clan_core_store::machine_key(ClanCoreStore::Sops, repo, machine, user)
                .unwrap();
        std::str::from_utf8(&key).unwrap().trim().parse().unwrap()
    }

    #[test]
    fn a_machine_key_is_made_once_and_never_over_half_of_one() {
        let (_dir, repo, user, writer) = clan();
        let vars = vars();
        assert!(
            Writer::of(
                &repo,
                &UserIdentity::parse(
                    "other".into(),
                    age::secrecy::ExposeSecret::expose_secret(
                        &age::x25519::Identity::generate().to_string()
                    ),
                )
                .unwrap()
            )
            .is_err()
        );
        let (public, written) = ensure_machine_key(&repo, "m", &vars, &writer).unwrap();
        assert_eq!(written.len(), 3, "{written:?}"); // key.json, the secret, the user's link
        assert_eq!(
            machine_identity(&repo, "m", &user).to_public().to_string(),
            public.to_string()
        );
        // The links clan-core makes (os.path.relpath), byte for byte.
        let link = |p: &str| std::fs::read_link(repo.root.join(p)).unwrap();
        assert_eq!(
            link("sops/secrets/m-age.key/users/admin"),
            Path::new("../../../users/admin")
        );
        let (again, written) = ensure_machine_key(&repo, "m", &vars, &writer).unwrap();
        assert_eq!((again.to_string(), written.len()), (public.to_string(), 0));
        // Half a key pair: never a new one.
        std::fs::remove_file(machine_key_path(ClanCoreStore::Sops, &repo, "m")).unwrap();
        let e = ensure_machine_key(&repo, "m", &vars, &writer)
            .err()
            .unwrap();
        assert_eq!(e.code, Some("vars.key-missing"));
        assert!(machine_public_path(&repo, "m").is_file());
        // Secrets of a machine without its key: never a new one either.
        let orphan = repo.root.join("vars/per-machine/n/api/token/secret");
        std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
        std::fs::write(&orphan, "{}").unwrap();
        let e = ensure_machine_key(&repo, "n", &vars, &writer)
            .err()
            .unwrap();
        assert!(
            e.message.contains("1 secret(s) of it exist"),
            "{}",
            e.message
        );
        assert!(!machine_public_path(&repo, "n").exists());
    }

    #[test]
    fn a_shared_secret_is_shared_by_link_and_encrypted_anew() {
        let (_dir, repo, user, writer) = clan();
        let vars = vars();
        ensure_machine_key(&repo, "m1", &vars, &writer).unwrap();
        ensure_machine_key(&repo, "m2", &vars, &writer).unwrap();
        let ca = &vars.generators["ca"];
        write_secret(&repo, "m1", &vars, "ca", ca, "key", b"the ca", &writer).unwrap();
        let path = secret_path(ClanCoreStore::Sops, &repo, "m1", "ca", ca, "key");
        assert!(path.starts_with(repo.root.join("vars/shared/ca/key")));
        let m2 = machine_identity(&repo, "m2", &user);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(sops::decrypt(&text, std::slice::from_ref(&m2)).is_err());
        assert!(crate::vars::generated(&repo, "m2", &vars, "ca", ca));
        let changed = share_with(&repo, "m2", &vars, "ca", ca, &user).unwrap();
        assert!(changed.contains(&path), "{changed:?}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            &sops::decrypt(&text, std::slice::from_ref(&m2)).unwrap()[..],
            b"the ca"
        );
        let m1 = machine_identity(&repo, "m1", &user);
        assert!(sops::decrypt(&text, std::slice::from_ref(&m1)).is_ok());
        assert_eq!(
            std::fs::read_link(path.parent().unwrap().join("machines/m2")).unwrap(),
            Path::new("../../../../../sops/machines/m2")
        );
        // Shared already: nothing changes.
        assert!(
            share_with(&repo, "m2", &vars, "ca", ca, &user)
                .unwrap()
                .is_empty()
        );
        assert!(check_before_generating(&repo, "m2", &vars, "generated").is_ok());
    }

    #[test]
    fn vars_in_the_age_layout_are_never_generated_beside() {
        let (_dir, repo, _user, _writer) = clan();
        let vars = vars();
        assert!(check_before_generating(&repo, "m", &vars, "generated").is_ok());
        let age = repo.secret_path("m", "api", &vars.generators["api"], "token");
        std::fs::create_dir_all(age.parent().unwrap()).unwrap();
        std::fs::write(&age, "age").unwrap();
        let e = check_before_generating(&repo, "m", &vars, "generated")
            .err()
            .unwrap();
        assert_eq!(e.code, Some("vars.foreign-layout"));
        assert!(e.message.contains("token.age"), "{}", e.message);
    }
}
