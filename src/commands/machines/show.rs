//! `clan machines show`: the guide's "build runs on the target" checklist, answered by the
//! tool. For targetHost, buildHost and forwardAgent: every source consulted, its value or
//! "unset", and which one won.

use std::fmt::Display;

use serde_json::{Value, json};

use crate::cli::ShowArgs;
use crate::commands::machines::{LoadedMachine, load_machines};
use crate::error::{Error, ExitKind};
use crate::resolve::{
    BuildLocation, Candidates, Overrides, Source, build_candidates, forward_agent_candidates,
    target_candidates,
};

/// Runs the command; returns the exit code.
pub fn run(args: &ShowArgs) -> Result<ExitKind, Error> {
    let overrides = args.hosts.overrides(Some(&args.agent));
    let loaded = load_machines(
        &args.hosts.flake,
        &args.machines,
        &overrides,
        &args.hosts.nix_options()?,
    )?;
    if args.json {
        let all: serde_json::Map<String, Value> = loaded
            .iter()
            .map(|l| (l.machine.name.to_string(), to_json(l, &overrides)))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&all).expect("JSON always serializes")
        );
    } else {
        for l in &loaded {
            print!("{}", to_text(l, &overrides));
        }
    }
    Ok(ExitKind::Success)
}

/// What each setting resolved to, as (name, value, source, candidates).
fn settings(
    l: &LoadedMachine,
    overrides: &Overrides,
) -> Vec<(&'static str, String, Source, Candidates<String>)> {
    let m = &l.machine;
    let name = &m.name;
    let as_text = |c: Candidates<bool>| -> Candidates<String> {
        c.into_iter()
            .map(|(s, v)| (s, v.map(|b| b.to_string())))
            .collect()
    };
    let build = match &m.build.value {
        BuildLocation::Local => "localhost (this machine)".to_string(),
        BuildLocation::Target => format!("{} (the target itself)", m.target.value),
        BuildLocation::Remote(addr) => addr.to_string(),
    };
    vec![
        (
            "targetHost",
            m.target.value.to_string(),
            m.target.source.clone(),
            target_candidates(name, &l.facts, overrides),
        ),
        (
            "buildHost",
            build,
            m.build.source.clone(),
            build_candidates(name, &l.facts, overrides),
        ),
        (
            "forwardAgent",
            m.forward_agent.value.to_string(),
            m.forward_agent.source.clone(),
            as_text(forward_agent_candidates(name, &l.facts, overrides)),
        ),
    ]
}

fn or_unset(value: &Option<impl Display>) -> String {
    value
        .as_ref()
        .map_or_else(|| "unset".to_string(), |v| v.to_string())
}

fn to_text(l: &LoadedMachine, overrides: &Overrides) -> String {
    let mut out = format!("{}\n", l.machine.name);
    for (setting, value, source, candidates) in settings(l, overrides) {
        out.push_str(&format!("  {setting}: {value}\n"));
        for (candidate, candidate_value) in &candidates {
            let mark = if *candidate == source {
                "  <- used"
            } else {
                ""
            };
            out.push_str(&format!(
                "    {candidate}: {}{mark}\n",
                or_unset(candidate_value)
            ));
        }
        if matches!(source, Source::TargetFallback | Source::Default) {
            out.push_str(&format!("    none set: {source}  <- used\n"));
        }
    }
    out
}

fn to_json(l: &LoadedMachine, overrides: &Overrides) -> Value {
    let mut object = serde_json::Map::new();
    for (setting, value, source, candidates) in settings(l, overrides) {
        let consulted: Vec<Value> = candidates
            .iter()
            .map(|(s, v)| json!({ "source": s.to_string(), "value": v, "used": *s == source }))
            .collect();
        object.insert(
            setting.to_string(),
            json!({ "value": value, "source": source.to_string(), "consulted": consulted }),
        );
    }
    object.insert(
        "builds".into(),
        json!(match &l.machine.build.value {
            BuildLocation::Local => "local",
            BuildLocation::Target => "target",
            BuildLocation::Remote(_) => "build-host",
        }),
    );
    Value::Object(object)
}
