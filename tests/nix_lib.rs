//! Evaluation tests of the Nix library (`nix/tests/default.nix`) on nixpkgs' real lib: each
//! attribute must be true.

#[test]
fn lib_clan_evaluation_tests() {
    let lib = clan_lab::nixpkgs_lib();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("nix-instantiate")
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
    assert!(results.len() >= 9);
}

/// The activation script the library generates for vars is valid sh (and shellcheck-clean
/// where shellcheck is installed, as the test command installs it).
#[test]
fn vars_activation_script_is_valid_sh() {
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
    let out = std::process::Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "-E", &expr])
        .output()
        .expect("nix-instantiate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script: String = serde_json::from_slice(&out.stdout).expect("a string");
    assert!(script.contains("clan_vars_file /run/secrets-for-users db root shared/db/root.age"));
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
    if let Ok(check) = std::process::Command::new("shellcheck")
        .args(["--shell=sh"])
        .arg(&path)
        .output()
    {
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
}
