//! One module per subcommand: `clan machines update` lives in `machines/update.rs`.

pub mod machines;
pub mod ssh;
pub mod vars;

use crate::error::{Error, ExitKind};

/// `clan completions SHELL`: the script that registers clan's completion with the shell.
/// It calls `COMPLETE=SHELL clan …` as the user types, which completes flags from the
/// command line's definition and machine names and tags from the clan's flake.
pub fn completions(shell: clap_complete::Shell) -> Result<ExitKind, Error> {
    use clap_complete::env::{Bash, Elvish, EnvCompleter, Fish, Powershell, Zsh};
    let completer: &dyn EnvCompleter = match shell {
        clap_complete::Shell::Bash => &Bash,
        clap_complete::Shell::Elvish => &Elvish,
        clap_complete::Shell::Fish => &Fish,
        clap_complete::Shell::PowerShell => &Powershell,
        clap_complete::Shell::Zsh => &Zsh,
        other => {
            return Err(Error::usage(format!(
                "no completion for {other} (from the command line)"
            )));
        }
    };
    completer
        .write_registration(
            "COMPLETE",
            "clan",
            "clan",
            "clan",
            &mut std::io::stdout().lock(),
        )
        .map_err(|e| Error::new(format!("cannot write the completion script: {e}")))?;
    Ok(ExitKind::Success)
}
