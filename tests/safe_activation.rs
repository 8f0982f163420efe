//! Safe activation: actions, the change summary, the rollback watchdog when the target is
//! lost, a failed switch, and `clan machines rollback`; asserted on the target's profile,
//! what `switch-to-configuration` recorded, and whether its sshd answers.

mod common;
use common::*;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A flake with machine `m` on the lab's target, built on the target, with `system` args.
fn flake(lab: &Lab, system_args: &str) -> std::path::PathBuf {
    lab.write_flake(&format!(
        r#"{{ inventory.machines.m = {{ deploy.targetHost = "root@{}"; }}; machines.m = system {{ {system_args} }}; }}"#,
        lab.ip("target")
    ))
}

fn target_lab() -> Lab {
    Lab::start(&[HostSpec::new("target")])
}

fn sshd_answers(lab: &Lab) -> bool {
    let addr: SocketAddr = format!("{}:22", lab.ip("target")).parse().unwrap();
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Deploys the first, healthy generation and returns its toplevel.
fn first_generation(lab: &Lab) -> String {
    let f = flake(lab, r#"packages = [ "hello-2.10" "tool-1.0" ];"#);
    let out = toplevel(lab, &f, "m");
    let run = clan(
        lab,
        &f,
        &["machines", "update", "m", "--rollback-timeout", "10"],
    );
    assert_eq!(run.code, 0);
    assert_eq!(
        lab.host("target").system_profile().as_deref(),
        Some(out.as_str())
    );
    out
}

#[test]
fn actions_switch_boot_test_dry_activate() {
    let lab = target_lab();
    let v1 = first_generation(&lab);
    let target = lab.host("target");
    let f = flake(&lab, r#"variant = "v2";"#);
    let v2 = toplevel(&lab, &f, "m");

    let run = clan(
        &lab,
        &f,
        &["machines", "update", "m", "--action", "dry-activate"],
    );
    assert_eq!(run.code, 0);
    assert_eq!(
        target.system_profile().as_deref(),
        Some(v1.as_str()),
        "dry-activate set the profile"
    );
    assert_eq!(
        target.switch_log().last().unwrap(),
        &format!("{v2} dry-activate")
    );

    let run = clan(&lab, &f, &["machines", "update", "m", "--action", "test"]);
    assert_eq!(run.code, 0);
    assert_eq!(
        target.system_profile().as_deref(),
        Some(v1.as_str()),
        "test set the profile"
    );
    assert_eq!(target.switch_log().last().unwrap(), &format!("{v2} test"));

    let run = clan(&lab, &f, &["machines", "update", "m", "--action", "boot"]);
    assert_eq!(run.code, 0);
    assert_eq!(
        target.system_profile().as_deref(),
        Some(v2.as_str()),
        "boot did not set the profile"
    );
    assert_eq!(target.switch_log().last().unwrap(), &format!("{v2} boot"));

    let run = clan(&lab, &f, &["machines", "update", "m"]);
    assert_eq!(run.code, 0);
    assert_eq!(target.switch_log().last().unwrap(), &format!("{v2} switch"));
}

#[test]
fn change_summary_before_activation() {
    let lab = target_lab();
    let v1 = first_generation(&lab);
    let f = flake(&lab, r#"packages = [ "hello-2.12" "newtool-0.3" ];"#);
    let run = clan(&lab, &f, &["machines", "update", "m"]);
    assert_eq!(run.code, 0);
    assert!(run.stderr.contains("Changes on m:"));
    assert!(
        run.stderr.contains("hello: 2.10 → 2.12"),
        "no version change in the summary"
    );
    assert!(run.stderr.contains("newtool: ∅ → 0.3"));
    assert!(run.stderr.contains("tool: 1.0 → ∅"));
    // Computed on the target, from its own store: the workstation never had the closures.
    assert!(!lab.host("workstation").has_path(&v1));
    let first = clan(
        &lab,
        &flake(&lab, ""),
        &["machines", "update", "m", "--no-diff"],
    );
    assert!(!first.stderr.contains("Changes on m:"));
}

// The new system breaks sshd: the workstation cannot log in again, so the target restores
// the previous generation by itself and is reachable again.
#[test]
fn lost_target_rolls_back_by_itself() {
    let lab = target_lab();
    let v1 = first_generation(&lab);
    let f = flake(&lab, r#"variant = "breaks-ssh";"#);
    let broken = toplevel(&lab, &f, "m");
    let started = Instant::now();
    let run = clan(
        &lab,
        &f,
        &["machines", "update", "m", "--rollback-timeout", "8"],
    );
    assert_eq!(run.code, 3, "a lost target may be half-updated");
    assert!(run.stderr.contains(&format!(
        "m: cannot log in to the target root@{} over a fresh ssh connection after activating the new system",
        lab.ip("target")
    )));
    assert!(
        run.stderr
            .contains("rolls back to the previous generation by itself")
    );
    assert!(
        lab.host("target")
            .switch_log()
            .contains(&format!("{broken} switch"))
    );

    // The watchdog fires 8 s after it was armed.
    let deadline = started + Duration::from_secs(25);
    while lab.host("target").system_profile().as_deref() != Some(v1.as_str()) || !sshd_answers(&lab)
    {
        assert!(
            Instant::now() < deadline,
            "no rollback: profile {:?}",
            lab.host("target").system_profile()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        lab.host("target").switch_log().last().unwrap(),
        &format!("{v1} switch")
    );
    // And it can be deployed to again.
    let again = clan(
        &lab,
        &flake(&lab, r#"packages = [ "hello-2.10" "tool-1.0" ];"#),
        &["machines", "update", "m"],
    );
    assert_eq!(again.code, 0);
}

// A healthy system is confirmed: the watchdog stands down and the system stays.
#[test]
fn confirmed_system_stays() {
    let lab = target_lab();
    first_generation(&lab);
    let f = flake(&lab, r#"variant = "v2";"#);
    let v2 = toplevel(&lab, &f, "m");
    let run = clan(
        &lab,
        &f,
        &["machines", "update", "m", "--rollback-timeout", "5"],
    );
    assert_eq!(run.code, 0);
    std::thread::sleep(Duration::from_secs(7));
    let target = lab.host("target");
    assert_eq!(
        target.system_profile().as_deref(),
        Some(v2.as_str()),
        "rolled back a healthy system"
    );
    assert_eq!(target.switch_log().last().unwrap(), &format!("{v2} switch"));
    // This run's watchdog is gone, and so is its confirmation file.
    let confirm = run
        .stderr
        .split("touch ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("no confirmation step");
    assert!(confirm.starts_with("/run/clan-confirm-"), "{confirm}");
    let left = std::process::Command::new("pgrep")
        .args(["-f", confirm])
        .output()
        .unwrap();
    assert!(left.stdout.is_empty(), "watchdog still running");
    assert!(
        !std::path::Path::new(confirm).exists(),
        "confirmation file left behind"
    );
}

#[test]
fn failed_switch_rolls_the_profile_back() {
    let lab = target_lab();
    let v1 = first_generation(&lab);
    let f = flake(&lab, r#"variant = "switch-fails";"#);
    let bad = toplevel(&lab, &f, "m");
    let run = clan(
        &lab,
        &f,
        &["machines", "update", "m", "--rollback-timeout", "6"],
    );
    assert_eq!(run.code, 3);
    assert!(
        run.stderr
            .contains("activating the fixture failed on purpose")
    );
    assert!(run.stderr.contains("switch-to-configuration switch failed"));
    assert!(
        run.stderr
            .contains("the system profile was rolled back to the previous generation")
    );
    assert_eq!(
        lab.host("target").system_profile().as_deref(),
        Some(v1.as_str())
    );
    assert!(
        lab.host("target")
            .switch_log()
            .contains(&format!("{bad} switch"))
    );
    // The stood-down watchdog does not roll back a second time.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        lab.host("target").system_profile().as_deref(),
        Some(v1.as_str())
    );
}

#[test]
fn rollback_command_switches_to_the_previous_generation() {
    let lab = target_lab();
    let v1 = first_generation(&lab);
    let f = flake(&lab, r#"variant = "v2";"#);
    let v2 = toplevel(&lab, &f, "m");
    assert_eq!(clan(&lab, &f, &["machines", "update", "m"]).code, 0);
    assert_eq!(
        lab.host("target").system_profile().as_deref(),
        Some(v2.as_str())
    );

    let run = clan(&lab, &f, &["machines", "rollback", "m"]);
    assert_eq!(run.code, 0);
    assert!(run.stdout.contains(&format!("profile: {v2} -> {v1}")));
    assert_eq!(
        lab.host("target").system_profile().as_deref(),
        Some(v1.as_str())
    );
    assert_eq!(
        lab.host("target").switch_log().last().unwrap(),
        &format!("{v1} switch")
    );

    let nothing = clan(&lab, &f, &["machines", "rollback", "m"]);
    assert_eq!(nothing.code, 1);
    assert!(nothing.stderr.contains("no previous generation"));
}

/// Waits until `cond` holds, for at most `secs`.
fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn processes(pattern: &str) -> String {
    let out = std::process::Command::new("pgrep")
        .args(["-af", pattern])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A process that has nothing to do with the deploy, to prove that stopping one signals
/// nothing else (a `kill -TERM -PGID` through procps's kill once signalled every process).
struct Bystander(std::process::Child);

impl Bystander {
    fn start() -> Bystander {
        Bystander(
            std::process::Command::new("sleep")
                .arg("300")
                .spawn()
                .unwrap(),
        )
    }

    fn assert_alive(&mut self) {
        assert!(
            self.0.try_wait().unwrap().is_none(),
            "Ctrl-C handling killed an unrelated process"
        );
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends Ctrl-C (SIGINT) to `pid`: the spawned command, which `unshare` and `sh` exec into,
/// so it is clan itself.
fn ctrl_c(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "no clan process to interrupt");
}

// Ctrl-C during a long build on the build host: the build stops there too, nothing is
// activated, the temporary GC root is removed.
#[test]
fn ctrl_c_stops_remote_builds_and_cleans_up() {
    let lab = Lab::builder_and_target();
    let f = lab.write_flake(&format!(
        r#"{{ inventory.machines.m = {{ deploy.targetHost = "root@{}"; deploy.buildHost = "root@{}"; }}; machines.m = system {{ buildSeconds = 45; variant = "slow-build"; }}; }}"#,
        lab.ip("target"),
        lab.ip("builder")
    ));
    let clan_bin = env!("CARGO_BIN_EXE_clan");
    let child = lab.spawn_on_workstation(&f, &[clan_bin, "machines", "update", "m"]);
    wait_for(30, "the build to start", || {
        processes("nixos-system-m-slow-build.drv").contains("nix-store --realise")
    });
    wait_for(10, "the builder to run", || {
        processes("sleep 45").contains("sleep 45")
    });
    let mut bystander = Bystander::start();
    ctrl_c(child.id());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    bystander.assert_alive();
    assert_eq!(out.status.code(), Some(130));
    assert!(
        stderr.contains("m: interrupted during its build: nothing was activated on its target")
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with('m') && l.contains("interrupted"))
    );
    // Nothing left running on the build host, and its GC root is gone.
    wait_for(5, "the remote build to stop", || {
        !processes("nixos-system-m-slow-build.drv").contains("nix-store --realise")
            && !processes("sleep 45").contains("sleep 45")
    });
    let run_id = stderr
        .split("/tmp/clan-")
        .nth(1)
        .and_then(|r| r.split('-').next())
        .expect("no run id in the output");
    assert!(
        !std::path::Path::new(&format!("/tmp/clan-{run_id}-build0")).exists(),
        "GC root left behind"
    );
    assert_eq!(lab.host("target").system_profile(), None);
    assert!(lab.host("target").switch_log().is_empty());
}

// Ctrl-C during activation: the activation finishes, and the summary says so.
#[test]
fn ctrl_c_lets_a_running_activation_finish() {
    let lab = target_lab();
    let f = flake(&lab, r#"variant = "slow-switch";"#);
    let out_path = toplevel(&lab, &f, "m");
    let started = lab.host("target").root().join("switch-started");
    let child =
        lab.spawn_on_workstation(&f, &[env!("CARGO_BIN_EXE_clan"), "machines", "update", "m"]);
    wait_for(30, "the switch to start", || started.exists());
    let mut bystander = Bystander::start();
    ctrl_c(child.id());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    bystander.assert_alive();
    assert_eq!(
        out.status.code(),
        Some(0),
        "the activation that ran finished: nothing failed"
    );
    assert!(
        stderr.contains(
            "Interrupted: stopping builds and copies, letting running activations finish"
        )
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with('m') && l.contains("deployed"))
    );
    assert_eq!(
        lab.host("target").system_profile().as_deref(),
        Some(out_path.as_str())
    );
    assert!(
        lab.host("target")
            .switch_log()
            .iter()
            .any(|l| l.ends_with(" done")),
        "the switch was cut short"
    );
}

/// A target whose deploy users reach Nix through its daemon; `trusted` are trusted users.
fn non_root_lab(trusted: &[&str]) -> Lab {
    let lab = Lab::start(&[HostSpec::new("target").nix_daemon(trusted)]);
    lab.add_user("target", "deploy", None);
    lab.add_user("target", "deploypw", Some("lab-sudo-secret"));
    lab
}

fn non_root_flake(lab: &Lab, user: &str) -> std::path::PathBuf {
    lab.write_flake(&format!(
        r#"{{ inventory.machines.m = {{ deploy.targetHost = "{user}@{}"; }}; machines.m = system {{ }}; }}"#,
        lab.ip("target")
    ))
}

#[test]
fn non_root_target_with_passwordless_sudo() {
    let lab = non_root_lab(&["deploy"]);
    let f = non_root_flake(&lab, "deploy");
    let out = toplevel(&lab, &f, "m");
    let run = clan(&lab, &f, &["machines", "update", "m"]);
    assert_eq!(run.code, 0);
    assert!(
        run.stderr
            .contains("sudo --non-interactive -- nix-env -p /nix/var/nix/profiles/system --set")
    );
    assert_eq!(
        lab.host("target").system_profile().as_deref(),
        Some(out.as_str())
    );
    // switch-to-configuration ran as root: it wrote root's log.
    assert_eq!(
        lab.host("target").switch_log(),
        vec![format!("{out} switch")]
    );
}

#[test]
fn non_root_target_with_a_sudo_password() {
    let lab = non_root_lab(&["deploypw"]);
    let f = non_root_flake(&lab, "deploypw");
    let out_path = toplevel(&lab, &f, "m");
    let clan_bin = env!("CARGO_BIN_EXE_clan");

    let none = lab.run_on_workstation_with_input(&f, &[clan_bin, "machines", "update", "m"], "");
    assert_eq!(none.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&none.stderr).contains("needs a password, and none was given"));

    let out = lab.run_on_workstation_with_input(
        &f,
        &[clan_bin, "machines", "update", "m", "--json"],
        "lab-sudo-secret\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr.contains("sudo --stdin '--prompt=' -- nix-env"));
    assert_eq!(
        lab.host("target").system_profile().as_deref(),
        Some(out_path.as_str())
    );
    assert_eq!(
        lab.host("target").switch_log(),
        vec![format!("{out_path} switch")]
    );
    // The password is on no command line and in no output or log.
    assert!(!stdout.contains("lab-sudo-secret") && !stderr.contains("lab-sudo-secret"));
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let log = report["machines"][0]["log"].as_str().unwrap();
    let log_dir = std::path::Path::new(log).parent().unwrap();
    let log_dir = lab
        .host("workstation")
        .root()
        .join(log_dir.strip_prefix("/root").unwrap());
    for entry in std::fs::read_dir(&log_dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(
            !text.contains("lab-sudo-secret"),
            "the password reached a log"
        );
    }
}

// An untrusted user may add derivations and have them built, but not paths built elsewhere:
// the build host's copy is refused.
#[test]
fn non_root_untrusted_user_gets_the_fix() {
    let lab = Lab::start(&[
        HostSpec::new("builder"),
        HostSpec::new("target").nix_daemon(&[]),
    ]);
    lab.trust("builder", "target");
    lab.add_user("target", "deploy", None);
    let f = lab.write_flake(&format!(
        r#"{{ inventory.machines.m = {{ deploy.targetHost = "deploy@{}"; deploy.buildHost = "root@{}"; }}; machines.m = system {{ }}; }}"#,
        lab.ip("target"),
        lab.ip("builder")
    ));
    let run = clan(&lab, &f, &["machines", "update", "m"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("lacks a"),
        "no Nix signature error shown"
    );
    assert!(run.stderr.contains("refused the copied paths: they are not signed by a key it trusts, and deploy is not a trusted Nix user there"));
    assert!(
        run.stderr
            .contains(r#"nix.settings.trusted-users = [ "deploy" ];"#)
    );
    assert_eq!(lab.host("target").system_profile(), None);
}

#[test]
fn rollback_command_on_a_target_whose_sudo_needs_a_password() {
    let lab = non_root_lab(&["deploypw"]);
    let clan_bin = env!("CARGO_BIN_EXE_clan");
    let password = "lab-sudo-secret\n";
    let v1_flake = non_root_flake(&lab, "deploypw");
    let v1 = toplevel(&lab, &v1_flake, "m");
    let deploy = |f: &std::path::Path| {
        lab.run_on_workstation_with_input(f, &[clan_bin, "machines", "update", "m"], password)
    };
    assert_eq!(deploy(&v1_flake).status.code(), Some(0));
    let v2_flake = lab.write_flake(&format!(
        r#"{{ inventory.machines.m = {{ deploy.targetHost = "deploypw@{}"; }}; machines.m = system {{ variant = "v2"; }}; }}"#,
        lab.ip("target")
    ));
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
    assert_eq!(
        lab.host("target").system_profile().as_deref(),
        Some(v1.as_str())
    );
    assert_eq!(
        lab.host("target").switch_log().last().unwrap(),
        &format!("{v1} switch")
    );
}
