//! One module per subcommand: `clan machines update` lives in `machines/update.rs`.

pub mod machines;
pub mod ssh;
pub mod vars;
