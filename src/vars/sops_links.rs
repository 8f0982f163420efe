//! Who a secret of clan-core's sops store is for, as clan-core decides it: a secret's folder
//! (`vars/<scope>/<gen>/<file>/`) holds links `machines/<m>` → `sops/machines/<m>`,
//! `users/<u>` → `sops/users/<u>` and `groups/<g>` → `sops/groups/<g>` (whose own
//! `machines/` and `users/` links name its members), plus the machine's
//! `clan.core.sops.defaultGroups`; each `key.json` holds age public keys. The file's
//! recipients must be exactly those keys: one more (someone added a link but never
//! re-encrypted, or added their key to the file) or one fewer is reported by `vars check`
//! and stops generate and the deploy, and `vars fix` makes them agree: the machine's link
//! set by the file's `deploy`, the default groups' links added, the secret re-encrypted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{Repo, Secret, sops};
use crate::error::{Error, Hint};

/// The [`Error::code`] of a secret whose recipients differ from its links.
pub const RECIPIENTS_CHANGED: &str = "vars.recipients-changed";

/// The age public keys of `dir/key.json` (see [`read_typed_keys`]; keys of other types, which
/// clan-core also allows, are left out).
pub fn read_keys(dir: &Path) -> Result<Vec<String>, Error> {
    Ok(read_typed_keys(dir)?
        .into_iter()
        .filter(|(kind, _)| kind == "age")
        .map(|(_, key)| key)
        .collect())
}

/// The public keys of `dir/key.json`, each with its type (`age`, `pgp`): a list of
/// `{"publickey", "type"}`, or one such object (clan-core's older form).
pub fn read_typed_keys(dir: &Path) -> Result<Vec<(String, String)>, Error> {
    #[derive(serde::Deserialize)]
    struct Key {
        publickey: String,
        #[serde(rename = "type", default = "age")]
        kind: String,
    }
    fn age() -> String {
        "age".into()
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Keys {
        Many(Vec<Key>),
        One(Key),
    }
    let path = dir.join("key.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::usage(format!("cannot read {}: {e}", path.display())))?;
    let keys = match serde_json::from_str::<Keys>(&text).map_err(|e| {
        Error::usage(format!(
            "{} is not clan-core's key.json: {e}",
            path.display()
        ))
    })? {
        Keys::Many(keys) => keys,
        Keys::One(key) => vec![key],
    };
    keys.into_iter()
        .map(|key| {
            if key.kind == "age" && !key.publickey.starts_with("age1") {
                return Err(Error::usage(format!(
                    "{} holds {:?}, which is not an age public key (age1…)",
                    path.display(),
                    crate::boundary::terminal_safe(&key.publickey)
                )));
            }
            Ok((key.kind, key.publickey))
        })
        .collect()
}

/// Which sops user of the clan `keys` (the user's own public keys) belong to: the first
/// `sops/users/<u>/key.json` holding one of them, with that user's keys.
pub fn user_of(repo: &Repo, keys: &[String]) -> Result<Option<(String, Vec<String>)>, Error> {
    let mut users: Vec<PathBuf> = std::fs::read_dir(repo.root.join("sops/users"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("key.json").is_file())
        .collect();
    users.sort();
    for dir in users {
        let theirs = read_keys(&dir)?;
        if theirs.iter().any(|k| keys.contains(k)) {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Ok(Some((name, theirs)));
        }
    }
    Ok(None)
}

/// Writes a secret into clan-core's sops store as clan-core's `vars set` does: the machine's
/// link when the secret is deployed, the default groups' links, the writing user's link when
/// its keys are not among the recipients yet; then `value` encrypted to exactly the keys the
/// links name. Returns the paths changed.
pub fn write_secret(
    repo: &Repo,
    secret: &FixSecret,
    default_groups: &[String],
    user: (&str, &[String]),
    value: &[u8],
) -> Result<Vec<PathBuf>, Error> {
    let mut linked = only_age(repo, secret, default_groups)?;
    let mut changed = Vec::new();
    ensure_links(repo, secret, default_groups, &mut changed)?;
    if !changed.is_empty() {
        linked = only_age(repo, secret, default_groups)?;
    }
    let (name, keys) = user;
    if !keys.iter().all(|k| linked.age.contains_key(k)) {
        ensure_link(
            repo,
            &secret.dir.join("users"),
            name,
            &format!("sops/users/{name}"),
            &mut changed,
        )?;
        linked = only_age(repo, secret, default_groups)?;
    }
    changed.push(encrypt_to(secret, &linked, value)?);
    Ok(changed)
}

/// Makes `sops/users/<user>/key.json` hold `keys` (clan-core's `clan secrets users add`):
/// written when missing; left when it holds them already (`None`); another set of keys is
/// the user's and replaced only with `force`.
pub fn write_user_keys(
    repo: &Repo,
    user: &str,
    keys: &[String],
    force: bool,
) -> Result<Option<PathBuf>, Error> {
    let dir = repo.root.join("sops/users").join(user);
    let path = dir.join("key.json");
    if path.exists() {
        let mut have: Vec<String> = read_typed_keys(&dir)?
            .into_iter()
            .map(|(kind, key)| {
                if kind == "age" {
                    key
                } else {
                    format!("{kind}:{key}")
                }
            })
            .collect();
        let mut want = keys.to_vec();
        have.sort();
        want.sort();
        if have == want {
            return Ok(None);
        }
        if !force {
            return Err(Error::usage(format!(
                "{} holds other keys for user {user} ({}): nothing was changed",
                path.display(),
                have.join(", ")
            ))
            .code("vars.user-exists")
            .hint(Hint::text(
                "choose another name with --user NAME, or replace those keys with --force (then `clan vars fix` re-encrypts the secrets)",
            )));
        }
    }
    let entries: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| serde_json::json!({ "publickey": k, "type": "age" }))
        .collect();
    let text = serde_json::to_string_pretty(&entries).expect("JSON always serializes") + "\n";
    super::write_atomically(&path, text.as_bytes())?;
    Ok(Some(path))
}

/// What the links of a secret name: age keys, each with where it comes from (`machine 'm'`,
/// `user 'u'`), and the sources of keys of other types (pgp), which this tool cannot
/// encrypt to.
#[derive(Default)]
struct Linked {
    age: BTreeMap<String, String>,
    others: Vec<String>,
}

/// The keys the links in `folder` (a `machines/` or `users/` folder) point to. As
/// clan-core: a link must resolve to a folder of the same kind; others are ignored.
fn keys_of_links(folder: &Path, found: &mut Linked) -> Result<(), Error> {
    let Some(kind) = folder.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for link in entries {
        if !link.is_symlink() {
            continue;
        }
        let Ok(target) = link.canonicalize() else {
            continue;
        };
        if target
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            != Some(kind)
        {
            continue;
        }
        let name = link
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Shown to people: a file name of the repository, made terminal-safe.
        let label = format!(
            "{} '{}'",
            kind.trim_end_matches('s'),
            crate::boundary::terminal_safe(&name)
        );
        for (kind, key) in read_typed_keys(&target)? {
            if kind == "age" {
                found.age.entry(key).or_insert_with(|| label.clone());
            } else {
                found.others.push(format!("{kind} key of {label}"));
            }
        }
    }
    Ok(())
}

/// The keys the secret whose folder is `dir` must be encrypted to, with where each comes
/// from: its `machines/`, `users/` and `groups/<g>/{machines,users}/` links, and the members
/// of `default_groups` (from the clan's `sops/groups/`).
pub fn wanted(
    repo: &Repo,
    dir: &Path,
    default_groups: &[String],
) -> Result<BTreeMap<String, String>, Error> {
    Ok(linked(repo, dir, default_groups)?.age)
}

/// [`wanted`], with the keys of other types.
fn linked(repo: &Repo, dir: &Path, default_groups: &[String]) -> Result<Linked, Error> {
    let mut found = Linked::default();
    keys_of_links(&dir.join("machines"), &mut found)?;
    keys_of_links(&dir.join("users"), &mut found)?;
    let mut groups: Vec<PathBuf> = std::fs::read_dir(dir.join("groups"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    groups.extend(
        default_groups
            .iter()
            .map(|g| repo.root.join("sops/groups").join(g)),
    );
    for group in groups {
        keys_of_links(&group.join("machines"), &mut found)?;
        keys_of_links(&group.join("users"), &mut found)?;
    }
    Ok(found)
}

/// How a secret's recipients differ from its links.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Difference {
    /// Keys its links name that it is not encrypted to, with where each comes from.
    pub missing: Vec<(String, String)>,
    /// Keys it is encrypted to that no link names.
    pub extra: Vec<String>,
}

impl Difference {
    /// The difference in words, for `vars check` and errors.
    pub fn describe(&self, var: &str) -> String {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!(
                "its links name {} it is not encrypted to",
                self.missing
                    .iter()
                    .map(|(key, from)| format!("{key} (key of {from})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !self.extra.is_empty() {
            parts.push(format!(
                "it is encrypted to {}, which no link names (someone may have added their key without a link)",
                self.extra.join(", ")
            ));
        }
        format!("secret {var}: {}", parts.join("; "))
    }
}

/// How the sops file `dir/secret` differs from the keys its links (and `default_groups`)
/// name; `None`: they agree.
pub fn compare(
    repo: &Repo,
    dir: &Path,
    default_groups: &[String],
) -> Result<Option<Difference>, Error> {
    let path = dir.join("secret");
    let text = read_secret(&path)?;
    difference(&text, &path, &wanted(repo, dir, default_groups)?)
}

/// The sops file at `path`, as text.
fn read_secret(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::usage(format!("cannot read {}: {e}", path.display())))
}

/// How the recipients of `text` (the sops file at `path`) differ from `wanted`.
fn difference(
    text: &str,
    path: &Path,
    wanted: &BTreeMap<String, String>,
) -> Result<Option<Difference>, Error> {
    let current =
        sops::recipients(text).map_err(|e| Error::usage(format!("{}: {e}", path.display())))?;
    let difference = Difference {
        missing: wanted
            .iter()
            .filter(|(key, _)| !current.contains(key))
            .map(|(key, from)| (key.clone(), from.clone()))
            .collect(),
        extra: current
            .iter()
            .filter(|key| !wanted.contains_key(*key))
            .cloned()
            .collect(),
    };
    Ok((difference != Difference::default()).then_some(difference))
}

/// A relative link from `link` (a path inside the repository) to `target` (relative to
/// the repository's root), the shortest one, as clan-core makes them (`os.path.relpath`:
/// `../../../../../../sops/machines/<m>` from a var, `../../../users/<u>` from a machine's
/// key in `sops/secrets/`).
fn relative_to_root(repo: &Repo, link: &Path, target: &str) -> PathBuf {
    let from: Vec<_> = link
        .parent()
        .and_then(|p| p.strip_prefix(&repo.root).ok())
        .map(|p| p.components().collect())
        .unwrap_or_default();
    let to: Vec<_> = Path::new(target).components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for part in &to[common..] {
        path.push(part);
    }
    path
}

/// Makes link `name` in `folder` point to `target` (relative to the root), unless it does.
fn ensure_link(
    repo: &Repo,
    folder: &Path,
    name: &str,
    target: &str,
    changed: &mut Vec<PathBuf>,
) -> Result<(), Error> {
    let link = folder.join(name);
    if link.is_symlink() {
        return Ok(());
    }
    std::fs::create_dir_all(folder)
        .map_err(|e| Error::new(format!("cannot create {}: {e}", folder.display())))?;
    std::os::unix::fs::symlink(relative_to_root(repo, &link, target), &link)
        .map_err(|e| Error::new(format!("cannot link {}: {e}", link.display())))?;
    changed.push(link);
    Ok(())
}

/// What [`fix`] is told about one secret.
pub struct FixSecret<'a> {
    /// Its folder (`vars/<scope>/<gen>/<file>`).
    pub dir: PathBuf,
    /// `gen/file`, for messages.
    pub var: String,
    /// The machine it belongs to (or shares it).
    pub machine: &'a str,
    /// Whether it goes to the machine (`deploy`): its `machines/<m>` link follows.
    pub deploy: bool,
}

/// Makes one secret agree with its links, as clan-core's `vars fix` does: the machine's
/// link is there exactly when the secret is deployed, the default groups' links are there,
/// and the file is encrypted to exactly the keys they name (decrypted with `open`, then
/// encrypted anew). Returns the paths changed (links and the file).
pub fn fix(
    repo: &Repo,
    secret: &FixSecret,
    default_groups: &[String],
    open: &dyn Fn(&str) -> Result<Secret, Error>,
) -> Result<Vec<PathBuf>, Error> {
    let mut linked = only_age(repo, secret, default_groups)?;
    let mut changed = Vec::new();
    let machine_link = secret.dir.join("machines").join(secret.machine);
    if !secret.deploy && machine_link.is_symlink() {
        std::fs::remove_file(&machine_link)
            .map_err(|e| Error::new(format!("cannot remove {}: {e}", machine_link.display())))?;
        changed.push(machine_link);
    }
    ensure_links(repo, secret, default_groups, &mut changed)?;
    if !changed.is_empty() {
        linked = only_age(repo, secret, default_groups)?;
    }
    let path = secret.dir.join("secret");
    let text = read_secret(&path)?;
    if difference(&text, &path, &linked.age)?.is_some() {
        changed.push(encrypt_to(secret, &linked, &open(&text)?)?);
    }
    Ok(changed)
}

/// What the secret's links (and the default groups) name, refused when that includes keys of
/// other types than age (pgp): this tool cannot encrypt to them, and writing the file would
/// take their readers' access away.
fn only_age(repo: &Repo, secret: &FixSecret, default_groups: &[String]) -> Result<Linked, Error> {
    let linked = linked(repo, &secret.dir, default_groups)?;
    if !linked.others.is_empty() {
        return Err(Error::usage(format!(
            "secret {} is also for {}, which this tool cannot encrypt to (age keys only): nothing was changed",
            secret.var,
            linked.others.join(", ")
        ))
        .hint(Hint::text(
            "re-encrypt it with clan-core's CLI (clan vars fix, clan vars set)",
        )));
    }
    Ok(linked)
}

/// The links every secret has: the machine's when it is deployed (the machine's key must be
/// in the store), and the default groups'.
fn ensure_links(
    repo: &Repo,
    secret: &FixSecret,
    default_groups: &[String],
    changed: &mut Vec<PathBuf>,
) -> Result<(), Error> {
    if secret.deploy {
        if !repo
            .root
            .join("sops/machines")
            .join(secret.machine)
            .join("key.json")
            .is_file()
        {
            return Err(Error::usage(format!(
                "machine {} has no key in the sops store (sops/machines/{}/key.json): {} cannot be encrypted to it",
                secret.machine, secret.machine, secret.var
            ))
            .hint(Hint::text(format!(
                "the machine's first vars make its key: clan vars generate {}",
                secret.machine
            ))));
        }
        ensure_link(
            repo,
            &secret.dir.join("machines"),
            secret.machine,
            &format!("sops/machines/{}", secret.machine),
            changed,
        )?;
    }
    for group in default_groups {
        if !repo.root.join("sops/groups").join(group).is_dir() {
            return Err(Error::usage(format!(
                "the default group {group} (clan.core.sops.defaultGroups) has no folder sops/groups/{group}"
            )));
        }
        ensure_link(
            repo,
            &secret.dir.join("groups"),
            group,
            &format!("sops/groups/{group}"),
            changed,
        )?;
    }
    Ok(())
}

/// Writes `value` as the secret's file, encrypted to exactly the age keys its links name
/// (`linked`, from [`only_age`]).
fn encrypt_to(secret: &FixSecret, linked: &Linked, value: &[u8]) -> Result<PathBuf, Error> {
    let recipients = linked
        .age
        .keys()
        .map(|k| {
            k.parse::<age::x25519::Recipient>()
                .map_err(|_| Error::usage(format!("{k} is not an age public key")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if recipients.is_empty() {
        return Err(Error::usage(format!(
            "secret {}: no link names anyone who may read it; nothing was changed",
            secret.var
        )));
    }
    let path = secret.dir.join("secret");
    let written = sops::encrypt(value, &recipients, &sops::now())
        .map_err(|e| Error::new(format!("cannot encrypt {}: {e}", path.display())))?;
    super::write_atomically(&path, written.as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writable copy of clan-core's own sops-written repository (tests/fixtures).
    fn copy() -> (tempfile::TempDir, Repo) {
        let dir = tempfile::tempdir().unwrap();
        let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clan-core-sops");
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", from.display()))
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        let repo = Repo {
            root: dir.path().to_path_buf(),
        };
        (dir, repo)
    }

    fn admin(repo: &Repo) -> crate::vars::UserIdentity {
        let key = std::fs::read_to_string(repo.root.join("admin-age-key.txt")).unwrap();
        crate::vars::UserIdentity::parse("the test key".into(), &key).unwrap()
    }

    fn add_user(repo: &Repo, name: &str) -> age::x25519::Identity {
        let id = age::x25519::Identity::generate();
        let dir = repo.root.join("sops/users").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("key.json"),
            format!(r#"[{{"publickey": "{}", "type": "age"}}]"#, id.to_public()),
        )
        .unwrap();
        id
    }

    /// [`fix`] of peer1's `new-service/a-secret`, opened with the admin's key.
    fn fix_as_admin(repo: &Repo, dir: &Path, deploy: bool, groups: &[String]) -> Vec<PathBuf> {
        try_fix_as_admin(repo, dir, deploy, groups).unwrap()
    }

    /// [`fix_as_admin`], its refusal returned.
    fn try_fix_as_admin(
        repo: &Repo,
        dir: &Path,
        deploy: bool,
        groups: &[String],
    ) -> Result<Vec<PathBuf>, Error> {
        let user = admin(repo);
        let open = |text: &str| {
            sops::decrypt(text, &user.identities).map_err(|e| Error::new(e.to_string()))
        };
        let secret = FixSecret {
            dir: dir.to_path_buf(),
            var: "new-service/a-secret".into(),
            machine: "peer1",
            deploy,
        };
        fix(repo, &secret, groups, &open)
    }

    #[test]
    fn clan_cores_own_files_agree_with_their_links() {
        let (_dir, repo) = copy();
        for var in [
            "vars/per-machine/peer1/new-service/a-secret",
            "vars/per-machine/peer1/dummy-generator/generated-password",
            "vars/per-machine/admin1/dummy-generator/generated-password",
            "sops/secrets/peer1-age.key",
            "sops/secrets/admin1-age.key",
        ] {
            assert_eq!(
                compare(&repo, &repo.root.join(var), &[]).unwrap(),
                None,
                "{var}"
            );
        }
    }

    #[test]
    fn a_new_link_is_reported_then_fixed_by_re_encrypting() {
        let (_dir, repo) = copy();
        let user = admin(&repo);
        let bob = add_user(&repo, "bob");
        let dir = repo
            .root
            .join("vars/per-machine/peer1/new-service/a-secret");
        let before = sops::decrypt(
            &std::fs::read_to_string(dir.join("secret")).unwrap(),
            &user.identities,
        )
        .unwrap();
        std::os::unix::fs::symlink("../../../../../../sops/users/bob", dir.join("users/bob"))
            .unwrap();
        let difference = compare(&repo, &dir, &[]).unwrap().unwrap();
        assert_eq!(
            difference.missing,
            [(bob.to_public().to_string(), "user 'bob'".to_string())]
        );
        assert!(
            difference
                .describe("new-service/a-secret")
                .contains("(key of user 'bob')")
        );
        let changed = fix_as_admin(&repo, &dir, true, &[]);
        assert_eq!(changed, [dir.join("secret")]);
        assert_eq!(compare(&repo, &dir, &[]).unwrap(), None);
        let text = std::fs::read_to_string(dir.join("secret")).unwrap();
        assert_eq!(
            sops::decrypt(&text, &[bob]).unwrap(),
            before,
            "bob reads it"
        );
        assert_eq!(sops::decrypt(&text, &user.identities).unwrap(), before);
    }

    #[test]
    fn a_key_without_a_link_is_reported_and_removed() {
        let (_dir, repo) = copy();
        let user = admin(&repo);
        let mallory = age::x25519::Identity::generate();
        let dir = repo
            .root
            .join("vars/per-machine/peer1/new-service/a-secret");
        // The file re-encrypted to one more key, no link added.
        let text = std::fs::read_to_string(dir.join("secret")).unwrap();
        let plain = sops::decrypt(&text, &user.identities).unwrap();
        let mut keys: Vec<age::x25519::Recipient> = sops::recipients(&text)
            .unwrap()
            .iter()
            .map(|k| k.parse().unwrap())
            .collect();
        keys.push(mallory.to_public());
        std::fs::write(
            dir.join("secret"),
            sops::encrypt(&plain, &keys, &sops::now()).unwrap(),
        )
        .unwrap();
        let difference = compare(&repo, &dir, &[]).unwrap().unwrap();
        assert_eq!(difference.extra, [mallory.to_public().to_string()]);
        fix_as_admin(&repo, &dir, true, &[]);
        let text = std::fs::read_to_string(dir.join("secret")).unwrap();
        assert!(
            sops::decrypt(&text, &[mallory]).is_err(),
            "mallory's key is gone"
        );
    }

    #[test]
    fn a_secret_is_written_as_clan_core_writes_it() {
        let (_dir, repo) = copy();
        let user = admin(&repo);
        let (name, keys) = user_of(&repo, &user.recipients()).unwrap().unwrap();
        assert_eq!(name, "admin");
        let secret = |var: &str, deploy| FixSecret {
            dir: repo.root.join("vars/per-machine/peer1").join(var),
            var: var.into(),
            machine: "peer1",
            deploy,
        };
        // A new one: the machine's link and the writer's, encrypted to exactly them.
        let new = secret("api/token", true);
        let changed = write_secret(&repo, &new, &[], (&name, &keys), b"v1").unwrap();
        assert!(changed.contains(&new.dir.join("machines/peer1")));
        assert!(changed.contains(&new.dir.join("users/admin")));
        assert_eq!(compare(&repo, &new.dir, &[]).unwrap(), None);
        let text = std::fs::read_to_string(new.dir.join("secret")).unwrap();
        assert_eq!(&sops::decrypt(&text, &user.identities).unwrap()[..], b"v1");
        // An existing one: a new value, the same recipients, no new link.
        let old = secret("new-service/a-secret", true);
        let before = sops::recipients(&std::fs::read_to_string(old.dir.join("secret")).unwrap());
        let changed = write_secret(&repo, &old, &[], (&name, &keys), b"v2").unwrap();
        assert_eq!(changed, [old.dir.join("secret")]);
        let text = std::fs::read_to_string(old.dir.join("secret")).unwrap();
        assert_eq!(sops::recipients(&text).unwrap(), before.unwrap());
        assert_eq!(&sops::decrypt(&text, &user.identities).unwrap()[..], b"v2");
        // Not deployed: no machine link.
        let kept = secret("api/seed", false);
        write_secret(&repo, &kept, &[], (&name, &keys), b"s").unwrap();
        assert!(!kept.dir.join("machines").exists());
    }

    #[test]
    fn the_machines_own_key_follows_its_links_too() {
        use crate::vars::clan_core_store::{ClanCoreStore, fix as fix_store, recipient_problems};
        let (_dir, repo) = copy();
        let user = admin(&repo);
        let bob = add_user(&repo, "bob");
        let vars = crate::vars::MachineVars::default();
        let key_dir = repo.root.join("sops/secrets/peer1-age.key");
        std::os::unix::fs::symlink("../../../users/bob", key_dir.join("users/bob")).unwrap();
        let problems = recipient_problems(ClanCoreStore::Sops, &repo, "peer1", &vars).unwrap();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("secret peer1's key: ") && problems[0].contains("user 'bob'"),
            "{problems:?}"
        );
        let changed = fix_store(&repo, "peer1", &vars, &user).unwrap();
        assert_eq!(changed, [key_dir.join("secret")]);
        let text = std::fs::read_to_string(key_dir.join("secret")).unwrap();
        let key = sops::decrypt(&text, &[bob]).unwrap();
        assert!(
            std::str::from_utf8(&key)
                .unwrap()
                .contains("AGE-SECRET-KEY-1")
        );
    }

    #[test]
    fn a_pgp_recipient_is_left_to_clan_core() {
        let (_dir, repo) = copy();
        let dir = repo
            .root
            .join("vars/per-machine/peer1/new-service/a-secret");
        let pgp = repo.root.join("sops/users/dave");
        std::fs::create_dir_all(&pgp).unwrap();
        std::fs::write(
            pgp.join("key.json"),
            r#"{"publickey": "ABCDEF0123456789", "type": "pgp"}"#,
        )
        .unwrap();
        std::os::unix::fs::symlink("../../../../../../sops/users/dave", dir.join("users/dave"))
            .unwrap();
        // Only age recipients are compared: nothing to report…
        assert_eq!(compare(&repo, &dir, &[]).unwrap(), None);
        // …and nothing this tool writes could keep dave's access: it refuses.
        let before = std::fs::read_to_string(dir.join("secret")).unwrap();
        let refused = try_fix_as_admin(&repo, &dir, false, &[]).unwrap_err();
        assert!(
            refused.message.contains("pgp key of user 'dave'"),
            "{}",
            refused.message
        );
        assert_eq!(std::fs::read_to_string(dir.join("secret")).unwrap(), before);
        assert!(
            dir.join("machines/peer1").is_symlink(),
            "no link was changed"
        );
    }

    #[test]
    fn deploy_and_default_groups_set_the_links() {
        let (_dir, repo) = copy();
        let carol = add_user(&repo, "carol");
        let group = repo.root.join("sops/groups/ops/users");
        std::fs::create_dir_all(&group).unwrap();
        std::os::unix::fs::symlink("../../../users/carol", group.join("carol")).unwrap();
        let dir = repo
            .root
            .join("vars/per-machine/peer1/new-service/a-secret");
        let groups = ["ops".to_string()];
        assert!(compare(&repo, &dir, &groups).unwrap().is_some());
        // Not deployed: the machine's link goes; the default group's comes.
        let changed = fix_as_admin(&repo, &dir, false, &groups);
        assert!(changed.contains(&dir.join("machines/peer1")));
        assert!(changed.contains(&dir.join("groups/ops")));
        assert!(!dir.join("machines/peer1").exists());
        assert_eq!(
            std::fs::read_link(dir.join("groups/ops")).unwrap(),
            Path::new("../../../../../../sops/groups/ops")
        );
        assert_eq!(compare(&repo, &dir, &groups).unwrap(), None);
        let text = std::fs::read_to_string(dir.join("secret")).unwrap();
        assert!(sops::decrypt(&text, &[carol]).is_ok());
        // Deployed again: the machine's link is back, as clan-core writes it.
        fix_as_admin(&repo, &dir, true, &groups);
        assert_eq!(
            std::fs::read_link(dir.join("machines/peer1")).unwrap(),
            Path::new("../../../../../../sops/machines/peer1")
        );
        assert_eq!(compare(&repo, &dir, &groups).unwrap(), None);
    }
}
