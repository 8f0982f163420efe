//! The end of a deploy: a summary table for people, a JSON report for scripts.

use serde_json::{Value, json};

use crate::error::ExitKind;
use crate::execute::{MachineReport, Outcome};
use crate::plan::Stage;

fn seconds(report: &MachineReport, stage: Stage) -> Option<f64> {
    report.stages.get(&stage).map(|d| d.as_secs_f64())
}

fn result_word(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Deployed => "deployed",
        Outcome::DryActivated => "dry-activated",
        Outcome::Built => "built",
        Outcome::UpToDate => "up to date",
        Outcome::Failed(e) if e.exit == crate::error::ExitKind::Interrupted => "interrupted",
        Outcome::Failed(_) => "failed",
        Outcome::Skipped => "skipped",
        Outcome::NotStarted(_) => "not started",
    }
}

/// The summary table, then each failure's explanation.
pub fn summary(reports: &[MachineReport]) -> String {
    let headers = [
        "machine", "built on", "target", "result", "build", "copy", "activate",
    ];
    let time = |r: &MachineReport, s| seconds(r, s).map_or("-".to_string(), |t| format!("{t:.1}s"));
    let rows: Vec<[String; 7]> = reports
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.build_host.clone(),
                r.target.clone(),
                result_word(&r.outcome).to_string(),
                time(r, Stage::Build),
                time(r, Stage::CopyToTarget),
                time(r, Stage::Activate),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..headers.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([headers[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    for r in reports {
        if let Outcome::Failed(error) = &r.outcome {
            out.push('\n');
            out.push_str(&error.to_string());
            out.push('\n');
        }
    }
    out
}

/// The JSON report: per machine, where it built, where it went, how it ended, stage times.
pub fn json(run_id: &str, reports: &[MachineReport], exit: ExitKind) -> Value {
    let machines: Vec<Value> = reports
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "buildHost": r.build_host,
                "target": r.target,
                "result": result_word(&r.outcome),
                "error": match &r.outcome {
                    Outcome::Failed(e) => Some(e.message.clone()),
                    Outcome::NotStarted(why) => Some(why.clone()),
                    _ => None,
                },
                "errorCode": match &r.outcome {
                    Outcome::Failed(e) => Some(e.stable_code()),
                    _ => None,
                },
                "seconds": {
                    "build": seconds(r, Stage::Build),
                    "copy": seconds(r, Stage::CopyToTarget),
                    "activate": seconds(r, Stage::Activate),
                },
                "log": r.log.as_ref().map(|p| p.display().to_string()),
            })
        })
        .collect();
    // Every failure in full (hints, code), as a run that ended before any machine reports
    // them ([`failure_json`]).
    let errors: Vec<Value> = reports
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Failed(e) => {
                let mut error = error_json(e);
                error["machine"] = json!(r.name);
                Some(error)
            }
            _ => None,
        })
        .collect();
    json!({
        "run": run_id,
        "exitCode": exit.code(),
        "machines": machines,
        "errors": errors,
        "peakRssKiB": peak_rss_kib(),
    })
}

/// This process's peak resident memory, from /proc (Linux).
pub fn peak_rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// An error as JSON: message, the raw output it is based on, hints.
pub fn error_json(error: &crate::error::Error) -> Value {
    json!({
        "message": error.message,
        // A generator's own output may hold what it handles: not in machine-read reports.
        "detail": match error.code {
            Some(crate::vars::generate::GENERATOR_FAILED) => None,
            _ => error.detail.as_deref(),
        },
        "hints": error.hints.iter().map(|h| h.0.clone()).collect::<Vec<_>>(),
        "exitCode": error.exit.code(),
        "code": error.stable_code(),
    })
}

/// The `--json` report of a run that ended before any machine was deployed (bad input, an
/// evaluation error, a preflight problem): its exit code and every error, no machines.
pub fn failure_json(run_id: Option<&str>, errors: &[crate::error::Error], exit: ExitKind) -> Value {
    json!({
        "run": run_id,
        "exitCode": exit.code(),
        "errors": errors.iter().map(error_json).collect::<Vec<_>>(),
        "machines": [],
        "peakRssKiB": peak_rss_kib(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, ExitKind, Hint};
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn report(name: &str, outcome: Outcome) -> MachineReport {
        let mut stages = BTreeMap::new();
        stages.insert(Stage::Build, Duration::from_millis(12_100));
        stages.insert(Stage::CopyToTarget, Duration::from_millis(800));
        MachineReport {
            name: name.into(),
            build_host: "build host root@builder".into(),
            target: format!("root@{name}"),
            outcome,
            stages,
            changes: None,
            log: None,
        }
    }

    #[test]
    fn summary_and_json_snapshots() {
        let reports = vec![
            report("web1", Outcome::Deployed),
            report(
                "web2",
                Outcome::Failed(
                    Error::new("web2: switch-to-configuration failed on root@web2")
                        .detail("activating failed")
                        .hint(Hint::text(
                            "the system profile points to generation 4 again",
                        ))
                        .exit(ExitKind::PartiallyApplied),
                ),
            ),
            report("web3", Outcome::DryActivated),
            report("web4", Outcome::Skipped),
        ];
        insta::assert_snapshot!(summary(&reports));
        let mut json = json(
            "0123456789abcdef",
            &reports,
            crate::execute::exit_code(&reports),
        );
        json["peakRssKiB"] = Value::Null;
        insta::assert_json_snapshot!(json);
    }
}
