//! The protocol of `clan-activate`, the target's side of an activation
//! (`src/scripts/activate.sh`): its commands and their arguments ([`Command`]), its exit
//! codes ([`Exit`]) and the `clan: WORD …` lines it prints for the workstation ([`Word`]).
//! Every caller builds its arguments and reads its answers here, never with literals; the
//! tests below read the script's own header, `case` arms and `say` calls and compare them
//! with this module, so the shell and the Rust side cannot drift apart.

use std::time::Duration;

use crate::ssh::{ACTIVATE, RemoteCommand};

/// How long a target's lock waits for a sign of the workstation before it lets go
/// ([`Command::Lock`]'s `stale`): four heartbeats, as long as ssh's keep-alives wait (see
/// [`crate::ssh::KEEPALIVE_COUNT`]).
pub const LOCK_STALE: Duration = Duration::from_secs(60);

/// A command of `clan-activate`, with its arguments. `run` is the deploy's run id (hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// Take the deploy lock (waiting at most `wait` seconds) and hold it while the session
    /// lasts, letting go after `stale` seconds without a byte from the workstation.
    Lock {
        /// The run.
        run: &'a str,
        /// Who holds it, for other deploys' messages (`user@host`).
        who: &'a str,
        /// Seconds to wait for another holder.
        wait: u32,
        /// Seconds of silence after which the lock is let go.
        stale: u64,
    },
    /// Stand down earlier runs, record the generation, arm a watchdog of `watchdog`
    /// seconds (0: none), set the profile.
    Prepare {
        /// The run.
        run: &'a str,
        /// `switch`, `boot`, `test`.
        action: &'a str,
        /// The new system.
        toplevel: &'a str,
        /// The watchdog's seconds.
        watchdog: u32,
    },
    /// The new system's `switch-to-configuration ACTION`.
    Switch {
        /// The run.
        run: &'a str,
        /// `switch`, `boot`, `test`, `dry-activate`.
        action: &'a str,
        /// The new system.
        toplevel: &'a str,
        /// The specialisation whose switch-to-configuration runs (`-` on the command line:
        /// the system's own).
        specialisation: Option<&'a str>,
        /// NIXOS_NO_CHECK=1 for it (`1`/`0`).
        no_check: bool,
    },
    /// Stand the watchdog down.
    Confirm {
        /// The run.
        run: &'a str,
    },
    /// How the switch ended, after a lost session.
    Outcome {
        /// The run.
        run: &'a str,
    },
    /// Back to the recorded generation after a failed switch.
    Undo {
        /// The run.
        run: &'a str,
    },
    /// Back to the generation the run found, after a failed health check.
    Revert {
        /// The run.
        run: &'a str,
    },
    /// List the system profile's generations.
    Generations {
        /// The run.
        run: &'a str,
    },
    /// `clan machines rollback`: under the lock, back to generation `to`.
    Rollback {
        /// The run.
        run: &'a str,
        /// Seconds to wait for the lock.
        wait: u32,
        /// The generation.
        to: u32,
    },
}

impl Command<'_> {
    /// The command's word, the script's first argument.
    pub fn word(&self) -> &'static str {
        match self {
            Command::Lock { .. } => "lock",
            Command::Prepare { .. } => "prepare",
            Command::Switch { .. } => "switch",
            Command::Confirm { .. } => "confirm",
            Command::Outcome { .. } => "outcome",
            Command::Undo { .. } => "undo",
            Command::Revert { .. } => "revert",
            Command::Generations { .. } => "generations",
            Command::Rollback { .. } => "rollback",
        }
    }

    /// The script's arguments: the word, the run, then the command's own.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![self.word().to_string()];
        match *self {
            Command::Lock {
                run,
                who,
                wait,
                stale,
            } => args.extend([
                run.to_string(),
                who.to_string(),
                wait.to_string(),
                stale.to_string(),
            ]),
            Command::Prepare {
                run,
                action,
                toplevel,
                watchdog,
            } => args.extend([
                run.to_string(),
                action.to_string(),
                toplevel.to_string(),
                watchdog.to_string(),
            ]),
            Command::Switch {
                run,
                action,
                toplevel,
                specialisation,
                no_check,
            } => args.extend([
                run.to_string(),
                action.to_string(),
                toplevel.to_string(),
                specialisation.unwrap_or("-").to_string(),
                if no_check { "1" } else { "0" }.to_string(),
            ]),
            Command::Confirm { run }
            | Command::Outcome { run }
            | Command::Undo { run }
            | Command::Revert { run }
            | Command::Generations { run } => args.push(run.to_string()),
            Command::Rollback { run, wait, to } => {
                args.extend([run.to_string(), wait.to_string(), to.to_string()]);
            }
        }
        args
    }

    /// The remote command that installs the script (if needed) and runs this.
    pub fn remote(&self) -> RemoteCommand {
        RemoteCommand::Script {
            script: ACTIVATE,
            args: self.args(),
            sudo: None,
        }
    }
}

/// How `clan-activate` ended (the script's header lists them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done (confirm: confirmed; outcome: the switch succeeded).
    Done,
    /// 1: failed (outcome: the switch failed).
    Failed,
    /// 2: bad arguments.
    BadArguments,
    /// 3: no generation to go back to (rollback: not another generation).
    NoGeneration,
    /// 4: the watchdog rolled back already (`clan: rolled-back …`).
    RolledBack,
    /// 5: no such activation: another deploy took it over.
    NotPending,
    /// 6: the switch never started (outcome).
    NeverStarted,
    /// 7: the switch ended without a status: killed (outcome).
    Killed,
    /// 75: the lock is held by another deploy.
    LockBusy,
    /// 76: this run no longer holds the lock (let go after the workstation's silence).
    LockLost,
}

impl Exit {
    /// Every exit, in the order of their codes.
    pub const ALL: [Exit; 10] = [
        Exit::Done,
        Exit::Failed,
        Exit::BadArguments,
        Exit::NoGeneration,
        Exit::RolledBack,
        Exit::NotPending,
        Exit::NeverStarted,
        Exit::Killed,
        Exit::LockBusy,
        Exit::LockLost,
    ];

    /// The process exit code.
    pub fn code(self) -> i32 {
        match self {
            Exit::Done => 0,
            Exit::Failed => 1,
            Exit::BadArguments => 2,
            Exit::NoGeneration => 3,
            Exit::RolledBack => 4,
            Exit::NotPending => 5,
            Exit::NeverStarted => 6,
            Exit::Killed => 7,
            Exit::LockBusy => 75,
            Exit::LockLost => 76,
        }
    }

    /// The exit a process status means; `None` for anything else (ssh's 255, a signal).
    pub fn from_code(code: Option<i32>) -> Option<Exit> {
        Exit::ALL.into_iter().find(|e| Some(e.code()) == code)
    }
}

/// The words of the script's `clan: WORD …` lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Word {
    /// `clan: acquired`: the lock is held.
    Acquired,
    /// `clan: waiting HOLDER`: another deploy holds the lock.
    Waiting,
    /// `clan: busy HOLDER`: it still does, after the wait.
    Busy,
    /// `clan: lock-lost`: this run no longer holds the lock.
    LockLost,
    /// `clan: took-over RUN`: an earlier run's pending activation was taken over.
    TookOver,
    /// `clan: previous GEN PATH`: the generation before this activation.
    Previous,
    /// `clan: profile GEN PATH`: where the profile points now.
    Profile,
    /// `clan: rolled-back profile GEN PATH`: the watchdog went back there.
    RolledBack,
    /// `clan: confirmed`.
    Confirmed,
    /// `clan: switched STATUS`: how a switch ended (outcome).
    Switched,
    /// `clan: switch-killed`.
    SwitchKilled,
    /// `clan: switch-never-started`.
    SwitchNeverStarted,
    /// `clan: generation GEN PATH`: one generation (generations).
    Generation,
    /// `clan: current GEN`: the current one (generations).
    Current,
}

impl Word {
    /// Every word.
    pub const ALL: [Word; 14] = [
        Word::Acquired,
        Word::Waiting,
        Word::Busy,
        Word::LockLost,
        Word::TookOver,
        Word::Previous,
        Word::Profile,
        Word::RolledBack,
        Word::Confirmed,
        Word::Switched,
        Word::SwitchKilled,
        Word::SwitchNeverStarted,
        Word::Generation,
        Word::Current,
    ];

    /// The word as the script prints it.
    pub fn text(self) -> &'static str {
        match self {
            Word::Acquired => "acquired",
            Word::Waiting => "waiting",
            Word::Busy => "busy",
            Word::LockLost => "lock-lost",
            Word::TookOver => "took-over",
            Word::Previous => "previous",
            Word::Profile => "profile",
            Word::RolledBack => "rolled-back",
            Word::Confirmed => "confirmed",
            Word::Switched => "switched",
            Word::SwitchKilled => "switch-killed",
            Word::SwitchNeverStarted => "switch-never-started",
            Word::Generation => "generation",
            Word::Current => "current",
        }
    }

    /// What follows the word on `line` (empty for a bare word), if `line` is this word's.
    pub fn of(self, line: &str) -> Option<&str> {
        let rest = line.strip_prefix("clan: ")?.strip_prefix(self.text())?;
        if rest.is_empty() {
            Some("")
        } else {
            rest.strip_prefix(' ')
        }
    }

    /// What follows the word on the first of `output`'s lines that has it.
    pub fn find(self, output: &str) -> Option<&str> {
        output.lines().find_map(|l| self.of(l))
    }

    /// What follows the word on every line of `output` that has it.
    pub fn all(self, output: &str) -> impl Iterator<Item = &str> {
        output.lines().filter_map(move |l| self.of(l))
    }
}

/// Whether `line` is one of the script's lines for the workstation (not for people).
pub fn is_protocol_line(line: &str) -> bool {
    line.starts_with("clan: ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const SCRIPT: &str = include_str!("scripts/activate.sh");

    /// The script's header: its leading comment block.
    fn header() -> String {
        SCRIPT
            .lines()
            .take_while(|l| l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    }

    // The header's "Exit codes:" paragraph names exactly the codes of [`Exit`], and the
    // script exits with no other literal code.
    #[test]
    fn exit_codes_match_the_scripts_header() {
        let header = header();
        let table = &header[header.find("# Exit codes:").expect("an exit code table")..];
        let table: String = table
            .lines()
            .take_while(|l| !l.starts_with("# Lines starting"))
            .collect();
        let listed: BTreeSet<i32> = table
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        let ours: BTreeSet<i32> = Exit::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(listed, ours, "the header's table: {table}");
        let used: BTreeSet<i32> = SCRIPT
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split("exit ").skip(1))
            .filter_map(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|n| n.parse().ok())
            })
            .collect();
        assert!(
            used.is_subset(&ours),
            "exit codes without an Exit: {used:?}"
        );
    }

    // Every command of [`Command`] is an arm of the script's `case $cmd`, and the only
    // other arms are the ones the script runs itself.
    #[test]
    fn commands_match_the_scripts_case_arms() {
        let arms: BTreeSet<&str> = SCRIPT
            .lines()
            .filter_map(|l| l.strip_suffix(')'))
            .filter(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
            .collect();
        let run = "0a";
        let ours: BTreeSet<&str> = [
            Command::Lock {
                run,
                who: "u@h",
                wait: 1,
                stale: 1,
            },
            Command::Prepare {
                run,
                action: "switch",
                toplevel: "/nix/store/x",
                watchdog: 1,
            },
            Command::Switch {
                run,
                action: "switch",
                toplevel: "/nix/store/x",
                specialisation: None,
                no_check: false,
            },
            Command::Confirm { run },
            Command::Outcome { run },
            Command::Undo { run },
            Command::Revert { run },
            Command::Generations { run },
            Command::Rollback {
                run,
                wait: 1,
                to: 1,
            },
        ]
        .iter()
        .map(Command::word)
        .chain(["switch-now", "watchdog"])
        .collect();
        assert_eq!(arms, ours);
    }

    // Every word the script says is a [`Word`], and every [`Word`] is said.
    #[test]
    fn words_match_the_scripts_say_calls() {
        let said: BTreeSet<String> = SCRIPT
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split("say ").skip(1))
            .filter_map(|rest| {
                rest.trim_start_matches('"')
                    .split(|c: char| !(c.is_ascii_lowercase() || c == '-'))
                    .next()
                    .filter(|w| !w.is_empty())
                    .map(str::to_string)
            })
            .collect();
        let ours: BTreeSet<String> = Word::ALL.iter().map(|w| w.text().to_string()).collect();
        assert_eq!(said, ours);
    }

    #[test]
    fn lines_are_read_by_their_word() {
        let out = "building\nclan: profile 7 /nix/store/a-7\nclan: confirmed\nclan: profiles x\n";
        assert_eq!(Word::Profile.find(out), Some("7 /nix/store/a-7"));
        assert_eq!(Word::Confirmed.find(out), Some(""));
        assert_eq!(Word::Previous.find(out), None);
        assert_eq!(Exit::from_code(Some(76)), Some(Exit::LockLost));
        assert_eq!(Exit::from_code(Some(255)), None);
        assert_eq!(
            Command::Rollback {
                run: "ab",
                wait: 30,
                to: 6
            }
            .args(),
            ["rollback", "ab", "30", "6"]
        );
        assert_eq!(
            Command::Switch {
                run: "ab",
                action: "test",
                toplevel: "/nix/store/x",
                specialisation: Some("gpu"),
                no_check: true,
            }
            .args(),
            ["switch", "ab", "test", "/nix/store/x", "gpu", "1"]
        );
    }
}
