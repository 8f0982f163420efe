//! What the user sees while a deploy runs. On a terminal: one live line per machine with
//! its stage and elapsed time (indicatif). Elsewhere, or with `--log-format plain`: one
//! plain line per event, with Nix's own output prefixed and stripped of terminal codes.

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use regex::Regex;

/// The progress display of one run.
pub enum Progress {
    /// Line per event.
    Plain {
        /// Machine names, by plan index.
        names: Vec<String>,
        /// Show each command and its output (`-v`), not just one line per step.
        verbose: bool,
    },
    /// Live lines, one per machine.
    Live {
        /// Keeps the lines together.
        multi: MultiProgress,
        /// One line per machine, by plan index.
        bars: Vec<ProgressBar>,
    },
    /// Nothing shown (retries whose first attempt was shown; everything is in the log).
    Silent,
}

/// The live lines on the terminal now, if any: what [`with_terminal`] takes off the screen.
static LIVE: Mutex<Option<MultiProgress>> = Mutex::new(None);

/// Runs `f`, which talks to the user on the terminal (a generator's prompt, its messages),
/// with the live lines off the screen: they are cleared and not drawn until `f` returns,
/// while the machines' stages go on being recorded. Nothing waits for the user but `f`.
pub fn with_terminal<R>(f: impl FnOnce() -> R) -> R {
    let live = LIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(multi) = live else {
        return f();
    };
    let _ = multi.clear();
    multi.set_draw_target(ProgressDrawTarget::hidden());
    let result = f();
    multi.set_draw_target(ProgressDrawTarget::stderr());
    result
}

/// Prints `text` (one or more lines) to standard error, above the live lines if they are on
/// the screen, so neither garbles the other.
pub fn line(text: &str) {
    let live = LIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match live {
        Some(multi) => multi.suspend(|| eprintln!("{text}")),
        None => eprintln!("{text}"),
    }
}

/// Terminal control sequences (colours, cursor movement).
static ANSI: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07").expect("valid regex")
});

/// `text` without terminal control sequences or other control characters.
pub fn strip_control(text: &str) -> String {
    ANSI.replace_all(text, "")
        .chars()
        .filter(|c| !c.is_control() || *c == '\t')
        .collect()
}

/// [`strip_control`] line by line: multi-line text (Nix's errors) keeps its line breaks.
pub fn strip_control_lines(text: &str) -> String {
    text.lines()
        .map(strip_control)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `text` with its colours for a terminal that wants them; without any control sequence
/// when standard error is not a terminal (a CI log, a pipe) or `NO_COLOR` is set.
pub fn colours_if_wanted(text: &str) -> String {
    use std::io::IsTerminal;
    let wanted = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    if wanted {
        text.to_string()
    } else {
        strip_control_lines(text)
    }
}

impl Progress {
    /// Whether lines are redrawn in place (a terminal), rather than printed one after
    /// another.
    pub fn is_live(&self) -> bool {
        matches!(self, Progress::Live { .. })
    }

    /// A display that shows nothing.
    pub fn silent() -> Progress {
        Progress::Silent
    }

    /// Live lines when `live`, else plain lines, for machines `names`.
    pub fn new(names: &[String], live: bool, verbose: bool) -> Progress {
        if !live {
            return Progress::Plain {
                names: names.to_vec(),
                verbose,
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let width = names.iter().map(String::len).max().unwrap_or(0);
        let style = ProgressStyle::with_template(&format!(
            "{{prefix:<{width}.bold}} {{spinner}} {{wide_msg}} {{elapsed:>4}}"
        ))
        .expect("valid template");
        let bars = names
            .iter()
            .map(|name| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_prefix(name.clone());
                bar.set_message("waiting");
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            })
            .collect();
        *LIVE.lock().unwrap_or_else(|e| e.into_inner()) = Some(multi.clone());
        Progress::Live { multi, bars }
    }

    /// Machine `i` entered a stage.
    pub fn stage(&self, i: usize, what: &str) {
        match self {
            Progress::Plain { names, .. } => eprintln!("[{}] {what}", names[i]),
            Progress::Live { bars, .. } => bars[i].set_message(what.to_string()),
            Progress::Silent => {}
        }
    }

    /// Machine `i` is done.
    pub fn finish(&self, i: usize, ok: bool, what: &str) {
        match self {
            Progress::Plain { names, .. } => eprintln!("[{}] {what}", names[i]),
            Progress::Live { bars, .. } => {
                let mark = if ok { "✓" } else { "✗" };
                bars[i].finish_with_message(format!("{mark} {what}"));
            }
            Progress::Silent => {}
        }
    }

    /// The same display for the machines `subset` of `all` (the names this display was made
    /// with), in that order: a part of a run planned on its own shares the lines.
    pub fn subset(&self, all: &[String], subset: &[String]) -> Progress {
        let index = |name: &String| all.iter().position(|n| n == name).expect("a known machine");
        match self {
            Progress::Plain { verbose, .. } => Progress::Plain {
                names: subset.to_vec(),
                verbose: *verbose,
            },
            Progress::Live { multi, bars } => Progress::Live {
                multi: multi.clone(),
                bars: subset.iter().map(|n| bars[index(n)].clone()).collect(),
            },
            Progress::Silent => Progress::Silent,
        }
    }

    /// Whether commands and their output are shown (`-v`).
    pub fn verbose(&self) -> bool {
        matches!(self, Progress::Plain { verbose: true, .. })
    }

    /// A command started, or something else worth a line.
    pub fn event(&self, line: &str) {
        match self {
            Progress::Plain { .. } => eprintln!("{}", strip_control(line)),
            Progress::Live { .. } | Progress::Silent => {} // in the log files
        }
    }

    /// One line of a command's output.
    pub fn output(&self, label: &str, line: &str) {
        match self {
            Progress::Plain { verbose: true, .. } => {
                eprintln!("[{label}]   | {}", strip_control(line))
            }
            Progress::Plain { .. } => {} // in the log files
            Progress::Live { .. } | Progress::Silent => {} // in the log files
        }
    }

    /// Ends the live display, so the summary prints below it.
    pub fn close(&self) {
        if let Progress::Live { multi, bars } = self {
            for bar in bars {
                if !bar.is_finished() {
                    bar.abandon();
                }
            }
            let _ = multi.clear();
            *LIVE.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_codes_are_stripped() {
        assert_eq!(
            strip_control(
                "\u{1b}[31;1merror:\u{1b}[0m builder for '\u{1b}[35;1m/nix/store/x\u{1b}[0m' failed\r"
            ),
            "error: builder for '/nix/store/x' failed"
        );
        assert_eq!(strip_control("plain\ttext"), "plain\ttext");
        assert_eq!(
            strip_control_lines("error: \x1b[31;1mbad\x1b[0m\n       at f.nix:1:2:\n"),
            "error: bad\n       at f.nix:1:2:"
        );
    }
}
