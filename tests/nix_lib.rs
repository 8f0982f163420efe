//! Evaluation tests of the Nix library (`nix/tests/default.nix`) on nixpkgs' real lib: each
//! attribute must be true.

#[test]
fn lib_clan_evaluation_tests() {
    let lib = clan_lab::nixpkgs_lib();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let nix = tempfile::tempdir().unwrap();
    let out = clan_lab::isolated_nix("nix-instantiate", nix.path())
        .args(["--eval", "--strict", "--json"])
        .arg(repo.join("nix/tests"))
        .arg("--arg")
        .arg("nixpkgs")
        .arg(format!("{{ lib = import {}/lib; }}", lib.display()))
        .output()
        .expect("nix-instantiate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let results: std::collections::BTreeMap<String, bool> =
        serde_json::from_slice(&out.stdout).expect("a set of booleans");
    let failed: Vec<&String> = results
        .iter()
        .filter(|(_, ok)| !**ok)
        .map(|(k, _)| k)
        .collect();
    assert!(failed.is_empty(), "failed: {failed:?}");
    // Every case the file defines was evaluated (its result set's attributes, two spaces in).
    let text = std::fs::read_to_string(repo.join("nix/tests/default.nix")).unwrap();
    let body = &text[text.rfind("\nin\n{").expect("the result set")..];
    let defined: std::collections::BTreeSet<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|l| l.starts_with(|c: char| c.is_ascii_alphabetic()))
        .filter_map(|l| l.split_once(" =").map(|(name, _)| name.to_string()))
        .collect();
    let evaluated: std::collections::BTreeSet<String> = results.keys().cloned().collect();
    assert_eq!(evaluated, defined);
    // The parse found the cases (18 when this was written).
    assert!(defined.len() >= 18, "{defined:?}");
}

/// The activation script the library generates for vars, in either store, is valid sh and
/// shellcheck-clean (the test command installs shellcheck; without it this test fails rather
/// than skip).
#[test]
fn vars_activation_script_is_valid_sh() {
    for (store, wanted) in [
        (
            "age",
            "clan_vars_file /run/secrets-for-users db root shared/db/root/root.age",
        ),
        // The sops file is copied alone into the store (nix/tests/example/vars/shared/db).
        (
            "sops",
            "clan_vars_file /run/secrets-for-users/vars shared/db root /nix/store/",
        ),
    ] {
        activation_script_checks(store, wanted);
    }
}

fn activation_script_checks(store: &str, wanted: &str) {
    let lib = clan_lab::nixpkgs_lib();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let expr = format!(
        r#"let
          nixpkgs = {{ lib = import {lib}/lib; }};
          clanLib = import {repo}/nix/lib.nix {{ }};
          c = clanLib.clan {{
            self = null;
            inherit nixpkgs;
            nixosSystem = clanLib.minimalSystem;
            directory = {repo}/nix/tests/example;
            vars.settings.secretStore = "{store}";
            machines.web1 = {{
              clan.core.vars.generators.db = {{
                files.hash = {{ owner = "nobody"; mode = "0440"; }};
                files.root.neededFor = "users";
                files.init.neededFor = "activation";
                share = true;
              }};
            }};
          }};
        in c.nixosConfigurations.web1.config.clan.core.vars.activationScript"#,
        lib = lib.display(),
        repo = repo.display()
    );
    let nix = tempfile::tempdir().unwrap();
    let out = clan_lab::isolated_nix("nix-instantiate", nix.path())
        .args(["--eval", "--strict", "--json", "-E", &expr])
        .output()
        .expect("nix-instantiate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script: String = serde_json::from_slice(&out.stdout).expect("a string");
    assert!(script.contains(wanted), "{store}: {script}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("activate.sh");
    std::fs::write(&path, &script).unwrap();
    let syntax = std::process::Command::new("sh")
        .arg("-n")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        syntax.status.success(),
        "{}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    let check = std::process::Command::new("shellcheck")
        .args(["--shell=sh"])
        .arg(&path)
        .output()
        .expect("shellcheck (scripts/setup installs it)");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}
