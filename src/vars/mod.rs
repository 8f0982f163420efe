//! Clan vars: what machines declare ([`decl`]), this tool's age store ([`repo`]: where the
//! repository keeps values, secrets and machine keys), the user's identity and age
//! encryption ([`identity`]), clan-core's stores read and deployed as it keeps them
//! ([`clan_core_store`], with sops' file format in [`sops`]), generators ([`generate`]) and
//! the upload ([`upload`]). Here: which store keeps a machine's vars.
//!
//! The sops store (the default, clan-core's layout) is read in [`clan_core_store`] and
//! written in [`sops_store`]. This tool's age store (relative to the clan's directory):
//! - public files: `vars/per-machine/<m>/<decl>/<file>/value`, `vars/shared/<decl>/<file>/value`
//! - secret files, encrypted to machine keys, at clan-core's age paths:
//!   `secrets/clan-vars/per-machine/<m>/<decl>/<file>/<file>.age`,
//!   `secrets/clan-vars/shared/<decl>/<file>/<file>.age` (with `<file>.age.recipients`)
//! - machine keys: `secrets/age-keys/machines/<m>/pub` (age public key) and `key.age` (the
//!   private key, encrypted to the people in `vars.settings.recipients`, who are listed in
//!   `key.age.recipients`).
//! - this tool's earlier layout (`…/<decl>/<file>.age`) is refused until `clan vars fix`
//!   moves it ([`Repo::old_layout`]).
//!
//! Where a secret exists: in the generator's private temporary directory while it runs
//! (removed after), in this process's memory (zeroed when dropped), encrypted in the
//! repository, in the ssh channel to the target, and on the target (encrypted in its secret
//! location, decrypted at activation). Never on the build host, in the store, in a log or on
//! a command line.

pub mod clan_core_store;
pub mod decl;
pub mod generate;
pub mod identity;
pub mod repo;
pub mod sops;
pub mod sops_links;
pub mod sops_store;
pub mod upload;

pub use decl::{
    FileDecl, GeneratorDecl, MachineVars, PromptDecl, Recipients, RuntimeInput, SharedDefinitions,
    VarsSettings, dependency_order, scope,
};
pub use identity::{UserIdentity, decrypt_with, encrypt, parse_recipients};
pub use repo::{Repo, write_atomically};

use zeroize::Zeroizing;

use crate::error::{Error, Hint};

/// Secret bytes, wiped from memory when dropped.
pub type Secret = Zeroizing<Vec<u8>>;

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

/// Which store in clan-core's layout keeps the machine's vars, if one does: the one the
/// machine's `clan.core.vars.settings.secretModule` names. clan-core's library names it on
/// every machine (sops by default, or age); this repository's library names the sops store
/// when `secretStore = "sops"` (its default too), and none for its own age store. Whether
/// this tool also generates into it depends on whose generators the machine has
/// ([`MachineVars::generated_here`]).
pub fn clan_core_store_of(vars: &MachineVars) -> Option<clan_core_store::ClanCoreStore> {
    use clan_core_store::ClanCoreStore;
    match vars.secret_module.as_deref() {
        Some(module) if module.ends_with(".sops") => Some(ClanCoreStore::Sops),
        Some(module) if module.ends_with(".age") => Some(ClanCoreStore::Age),
        _ => None,
    }
}

/// Whether every file of generator `g` of `machine` is in the store that keeps its vars
/// (this tool's age store, or the sops or age store in clan-core's layout).
pub fn generated(
    repo: &Repo,
    machine: &str,
    vars: &MachineVars,
    g: &str,
    decl: &GeneratorDecl,
) -> bool {
    let store = clan_core_store_of(vars);
    decl.files.iter().all(|(f, file)| {
        match store.filter(|_| file.secret) {
            Some(store) => clan_core_store::secret_path(store, repo, machine, g, decl, f),
            None if file.secret => repo.secret_path(machine, g, decl, f),
            None => repo.value_path(machine, g, decl, f),
        }
        .is_file()
    })
}

/// The generators of `machine` that `generate` would run without `--regenerate`: files
/// missing from its store, or a changed validation.
pub fn not_generated(repo: &Repo, machine: &str, vars: &MachineVars) -> Vec<String> {
    vars.generators
        .iter()
        .filter(|(g, decl)| {
            !generated(repo, machine, vars, g, decl) || !repo.validation_current(machine, g, decl)
        })
        .map(|(g, _)| g.clone())
        .collect()
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
    if clan_core_store_of(vars).is_some() {
        return None;
    }
    let (store, from, why) = match (&settings.secret_store, &vars.secret_module) {
        // The machine's own choice first, as in clan_core_store.
        (_, Some(module)) => (
            format!("{module:?}"),
            module_attr(),
            "which this tool does not support yet (only its own age store and clan-core's sops and age stores)",
        ),
        // A machine of this repository's library names the sops store by its module; one
        // without a module chose the age store itself, whatever the clan's default says.
        (Some(store), None) if store != "age" && store != "sops" => (
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

#[cfg(test)]
mod tests {
    use super::decl::protected_location;
    use super::*;
    use std::collections::BTreeMap;

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
    fn shared_generators_are_declared_alike_and_depend_only_on_shared_ones() {
        let file = |owner: &str, deploy: bool| FileDecl {
            secret: true,
            deploy,
            owner: owner.into(),
            group: "root".into(),
            mode: "0400".into(),
            needed_for: "services".into(),
        };
        let machine = |owner: &str, deploy: bool| {
            let mut ca = GeneratorDecl {
                share: true,
                ..GeneratorDecl::default()
            };
            ca.files.insert("key".into(), file(owner, deploy));
            let mut vars = MachineVars {
                secret_location: "/etc/secret-vars".into(),
                ..MachineVars::default()
            };
            vars.generators.insert("ca".into(), ca);
            vars
        };
        let mut shared = SharedDefinitions::default();
        shared.check("a", &machine("root", true)).unwrap();
        // Owner, group and mode are each machine's own.
        shared.check("b", &machine("nginx", true)).unwrap();
        let e = shared.check("c", &machine("root", false)).unwrap_err();
        assert_eq!(e.code, Some("vars.shared-differs"));
        assert!(
            e.message.contains(
                "machines a and c declare the shared generator ca differently (in: files)"
            ),
            "{}",
            e.message
        );
        // A shared generator may not read one machine's own.
        let mut vars = machine("root", true);
        vars.generators.insert("own".into(), generator(&[]));
        vars.generators.get_mut("ca").unwrap().dependencies = vec!["own".into()];
        let e = vars.check("a").unwrap_err();
        assert!(
            e.message
                .contains("cannot depend on a generator of the machine's own"),
            "{}",
            e.message
        );
        vars.generators.get_mut("own").unwrap().share = true;
        vars.check("a").unwrap();
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
        // clan-core's sops store (its default), chosen by its library.
        assert!(check_store(&default, "db", &sops).is_ok());
        assert_eq!(clan_core_store_of(&sops), Some(ClanCoreStore::Sops));
        let flake_sops = VarsSettings {
            secret_store: Some("sops".into()),
            ..VarsSettings::default()
        };
        // A machine of this repository's library that names no module chose the age store
        // itself (`clan.core.vars.settings.secretStore = "age"`), over the clan's default.
        assert_eq!(clan_core_store_of(&MachineVars::default()), None);
        assert!(check_store(&flake_sops, "db", &MachineVars::default()).is_ok());
        // A store neither library has: refused, by name.
        let vault = VarsSettings {
            secret_store: Some("vault".into()),
            ..VarsSettings::default()
        };
        let refused = check_store(&vault, "db", &MachineVars::default()).unwrap_err();
        assert!(
            refused.message.contains("(from vars.settings.secretStore)"),
            "{}",
            refused.message
        );
        assert_eq!(sops_upload_directory(&sops), "/var/lib/sops-nix");
        // clan-core's age store, chosen by its library.
        assert!(check_store(&default, "db", &age).is_ok());
        assert_eq!(clan_core_store_of(&age), Some(ClanCoreStore::Age));
        // The machine's choice wins over the clan's default.
        assert!(check_store(&flake_sops, "db", &age).is_ok());
        // This tool's own age store: nothing of clan-core's chosen.
        let own_age = VarsSettings {
            secret_store: Some("age".into()),
            ..VarsSettings::default()
        };
        assert!(check_store(&own_age, "db", &MachineVars::default()).is_ok());
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
