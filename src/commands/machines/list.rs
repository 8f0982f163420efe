//! `clan machines list`: the clan's machines (with `--tags`, those having every tag), one
//! per line with their tags, as clan-core lists them; no machine's configuration is
//! evaluated.

use crate::cli::ListArgs;
use crate::error::{Error, ExitKind};

/// Runs the command; returns the exit code.
pub fn run(args: &ListArgs) -> Result<ExitKind, Error> {
    let overrides = args.hosts.overrides(None);
    let flake = super::check_command_line(&args.hosts.flake, &[], &args.tags, &overrides)?;
    let index = crate::eval::evaluate_index(&flake, &args.tags, &args.hosts.nix_options()?)?;
    let rows: Vec<(String, Vec<String>)> = index
        .selected_names
        .iter()
        .map(|name| {
            let tags = index.tags.get(name).cloned().unwrap_or_default();
            (crate::boundary::terminal_safe(name), tags)
        })
        .collect();
    if args.json {
        let all: serde_json::Map<String, serde_json::Value> = rows
            .into_iter()
            .map(|(name, tags)| (name, serde_json::json!({ "tags": tags })))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&all).expect("JSON always serializes")
        );
    } else {
        let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        for (name, tags) in rows {
            let tags: Vec<String> = tags
                .iter()
                .map(|t| crate::boundary::terminal_safe(t))
                .collect();
            println!("{name:width$}  {}", tags.join(" "));
        }
    }
    Ok(ExitKind::Success)
}
