//! `--dry-run`: the plan as people read it, every step with its host and command.

use std::fmt;

use super::{DeployPlan, Step, StepKind};
use crate::resolve::{describe_build, describe_target};

impl fmt::Display for DeployPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Deploy plan (run {}, host key check: {})",
            self.run_id, self.host_key_check
        )?;
        for plan in &self.machines {
            writeln!(f, "{}", describe_target(&plan.machine))?;
            writeln!(f, "{}", describe_build(&plan.machine))?;
        }
        let print_steps = |f: &mut fmt::Formatter<'_>, steps: &[Step]| -> fmt::Result {
            let mut stage = None;
            for step in steps {
                if stage != Some(step.kind.stage()) {
                    stage = Some(step.kind.stage());
                    writeln!(f, "  {}:", step.kind.stage())?;
                }
                writeln!(
                    f,
                    "    [{}] {}{}",
                    step.host_label(),
                    step.command_line(),
                    step.when.note()
                )?;
                if step.kind == StepKind::CheckPresent {
                    writeln!(
                        f,
                        "      (exit 1: no copy; exit 0, already running it: no copy, watchdog or summary)"
                    )?;
                }
                if let Some(within) = step.retry_within {
                    writeln!(
                        f,
                        "      (retried over fresh connections for up to {} s, before the target's watchdog would roll back)",
                        within.as_secs()
                    )?;
                }
                if let Some(ask) = &step.on_lost {
                    writeln!(
                        f,
                        "      if its ssh session is lost (nothing is undone until the target says how it ended):\n        [{}] {}",
                        ask.host_label(),
                        ask.command_line()
                    )?;
                }
                if let Some(undo) = &step.on_failure {
                    let what = match step.kind {
                        StepKind::HealthCheck => "the health check fails (--rollback-on-unhealthy)",
                        _ => "it fails",
                    };
                    writeln!(
                        f,
                        "      if {what}:\n        [{}] {}",
                        undo.host_label(),
                        undo.command_line()
                    )?;
                }
            }
            Ok(())
        };
        for group in &self.groups {
            let names: Vec<&str> = group
                .members
                .iter()
                .map(|&i| self.machines[i].machine.name.as_str())
                .collect();
            writeln!(
                f,
                "\nBuild on the {} for {}:",
                group.label(),
                names.join(", ")
            )?;
            print_steps(f, &group.steps)?;
            for &i in &group.members {
                let plan = &self.machines[i];
                if plan.steps.is_empty() {
                    writeln!(f, "Then {}: nothing (built only)", plan.machine.name)?;
                    continue;
                }
                writeln!(f, "Then {}, once its system is built:", plan.machine.name)?;
                print_steps(f, &plan.steps)?;
            }
            writeln!(f, "After all of them:")?;
            print_steps(f, std::slice::from_ref(&group.cleanup))?;
        }
        Ok(())
    }
}
