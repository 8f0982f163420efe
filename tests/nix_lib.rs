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
