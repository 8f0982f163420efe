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
