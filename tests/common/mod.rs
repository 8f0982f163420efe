//! Helpers shared by the integration tests: run `clan` on the lab's workstation.

#![allow(dead_code)]

use std::path::Path;

#[allow(unused_imports)]
pub use clan_lab::{HostSpec, Lab};

/// What a `clan` run showed the user.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout and stderr together.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `clan ARGS` on the lab's workstation in the flake directory.
pub fn clan(lab: &Lab, flake: &Path, args: &[&str]) -> Run {
    let mut argv = vec![env!("CARGO_BIN_EXE_clan")];
    argv.extend_from_slice(args);
    run_clan(lab, flake, args, &argv, None)
}

/// Runs `clan ARGS` with `input` on its standard input (no terminal).
pub fn clan_with_input(lab: &Lab, flake: &Path, args: &[&str], input: &str) -> Run {
    let mut argv = vec![env!("CARGO_BIN_EXE_clan")];
    argv.extend_from_slice(args);
    run_clan(lab, flake, args, &argv, Some(input))
}

/// Runs `clan ARGS` under an ssh-agent that holds the workstation's default key.
pub fn clan_with_agent(lab: &Lab, flake: &Path, args: &[&str]) -> Run {
    let mut argv = vec![
        "ssh-agent",
        "sh",
        "-c",
        r#"ssh-add -q /root/.ssh/id_ed25519 && exec "$@""#,
        "sh",
        env!("CARGO_BIN_EXE_clan"),
    ];
    argv.extend_from_slice(args);
    run_clan(lab, flake, args, &argv, None)
}

/// Runs `clan ARGS` on a pseudo-terminal (util-linux `script`), typing `input`.
pub fn clan_on_terminal(lab: &Lab, flake: &Path, args: &[&str], input: &str) -> Run {
    let command = std::iter::once(env!("CARGO_BIN_EXE_clan"))
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let argv = ["script", "-qec", command.as_str(), "/dev/null"];
    run_clan(lab, flake, args, &argv, Some(input))
}

/// Runs `argv` (which runs `clan ARGS`) on the workstation, with `input` on its standard
/// input if any; shows what it printed, and a failure's full log.
fn run_clan(lab: &Lab, flake: &Path, args: &[&str], argv: &[&str], input: Option<&str>) -> Run {
    let out = match input {
        Some(input) => lab.run_on_workstation_with_input(flake, argv, input),
        None => lab.run_on_workstation(flake, argv),
    };
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "$ clan {}\n--- exit {} ---\n{}{}",
        args.join(" "),
        run.code,
        run.stdout,
        run.stderr
    );
    // A failure's full log (on the workstation), for the test's output: what the hosts said.
    for line in run.stderr.lines() {
        if let Some(path) = line.strip_prefix("hint: full log: /root/") {
            let log = lab.host("workstation").root().join(path);
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            eprintln!("--- {} ---\n{text}", log.display());
        }
    }
    run
}

/// Asserts the lab's target runs `out`: in its store, its profile, and the last thing
/// `switch-to-configuration` recorded.
pub fn assert_activated(lab: &Lab, out: &str) {
    let target = lab.host("target");
    assert!(target.has_path(out), "target lacks {out}");
    assert_eq!(target.system_profile().as_deref(), Some(out));
    assert_eq!(
        target.switch_log().last().map(String::as_str),
        Some(format!("{out} switch").as_str())
    );
}

/// Asserts nothing was activated on the lab's target.
pub fn assert_target_untouched(lab: &Lab) {
    let target = lab.host("target");
    assert_eq!(target.system_profile(), None, "target profile changed");
    assert!(
        target.switch_log().is_empty(),
        "switch-to-configuration ran"
    );
}

/// Evaluates `attr` of the flake on the workstation (for expected store paths).
pub fn eval_raw(lab: &Lab, flake: &Path, attr: &str) -> String {
    let reference = format!("{}#{attr}", flake.display());
    let out = lab.run_on_workstation(flake, &["nix", "eval", "--raw", &reference]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The toplevel output path of `machine`.
pub fn toplevel(lab: &Lab, flake: &Path, machine: &str) -> String {
    eval_raw(
        lab,
        flake,
        &format!("nixosConfigurations.{machine}.config.system.build.toplevel.outPath"),
    )
}

/// The `result` of `machine` in a `--json` report (`deployed`, `failed`, `not started`…).
pub fn result_of(report: &serde_json::Value, machine: &str) -> Option<String> {
    report["machines"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == machine)
        .and_then(|r| r["result"].as_str())
        .map(str::to_string)
}

/// The pid of the first process of `lab` whose command line matches `pattern` (`pgrep -f`,
/// within the lab: see [`Lab::processes`]), waiting up to 60 s for one to appear.
pub fn wait_for_process(lab: &Lab, pattern: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(line) = lab.processes(pattern).first() {
            return line.split_whitespace().next().expect("a pid").to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{pattern} never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The sshd session process that `pid` runs under (its nearest `sshd` ancestor).
pub fn sshd_session_of(pid: &str) -> String {
    let mut pid = pid.to_string();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        let ppid = after.split_whitespace().nth(1).expect("ppid").to_string();
        let comm = std::fs::read_to_string(format!("/proc/{ppid}/comm")).expect("comm");
        if comm.trim() == "sshd" {
            return ppid;
        }
        pid = ppid;
    }
}

/// A process stopped with SIGSTOP; resumed (SIGCONT) when dropped, also when the test fails,
/// so the lab can stop it.
pub struct Stopped(String);

impl Stopped {
    /// Stops process `pid`.
    pub fn stop(pid: &str) -> Stopped {
        std::process::Command::new("kill")
            .args(["-STOP", pid])
            .status()
            .expect("kill -STOP");
        Stopped(pid.to_string())
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0])
            .status();
    }
}

/// A new age identity, installed where sops (and clan) look for the workstation user's
/// (`~/.config/sops/age/keys.txt`); returned for its public key.
pub fn install_age_identity(lab: &Lab) -> age::x25519::Identity {
    let id = age::x25519::Identity::generate();
    let keys = lab
        .host(clan_lab::WORKSTATION)
        .root()
        .join(".config/sops/age/keys.txt");
    std::fs::create_dir_all(keys.parent().unwrap()).unwrap();
    std::fs::write(
        &keys,
        format!(
            "{}\n",
            age::secrecy::ExposeSecret::expose_secret(&id.to_string())
        ),
    )
    .unwrap();
    id
}

/// Every timestamped line of the run whose `--json` report is `stdout`, from all of its log
/// files (`@EPOCH rest`), as (when, the rest).
pub fn run_log_lines(lab: &Lab, stdout: &str) -> Vec<(f64, String)> {
    let report: serde_json::Value = serde_json::from_str(stdout).unwrap();
    let log = report["machines"][0]["log"].as_str().unwrap();
    let dir = lab.host("workstation").root().join(
        Path::new(log)
            .parent()
            .unwrap()
            .strip_prefix("/root")
            .unwrap(),
    );
    std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .flat_map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let (t, rest) = l.strip_prefix('@')?.split_once(' ')?;
                    Some((t.parse().ok()?, rest.to_string()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Runs a shell line on host `name` (in its namespace) and returns its stdout, trimmed.
pub fn sh(lab: &Lab, name: &str, line: &str) -> String {
    let out = lab.exec(name, &["sh", "-c", line]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs git in the clan `flake` (which must succeed); its output.
pub fn git_in(flake: &Path) -> impl Fn(&[&str]) -> String + '_ {
    move |args| {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(flake)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Files under `dir` that contain any of `needles`.
pub fn files_containing(dir: &Path, needles: &[&str]) -> Vec<String> {
    let mut cmd = std::process::Command::new("grep");
    cmd.args(["-rlsF", "--no-messages"]);
    for n in needles {
        cmd.arg("-e").arg(n);
    }
    let out = cmd.arg(dir).output().expect("grep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}
