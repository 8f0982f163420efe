//! A streamed fleet: machines go into a batch as their evaluations finish, and each batch
//! goes through [`Deployment::batch`] while the others are still being evaluated.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Deployment, failed_all};
use crate::error::Error;
use crate::execute::{MachineReport, Outcome};
use crate::progress::Progress;
use crate::resolve::{Overrides, ResolvedMachine};
use crate::select::{Streamed, StreamedMachine};

/// How long machines that finished evaluating wait for others before their build starts:
/// those that finish close together build in one batch, but no machine waits longer than
/// [`STREAM_MAX_WAIT`] after its own evaluation.
pub const STREAM_WINDOW: Duration = Duration::from_millis(500);

/// The longest a machine waits, once evaluated, for others to join its batch.
pub const STREAM_MAX_WAIT: Duration = Duration::from_millis(1000);

/// From this many machines on, the first batch is a quarter of the fleet: its checks are
/// short, and its build (which builds what the systems share) runs while the others are
/// checked. Smaller fleets build in one batch when they are evaluated together.
pub const EARLY_BATCH_FROM: usize = 8;

impl Deployment {
    /// Deploys a streamed selection: each machine is resolved as its evaluation arrives, and
    /// machines go on to their batch as soon as they (and any that finish within
    /// [`STREAM_WINDOW`] of them) are evaluated. One batch is checked (up to date,
    /// preflight) at a time: the machines evaluated meanwhile form the next batch as soon as
    /// those checks are over, while the batch before builds, copies and activates. Each
    /// machine's hops are checked before its own build starts, and a machine whose checks
    /// fail is never built. A fleet of [`EARLY_BATCH_FROM`] or more starts with a quarter of
    /// it. No activation starts before every machine's values passed the trust boundary
    /// ([`crate::execute::gate`]). The reports are in the order of the selection.
    pub fn stream(
        &self,
        streamed: &Streamed,
        overrides: &Overrides,
    ) -> Result<Vec<MachineReport>, Error> {
        let names = streamed.index.selected_names.clone();
        let progress = Progress::new(&names, self.settings.live, self.settings.verbose);
        let position = |name: &str| names.iter().position(|n| n == name);
        // --fail-fast across batches: once a machine failed, later batches do not start.
        let failed_seen = AtomicBool::new(false);
        let expected = streamed.expected();
        crate::execute::gate::close();
        let mut refused: Vec<String> = Vec::new();
        let mut early: Vec<MachineReport> = Vec::new();
        let mut skipped_any = false;
        let mut reports: Vec<MachineReport> = std::thread::scope(|scope| {
            let mut handles = Vec::new();
            let mut pending: Vec<ResolvedMachine> = Vec::new();
            let mut received = 0;
            let mut batch: u8 = 0;
            let mut first_pending: Option<Instant> = None;
            // The batch being checked says so when its checks are over; machines that
            // waited for that go on at once.
            let (checks_over, checked) = std::sync::mpsc::channel::<()>();
            let mut checking = false;
            let mut held_back = false;
            let early_cap = if expected >= EARLY_BATCH_FROM {
                expected.div_ceil(4)
            } else {
                usize::MAX
            };
            while received < expected || !pending.is_empty() {
                let wait = match first_pending {
                    _ if checking => Duration::from_millis(20),
                    None => Duration::from_secs(24 * 3600),
                    Some(since) => {
                        STREAM_WINDOW.min(STREAM_MAX_WAIT.saturating_sub(since.elapsed()))
                    }
                };
                let mut window_closed = false;
                let next = if received < expected {
                    streamed.evaluated.recv_timeout(wait)
                } else {
                    // Everything is evaluated: only the checks are waited for.
                    std::thread::sleep(wait.min(Duration::from_millis(20)));
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                };
                while checked.try_recv().is_ok() {
                    checking = false;
                    held_back |= !pending.is_empty();
                }
                match next {
                    Ok(evaluated) => {
                        received += 1;
                        match streamed.resolve(evaluated, overrides) {
                            StreamedMachine::Ready(m) => {
                                first_pending.get_or_insert_with(Instant::now);
                                pending.push(*m);
                            }
                            StreamedMachine::Skipped(name, why) => {
                                skipped_any = true;
                                crate::progress::line(&format!("{name}: skipped ({why})"));
                                if let Some(i) = position(name.as_str()) {
                                    progress.finish(i, false, &format!("skipped ({why})"));
                                }
                            }
                            StreamedMachine::Failed(name, error) => {
                                let is_refused = error.code == Some(crate::error::REFUSED);
                                if is_refused {
                                    refused.push(name.to_string());
                                    crate::progress::line(&format!("error: {}", error.message));
                                    // Machines still building stop before their activation.
                                    crate::execute::gate::refuse(&refused.join(", "));
                                } else {
                                    crate::progress::line(&format!(
                                        "{name}: evaluation failed: {}",
                                        error.message
                                    ));
                                }
                                if let Some(i) = position(name.as_str()) {
                                    let why = if is_refused {
                                        "refused (see above)"
                                    } else {
                                        "evaluation failed"
                                    };
                                    progress.finish(i, false, why);
                                }
                                early.push(MachineReport::not_run(
                                    &name,
                                    "-".into(),
                                    Outcome::Failed(error),
                                ));
                            }
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => window_closed = true,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => received = expected,
                }
                if crate::interrupt::requested() {
                    break;
                }
                let waited_enough = first_pending.is_some_and(|t| t.elapsed() >= STREAM_MAX_WAIT);
                if pending.is_empty()
                    || checking
                    || !(window_closed || waited_enough || held_back || received >= expected)
                {
                    continue;
                }
                held_back = false;
                first_pending = None;
                let machines = if batch == 0 && pending.len() > early_cap {
                    // The rest wait for this batch's checks.
                    let rest = pending.split_off(early_cap);
                    held_back = true;
                    first_pending = Some(Instant::now());
                    std::mem::replace(&mut pending, rest)
                } else {
                    std::mem::take(&mut pending)
                };
                if self.settings.run.fail_fast && failed_seen.load(Ordering::SeqCst) {
                    for m in &machines {
                        if let Some(i) = position(m.name.as_str()) {
                            progress.finish(i, false, "skipped (--fail-fast)");
                        }
                        early.push(MachineReport::not_run(
                            &m.name,
                            m.target.value.to_string(),
                            Outcome::Skipped,
                        ));
                    }
                    continue;
                }
                let (failed_seen, progress, names) = (&failed_seen, &progress, &names);
                let this = batch;
                batch = batch.wrapping_add(1);
                checking = true;
                let checks_over = checks_over.clone();
                handles.push(scope.spawn(move || {
                    let reports = self
                        .batch_then(
                            Some(this),
                            machines.clone(),
                            progress,
                            names,
                            Some(checks_over),
                        )
                        .unwrap_or_else(|error| {
                            for m in &machines {
                                if let Some(i) = names.iter().position(|n| n == m.name.as_str()) {
                                    progress.finish(
                                        i,
                                        false,
                                        &format!("failed: {}", error.message),
                                    );
                                }
                            }
                            failed_all(&machines, &error)
                        });
                    if reports
                        .iter()
                        .any(|r| matches!(r.outcome, Outcome::Failed(_)))
                    {
                        failed_seen.store(true, Ordering::SeqCst);
                    }
                    reports
                }));
            }
            // Every machine is checked: activations go ahead, unless a value was refused.
            if refused.is_empty() {
                crate::execute::gate::open();
            }
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("batch thread"))
                .collect()
        });
        crate::execute::gate::open();
        progress.close();
        reports.extend(early);
        if crate::interrupt::requested() && reports.is_empty() {
            return Err(crate::error::interrupted("while evaluating the flake"));
        }
        if reports.is_empty() {
            return Err(Error::usage(if skipped_any {
                "no machine to update: every one was skipped (see above)"
            } else {
                "no machine to update: none is selected"
            }));
        }
        reports.sort_by_key(|r| position(&r.name).unwrap_or(usize::MAX));
        Ok(reports)
    }
}
