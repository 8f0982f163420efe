//! Stopping and non-root targets: Ctrl-C during a remote build, a sudo password given on
//! standard input (never in output or logs), an untrusted Nix user. Activation itself is
//! tested on both kinds of target in `tests/activation.rs`.

mod common;
use common::*;

use std::time::{Duration, Instant};

/// Waits until `cond` holds, for at most `secs`.
fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// This lab's processes matching `pattern`, one `pid command-line` per line.
fn processes(lab: &Lab, pattern: &str) -> String {
    lab.processes(pattern).join("\n")
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
        processes(&lab, "nixos-system-m-slow-build.drv").contains("nix-store --realise")
    });
    wait_for(10, "the builder to run", || {
        processes(&lab, "sleep 45").contains("sleep 45")
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
        !processes(&lab, "nixos-system-m-slow-build.drv").contains("nix-store --realise")
            && !processes(&lab, "sleep 45").contains("sleep 45")
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
        &[clan_bin, "machines", "update", "m", "--json", "-v"],
        "lab-sudo-secret\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr.contains("sudo clan-activate prepare "));
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
