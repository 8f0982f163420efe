//! The deploy of resolved machines, each phase once: for every batch of machines, host facts
//! (ssh config, sudo) → plan → check (up to date, preflight) → run. A deploy of one machine,
//! a rolling deploy and a streamed fleet differ only in which machines go into a batch and
//! when ([`Deployment::rollout`], [`Deployment::stream`]); each batch goes through
//! [`Deployment::batch`]. The command layer parses flags, evaluates, calls this and renders
//! the reports.

mod hosts;
mod stream;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::boundary::MachineName;
use crate::connection::Connections;
use crate::error::Error;
use crate::execute::{Logs, MachineReport, Outcome, RunOptions, run_plan};
use crate::plan::{DeployPlan, PlanContext, plan_deploy};
use crate::progress::Progress;
use crate::resolve::{ResolvedMachine, describe_build, describe_forward_agent, describe_target};
use crate::ssh::SshHost;

pub use hosts::{
    check_relay, host_key_none_warning, own_ssh_settings, run_id, workstation_identity,
};
pub use stream::{STREAM_MAX_WAIT, STREAM_WINDOW};

/// How the run goes, from the command line; fixed for the whole run.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Deploy a target that runs this system already again (`--reactivate`).
    pub reactivate: bool,
    /// Check every hop before anything is built (not `--no-preflight`).
    pub preflight: bool,
    /// Copies and activations at once; `--fail-fast`.
    pub run: RunOptions,
    /// A rolling deploy stops after a batch with more failed machines (`--max-failures`).
    pub max_failures: usize,
    /// Live lines on a terminal, rather than a line per event.
    pub live: bool,
    /// Every command and its output (`-v`).
    pub verbose: bool,
}

/// One run of a deploy: what every batch shares.
pub struct Deployment {
    settings: Settings,
    /// The plan's context before any host was asked anything.
    base: PlanContext,
    connections: Connections,
    logs: Logs,
    /// One sudo prompt at a time; the password is asked once for the run.
    sudo_turn: Mutex<()>,
    /// Every problem the preflight found, in the order found, and the log that holds them.
    preflight: Mutex<(Vec<Error>, Option<std::path::PathBuf>)>,
    /// A machine failed, with `--fail-fast`: no batch starts a copy or activation after it.
    failed: std::sync::atomic::AtomicBool,
}

impl Deployment {
    /// A run with `settings`, planned from `base` (its run id names the logs), over
    /// `connections`.
    pub fn new(settings: Settings, base: PlanContext, connections: Connections) -> Deployment {
        let logs = Logs::create(&base.run_id);
        Deployment {
            settings,
            base,
            connections,
            logs,
            sudo_turn: Mutex::new(()),
            preflight: Mutex::new((Vec::new(), None)),
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.base.run_id
    }

    /// The run's logs.
    pub fn logs(&self) -> &Logs {
        &self.logs
    }

    /// Every problem the preflight found, and the log that holds them all.
    pub fn preflight_problems(&self) -> (Vec<Error>, Option<std::path::PathBuf>) {
        self.preflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Rolling deploy (or a single batch): the batches one after the other; after a failed
    /// canary (the first `canaries` machines), more than `--max-failures` failed machines or
    /// Ctrl-C, the batches left are not started. An error that stops the first batch from
    /// starting (sudo) ends the run.
    pub fn rollout(
        &self,
        batches: &[Vec<ResolvedMachine>],
        canaries: usize,
    ) -> Result<Vec<MachineReport>, Error> {
        if self.base.copy_via_workstation {
            check_relay(batches.iter().flatten())?;
        }
        let mut reports = Vec::new();
        for (b, batch) in batches.iter().enumerate() {
            if batches.len() > 1 {
                let names: Vec<&str> = batch.iter().map(|m| m.name.as_str()).collect();
                crate::progress::line(&format!(
                    "Batch {} of {}{}: {}",
                    b + 1,
                    batches.len(),
                    if b == 0 && canaries > 0 {
                        " (canary)"
                    } else {
                        ""
                    },
                    names.join(", ")
                ));
            }
            let names: Vec<String> = batch.iter().map(|m| m.name.to_string()).collect();
            let progress = Progress::new(&names, self.settings.live, self.settings.verbose);
            let done = self.batch(None, batch.clone(), &progress, &names);
            progress.close();
            match done {
                Ok(done) => reports.extend(done),
                Err(error) if reports.is_empty() => return Err(error),
                Err(error) => reports.extend(failed_all(batch, &error)),
            }
            let failures = reports
                .iter()
                .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
                .count();
            let canary_failed = b == 0 && canaries > 0 && failures > 0;
            if b + 1 < batches.len()
                && (canary_failed
                    || failures > self.settings.max_failures
                    || crate::interrupt::requested())
            {
                let why = if canary_failed {
                    "the canary failed".to_string()
                } else if crate::interrupt::requested() {
                    "interrupted".to_string()
                } else {
                    format!(
                        "{failures} machine(s) failed, more than --max-failures {}",
                        self.settings.max_failures
                    )
                };
                crate::progress::line(&format!("Rollout stopped after batch {}: {why}.", b + 1));
                for m in batches[b + 1..].iter().flatten() {
                    reports.push(MachineReport::not_run(
                        &m.name,
                        m.target.value.to_string(),
                        Outcome::NotStarted(format!(
                            "the rollout stopped after batch {}: {why}",
                            b + 1
                        )),
                    ));
                }
                break;
            }
        }
        Ok(reports)
    }

    /// One batch: host facts (ssh config, sudo) → plan → up to date → preflight → run.
    /// `number` names its builders' temporary directories apart from concurrent batches';
    /// `progress` shows the machines `all` (this batch's among them). A machine the
    /// preflight finds a problem with fails alone. Err: the batch could not start (sudo, the
    /// relay's ports).
    pub fn batch(
        &self,
        number: Option<u8>,
        machines: Vec<ResolvedMachine>,
        progress: &Progress,
        all: &[String],
    ) -> Result<Vec<MachineReport>, Error> {
        self.batch_then(number, machines, progress, all, None)
    }

    /// [`Deployment::batch`], saying on `checked` when its checks (up to date, preflight) are
    /// over, whatever their outcome: a streamed fleet checks its next batch then.
    fn batch_then(
        &self,
        number: Option<u8>,
        machines: Vec<ResolvedMachine>,
        progress: &Progress,
        all: &[String],
        checked: Option<std::sync::mpsc::Sender<()>>,
    ) -> Result<Vec<MachineReport>, Error> {
        // Sends on `checked` when dropped: on every way out of the checks.
        struct Checked(Option<std::sync::mpsc::Sender<()>>);
        impl Drop for Checked {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(());
                }
            }
        }
        let checked = Checked(checked);
        let position = |name: &str| all.iter().position(|n| n == name);
        let mut ctx = self.base.clone();
        ctx.batch = number;
        // When each batch's checks began and ended, in the run's log.
        let label = number.map_or_else(|| "batch".to_string(), |b| format!("batch {b}"));
        let names = machines.iter().map(|m| m.name.as_str()).collect::<Vec<_>>();
        self.logs.write(
            "checks",
            &format!(
                "{} [{label}] checks: begin ({})\n",
                crate::execute::timestamp(),
                names.join(", ")
            ),
        );
        if ctx.copy_via_workstation {
            check_relay(machines.iter())?;
        }
        (ctx.own_control_path, ctx.own_keepalive) = own_ssh_settings(&machines);
        ctx.sudo_password = self.sudo(&machines, &ctx)?;
        if crate::interrupt::requested() {
            return Err(crate::error::interrupted("before the deploy began"));
        }
        let mut plan = plan_deploy(machines, &ctx);
        let mut reports = Vec::new();
        // Machines whose target runs this very system have nothing to do (unless a
        // specialisation of it is asked for: the target may run the system itself).
        let mut lacking = BTreeSet::new();
        let mut answered = BTreeMap::new();
        if !self.settings.reactivate && ctx.specialisation.is_none() {
            // The preflight's probes of the targets go with it: one round trip each.
            let also = if self.settings.preflight {
                crate::preflight::target_probes(&plan, &ctx)
            } else {
                BTreeMap::new()
            };
            let checked = up_to_date(&plan, &self.connections, &self.logs, &also);
            answered = checked.answered;
            lacking = checked.lacking;
            for report in checked.reports {
                crate::progress::line(&format!(
                    "{}: up to date: {} runs this system already (--reactivate switches to it again)",
                    report.name, report.target
                ));
                if progress.is_live()
                    && let Some(i) = position(&report.name)
                {
                    progress.finish(i, true, "up to date");
                }
                reports.push(report);
            }
            if checked.rest.is_empty() {
                return Ok(reports);
            }
            if checked.rest.len() < plan.machines.len() {
                plan = plan_deploy(checked.rest, &ctx);
            }
        }
        announce(&plan, &ctx);
        if self.settings.preflight {
            let (good, failed) = self.preflight(&plan, &mut ctx, progress, all, &answered);
            reports.extend(failed);
            if good.is_empty() {
                return Ok(reports);
            }
            // Planned again: without the machines the preflight failed, and with what the
            // build hosts said of their max-jobs (how many builds run at once).
            plan = plan_deploy(good, &ctx);
        }
        self.logs.write(
            "checks",
            &format!(
                "{} [{label}] checks: over ({} to deploy)\n",
                crate::execute::timestamp(),
                plan.machines.len()
            ),
        );
        drop(checked);
        let names: Vec<String> = plan
            .machines
            .iter()
            .map(|m| m.machine.name.to_string())
            .collect();
        let progress = progress.subset(all, &names);
        reports.extend(run_plan(
            &plan,
            &self.connections,
            &self.logs,
            &progress,
            self.settings.run,
            &lacking,
            &self.failed,
        ));
        Ok(reports)
    }

    /// Which targets need a sudo password (connection keys); the password is asked for (and,
    /// with the preflight, tried) the first time one does. `build` runs nothing as root on a
    /// target.
    fn sudo(
        &self,
        machines: &[ResolvedMachine],
        ctx: &PlanContext,
    ) -> Result<BTreeSet<String>, Error> {
        if !ctx.activation.action.reaches_target() {
            return Ok(BTreeSet::new());
        }
        let _turn = self.sudo_turn.lock().unwrap_or_else(|e| e.into_inner());
        let targets: Vec<(String, SshHost)> = machines
            .iter()
            .map(|m| (m.name.to_string(), ctx.ssh_host(&m.target.value, false)))
            .collect();
        let needs = crate::sudo::needs_password(&targets, &self.connections)?;
        if !needs.is_empty() && !crate::execute::has_sudo_password() {
            let password = crate::sudo::read_password(&needs)?;
            if self.settings.preflight {
                crate::sudo::check_password(&targets, &needs, &password, &self.connections)?;
            }
            crate::execute::set_sudo_password(password);
        }
        Ok(needs)
    }

    /// Checks every hop of `plan`'s machines: the machines without a problem, and a failed
    /// report for each machine with one. Sets what the build hosts said of their max-jobs.
    fn preflight(
        &self,
        plan: &DeployPlan,
        ctx: &mut PlanContext,
        progress: &Progress,
        all: &[String],
        answered: &BTreeMap<String, BTreeMap<String, (i32, String)>>,
    ) -> (Vec<ResolvedMachine>, Vec<MachineReport>) {
        progress.event("Preflight: checking every hop…");
        if progress.is_live() {
            for m in &plan.machines {
                if let Some(i) = all.iter().position(|n| *n == m.machine.name.as_str()) {
                    progress.stage(i, "preflight");
                }
            }
        }
        let findings = crate::preflight::run(plan, ctx, &self.connections, answered);
        ctx.builder_max_jobs = findings.max_jobs;
        if findings.problems.is_empty() {
            progress.event("Preflight: all hops ok.");
        }
        // Every failure names where its full output is.
        let text: String = findings
            .problems
            .iter()
            .map(|(_, p)| format!("{p}\n\n"))
            .collect();
        let log = (!text.is_empty())
            .then(|| self.logs.write("preflight", &text))
            .flatten();
        for (_, problem) in &findings.problems {
            crate::progress::line(&format!("\n{problem}"));
        }
        let with_problem = |name: &MachineName| {
            findings
                .problems
                .iter()
                .find(|(m, _)| m == name)
                .map(|(_, p)| p)
        };
        let mut good = Vec::new();
        let mut failed = Vec::new();
        for m in &plan.machines {
            let m = &m.machine;
            match with_problem(&m.name) {
                None => good.push(m.clone()),
                Some(problem) => {
                    if let Some(i) = all.iter().position(|n| *n == m.name.as_str()) {
                        progress.finish(i, false, "preflight failed");
                    }
                    failed.extend(failed_all(std::slice::from_ref(m), problem));
                }
            }
        }
        let mut found = self.preflight.lock().unwrap_or_else(|e| e.into_inner());
        found
            .0
            .extend(findings.problems.into_iter().map(|(_, p)| p));
        found.1 = found.1.take().or(log);
        (good, failed)
    }
}

impl Drop for Deployment {
    /// The run is over: its sudo password is wiped from memory.
    fn drop(&mut self) {
        crate::execute::forget_sudo_password();
    }
}

/// A failed report with `error` for each of `machines`.
fn failed_all(machines: &[ResolvedMachine], error: &Error) -> Vec<MachineReport> {
    machines
        .iter()
        .map(|m| {
            MachineReport::not_run(
                &m.name,
                m.target.value.to_string(),
                Outcome::Failed(error.clone()),
            )
        })
        .collect()
}

/// What the up-to-date check left.
struct Checked {
    /// The machines with nothing to do.
    reports: Vec<MachineReport>,
    /// The machines to deploy.
    rest: Vec<ResolvedMachine>,
    /// Targets without the target-state record (see [`crate::execute::up_to_date`]).
    lacking: BTreeSet<String>,
    /// The preflight's probes the targets answered in the same round trip.
    answered: BTreeMap<String, BTreeMap<String, (i32, String)>>,
}

/// Splits off the machines with nothing to do ([`crate::execute::up_to_date`]). A machine
/// whose target runs the system but has an activation that an earlier run left unconfirmed
/// is not up to date: it gets a line, and it is deployed again.
fn up_to_date(
    plan: &DeployPlan,
    connections: &Connections,
    logs: &Logs,
    also: &BTreeMap<String, Vec<(String, crate::ssh::Invocation)>>,
) -> Checked {
    let checked = crate::execute::up_to_date(plan, connections, logs, also);
    for (&i, runs) in &checked.pending {
        let m = &plan.machines[i].machine;
        let runs = if runs.iter().any(|r| r == "unknown") {
            "whose records this user cannot read".to_string()
        } else {
            format!("of run {}", runs.join(", "))
        };
        crate::progress::line(&format!(
            "{}: not up to date: {} has an activation {runs} that was never confirmed (its watchdog would roll it back): deploying takes it over and confirms",
            m.name, m.target.value
        ));
    }
    let mut reports = Vec::new();
    let mut rest = Vec::new();
    let lacking = checked
        .lacking
        .iter()
        .map(|&i| plan.machines[i].machine.name.to_string())
        .collect();
    for (i, m) in plan.machines.iter().enumerate() {
        if checked.up_to_date.contains(&i) {
            reports.push(MachineReport::not_run(
                &m.machine.name,
                m.machine.target.value.to_string(),
                Outcome::UpToDate,
            ));
        } else {
            rest.push(m.machine.clone());
        }
    }
    Checked {
        reports,
        rest,
        lacking,
        answered: checked.answered,
    }
}

/// Before anything runs: where each machine goes and builds, and why; the agent and
/// `--host-key-check none` warnings.
fn announce(plan: &DeployPlan, ctx: &PlanContext) {
    if ctx.host_key_check == crate::ssh::HostKeyCheck::None {
        crate::progress::line(&host_key_none_warning(plan));
    }
    for machine in &plan.machines {
        crate::progress::line(&describe_target(&machine.machine));
        crate::progress::line(&describe_build(&machine.machine));
        if let Some(warning) = describe_forward_agent(&machine.machine) {
            crate::progress::line(&warning);
        }
    }
}

/// `--dry-run`: the plan the real run would start from (its hosts' own ssh settings
/// asked), and every warning the real run would give.
pub fn preview(machines: Vec<ResolvedMachine>, base: &PlanContext) -> Result<DeployPlan, Error> {
    if base.copy_via_workstation {
        check_relay(machines.iter())?;
    }
    let mut ctx = base.clone();
    (ctx.own_control_path, ctx.own_keepalive) = own_ssh_settings(&machines);
    let plan = plan_deploy(machines, &ctx);
    if ctx.host_key_check == crate::ssh::HostKeyCheck::None {
        crate::progress::line(&host_key_none_warning(&plan));
    }
    for machine in &plan.machines {
        if let Some(warning) = describe_forward_agent(&machine.machine) {
            crate::progress::line(&warning);
        }
    }
    Ok(plan)
}

/// The batches of a rolling deploy: everything at once; or the canaries alone first, then
/// the others in batches of `batch_size` machines. Returns the batches and how many canaries lead.
pub fn rollout_batches(
    machines: &[ResolvedMachine],
    canary: &[String],
    batch_size: Option<usize>,
) -> Result<(Vec<Vec<ResolvedMachine>>, usize), Error> {
    for name in canary {
        if !machines.iter().any(|m| m.name.as_str() == name) {
            return Err(Error::usage(format!(
                "the canary {name:?} (from --canary) is not one of the machines being deployed"
            )));
        }
    }
    let (first, rest): (Vec<ResolvedMachine>, Vec<ResolvedMachine>) = machines
        .iter()
        .cloned()
        .partition(|m| canary.iter().any(|c| c == m.name.as_str()));
    let mut batches = Vec::new();
    let canaries = first.len();
    if !first.is_empty() {
        batches.push(first);
    }
    match batch_size {
        Some(size) => {
            batches.extend(rest.chunks(size.max(1)).map(<[ResolvedMachine]>::to_vec));
        }
        None if !rest.is_empty() => batches.push(rest),
        None => {}
    }
    Ok((batches, canaries))
}
