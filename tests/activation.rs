//! Activation that never lies: actions, the change summary, the watchdog (lost target,
//! long switch, stale watchdog), exact-generation rollback, the target's deploy lock, sudo,
//! and Ctrl-C. Every scenario runs on both kinds of target: a namespace host (no init) and
//! a systemd host (systemd as PID 1, as on NixOS). Each asserts the target's profile,
//! `/run/current-system`, what `switch-to-configuration` recorded, and what of clan remains.

mod common;
use common::*;

use clan_lab::HostKind;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Runs `$body` (a fn taking a [`HostKind`]) as one test per kind of target.
macro_rules! on_both_kinds {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn namespace() {
                    super::$name(clan_lab::HostKind::Namespace);
                }
                #[test]
                fn systemd() {
                    super::$name(clan_lab::HostKind::Systemd);
                }
            }
        )*
    };
}

on_both_kinds!(
    actions_switch_boot_test_dry_activate,
    change_summary_before_activation,
    lost_target_rolls_back_to_the_exact_previous_generation,
    confirmed_system_stays_and_nothing_remains,
    switch_longer_than_the_timeout_is_never_rolled_back,
    switch_that_restarts_sshd_completes,
    stale_watchdog_of_a_killed_run_never_acts,
    failed_generations_are_never_gone_back_to,
    two_runs_of_one_machine_take_turns,
    sudo_password_never_reaches_the_switch,
    wrong_sudo_password_is_found_before_the_build,
    ctrl_c_during_activation_finishes_and_exits_130,
    rollback_command_goes_to_the_generation_before,
    rollback_command_with_a_sudo_password,
    non_root_target_with_passwordless_sudo,
    the_readme_sudoers_rule_is_all_a_deploy_needs,
    a_silent_workstation_lets_go_of_the_target_lock,
    switch_that_kills_ssh_sessions_is_confirmed,
    unreachable_after_the_switch_is_left_to_the_watchdog,
    rerun_after_a_killed_switch_takes_over_and_confirms,
    a_closed_output_does_not_stop_the_deploy,
    a_specialisation_with_no_check,
);

// clan-core's --specialisation and --no-check: the profile is the system, the switch is the
// specialisation's, with NIXOS_NO_CHECK=1; a specialisation the system lacks is refused
// before anything changes, also where the target runs the system already.
fn a_specialisation_with_no_check(kind: HostKind) {
    let lab = target_lab(kind);
    let f = flake(&lab, r#"specialisations = [ "gpu" ];"#);
    let out = toplevel(&lab, &f, "m");
    let run = update(&lab, &f, &["--specialisation", "gpu", "--no-check"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(
        switches(&lab).last().unwrap(),
        &format!("{out}/specialisation/gpu switch NIXOS_NO_CHECK=1")
    );
    assert_system(&lab, Some(&out), Some(&out));
    assert_nothing_left(&lab);
    // The target runs the system: a specialisation is activated again, not "up to date".
    let again = update(&lab, &f, &["--specialisation", "gpu"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert_eq!(
        switches(&lab).last().unwrap(),
        &format!("{out}/specialisation/gpu switch NIXOS_NO_CHECK=")
    );
    let before = switches(&lab).len();
    let missing = update(&lab, &f, &["--specialisation", "nope"]);
    assert_eq!(missing.code, 1, "{}", missing.all());
    assert!(
        missing
            .stderr
            .contains("lacks the specialisation asked for with --specialisation"),
        "{}",
        missing.stderr
    );
    assert_eq!(switches(&lab).len(), before, "something was switched");
    let bad = update(&lab, &f, &["--specialisation", "../x"]);
    assert_eq!(bad.code, 2, "{}", bad.all());
    assert_eq!(switches(&lab).len(), before);
}

fn target_lab(kind: HostKind) -> Lab {
    Lab::start(&[HostSpec::new("target").kind(kind)])
}

/// A flake with machine `m` on the lab's target, built on the target, with `system` args.
fn flake(lab: &Lab, system_args: &str) -> PathBuf {
    flake_as(lab, "root", system_args)
}

fn flake_as(lab: &Lab, user: &str, system_args: &str) -> PathBuf {
    lab.write_flake(&format!(
        r#"{{ inventory.machines.m = {{ deploy.targetHost = "{user}@{}"; }}; machines.m = system {{ {system_args} }}; }}"#,
        lab.ip("target")
    ))
}

fn sshd_answers(lab: &Lab) -> bool {
    let addr: SocketAddr = format!("{}:22", lab.ip("target")).parse().unwrap();
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

fn update(lab: &Lab, f: &std::path::Path, extra: &[&str]) -> Run {
    let mut args = vec!["machines", "update", "m", "--log-format", "plain"];
    args.extend_from_slice(extra);
    clan(lab, f, &args)
}

/// Deploys `variant` and returns its toplevel.
fn deploy(lab: &Lab, system_args: &str) -> String {
    let f = flake(lab, system_args);
    let out = toplevel(lab, &f, "m");
    let run = update(lab, &f, &["--rollback-timeout", "10"]);
    assert_eq!(run.code, 0, "deploying {system_args} failed");
    assert_system(lab, Some(&out), Some(&out));
    out
}

/// The target's profile points to `profile`, and it runs `running` (`/run/current-system`).
fn assert_system(lab: &Lab, profile: Option<&str>, running: Option<&str>) {
    assert_eq!(
        lab.host("target").system_profile().as_deref(),
        profile,
        "system profile"
    );
    assert_eq!(
        lab.current_system("target").as_deref(),
        running,
        "/run/current-system"
    );
}

/// Nothing of clan runs on the target any more: no watchdog, no switch, no lock holder,
/// and no activation is pending (no `/run/clan/activation-RUN` record, which is what a
/// watchdog acts on). So nothing can change the target's system later: the tests show it
/// by this state, not by waiting to see that nothing happens (one test per kind of host
/// waits, `stale_watchdog_of_a_killed_run_never_acts`).
fn assert_nothing_left(lab: &Lab) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = lab.clan_leftovers("target");
        if left.trim().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left on the target:\n{left}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let records = lab.exec("target", &["ls", "/run/clan"]);
    let pending: Vec<String> = String::from_utf8_lossy(&records.stdout)
        .lines()
        .filter(|l| l.starts_with("activation-"))
        .map(str::to_string)
        .collect();
    assert!(pending.is_empty(), "pending on the target: {pending:?}");
}

fn switches(lab: &Lab) -> Vec<String> {
    lab.host("target").switch_log()
}

/// The target's watchdog goes back by itself to `previous` (its sshd answers again, it runs
/// it), to exactly the generations it had before (the broken one deleted), and nothing is
/// left pending.
fn assert_the_watchdog_went_back(lab: &Lab, previous: &str, generations_before: &[(u32, String)]) {
    wait_for(30, "the watchdog's rollback", || {
        lab.host("target").system_profile().as_deref() == Some(previous) && sshd_answers(lab)
    });
    wait_for(10, "the previous system to run", || {
        lab.current_system("target").as_deref() == Some(previous)
    });
    assert_eq!(switches(lab).last().unwrap(), &format!("{previous} switch"));
    assert_eq!(lab.generations("target"), generations_before);
    assert_nothing_left(lab);
}

/// Waits until `cond` holds, for at most `secs`.
fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn actions_switch_boot_test_dry_activate(kind: HostKind) {
    let lab = target_lab(kind);
    let v1 = deploy(&lab, r#"packages = [ "hello-2.10" ];"#);
    let f = flake(&lab, r#"variant = "v2";"#);
    let v2 = toplevel(&lab, &f, "m");

    let run = update(&lab, &f, &["--action", "dry-activate", "--json"]);
    assert_eq!(run.code, 0);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["machines"][0]["result"], "dry-activated");
    assert_system(&lab, Some(&v1), Some(&v1));
    assert_eq!(
        switches(&lab).last().unwrap(),
        &format!("{v2} dry-activate")
    );

    let run = update(&lab, &f, &["--action", "test"]);
    assert_eq!(run.code, 0);
    assert_system(&lab, Some(&v1), Some(&v2));
    assert_eq!(switches(&lab).last().unwrap(), &format!("{v2} test"));

    let run = update(&lab, &f, &["--action", "boot"]);
    assert_eq!(run.code, 0);
    assert_system(&lab, Some(&v2), Some(&v2));
    assert_eq!(switches(&lab).last().unwrap(), &format!("{v2} boot"));

    // It runs v2 and its profile points to v2: a switch has nothing to do…
    let run = update(&lab, &f, &["--json"]);
    assert_eq!(run.code, 0);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["machines"][0]["result"], "up to date");
    assert_eq!(switches(&lab).last().unwrap(), &format!("{v2} boot"));
    // …unless asked to switch again.
    let run = update(&lab, &f, &["--reactivate"]);
    assert_eq!(run.code, 0);
    assert_eq!(switches(&lab).last().unwrap(), &format!("{v2} switch"));
    assert_nothing_left(&lab);
}

fn change_summary_before_activation(kind: HostKind) {
    let lab = target_lab(kind);
    let v1 = deploy(&lab, r#"packages = [ "hello-2.10" "tool-1.0" ];"#);
    let f = flake(&lab, r#"packages = [ "hello-2.12" "newtool-0.3" ];"#);
    let run = update(&lab, &f, &[]);
    assert_eq!(run.code, 0);
    assert!(
        run.stderr.contains("hello: 2.10 → 2.12"),
        "no version change"
    );
    assert!(run.stderr.contains("newtool: ∅ → 0.3"));
    assert!(run.stderr.contains("tool: 1.0 → ∅"));
    // Not a terminal: no colour codes (Nix colours its summary).
    assert!(!run.stderr.contains('\u{1b}'), "{}", run.stderr);
    assert!(!run.stderr.contains("[32;1m"), "{}", run.stderr);
    // Computed on the target, from its own store: the workstation never had the closures.
    assert!(!lab.host("workstation").has_path(&v1));
    let again = update(&lab, &flake(&lab, ""), &["--no-diff"]);
    assert_eq!(again.code, 0);
    assert!(!again.stderr.contains("Changes on m:"));
}

// The new system stops sshd: the workstation cannot log in again, so the target goes back to
// the exact generation it had before, deletes the broken one, and is reachable again.
fn lost_target_rolls_back_to_the_exact_previous_generation(kind: HostKind) {
    let lab = target_lab(kind);
    let v1 = deploy(&lab, "");
    let generations_before = lab.generations("target");
    let f = flake(&lab, r#"variant = "breaks-ssh";"#);
    let broken = toplevel(&lab, &f, "m");
    let run = update(&lab, &f, &["--rollback-timeout", "6"]);
    assert_eq!(run.code, 3, "a lost target may be half-updated");
    assert!(run.stderr.contains(&format!(
        "m: cannot log in to the target root@{} over a fresh ssh connection",
        lab.ip("target")
    )));
    assert!(switches(&lab).contains(&format!("{broken} switch")));
    assert_the_watchdog_went_back(&lab, &v1, &generations_before);
    // And it can be deployed to again.
    assert_eq!(
        update(&lab, &flake(&lab, r#"variant = "v3";"#), &[]).code,
        0
    );
}

fn confirmed_system_stays_and_nothing_remains(kind: HostKind) {
    let lab = target_lab(kind);
    deploy(&lab, "");
    let f = flake(&lab, r#"variant = "v2";"#);
    let v2 = toplevel(&lab, &f, "m");
    let run = update(&lab, &f, &["--rollback-timeout", "10"]);
    assert_eq!(run.code, 0);
    assert_nothing_left(&lab);
    assert_system(&lab, Some(&v2), Some(&v2));
    assert_eq!(switches(&lab).last().unwrap(), &format!("{v2} switch"));
}

// The countdown starts when the switch has ended: a switch of 10 s with a 7 s timeout is
// never rolled back, then or later.
fn switch_longer_than_the_timeout_is_never_rolled_back(kind: HostKind) {
    let lab = target_lab(kind);
    deploy(&lab, "");
    let f = flake(&lab, r#"variant = "slow"; switchSeconds = 10;"#);
    let slow = toplevel(&lab, &f, "m");
    let run = update(&lab, &f, &["--rollback-timeout", "7", "--json"]);
    assert_eq!(run.code, 0);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["machines"][0]["result"], "deployed");
    assert_system(&lab, Some(&slow), Some(&slow));
    assert_nothing_left(&lab);
    assert_system(&lab, Some(&slow), Some(&slow));
    assert_eq!(
        switches(&lab)[switches(&lab).len() - 2..],
        [format!("{slow} switch"), format!("{slow} switch done")],
        "something switched after the slow switch"
    );
    assert_nothing_left(&lab);
}

// A switch that restarts sshd (as real switches do) completes, and is confirmed.
fn switch_that_restarts_sshd_completes(kind: HostKind) {
    let lab = target_lab(kind);
    deploy(&lab, "");
    let f = flake(&lab, r#"variant = "restarts-ssh";"#);
    let new = toplevel(&lab, &f, "m");
    let run = update(&lab, &f, &["--rollback-timeout", "8"]);
    assert_eq!(run.code, 0);
    assert_system(&lab, Some(&new), Some(&new));
    assert_nothing_left(&lab);
    assert_system(&lab, Some(&new), Some(&new));
}

// Run 1 is killed (SIGKILL) during its switch; its watchdog is still pending. Run 2 takes
// over: it waits for the switch, stands the watchdog down, deploys, and its result holds.
fn stale_watchdog_of_a_killed_run_never_acts(kind: HostKind) {
    let lab = target_lab(kind);
    deploy(&lab, "");
    let f1 = flake(&lab, r#"variant = "v2"; switchSeconds = 3;"#);
    let started = lab.host("target").root().join("switch-started");
    let _ = std::fs::remove_file(&started);
    let child = lab.spawn_on_workstation(
        &f1,
        &[
            env!("CARGO_BIN_EXE_clan"),
            "machines",
            "update",
            "m",
            "--rollback-timeout",
            "5",
        ],
    );
    wait_for(60, "run 1's switch", || started.exists());
    let status = std::process::Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = child.wait_with_output();

    let f2 = flake(&lab, r#"variant = "v3";"#);
    let v3 = toplevel(&lab, &f2, "m");
    let run = update(&lab, &f2, &["--rollback-timeout", "10"]);
    assert_eq!(run.code, 0);
    assert_system(&lab, Some(&v3), Some(&v3));
    std::thread::sleep(Duration::from_secs(10));
    assert_system(&lab, Some(&v3), Some(&v3));
    assert_eq!(switches(&lab).last().unwrap(), &format!("{v3} switch"));
    assert_nothing_left(&lab);
}

// A failed switch goes back to the exact previous generation and deletes the failed one:
// neither `clan machines rollback` nor the next failed switch's undo ever lands on it.
fn failed_generations_are_never_gone_back_to(kind: HostKind) {
    let lab = target_lab(kind);
    let v1 = deploy(&lab, "");
    let v2 = deploy(&lab, r#"variant = "v2";"#);
    let f = flake(&lab, r#"variant = "switch-fails";"#);
    let bad = toplevel(&lab, &f, "m");
    let run = update(&lab, &f, &["--rollback-timeout", "5"]);
    assert_eq!(run.code, 3);
    assert!(
        run.stderr
            .contains("activating the fixture failed on purpose")
    );
    assert!(
        run.stderr
            .contains("m: switch-to-configuration failed on root@")
    );
    assert!(run.stderr.contains("the failed generation was deleted"));
    assert_system(&lab, Some(&v2), Some(&v2));
    assert!(
        lab.generations("target").iter().all(|(_, p)| *p != bad),
        "the failed generation is still in the profile"
    );
    // Its watchdog stood down: no second rollback later.
    assert_nothing_left(&lab);
    assert_system(&lab, Some(&v2), Some(&v2));

    let back = clan(&lab, &f, &["machines", "rollback", "m"]);
    assert_eq!(back.code, 0);
    assert_system(&lab, Some(&v1), Some(&v1));

    let f4 = flake(&lab, r#"variant = "switch-fails"; packages = [ "x-1" ];"#);
    let run = update(&lab, &f4, &["--rollback-timeout", "5"]);
    assert_eq!(run.code, 3);
    assert_system(&lab, Some(&v1), Some(&v1));
    assert!(
        lab.generations("target")
            .iter()
            .all(|(_, p)| *p == v1 || *p == v2),
        "a failed generation is left: {:?}",
        lab.generations("target")
    );
    assert_nothing_left(&lab);
}

// Two runs of one machine, the second started during the first's switch: the second waits
// for the first's lock, says who holds it, and the end state is exactly its own system.
fn two_runs_of_one_machine_take_turns(kind: HostKind) {
    let lab = target_lab(kind);
    deploy(&lab, "");
    let clan_bin = env!("CARGO_BIN_EXE_clan");
    let args = [
        clan_bin,
        "machines",
        "update",
        "m",
        "--log-format",
        "plain",
        "--rollback-timeout",
        "10",
    ];
    // Each run its own flake directory, both written before either starts (a run reads its
    // flake.nix when its evaluation starts, which a loaded machine may delay).
    let machine = |variant: &str| {
        format!(
            r#"{{ inventory.machines.m = {{ deploy.targetHost = "root@{}"; }}; machines.m = system {{ {variant} }}; }}"#,
            lab.ip("target")
        )
    };
    let f1 = lab.write_flake_in(
        "flake1",
        &machine(r#"variant = "v2"; switchSeconds = 6;"#),
        0,
    );
    let f2 = lab.write_flake_in("flake2", &machine(r#"variant = "v3";"#), 0);
    let v3 = toplevel(&lab, &f2, "m");
    let started = lab.host("target").root().join("switch-started");
    let _ = std::fs::remove_file(&started);
    let first = lab.spawn_on_workstation(&f1, &args);
    // The first run holds the lock from before its switch until it is confirmed: the second
    // starts once that switch has begun.
    wait_for(60, "the first run's switch", || started.exists());
    let second = lab.spawn_on_workstation(&f2, &args);
    let first = first.wait_with_output().unwrap();
    let second = second.wait_with_output().unwrap();
    let (e1, e2) = (
        String::from_utf8_lossy(&first.stderr),
        String::from_utf8_lossy(&second.stderr),
    );
    eprintln!("--- first ---\n{e1}\n--- second ---\n{e2}");
    assert_eq!(first.status.code(), Some(0));
    assert_eq!(second.status.code(), Some(0));
    assert!(e2.contains("waiting for the target's deploy lock, held by run "));
    assert!(e2.contains("from root@"));
    assert_system(&lab, Some(&v3), Some(&v3));
    assert_eq!(switches(&lab).last().unwrap(), &format!("{v3} switch"));
    assert_nothing_left(&lab);
}

/// A target whose deploy users reach Nix through its daemon; `trusted` are trusted users.
fn non_root_lab(kind: HostKind, trusted: &[&str]) -> Lab {
    let lab = Lab::start(&[HostSpec::new("target").kind(kind).nix_daemon(trusted)]);
    lab.add_user("target", "deploy", None);
    lab.add_user("target", "deploypw", Some("lab-sudo-secret"));
    lab
}

// sudo needs no password for the commands clan runs, but a password for everything else:
// the password line is read by clan's wrapper and never reaches a command's input.
fn sudo_password_never_reaches_the_switch(kind: HostKind) {
    let lab = non_root_lab(kind, &["deploypw"]);
    lab.sudo_rule(
        "deploypw",
        "deploypw ALL=(ALL) NOPASSWD: /usr/bin/sh, /bin/sh, /nix/store/*/bin/switch-to-configuration\ndeploypw ALL=(ALL) ALL",
    );
    let f = flake_as(&lab, "deploypw", "");
    let out = toplevel(&lab, &f, "m");
    let run = lab.run_on_workstation_with_input(
        &f,
        &[env!("CARGO_BIN_EXE_clan"), "machines", "update", "m"],
        "lab-sudo-secret\n",
    );
    eprintln!("{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(run.status.code(), Some(0));
    assert_system(&lab, Some(&out), Some(&out));
    let stdin = std::fs::read_to_string(lab.host("target").root().join("switch-stdin.log"))
        .unwrap_or_default();
    assert!(
        !stdin.contains("lab-sudo-secret"),
        "the switch got the password"
    );
    assert!(
        !String::from_utf8_lossy(&run.stderr).contains("lab-sudo-secret"),
        "the password was shown"
    );
    assert_nothing_left(&lab);
}

fn wrong_sudo_password_is_found_before_the_build(kind: HostKind) {
    let lab = non_root_lab(kind, &["deploypw"]);
    let f = flake_as(&lab, "deploypw", r#"variant = "never-built";"#);
    let out = toplevel(&lab, &f, "m");
    let run = lab.run_on_workstation_with_input(
        &f,
        &[env!("CARGO_BIN_EXE_clan"), "machines", "update", "m"],
        "not-the-password\n",
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    eprintln!("{stderr}");
    assert_eq!(run.status.code(), Some(1));
    assert!(stderr.contains("refused the password (preflight)"));
    assert!(!lab.host("target").has_path(&out), "it was built anyway");
    assert_system(&lab, None, None);
}

// Ctrl-C during activation: the activation finishes (a half-done switch is worse), the run
// exits 130, and the summary says what the machine was left on.
fn ctrl_c_during_activation_finishes_and_exits_130(kind: HostKind) {
    let lab = target_lab(kind);
    let f = flake(&lab, r#"variant = "slow"; switchSeconds = 3;"#);
    let out_path = toplevel(&lab, &f, "m");
    let started = lab.host("target").root().join("switch-started");
    let child = lab.spawn_on_workstation(
        &f,
        &[
            env!("CARGO_BIN_EXE_clan"),
            "machines",
            "update",
            "m",
            "--log-format",
            "plain",
        ],
    );
    wait_for(60, "the switch to start", || started.exists());
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(130));
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("m ") && l.contains("deployed")),
        "the summary does not say what m was left on"
    );
    assert_system(&lab, Some(&out_path), Some(&out_path));
    assert!(
        switches(&lab).iter().any(|l| l.ends_with(" done")),
        "the switch was cut short"
    );
    assert_nothing_left(&lab);
}

fn rollback_command_goes_to_the_generation_before(kind: HostKind) {
    let lab = target_lab(kind);
    let v1 = deploy(&lab, "");
    let v2 = deploy(&lab, r#"variant = "v2";"#);
    let f = flake(&lab, "");
    let run = clan(&lab, &f, &["machines", "rollback", "m"]);
    assert_eq!(run.code, 0);
    // Where it goes is shown before it goes there.
    assert!(run.stderr.contains(&format!(
        "m: rolling back root@{} from generation 2 to generation 1 ({v1})",
        lab.ip("target")
    )));
    assert!(
        run.stderr
            .contains("m: rolled back: the system profile points to generation 1")
    );
    assert_system(&lab, Some(&v1), Some(&v1));
    assert_eq!(switches(&lab).last().unwrap(), &format!("{v1} switch"));
    // Rolling back keeps the newer generation (it did not fail): it can be deployed again.
    assert!(lab.generations("target").iter().any(|(_, p)| *p == v2));
    let nothing = clan(&lab, &f, &["machines", "rollback", "m"]);
    assert_eq!(nothing.code, 1);
    assert!(nothing.stderr.contains("no previous generation"));
    assert_system(&lab, Some(&v1), Some(&v1));
    // --to names the generation: one that does not exist is refused, changing nothing.
    let missing = clan(&lab, &f, &["machines", "rollback", "m", "--to", "7"]);
    assert_eq!(missing.code, 2);
    assert!(
        missing
            .stderr
            .contains("there is no generation 7 (generations: 1, 2)")
    );
    // `clan machines generations` lists them, the current one marked.
    let listed = clan(&lab, &f, &["machines", "generations", "m"]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert_eq!(
        listed.stdout,
        format!("   1  {v1}  (current)\n   2  {v2}\n")
    );
    let to = clan(&lab, &f, &["machines", "rollback", "m", "--to", "2"]);
    assert_eq!(to.code, 0);
    assert_system(&lab, Some(&v2), Some(&v2));
    assert_nothing_left(&lab);
}

fn rollback_command_with_a_sudo_password(kind: HostKind) {
    let lab = non_root_lab(kind, &["deploypw"]);
    let clan_bin = env!("CARGO_BIN_EXE_clan");
    let password = "lab-sudo-secret\n";
    let v1_flake = flake_as(&lab, "deploypw", "");
    let v1 = toplevel(&lab, &v1_flake, "m");
    let deploy = |f: &std::path::Path| {
        lab.run_on_workstation_with_input(f, &[clan_bin, "machines", "update", "m"], password)
    };
    assert_eq!(deploy(&v1_flake).status.code(), Some(0));
    let v2_flake = flake_as(&lab, "deploypw", r#"variant = "v2";"#);
    assert_eq!(deploy(&v2_flake).status.code(), Some(0));
    let out = lab.run_on_workstation_with_input(
        &v2_flake,
        &[clan_bin, "machines", "rollback", "m"],
        password,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(0));
    assert!(!stderr.contains("lab-sudo-secret"));
    assert_system(&lab, Some(&v1), Some(&v1));
    assert_nothing_left(&lab);
}

fn non_root_target_with_passwordless_sudo(kind: HostKind) {
    let lab = non_root_lab(kind, &["deploy"]);
    let f = flake_as(&lab, "deploy", "");
    let out = toplevel(&lab, &f, "m");
    let run = update(&lab, &f, &["-v"]);
    assert_eq!(run.code, 0);
    assert!(run.stderr.contains("sudo clan-activate prepare "));
    assert_system(&lab, Some(&out), Some(&out));
    // switch-to-configuration ran as root: it wrote root's log.
    assert_eq!(switches(&lab), vec![format!("{out} switch")]);
    assert_nothing_left(&lab);
}

// The sudoers rule the README shows (clan::ssh::sudoers_rule) is all a non-root target user
// needs: sudo runs clan's scripts by their fixed paths, installed once through the one fixed
// install command. Deploys and a rollback go through; on a systemd target the journal shows
// each sudo call as one short line, and the script's text never.
fn the_readme_sudoers_rule_is_all_a_deploy_needs(kind: HostKind) {
    let lab = non_root_lab(kind, &["deployrule"]);
    lab.add_user("target", "deployrule", None);
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let rule = readme
        .lines()
        .find(|l| l.starts_with("deploy ALL=(root) NOPASSWD: "))
        .expect("the README's sudoers rule");
    assert_eq!(
        rule,
        clan::ssh::sudoers_rule("deploy"),
        "the README is not current"
    );
    lab.sudo_rule("deployrule", &rule.replacen("deploy ", "deployrule ", 1));
    // Nothing else: sudo refuses any other command.
    let other = lab.exec(
        "target",
        &["su", "deployrule", "-s", "/bin/sh", "-c", "sudo -n true"],
    );
    assert!(!other.status.success());

    let v1_flake = flake_as(&lab, "deployrule", "");
    let v1 = toplevel(&lab, &v1_flake, "m");
    let run = update(&lab, &v1_flake, &[]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_system(&lab, Some(&v1), Some(&v1));
    let v2_flake = flake_as(&lab, "deployrule", r#"variant = "v2";"#);
    let v2 = toplevel(&lab, &v2_flake, "m");
    let run = update(&lab, &v2_flake, &[]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_system(&lab, Some(&v2), Some(&v2));
    let back = clan(&lab, &v2_flake, &["machines", "rollback", "m"]);
    assert_eq!(back.code, 0, "{}", back.all());
    assert_system(&lab, Some(&v1), Some(&v1));
    // Secrets go through the same rule (clan-vars-upload), and are decrypted on the target.
    let id = install_age_identity(&lab);
    let secrets_flake = lab.write_flake(&format!(
        r#"{{ vars.settings.secretStore = "age"; vars.settings.recipients.default = [ "{public}" ];
             inventory.machines.m.deploy.targetHost = "deployrule@{t}";
             machines.m = {{ imports = [ (system {{ variant = "v3";
               vars = {{ api = {{ files.token = {{ }}; script = "echo tok-through-sudo > $out/token"; }}; }}; }}) ];
               clan.core.vars.age.secretLocation = "/root/secret-vars"; }}; }}"#,
        public = id.to_public(),
        t = lab.ip("target")
    ));
    let run = update(&lab, &secrets_flake, &[]);
    assert_eq!(run.code, 0, "{}", run.all());
    let token = lab.exec("target", &["cat", "/run/secrets/api/token"]);
    assert_eq!(
        String::from_utf8_lossy(&token.stdout).trim(),
        "tok-through-sudo"
    );
    assert_nothing_left(&lab);

    if kind == HostKind::Systemd {
        let journal = lab.exec(
            "target",
            &[
                "journalctl",
                "--no-pager",
                "-o",
                "cat",
                "SYSLOG_IDENTIFIER=sudo",
            ],
        );
        let journal = String::from_utf8_lossy(&journal.stdout).into_owned();
        let commands: Vec<&str> = journal
            .lines()
            .filter(|l| l.starts_with("deployrule :") && l.contains("COMMAND="))
            .collect();
        // The probe, lock, prepare, switch, confirm... of three deploys and a rollback.
        assert!(commands.len() >= 8, "{journal}");
        for script in ["clan-activate", "clan-vars-upload"] {
            let installs = commands
                .iter()
                .filter(|l| l.ends_with(&format!("' clan-install {script}")))
                .count();
            assert_eq!(installs, 1, "{script} installed once:\n{journal}");
            assert!(
                commands
                    .iter()
                    .any(|l| l.contains(&format!("COMMAND=/run/clan/{script}-"))),
                "{journal}"
            );
        }
        for line in &commands {
            assert!(line.len() < 600, "a long line: {line}");
            assert!(
                line.contains("COMMAND=/run/clan/clan-activate-")
                    || line.contains("COMMAND=/run/clan/clan-vars-upload-")
                    || line.contains("' clan-install clan-"),
                "{line}"
            );
            assert!(!line.contains("clan-activate: the target's side"), "{line}");
        }
        assert!(!journal.contains("password is required"), "{journal}");
    }
}

// A systemd host's container never outlives its lab: an orphaned container keeps its systemd
// (and the inotify instances every later container needs) running.
#[test]
fn containers_never_outlive_their_lab() {
    let lab = Lab::start(&[HostSpec::new("target").kind(HostKind::Systemd)]);
    let init = lab.init_pid("target").expect("the container's init");
    // A unit that ignores SIGTERM holds up the container's shutdown past the lab's patience.
    let hang = std::process::Command::new("nsenter")
        .args(["-t", &init.to_string(), "-m", "-p", "--"])
        .args([
            "systemd-run",
            "--unit=lab-test-hang",
            "-p",
            "TimeoutStopSec=300",
        ])
        .args(["/bin/sh", "-c", "trap '' TERM; sleep 1000"])
        .output()
        .unwrap();
    assert!(
        hang.status.success(),
        "{}",
        String::from_utf8_lossy(&hang.stderr)
    );
    // Running (not a zombie waiting to be reaped), and still the container's systemd.
    let alive = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
        stat.contains("(systemd)") && state.is_some_and(|s| s != 'Z' && s != 'X')
    };
    assert!(alive(init));
    drop(lab);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while alive(init) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!alive(init), "the container's systemd outlived the lab");
}

// A workstation that goes silent while it holds a target's lock (its network cut, its lid
// closed: the connection stays open, nothing more comes) does not block every other deploy
// of that machine for the hours TCP would wait: with no heartbeat for 60 s the target lets
// the lock go, a second deploy takes it and deploys, and the first, when it wakes up, finds
// that it was taken over and says so instead of going on.
fn a_silent_workstation_lets_go_of_the_target_lock(kind: HostKind) {
    let lab = target_lab(kind);
    deploy(&lab, "");
    let clan_bin = env!("CARGO_BIN_EXE_clan");
    let f1 = flake(&lab, r#"variant = "v2"; switchSeconds = 3;"#);
    let first = lab.spawn_on_workstation(
        &f1,
        &[
            clan_bin,
            "machines",
            "update",
            "m",
            "--rollback-timeout",
            "200",
        ],
    );
    let started = lab.host("target").root().join("switch-started");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the first switch never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // clan itself stops (its heartbeat with it); its ssh connection stays open.
    let stopped = Stopped::stop(&first.id().to_string());

    let dir2 = lab.dir.join("flake2");
    let f2 = flake(&lab, r#"variant = "v3";"#);
    let v3 = toplevel(&lab, &f2, "m");
    std::fs::create_dir_all(&dir2).unwrap();
    for file in ["flake.nix", "toplevel.nix"] {
        std::fs::copy(f2.join(file), dir2.join(file)).unwrap();
    }
    let waited = Instant::now();
    let second = update(&lab, &dir2, &["--lock-timeout", "150"]);
    assert_eq!(second.code, 0, "{}", second.all());
    assert!(
        second
            .stderr
            .contains("waiting for the target's deploy lock, held by run ")
    );
    assert!(
        waited.elapsed() < Duration::from_secs(100),
        "waited {:?} for a silent workstation's lock",
        waited.elapsed()
    );
    assert_system(&lab, Some(&v3), Some(&v3));

    drop(stopped);
    let first = first.wait_with_output().unwrap();
    let e1 = String::from_utf8_lossy(&first.stderr);
    eprintln!("--- first ---\n{e1}");
    assert_eq!(first.status.code(), Some(3), "{:?} {e1}", first.status);
    assert!(e1.contains("another deploy took it over"), "{e1}");
    // The second deploy's system stays.
    assert_system(&lab, Some(&v3), Some(&v3));
    assert_nothing_left(&lab);
}

// The switch kills every ssh session (sshd restarted the hard way), and sshd is back half a
// second later: ssh says 255, but the target, asked over a fresh connection, says the switch
// succeeded, so it is confirmed: neither undone nor rolled back.
fn switch_that_kills_ssh_sessions_is_confirmed(kind: HostKind) {
    let lab = target_lab(kind);
    let v1 = deploy(&lab, "");
    let f = flake(&lab, r#"variant = "kills-ssh-sessions";"#);
    let new = toplevel(&lab, &f, "m");
    let run = update(&lab, &f, &["--rollback-timeout", "10", "--json"]);
    assert_eq!(run.code, 0);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["machines"][0]["result"], "deployed");
    assert!(
        run.stderr.contains(
            "[m] the switch succeeded on the target (its session was lost, not the switch)"
        ),
        "{}",
        run.stderr
    );
    assert_system(&lab, Some(&new), Some(&new));
    assert_nothing_left(&lab);
    assert_eq!(switches(&lab).last().unwrap(), &format!("{new} switch"));
    assert_eq!(
        switches(&lab)
            .iter()
            .filter(|s| **s == format!("{v1} switch"))
            .count(),
        1,
        "switched back to the previous system"
    );
}

// The switch kills every ssh session and sshd stays down: how the switch ended cannot be
// learnt, so nothing is undone; the error says when the watchdog acts, and it does.
fn unreachable_after_the_switch_is_left_to_the_watchdog(kind: HostKind) {
    let lab = target_lab(kind);
    let v1 = deploy(&lab, "");
    let generations_before = lab.generations("target");
    let f = flake(&lab, r#"variant = "kills-ssh";"#);
    let broken = toplevel(&lab, &f, "m");
    let run = update(&lab, &f, &["--rollback-timeout", "6"]);
    assert_eq!(run.code, 3, "the target may be half-updated");
    assert!(
        run.stderr.contains(&format!(
            "m: the ssh session to the target root@{} ended during the switch, and the target cannot be reached again: how the switch ended is unknown, so nothing was undone",
            lab.ip("target")
        )),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(
            "its watchdog rolls it back to the previous generation 6 s after the switch ends (at about "
        ),
        "{}",
        run.stderr
    );
    // Nothing went back before the watchdog: the workstation never reached the target.
    assert!(switches(&lab).contains(&format!("{broken} switch")));
    assert_the_watchdog_went_back(&lab, &v1, &generations_before);
}

// Run 1 is killed during its switch: its activation is pending, its watchdog armed. The same
// command again is not "up to date" although the target runs the system: it takes the
// pending activation over (waits for its switch, stops its watchdog) and confirms it; the
// way back stays the generation before run 1's.
fn rerun_after_a_killed_switch_takes_over_and_confirms(kind: HostKind) {
    let lab = target_lab(kind);
    let v1 = deploy(&lab, "");
    let f = flake(&lab, r#"variant = "v2"; switchSeconds = 3;"#);
    let v2 = toplevel(&lab, &f, "m");
    let started = lab.host("target").root().join("switch-started");
    let _ = std::fs::remove_file(&started);
    let args = [
        env!("CARGO_BIN_EXE_clan"),
        "machines",
        "update",
        "m",
        "--rollback-timeout",
        "5",
    ];
    let child = lab.spawn_on_workstation(&f, &args);
    wait_for(60, "run 1's switch", || started.exists());
    std::thread::sleep(Duration::from_secs(1));
    let status = std::process::Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = child.wait_with_output();

    let run = update(&lab, &f, &["--rollback-timeout", "5", "--json"]);
    assert_eq!(run.code, 0);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        report["machines"][0]["result"], "deployed",
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("m: not up to date: root@"),
        "{}",
        run.stderr
    );
    assert_system(&lab, Some(&v2), Some(&v2));
    assert_nothing_left(&lab);
    // Nothing pending: now it is up to date.
    let again = update(&lab, &f, &["--json"]);
    let report: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(report["machines"][0]["result"], "up to date");
    // The way back is the generation run 1 found, not run 1's own.
    let back = clan(&lab, &f, &["machines", "rollback", "m"]);
    assert_eq!(back.code, 0);
    assert_system(&lab, Some(&v1), Some(&v1));
}

// `clan machines update … 2>&1 | head -3`: the reader goes away after three lines, long
// before the switch. The deploy goes on as if detached, ends with its confirmation and exit
// 0, and leaves nothing behind: no ssh master, no control directory.
fn a_closed_output_does_not_stop_the_deploy(kind: HostKind) {
    let lab = target_lab(kind);
    deploy(&lab, "");
    let f = flake(&lab, r#"variant = "v2"; switchSeconds = 2;"#);
    let v2 = toplevel(&lab, &f, "m");
    let logs = lab
        .host("workstation")
        .root()
        .join(".local/state/clan/logs");
    let runs_before: Vec<String> = std::fs::read_dir(&logs)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let script = format!(
        "{} machines update m --log-format plain --rollback-timeout 10 2>&1 | head -3; echo \"clan exited ${{PIPESTATUS[0]}}\"",
        env!("CARGO_BIN_EXE_clan")
    );
    let out = lab.run_on_workstation(&f, &["bash", "-c", &script]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().count(), 4, "three lines, then clan's exit");
    assert!(stdout.ends_with("clan exited 0\n"), "{stdout}");
    assert_system(&lab, Some(&v2), Some(&v2));
    assert_nothing_left(&lab);
    let masters = lab.processes("ControlMaster=");
    assert!(masters.is_empty(), "ssh masters left: {masters:?}");
    // This run's private control directory is gone (named after its run id, which names its
    // log directory).
    let logs = lab
        .host("workstation")
        .root()
        .join(".local/state/clan/logs");
    let runs: Vec<String> = std::fs::read_dir(&logs)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|run| !runs_before.contains(run))
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let control = format!("/tmp/clan-ssh-{}", &runs[0][..12]);
    assert!(
        !std::path::Path::new(&control).exists(),
        "{control} left behind"
    );
}
