//! clan-core's secret stores, read as clan-core lays them out. Public values are
//! `vars/<scope>/<gen>/<file>/value` in both (`<scope>`: `per-machine/<m>` or `shared`).
//!
//! **sops** (clan-core's default):
//! - `sops/users/<u>/key.json`, `sops/machines/<m>/key.json`: public keys
//!   (`[{"publickey": "age1…", "type": "age"}]`, or one such object);
//! - `sops/secrets/<m>-age.key/secret`: the machine's private key, sops-encrypted to users;
//! - `vars/<scope>/<gen>/<file>/secret`: a secret, sops-encrypted to the machines and users its
//!   `machines/`, `users/` and `groups/` symlinks name.
//!
//! **age**:
//! - `secrets/age-keys/machines/<m>/{pub,key.age}`: the machine's key pair, the private half
//!   age-encrypted to `vars.settings.recipients` (the same files as this tool's own age store);
//! - `secrets/clan-vars/<scope>/<gen>/<file>/<file>.age`: a secret, age-encrypted to machines.
//!
//! This tool reads those stores (list, get, check) and deploys from them: the machine's key
//! goes to the target as `key.txt` (sops: `clan.core.vars.sops.secretUploadDirectory`; age:
//! `clan.core.vars.age.secretLocation`), and the secrets reach the target inside the system
//! closure, where they are decrypted (clan-core's library: sops-nix, its age module; this
//! repository's: `sops` at activation, `nix/vars.nix`). In the sops store it checks and fixes
//! who each secret is for ([`sops_links`]). It generates into the sops store for machines
//! whose generators are this library's ([`super::sops_store`]); with clan-core's generators a
//! missing var is an error naming clan-core's command, never a new secret.

use std::path::PathBuf;

use super::{
    GeneratorDecl, MachineVars, Repo, Secret, UserIdentity, decrypt_with, scope, sops, sops_links,
};
use crate::error::{Error, Hint};

/// A store of clan-core's that this tool reads and deploys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClanCoreStore {
    /// Its default: sops files, decrypted on the target by sops-nix.
    Sops,
    /// Its age store (`clan_lib.vars.secret_modules.age`).
    Age,
}

impl ClanCoreStore {
    /// Its name, as clan-core's `secretStore` says it.
    pub fn name(self) -> &'static str {
        match self {
            ClanCoreStore::Sops => "sops",
            ClanCoreStore::Age => "age",
        }
    }
}

/// The [`Error::code`] of a var that a clan-core store lacks.
pub const MISSING: &str = "vars.clan-core-missing";

/// The [`Error::code`] of a change asked of a clan-core store, which this tool does not
/// write.
pub const READ_ONLY: &str = "vars.clan-core-read-only";

/// Where the store keeps file `f` of generator `g`.
pub fn secret_path(
    store: ClanCoreStore,
    repo: &Repo,
    machine: &str,
    g: &str,
    decl: &GeneratorDecl,
    f: &str,
) -> PathBuf {
    match store {
        ClanCoreStore::Sops => repo
            .root
            .join("vars")
            .join(scope(machine, decl))
            .join(g)
            .join(f)
            .join("secret"),
        ClanCoreStore::Age => repo
            .root
            .join("secrets/clan-vars")
            .join(scope(machine, decl))
            .join(g)
            .join(f)
            .join(format!("{f}.age")),
    }
}

/// The machine's private key, encrypted to the users.
pub fn machine_key_path(store: ClanCoreStore, repo: &Repo, machine: &str) -> PathBuf {
    match store {
        ClanCoreStore::Sops => repo
            .root
            .join("sops/secrets")
            .join(format!("{machine}-age.key"))
            .join("secret"),
        ClanCoreStore::Age => repo.machine_key(machine),
    }
}

/// What the store lacks for `machine`, one phrase each: `gen/file is not generated` (public
/// values included), `gen has a changed validation` (clan-core would generate it again).
pub fn missing(
    store: ClanCoreStore,
    repo: &Repo,
    machine: &str,
    vars: &MachineVars,
) -> Vec<String> {
    let mut missing = Vec::new();
    for (g, decl) in &vars.generators {
        for (f, file) in &decl.files {
            let path = if file.secret {
                secret_path(store, repo, machine, g, decl, f)
            } else {
                repo.value_path(machine, g, decl, f)
            };
            if !path.is_file() {
                missing.push(format!("{g}/{f} is not generated"));
            }
        }
        if !repo.validation_current(machine, g, decl) {
            missing.push(format!("{g} has a changed validation"));
        }
    }
    missing
}

/// The sops secrets of `machine` that exist, each as (`gen/file`, its folder, deployed): its
/// vars, and its own key (`sops/secrets/<m>-age.key`, for users only).
fn sops_secrets(repo: &Repo, machine: &str, vars: &MachineVars) -> Vec<(String, PathBuf, bool)> {
    let key = machine_key_path(ClanCoreStore::Sops, repo, machine);
    let key = (
        format!("{machine}'s key"),
        key.parent().expect("a file in a folder").to_path_buf(),
        false,
    );
    std::iter::once(key)
        .chain(vars.generators.iter().flat_map(|(g, decl)| {
            decl.files
                .iter()
                .filter(|(_, file)| file.secret)
                .map(move |(f, file)| {
                    let path = secret_path(ClanCoreStore::Sops, repo, machine, g, decl, f);
                    let dir = path.parent().expect("a file in a folder").to_path_buf();
                    (format!("{g}/{f}"), dir, file.deploy)
                })
        }))
        .filter(|(_, dir, _)| dir.join("secret").is_file())
        .collect()
}

/// Each sops secret of `machine` whose recipients differ from its links (see
/// [`sops_links`]), described; empty for the age store.
pub fn recipient_problems(
    store: ClanCoreStore,
    repo: &Repo,
    machine: &str,
    vars: &MachineVars,
) -> Result<Vec<String>, Error> {
    if store != ClanCoreStore::Sops {
        return Ok(Vec::new());
    }
    let mut problems = Vec::new();
    for (var, dir, _) in sops_secrets(repo, machine, vars) {
        if let Some(difference) = sops_links::compare(repo, &dir, &vars.sops_default_groups)? {
            problems.push(difference.describe(&var));
        }
    }
    Ok(problems)
}

/// `clan vars fix` for the sops store: every secret of `machine` agrees with its links
/// again ([`sops_links::fix`]), decrypted with the user's key or the machine's. Returns the
/// paths changed. (The age store, clan-core's too, is fixed as this tool's own:
/// [`super::generate::fix_keys`], [`super::generate::fix_undeployed`],
/// [`super::generate::fix_shared`].)
pub fn fix(
    repo: &Repo,
    machine: &str,
    vars: &MachineVars,
    user: &UserIdentity,
) -> Result<Vec<PathBuf>, Error> {
    let store = ClanCoreStore::Sops;
    let mut changed = Vec::new();
    for (var, dir, deploy) in sops_secrets(repo, machine, vars) {
        let path = dir.join("secret");
        let open = |text: &str| open_sops(store, repo, machine, text, &path, user);
        changed.extend(sops_links::fix(
            repo,
            &sops_links::FixSecret {
                dir: dir.clone(),
                var,
                machine,
                deploy,
            },
            &vars.sops_default_groups,
            &open,
        )?);
    }
    Ok(changed)
}

/// `clan vars set` in the sops store (the age store, clan-core's too, is written as this
/// tool's own): a public value as it is; a secret written as
/// clan-core writes it ([`sops_links::write_secret`]: the machine's, default groups' and your
/// user's links, encrypted to exactly the linked keys). Your key must be a sops user of the
/// clan (`sops/users/<u>/key.json`). Returns the paths changed.
pub fn set(
    repo: &Repo,
    machine: &str,
    vars: &MachineVars,
    g: &str,
    f: &str,
    value: &[u8],
    user: &UserIdentity,
) -> Result<Vec<PathBuf>, Error> {
    let decl = &vars.generators[g];
    let file = &decl.files[f];
    if !file.secret {
        let path = repo.value_path(machine, g, decl, f);
        super::write_atomically(&path, value)?;
        return Ok(vec![path]);
    }
    let writer = super::sops_store::Writer::of(repo, user)?;
    super::sops_store::write_secret(repo, machine, vars, g, decl, f, value, &writer)
}

/// Nothing is generated in a clan-core store here: Ok when every var is there (and nothing
/// is asked to be made again) and, in the sops store, every secret is encrypted to exactly
/// the keys its links name; else an error naming what is wrong and the command that mends
/// it.
pub fn check_complete(
    store: ClanCoreStore,
    repo: &Repo,
    machine: &str,
    vars: &MachineVars,
    regenerate: bool,
) -> Result<(), Error> {
    let missing = missing(store, repo, machine, vars);
    if missing.is_empty() && !regenerate {
        return check_recipients(store, repo, machine, vars, "generated or uploaded");
    }
    let code = if missing.is_empty() {
        READ_ONLY
    } else {
        MISSING
    };
    let what = if missing.is_empty() {
        "regenerating vars was asked for".to_string()
    } else {
        missing.join(", ")
    };
    Err(Error::usage(format!(
        "machine {machine} keeps its vars in clan-core's {} store: {what}; this tool does not run clan-core's generators (their finalScript), so nothing was generated",
        store.name()
    ))
    .code(code)
    .hint(Hint::text(format!(
        "generate them with clan-core's CLI (clan vars generate {machine}), commit them, and deploy again"
    ))))
}

/// Ok when every sops secret of `machine` is encrypted to exactly the keys its links name;
/// else an error naming each difference and `vars fix` (nothing was `done`).
pub fn check_recipients(
    store: ClanCoreStore,
    repo: &Repo,
    machine: &str,
    vars: &MachineVars,
    done: &str,
) -> Result<(), Error> {
    let problems = recipient_problems(store, repo, machine, vars)?;
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::usage(format!(
        "machine {machine}'s sops secrets are not encrypted to exactly the keys their links name: {}; nothing was {done}",
        problems.join("; ")
    ))
    .code(sops_links::RECIPIENTS_CHANGED)
    .hint(Hint::text(format!(
        "if the change is intended, `{}` re-encrypts them (and sets the machine's links); else find who changed the links or the files",
        crate::hint::command("vars fix", machine, &[])
    ))))
}

/// A file of the repository, its path named on failure.
fn read_file(path: &std::path::Path) -> Result<Secret, Error> {
    std::fs::read(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| Error::usage(format!("cannot read {}: {e}", path.display())))
}

/// [`read_file`], as text.
fn read_text(path: &std::path::Path) -> Result<String, Error> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::usage(format!("cannot read {}: {e}", path.display())))
}

/// Decrypts `text`, the sops file at `path`, with `identities`, naming the file and the key
/// on failure.
fn open(
    text: &str,
    path: &std::path::Path,
    identities: &[age::x25519::Identity],
    whose: &str,
) -> Result<Secret, Error> {
    sops::decrypt(text, identities).map_err(|e| {
        Error::usage(format!("cannot decrypt {} with {whose}: {e}", path.display())).hint(
            Hint::text(
                "your age key must be one of its recipients: its users/ (or groups/) symlinks name who may read it (clan-core: clan secrets users add, clan vars fix)",
            ),
        )
    })
}

/// The machine's private key (`AGE-SECRET-KEY-1…`), decrypted with the user's key.
pub fn machine_key(
    store: ClanCoreStore,
    repo: &Repo,
    machine: &str,
    user: &UserIdentity,
) -> Result<Secret, Error> {
    let path = machine_key_path(store, repo, machine);
    if !path.is_file() {
        return Err(Error::usage(format!(
            "machine {machine} has no key in the {} store ({} is missing): the target could not decrypt its secrets",
            store.name(),
            path.display()
        ))
        .code(MISSING)
        .hint(Hint::text(format!(
            "the machine's first vars make it: clan vars generate {machine}"
        ))));
    }
    match store {
        ClanCoreStore::Sops => open(
            &read_text(&path)?,
            &path,
            &user.identities,
            &format!("your age key ({})", user.source),
        ),
        ClanCoreStore::Age => repo.machine_private_key(machine, user),
    }
}

/// The machine's key as an age identity.
fn machine_identity(
    store: ClanCoreStore,
    repo: &Repo,
    machine: &str,
    user: &UserIdentity,
) -> Result<age::x25519::Identity, Error> {
    let key = machine_key(store, repo, machine, user)?;
    std::str::from_utf8(&key)
        .unwrap_or("")
        .trim()
        .parse()
        .map_err(|_| {
            Error::usage(format!(
                "{} does not hold an age private key",
                machine_key_path(store, repo, machine).display()
            ))
        })
}

/// A var's content: a public value as it is, a secret decrypted with the user's key (sops,
/// when the user is among its recipients) or the machine's key (which the user's opens).
pub fn read(
    store: ClanCoreStore,
    repo: &Repo,
    machine: &str,
    g: &str,
    decl: &GeneratorDecl,
    f: &str,
    user: &UserIdentity,
) -> Result<Secret, Error> {
    if !decl.files[f].secret {
        return read_file(&repo.value_path(machine, g, decl, f));
    }
    let path = secret_path(store, repo, machine, g, decl, f);
    if store == ClanCoreStore::Age {
        // A secret that is not deployed is encrypted to the people, not the machine.
        if !decl.files[f].deploy
            && let Ok(plain) = user.decrypt(&read_file(&path)?)
        {
            return Ok(plain);
        }
        let identity = machine_identity(store, repo, machine, user)?;
        return open_age(&path, &identity, machine);
    }
    open_sops(store, repo, machine, &read_text(&path)?, &path, user)
}

/// The sops file `text` (at `path`), decrypted with the user's key, or else with the
/// machine's key (which the user's opens).
fn open_sops(
    store: ClanCoreStore,
    repo: &Repo,
    machine: &str,
    text: &str,
    path: &std::path::Path,
    user: &UserIdentity,
) -> Result<Secret, Error> {
    match sops::decrypt(text, &user.identities) {
        Ok(plain) => Ok(plain),
        Err(sops::SopsError::NotARecipient(_)) => {
            let machine_identity = machine_identity(store, repo, machine, user)?;
            open(
                text,
                path,
                std::slice::from_ref(&machine_identity),
                &format!("your age key ({}) or machine {machine}'s key", user.source),
            )
        }
        Err(e) => Err(Error::usage(format!(
            "cannot decrypt {}: {e}",
            path.display()
        ))),
    }
}

/// The age file at `path`, decrypted with `machine`'s key `identity`.
fn open_age(
    path: &std::path::Path,
    identity: &age::x25519::Identity,
    machine: &str,
) -> Result<Secret, Error> {
    decrypt_with(std::slice::from_ref(identity), &read_file(path)?).map_err(|e| {
        Error::usage(format!(
            "cannot decrypt {} with machine {machine}'s key: {e}",
            path.display()
        ))
    })
}

/// Before anything is built: the machine's key decrypts with the user's key, and every
/// secret the target needs is encrypted to it, so the key that is uploaded opens them all.
pub fn check_upload(
    store: ClanCoreStore,
    repo: &Repo,
    machine: &str,
    vars: &MachineVars,
    user: &UserIdentity,
) -> Result<(), Error> {
    check_complete(store, repo, machine, vars, false)?;
    let identity = machine_identity(store, repo, machine, user)?;
    let public = identity.to_public().to_string();
    for (g, decl) in &vars.generators {
        for (f, _) in decl.files.iter().filter(|(_, file)| file.uploaded()) {
            let path = secret_path(store, repo, machine, g, decl, f);
            if store == ClanCoreStore::Age {
                // age files name no recipients: the machine's key must open it.
                open_age(&path, &identity, machine).map_err(|e| {
                    Error::usage(format!(
                        "machine {machine}'s secret {g}/{f} does not decrypt with the machine's key: the target could not decrypt it; nothing was uploaded ({})",
                        e.message
                    ))
                })?;
                continue;
            }
            let text = read_text(&path)?;
            let for_whom = sops::recipients(&text)
                .map_err(|e| Error::usage(format!("{}: {e}", path.display())))?;
            if !for_whom.contains(&public) {
                return Err(Error::usage(format!(
                    "machine {machine}'s secret {g}/{f} ({}) is not encrypted to the machine's key ({public}): the target could not decrypt it; nothing was uploaded",
                    path.display()
                ))
                .hint(Hint::text(format!(
                    "`clan vars fix {machine}` adds the machine as a recipient (its link, the file encrypted anew); commit, and deploy again"
                ))));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vars::FileDecl;

    fn repo() -> Repo {
        Repo {
            root: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/clan-core-sops"),
        }
    }

    fn admin() -> UserIdentity {
        let key = std::fs::read_to_string(repo().root.join("admin-age-key.txt")).unwrap();
        UserIdentity::parse("the test key".into(), &key).unwrap()
    }

    /// peer1's vars as clan-core's checks declare them.
    fn peer1() -> MachineVars {
        let file = |secret: bool| FileDecl {
            secret,
            deploy: true,
            ..FileDecl::default()
        };
        let mut vars = MachineVars::default();
        let mut dummy = GeneratorDecl::default();
        dummy.files.insert("generated-password".into(), file(true));
        dummy.files.insert("host-id".into(), file(false));
        vars.generators.insert("dummy-generator".into(), dummy);
        let mut service = GeneratorDecl::default();
        service.files.insert("a-secret".into(), file(true));
        service.files.insert("not-a-secret".into(), file(false));
        vars.generators.insert("new-service".into(), service);
        vars
    }

    #[test]
    fn clan_cores_sops_repository_is_read_as_it_is() {
        let (repo, user, vars) = (repo(), admin(), peer1());
        assert!(missing(ClanCoreStore::Sops, &repo, "peer1", &vars).is_empty());
        assert!(check_complete(ClanCoreStore::Sops, &repo, "peer1", &vars, false).is_ok());
        check_upload(ClanCoreStore::Sops, &repo, "peer1", &vars, &user).unwrap();
        let key = machine_key(ClanCoreStore::Sops, &repo, "peer1", &user).unwrap();
        assert!(
            std::str::from_utf8(&key)
                .unwrap()
                .trim()
                .starts_with("AGE-SECRET-KEY-1")
        );
        let g = &vars.generators["dummy-generator"];
        let secret = read(
            ClanCoreStore::Sops,
            &repo,
            "peer1",
            "dummy-generator",
            g,
            "generated-password",
            &user,
        );
        assert!(!secret.unwrap().is_empty());
        let value = read(
            ClanCoreStore::Sops,
            &repo,
            "peer1",
            "dummy-generator",
            g,
            "host-id",
            &user,
        )
        .unwrap();
        assert!(!value.is_empty());
    }

    #[test]
    fn a_missing_var_is_named_and_never_made() {
        let (repo, mut vars) = (repo(), peer1());
        let mut more = GeneratorDecl::default();
        more.files.insert(
            "token".into(),
            FileDecl {
                secret: true,
                deploy: true,
                ..FileDecl::default()
            },
        );
        vars.generators.insert("api".into(), more);
        assert_eq!(
            missing(ClanCoreStore::Sops, &repo, "peer1", &vars),
            ["api/token is not generated"]
        );
        let error = check_complete(ClanCoreStore::Sops, &repo, "peer1", &vars, false).unwrap_err();
        assert_eq!(error.code, Some(MISSING));
        assert!(
            error.message.contains("api/token is not generated"),
            "{}",
            error.message
        );
        assert!(
            !secret_path(
                ClanCoreStore::Sops,
                &repo,
                "peer1",
                "api",
                &vars.generators["api"],
                "token"
            )
            .exists()
        );
        // A validation hash the store does not have: clan-core would make it again.
        let mut changed = peer1();
        changed
            .generators
            .get_mut("new-service")
            .unwrap()
            .validation_hash = Some("abc".into());
        assert_eq!(
            missing(ClanCoreStore::Sops, &repo, "peer1", &changed),
            ["new-service has a changed validation"]
        );
        // Regenerating is refused too: it would make new secrets.
        assert!(check_complete(ClanCoreStore::Sops, &repo, "peer1", &peer1(), true).is_err());
        // A machine without a key in the store.
        assert_eq!(
            machine_key(ClanCoreStore::Sops, &repo, "nokey", &admin())
                .unwrap_err()
                .code,
            Some(MISSING)
        );
    }
}
