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

// Completions for bash, zsh and fish come from the same definition as --help: they know the
// commands, their aliases and the flags.
#[test]
fn shell_completions_know_the_commands_and_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let script = clan(&["completions", shell]);
        for word in [
            "machines",
            "update",
            "rollback",
            "generations",
            "host-key-check",
            "flake",
        ] {
            assert!(script.contains(word), "{shell} lacks {word}");
        }
    }
    assert!(clan(&["completions", "bash"]).starts_with("_clan() {"));
}
