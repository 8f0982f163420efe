//! The crate's module graph, read from the source: no import cycle between top-level
//! modules, and the library never reaches into the command layer (`commands`, `cli`), so
//! data flows one way (evaluate → resolve → plan → check → execute → report, commands on
//! top).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its code (not its tests, not its comments)
/// names through `crate::`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.clone()];
    let path_ref = regex::Regex::new(r"crate::([a-z_][a-z0-9_]*)").unwrap();
    let group = regex::Regex::new(r"crate::\{").unwrap();
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let relative = path
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .to_string();
        if !relative.ends_with(".rs")
            || relative.ends_with("tests.rs")
            || relative == "lib.rs"
            || relative == "main.rs"
        {
            continue;
        }
        let top = relative
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        // Unit tests sit at the end of a file, after `#[cfg(test)]`.
        let code: String = text
            .lines()
            .take_while(|l| l.trim() != "#[cfg(test)]")
            .filter(|l| !l.trim_start().starts_with("//"))
            .map(|l| format!("{l}\n"))
            .collect();
        let deps = graph.entry(top.clone()).or_default();
        for c in path_ref.captures_iter(&code) {
            deps.insert(c[1].to_string());
        }
        // `use crate::{a::…, b, c::{…}}`: the first name of each item at the group's top.
        for m in group.find_iter(&code) {
            let (mut depth, mut item, mut first) = (1, String::new(), true);
            for ch in code[m.end()..].chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 1 => break,
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        first = true;
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 1 && first {
                    if ch.is_alphanumeric() || ch == '_' {
                        item.push(ch);
                    } else if !item.is_empty() {
                        deps.insert(std::mem::take(&mut item));
                        first = false;
                    }
                }
            }
        }
        deps.remove(&top);
        deps.remove("self");
    }
    graph
}

/// A cycle through `start`, if there is one: the modules in order.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in graph.get(&node).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(start.to_string());
                return Some(cycle);
            }
            if graph.contains_key(next) && seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn no_module_imports_itself_through_others() {
    let graph = graph();
    assert!(graph.len() > 20, "the source was not read: {graph:?}");
    // The reader finds what it must: grouped and plain imports.
    assert!(graph["deploy"].contains("select"), "{:?}", graph["deploy"]);
    assert!(
        graph["commands"].contains("deploy"),
        "{:?}",
        graph["commands"]
    );
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|m| cycle_from(&graph, m))
        .map(|c| c.join(" → "))
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_library_does_not_reach_into_the_command_layer() {
    let graph = graph();
    let command_layer = ["commands", "cli"];
    let wrong: Vec<String> = graph
        .iter()
        .filter(|(m, _)| !command_layer.contains(&m.as_str()))
        .flat_map(|(m, deps)| {
            deps.iter()
                .filter(|d| command_layer.contains(&d.as_str()))
                .map(move |d| format!("{m} → {d}"))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "library modules using the command layer: {wrong:?}"
    );
}
