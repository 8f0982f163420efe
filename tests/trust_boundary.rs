//! The trust boundary on real hosts: what a flake or a host address says is checked before
//! anything runs. Each hostile case is refused with exit 2 and a message naming the value
//! and where it came from; a canary file that the attack would create is absent on the
//! workstation, the build host and the target; no host's profile changed.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

fn lab() -> Lab {
    Lab::builder_and_target()
}

/// The canary: the path an attack would create, checked on every host (hosts share /tmp,
/// each has its own /root).
const CANARY: &str = "/tmp/clan-boundary-canary";

/// What the hostile library writes: a path in this test's own lab (tests run in parallel,
/// and the test makes the library write it once to show that it can).
fn lib_canary(lab: &Lab) -> String {
    lab.dir.join("canary-library").display().to_string()
}

fn assert_no_canary(lab: &Lab, canary: &str) {
    assert!(
        !Path::new(canary).exists(),
        "the attack ran: {canary} exists"
    );
    for host in ["workstation", "builder", "target"] {
        let in_root = lab.host(host).root().join("canary");
        assert!(!in_root.exists(), "the attack ran on {host}");
    }
}

fn assert_untouched(lab: &Lab) {
    for host in ["builder", "target"] {
        assert_eq!(
            lab.host(host).system_profile(),
            None,
            "{host} profile changed"
        );
    }
    assert!(lab.host("target").switch_log().is_empty());
}

fn good_machine(lab: &Lab) -> String {
    format!(
        r#"inventory.machines.good = {{ deploy.targetHost = "root@{}"; deploy.buildHost = "root@{}"; }};"#,
        lab.ip("target"),
        lab.ip("builder")
    )
}

// Machine names defined in the flake follow the same rules as names on the command line:
// `..`/`/`, a newline or an ESC in a name stop the run before anything happens, and the
// message shows the name escaped.
#[test]
fn flake_machine_names_are_checked() {
    let lab = lab();
    for (nix_name, shown) in [
        (
            r#""../../../../tmp/clan-boundary-canary""#,
            r#""../../../../tmp/clan-boundary-canary""#,
        ),
        (r#""a/b""#, r#""a/b""#),
        (r#""web\nsecond-line""#, r#""web\nsecond-line""#),
        (r#""web\u001b[2Kx""#, r#""web\u{1b}[2Kx""#),
    ] {
        let nix_name = nix_name.replace("\\u001b", "\u{1b}");
        let f = lab.write_flake(&format!(
            r#"{{ {} inventory.machines.{nix_name} = {{ deploy.targetHost = "root@{}"; }}; machines.good = system {{ }}; }}"#,
            good_machine(&lab),
            lab.ip("target")
        ));
        let run = clan(&lab, &f, &["machines", "update", "good"]);
        assert_eq!(run.code, 2, "{nix_name}");
        assert!(
            run.stderr
                .contains(&format!("invalid machine name {shown} (from the flake")),
            "{nix_name}: {}",
            run.stderr
        );
        assert!(!run.all().contains('\u{1b}'), "an ESC reached the terminal");
    }
    assert_untouched(&lab);
}

/// A flake whose machine `m` has `toplevel` (a Nix expression) as its system.
fn toplevel_flake(lab: &Lab, toplevel: &str) -> PathBuf {
    lab.write_flake(&format!(
        r#"{{ inventory.machines.m = {{ deploy.targetHost = "root@{}"; deploy.buildHost = "root@{}"; }};
             machines.m = {{ ... }}: {{ nixpkgs.hostPlatform = "x86_64-linux"; system.build.toplevel = {toplevel}; }}; }}"#,
        lab.ip("target"),
        lab.ip("builder")
    ))
}

// A drvPath that is an option would become options of `nix-store --realise` on the build
// host (a post-build hook runs as root); an outPath outside the store would be run as root on
// the target. Both are refused; so is an outPath that is not the drvPath's output.
#[test]
fn store_paths_from_the_flake_are_checked() {
    let lab = lab();
    let hook = lab.host("builder").root().join("hook");
    std::fs::write(&hook, format!("#!/bin/sh\ntouch {CANARY}\n")).unwrap();
    let real = lab.write_flake(&format!(
        r#"{{ inventory.machines.m = {{ deploy.targetHost = "root@{}"; }}; machines.m = system {{ }}; }}"#,
        lab.ip("target")
    ));
    let real_out = toplevel(&lab, &real, "m");
    let real_drv = eval_raw(
        &lab,
        &real,
        "nixosConfigurations.m.config.system.build.toplevel.drvPath",
    );
    let other = lab.write_flake(&format!(
        r#"{{ inventory.machines.m = {{ deploy.targetHost = "root@{}"; }}; machines.m = system {{ variant = "other"; }}; }}"#,
        lab.ip("target")
    ));
    let other_out = toplevel(&lab, &other, "m");
    // The outputs are read from the derivation file itself (a `nix-store` per machine costs
    // more than the rest of the check): that reading agrees with Nix's.
    let drv_file = lab
        .host("workstation")
        .nix()
        .join(real_drv.trim_start_matches("/nix/"));
    let read_here = clan::select::drv_outputs(&std::fs::read(&drv_file).unwrap());
    let by_nix = lab.run_on_workstation(&real, &["nix-store", "-q", "--outputs", &real_drv]);
    let by_nix: Vec<String> = String::from_utf8_lossy(&by_nix.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(read_here, Some(by_nix.clone()));
    assert_eq!(by_nix, vec![real_out.clone()]);
    for (toplevel, refusal) in [
        (
            format!(
                r#"{{ drvPath = "--option post-build-hook /root/hook"; outPath = "{real_out}"; }}"#
            ),
            "invalid store path \"--option post-build-hook /root/hook\" (from the flake, machines.m.config.system.build.toplevel.drvPath)",
        ),
        (
            format!(r#"{{ drvPath = "{real_drv}"; outPath = "/tmp/x"; }}"#),
            "invalid store path \"/tmp/x\" (from the flake, machines.m.config.system.build.toplevel.outPath)",
        ),
        (
            format!(r#"{{ drvPath = "{real_drv}"; outPath = "{other_out}"; }}"#),
            "is not an output of its drvPath",
        ),
    ] {
        let f = toplevel_flake(&lab, &toplevel);
        let run = clan(&lab, &f, &["machines", "update", "m"]);
        assert_eq!(run.code, 2, "{toplevel}");
        assert!(run.stderr.contains(refusal), "{toplevel}: {}", run.stderr);
        assert_no_canary(&lab, CANARY);
        assert_untouched(&lab);
        assert!(!lab.host("target").has_path(&other_out));
    }
}

/// Builds a shared library whose constructor writes the canary, as a hostile
/// PKCS11Provider or SecurityKeyProvider would.
fn canary_library(lab: &Lab) -> PathBuf {
    let dir = lab.dir.join("evil");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("evil.c");
    std::fs::write(
        &src,
        format!(
            "#include <stdio.h>\n__attribute__((constructor)) static void f(void) {{ FILE *c = fopen(\"{}\", \"w\"); if (c) fclose(c); }}\nint C_GetFunctionList(void *p) {{ return 1; }}\n",
            lib_canary(lab)
        ),
    )
    .unwrap();
    let lib = dir.join("evil.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .expect("cc");
    assert!(status.success());
    lib
}

// Options that load code, that overrule the host-key policy or that forward the agent are
// refused in host addresses, each with the place where such a choice belongs.
#[test]
fn host_address_options_are_an_allow_list() {
    let lab = lab();
    let lib = canary_library(&lab);
    let t = lab.ip("target");
    for (address, message) in [
        (
            format!("root@{t}?PKCS11Provider={}", lib.display()),
            "the ssh option PKCS11Provider runs a local command",
        ),
        (
            format!("root@{t}?SecurityKeyProvider={}", lib.display()),
            "the ssh option SecurityKeyProvider runs a local command",
        ),
        (
            format!("root@{t}?StrictHostKeyChecking=no&UserKnownHostsFile=/dev/null"),
            "it comes only from --host-key-check",
        ),
        (
            format!("root@{t}?ForwardAgent=yes"),
            "that comes only from --forward-agent",
        ),
        (
            format!("root@{t}?ControlPath=/tmp/x"),
            "put it in ~/.ssh/config",
        ),
    ] {
        let f = lab.write_flake(&format!(
            r#"{{ inventory.machines.m = {{ deploy.targetHost = "{address}"; deploy.buildHost = "root@{}"; }}; machines.m = system {{ }}; }}"#,
            lab.ip("builder")
        ));
        let run = clan(
            &lab,
            &f,
            &["machines", "update", "m", "--host-key-check", "strict"],
        );
        assert_eq!(run.code, 2, "{address}");
        assert!(run.stderr.contains(message), "{address}: {}", run.stderr);
        assert!(
            run.stderr
                .contains("(inventory.machines.m.deploy.targetHost)")
                || run
                    .stderr
                    .contains("in inventory.machines.m.deploy.targetHost"),
            "the source is not named: {}",
            run.stderr
        );
        assert_no_canary(&lab, &lib_canary(&lab));
        assert_untouched(&lab);
    }
    // The strictest policy, as clan-core's own option description writes it, weakens
    // nothing: accepted, and the deploy goes through.
    lab.trust("builder", "target");
    let strict = lab.write_flake(&format!(
        r#"{{ inventory.machines.m = {{ deploy.targetHost = "root@{t}?StrictHostKeyChecking=yes"; deploy.buildHost = "root@{}"; }}; machines.m = system {{ }}; }}"#,
        lab.ip("builder")
    ));
    let run = clan(&lab, &strict, &["machines", "update", "m"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        lab.host("target").system_profile().as_deref(),
        Some(toplevel(&lab, &strict, "m").as_str())
    );
    // The library does write the canary when something loads it (`ssh-keygen -D` loads a
    // PKCS#11 provider as ssh would): the checks above can fail.
    let _ = Command::new("ssh-keygen")
        .arg("-D")
        .arg(&lib)
        .output()
        .unwrap();
    assert!(
        Path::new(&lib_canary(&lab)).exists(),
        "the canary library never ran"
    );
}

// The target's key changed (someone impersonates it, or it was reinstalled): the second hop
// reports a changed key with the fingerprint the build host saw, and never suggests
// accept-new or appending ssh-keyscan output.
#[test]
fn changed_target_key_on_the_second_hop_is_called_a_changed_key() {
    let lab = Lab::start(&[HostSpec::new("builder"), HostSpec::new("target")]);
    lab.trust_wrong_key("builder", "target", "builder");
    let f = lab.write_flake(&format!(
        r#"{{ {} machines.good = system {{ }}; }}"#,
        good_machine(&lab)
    ));
    for extra in [&[][..], &["--host-key-check", "accept-new"][..]] {
        let mut args = vec!["machines", "update", "good"];
        args.extend_from_slice(extra);
        let run = clan(&lab, &f, &args);
        assert_eq!(run.code, 1);
        assert!(
            run.stderr.contains(&format!(
                "the target root@{} presented a different host key to the build host root@{}",
                lab.ip("target"),
                lab.ip("builder")
            )),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains("The build host saw SHA256:"));
        assert!(
            !run.stderr.contains("accept-new"),
            "suggests accept-new for a changed key"
        );
        assert!(!run.stderr.contains(">> ~/.ssh/known_hosts"));
        assert_untouched(&lab);
    }
}

// A flake in a directory whose name has a space and a '#' evaluates and deploys.
#[test]
fn flake_in_a_directory_with_a_space_and_a_hash() {
    let lab = lab();
    let dir = lab.write_flake_in(
        "my flakes/#1 fleet?dir=x",
        &format!(
            r#"{{ {} machines.good = system {{ }}; }}"#,
            good_machine(&lab)
        ),
        0,
    );
    lab.trust("builder", "target");
    let out = lab.run_on_workstation(
        &lab.dir,
        &[
            env!("CARGO_BIN_EXE_clan"),
            "machines",
            "update",
            "good",
            "--flake",
            dir.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(0));
    assert!(lab.host("target").system_profile().is_some());
    // A missing flake directory is named.
    let missing = lab.run_on_workstation(
        &lab.dir,
        &[
            env!("CARGO_BIN_EXE_clan"),
            "machines",
            "update",
            "good",
            "--flake",
            "/nowhere/my flake",
        ],
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("the flake directory \"/nowhere/my flake\" (from --flake) does not exist")
    );
}

// Logs are private, named per machine and per build group, and `--host-key-check none`
// names every host it leaves unchecked, once.
#[test]
fn logs_are_private_and_none_is_warned_about() {
    let lab = lab();
    lab.trust("builder", "target");
    // The target through `?HostName=`: its shared connection is stopped all the same.
    let f = lab.write_flake(&format!(
        r#"{{ inventory.machines.good = {{ deploy.targetHost = "root@the-target?HostName={}"; deploy.buildHost = "root@{}"; }}; machines.good = system {{ }}; }}"#,
        lab.ip("target"),
        lab.ip("builder")
    ));
    let warnings_of = |run: &Run| -> Vec<String> {
        run.stderr
            .lines()
            .filter(|l| l.starts_with("warning: --host-key-check none"))
            .map(str::to_string)
            .collect()
    };
    let unchecked = |last: &str| {
        clan(
            &lab,
            &f,
            &[
                "machines",
                "update",
                "good",
                "--host-key-check",
                "none",
                last,
            ],
        )
    };
    // The dry run shows the warning the real run gives.
    let dry = unchecked("--dry-run");
    assert_eq!(dry.code, 0);
    let run = unchecked("--json");
    assert_eq!(run.code, 0);
    let warnings = warnings_of(&run);
    assert_eq!(warnings.len(), 1, "{}", run.stderr);
    assert_eq!(warnings_of(&dry), warnings, "{}", dry.stderr);
    assert!(warnings[0].contains(&format!("root@{}", lab.ip("builder"))));
    assert!(warnings[0].contains("root@the-target"));
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let log = report["machines"][0]["log"].as_str().unwrap();
    assert!(log.ends_with("/machine-good.log"), "{log}");
    let on_disk = lab
        .host("workstation")
        .root()
        .join(Path::new(log).strip_prefix("/root").unwrap());
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&on_disk), 0o600);
    let dir = on_disk.parent().unwrap();
    assert_eq!(mode(dir), 0o700);
    assert!(dir.join("build-0.log").exists());
    // No ssh master of this run outlives it.
    let masters = Command::new("pgrep")
        .args(["-f", "ControlPersist=60"])
        .output()
        .unwrap();
    let masters = String::from_utf8_lossy(&masters.stdout);
    let run_id = report["run"].as_str().unwrap();
    let left = Command::new("pgrep")
        .args(["-af", &format!("clan-ssh-{}", &run_id[..12])])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "ssh masters left running: {masters}"
    );
}
