//! A clan made by clan-core's own library (`../shared/clan-core-fixture`: clan-core's lib,
//! modules and its `sshd` and `users` services, with stubbed nixpkgs packages), as most clan
//! users have one: clan-core's default template's `flake.nix` unchanged, a `clan.nix` with
//! clan services and `meta.domain`. The CLI reads only what clan-core's own CLI reads, so
//! listing, showing, checking and deploying it through a build host work on both kinds of
//! target; its secrets, in clan-core's default sops store, are refused by name, never made
//! again beside the user's.

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
  machines.alpha = {{ nixpkgs.hostPlatform = "x86_64-linux"; system.build.toplevel = toplevel "alpha" {{ }}; }};
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
    // store is clan-core's default, sops: listed, and refused for anything that would
    // make or read them.
    let list = clan(&lab, &f, &["vars", "list", "alpha"]);
    assert_eq!(list.code, 0, "{}", list.all());
    for var in [
        "openssh/ssh.id_ed25519 ",
        "user-password-root/user-password-hash ",
    ] {
        assert!(list.stdout.contains(var), "{}", list.stdout);
    }
    assert!(list.stderr.contains("\"sops\""), "{}", list.stderr);
    let check = clan(&lab, &f, &["vars", "check", "alpha"]);
    assert_eq!(check.code, 2, "{}", check.all());
    let deploy = clan(&lab, &f, &["machines", "update", "alpha", "--json"]);
    assert_eq!(deploy.code, 2, "{}", deploy.all());
    let report: serde_json::Value = serde_json::from_str(&deploy.stdout).unwrap();
    assert_eq!(
        report["errors"][0]["code"], "vars.store-unsupported",
        "{report}"
    );
    assert_target_untouched(&lab);
    assert!(
        !f.join("vars/per-machine/alpha/openssh").exists(),
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
}

#[test]
fn clan_core_library_clan_deploys_namespace() {
    deploys_through_a_build_host(HostKind::Namespace);
}

#[test]
fn clan_core_library_clan_deploys_systemd() {
    deploys_through_a_build_host(HostKind::Systemd);
}
