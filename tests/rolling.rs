//! Rolling deploys: canaries first, bounded batches, a health check per machine that stops
//! the rollout and (with --rollback-on-unhealthy) sends an unhealthy machine back to its
//! exact previous generation.

mod common;
use clan_lab::HostKind;
use common::*;

fn fleet(lab: &Lab, names: &[&str], variant: &str, checks: bool) -> std::path::PathBuf {
    let inventory: String = names
        .iter()
        .map(|m| {
            let check = if !checks {
                String::new()
            } else if *m == "m3" {
                r#"deploy.healthCheck = "echo m3 is not serving; exit 1";"#.to_string()
            } else {
                r#"deploy.healthCheck = "test -e /nix/var/nix/profiles/system";"#.to_string()
            };
            format!(
                r#"{m} = {{ deploy.targetHost = "root@{}"; {check} }};"#,
                lab.ip(m)
            )
        })
        .collect();
    let machines: String = names
        .iter()
        .map(|m| format!(r#"{m} = system {{ variant = "{variant}"; }};"#))
        .collect();
    lab.write_flake(&format!(
        "{{ inventory.machines = {{ {inventory} }}; machines = {{ {machines} }}; }}"
    ))
}

// The rollback of an unhealthy machine is an activation: on both kinds of target.
#[test]
fn canary_then_batches_stop_at_an_unhealthy_machine_namespace() {
    canary_then_batches_stop_at_an_unhealthy_machine(HostKind::Namespace);
}

#[test]
fn canary_then_batches_stop_at_an_unhealthy_machine_systemd() {
    canary_then_batches_stop_at_an_unhealthy_machine(HostKind::Systemd);
}

fn canary_then_batches_stop_at_an_unhealthy_machine(kind: HostKind) {
    let names = ["m1", "m2", "m3", "m4", "m5"];
    let specs: Vec<HostSpec> = names.iter().map(|m| HostSpec::new(m).kind(kind)).collect();
    let lab = Lab::start(&specs);
    // Everyone on v1 first.
    let v1 = fleet(&lab, &names, "v1", false);
    let v1_out: Vec<String> = names.iter().map(|m| toplevel(&lab, &v1, m)).collect();
    assert_eq!(clan(&lab, &v1, &["machines", "update"]).code, 0);

    let v2 = fleet(&lab, &names, "v2", true);
    let v2_out: Vec<String> = names.iter().map(|m| toplevel(&lab, &v2, m)).collect();
    // The rollout, planned here and run twice below.
    let rollout = [
        "machines",
        "update",
        "--batch-size",
        "2",
        "--canary",
        "m1",
        "--rollback-on-unhealthy",
        "--json",
    ];
    let mut planned = rollout[..rollout.len() - 1].to_vec();
    planned.push("--dry-run");
    let dry = clan(&lab, &v2, &planned);
    assert_eq!(dry.code, 0);
    // What an unhealthy machine would do is part of the printed plan.
    assert!(dry.stdout.contains(&format!(
        "      if the health check fails (--rollback-on-unhealthy):\n        [target root@{}] clan-activate revert ",
        lab.ip("m3")
    )));
    assert!(dry.stdout.contains("batch 1 (canary): m1"));
    assert!(dry.stdout.contains("batch 2: m2, m3"));
    assert!(dry.stdout.contains("batch 3: m4, m5"));

    let run = clan(&lab, &v2, &rollout);
    assert_eq!(
        run.code, 3,
        "an unhealthy machine was changed, then rolled back"
    );
    assert!(run.stderr.contains("Batch 1 of 3 (canary): m1"));
    assert!(run.stderr.contains("Rollout stopped after batch 2"));
    assert!(
        run.stderr
            .contains("m3: the health check failed on its target (it exited 1)")
    );
    assert!(run.stderr.contains("m3 is not serving"));
    assert!(run.stderr.contains(") (--rollback-on-unhealthy)"));
    assert!(
        run.stderr
            .contains("nothing more is needed to undo this deploy")
    );
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let result = |m: &str| result_of(&report, m).unwrap();
    assert_eq!(result("m1"), "deployed");
    assert_eq!(result("m2"), "deployed");
    assert_eq!(result("m3"), "failed");
    // The report says the machine was rolled back, and where to.
    let m3 = report["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "m3")
        .unwrap();
    assert_eq!(m3["errorCode"], "health.rolled-back");
    assert!(
        m3["error"]
            .as_str()
            .unwrap()
            .contains(&format!("rolled back to generation 1 ({})", v1_out[2])),
        "{m3}"
    );
    assert_eq!(result("m4"), "not started");
    assert_eq!(result("m5"), "not started");
    let profile = |m: &str| lab.host(m).system_profile().unwrap();
    assert_eq!(profile("m1"), v2_out[0]);
    assert_eq!(profile("m2"), v2_out[1]);
    // m3 is back on its exact previous generation; m4 and m5 were never touched.
    assert_eq!(profile("m3"), v1_out[2]);
    assert_eq!(
        lab.host("m3").switch_log().last().unwrap(),
        &format!("{} switch", v1_out[2])
    );
    assert_eq!(profile("m4"), v1_out[3]);
    assert_eq!(profile("m5"), v1_out[4]);
    assert_eq!(lab.host("m4").switch_log().len(), 1);

    // The same rollout again: each batch has its own up-to-date check, so the machines that
    // run v2 are left alone and the unhealthy one stops the rollout again.
    let switches = lab.host("m1").switch_log().len();
    let again = clan(&lab, &v2, &rollout);
    assert_eq!(again.code, 3, "{}", again.all());
    let report: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    let result = |m: &str| result_of(&report, m).unwrap();
    assert_eq!(result("m1"), "up to date");
    assert_eq!(result("m2"), "up to date");
    assert_eq!(result("m3"), "failed");
    assert_eq!(result("m4"), "not started");
    assert_eq!(lab.host("m1").switch_log().len(), switches);
    assert!(again.stderr.contains("Rollout stopped after batch 2"));
}

#[test]
fn a_failed_canary_starts_nothing_else() {
    let names = ["m1", "m2"];
    let specs: Vec<HostSpec> = names.iter().map(|m| HostSpec::new(m)).collect();
    let lab = Lab::start(&specs);
    let f = lab.write_flake(&format!(
        r#"{{ inventory.machines = {{ m1.deploy.targetHost = "root@{}"; m2.deploy.targetHost = "root@{}"; }};
             machines = {{ m1 = system {{ variant = "fail"; }}; m2 = system {{ }}; }}; }}"#,
        lab.ip("m1"),
        lab.ip("m2")
    ));
    let run = clan(
        &lab,
        &f,
        &[
            "machines",
            "update",
            "--canary",
            "m1",
            "--max-failures",
            "5",
        ],
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("Rollout stopped after batch 1: the canary failed.")
    );
    assert_eq!(lab.host("m2").system_profile(), None);
    let bad = clan(&lab, &f, &["machines", "update", "--canary", "m9"]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr
            .contains("the canary \"m9\" (from --canary) is not one of the machines")
    );
}

// --health-check-timeout holds for the whole check, also when it leaves a process behind
// that keeps its output open (setsid, a daemon): the deploy does not wait for that process.
#[test]
fn a_health_check_that_leaves_a_process_behind_ends_at_its_timeout() {
    let lab = Lab::start(&[HostSpec::new("m1")]);
    let f = lab.write_flake(&format!(
        r#"{{ inventory.machines.m1 = {{ deploy.targetHost = "root@{}"; deploy.healthCheck = "setsid sleep 25 & echo $! > /root/leftover; sleep 20"; }}; machines.m1 = system {{ }}; }}"#,
        lab.ip("m1")
    ));
    let started = std::time::Instant::now();
    let run = clan(
        &lab,
        &f,
        &["machines", "update", "m1", "--health-check-timeout", "2"],
    );
    let took = started.elapsed();
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("the health check failed on its target (it did not finish in time)"),
        "{}",
        run.stderr
    );
    assert!(
        took < std::time::Duration::from_secs(15),
        "the deploy waited {took:?} for the check's leftover process"
    );
    // The test stops what it made the check leave behind.
    let leftover = std::fs::read_to_string(lab.host("m1").root().join("leftover")).unwrap();
    let _ = std::process::Command::new("kill")
        .arg(leftover.trim())
        .status();
}
