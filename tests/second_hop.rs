//! The second hop, build host → target: the guide's "Authenticating the Second Hop" and
//! "Troubleshooting" sections, on the lab. Each case must be caught by the preflight before
//! anything is copied to or built on the build host, and still be explained when the
//! preflight is skipped.

mod common;
use common::*;

fn remote_build(lab: &Lab) -> std::path::PathBuf {
    lab.write_flake(&format!(
        r#"{{ inventory.machines.m = {{ deploy.targetHost = "root@{}"; deploy.buildHost = "root@{}"; }}; machines.m = system {{ }}; }}"#,
        lab.ip("target"),
        lab.ip("builder")
    ))
}

/// The builder knows the target's host key but has no key the target accepts.
fn lab_without_builder_key_on_target() -> Lab {
    let lab = Lab::builder_and_target();
    lab.deauthorize_all("target");
    lab.authorize("workstation", ".ssh/id_ed25519", "target");
    lab
}

// Troubleshooting: "Permission Denied During Closure Copy".
#[test]
fn troubleshooting_permission_denied_during_closure_copy() {
    let lab = lab_without_builder_key_on_target();
    let flake = remote_build(&lab);
    let out = toplevel(&lab, &flake, "m");
    let b = lab.ip("builder");
    let t = lab.ip("target");

    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains(&format!(
        "preflight: m: permission denied on the second hop (build host root@{b} → target root@{t})"
    )));
    assert!(run.stderr.contains("Permission denied (publickey)"));
    assert!(
        run.stderr.contains("ssh-keygen -t ed25519"),
        "no fix command"
    );
    assert!(
        run.stderr
            .contains("nothing was copied, built or activated")
    );
    // The failure names where its full output is, and it is there.
    let log = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("Full output: /root/"))
        .expect("no log path printed");
    assert!(log.ends_with("/preflight.log"), "{log}");
    let logged =
        std::fs::read_to_string(lab.host("workstation").root().join(log)).expect("the log");
    assert!(logged.contains("Permission denied (publickey)"), "{logged}");
    assert_eq!(
        lab.host("builder").store_entries(),
        0,
        "something reached the builder"
    );
    // The target saw the builder try, and refused it.
    assert!(lab.host("target").sshd_log().contains(&format!(
        "Connection closed by authenticating user root {b}"
    )));
    assert_target_untouched(&lab);

    let run = clan(&lab, &flake, &["machines", "update", "m", "--no-preflight"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains(&format!(
        "error: m: permission denied on the second hop (build host root@{b} → target root@{t})"
    )));
    assert!(lab.host("builder").has_path(&out));
    assert_target_untouched(&lab);
}

// Troubleshooting: "The Build Runs on the Target, Not the Builder". The tool says where it
// builds and why before anything runs, and `show` answers the guide's checklist.
#[test]
fn troubleshooting_build_runs_on_target_is_said_before_the_build() {
    let lab = Lab::builder_and_target();
    let flake = lab.write_flake(&format!(
        r#"{{ inventory.machines.m = {{ deploy.targetHost = "root@{}"; }}; machines.m = system {{ }}; }}"#,
        lab.ip("target")
    ));
    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 0);
    let said = run
        .stderr
        .find("m: build on the target")
        .expect("no provenance line");
    let built = run.stderr.find("] build (").expect("no build");
    assert!(said < built, "provenance came after the build started");
    assert!(run.stderr.contains(
        "(no buildHost set in --build-host, the inventory or clan.core.networking: building on the target)"
    ));

    let show = clan(&lab, &flake, &["machines", "show", "m"]);
    assert_eq!(show.code, 0);
    for line in [
        "  buildHost: root@",
        "    --build-host: unset",
        "    inventory.machines.m.deploy.buildHost: unset",
        "    clan.core.networking.buildHost in m's configuration: unset",
        "    none set: no buildHost set in --build-host, the inventory or clan.core.networking: building on the target  <- used",
        "    inventory.machines.m.deploy.targetHost: root@",
    ] {
        assert!(show.stdout.contains(line), "show lacks {line:?}");
    }
    let json = clan(
        &lab,
        &flake,
        &[
            "machines",
            "show",
            "m",
            "--json",
            "--build-host",
            "localhost",
        ],
    );
    let value: serde_json::Value = serde_json::from_str(&json.stdout).expect("show --json is JSON");
    assert_eq!(value["m"]["builds"], "local");
    assert_eq!(value["m"]["buildHost"]["source"], "--build-host");
    assert_eq!(value["m"]["buildHost"]["consulted"][0]["used"], true);
    assert_eq!(
        value["m"]["buildHost"]["consulted"][1]["value"],
        serde_json::Value::Null
    );
    assert_eq!(value["m"]["forwardAgent"]["value"], "false");
}

// "Authenticating the Second Hop", option 1, done by the tool.
#[test]
fn setup_build_host_makes_the_next_deploy_work() {
    let lab = lab_without_builder_key_on_target();
    lab.remove_default_key("builder");
    lab.forget_known_hosts("builder");
    let flake = remote_build(&lab);
    let out = toplevel(&lab, &flake, "m");
    let b = lab.ip("builder");
    let t = lab.ip("target");

    let dry = clan(
        &lab,
        &flake,
        &["machines", "setup-build-host", "m", "--dry-run"],
    );
    assert_eq!(dry.code, 0);
    for line in [
        format!("  build host root@{b}: create the key ~/.ssh/id_ed25519"),
        format!("  build host root@{b}: add the target's verified host key to ~/.ssh/known_hosts"),
        format!(
            "  target root@{t}: authorize the build host's key for root in ~/.ssh/authorized_keys"
        ),
    ] {
        assert!(dry.stdout.contains(&line), "dry run lacks {line:?}");
    }
    assert!(
        !lab.host("builder").root().join(".ssh/id_ed25519").exists(),
        "dry run changed the builder"
    );
    assert!(!lab.host("builder").knows_host(t));

    let setup = clan(&lab, &flake, &["machines", "setup-build-host", "m"]);
    assert_eq!(setup.code, 0);
    assert!(setup.stdout.contains("m: changed:"));
    assert!(lab.host("builder").root().join(".ssh/id_ed25519").exists());
    assert!(lab.host("builder").knows_host(t));
    let authorized =
        std::fs::read_to_string(lab.host("target").root().join(".ssh/authorized_keys")).unwrap();
    assert!(
        authorized.contains(
            lab.public_key("builder", ".ssh/id_ed25519")
                .split_whitespace()
                .nth(1)
                .unwrap()
        )
    );

    let deploy = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(
        deploy.code, 0,
        "strict host key checking deploy failed after set-up"
    );
    assert_activated(&lab, &out);

    let key_before = lab.public_key("builder", ".ssh/id_ed25519");
    let again = clan(&lab, &flake, &["machines", "setup-build-host", "m"]);
    assert_eq!(again.code, 0);
    assert!(again.stdout.contains("m: nothing to change"));
    assert_eq!(
        lab.public_key("builder", ".ssh/id_ed25519"),
        key_before,
        "key overwritten"
    );
    let authorized_again =
        std::fs::read_to_string(lab.host("target").root().join(".ssh/authorized_keys")).unwrap();
    assert_eq!(authorized, authorized_again, "key authorized twice");
}

#[test]
fn setup_build_host_refuses_a_target_key_that_differs_from_the_trusted_one() {
    let lab = lab_without_builder_key_on_target();
    lab.forget_known_hosts("builder");
    // The workstation trusts some other key for the target's address.
    lab.forget_known_hosts("workstation");
    lab.trust("workstation", "builder");
    let impostor = lab.public_key("builder", ".ssh/id_ed25519");
    let impostor = impostor
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(
        lab.host("workstation").root().join(".ssh/known_hosts"),
        format!(
            "{}\n{} {impostor}\n",
            std::fs::read_to_string(lab.host("workstation").root().join(".ssh/known_hosts"))
                .unwrap()
                .trim(),
            lab.ip("target")
        ),
    )
    .unwrap();
    let flake = remote_build(&lab);
    let authorized_before =
        std::fs::read_to_string(lab.host("target").root().join(".ssh/authorized_keys")).unwrap();

    let run = clan(&lab, &flake, &["machines", "setup-build-host", "m"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("differs from the one this workstation trusts")
    );
    assert!(!lab.host("builder").knows_host(lab.ip("target")));
    let authorized_after =
        std::fs::read_to_string(lab.host("target").root().join(".ssh/authorized_keys")).unwrap();
    assert_eq!(
        authorized_before, authorized_after,
        "changed the target anyway"
    );
}

// "Authenticating the Second Hop", option 2: forward the workstation's agent.
#[test]
fn agent_forwarding_lets_a_keyless_build_host_copy() {
    let lab = Lab::builder_and_target();
    lab.remove_default_key("builder");
    let flake = remote_build(&lab);
    let out = toplevel(&lab, &flake, "m");

    let without = clan_with_agent(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(without.code, 1);
    assert!(
        without
            .stderr
            .contains("permission denied on the second hop")
    );
    assert!(without.stderr.contains("forward your SSH agent"));
    assert_target_untouched(&lab);

    let with = clan_with_agent(
        &lab,
        &flake,
        &["machines", "update", "m", "--forward-agent"],
    );
    assert_eq!(with.code, 0);
    assert!(with.stderr.contains(&format!(
        "warning: m: your ssh agent is forwarded to the build host root@{} (--forward-agent): root there can use your keys while the deploy runs",
        lab.ip("builder")
    )));
    assert_activated(&lab, &out);
}

#[test]
fn agent_forwarding_from_the_inventory() {
    let lab = Lab::builder_and_target();
    lab.remove_default_key("builder");
    let flake = lab.write_flake(&format!(
        r#"{{ inventory.machines.m = {{ deploy.targetHost = "root@{}"; deploy.buildHost = "root@{}"; deploy.forwardAgent = true; }}; machines.m = system {{ }}; }}"#,
        lab.ip("target"),
        lab.ip("builder")
    ));
    let out = toplevel(&lab, &flake, "m");
    let run = clan_with_agent(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 0);
    assert!(
        run.stderr
            .contains("(inventory.machines.m.deploy.forwardAgent): root there can use your keys")
    );
    assert_activated(&lab, &out);
    // --no-forward-agent wins over the inventory (--reactivate: the target runs the system).
    let off = clan_with_agent(
        &lab,
        &flake,
        &[
            "machines",
            "update",
            "m",
            "--no-forward-agent",
            "--reactivate",
        ],
    );
    assert_eq!(off.code, 1);
    assert!(off.stderr.contains("permission denied on the second hop"));
}

// A build host that cannot reach the target at all: the preflight suggests the relay, and the
// relay deploys without leaving the closure in the workstation's store.
#[test]
fn copy_via_workstation_when_the_build_host_cannot_reach_the_target() {
    let lab = Lab::builder_and_target();
    let t = lab.ip("target").to_string();
    let dead = format!("{}.250", t.rsplit_once('.').unwrap().0);
    lab.prepend_ssh_config("builder", &format!("Host {t}\n  HostName {dead}\n"));
    let flake = remote_build(&lab);
    let out = toplevel(&lab, &flake, "m");

    let direct = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(direct.code, 1);
    assert!(direct.stderr.contains("cannot reach the target"));
    assert!(direct.stderr.contains("Connection refused"));
    assert!(
        direct
            .stderr
            .contains("clan machines update m --copy-via-workstation")
    );
    assert_eq!(lab.host("builder").store_entries(), 0);

    let relay = clan(
        &lab,
        &flake,
        &["machines", "update", "m", "--copy-via-workstation"],
    );
    assert_eq!(relay.code, 0);
    assert!(lab.host("builder").has_path(&out));
    assert!(
        !lab.host("workstation").has_path(&out),
        "the closure stayed on the workstation"
    );
    assert_activated(&lab, &out);
    assert!(
        !lab.host("target")
            .logins_by_source()
            .contains_key(lab.ip("builder")),
        "the builder reached the target after all"
    );
}

// SSH connection reuse: one login per host from the workstation, one from the build host to
// the target (the preflight opens the build host's shared connection, the copy uses it).
// The target sees one more login from the workstation: the confirmation after activation,
// which must be a fresh connection.
#[test]
fn ssh_logins_per_host_for_one_deploy() {
    let lab = Lab::builder_and_target();
    let flake = remote_build(&lab);
    let out = toplevel(&lab, &flake, "m");
    let run = clan(&lab, &flake, &["machines", "update", "m", "-v"]);
    assert_eq!(run.code, 0);
    assert_activated(&lab, &out);
    let ws = lab.ip("workstation");
    let builder_logins = lab.host("builder").logins_by_source();
    let target_logins = lab.host("target").logins_by_source();
    let count =
        |m: &std::collections::BTreeMap<String, usize>, ip: &str| m.get(ip).copied().unwrap_or(0);
    println!(
        "ssh logins: workstation → builder {}, workstation → target {}, builder → target {}",
        count(&builder_logins, ws),
        count(&target_logins, ws),
        count(&target_logins, lab.ip("builder"))
    );
    assert_eq!(count(&builder_logins, ws), 1);
    assert_eq!(
        count(&target_logins, ws),
        2,
        "shared connection + fresh confirmation"
    );
    // Every round trip is accounted for: a new one changes these figures on purpose.
    let target_sessions = lab.host("target").sessions_by_source();
    let builder_sessions = lab.host("builder").sessions_by_source();
    println!(
        "sessions: workstation → builder {}, workstation → target {}, builder → target {}",
        count(&builder_sessions, ws),
        count(&target_sessions, ws),
        count(&target_sessions, lab.ip("builder"))
    );
    assert_eq!(
        count(&target_sessions, ws),
        7,
        "the up-to-date check with the preflight's probes; verify, summary, lock, prepare, \
         switch; the confirmation"
    );
    assert_eq!(
        count(&target_sessions, lab.ip("builder")),
        2,
        "the preflight's second hop, the copy"
    );
    let quiet = clan(&lab, &flake, &["machines", "update", "m", "--no-rollback"]);
    assert_eq!(quiet.code, 0);
    assert_eq!(
        lab.host("target").logins_by_source().get(ws).copied(),
        Some(3),
        "without the watchdog, one login"
    );
    assert_eq!(
        count(&target_logins, lab.ip("builder")),
        1,
        "the build host's preflight login and its copy share one connection"
    );
    // The build host's shared connection ended with the run, its directory removed.
    let hop = run
        .stderr
        .split("clan-hop-dir ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the copy used the build host's shared connection");
    assert!(
        hop.starts_with("/tmp/clan-") && hop.ends_with("-hop0"),
        "{hop}"
    );
    assert!(!std::path::Path::new(hop).exists(), "{hop} left behind");
    let masters = std::process::Command::new("pgrep")
        .args(["-f", hop])
        .output()
        .unwrap();
    assert!(
        masters.stdout.is_empty(),
        "a shared connection outlived the run: {}",
        String::from_utf8_lossy(&masters.stdout)
    );
    // The private control directory of the shared connections is gone.
    let dir = run
        .stderr
        .split("ControlPath=")
        .nth(1)
        .and_then(|rest| rest.split("/%C").next())
        .expect("no shared connection was used");
    assert!(dir.starts_with("/tmp/clan-ssh-"), "{dir}");
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
}

// A ControlPath of the user's own is kept: their ssh config's master serves the target, and
// the tool's own shared connection is used only for hosts without one.
#[test]
fn users_own_control_path_is_respected() {
    let lab = Lab::builder_and_target();
    let t = lab.ip("target").to_string();
    lab.prepend_ssh_config(
        "workstation",
        &format!("Host {t}\n  ControlMaster auto\n  ControlPath /root/.ssh/own-cm-%C\n  ControlPersist 20\n"),
    );
    let flake = remote_build(&lab);
    let out = toplevel(&lab, &flake, "m");
    let run = clan(&lab, &flake, &["machines", "update", "m", "--json"]);
    assert_eq!(run.code, 0);
    assert_activated(&lab, &out);
    let own_sockets: Vec<_> = std::fs::read_dir(lab.host("workstation").root().join(".ssh"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("own-cm-"))
        .collect();
    assert_eq!(own_sockets.len(), 1, "the user's own master was not used");
    // The log shows which ssh options each command used.
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let log = report["machines"][0]["log"].as_str().unwrap();
    let log = lab
        .host("workstation")
        .root()
        .join(std::path::Path::new(log).strip_prefix("/root").unwrap());
    let log = std::fs::read_to_string(log).unwrap();
    let (mut on_target, mut on_builder) = (0, 0);
    for line in log.lines().filter(|l| l.starts_with("$ ssh ")) {
        if line.contains(&format!("-- root@{t} ")) && !line.contains("ControlPath=none") {
            on_target += 1;
            assert!(
                !line.contains("ControlPath=/tmp/clan-ssh-"),
                "ours replaced the user's: {line}"
            );
        }
        if line.contains(&format!("-- root@{} ", lab.ip("builder"))) {
            on_builder += 1;
            assert!(
                line.contains("ControlPath=/tmp/clan-ssh-"),
                "the build host lost sharing: {line}"
            );
        }
    }
    assert!(
        on_target >= 3 && on_builder >= 1,
        "checked {on_target} target and {on_builder} build host commands"
    );
    let _ = lab.run_on_workstation(
        &flake,
        &[
            "ssh",
            "-o",
            "ControlPath=/root/.ssh/own-cm-%C",
            "-O",
            "exit",
            &t,
        ],
    );
}

// A build host that stops answering in the middle of a build (its sshd frozen: the TCP
// connection stays up, nothing answers) ends the deploy with an error that says so, within
// the keep-alive time, instead of hanging for as long as the build would have run. The
// address's own ServerAliveInterval (1 s here; clan's default is 15 s × 4) is used.
#[test]
fn a_build_host_that_stops_answering_ends_the_deploy() {
    let lab = Lab::builder_and_target();
    let flake = lab.write_flake(&format!(
        r#"{{ inventory.machines.m = {{ deploy.targetHost = "root@{}"; deploy.buildHost = "root@{}?ServerAliveInterval=1&ServerAliveCountMax=3"; }}; machines.m = system {{ variant = "stops-answering"; buildSeconds = 120; }}; }}"#,
        lab.ip("target"),
        lab.ip("builder")
    ));
    let started = std::time::Instant::now();
    let child = lab.spawn_on_workstation(
        &flake,
        &[env!("CARGO_BIN_EXE_clan"), "machines", "update", "m"],
    );
    // This lab's build, not another test's running beside it: its system has a name of its own.
    let build = wait_for_process(
        &lab,
        "^nix-store --realise /nix/store/[a-z0-9]*-nixos-system-m-stops-answering.drv",
    );
    let session = sshd_session_of(&build);
    let _stopped = Stopped::stop(&session);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "waited for the build instead of giving up on the host"
    );
    assert!(
        stderr.contains(&format!(
            "error: m: the build host root@{}?ServerAliveInterval=1&ServerAliveCountMax=3 \
             stopped answering during the build stage: no reply to ssh's keep-alives",
            lab.ip("builder")
        )),
        "{stderr}"
    );
    assert!(stderr.contains("hint: nothing was activated on the target"));
    assert_target_untouched(&lab);
}
