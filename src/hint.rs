//! Commands that hints print, to be pasted: they repeat the flags of the run that prints
//! them that decide what a command acts on (`--flake`, `--target-host`, `--build-host`,
//! `--option`), and every word is shell-quoted. Pasted from another directory, the command
//! still acts on the same flake and hosts.

use std::sync::OnceLock;

/// This run's flags that a pasted command repeats, set once at its start.
static CONTEXT: OnceLock<Vec<String>> = OnceLock::new();

/// Remembers the flags of this run that commands in hints repeat
/// ([`crate::cli::HostArgs::hint_context`]).
pub fn remember(flags: Vec<String>) {
    let _ = CONTEXT.set(flags);
}

/// `clan WORDS MACHINE EXTRA…` with this run's flags (see [`remember`]), shell-quoted.
pub fn command(words: &str, machine: &str, extra: &[&str]) -> String {
    command_with(
        CONTEXT.get().map_or(&[][..], Vec::as_slice),
        words,
        machine,
        extra,
    )
}

/// [`command`] with the flags `context`. A flag that `extra` sets itself (`--build-host
/// localhost`) is not repeated from the context.
pub fn command_with(context: &[String], words: &str, machine: &str, extra: &[&str]) -> String {
    let mut all: Vec<String> = vec!["clan".into()];
    all.extend(words.split(' ').map(str::to_string));
    all.push(machine.to_string());
    let mut i = 0;
    while i < context.len() {
        let flag = &context[i];
        let takes = if flag == "--option" { 2 } else { 1 };
        let end = (i + 1 + takes).min(context.len());
        if flag == "--option" || !extra.contains(&flag.as_str()) {
            all.extend(context[i..end].iter().cloned());
        }
        i = end;
    }
    all.extend(extra.iter().map(|s| s.to_string()));
    all.iter()
        .map(|w| crate::ssh::quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(args: &[&str]) -> Vec<String> {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            hosts: crate::cli::HostArgs,
        }
        Wrap::parse_from(std::iter::once("clan").chain(args.iter().copied()))
            .hosts
            .hint_context()
    }

    #[test]
    fn hints_repeat_the_flags_that_decide_what_a_command_acts_on() {
        let cwd = std::env::current_dir().unwrap().display().to_string();
        let ctx = context(&[
            "--flake",
            "./f 1",
            "--build-host",
            "root@b",
            "--option",
            "max-jobs",
            "4",
        ]);
        let shown = [
            command_with(
                &ctx,
                "machines update",
                "web",
                &["--host-key-check", "accept-new"],
            ),
            command_with(
                &ctx,
                "machines update",
                "web",
                &["--build-host", "localhost"],
            ),
            command_with(&ctx, "machines rollback", "web", &[]),
        ]
        .join("\n")
        .replace(&cwd, "CWD");
        insta::assert_snapshot!(shown, @r"
        clan machines update web --flake 'CWD/f 1' --build-host root@b --option max-jobs 4 --host-key-check accept-new
        clan machines update web --flake 'CWD/f 1' --option max-jobs 4 --build-host localhost
        clan machines rollback web --flake 'CWD/f 1' --build-host root@b --option max-jobs 4
        ");
        // The current directory and flake references are kept as they are.
        assert_eq!(
            command_with(&context(&[]), "machines update", "web", &[]),
            "clan machines update web"
        );
        assert_eq!(
            context(&["--flake", "github:o/r"]),
            ["--flake", "github:o/r"]
        );
    }
}
