//! The command line itself, without a lab: shell completions generated from its definition.

use std::process::Command;

fn clan(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_clan"))
        .args(args)
        .output()
        .expect("clan");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// `clan completions SHELL` registers clan's completion with bash, zsh and fish: the script
// asks `COMPLETE=SHELL clan` for the words as the user types. The words come from the same
// definition as --help (the commands, their aliases and the flags); machine names and tags
// come from the flake (tests/clan_flakes.rs, `completion_names_the_clans_machines_and_tags`).
#[test]
fn shell_completions_know_the_commands_and_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let script = clan(&["completions", shell]);
        assert!(
            script.contains("COMPLETE") && script.contains("clan"),
            "{shell}: {script}"
        );
    }
    // Outside any clan (no flake here or above): no Nix runs, flags still complete.
    let elsewhere = tempfile::tempdir().unwrap();
    let complete = |words: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_clan"))
            .current_dir(elsewhere.path())
            .env("CLAN_DIR", elsewhere.path())
            .env("COMPLETE", "fish")
            .arg("--")
            .args(words)
            .output()
            .expect("clan");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let words = |out: String| -> Vec<String> {
        out.lines()
            .map(|l| l.split('\t').next().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(words(complete(&["clan", "machines", "upd"])), ["update"]);
    assert_eq!(words(complete(&["clan", "ma"])), ["machines"]);
    for flag in ["--host-key-check", "--flake", "--build-host"] {
        assert!(
            words(complete(&["clan", "machines", "update", "--"])).contains(&flag.to_string()),
            "{flag}"
        );
    }
    assert_eq!(
        words(complete(&[
            "clan",
            "machines",
            "update",
            "--host-key-check",
            "acc"
        ])),
        ["accept-new"]
    );
}

// `clan vars keygen`, as clan-core's: with no age key anywhere it makes one where sops looks
// (0600) and adds its public key as the user's key.json; again, nothing changes; another
// key for that user is never replaced without --force. No Nix runs.
#[test]
fn vars_keygen_makes_a_key_once_and_never_replaces_one() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let clan_dir = tempfile::tempdir().unwrap();
    std::fs::write(clan_dir.path().join("flake.nix"), "{ }").unwrap();
    let keygen = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_clan"))
            .env_clear()
            .env("HOME", home.path())
            .env("PATH", std::env::var_os("PATH").unwrap())
            .env("USER", "alice")
            .args(["vars", "keygen", "--flake"])
            .arg(clan_dir.path())
            .args(extra)
            .output()
            .unwrap()
    };
    let first = keygen(&[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let key_file = home.path().join(".config/sops/age/keys.txt");
    let text = std::fs::read_to_string(&key_file).unwrap();
    assert!(text.contains("AGE-SECRET-KEY-1"));
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let public = String::from_utf8_lossy(&first.stdout).trim().to_string();
    assert!(public.starts_with("age1"), "{public}");
    assert!(text.contains(&format!("# public key: {public}")));
    let json = clan_dir.path().join("sops/users/alice/key.json");
    let keys: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        keys,
        serde_json::json!([{ "publickey": public, "type": "age" }])
    );

    // Again: the same key, nothing written.
    let again = keygen(&[]);
    assert!(again.status.success());
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), public);
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), text);
    assert!(String::from_utf8_lossy(&again.stderr).contains("the clan has this key already"));

    // Another key for alice in the clan: kept, unless --force.
    let other = r#"[{"publickey": "age1qyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqs3290gq", "type": "age"}]"#;
    std::fs::write(&json, other).unwrap();
    let refused = keygen(&[]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("holds other keys for user alice"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(std::fs::read_to_string(&json).unwrap(), other);
    let forced = keygen(&["--force"]);
    assert!(forced.status.success());
    assert!(std::fs::read_to_string(&json).unwrap().contains(&public));
}
