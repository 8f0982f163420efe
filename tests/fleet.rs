//! Fleet deploys: many machines in one command, grouped by build host, failures isolated.

mod common;
use common::*;

/// Three targets and two builders: t1 and t2 build on the shared builder, t3 on itself.
fn fleet_lab() -> (Lab, std::path::PathBuf) {
    let lab = Lab::start(&[
        HostSpec::new("builder"),
        HostSpec::new("t1"),
        HostSpec::new("t2"),
        HostSpec::new("t3"),
    ]);
    for t in ["t1", "t2", "t3"] {
        lab.trust("builder", t);
    }
    (lab, std::path::PathBuf::new())
}

fn fleet_flake(lab: &Lab, t1_args: &str) -> std::path::PathBuf {
    fleet_flake_with(lab, t1_args, "")
}

fn fleet_flake_with(lab: &Lab, t1_args: &str, t3_args: &str) -> std::path::PathBuf {
    let b = lab.ip("builder");
    lab.write_flake(&format!(
        r#"{{
          inventory.machines = {{
            t1 = {{ deploy.targetHost = "root@{t1}"; deploy.buildHost = "root@{b}"; tags = [ "web" ]; }};
            t2 = {{ deploy.targetHost = "root@{t2}"; deploy.buildHost = "root@{b}"; tags = [ "web" "db" ]; }};
            t3 = {{ deploy.targetHost = "root@{t3}"; tags = [ "edge" ]; }};
          }};
          machines = {{
            t1 = system {{ shared = true; {t1_args} }};
            t2 = system {{ shared = true; }};
            t3 = system {{ shared = true; {t3_args} }};
          }};
        }}"#,
        t1 = lab.ip("t1"),
        t2 = lab.ip("t2"),
        t3 = lab.ip("t3"),
    ))
}

fn profile(lab: &Lab, host: &str) -> Option<String> {
    lab.host(host).system_profile()
}

#[test]
fn fleet_deploys_every_machine_grouped_by_build_host() {
    let (lab, _) = fleet_lab();
    let flake = fleet_flake(&lab, "");
    let outs: Vec<String> = ["t1", "t2", "t3"]
        .iter()
        .map(|m| toplevel(&lab, &flake, m))
        .collect();
    let run = clan(&lab, &flake, &["machines", "update", "-v"]);
    assert_eq!(run.code, 0);
    for (host, out) in ["t1", "t2", "t3"].iter().zip(&outs) {
        assert_eq!(profile(&lab, host).as_deref(), Some(out.as_str()), "{host}");
        assert_eq!(
            lab.host(host).switch_log(),
            vec![format!("{out} switch")],
            "{host} switched other than once"
        );
    }
    // The shared part was built once on the shared builder, once on t3 (its own builder),
    // and never on the targets the builder serves.
    assert_eq!(lab.host("builder").shared_builds(), 1);
    assert_eq!(lab.host("t3").shared_builds(), 1);
    assert_eq!(lab.host("t1").shared_builds(), 0);
    assert_eq!(lab.host("t2").shared_builds(), 0);
    // One batch for the shared builder, with both machines.
    let batches: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("] build: ") && l.contains("nix-store --realise"))
        .collect();
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert!(
        batches
            .iter()
            .any(|l| l.contains("nixos-system-t1.drv") && l.contains("nixos-system-t2.drv"))
    );
    // The builder's own max-jobs is Nix's default, 1: the preflight learnt it, and its batch
    // gets a build slot for each of its two machines; t3 builds alone on itself, as it is.
    for batch in &batches {
        assert_eq!(
            batch.contains("nix-store --realise --max-jobs 2 "),
            batch.contains("nixos-system-t2.drv"),
            "{batch}"
        );
    }
    // Nix's own build count reaches the progress lines: in plain output once for the build
    // group, not once per machine.
    let count = format!("[build host root@{}] 3/3 built", lab.ip("builder"));
    assert_eq!(run.stderr.matches(&count).count(), 1, "{}", run.stderr);
    assert!(!run.stderr.contains(&format!(
        "[t1] building on the build host root@{}: ",
        lab.ip("builder")
    )));
    // The summary table lists each machine.
    for name in ["t1", "t2", "t3"] {
        assert!(
            run.stderr
                .lines()
                .any(|l| l.starts_with(name) && l.contains("deployed"))
        );
    }

    // A no-op re-deploy with one machine changed: the two unchanged ones are up to date
    // (nothing built, copied or switched there); only t1 is deployed.
    let flake = fleet_flake(&lab, r#"variant = "v2";"#);
    let t1_v2 = toplevel(&lab, &flake, "t1");
    let again = clan(&lab, &flake, &["machines", "update", "--json"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    let report: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(result_of(&report, "t1").as_deref(), Some("deployed"));
    assert_eq!(result_of(&report, "t2").as_deref(), Some("up to date"));
    assert_eq!(result_of(&report, "t3").as_deref(), Some("up to date"));
    assert_eq!(profile(&lab, "t1").as_deref(), Some(t1_v2.as_str()));
    assert_eq!(lab.host("t2").switch_log().len(), 1, "t2 switched again");
    assert_eq!(lab.host("t3").switch_log().len(), 1, "t3 switched again");
}

#[test]
fn fleet_failure_is_isolated_and_reported() {
    let (lab, _) = fleet_lab();
    let flake = fleet_flake(&lab, r#"variant = "fail";"#);
    let run = clan(&lab, &flake, &["machines", "update", "--json"]);
    assert_eq!(run.code, 1);
    assert_eq!(profile(&lab, "t1"), None, "a failed machine was activated");
    assert!(lab.host("t1").switch_log().is_empty());
    assert!(
        profile(&lab, "t2").is_some(),
        "t2 was held back by t1's failure"
    );
    assert!(
        profile(&lab, "t3").is_some(),
        "t3 was held back by t1's failure"
    );
    assert!(
        run.stderr
            .lines()
            .any(|l| l.starts_with("t1") && l.contains("failed"))
    );
    assert!(run.stderr.contains("t1: building /nix/store/"));
    assert!(run.stderr.contains("fixture build of t1 fails on purpose"));
    assert!(run.stderr.contains("Logs of every machine and build: "));

    let report: serde_json::Value = serde_json::from_str(&run.stdout).expect("--json is JSON");
    assert_eq!(report["exitCode"], 1);
    let results: std::collections::BTreeMap<String, String> = report["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(results["t1"], "failed");
    assert_eq!(results["t2"], "deployed");
    assert_eq!(results["t3"], "deployed");
    let t2 = report["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "t2")
        .unwrap();
    assert!(t2["seconds"]["build"].as_f64().is_some());
    assert!(
        t2["buildHost"]
            .as_str()
            .unwrap()
            .contains(lab.ip("builder"))
    );
    assert!(report["peakRssKiB"].as_u64().unwrap() > 0);
}

#[test]
fn fleet_fail_fast_stops_starting_new_work() {
    let (lab, _) = fleet_lab();
    // t1 fails at once on the builder; t3's own build takes 3 s, so it is built after the
    // failure is known and must not be activated.
    let flake = fleet_flake_with(&lab, r#"variant = "fail";"#, "buildSeconds = 3;");
    let run = clan(
        &lab,
        &flake,
        &["machines", "update", "t1", "t3", "--fail-fast"],
    );
    assert_eq!(run.code, 1);
    assert_eq!(profile(&lab, "t1"), None);
    assert_eq!(
        profile(&lab, "t3"),
        None,
        "t3 was activated after the failure"
    );
    assert!(run.stderr.contains("[t3] skipped (--fail-fast)"));
    assert!(
        run.stderr
            .lines()
            .any(|l| l.starts_with("t3") && l.contains("skipped"))
    );

    // Without --fail-fast, t3 goes on.
    let run = clan(&lab, &flake, &["machines", "update", "t1", "t3"]);
    assert_eq!(run.code, 1);
    assert!(profile(&lab, "t3").is_some());
}

#[test]
fn fleet_selection_by_tags_and_names() {
    let (lab, _) = fleet_lab();
    let flake = fleet_flake(&lab, "");
    let run = clan(
        &lab,
        &flake,
        &["machines", "update", "--tags", "db", "--json"],
    );
    assert_eq!(run.code, 0);
    assert!(profile(&lab, "t2").is_some());
    assert_eq!(profile(&lab, "t1"), None);
    assert_eq!(profile(&lab, "t3"), None);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["machines"].as_array().unwrap().len(), 1);

    // Names and tags combine as clan-core does: the names, filtered by the tags.
    let run = clan(
        &lab,
        &flake,
        &[
            "machines",
            "update",
            "t2",
            "t3",
            "--tags",
            "db",
            "--dry-run",
        ],
    );
    assert_eq!(run.code, 0);
    assert!(run.stdout.contains("t2: deploy to"));
    assert!(!run.stdout.contains("t3: deploy to"));
    assert!(!run.stdout.contains("t1: deploy to"));

    let bad_tag = clan(&lab, &flake, &["machines", "update", "--tags", "nope"]);
    assert_eq!(bad_tag.code, 2);
    assert!(bad_tag.stderr.contains(
        "no machine has all the tags nope (from --tags); tags in the flake: all, db, edge, nixos, web"
    ));
    let bad_name = clan(&lab, &flake, &["machines", "update", "t1", "t9"]);
    assert_eq!(bad_name.code, 2);
    assert!(bad_name.stderr.contains("unknown machine \"t9\""));
    assert_eq!(profile(&lab, "t1"), None, "something ran despite the error");
}

#[test]
fn non_terminal_output_is_plain_lines() {
    let (lab, _) = fleet_lab();
    let flake = fleet_flake(&lab, r#"variant = "fail";"#);
    let run = clan(&lab, &flake, &["machines", "update"]);
    assert_eq!(run.code, 1);
    assert!(
        !run.all().contains('\u{1b}'),
        "terminal control codes in plain output"
    );
    assert!(!run.all().contains('\r'));
    for event in [
        "[t1] building on the build host",
        "[t2] copying to the target",
        "[t2] activating",
        "[t2] deployed",
        "[t3] deployed",
    ] {
        assert!(run.stderr.contains(event), "no event {event:?}");
    }
}

// One machine's refused value (an address option that would load code) stops the whole
// fleet with exit 2 before any activation, as `--dry-run` does: the other machines may have
// built, but none is activated, and the report names why.
#[test]
fn a_refused_value_stops_the_fleet_before_any_activation() {
    let (lab, _) = fleet_lab();
    let b = lab.ip("builder");
    let flake = lab.write_flake(&format!(
        r#"{{
          inventory.machines = {{
            t1 = {{ deploy.targetHost = "root@{t1}"; deploy.buildHost = "root@{b}"; }};
            t2 = {{ deploy.targetHost = "root@{t2}"; deploy.buildHost = "root@{b}"; }};
            t3 = {{ deploy.targetHost = "root@{t3}?PKCS11Provider=/nonexistent/p11.so"; }};
          }};
          machines = {{ t1 = system {{ }}; t2 = system {{ }}; t3 = system {{ }}; }};
        }}"#,
        t1 = lab.ip("t1"),
        t2 = lab.ip("t2"),
        t3 = lab.ip("t3"),
    ));
    let refusal = "the ssh option PKCS11Provider runs a local command";
    let dry = clan(&lab, &flake, &["machines", "update", "--dry-run"]);
    assert_eq!(dry.code, 2);
    assert!(dry.stderr.contains(refusal), "{}", dry.stderr);
    let run = clan(&lab, &flake, &["machines", "update", "--json"]);
    assert_eq!(run.code, 2, "the real run ends as the dry run does");
    assert!(run.stderr.contains(refusal), "{}", run.stderr);
    for t in ["t1", "t2", "t3"] {
        assert_eq!(profile(&lab, t), None, "{t} was activated");
        assert!(lab.host(t).switch_log().is_empty(), "{t} switched");
    }
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["exitCode"], 2);
    let code_of = |m: &str| {
        report["machines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == m)
            .map(|r| r["errorCode"].clone())
    };
    assert_eq!(code_of("t3"), Some("boundary.refused".into()));
    assert_eq!(code_of("t1"), Some("run.stopped-by-refusal".into()));
    assert_eq!(code_of("t2"), Some("run.stopped-by-refusal".into()));
}

// One run id per run, everywhere: the report, the log directory and what every target
// recorded (its watchdog's log), also when the fleet streams in several batches.
#[test]
fn a_fleet_has_one_run_id_in_its_report_logs_and_targets() {
    let (lab, _) = fleet_lab();
    let flake = fleet_flake(&lab, "");
    let run = clan(&lab, &flake, &["machines", "update", "--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let id = report["run"].as_str().unwrap().to_string();
    for m in report["machines"].as_array().unwrap() {
        let log = m["log"].as_str().unwrap();
        assert!(
            log.contains(&format!("/logs/{id}/")),
            "{log} is not under run {id}"
        );
    }
    for t in ["t1", "t2", "t3"] {
        let records = lab.exec(t, &["ls", "/run/clan"]);
        let records = String::from_utf8_lossy(&records.stdout);
        assert!(
            records.lines().any(|l| l == format!("watchdog-{id}.log")),
            "{t} recorded another run id: {records}"
        );
    }
}

// `clan machines build`: every selected machine is built where a deploy would build it, and
// nothing else happens: no target is logged in to (one of them cannot even be reached),
// nothing is copied or activated, and each machine's result is `built`.
#[test]
fn build_builds_on_the_build_host_and_never_reaches_a_target() {
    let lab = Lab::builder_and_target();
    let b = lab.ip("builder");
    let flake = lab.write_flake(&format!(
        r#"{{
          inventory.machines = {{
            a = {{ deploy.targetHost = "root@{t}"; deploy.buildHost = "root@{b}"; tags = [ "ci" ]; }};
            gone = {{ deploy.targetHost = "root@192.0.2.1"; deploy.buildHost = "root@{b}"; tags = [ "ci" ]; }};
          }};
          machines = {{ a = system {{ shared = true; }}; gone = system {{ shared = true; }}; }};
        }}"#,
        t = lab.ip("target"),
    ));
    let outs: Vec<String> = ["a", "gone"]
        .iter()
        .map(|m| toplevel(&lab, &flake, m))
        .collect();
    let dry = clan(
        &lab,
        &flake,
        &["machines", "build", "--tags", "ci", "--dry-run"],
    );
    assert_eq!(dry.code, 0, "{}", dry.all());
    assert!(
        dry.stdout.contains("Then a: nothing (built only)"),
        "{}",
        dry.stdout
    );
    assert!(!dry.stdout.contains("clan-activate"), "{}", dry.stdout);

    let run = clan(
        &lab,
        &flake,
        &["machines", "build", "--tags", "ci", "--json"],
    );
    assert_eq!(run.code, 0, "{}", run.all());
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    for (m, out) in ["a", "gone"].iter().zip(&outs) {
        assert_eq!(result_of(&report, m).as_deref(), Some("built"), "{report}");
        assert!(
            lab.host("builder").has_path(out),
            "{m} not built on the builder"
        );
        assert!(!lab.host("target").has_path(out), "{m} reached the target");
    }
    assert!(
        lab.host("target").logins_by_source().is_empty(),
        "the target was logged in to: {:?}",
        lab.host("target").logins_by_source()
    );
    assert_target_untouched(&lab);
    // It only builds: an activation word is refused by name.
    // One machine takes the other path through the deploy: no target login there either.
    let one = clan(
        &lab,
        &flake,
        &["machines", "build", "a", "--action", "switch"],
    );
    assert_eq!(one.code, 0, "{}", one.all());
    assert!(lab.host("target").logins_by_source().is_empty());
    let refused = clan(
        &lab,
        &flake,
        &["machines", "build", "a", "--action", "test"],
    );
    assert_eq!(refused.code, 2, "{}", refused.all());
    assert!(
        refused.stderr.contains("--action test"),
        "{}",
        refused.stderr
    );
}

// A fleet of 8 streams in batches whose checks take turns: the first batch (a quarter of
// it) is checked alone, and its build starts while the other machines are still being
// checked; no machine's build starts before its own hops were checked. Every session on a
// target takes a second (`~/.ssh/rc`), so the second batch's checks last at least that.
#[test]
fn a_machine_builds_while_others_are_still_checked() {
    let names: Vec<String> = (1..=8).map(|i| format!("t{i}")).collect();
    let mut specs = vec![HostSpec::new("builder")];
    specs.extend(names.iter().map(|n| HostSpec::new(n)));
    let lab = Lab::start(&specs);
    for t in &names {
        lab.trust("builder", t);
        std::fs::write(lab.host(t).root().join(".ssh/rc"), "sleep 1\n").unwrap();
    }
    let b = lab.ip("builder");
    let inventory: String = names
        .iter()
        .map(|t| {
            format!(
                r#"{t} = {{ deploy.targetHost = "root@{}"; deploy.buildHost = "root@{b}"; }};"#,
                lab.ip(t)
            )
        })
        .collect();
    let machines: String = names
        .iter()
        .map(|t| format!("{t} = system {{ shared = true; }};"))
        .collect();
    let flake = lab.write_flake(&format!(
        "{{ inventory.machines = {{ {inventory} }}; machines = {{ {machines} }}; }}"
    ));
    let run = clan(&lab, &flake, &["machines", "update", "--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for t in &names {
        assert!(profile(&lab, t).is_some(), "{t} not deployed");
    }
    // The run's log: each batch's checks, begun and over, and each realise's start.
    let lines = run_log_lines(&lab, &run.stdout);
    let at = |batch: &str, what: &str| -> f64 {
        lines
            .iter()
            .find(|(_, l)| l.starts_with(&format!("[batch {batch}] checks: {what}")))
            .unwrap_or_else(|| panic!("no [batch {batch}] checks: {what} in {lines:?}"))
            .0
    };
    let first = lines
        .iter()
        .find(|(_, l)| l.starts_with("[batch 0] checks: begin"))
        .map(|(_, l)| l.clone())
        .unwrap();
    assert_eq!(first.matches(", ").count(), 1, "a quarter of 8: {first}");
    // Each realise names the machines of its batch; the first batch's realise starts after
    // its checks and before the second batch's checks are over.
    let realise = |machine: &str| -> f64 {
        lines
            .iter()
            .find(|(_, l)| {
                l.contains("nix-store --realise")
                    && l.contains(&format!("nixos-system-{machine}.drv"))
            })
            .unwrap_or_else(|| panic!("no realise of {machine}"))
            .0
    };
    let in_first: Vec<&String> = names
        .iter()
        .filter(|t| first.contains(&format!("{t}, ")) || first.contains(&format!("{t})")))
        .collect();
    assert_eq!(in_first.len(), 2, "{first}");
    assert!(at("1", "begin") >= at("0", "over"));
    for t in &in_first {
        assert!(realise(t) >= at("0", "over"));
        assert!(
            realise(t) < at("1", "over"),
            "{t}'s build did not start while the others were checked: {lines:?}"
        );
    }
    for t in names.iter().filter(|t| !in_first.contains(t)) {
        assert!(realise(t) >= at("1", "over"), "{t} built before its checks");
    }
    // What the systems share was built once.
    assert_eq!(lab.host("builder").shared_builds(), 1);
}
