//! `clan machines …`. What its subcommands share (which machines, evaluated and resolved)
//! is [`crate::select`].

pub mod list;
pub mod rollback;
pub mod setup_build_host;
pub mod setup_cache;
pub mod show;
pub mod update;

pub use crate::select::*;

use crate::error::Error;
use crate::resolve::ResolvedMachine;

/// The one machine a command names (`rollback`, `setup-build-host`, `setup-cache`),
/// evaluated and resolved with the command's flake and host flags.
pub fn load_machine(hosts: &crate::cli::HostArgs, machine: &str) -> Result<ResolvedMachine, Error> {
    load_machines(
        &hosts.flake,
        &[machine.to_string()],
        &hosts.overrides(None),
        &hosts.nix_options()?,
    )?
    .into_iter()
    .next()
    .map(|loaded| loaded.machine)
    .ok_or_else(|| Error::usage(format!("unknown machine {machine:?}")))
}
