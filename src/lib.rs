//! `clan`: deploy NixOS machines, evaluating on the workstation and building on a separate
//! build host that copies the closure to the target over its own ssh connection.
//!
//! Data flows one way: [`cli`] → [`eval`] → [`resolve`] → [`plan`] → [`execute`] → report,
//! with [`diagnostics`] turning failures into the guide's troubleshooting cases.

pub mod activate;
pub mod boundary;
pub mod cli;
pub mod commands;
pub mod connection;
pub mod deploy;
pub mod diagnostics;
pub mod error;
pub mod eval;
pub mod execute;
pub mod hint;
pub mod host;
pub mod interrupt;
pub mod nixlog;
pub mod output;
pub mod plan;
pub mod preflight;
pub mod process;
pub mod progress;
pub mod report;
pub mod resolve;
pub mod select;
pub mod ssh;
pub mod sudo;
pub mod vars;
