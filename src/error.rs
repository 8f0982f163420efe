//! User-facing errors: one line that names the value and where it came from, the raw output
//! it is based on, and hints that say what to do next.

use std::fmt;

/// How a run ends. Its number, the process exit code, is given in one place,
/// [`ExitKind::code`], and documented in the README. Ordered by severity: a run of several
/// machines ends with the most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExitKind {
    /// Everything asked for was done (or, for a check, nothing is wrong).
    Success,
    /// The deploy failed before any target's system profile was touched.
    DeployFailed,
    /// Bad input or configuration, found before anything ran on any host.
    Usage,
    /// Stopped by Ctrl-C.
    Interrupted,
    /// A target's profile or running system was being changed when it failed: it may be
    /// half-updated. Outranks Ctrl-C: a script that stopped a run must still learn that a
    /// target may be half-updated.
    PartiallyApplied,
}

impl ExitKind {
    /// The process exit code.
    pub fn code(self) -> i32 {
        match self {
            ExitKind::Success => 0,
            ExitKind::DeployFailed => 1,
            ExitKind::Usage => 2,
            ExitKind::PartiallyApplied => 3,
            ExitKind::Interrupted => 130,
        }
    }
}

/// A suggested next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint(pub String);

impl Hint {
    /// A hint from any text.
    pub fn text(s: impl Into<String>) -> Hint {
        Hint(s.into())
    }
}

/// An error as the user sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// One line: what went wrong, naming the value and its source.
    pub message: String,
    /// Raw output of the failing command, shown indented under the message.
    pub detail: Option<String>,
    /// What to do about it.
    pub hints: Vec<Hint>,
    /// The exit code this error leads to.
    pub exit: ExitKind,
    /// A stable, machine-readable name of what went wrong (`--json`), where one is given.
    pub code: Option<&'static str>,
}

/// [`Error::code`] of a value from the flake or the command line that the trust boundary
/// refused: it stops the run before any activation, with exit 2, in fleets too.
pub const REFUSED: &str = "boundary.refused";

impl Error {
    /// A deploy failure (exit 1) with `message`.
    pub fn new(message: impl Into<String>) -> Error {
        Error {
            message: message.into(),
            detail: None,
            hints: Vec::new(),
            exit: ExitKind::DeployFailed,
            code: None,
        }
    }

    /// A usage or configuration error (exit 2).
    pub fn usage(message: impl Into<String>) -> Error {
        Error {
            exit: ExitKind::Usage,
            ..Error::new(message)
        }
    }

    /// Adds a hint.
    pub fn hint(mut self, hint: Hint) -> Error {
        self.hints.push(hint);
        self
    }

    /// Sets the raw output.
    pub fn detail(mut self, detail: impl Into<String>) -> Error {
        let detail = detail.into();
        self.detail = (!detail.trim().is_empty()).then_some(detail);
        self
    }

    /// Sets the exit kind.
    pub fn exit(mut self, exit: ExitKind) -> Error {
        self.exit = exit;
        self
    }

    /// Sets the stable code.
    pub fn code(mut self, code: &'static str) -> Error {
        self.code = Some(code);
        self
    }
    /// The stable code of what went wrong: the one given where the failure is recognised,
    /// else one for its exit kind (`failed`, `usage`, `interrupted`, `half-updated`).
    pub fn stable_code(&self) -> &'static str {
        self.code.unwrap_or(match self.exit {
            ExitKind::Success | ExitKind::DeployFailed => "failed",
            ExitKind::Usage => "usage",
            ExitKind::Interrupted => "interrupted",
            ExitKind::PartiallyApplied => "half-updated",
        })
    }
}

/// The error of a run stopped by Ctrl-C `when` (before any deploy step): exit 130.
pub fn interrupted(when: &str) -> Error {
    Error::new(format!(
        "interrupted {when}: nothing was copied, built or activated"
    ))
    .exit(ExitKind::Interrupted)
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error: {}", self.message)?;
        if let Some(detail) = &self.detail {
            for line in detail.lines() {
                write!(f, "\n  | {line}")?;
            }
        }
        for hint in &self.hints {
            write!(f, "\nhint: {}", hint.0)?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}
