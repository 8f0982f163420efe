//! Command-line definitions. Every flag is defined once, here; `--help` is generated from
//! these doc comments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::ssh::HostKeyCheck;

/// Deploy NixOS machines from a clan flake, optionally building on a separate build host.
#[derive(Debug, Parser)]
#[command(name = "clan", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: TopCommand,
}

/// Top-level command groups.
#[derive(Debug, Subcommand)]
pub enum TopCommand {
    /// Manage the machines of a clan.
    #[command(subcommand)]
    Machines(MachinesCommand),
}

/// `clan machines …`
#[derive(Debug, Subcommand)]
pub enum MachinesCommand {
    /// Evaluate here, build on the build host, copy to the target and activate.
    Update(UpdateArgs),
}

/// Arguments of `clan machines update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Machines to update (default: every machine of the clan).
    #[arg(value_name = "MACHINE")]
    pub machines: Vec<String>,

    /// Path of the clan flake.
    #[arg(long, value_name = "PATH", default_value = ".")]
    pub flake: PathBuf,

    /// Build on this host instead of the configured build host ('localhost': build on this machine).
    #[arg(long, value_name = "HOST")]
    pub build_host: Option<String>,

    /// Deploy to this address instead of the configured targetHost.
    #[arg(long, value_name = "HOST")]
    pub target_host: Option<String>,

    /// Host key policy for every ssh hop, the build host's own copy to the target included.
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = HostKeyCheck::Strict)]
    pub host_key_check: HostKeyCheck,

    /// Print every step with its host and exact command, then stop without running any.
    #[arg(long)]
    pub dry_run: bool,
}
