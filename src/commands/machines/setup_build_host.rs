//! `clan machines setup-build-host`: the guide's recommended way to authenticate the second
//! hop, done for the user.
//!
//! 1. The build host gets a key of its own, unless it has one (never overwritten): the
//!    target address's `IdentityFile`, else `~/.ssh/id_ed25519`.
//! 2. Its public key is authorized for the target's user on the target, once.
//! 3. The target's host key, as the build host sees it (`ssh-keyscan` there), is added to
//!    the build host's known_hosts, only if it matches a key this workstation already trusts
//!    for the target: a key that differs stops everything before any change.
//!
//! Everything is looked at first (read-only), then the changes are made; `--dry-run` stops
//! after printing them.

use std::collections::BTreeSet;
use std::process::Command;

use crate::cli::SetupBuildHostArgs;
use crate::commands::machines::load_machine;
use crate::error::{Error, ExitKind, Hint};
use crate::host::HostAddress;
use crate::resolve::BuildLocation;
use crate::ssh::{Invocation, RemoteCommand, SshHost, parse_probes, run_remote};

/// The hosts' side of the command (`src/scripts/setup-build-host.sh`).
const SETUP_BUILD_HOST: &str = include_str!("../../scripts/setup-build-host.sh");

/// `clan-setup-build-host COMMAND ARGS…` as one invocation.
fn script(command: &str, args: &[&str]) -> Invocation {
    let mut argv = vec!["-c", SETUP_BUILD_HOST, "clan-setup-build-host", command];
    argv.extend_from_slice(args);
    Invocation::new("sh", argv)
}

/// Runs the command; returns the exit code.
pub fn run(args: &SetupBuildHostArgs) -> Result<ExitKind, Error> {
    let machine = &load_machine(&args.hosts, &args.machine)?;
    let name = &machine.name;
    let BuildLocation::Remote(builder_address) = &machine.build.value else {
        return Err(Error::usage(format!(
            "{name} has no separate build host ({}): there is no second hop to set up",
            machine.build.source
        ))
        .hint(Hint::text(
            "set inventory.machines.<name>.deploy.buildHost, or pass --build-host",
        )));
    };
    let builder = SshHost::new(builder_address.clone(), args.connect.host_key_check);
    let target = SshHost::new(machine.target.value.clone(), args.connect.host_key_check);
    let key_file = target
        .address
        .options
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("IdentityFile"))
        .map_or("~/.ssh/id_ed25519".to_string(), |(_, v)| v.clone());
    let known_name = known_hosts_name(&target.address);

    // Look: the build host's key, whether it knows the target, what key it sees there.
    let looked = run_remote(
        &builder,
        &RemoteCommand::Probes(vec![
            ("key".into(), script("key-show", &[&key_file])),
            (
                "known".into(),
                Invocation::new("ssh-keygen", ["-F", &known_name]),
            ),
            (
                "scan".into(),
                Invocation::new(
                    "ssh-keyscan",
                    [
                        "-T",
                        "10",
                        "-p",
                        &target.address.port.unwrap_or(22).to_string(),
                        &target.address.host,
                    ],
                ),
            ),
        ]),
    )
    .map_err(|e| Error::new(format!("cannot run ssh: {e}")))?;
    let probes = parse_probes(&String::from_utf8_lossy(&looked.stdout));
    let Some((key_status, key_out)) = probes.get("key") else {
        return Err(Error::new(format!(
            "cannot log in to the build host {builder_address} from this workstation"
        ))
        .detail(String::from_utf8_lossy(&looked.stderr)));
    };
    let existing_key = match key_status {
        0 => Some(parse_public_key(key_out.trim()).ok_or_else(|| {
            Error::new(format!(
                "the key {key_file} on the build host {builder_address} is not an ssh public key"
            ))
        })?),
        _ => None,
    };
    let builder_knows_target = probes
        .get("known")
        .is_some_and(|(s, o)| *s == 0 && !o.trim().is_empty());

    // The keys this workstation trusts for the target, and those the build host sees.
    let trusted = workstation_trusted_keys(&target.address);
    if trusted.is_empty() && !builder_knows_target {
        return Err(Error::new(format!(
            "this workstation has no known host key for the target {}, so there is nothing to verify the build host's view against",
            target.address
        ))
        .hint(Hint::text(format!(
            "connect once from here and check the key: ssh {}",
            target.address.destination()
        ))));
    }
    let scanned: Vec<String> = probes
        .get("scan")
        .map(|(_, out)| {
            out.lines()
                .filter(|l| !l.starts_with('#') && l.split_whitespace().count() >= 3)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let matching: Vec<String> = scanned
        .iter()
        .filter(|line| {
            let mut f = line.split_whitespace().skip(1);
            let (Some(kind), Some(blob)) = (f.next(), f.next()) else {
                return false;
            };
            trusted.contains(&(kind.to_string(), blob.to_string()))
        })
        .cloned()
        .collect();
    if !builder_knows_target && matching.is_empty() {
        let mut error = if scanned.is_empty() {
            Error::new(format!(
                "the build host {builder_address} cannot fetch the host key of the target {} (ssh-keyscan found none)",
                target.address
            ))
        } else {
            Error::new(format!(
                "the target's host key as the build host {builder_address} sees it differs from the one this workstation trusts for {}: not changing anything",
                target.address
            ))
            .hint(Hint::text(
                "someone may be between the build host and the target; check the target's key before trusting it",
            ))
        };
        error = error.detail(scanned.join("\n"));
        return Err(error);
    }

    // Plan the changes.
    let mut changes: Vec<(String, RemoteCommand, &SshHost)> = Vec::new();
    let public_key = match &existing_key {
        Some(key) => key.clone(),
        None => {
            changes.push((
                format!("build host {builder_address}: create the key {key_file}"),
                RemoteCommand::Run(script(
                    "key-create",
                    &[&key_file, &format!("clan-build-host-for-{name}")],
                )),
                &builder,
            ));
            String::new() // read after it is created
        }
    };
    if !builder_knows_target {
        let lines: Vec<&str> = matching.iter().map(String::as_str).collect();
        changes.push((
            format!(
                "build host {builder_address}: add the target's verified host key to ~/.ssh/known_hosts ({})",
                matching
                    .iter()
                    .filter_map(|l| l.split_whitespace().nth(1))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            RemoteCommand::Run(script("known-add", &lines)),
            &builder,
        ));
    }

    let mut changed = Vec::new();
    let mut would_change = Vec::new();
    for (what, command, host) in &changes {
        if args.dry_run {
            would_change.push(what.clone());
            continue;
        }
        let out =
            run_remote(host, command).map_err(|e| Error::new(format!("cannot run ssh: {e}")))?;
        if !out.status.success() {
            return Err(Error::new(format!("{what}: failed")).detail(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        changed.push(what.clone());
    }

    // The public key: known now, or read back from the key just created.
    let public_key = if public_key.is_empty() && !args.dry_run {
        let out = run_remote(
            &builder,
            &RemoteCommand::Run(script("key-show", &[&key_file])),
        )
        .map_err(|e| Error::new(format!("cannot run ssh: {e}")))?;
        parse_public_key(String::from_utf8_lossy(&out.stdout).trim()).ok_or_else(|| {
            Error::new(format!(
                "cannot read the new public key {key_file}.pub on the build host {builder_address}"
            ))
        })?
    } else {
        public_key
    };

    // Authorize it on the target, once (compared by key, whatever options a line has).
    let target_user = target.address.user.as_deref().unwrap_or("root");
    let authorize_what = format!(
        "target {}: authorize the build host's key for {target_user} in ~/.ssh/authorized_keys",
        target.address
    );
    if public_key.is_empty() {
        would_change.push(authorize_what);
    } else {
        let blob = public_key
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        // Only reads unless the key is absent and this is not a dry run.
        let authorize = RemoteCommand::Run(script(
            "authorize",
            &[
                &public_key,
                &blob,
                if args.dry_run { "dry" } else { "apply" },
            ],
        ));
        let out = run_remote(&target, &authorize)
            .map_err(|e| Error::new(format!("cannot run ssh: {e}")))?;
        let said = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(Error::new(format!("{authorize_what}: failed"))
                .detail(format!("{said}{}", String::from_utf8_lossy(&out.stderr))));
        }
        match said.trim() {
            "added" => changed.push(authorize_what),
            "absent" => would_change.push(authorize_what),
            _ => {}
        }
    }

    if args.dry_run {
        if would_change.is_empty() {
            println!(
                "{name}: nothing to change: the build host is already set up to reach the target"
            );
        } else {
            println!("{name}: would change (dry run, nothing changed):");
            for what in &would_change {
                println!("  {what}");
            }
        }
    } else if changed.is_empty() {
        println!("{name}: nothing to change: the build host is already set up to reach the target");
    } else {
        println!("{name}: changed:");
        for what in &changed {
            println!("  {what}");
        }
    }
    Ok(ExitKind::Success)
}

/// The name the build host's ssh looks the target up by in known_hosts.
fn known_hosts_name(address: &HostAddress) -> String {
    match address.port {
        Some(port) if port != 22 => format!("[{}]:{port}", address.host),
        _ => address.host.clone(),
    }
}

/// A one-line ssh public key (`type base64 [comment]`), or `None`.
fn parse_public_key(line: &str) -> Option<String> {
    let line = line.lines().next()?.trim();
    let mut fields = line.split_whitespace();
    let kind = fields.next()?;
    let blob = fields.next()?;
    let plausible =
        (kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
            && blob
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
    plausible.then(|| line.to_string())
}

/// (type, key) pairs this workstation trusts for `address`, from the known_hosts files its
/// ssh config names (`ssh -G`), hashed entries included.
fn workstation_trusted_keys(address: &HostAddress) -> BTreeSet<(String, String)> {
    let name = known_hosts_name(address);
    let mut files = Vec::new();
    for (keyword, list) in crate::resolve::SshConfigLookup::settings(address) {
        if keyword == "userknownhostsfile" || keyword == "globalknownhostsfile" {
            files.extend(list.split_whitespace().map(expand_home));
        }
    }
    let mut keys = BTreeSet::new();
    for file in files {
        let Ok(out) = crate::process::run(
            Command::new("ssh-keygen").args(["-F", &name, "-f", &file]),
            None,
        ) else {
            continue;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            // [@marker] hosts type key [comment]; a revoked key is no trust.
            let fields = match fields.first() {
                Some(&"@revoked") => continue,
                Some(m) if m.starts_with('@') => &fields[1..],
                _ => &fields[..],
            };
            if let [_, kind, blob, ..] = fields {
                keys.insert((kind.to_string(), blob.to_string()));
            }
        }
    }
    keys
}

fn expand_home(path: &str) -> String {
    match (path.strip_prefix("~/"), std::env::var("HOME")) {
        (Some(rest), Ok(home)) => format!("{home}/{rest}"),
        _ => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_keys_are_checked() {
        assert!(parse_public_key("ssh-ed25519 AAAAC3Nza+/= root@b").is_some());
        assert!(parse_public_key("ssh-ed25519 AAAA$(id)").is_none());
        assert!(parse_public_key("not a key").is_none());
        assert!(parse_public_key("").is_none());
    }

    #[test]
    fn known_hosts_names_carry_non_default_ports() {
        assert_eq!(known_hosts_name(&"root@t".parse().unwrap()), "t");
        assert_eq!(known_hosts_name(&"root@t:22".parse().unwrap()), "t");
        assert_eq!(
            known_hosts_name(&"root@t:2222".parse().unwrap()),
            "[t]:2222"
        );
    }
}
