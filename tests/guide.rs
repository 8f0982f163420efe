//! Integration tests on the lab (real sshd, real nix), one per section of the build host
//! guide, named after it. Each asserts what the user sees and what each store ends in.

mod common;
use common::*;

/// A flake with one machine `m`, built by `system { … }`, whose inventory entry is `deploy`.
fn one_machine(lab: &Lab, deploy: &str, system_args: &str) -> std::path::PathBuf {
    lab.write_flake(&format!(
        "{{ inventory.machines.m = {{ {deploy} }}; machines.m = system {{ {system_args} }}; }}"
    ))
}

/// Deploys to the target, building on host `builder`.
fn built_on(lab: &Lab, builder: &str) -> String {
    format!(
        "{} deploy.buildHost = \"root@{}\";",
        target_of(lab),
        lab.ip(builder)
    )
}

fn target_of(lab: &Lab) -> String {
    format!("deploy.targetHost = \"root@{}\";", lab.ip("target"))
}

// Background: "By default, clan machines update <machine> evaluates your flake on your
// workstation, then builds and activates on deploy.targetHost."
#[test]
fn background_default_builds_on_the_target() {
    let lab = Lab::builder_and_target();
    let flake = one_machine(&lab, &target_of(&lab), "");
    let out = toplevel(&lab, &flake, "m");
    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 0);
    assert!(
        run.stderr.contains(&format!(
            "m: build on the target root@{} (no buildHost set",
            lab.ip("target")
        )),
        "provenance line missing"
    );
    assert_activated(&lab, &out);
    assert!(
        !run.stderr.contains("(build host "),
        "no step may run on a build host"
    );
    assert_eq!(
        lab.host("builder").store_entries(),
        0,
        "builder store touched"
    );
    assert!(
        !lab.host("workstation").has_path(&out),
        "built on the workstation"
    );
}

// "1. Set It in the Inventory" + "What Happens During a Deploy": evaluate here, build on
// the build host, the build host copies to the target, the target activates.
#[test]
fn what_happens_during_a_deploy_build_host_from_inventory() {
    let lab = Lab::builder_and_target();
    let deploy = built_on(&lab, "builder");
    let flake = one_machine(&lab, &deploy, "");
    let out = toplevel(&lab, &flake, "m");
    let run = clan(&lab, &flake, &["machines", "update", "m", "--json"]);
    assert_eq!(run.code, 0);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let run_id = report["run"].as_str().unwrap().to_string();
    assert!(run.stderr.contains(&format!(
        "m: build on root@{} (inventory.machines.m.deploy.buildHost)",
        lab.ip("builder")
    )));
    assert!(
        lab.host("builder").has_path(&out),
        "not built on the builder"
    );
    assert!(
        !lab.host("workstation").has_path(&out),
        "the closure passed through the workstation"
    );
    assert_activated(&lab, &out);
    // Quiet for people: one short line per step, no commands or wrappers (they are in the
    // run's log, and with -v).
    let lines = run.stderr.lines().count();
    assert!(
        lines < 25 && run.stderr.len() < 2048,
        "{lines} lines, {} bytes:\n{}",
        run.stderr.len(),
        run.stderr
    );
    for wrapper in [
        "sh -c",
        "clan-until-hangup",
        "ControlPath",
        "NIX_SSHOPTS",
        "(exit",
    ] {
        assert!(
            !run.stderr.contains(wrapper),
            "{wrapper:?} in:\n{}",
            run.stderr
        );
    }
    // The second hop really is the builder's: the target's sshd saw the builder's address.
    assert!(
        lab.host("target")
            .sshd_log()
            .contains(&format!("from {}", lab.ip("builder"))),
        "the builder never connected to the target"
    );
    // The temporary GC root on the builder (hosts share /tmp) is gone: this run's
    // /tmp/clan-<run>-build0, which held `system` → the toplevel.
    let root = std::path::PathBuf::from(format!("/tmp/clan-{run_id}-build0"));
    let leftovers: Vec<_> = [root].into_iter().filter(|r| r.exists()).collect();
    assert!(leftovers.is_empty(), "GC root left behind: {leftovers:?}");

    // Re-deploying the unchanged system: up to date, one round trip to the target, nothing
    // built, copied or switched.
    let builder_before = lab.host("builder").store_entries();
    let target_before = lab.host("target").store_entries();
    let logins_before = lab.host("builder").logins_by_source();
    let again = clan(&lab, &flake, &["machines", "update", "m", "--json"]);
    assert_eq!(again.code, 0);
    let report: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(result_of(&report, "m").as_deref(), Some("up to date"));
    assert!(
        again.stderr.contains(&format!(
            "m: up to date: root@{} runs this system already (--reactivate switches to it again)",
            lab.ip("target")
        )),
        "{}",
        again.stderr
    );
    assert_eq!(lab.host("target").switch_log().len(), 1, "switched again");
    assert_eq!(
        lab.host("builder").logins_by_source(),
        logins_before,
        "the build host was contacted"
    );

    // --reactivate switches again, and still copies and builds nothing new: the target
    // runs the system, so the plan has no copy (the re-activating line says so), and no
    // store gains a path.
    let watchdogs_before = watchdog_logs(&lab);
    assert_eq!(watchdogs_before.len(), 1, "the first deploy's watchdog");
    let again = clan(
        &lab,
        &flake,
        &["machines", "update", "m", "-v", "--reactivate"],
    );
    assert_eq!(again.code, 0);
    assert!(
        again
            .stderr
            .contains("[m] already running this system: re-activating")
    );
    // No watchdog for an unchanged system: none ran on the target (each writes its log).
    assert_eq!(
        watchdog_logs(&lab),
        watchdogs_before,
        "a watchdog for an unchanged system"
    );
    assert_eq!(lab.host("builder").store_entries(), builder_before);
    assert_eq!(lab.host("target").store_entries(), target_before);
    assert_eq!(lab.host("target").switch_log().len(), 2);
}

// "2. Or Set It in the Machine Configuration"
#[test]
fn machine_configuration_build_host() {
    let lab = Lab::builder_and_target();
    let system = format!("networking.buildHost = \"root@{}\";", lab.ip("builder"));
    let flake = one_machine(&lab, &target_of(&lab), &system);
    let out = toplevel(&lab, &flake, "m");
    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 0);
    assert!(run.stderr.contains(&format!(
        "m: build on root@{} (clan.core.networking.buildHost in m's configuration)",
        lab.ip("builder")
    )));
    assert!(lab.host("builder").has_path(&out));
    assert!(!lab.host("workstation").has_path(&out));
    assert_activated(&lab, &out);
}

// "3. Or Override from the CLI": --build-host
#[test]
fn override_from_the_cli_build_host() {
    let lab = Lab::builder_and_target();
    let flake = one_machine(&lab, &target_of(&lab), "");
    let out = toplevel(&lab, &flake, "m");
    let builder = format!("root@{}", lab.ip("builder"));
    let run = clan(
        &lab,
        &flake,
        &["machines", "update", "m", "--build-host", &builder],
    );
    assert_eq!(run.code, 0);
    assert!(
        run.stderr
            .contains(&format!("m: build on {builder} (--build-host)"))
    );
    assert!(lab.host("builder").has_path(&out));
    assert_activated(&lab, &out);
}

// "Pass localhost to force a local build, even if the inventory names a remote builder"
#[test]
fn override_from_the_cli_localhost_forces_a_local_build() {
    let lab = Lab::builder_and_target();
    let deploy = built_on(&lab, "builder");
    let flake = one_machine(&lab, &deploy, "");
    let out = toplevel(&lab, &flake, "m");
    let run = clan(
        &lab,
        &flake,
        &["machines", "update", "m", "--build-host", "localhost"],
    );
    assert_eq!(run.code, 0);
    assert!(
        run.stderr
            .contains("m: build on this machine (localhost) (--build-host)")
    );
    assert!(lab.host("workstation").has_path(&out), "not built locally");
    assert_eq!(lab.host("builder").store_entries(), 0, "builder touched");
    assert_activated(&lab, &out);
}

// "Resolution Order": with all three set, the highest wins and the provenance says so.
#[test]
fn resolution_order_highest_source_wins() {
    let lab = Lab::start(&[
        HostSpec::new("cli-builder"),
        HostSpec::new("inventory-builder"),
        HostSpec::new("config-builder"),
        HostSpec::new("target"),
    ]);
    for builder in ["cli-builder", "inventory-builder", "config-builder"] {
        lab.trust(builder, "target");
    }
    let deploy = built_on(&lab, "inventory-builder");
    let system = format!(
        "networking.buildHost = \"root@{}\";",
        lab.ip("config-builder")
    );
    let flake = one_machine(&lab, &deploy, &system);
    let out = toplevel(&lab, &flake, "m");

    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 0);
    assert!(run.stderr.contains(&format!(
        "m: build on root@{} (inventory.machines.m.deploy.buildHost)",
        lab.ip("inventory-builder")
    )));
    assert!(lab.host("inventory-builder").has_path(&out));
    assert_eq!(lab.host("config-builder").store_entries(), 0);

    let cli_builder = format!("root@{}", lab.ip("cli-builder"));
    let run = clan(
        &lab,
        &flake,
        // The target runs this system already: --reactivate, or it would be up to date.
        &[
            "machines",
            "update",
            "m",
            "--build-host",
            &cli_builder,
            "--reactivate",
        ],
    );
    assert_eq!(run.code, 0);
    assert!(
        run.stderr
            .contains(&format!("m: build on {cli_builder} (--build-host)"))
    );
    assert!(lab.host("cli-builder").has_path(&out));
    assert_eq!(lab.host("config-builder").store_entries(), 0);
    assert_activated(&lab, &out);
}

// "First Deploy: Host Key Verification" and "Host Key Verification Fails After the Build
// Succeeds": strict fails with the guide's error before activation (before the build, with
// the preflight); accept-new records the target's key on the build host.
#[test]
fn first_deploy_host_key_verification() {
    let lab = Lab::start(&[HostSpec::new("builder"), HostSpec::new("target")]);
    assert!(!lab.host("builder").knows_host(lab.ip("target")));
    let deploy = built_on(&lab, "builder");
    let flake = one_machine(&lab, &deploy, "");
    let out = toplevel(&lab, &flake, "m");
    let second_hop = format!(
        "host key verification failed on the second hop (build host root@{} → target root@{})",
        lab.ip("builder"),
        lab.ip("target")
    );

    let strict = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(strict.code, 1);
    assert!(
        strict
            .stderr
            .contains(&format!("preflight: m: {second_hop}"))
    );
    assert!(strict.stderr.contains("Host key verification failed."));
    assert!(strict.stderr.contains("--host-key-check accept-new"));
    assert_eq!(
        lab.host("builder").store_entries(),
        0,
        "preflight let the build start"
    );
    assert_target_untouched(&lab);

    let after_build = clan(&lab, &flake, &["machines", "update", "m", "--no-preflight"]);
    assert_eq!(after_build.code, 1);
    assert!(
        after_build
            .stderr
            .contains(&format!("error: m: {second_hop}"))
    );
    assert!(after_build.stderr.contains("--host-key-check accept-new"));
    assert!(
        lab.host("builder").has_path(&out),
        "the build should have run"
    );
    assert_target_untouched(&lab);

    let accept = clan(
        &lab,
        &flake,
        &["machines", "update", "m", "--host-key-check", "accept-new"],
    );
    assert_eq!(accept.code, 0);
    assert!(
        lab.host("builder").knows_host(lab.ip("target")),
        "the build host did not record the target's key"
    );
    assert_activated(&lab, &out);

    // Subsequent deploys can drop the flag.
    let again = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(again.code, 0);
}

// "Architectures Must Match" / "Architecture Mismatch Between Build Host and Target"
#[test]
fn architecture_mismatch_between_build_host_and_target() {
    let lab = Lab::start(&[
        HostSpec::new("builder").nix_system("aarch64-linux"),
        HostSpec::new("target"),
    ]);
    lab.trust("builder", "target");
    let deploy = built_on(&lab, "builder");
    let flake = one_machine(&lab, &deploy, "");
    let out = toplevel(&lab, &flake, "m");
    let builder = format!("the build host root@{}", lab.ip("builder"));

    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains(&format!(
        "preflight: m: {builder} builds aarch64-linux systems (extra platforms: "
    )));
    assert!(run.stderr.contains("cannot build this x86_64-linux system"));
    assert!(
        run.stderr
            .contains("pick a build host whose system is x86_64-linux")
    );
    assert!(run.stderr.contains("--build-host localhost"));
    assert_eq!(
        lab.host("builder").store_entries(),
        0,
        "preflight let the build start"
    );
    assert_target_untouched(&lab);

    let run = clan(&lab, &flake, &["machines", "update", "m", "--no-preflight"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains(&format!(
        "error: m: {builder} builds aarch64-linux systems and cannot build this x86_64-linux system"
    )));
    assert!(run.stderr.contains("--build-host localhost"));
    assert!(!lab.host("builder").has_path(&out));
    assert_target_untouched(&lab);
}

// "The value has the same format as targetHost: user@host:port?SSH_OPTION=SSH_VALUE":
// options apply to every connection to that host, the build host's nested copy included.
#[test]
fn host_address_ssh_options_apply_to_every_hop() {
    let lab = Lab::builder_and_target();
    lab.deauthorize_all("target");
    for host in ["workstation", "builder"] {
        lab.create_key(host, ".ssh/deploy_key");
        lab.authorize(host, ".ssh/deploy_key", "target");
    }
    let with_key = format!(
        "deploy.targetHost = \"root@{}?IdentityFile=/root/.ssh/deploy_key\"; deploy.buildHost = \"root@{}\";",
        lab.ip("target"),
        lab.ip("builder")
    );
    let without_key = built_on(&lab, "builder");

    // Control: the default keys are not accepted by the target.
    let flake = one_machine(&lab, &without_key, "");
    let denied = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(denied.code, 1);
    assert!(denied.stderr.contains("Permission denied"));
    assert!(
        denied
            .stderr
            .contains("permission denied on the second hop")
    );
    assert_target_untouched(&lab);

    let flake = one_machine(&lab, &with_key, "");
    let out = toplevel(&lab, &flake, "m");
    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 0);
    assert_activated(&lab, &out);
}

/// The logs the target's watchdogs wrote (`/run/clan/watchdog-<run>.log`), one per watchdog
/// that ran.
fn watchdog_logs(lab: &Lab) -> Vec<String> {
    let out = lab.exec("target", &["ls", "/run/clan"]);
    let mut logs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("watchdog-") && l.ends_with(".log"))
        .map(str::to_string)
        .collect();
    logs.sort();
    logs
}

/// Every place an injected command could have left its mark.
fn assert_no_canary(lab: &Lab) {
    for host in ["workstation", "builder", "target"] {
        assert!(
            !lab.host(host).root().join("canary").exists(),
            "injected command ran on {host}"
        );
    }
    assert!(!std::path::Path::new("/tmp/clan-canary").exists());
}

fn assert_nothing_happened(lab: &Lab) {
    assert_eq!(lab.host("builder").store_entries(), 0);
    assert_eq!(lab.host("target").store_entries(), 0);
    assert_target_untouched(lab);
    assert_no_canary(lab);
}

#[test]
fn bad_input_unknown_machine() {
    let lab = Lab::builder_and_target();
    let flake = one_machine(&lab, &target_of(&lab), "");
    let run = clan(&lab, &flake, &["machines", "update", "nope"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("unknown machine \"nope\" (from the command line)")
    );
    assert!(run.stderr.contains("defines m"));
    assert_nothing_happened(&lab);
}

// `--json` prints a report on every exit path: bad input and a preflight failure too.
#[test]
fn json_report_on_every_exit_path() {
    let lab = Lab::start(&[HostSpec::new("builder"), HostSpec::new("target")]);
    let flake = one_machine(&lab, &built_on(&lab, "builder"), "");
    let bad = clan(&lab, &flake, &["machines", "update", "nope", "--json"]);
    assert_eq!(bad.code, 2);
    let report: serde_json::Value = serde_json::from_str(&bad.stdout).unwrap();
    assert_eq!(report["exitCode"], 2);
    assert!(
        report["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("unknown machine \"nope\"")
    );
    // The builder does not know the target's key: the preflight stops the run.
    let preflight = clan(&lab, &flake, &["machines", "update", "m", "--json"]);
    assert_eq!(preflight.code, 1);
    let report: serde_json::Value = serde_json::from_str(&preflight.stdout).unwrap();
    assert_eq!(report["exitCode"], 1);
    assert!(report["run"].is_string());
    assert!(
        report["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("host key verification failed on the second hop")
    );
    // Each failure has its machine and a stable code, in the list and in the machine's entry.
    assert_eq!(report["errors"][0]["code"], "second-hop.host-key-unknown");
    assert_eq!(report["errors"][0]["machine"], "m");
    assert_eq!(report["machines"][0]["result"], "failed");
    assert_eq!(
        report["machines"][0]["errorCode"],
        "second-hop.host-key-unknown"
    );
    assert_nothing_happened(&lab);
}

#[test]
fn bad_input_no_target_host_anywhere() {
    let lab = Lab::builder_and_target();
    // As in clan-core, a machine with no address of its own has a default one from the
    // clan's domain: the plan names it and where it comes from.
    let flake = one_machine(&lab, "", "");
    let planned = clan(&lab, &flake, &["machines", "update", "m", "--dry-run"]);
    assert_eq!(planned.code, 0, "{}", planned.all());
    assert!(
        planned.stdout.contains(
            "m: deploy to root@m.clan (the default of clan.core.networking.targetHost in m's configuration: root@<hostName>.<meta.domain>)"
        ),
        "{}",
        planned.stdout
    );
    // No domain: no address anywhere, and every place one could be set is named.
    let flake = lab.write_flake(
        "{ meta.domain = null; inventory.machines.m = { }; machines.m = system { }; }",
    );
    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 2);
    for place in [
        "inventory.machines.m.deploy.targetHost",
        "clan.core.networking.targetHost",
        "--target-host",
        "meta.domain",
    ] {
        assert!(run.stderr.contains(place), "{place} not named");
    }
    assert_nothing_happened(&lab);
}

#[test]
fn bad_input_malformed_host_in_inventory() {
    let lab = Lab::builder_and_target();
    let deploy = format!(
        "{} deploy.buildHost = \"root@builder:notaport\";",
        target_of(&lab)
    );
    let flake = one_machine(&lab, &deploy, "");
    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains(
        "invalid host address \"root@builder:notaport\" in inventory.machines.m.deploy.buildHost: the port \"notaport\" is not a number"
    ));
    assert_nothing_happened(&lab);
}

#[test]
fn bad_input_injection_attempts_are_refused() {
    let lab = Lab::builder_and_target();
    let target = lab.ip("target").to_string();
    // Nix strings: `$(` needs no escaping, `\n` is a newline.
    let hostile_targets = [
        format!("root@{target}?IdentityFile=$(touch /root/canary)"),
        format!("root@{target}?IdentityFile=%24(touch%20/tmp/clan-canary)"),
        format!("root@{target}?IdentityFile=/k;touch /root/canary"),
        format!("root@{target}\\ntouch /root/canary"),
        format!("-oProxyCommand=touch /root/canary@{target}"),
        format!("root@{target}?ProxyCommand=touch%20/root/canary"),
    ];
    for hostile in &hostile_targets {
        let flake = one_machine(&lab, &format!("deploy.targetHost = \"{hostile}\";"), "");
        let run = clan(&lab, &flake, &["machines", "update", "m"]);
        assert_eq!(run.code, 2, "accepted {hostile:?}");
        assert!(
            run.stderr
                .contains("in inventory.machines.m.deploy.targetHost"),
            "source not named for {hostile:?}"
        );
    }
    let flake = one_machine(&lab, &target_of(&lab), "");
    for name in [
        "m;touch /root/canary",
        "$(touch /root/canary)",
        "m\ntouch /root/canary",
    ] {
        let run = clan(&lab, &flake, &["machines", "update", name]);
        assert_eq!(run.code, 2);
        assert!(run.stderr.contains("invalid machine name"));
        assert!(run.stderr.contains("(from the command line)"));
    }
    let run = clan(
        &lab,
        &flake,
        &[
            "machines",
            "update",
            "m",
            "--build-host",
            "root@b;touch /root/canary",
        ],
    );
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("invalid host address \"root@b;touch /root/canary\" in --build-host")
    );
    assert_nothing_happened(&lab);
}

// --dry-run prints the plan stage by stage and changes nothing on any host.
#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let lab = Lab::builder_and_target();
    let deploy = built_on(&lab, "builder");
    let flake = one_machine(&lab, &deploy, "");
    let out = toplevel(&lab, &flake, "m");
    let run = clan(&lab, &flake, &["machines", "update", "m", "--dry-run"]);
    assert_eq!(run.code, 0);
    let b = lab.ip("builder");
    let t = lab.ip("target");
    for expected in [
        "  copy derivations:\n    [workstation] env 'NIX_SSHOPTS=-o StrictHostKeyChecking=yes -o ServerAliveInterval=15 -o ServerAliveCountMax=4' nix --extra-experimental-features nix-command copy --derivation --to ssh://root@".to_string(),
        format!("  build:\n    [build host root@{b}] mkdir -m 0700 /tmp/clan-"),
        format!("    [build host root@{b}] nix-store --realise /nix/store/"),
        format!("/nix/var/nix/profiles/system {out}\n      (exit 1: no copy; exit 0, already running it: no copy, watchdog or summary)"),
        format!("  copy to target:\n    [target root@{t}] clan-target-state "),
        format!("watchdog or summary)\n    [build host root@{b}] env 'NIX_SSHOPTS=-o StrictHostKeyChecking=yes -o ServerAliveInterval=15 -o ServerAliveCountMax=4 -o BatchMode=yes -o ControlMaster=auto -o ControlPath=/tmp/clan-"),
        format!("-hop0 nix --extra-experimental-features nix-command copy --to ssh://root@{t} {out}   (if the target lacks the system)"),
        format!("  activate:\n    [target root@{t}] test -e {out}/nixos-version"),
        format!("    [target root@{t}] clan-activate lock "),
        format!("    [target root@{t}] clan-activate prepare "),
        format!(" switch {out} 30   (unless the target runs the system already)"),
        format!("\n      if it fails:\n        [target root@{t}] clan-activate undo "),
        format!("  clean up:\n    [build host root@{b}] clan-hop-cleanup /tmp/clan-"),
    ] {
        assert!(run.stdout.contains(&expected), "plan lacks {expected:?}");
    }
    assert!(!lab.host("workstation").has_path(&out));
    assert_nothing_happened(&lab);
}

// An activation that is not a NixOS system is refused before the profile changes.
#[test]
fn activation_refuses_a_toplevel_that_is_not_nixos() {
    let lab = Lab::builder_and_target();
    let flake = one_machine(&lab, &target_of(&lab), "variant = \"not-nixos\";");
    let out = toplevel(&lab, &flake, "m");
    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains(&format!(
        "m: {out} is not a NixOS system (it has no nixos-version or bin/switch-to-configuration); refusing to activate"
    )));
    assert!(lab.host("target").has_path(&out));
    assert_target_untouched(&lab);
}

// A failing build stops before anything is copied or activated.
#[test]
fn failed_build_stops_before_the_target() {
    let lab = Lab::builder_and_target();
    let deploy = built_on(&lab, "builder");
    let flake = one_machine(&lab, &deploy, "variant = \"fail\";");
    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("fixture build of m fails on purpose"));
    assert!(run.stderr.contains("building /nix/store/"));
    assert!(
        run.stderr
            .contains(&format!("failed on build host root@{}", lab.ip("builder")))
    );
    assert_eq!(lab.host("target").store_entries(), 0);
    assert_target_untouched(&lab);
}

// "Nix compatibility": the same deploy with a current Nix (2.26) on the workstation and the
// build host, the target on Nix 2.8; current Nix's messages are classified as the guide's cases.
#[test]
fn current_nix_on_workstation_and_build_host() {
    let lab = Lab::start(&[
        HostSpec::new(clan_lab::WORKSTATION).current_nix(),
        HostSpec::new("builder").current_nix(),
        HostSpec::new("arm-builder")
            .current_nix()
            .nix_system("aarch64-linux"),
        HostSpec::new("target"),
    ]);
    for host in ["workstation", "builder"] {
        let version = lab.exec(host, &["sh", "-c", "nix --version"]);
        assert!(
            String::from_utf8_lossy(&version.stdout).contains("2.26"),
            "{host} does not run the current Nix"
        );
    }
    let deploy = built_on(&lab, "builder");
    let flake = one_machine(&lab, &deploy, "");
    let out = toplevel(&lab, &flake, "m");

    let strict = clan(&lab, &flake, &["machines", "update", "m", "--no-preflight"]);
    assert_eq!(strict.code, 1);
    assert!(strict.stderr.contains(&format!(
        "failed to start SSH connection to 'root@{}'",
        lab.ip("target")
    )));
    assert!(
        strict
            .stderr
            .contains("host key verification failed on the second hop")
    );
    assert_target_untouched(&lab);

    let accept = clan(
        &lab,
        &flake,
        &["machines", "update", "m", "--host-key-check", "accept-new"],
    );
    assert_eq!(accept.code, 0);
    assert!(lab.host("builder").has_path(&out));
    assert!(!lab.host("workstation").has_path(&out));
    assert_activated(&lab, &out);

    let arm = format!("root@{}", lab.ip("arm-builder"));
    let mismatch = clan(
        &lab,
        &flake,
        &[
            "machines",
            "update",
            "m",
            "--build-host",
            &arm,
            "--no-preflight",
            "--reactivate",
        ],
    );
    assert_eq!(mismatch.code, 1);
    assert!(mismatch.stderr.contains(&format!(
        "the build host {arm} builds aarch64-linux systems and cannot build this x86_64-linux system"
    )));
}

// "The value has the same format as targetHost": an address without a user gets the User
// the user's ssh config sets for that host, else root.
#[test]
fn host_address_without_user_takes_ssh_config_user_else_root() {
    let lab = Lab::builder_and_target();
    let t = lab.ip("target").to_string();
    let flake = one_machine(&lab, &format!("deploy.targetHost = \"{t}\";"), "");
    let plain = clan(&lab, &flake, &["machines", "update", "m", "--dry-run"]);
    assert_eq!(plain.code, 0);
    assert!(
        plain
            .stdout
            .contains(&format!("m: deploy to root@{t} (inventory"))
    );

    lab.prepend_ssh_config("workstation", &format!("Host {t}\n  User deploy\n"));
    let configured = clan(&lab, &flake, &["machines", "update", "m", "--dry-run"]);
    assert_eq!(configured.code, 0);
    assert!(
        configured
            .stdout
            .contains(&format!("m: deploy to deploy@{t} (inventory"))
    );
    assert!(
        configured
            .stdout
            .contains(&format!("--to ssh://deploy@{t}"))
    );
}

// Keep-alives are clan's default on every connection, unless the user's ssh config sets its
// own for that host: then it is theirs, and clan adds none.
#[test]
fn keepalives_unless_the_ssh_config_sets_them() {
    let lab = Lab::builder_and_target();
    let deploy = built_on(&lab, "builder");
    let flake = one_machine(&lab, &deploy, "");
    let b = lab.ip("builder").to_string();
    let copy_line = |run: &Run| {
        run.stdout
            .lines()
            .find(|l| l.contains("copy --derivation"))
            .unwrap_or_default()
            .to_string()
    };
    let ours = clan(&lab, &flake, &["machines", "update", "m", "--dry-run"]);
    assert_eq!(ours.code, 0);
    assert!(
        copy_line(&ours).contains("-o ServerAliveInterval=15 -o ServerAliveCountMax=4"),
        "{}",
        ours.stdout
    );
    lab.prepend_ssh_config(
        "workstation",
        &format!("Host {b}\n  ServerAliveInterval 7\n"),
    );
    let theirs = clan(&lab, &flake, &["machines", "update", "m", "--dry-run"]);
    assert_eq!(theirs.code, 0);
    assert!(
        !copy_line(&theirs).contains("ServerAlive"),
        "{}",
        theirs.stdout
    );
    // The build host's own copy to the target keeps them: that config is not on it.
    assert!(
        theirs
            .stdout
            .contains("-o ServerAliveInterval=15 -o ServerAliveCountMax=4 -o BatchMode=yes")
    );
}

// clan-core picks up machines/<name>/configuration.nix; so does this library.
#[test]
fn machine_directory_configuration_is_picked_up() {
    let lab = Lab::builder_and_target();
    let flake = lab.write_flake(&format!(
        "{{ inventory.machines.from-dir = {{ {} }}; }}",
        target_of(&lab)
    ));
    lab.write_flake_file(
        "machines/from-dir/configuration.nix",
        r#"{ config, ... }: {
          nixpkgs.hostPlatform = "x86_64-linux";
          system.build.toplevel = derivation {
            name = "nixos-system-from-dir";
            system = "x86_64-linux";
            builder = "/bin/sh";
            PATH = "/usr/bin:/bin";
            args = [ "-c" ''
              mkdir -p $out/bin; echo dir > $out/nixos-version
              printf '#!/bin/sh\necho "%s $1" >> /root/switch-to-configuration.log\n' "$out" > $out/bin/switch-to-configuration
              chmod +x $out/bin/switch-to-configuration
            '' ];
          };
        }"#,
    );
    let out = toplevel(&lab, &flake, "from-dir");
    assert!(out.ends_with("-nixos-system-from-dir"));
    let run = clan(&lab, &flake, &["machines", "update", "from-dir"]);
    assert_eq!(run.code, 0);
    assert_activated(&lab, &out);
}

// Every flag is described in --help.
#[test]
fn help_describes_every_flag() {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_clan"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(help(&["--help"]).contains("machines"));
    let update = help(&["machines", "update", "--help"]);
    for flag in [
        "--flake",
        "--build-host",
        "--target-host",
        "--host-key-check",
        "--dry-run",
        "[MACHINE]...",
    ] {
        assert!(update.contains(flag), "--help lacks {flag}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clan"))
        .args(["machines", "update", "--host-key-check", "tofu", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "tofu is not accepted");
}
