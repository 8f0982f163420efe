//! Failure classification: turns a failed step's output into the guide's troubleshooting
//! case, with the fix. Matches what both Nix 2.8 (`cannot connect to '…'`) and current Nix
//! (`failed to start SSH connection to '…'`) print.

use std::sync::LazyLock;

use regex::Regex;

use crate::activate::{Exit, Word};
use crate::error::{Error, ExitKind, Hint};
use crate::plan::{Role, Runner, Step, StepKind};
use crate::resolve::{BuildLocation, ResolvedMachine};

/// The ssh-level reasons a connection fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshFailure {
    /// `Host key verification failed.`: no known key.
    HostKey,
    /// `REMOTE HOST IDENTIFICATION HAS CHANGED`: a known key differs (impersonation?).
    ChangedHostKey,
    /// `Permission denied (publickey…)`
    PermissionDenied,
    /// Refused, timed out, unresolvable or unroutable.
    Unreachable,
    /// Connected, then no answer to ssh's keep-alives: the host or the network went away.
    StoppedAnswering,
}

/// Finds the ssh failure in a command's output, if there is one.
pub fn ssh_failure(output: &str) -> Option<SshFailure> {
    if output.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") {
        Some(SshFailure::ChangedHostKey)
    } else if output.contains("Host key verification failed") {
        Some(SshFailure::HostKey)
    } else if output.contains("Permission denied (") {
        Some(SshFailure::PermissionDenied)
    } else if output.contains(" not responding.") {
        Some(SshFailure::StoppedAnswering)
    } else if [
        "Connection refused",
        "Connection timed out",
        "Could not resolve hostname",
        "No route to host",
        "Network is unreachable",
    ]
    .iter()
    .any(|m| output.contains(m))
    {
        Some(SshFailure::Unreachable)
    } else {
        None
    }
}

/// The two systems of an architecture mismatch: (required, build host's).
pub fn system_mismatch(output: &str) -> Option<(String, String)> {
    // Nix 2.8 … 2.2x: "a 'x86_64-linux' with features {} is required to build '…', but I am a 'aarch64-linux' …"
    static OLD: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"a '([^']+)' with features \{[^}]*\} is required to build '[^']*', but I am a '([^']+)'")
            .expect("valid regex")
    });
    // Newer Nix: "Required system: 'x86_64-linux' …" / "Current system: 'aarch64-linux' …"
    static NEW_REQUIRED: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"Required system: '([^']+)'").expect("valid regex"));
    static NEW_CURRENT: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"Current system: '([^']+)'").expect("valid regex"));
    if let Some(c) = OLD.captures(output) {
        return Some((c[1].to_string(), c[2].to_string()));
    }
    let required = NEW_REQUIRED.captures(output)?;
    let current = NEW_CURRENT.captures(output)?;
    Some((required[1].to_string(), current[1].to_string()))
}

/// The last lines of `output`, which is where Nix and ssh say what went wrong.
fn tail(output: &str, lines: usize) -> String {
    let all: Vec<&str> = output.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Explains why `step` of `machine` failed with `output` and exit `code`.
pub fn diagnose(machine: &ResolvedMachine, step: &Step, output: &str, code: Option<i32>) -> Error {
    let name = &machine.name;
    let target = &machine.target.value;
    let builder = match &machine.build.value {
        BuildLocation::Remote(addr) => addr.to_string(),
        BuildLocation::Local => "this machine".into(),
        BuildLocation::Target => target.to_string(),
    };
    let exit = if step.kind.changes_target_system() {
        ExitKind::PartiallyApplied
    } else {
        ExitKind::DeployFailed
    };
    let detail = tail(output, 15);
    let base = |message: String| Error::new(message).detail(detail.clone()).exit(exit);
    let asked_target = matches!(step.kind, StepKind::Confirm | StepKind::SwitchOutcome);
    let said = Exit::from_code(code);
    if asked_target && said == Some(Exit::RolledBack) {
        let rolled = Word::RolledBack
            .find(output)
            .map(|l| l.strip_prefix("profile ").unwrap_or(l))
            .and_then(|l| l.split_once(' '))
            .map(|(generation, path)| format!("generation {generation} ({path})"))
            .unwrap_or_else(|| "the previous generation".into());
        let before = if step.kind == StepKind::SwitchOutcome {
            "this deploy reached it again after its lost session"
        } else {
            "the confirmation arrived"
        };
        return base(format!(
            "{name}: the target's watchdog rolled back before {before}: it is back on {rolled}"
        ))
        .hint(Hint::text(
            "nothing more is needed to undo this deploy (no clan machines rollback: that would go one generation further back); to deploy it again, give the confirmation more time with --rollback-timeout",
        ))
        .code("activation.rolled-back-by-watchdog");
    }
    if asked_target && said == Some(Exit::NotPending) {
        return base(format!(
            "{name}: the target no longer knows this activation: another deploy took it over before it was confirmed"
        ))
        .hint(Hint::text(
            "deploys of one machine wait for each other's lock; check who else deploys it, then re-deploy",
        ))
        .code("activation.taken-over");
    }
    if step.kind == StepKind::LockTarget && said == Some(Exit::LockBusy) {
        let holder = Word::Busy
            .find(output)
            .map(describe_holder)
            .unwrap_or_else(|| "another deploy".into());
        return base(format!(
            "{name}: {target} is being deployed by {holder}; nothing was changed on it"
        ))
        .exit(ExitKind::DeployFailed)
        .hint(Hint::text(
            "wait for that deploy to end and run this one again, or wait longer with --lock-timeout SECONDS",
        ))
        .code("lock.busy");
    }
    if matches!(step.kind, StepKind::Prepare | StepKind::Switch) && said == Some(Exit::LockLost) {
        return base(format!(
            "{name}: this deploy no longer holds the deploy lock of {target}: the target heard nothing from this workstation for {} s and let it go",
            crate::activate::LOCK_STALE.as_secs()
        ))
        .hint(Hint::text(
            "another deploy may have taken the target since; check it (clan machines show, or on the target), then re-deploy",
        ))
        .code("lock.lost");
    }
    if step.kind == StepKind::Confirm {
        return base(format!(
            "{name}: cannot log in to the target {target} over a fresh ssh connection after activating the new system: it rolls back to the previous generation by itself when its watchdog's time is up"
        ))
        .hint(Hint::text(
            "the new system may have broken networking or sshd; once the target is back, check it and re-deploy",
        ))
        .code("activation.unconfirmed");
    }

    // ssh itself failed (exit 255) on the workstation's own connection to the step's host.
    let outer_ssh_failed = matches!(step.runner, Runner::Remote { .. }) && code == Some(255);
    let hop = match (step.kind, &step.runner) {
        (StepKind::NestedCopy, _) if !outer_ssh_failed => Some(Hop::BuilderToTarget),
        (StepKind::CopyDerivations, _) => Some(Hop::WorkstationTo(builder.clone())),
        (StepKind::CopyFromWorkstation, _) => Some(Hop::WorkstationTo(target.to_string())),
        (_, Runner::Remote { host, .. }) if outer_ssh_failed => {
            Some(Hop::WorkstationTo(host.address.to_string()))
        }
        _ => None,
    };
    if let (Some(hop), Some(SshFailure::StoppedAnswering)) = (&hop, ssh_failure(output)) {
        let who = match (hop, &step.runner) {
            (Hop::BuilderToTarget, _) => {
                format!("the target {target}, copying from the build host {builder},")
            }
            (
                _,
                Runner::Remote {
                    role: Role::BuildHost,
                    host,
                    ..
                },
            ) => format!("the build host {}", host.address),
            (
                _,
                Runner::Remote {
                    role: Role::Target,
                    host,
                    ..
                },
            ) => format!("the target {}", host.address),
            (Hop::WorkstationTo(host), _) => host.clone(),
        };
        let error = base(format!(
            "{name}: {who} stopped answering during the {} stage: no reply to ssh's keep-alives, so the host or the network went away",
            step.kind.stage()
        ))
        .code(match hop {
            Hop::BuilderToTarget => "second-hop.stopped-answering",
            Hop::WorkstationTo(_) => "ssh.stopped-answering",
        });
        return if step.kind.changes_target_system() {
            error.hint(Hint::text(format!(
                "the activation may have gone on there: unless this deploy confirmed it, the target's watchdog goes back to the previous generation; once it answers, check it ({}) and re-deploy",
                crate::hint::command("machines show", name.as_str(), &[])
            )))
        } else {
            error.hint(Hint::text(
                "nothing was activated on the target; once the host answers again, re-deploy",
            ))
        };
    }
    if let (Some(hop), Some(failure)) = (hop, ssh_failure(output)) {
        return ssh_error(
            name,
            &builder,
            &target.to_string(),
            &hop,
            failure,
            output,
            base,
        );
    }
    if output.contains("lacks a valid signature")
        || output.contains("lacks a signature by a trusted key")
    {
        let (host, user) = match step.kind {
            StepKind::CopyDerivations => (builder.clone(), user_of(&builder)),
            _ => (
                target.to_string(),
                target.user.clone().unwrap_or_else(|| "root".into()),
            ),
        };
        return base(format!(
            "{name}: {host} refused the copied paths: they are not signed by a key it trusts, and {user} is not a trusted Nix user there"
        ))
        .hint(Hint::text(format!(
            "make {user} a trusted user on {host}: nix.settings.trusted-users = [ \"{user}\" ];"
        )))
        .hint(Hint::text(
            "or sign the paths where they are built (secret-key-files) and add the public key to trusted-public-keys on the receiving host",
        ))
        .code("copy.not-trusted");
    }
    if let Some((required, have)) = system_mismatch(output) {
        return base(format!(
            "{name}: the build host {builder} builds {have} systems and cannot build this {required} system"
        ))
        .hint(Hint::text(format!(
            "pick a build host whose system is {required} (deploy.buildHost in the inventory, or --build-host)"
        )))
        .hint(Hint::text(format!(
            "or build on this workstation: {}",
            crate::hint::command("machines update", name.as_str(), &["--build-host", "localhost"])
        )))
        .code("build.system-mismatch");
    }
    let role_host = match &step.runner {
        Runner::Remote {
            role: Role::BuildHost,
            host,
            ..
        } => format!("build host {}", host.address),
        Runner::Remote {
            role: Role::Target,
            host,
            ..
        } => format!("target {}", host.address),
        Runner::Workstation(_) => "the workstation".to_string(),
    };
    let error = match step.kind {
        // The check names the specialisation's switch when one was asked for.
        StepKind::VerifySystem if step.command_line().contains("/specialisation/") => base(format!(
            "{name}: {} lacks the specialisation asked for with --specialisation (or is not a NixOS system); refusing to activate it on {target}",
            machine.out_path()
        ))
        .hint(Hint::text("a specialisation is a name of the machine's config.specialisation")),
        StepKind::VerifySystem => base(format!(
            "{name}: {} is not a NixOS system (it has no nixos-version or bin/switch-to-configuration); refusing to activate it on {target}",
            machine.out_path()
        ))
        .hint(Hint::text("the machine's system.build.toplevel must be a NixOS system")),
        StepKind::Realise => base(format!(
            "{name}: building {} failed on {role_host}",
            machine.drv_path()
        ))
        .hint(Hint::text("the build log is above; nothing was copied to or activated on the target")),
        StepKind::Switch => base(format!(
            "{name}: switch-to-configuration failed on {target}"
        )),
        StepKind::CacheUpload => base(format!(
            "{name}: signing the closure and copying it to the binary cache failed on {role_host}"
        ))
        .hint(Hint::text(format!(
            "if the build host has no signing key: {}; nothing was activated",
            crate::hint::command("machines setup-cache", name.as_str(), &[])
        ))),
        StepKind::CacheSubstitute => base(format!(
            "{name}: the target {target} could not substitute {} from the binary cache",
            machine.out_path()
        ))
        .hint(Hint::text(
            "the target must reach the cache and trust its key (nix.settings.trusted-public-keys); nothing was activated",
        )),
        StepKind::Prepare => base(format!(
            "{name}: preparing the activation on {target} failed (recording the current generation, arming the watchdog, setting the system profile)"
        ))
        .hint(Hint::text("the deploy user must be allowed to write /nix/var/nix/profiles and /run/clan (root, or sudo)")),
        _ => base(format!(
            "{name}: {} on {role_host} failed{}",
            step.kind.stage(),
            code.map(|c| format!(" (exit {c})")).unwrap_or_default()
        )),
    };
    error.code(step_failed_code(step.kind))
}

/// The code of a step that failed in none of the ways [`diagnose`] recognises.
fn step_failed_code(kind: StepKind) -> &'static str {
    match kind {
        StepKind::CopyDerivations => "copy.derivations-failed",
        StepKind::MakeRootDir | StepKind::RemoveRootDir => "build.root-dir-failed",
        StepKind::Realise => "build.failed",
        StepKind::CheckBuilt | StepKind::CheckPresent => "check.failed",
        StepKind::NestedCopy => "second-hop.copy-failed",
        StepKind::CopyFromWorkstation | StepKind::RelayCopy => "copy.failed",
        StepKind::CacheUpload => "cache.upload-failed",
        StepKind::CacheSubstitute => "cache.substitute-failed",
        StepKind::VerifySystem => "activation.not-nixos",
        StepKind::LockTarget => "lock.failed",
        StepKind::UploadSecrets => "vars.upload-failed",
        StepKind::Prepare => "activation.prepare-failed",
        StepKind::Switch => "activation.switch-failed",
        StepKind::Diff => "activation.diff-failed",
        StepKind::Confirm | StepKind::SwitchOutcome => "activation.unconfirmed",
        StepKind::Undo | StepKind::Revert => "activation.undo-failed",
        StepKind::HealthCheck => "health.unhealthy",
    }
}

/// Which ssh connection failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    /// The workstation's own connection to a host.
    WorkstationTo(String),
    /// The build host's connection to the target, made for the closure copy.
    BuilderToTarget,
}

/// The guide's case for an ssh `failure` on `hop`, with its fix.
pub fn ssh_error(
    name: &str,
    builder: &str,
    target: &str,
    hop: &Hop,
    failure: SshFailure,
    output: &str,
    base: impl Fn(String) -> Error,
) -> Error {
    static FINGERPRINT: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"SHA256:[A-Za-z0-9+/=]+").expect("valid regex"));
    let fingerprint = FINGERPRINT
        .find(output)
        .map_or("(not shown)", |m| m.as_str());
    let error = match (hop, failure) {
        (Hop::BuilderToTarget, SshFailure::ChangedHostKey) => base(format!(
            "{name}: the target {target} presented a different host key to the build host {builder} than the one the build host knows: someone may be impersonating the target (or it was reinstalled). The build host saw {fingerprint}"
        ))
        .hint(Hint::text(format!(
            "compare {fingerprint} with the target's real key (on its console: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub); only if it is the real one, remove the old entry on the build host: ssh {builder} 'ssh-keygen -R {target_host}'",
            target_host = host_only(target)
        ))),
        (Hop::WorkstationTo(host), SshFailure::ChangedHostKey) => base(format!(
            "{name}: {host} presented a different host key than the one this workstation knows: someone may be impersonating it (or it was reinstalled). It presented {fingerprint}"
        ))
        .hint(Hint::text(format!(
            "compare {fingerprint} with the host's real key; only if it is the real one, remove the old entry: ssh-keygen -R {}",
            host_only(host)
        ))),
        (Hop::BuilderToTarget, SshFailure::HostKey) => base(format!(
            "{name}: host key verification failed on the second hop (build host {builder} → target {target}): the build host has no known_hosts entry for the target"
        ))
        .hint(Hint::text(format!(
            "re-run with --host-key-check accept-new: it is passed to the build host's ssh, which records the target's key on first use: {}",
            crate::hint::command("machines update", name, &["--host-key-check", "accept-new"])
        )))
        .hint(Hint::text(format!(
            "or seed it by hand, after checking the key: ssh {builder} 'ssh-keyscan {target_host} >> ~/.ssh/known_hosts'",
            target_host = host_only(target)
        ))),
        (Hop::BuilderToTarget, SshFailure::PermissionDenied) => base(format!(
            "{name}: permission denied on the second hop (build host {builder} → target {target}): the build host has no key that the target accepts"
        ))
        .hint(Hint::text(format!(
            "create a key on the build host and authorize it on the target: ssh {builder} 'test -f ~/.ssh/id_ed25519 || ssh-keygen -t ed25519 -N \"\" -f ~/.ssh/id_ed25519' && ssh {builder} 'cat ~/.ssh/id_ed25519.pub' | ssh {target} 'cat >> ~/.ssh/authorized_keys'"
        )))
        .hint(Hint::text("or forward your SSH agent to the build host (see the guide's SSH Agent Forwarding section)")),
        (Hop::BuilderToTarget, SshFailure::Unreachable) => base(format!(
            "{name}: the build host {builder} cannot reach the target {target}"
        ))
        .hint(Hint::text("the build host opens its own ssh connection to the target: check that the target is reachable from the build host")),
        (Hop::WorkstationTo(host), SshFailure::HostKey) => base(format!(
            "{name}: host key verification failed for {host}: this workstation does not know its key (or it changed)"
        ))
        .hint(Hint::text(format!(
            "if the host is new, re-run with --host-key-check accept-new, or connect once with: ssh {host}"
        ))),
        (Hop::WorkstationTo(host), SshFailure::PermissionDenied) => base(format!(
            "{name}: permission denied when this workstation logs in to {host}"
        ))
        .hint(Hint::text(format!(
            "authorize one of your keys for that user on {host}, or name one with ?IdentityFile=/path/to/key in the address"
        ))),
        (Hop::WorkstationTo(host), SshFailure::Unreachable) => base(format!(
            "{name}: cannot reach {host} from this workstation"
        ))
        .hint(Hint::text("check the address, the port and that sshd runs there")),
        (Hop::WorkstationTo(host), SshFailure::StoppedAnswering) => base(format!(
            "{name}: {host} stopped answering: no reply to ssh's keep-alives"
        )),
        (Hop::BuilderToTarget, SshFailure::StoppedAnswering) => base(format!(
            "{name}: the target {target} stopped answering the build host {builder}: no reply to ssh's keep-alives"
        )),
    };
    let code = match (hop, failure) {
        (Hop::WorkstationTo(_), SshFailure::HostKey) => "ssh.host-key-unknown",
        (Hop::WorkstationTo(_), SshFailure::ChangedHostKey) => "ssh.host-key-changed",
        (Hop::WorkstationTo(_), SshFailure::PermissionDenied) => "ssh.permission-denied",
        (Hop::WorkstationTo(_), SshFailure::Unreachable) => "ssh.unreachable",
        (Hop::WorkstationTo(_), SshFailure::StoppedAnswering) => "ssh.stopped-answering",
        (Hop::BuilderToTarget, SshFailure::HostKey) => "second-hop.host-key-unknown",
        (Hop::BuilderToTarget, SshFailure::ChangedHostKey) => "second-hop.host-key-changed",
        (Hop::BuilderToTarget, SshFailure::PermissionDenied) => "second-hop.permission-denied",
        (Hop::BuilderToTarget, SshFailure::Unreachable) => "second-hop.unreachable",
        (Hop::BuilderToTarget, SshFailure::StoppedAnswering) => "second-hop.stopped-answering",
    };
    match error.code {
        Some(_) => error,
        None => error.code(code),
    }
}

fn user_of(address: &str) -> String {
    address
        .split_once('@')
        .map_or("root", |(user, _)| user)
        .to_string()
}

fn host_only(address: &str) -> &str {
    let no_user = address.rsplit_once('@').map_or(address, |(_, h)| h);
    no_user.split(['?', ':']).next().unwrap_or(no_user)
}

/// "RUN WHO SINCE" from the target's lock, for people.
pub fn describe_holder(holder: &str) -> String {
    let mut words = holder.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(run), Some(who), Some(since)) => {
            format!("run {run} from {who} (holding its lock since {since})")
        }
        _ => "another deploy".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every ssh failure on every hop has its own stable code, and its one line names the
    // machine, the hosts and what happened.
    #[test]
    fn ssh_failures_have_codes_and_wording() {
        let hops = [
            Hop::WorkstationTo("root@web".to_string()),
            Hop::BuilderToTarget,
        ];
        let failures = [
            SshFailure::HostKey,
            SshFailure::ChangedHostKey,
            SshFailure::PermissionDenied,
            SshFailure::Unreachable,
            SshFailure::StoppedAnswering,
        ];
        let mut shown = String::new();
        let mut codes = std::collections::BTreeSet::new();
        for hop in &hops {
            for failure in failures {
                let error = ssh_error(
                    "web",
                    "root@builder",
                    "root@web",
                    hop,
                    failure,
                    "SHA256:abc",
                    Error::new,
                );
                let code = error.code.expect("every ssh failure has a code");
                assert!(codes.insert(code), "{code} given twice");
                shown.push_str(&format!("{code}: {}\n", error.message));
            }
        }
        insta::assert_snapshot!(shown);
    }

    #[test]
    fn recognises_both_nix_generations() {
        let old = "error: a 'x86_64-linux' with features {} is required to build '/nix/store/x.drv', but I am a 'aarch64-linux' with features {benchmark, big-parallel}";
        assert_eq!(
            system_mismatch(old),
            Some(("x86_64-linux".into(), "aarch64-linux".into()))
        );
        let new = "error: Cannot build '/nix/store/x.drv'.\n       Reason: required system or feature not available\n       Required system: 'x86_64-linux' with features {}\n       Current system: 'aarch64-linux' with features {}";
        assert_eq!(
            system_mismatch(new),
            Some(("x86_64-linux".into(), "aarch64-linux".into()))
        );
        assert_eq!(system_mismatch("error: builder failed"), None);
    }

    #[test]
    fn recognises_ssh_failures() {
        let v28 = "Host key verification failed.\nerror: cannot connect to 'root@127.0.0.3'";
        let v226 =
            "Host key verification failed.\nerror: failed to start SSH connection to 'root@t'";
        assert_eq!(ssh_failure(v28), Some(SshFailure::HostKey));
        assert_eq!(ssh_failure(v226), Some(SshFailure::HostKey));
        assert_eq!(
            ssh_failure("root@t: Permission denied (publickey)."),
            Some(SshFailure::PermissionDenied)
        );
        assert_eq!(
            ssh_failure("ssh: connect to host t port 22: Connection refused"),
            Some(SshFailure::Unreachable)
        );
        assert_eq!(
            ssh_failure("Timeout, server 127.0.0.3 not responding.\n"),
            Some(SshFailure::StoppedAnswering)
        );
        assert_eq!(ssh_failure("error: build failed"), None);
        assert_eq!(host_only("root@t.example:22?IdentityFile=/k"), "t.example");
    }
}
