//! `clan machines …`, and what its subcommands share: evaluate the flake once, resolve hosts.

pub mod rollback;
pub mod setup_build_host;
pub mod show;
pub mod update;

use std::path::Path;

use crate::error::{Error, Hint};
use crate::eval::{MachineFacts, evaluate};
use crate::resolve::{
    Overrides, ResolvedMachine, Source, SshConfigLookup, check_machine_name, parse_address,
    resolve_machine,
};

/// A machine as the flake describes it, and with its hosts decided.
pub struct LoadedMachine {
    /// What the flake says.
    pub facts: MachineFacts,
    /// What was decided.
    pub machine: ResolvedMachine,
}

/// Checks the command line, evaluates `flake` once for `names` (all machines if empty) and
/// resolves every machine's hosts.
pub fn load_machines(
    flake: &Path,
    names: &[String],
    overrides: &Overrides,
) -> Result<Vec<LoadedMachine>, Error> {
    load_selection(flake, names, &[], overrides)
}

/// Like [`load_machines`], selecting the named machines plus those with one of `tags`.
pub fn load_selection(
    flake: &Path,
    names: &[String],
    tags: &[String],
    overrides: &Overrides,
) -> Result<Vec<LoadedMachine>, Error> {
    for name in names {
        check_machine_name(name)?;
    }
    // Check the flags' addresses before the (slow) evaluation.
    if let Some(value) = &overrides.build_host {
        parse_address(value, &Source::Flag("--build-host"))?;
    }
    if let Some(value) = &overrides.target_host {
        parse_address(value, &Source::Flag("--target-host"))?;
    }
    let flake = flake_ref(flake)?;
    eprintln!("Evaluating {flake} on this workstation…");
    let evaluation = evaluate(&flake, names, tags)?;
    if let Some(unknown) = names.iter().find(|m| !evaluation.machines.contains(m)) {
        return Err(Error::usage(format!(
            "unknown machine {unknown:?} (from the command line): the flake {flake} defines {}",
            if evaluation.machines.is_empty() {
                "no machines".to_string()
            } else {
                evaluation.machines.join(", ")
            }
        ))
        .hint(Hint::text(
            "machines come from inventory.machines and machines in clan.nix",
        )));
    }
    if let Some(tag) = tags.iter().find(|t| {
        !evaluation
            .tags
            .values()
            .any(|machine_tags| machine_tags.contains(t))
    }) {
        let mut known: Vec<&String> = evaluation.tags.values().flatten().collect();
        known.sort();
        known.dedup();
        return Err(Error::usage(format!(
            "the tag {tag:?} (from --tags) matches no machine; tags in the flake: {}",
            if known.is_empty() {
                "none".to_string()
            } else {
                known
                    .iter()
                    .map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ))
        .hint(Hint::text("tags come from inventory.machines.<name>.tags")));
    }
    let users = SshConfigLookup;
    evaluation
        .selected
        .into_iter()
        .map(|(name, facts)| {
            let machine = resolve_machine(&name, &facts, overrides, &users)?;
            Ok(LoadedMachine { facts, machine })
        })
        .collect()
}

/// The flake reference for nix: an existing local directory becomes an absolute path.
fn flake_ref(path: &Path) -> Result<String, Error> {
    if path.is_dir() {
        let abs = path.canonicalize().map_err(|e| {
            Error::usage(format!(
                "cannot open the flake directory {}: {e}",
                path.display()
            ))
        })?;
        return Ok(abs.display().to_string());
    }
    let text = path.display().to_string();
    if text.contains(':') {
        Ok(text) // a flake URL such as github:owner/repo
    } else {
        Err(Error::usage(format!(
            "the flake {text:?} (from --flake) is not a directory"
        )))
    }
}
