//! A clan made by clan-core's own library (`../shared/clan-core-fixture`: clan-core's lib,
//! modules and its `sshd` and `users` services, with stubbed nixpkgs packages), as most clan
//! users have one: clan-core's default template's `flake.nix` unchanged, a `clan.nix` with
//! clan services and `meta.domain`. The CLI reads only what clan-core's own CLI reads, so
//! listing, showing, checking and deploying it through a build host work on both kinds of
//! target; its secrets, in clan-core's default sops store, are read where clan-core keeps
//! them and deployed (the machine's key to the target, for sops-nix), never made again.

mod common;
use common::*;

use clan_lab::HostKind;

/// The template's `clan.nix` as a user fills it in: the sshd and users services for every
/// machine, `meta.domain`, machine `alpha` deployed to its default address
/// (`root@alpha.<domain>`, reached through `~/.ssh/config`) and built on the builder, `beta`
/// elsewhere. The lab's recording systems stand for NixOS's (the fixture's `pkgs` is fake).
fn clan_nix(builder: &str) -> String {
    format!(
        r#"{{
  meta.name = "cclab";
  meta.domain = "cclab.lan";
  inventory.machines = {{
    alpha = {{ deploy.buildHost = "root@{builder}"; tags = [ "web" ]; }};
    beta = {{ deploy.targetHost = "root@beta.invalid"; tags = [ "db" ]; }};
  }};
  inventory.instances = {{
    sshd = {{
      roles.server.tags.all = {{ }};
      roles.server.settings.authorizedKeys.admin = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummyKeyForTestsOnly admin";
    }};
    user-root = {{
      module.name = "users";
      roles.default.tags.all = {{ }};
      roles.default.settings = {{ user = "root"; prompt = true; }};
    }};
  }};
  machines.alpha = {{ nixpkgs.hostPlatform = "x86_64-linux"; system.build.toplevel = toplevel "alpha" {{ }};
    # Under the target's own /root (the lab's hosts share the machine's /var).
    clan.core.vars.sops.secretUploadDirectory = "/root/sops-nix"; }};
  machines.beta = {{ nixpkgs.hostPlatform = "x86_64-linux"; system.build.toplevel = toplevel "beta" {{ }}; }};
}}"#
    )
}

fn deploys_through_a_build_host(kind: HostKind) {
    let lab = Lab::start(&[HostSpec::new("builder"), HostSpec::new("target").kind(kind)]);
    let alpha = format!("Host alpha.cclab.lan\n  HostName {}\n", lab.ip("target"));
    // The name resolves for the workstation and for the build host's second hop alike, as
    // DNS would; host keys are known by address.
    lab.prepend_ssh_config(clan_lab::WORKSTATION, &alpha);
    lab.prepend_ssh_config("builder", &alpha);
    lab.trust("builder", "target");
    let f = lab.write_clan_core_flake("cc", &clan_nix(lab.ip("builder")));

    // clan-core's inventory: both machines, its computed tags.
    let list = clan(&lab, &f, &["machines", "list", "--json"]);
    assert_eq!(list.code, 0, "{}", list.all());
    let listed: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    for (machine, tag) in [("alpha", "web"), ("beta", "db")] {
        let tags = listed[machine]["tags"].as_array().expect("tags");
        for wanted in [tag, "all", "nixos"] {
            assert!(tags.iter().any(|t| t == wanted), "{machine}: {listed}");
        }
    }

    // The address is clan-core's default from meta.domain, named as such.
    let show = clan(&lab, &f, &["machines", "show", "alpha", "--json"]);
    assert_eq!(show.code, 0, "{}", show.all());
    let shown: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(
        shown["alpha"]["targetHost"]["value"],
        "root@alpha.cclab.lan"
    );
    assert_eq!(
        shown["alpha"]["buildHost"]["value"],
        format!("root@{}", lab.ip("builder"))
    );

    // The services' generators are read (clan-core's finalScript shape), and the secrets'
    // store is clan-core's default, sops, read where clan-core keeps it: nothing generated
    // yet, and nothing is made here (this tool does not write that store).
    let list = clan(&lab, &f, &["vars", "list", "alpha"]);
    assert_eq!(list.code, 0, "{}", list.all());
    for var in [
        "openssh/ssh.id_ed25519 (not generated)",
        "user-password-root/user-password-hash (not generated)",
    ] {
        assert!(list.stdout.contains(var), "{}", list.stdout);
    }
    let check = clan(&lab, &f, &["vars", "check", "alpha"]);
    assert_eq!(check.code, 1, "{}", check.all());
    assert!(
        check
            .stderr
            .contains("openssh/ssh.id_ed25519 is not generated")
            && check.stderr.contains("clan vars generate alpha"),
        "{}",
        check.stderr
    );
    for dry in [false, true] {
        let mut args = vec!["machines", "update", "alpha", "--json"];
        if dry {
            args.push("--dry-run");
        }
        let deploy = clan(&lab, &f, &args);
        assert_eq!(deploy.code, 2, "{}", deploy.all());
        let report: serde_json::Value = serde_json::from_str(&deploy.stdout).unwrap();
        assert_eq!(
            report["errors"][0]["code"], "vars.clan-core-missing",
            "{report}"
        );
    }
    assert_target_untouched(&lab);
    assert!(
        !f.join("vars/per-machine/alpha/openssh").exists() && !f.join("sops").exists(),
        "a var was made"
    );

    // Without secrets it deploys: evaluated here, built on the builder, copied by the
    // builder to the target under the name clan-core gave it, activated there.
    let out = toplevel(&lab, &f, "alpha");
    let dry = clan(
        &lab,
        &f,
        &["machines", "update", "alpha", "--no-secrets", "--dry-run"],
    );
    assert_eq!(dry.code, 0, "{}", dry.all());
    assert!(
        dry.stdout.contains("root@alpha.cclab.lan"),
        "{}",
        dry.stdout
    );
    let run = clan(&lab, &f, &["machines", "update", "alpha", "--no-secrets"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(
        lab.host("builder").has_path(&out),
        "not built on the builder"
    );
    assert!(
        !lab.host(clan_lab::WORKSTATION).has_path(&out),
        "the system passed through the workstation"
    );
    assert_activated(&lab, &out);

    // `clan ssh` reaches the target as the deploy did (clan-core's default address, through
    // ~/.ssh/config), and its exit status is the remote command's.
    let ssh = clan(
        &lab,
        &f,
        &["ssh", "alpha", "--", "readlink", "/run/current-system"],
    );
    assert_eq!(ssh.code, 0, "{}", ssh.all());
    assert_eq!(ssh.stdout.trim(), out);
    let failing = clan(&lab, &f, &["ssh", "alpha", "--", "exit", "7"]);
    assert_eq!(failing.code, 7, "{}", failing.all());

    // The commands that reach a machine without deploying it serve it too.
    let generations = clan(&lab, &f, &["machines", "generations", "alpha"]);
    assert_eq!(generations.code, 0, "{}", generations.all());
    assert!(generations.stdout.contains(&out), "{}", generations.stdout);

    // The vars as clan-core's CLI would have written them (sops files, symlinks, keys):
    // read, checked, and deployed: the machine's key goes to secretUploadDirectory, and it
    // opens every secret the system closure carries for sops-nix.
    let store = ClanCoreStoreFiles::write(&lab, &f, "alpha");
    let list = clan(&lab, &f, &["vars", "list", "alpha"]);
    assert_eq!(list.code, 0, "{}", list.all());
    assert!(
        list.stdout.contains("openssh/ssh.id_ed25519 ********"),
        "{}",
        list.stdout
    );
    let get = clan(
        &lab,
        &f,
        &["vars", "get", "alpha", "openssh/ssh.id_ed25519"],
    );
    assert_eq!(get.code, 0, "{}", get.all());
    assert_eq!(get.stdout, "content of openssh/ssh.id_ed25519");
    let check = clan(&lab, &f, &["vars", "check", "alpha"]);
    assert_eq!(check.code, 0, "{}", check.all());
    // What the target gets, into a local directory instead (an installer's extra files).
    let extra = lab.host(clan_lab::WORKSTATION).root().join("extra");
    let to_dir = clan(
        &lab,
        &f,
        &["vars", "upload", "alpha", "--directory", "/root/extra"],
    );
    assert_eq!(to_dir.code, 0, "{}", to_dir.all());
    assert_eq!(
        std::fs::read_to_string(extra.join("key.txt"))
            .unwrap()
            .trim(),
        store.machine_key.trim()
    );
    let run = clan(&lab, &f, &["machines", "update", "alpha"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let uploaded = std::fs::read_to_string(lab.host("target").root().join("sops-nix/key.txt"))
        .expect("key.txt in the target's secretUploadDirectory");
    assert_eq!(uploaded.trim(), store.machine_key.trim());
    let machine: age::x25519::Identity = uploaded.trim().parse().unwrap();
    for secret in &store.secrets {
        let text = std::fs::read_to_string(secret).unwrap();
        clan::vars::sops::decrypt(&text, std::slice::from_ref(&machine))
            .unwrap_or_else(|e| panic!("{}: {e}", secret.display()));
    }
    // Nothing was generated beside what was there.
    assert_eq!(ClanCoreStoreFiles::files(&f), store.files);

    // A machine clan-core installed has the key in a plain directory: the same key is left
    // as it is; another key is the user's, never replaced.
    let dir = lab.host("target").root().join("sops-nix");
    std::fs::remove_file(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("key.txt"), &uploaded).unwrap();
    let again = clan(&lab, &f, &["machines", "update", "alpha"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert!(dir.is_dir() && !dir.is_symlink());
    std::fs::write(dir.join("key.txt"), "AGE-SECRET-KEY-1 of another machine\n").unwrap();
    let other = clan(&lab, &f, &["machines", "update", "alpha"]);
    assert_eq!(other.code, 1, "{}", other.all());
    assert!(
        other
            .stderr
            .contains("it is a directory with files that clan did not put there"),
        "{}",
        other.stderr
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("key.txt")).unwrap(),
        "AGE-SECRET-KEY-1 of another machine\n"
    );
}

/// A sops store as clan-core lays it out, for every var `machine` declares: an `admin` user
/// (its key installed where sops looks on the workstation), the machine's key encrypted to
/// it, each secret encrypted to both (with clan-core's `machines/` and `users/` symlinks),
/// each public value in plain.
struct ClanCoreStoreFiles {
    machine_key: String,
    secrets: Vec<std::path::PathBuf>,
    files: Vec<std::path::PathBuf>,
}

impl ClanCoreStoreFiles {
    fn write(lab: &Lab, flake: &std::path::Path, machine: &str) -> ClanCoreStoreFiles {
        ClanCoreStoreFiles::write_as(lab, flake, machine, false)
    }

    /// [`ClanCoreStoreFiles::write`], or with `age` clan-core's age store: the machine's key pair in
    /// `secrets/age-keys/machines/<m>/` (the private half age-encrypted to the admin), each
    /// secret at `secrets/clan-vars/<scope>/<gen>/<file>/<file>.age`, encrypted to the machine.
    fn write_as(
        lab: &Lab,
        flake: &std::path::Path,
        machine: &str,
        age: bool,
    ) -> ClanCoreStoreFiles {
        use age::secrecy::ExposeSecret;
        let attr = format!(
            ".#clanInternals.machines.x86_64-linux.{machine}.config.clan.core.vars.generators"
        );
        let apply = "gs: builtins.mapAttrs (_: g: { share = g.share; validationHash = g.validationHash; files = builtins.mapAttrs (_: f: f.secret) g.files; }) gs";
        let out =
            lab.run_on_workstation(flake, &["nix", "eval", "--json", &attr, "--apply", apply]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let generators: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let admin = age::x25519::Identity::generate();
        let key = age::x25519::Identity::generate();
        let machine_key = key.to_string().expose_secret().to_string();
        let now = clan::vars::sops::now();
        let write = |path: &std::path::Path, bytes: &[u8]| {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        };
        let link = |from: &std::path::Path, to: &str| {
            std::fs::create_dir_all(from.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(to, from).unwrap();
        };
        let key_json =
            |public: String| format!("[{{\"publickey\": \"{public}\", \"type\": \"age\"}}]\n");
        if age {
            let keys = flake.join(format!("secrets/age-keys/machines/{machine}"));
            write(
                &keys.join("pub"),
                format!("{}\n", key.to_public()).as_bytes(),
            );
            let sealed = clan::vars::encrypt(&[admin.to_public()], machine_key.as_bytes()).unwrap();
            write(&keys.join("key.age"), &sealed);
            write(
                &keys.join("key.age.recipients"),
                format!("{}\n", admin.to_public()).as_bytes(),
            );
        } else {
            write(
                &flake.join("sops/users/admin/key.json"),
                key_json(admin.to_public().to_string()).as_bytes(),
            );
            write(
                &flake.join(format!("sops/machines/{machine}/key.json")),
                key_json(key.to_public().to_string()).as_bytes(),
            );
            let secret_dir = flake.join(format!("sops/secrets/{machine}-age.key"));
            let text =
                clan::vars::sops::encrypt(machine_key.as_bytes(), &[admin.to_public()], &now)
                    .unwrap();
            write(&secret_dir.join("secret"), text.as_bytes());
            link(&secret_dir.join("users/admin"), "../../../users/admin");
        }
        let mut secrets = Vec::new();
        for (g, decl) in generators.as_object().unwrap() {
            let scope = if decl["share"] == true {
                "shared".to_string()
            } else {
                format!("per-machine/{machine}")
            };
            if let Some(hash) = decl["validationHash"].as_str() {
                write(
                    &flake.join(format!("vars/{scope}/{g}/.validation-hash")),
                    hash.as_bytes(),
                );
            }
            for (f, secret) in decl["files"].as_object().unwrap() {
                let dir = flake.join(format!("vars/{scope}/{g}/{f}"));
                let up = "../".repeat(scope.split('/').count() + 4);
                let content = format!("content of {g}/{f}");
                if secret == true && age {
                    let path = flake.join(format!("secrets/clan-vars/{scope}/{g}/{f}/{f}.age"));
                    let sealed =
                        clan::vars::encrypt(&[key.to_public()], content.as_bytes()).unwrap();
                    write(&path, &sealed);
                    secrets.push(path);
                } else if secret == true {
                    let text = clan::vars::sops::encrypt(
                        content.as_bytes(),
                        &[admin.to_public(), key.to_public()],
                        &now,
                    )
                    .unwrap();
                    write(&dir.join("secret"), text.as_bytes());
                    link(
                        &dir.join(format!("machines/{machine}")),
                        &format!("{up}sops/machines/{machine}"),
                    );
                    link(&dir.join("users/admin"), &format!("{up}sops/users/admin"));
                    secrets.push(dir.join("secret"));
                } else {
                    write(&dir.join("value"), content.as_bytes());
                }
            }
        }
        assert!(!secrets.is_empty(), "{generators}");
        let keys = lab
            .host(clan_lab::WORKSTATION)
            .root()
            .join(".config/sops/age/keys.txt");
        write(
            &keys,
            format!("{}\n", admin.to_string().expose_secret()).as_bytes(),
        );
        ClanCoreStoreFiles {
            machine_key,
            secrets,
            files: ClanCoreStoreFiles::files(flake),
        }
    }

    /// Every file under `sops/`, `secrets/` and `vars/`, sorted.
    fn files(flake: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut found = Vec::new();
        let mut dirs = vec![
            flake.join("sops"),
            flake.join("secrets"),
            flake.join("vars"),
        ];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if entry.file_type().unwrap().is_dir() {
                    dirs.push(path);
                } else {
                    found.push(path);
                }
            }
        }
        found.sort();
        found
    }
}

// clan-core's age store (its library's `secretStore = "age"`): read at clan-core's paths,
// checked, and deployed the same way: the machine's key to `clan.core.vars.age.secretLocation`,
// opening every secret the closure carries for clan-core's age module.
#[test]
fn clan_core_age_store_deploys() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let clan_nix = format!(
        r#"{{
  meta.name = "cclab";
  inventory.machines.alpha.deploy.targetHost = "root@{t}";
  inventory.instances.sshd = {{
    roles.server.tags.all = {{ }};
    roles.server.settings.authorizedKeys.admin = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummyKeyForTestsOnly admin";
  }};
  machines.alpha = {{ lib, ... }}: {{
    # clan-core's age module asks NixOS's options whether sysusers or userborn create users;
    # the fixture's stub of nixpkgs declares neither, so they are declared here, off.
    options.systemd = lib.mkOption {{
      default = {{ }};
      type = lib.types.submodule {{
        freeformType = lib.types.attrsOf lib.types.anything;
        options.sysusers.enable = lib.mkOption {{ default = false; }};
        options.services = lib.mkOption {{ default = {{ }}; type = lib.types.attrsOf lib.types.anything; }};
      }};
    }};
    options.services = lib.mkOption {{
      default = {{ }};
      type = lib.types.submodule {{
        freeformType = lib.types.attrsOf lib.types.anything;
        options.userborn.enable = lib.mkOption {{ default = false; }};
      }};
    }};
    config = {{
      nixpkgs.hostPlatform = "x86_64-linux";
      system.build.toplevel = toplevel "alpha" {{ }};
      clan.core.vars.settings.secretStore = "age";
      clan.core.vars.age.secretLocation = "/root/clan-age";
      # Needed for activation: clan-core uploads it decrypted.
      clan.core.vars.generators.early = {{ files.init.neededFor = "activation"; script = "true"; }};
    }};
  }};
}}"#,
        t = lab.ip("target")
    );
    let f = lab.write_clan_core_flake("cca", &clan_nix);
    let missing = clan(&lab, &f, &["machines", "update", "alpha", "--json"]);
    assert_eq!(missing.code, 2, "{}", missing.all());
    let report: serde_json::Value = serde_json::from_str(&missing.stdout).unwrap();
    assert_eq!(
        report["errors"][0]["code"], "vars.clan-core-missing",
        "{report}"
    );
    assert!(
        missing.stderr.contains("clan-core's age store"),
        "{}",
        missing.stderr
    );

    let store = ClanCoreStoreFiles::write_as(&lab, &f, "alpha", true);
    let list = clan(&lab, &f, &["vars", "list", "alpha"]);
    assert!(
        list.stdout.contains("openssh/ssh.id_ed25519 ********"),
        "{}",
        list.all()
    );
    let get = clan(
        &lab,
        &f,
        &["vars", "get", "alpha", "openssh/ssh.id_ed25519"],
    );
    assert_eq!(
        get.stdout,
        "content of openssh/ssh.id_ed25519",
        "{}",
        get.all()
    );
    assert_eq!(clan(&lab, &f, &["vars", "check", "alpha"]).code, 0);
    let run = clan(&lab, &f, &["machines", "update", "alpha"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let uploaded = std::fs::read_to_string(lab.host("target").root().join("clan-age/key.txt"))
        .expect("key.txt in the target's secretLocation");
    assert_eq!(
        std::fs::read_to_string(
            lab.host("target")
                .root()
                .join("clan-age/activation/per-machine/alpha/early/init")
        )
        .expect("the activation secret, decrypted where clan-core's modules read it"),
        "content of early/init"
    );
    assert_eq!(uploaded.trim(), store.machine_key.trim());
    let machine: age::x25519::Identity = uploaded.trim().parse().unwrap();
    for secret in &store.secrets {
        let sealed = std::fs::read(secret).unwrap();
        clan::vars::decrypt_with(std::slice::from_ref(&machine), &sealed)
            .unwrap_or_else(|e| panic!("{}: {e}", secret.display()));
    }
    assert_eq!(
        ClanCoreStoreFiles::files(&f),
        store.files,
        "something was generated"
    );

    // Its files are this tool's age store's, so `vars set` and `vars fix` write them as
    // clan-core's do: a deployed secret to the machine's key; the machine's key to the
    // current recipients.
    let set = clan_with_input(
        &lab,
        &f,
        &["vars", "set", "alpha", "openssh/ssh.id_ed25519"],
        "a key set by hand",
    );
    assert_eq!(set.code, 0, "{}", set.all());
    let host_key =
        f.join("secrets/clan-vars/per-machine/alpha/openssh/ssh.id_ed25519/ssh.id_ed25519.age");
    assert_eq!(
        &clan::vars::decrypt_with(
            std::slice::from_ref(&machine),
            &std::fs::read(&host_key).unwrap()
        )
        .unwrap()[..],
        b"a key set by hand"
    );
    assert_eq!(clan(&lab, &f, &["vars", "check", "alpha"]).code, 0);
    let keys = std::fs::read_to_string(
        lab.host(clan_lab::WORKSTATION)
            .root()
            .join(".config/sops/age/keys.txt"),
    )
    .unwrap();
    let admin: age::x25519::Identity = keys.trim().parse().unwrap();
    let bob = age::x25519::Identity::generate();
    let clan_nix = std::fs::read_to_string(f.join("clan.nix"))
        .unwrap()
        .replace(
            r#"meta.name = "cclab";"#,
            &format!(
                r#"meta.name = "cclab"; vars.settings.recipients.default = [ "{}" "{}" ];"#,
                admin.to_public(),
                bob.to_public()
            ),
        );
    std::fs::write(f.join("clan.nix"), clan_nix).unwrap();
    let fix = clan(&lab, &f, &["vars", "fix", "alpha"]);
    assert_eq!(fix.code, 0, "{}", fix.all());
    assert!(
        fix.stderr
            .contains("alpha: key re-encrypted to 2 recipient(s)"),
        "{}",
        fix.stderr
    );
    let sealed = std::fs::read(f.join("secrets/age-keys/machines/alpha/key.age")).unwrap();
    assert_eq!(
        clan::vars::decrypt_with(std::slice::from_ref(&bob), &sealed).unwrap()[..],
        store.machine_key.as_bytes()[..]
    );
}

#[test]
fn clan_core_library_clan_deploys_namespace() {
    deploys_through_a_build_host(HostKind::Namespace);
}

#[test]
fn clan_core_library_clan_deploys_systemd() {
    deploys_through_a_build_host(HostKind::Systemd);
}

// clan-core's sops store says who may read a secret by its links (`users/`, `machines/`,
// `groups/`): a link added without re-encrypting (a new admin, or someone adding their own
// key) is named by `vars check` and stops the deploy, also its dry run; `clan vars fix`
// re-encrypts the secret to exactly the linked keys, as clan-core's does, and the deploy
// goes on. The new user then reads it.
#[test]
fn a_new_recipient_link_stops_the_deploy_until_vars_fix() {
    let lab = Lab::start(&[HostSpec::new("builder"), HostSpec::new("target")]);
    let alpha = format!("Host alpha.cclab.lan\n  HostName {}\n", lab.ip("target"));
    lab.prepend_ssh_config(clan_lab::WORKSTATION, &alpha);
    lab.prepend_ssh_config("builder", &alpha);
    lab.trust("builder", "target");
    let f = lab.write_clan_core_flake("cc", &clan_nix(lab.ip("builder")));
    let store = ClanCoreStoreFiles::write(&lab, &f, "alpha");
    assert_eq!(clan(&lab, &f, &["vars", "check", "alpha"]).code, 0);

    let bob = age::x25519::Identity::generate();
    let users = f.join("sops/users/bob");
    std::fs::create_dir_all(&users).unwrap();
    std::fs::write(
        users.join("key.json"),
        format!(r#"[{{"publickey": "{}", "type": "age"}}]"#, bob.to_public()),
    )
    .unwrap();
    let secret = store
        .secrets
        .iter()
        .find(|p| p.to_string_lossy().contains("/per-machine/alpha/openssh/"))
        .expect("alpha's host key")
        .clone();
    let links = secret.parent().unwrap().join("users");
    let up = "../".repeat(links.strip_prefix(&f).unwrap().components().count());
    std::os::unix::fs::symlink(format!("{up}sops/users/bob"), links.join("bob")).unwrap();
    let before = std::fs::read_to_string(&secret).unwrap();

    let check = clan(&lab, &f, &["vars", "check", "alpha"]);
    assert_eq!(check.code, 1, "{}", check.all());
    assert!(
        check.stderr.contains(&format!(
            "secret openssh/ssh.id_ed25519: its links name {} (key of user 'bob') it is not encrypted to",
            bob.to_public()
        )) && check.stderr.contains("clan vars fix"),
        "{}",
        check.stderr
    );
    for dry in [true, false] {
        let mut args = vec!["machines", "update", "alpha", "--json"];
        if dry {
            args.push("--dry-run");
        }
        let run = clan(&lab, &f, &args);
        assert_eq!(run.code, 2, "{}", run.all());
        let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(
            report["errors"][0]["code"], "vars.recipients-changed",
            "{report}"
        );
    }
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), before);
    assert_target_untouched(&lab);

    let fix = clan(&lab, &f, &["vars", "fix", "alpha"]);
    assert_eq!(fix.code, 0, "{}", fix.all());
    // bob's secret; and, as clan-core's fix does, the secrets that are not deployed lose
    // the machine's link (the lab wrote one) and are re-encrypted without its key.
    assert!(
        fix.stderr
            .contains("alpha: 3 secret(s) re-encrypted, 2 link(s) changed"),
        "{}",
        fix.stderr
    );
    assert_eq!(clan(&lab, &f, &["vars", "check", "alpha"]).code, 0);
    let after = std::fs::read_to_string(&secret).unwrap();
    assert_eq!(
        clan::vars::sops::decrypt(&after, std::slice::from_ref(&bob)).unwrap()[..],
        b"content of openssh/ssh.id_ed25519"[..]
    );
    // `vars set` writes into the store as clan-core does: to exactly the linked keys.
    let set = clan_with_input(
        &lab,
        &f,
        &["vars", "set", "alpha", "openssh/ssh.id_ed25519"],
        "a key set by hand",
    );
    assert_eq!(set.code, 0, "{}", set.all());
    let get = clan(
        &lab,
        &f,
        &["vars", "get", "alpha", "openssh/ssh.id_ed25519"],
    );
    assert_eq!(get.stdout, "a key set by hand");
    assert_eq!(clan(&lab, &f, &["vars", "check", "alpha"]).code, 0);
    let text = std::fs::read_to_string(&secret).unwrap();
    assert_eq!(
        clan::vars::sops::decrypt(&text, std::slice::from_ref(&bob)).unwrap()[..],
        b"a key set by hand"[..]
    );
    let run = clan(&lab, &f, &["machines", "update", "alpha"]);
    assert_eq!(run.code, 0, "{}", run.all());
}
