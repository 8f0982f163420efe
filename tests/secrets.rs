//! Vars (secrets) with the age backend: generated on the workstation, uploaded straight to
//! the target, decrypted there at activation; never on the build host.

mod common;
use std::path::{Path, PathBuf};
use std::process::Command;

use age::secrecy::ExposeSecret;
use clan_lab::{HostKind, WORKSTATION};
use common::*;

/// A new age identity: (private key line, public key).
fn identity() -> (String, String) {
    let id = age::x25519::Identity::generate();
    (
        id.to_string().expose_secret().to_string(),
        id.to_public().to_string(),
    )
}

/// Puts `private` where clan-core looks first on the workstation without AGE_* variables.
fn install_identity(lab: &Lab, private: &str) -> PathBuf {
    let path = lab
        .host(WORKSTATION)
        .root()
        .join(".config/sops/age/keys.txt");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, format!("# test identity\n{private}\n")).unwrap();
    path
}

/// A clan with one machine `m` on the lab's `target`, with `generators` and its secrets
/// uploaded to `location` (under the target's own /root: the location is per host).
fn one_target_flake(lab: &Lab, public: &str, generators: &str, location: &str) -> PathBuf {
    lab.write_flake(&format!(
        r#"{{
          vars.settings.secretStore = "age"; vars.settings.recipients.default = [ "{public}" ];
          inventory.machines.m.deploy.targetHost = "root@{t}";
          machines.m = {{ imports = [ (system {{ vars = {generators}; }}) ];
            clan.core.vars.age.secretLocation = "{location}"; }};
        }}"#,
        t = lab.ip("target"),
    ))
}

/// A clan (with an identity for the workstation) whose machine `m` on `target` has one
/// generator, `api` (a random `token`), in a git repository with everything staged.
fn token_clan_in_git(lab: &Lab) -> PathBuf {
    let (private, public) = identity();
    install_identity(lab, &private);
    let generators =
        r#"{ api = { files.token = { }; script = "echo tok-$RANDOM > $out/token"; }; }"#;
    let flake = one_target_flake(lab, &public, generators, "/root/secret-vars");
    {
        let git = git_in(&flake);
        git(&["init", "-q"]);
        git(&["add", "-A"]);
    }
    flake
}

const GENERATORS: &str = r#"{
  base = {
    files.password = { };
    files.greeting.secret = false;
    script = "head -c 24 /dev/urandom | base64 > $out/password; echo hello-public > $out/greeting";
  };
  db = {
    dependencies = [ "base" ];
    prompts.token = { type = "hidden"; persist = true; description = "API token"; };
    files.hash = { owner = "nobody"; group = "nogroup"; mode = "0440"; };
    files.rootpw.neededFor = "users";
    script = "sha256sum < $in/base/password | cut -d' ' -f1 > $out/hash; cat $prompts/token > $out/rootpw";
  };
}"#;

#[test]
fn secrets_reach_the_target_and_never_the_build_host() {
    let lab = Lab::start(&[
        HostSpec::new("builder"),
        HostSpec::new("target").kind(HostKind::Systemd),
    ]);
    lab.trust("builder", "target");
    let (private, public) = identity();
    install_identity(&lab, &private);
    let flake = lab.write_flake(&format!(
        r#"{{
          vars.settings.secretStore = "age"; vars.settings.recipients.default = [ "{public}" ];
          inventory.machines.m.deploy = {{ targetHost = "root@{t}"; buildHost = "root@{b}"; }};
          machines.m = system {{ vars = {GENERATORS}; publicVarOf = [ "base" "greeting" ]; }};
        }}"#,
        t = lab.ip("target"),
        b = lab.ip("builder"),
    ));

    // Without a terminal the hidden prompt cannot be asked: a clear error, nothing stored.
    let no_tty = clan(&lab, &flake, &["vars", "generate", "m"]);
    assert_eq!(no_tty.code, 2, "{}", no_tty.stderr);
    assert!(no_tty.stderr.contains("API token") && no_tty.stderr.contains("no terminal"));

    // Made for this run: no file of this repository or its build holds it, so a scan that
    // finds it anywhere found a leak.
    let token = format!("tok-{}", identity().1.trim_start_matches("age1"));
    let token = token.as_str();
    let generated = clan_on_terminal(
        &lab,
        &flake,
        &["vars", "generate", "m"],
        &format!("{token}\n"),
    );
    assert_eq!(generated.code, 0, "{}", generated.all());
    let list = clan(&lab, &flake, &["vars", "list", "m"]);
    assert!(
        list.stdout.contains("base/greeting hello-public"),
        "{}",
        list.stdout
    );
    assert!(list.stdout.contains("db/hash ********"));
    let check = clan(&lab, &flake, &["vars", "check", "m"]);
    assert_eq!(check.code, 0, "{}", check.stderr);
    let password = clan(&lab, &flake, &["vars", "get", "m", "base/password"]).stdout;
    let hash = clan(&lab, &flake, &["vars", "get", "m", "db/hash"]).stdout;
    assert_eq!(password.trim().len(), 32);
    assert_eq!(hash.trim().len(), 64);
    // The repository holds ciphertext only.
    let repo_hits = files_containing(&flake, &[password.trim(), hash.trim(), token]);
    assert!(
        repo_hits.is_empty(),
        "plaintext in the repository: {repo_hits:?}"
    );

    let dry = clan(&lab, &flake, &["machines", "update", "m", "--dry-run"]);
    assert!(
        dry.stdout.contains(&format!(
            "[target root@{}] clan-vars-upload /etc/secret-vars 5",
            lab.ip("target")
        )),
        "{}",
        dry.stdout
    );
    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let out = toplevel(&lab, &flake, "m");
    assert_eq!(lab.current_system("target").as_deref(), Some(out.as_str()));

    // Decrypted on the target, with their owners and modes.
    assert_eq!(sh(&lab, "target", "cat /run/secrets/db/hash"), hash.trim());
    assert_eq!(
        sh(&lab, "target", "stat -c '%U:%G %a' /run/secrets/db/hash"),
        "nobody:nogroup 440"
    );
    assert_eq!(
        sh(&lab, "target", "cat /run/secrets-for-users/db/rootpw"),
        token
    );
    assert_eq!(sh(&lab, "target", "cat /run/secrets/db/token"), token);
    assert_eq!(
        sh(
            &lab,
            "target",
            "stat -c '%U:%G %a' /run/secrets-for-users/db/rootpw"
        ),
        "root:root 400"
    );
    assert_eq!(
        sh(&lab, "target", "cat /run/secrets/base/password"),
        password.trim()
    );
    // Each phase's directory is a link swapped in one rename, the old version removed.
    assert!(
        sh(&lab, "target", "readlink /run/secrets").starts_with("secrets.d/v."),
        "/run/secrets is not a link to its current version"
    );
    assert_eq!(sh(&lab, "target", "ls /run/secrets.d | wc -l"), "1");
    // What was uploaded: root-only, 0700 directories and 0400 files.
    assert_eq!(
        sh(
            &lab,
            "target",
            "stat -L -c '%U %a' /etc/secret-vars /etc/secret-vars/key.txt"
        ),
        "root 700\nroot 400"
    );
    assert_eq!(
        sh(
            &lab,
            "target",
            "find -L /etc/secret-vars -type f ! -perm 0400 | wc -l"
        ),
        "0"
    );
    // The public value is in the system, and readable at evaluation.
    let public_value = eval_raw(
        &lab,
        &flake,
        "nixosConfigurations.m.config.clan.core.vars.generators.base.files.greeting.value",
    );
    assert_eq!(public_value, "hello-public\n");

    // No byte of a secret, nor the machine's key, anywhere but the target's secret places:
    // not on the build host (its store, its root), not in the workstation's logs or /tmp,
    // not in any host's store.
    let machine_key = sh(&lab, "target", "cat /etc/secret-vars/key.txt");
    assert!(machine_key.starts_with("AGE-SECRET-KEY-1"));
    let needles = [password.trim(), hash.trim(), token, machine_key.as_str()];
    let target = lab.host("target");
    let allowed = target.dir.join("rootfs/etc/secret-vars.d");
    let hits: Vec<String> = files_containing(&lab.dir, &needles)
        .into_iter()
        .filter(|p| !p.starts_with(&allowed.display().to_string()))
        .collect();
    assert!(hits.is_empty(), "secret bytes found at {hits:?}");
    // The labs' directories are left out (this lab's was scanned above; the others belong to
    // tests running beside this one, whose files change while they are read).
    let tmp_hits: Vec<String> = std::fs::read_dir("/tmp")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with("clan-lab-"))
        .flat_map(|e| files_containing(&e.path(), &needles))
        .collect();
    assert!(tmp_hits.is_empty(), "secret bytes in /tmp: {tmp_hits:?}");
    let shm_hits = files_containing(Path::new("/dev/shm"), &needles);
    assert!(shm_hits.is_empty(), "generator leftovers: {shm_hits:?}");

    // A deploy with --no-secrets uploads nothing; the target keeps what it has.
    let before = sh(&lab, "target", "readlink /etc/secret-vars");
    let again = clan(&lab, &flake, &["machines", "update", "m", "--no-secrets"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert_eq!(sh(&lab, "target", "readlink /etc/secret-vars"), before);
}

#[test]
fn shared_vars_and_key_rotation_touch_only_machine_keys() {
    let lab = Lab::start(&[]);
    let (old_private, old_public) = identity();
    let (new_private, new_public) = identity();
    let key_file = install_identity(&lab, &old_private);
    let shared = r#"{ wifi = { share = true; files.psk = { }; script = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > $out/psk"; }; }"#;
    let clan_args = |recipient: &str| {
        format!(
            r#"{{
              vars.settings.secretStore = "age"; vars.settings.recipients.default = [ "{recipient}" ];
              machines.m1 = system {{ vars = {shared}; }};
              machines.m2 = system {{ vars = {shared}; }};
            }}"#
        )
    };
    let flake = lab.write_flake(&clan_args(&old_public));
    assert_eq!(clan(&lab, &flake, &["vars", "generate", "m1"]).code, 0);
    let second = clan(&lab, &flake, &["vars", "generate", "m2"]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(second.stderr.contains("sharing wifi"), "{}", second.stderr);
    let psk1 = clan(&lab, &flake, &["vars", "get", "m1", "wifi/psk"]).stdout;
    let psk2 = clan(&lab, &flake, &["vars", "get", "m2", "wifi/psk"]).stdout;
    assert_eq!(psk1.len(), 32);
    assert_eq!(psk1, psk2, "one value for both machines");
    assert_eq!(clan(&lab, &flake, &["vars", "check", "m2"]).code, 0);

    // Rotation: the recipients change to the new key; `vars fix` (run by someone who can
    // still decrypt) re-encrypts the machine keys only.
    let secret = flake.join("secrets/clan-vars/shared/wifi/psk/psk.age");
    let secret_before = std::fs::read(&secret).unwrap();
    let key_before = std::fs::read(flake.join("secrets/age-keys/machines/m1/key.age")).unwrap();
    let flake = lab.write_flake(&clan_args(&new_public));
    let fix = clan(&lab, &flake, &["vars", "fix"]);
    assert_eq!(fix.code, 0, "{}", fix.stderr);
    assert!(
        fix.stderr.contains("m1: key re-encrypted") && fix.stderr.contains("m2: key re-encrypted")
    );
    assert_eq!(
        std::fs::read(&secret).unwrap(),
        secret_before,
        "secrets untouched"
    );
    assert_ne!(
        std::fs::read(flake.join("secrets/age-keys/machines/m1/key.age")).unwrap(),
        key_before
    );
    // The old identity no longer opens the machine keys; the new one does.
    let denied = clan(&lab, &flake, &["vars", "get", "m1", "wifi/psk"]);
    assert_eq!(denied.code, 2, "{}", denied.stderr);
    assert!(
        denied.stderr.contains("cannot decrypt")
            && denied.stderr.contains("vars.settings.recipients")
    );
    std::fs::write(&key_file, format!("{new_private}\n")).unwrap();
    assert_eq!(
        clan(&lab, &flake, &["vars", "get", "m2", "wifi/psk"]).stdout,
        psk1
    );

    // m2 stops sharing it: `vars fix` re-encrypts the shared secret to the machines that
    // declare it now, so m2's key no longer opens it (as clan-core's fix does).
    let flake = lab.write_flake(&format!(
        r#"{{
          vars.settings.secretStore = "age"; vars.settings.recipients.default = [ "{new_public}" ];
          machines.m1 = system {{ vars = {shared}; }};
          machines.m2 = system {{ vars = {{ own = {{ files.x = {{ }}; script = "echo x > $out/x"; }}; }}; }};
        }}"#
    ));
    let fix = clan(&lab, &flake, &["vars", "fix", "m1"]);
    assert_eq!(fix.code, 0, "{}", fix.stderr);
    assert!(
        fix.stderr
            .contains("shared wifi: wifi/psk re-encrypted to the machines that share it (m1)"),
        "{}",
        fix.stderr
    );
    let new_identity: age::x25519::Identity = new_private.parse().unwrap();
    let machine_key = |m: &str| -> age::x25519::Identity {
        let sealed =
            std::fs::read(flake.join(format!("secrets/age-keys/machines/{m}/key.age"))).unwrap();
        let key = clan::vars::decrypt_with(std::slice::from_ref(&new_identity), &sealed).unwrap();
        std::str::from_utf8(&key).unwrap().trim().parse().unwrap()
    };
    let sealed = std::fs::read(&secret).unwrap();
    assert!(clan::vars::decrypt_with(&[machine_key("m2")], &sealed).is_err());
    assert_eq!(
        &clan::vars::decrypt_with(&[machine_key("m1")], &sealed).unwrap()[..],
        psk1.as_bytes()
    );
    assert_eq!(
        std::fs::read_to_string(flake.join("secrets/clan-vars/shared/wifi/psk/psk.age.recipients"))
            .unwrap()
            .trim(),
        std::fs::read_to_string(flake.join("secrets/age-keys/machines/m1/pub"))
            .unwrap()
            .trim()
    );
}

#[test]
fn an_interrupted_upload_keeps_the_previous_secrets() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let (private, public) = identity();
    install_identity(&lab, &private);
    // A secret big enough that the upload is still running when the test stops it.
    let flake = one_target_flake(
        &lab,
        &public,
        r#"{ blob = { files.data = { }; script = "head -c 16000000 /dev/urandom > $out/data"; }; }"#,
        "/root/secret-vars-interrupt",
    );
    let first = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(first.code, 0, "{}", first.all());
    let uploaded = lab.host("target").root().join("secret-vars-interrupt");
    let previous_link = std::fs::read_link(&uploaded).unwrap();
    let previous = std::fs::read(uploaded.join("per-machine/m/blob/data/data.age")).unwrap();
    let switches = lab.host("target").switch_log().len();

    assert_eq!(
        clan(&lab, &flake, &["vars", "generate", "m", "--regenerate"]).code,
        0
    );
    let child = lab.spawn_on_workstation(
        &flake,
        &[env!("CARGO_BIN_EXE_clan"), "machines", "update", "m"],
    );
    // Freeze the target's tar mid-upload, cut its ssh session, let it see the end.
    let pattern = "tar -x -f - -C /root/secret-vars-interrupt.d/new";
    let tar_pid = wait_for_process(&lab, pattern);
    Command::new("kill")
        .args(["-STOP", &tar_pid])
        .status()
        .unwrap();
    let session = sshd_session_of(&tar_pid);
    Command::new("kill")
        .args(["-KILL", &session])
        .status()
        .unwrap();
    Command::new("kill")
        .args(["-CONT", &tar_pid])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains("uploading the secrets of m")
            && stderr.contains("keeps its previous secrets"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_link(&uploaded).unwrap(), previous_link);
    assert_eq!(
        std::fs::read(uploaded.join("per-machine/m/blob/data/data.age")).unwrap(),
        previous
    );
    assert_eq!(
        lab.host("target").switch_log().len(),
        switches,
        "nothing activated"
    );
}

#[test]
fn each_vars_mistake_is_one_clear_error_and_nothing_is_uploaded() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let (private, public) = identity();
    let t = lab.ip("target").to_string();
    let flake_with = |recipients: &str, script: &str| {
        lab.write_flake(&format!(
            r#"{{
              vars.settings.secretStore = "age"; vars.settings.recipients.default = [ {recipients} ];
              inventory.machines.m.deploy.targetHost = "root@{t}";
              machines.m = {{ imports = [ (system {{ vars = {{
                app = {{ files.key = {{ }}; files.cert.secret = false; script = "{script}"; }};
              }}; }}) ]; clan.core.vars.age.secretLocation = "/root/secret-vars-mistakes"; }};
            }}"#
        ))
    };
    let good = "echo k > $out/key; echo c > $out/cert";
    let cases: [(&str, &str, bool, &str); 4] = [
        ("", good, true, "vars.settings.recipients.default is empty"),
        (
            "\"PUB\"",
            "echo k > $out/key; exit 3",
            true,
            "generator app of machine m failed (exit 3)",
        ),
        (
            "\"PUB\"",
            "echo k > $out/key",
            true,
            "it did not write $out/cert",
        ),
        ("\"PUB\"", good, false, "no age identity"),
    ];
    for (recipients, script, with_identity, expected) in cases {
        let key_file = lab
            .host(WORKSTATION)
            .root()
            .join(".config/sops/age/keys.txt");
        let _ = std::fs::remove_file(&key_file);
        if with_identity {
            install_identity(&lab, &private);
        }
        let _ = std::fs::remove_dir_all(lab.dir.join("flake/secrets"));
        let _ = std::fs::remove_dir_all(lab.dir.join("flake/vars"));
        let flake = flake_with(&recipients.replace("PUB", &public), script);
        let run = clan(&lab, &flake, &["machines", "update", "m"]);
        assert_ne!(run.code, 0, "{expected}");
        assert!(
            run.stderr.contains(expected),
            "expected {expected:?} in:\n{}",
            run.stderr
        );
        assert_eq!(
            run.stderr.matches("error:").count(),
            1,
            "one error for {expected:?}:\n{}",
            run.stderr
        );
        assert!(
            !lab.host("target")
                .root()
                .join("secret-vars-mistakes")
                .exists()
        );
        assert_target_untouched(&lab);
    }
}

#[test]
fn a_repository_in_clan_cores_age_layout_is_read() {
    let lab = Lab::start(&[]);
    let (private, public) = identity();
    install_identity(&lab, &private);
    let flake = lab.write_flake(&format!(
        r#"{{
          vars.settings.secretStore = "age"; vars.settings.recipients.default = [ "{public}" ];
          machines.web = system {{ vars = {{
            openssh = {{ files.ssh-key = {{ }}; files."ssh-key.pub".secret = false; }};
          }}; }};
        }}"#
    ));
    // Written as clan-core documents the age layout, with the age tool, not this one.
    let (machine_private, machine_public) = identity();
    let write = |rel: &str, bytes: &[u8]| {
        let path = flake.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    let age_encrypt = |recipient: &str, plaintext: &str| -> Vec<u8> {
        let mut child = Command::new("age")
            .args(["-e", "-r", recipient])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("age");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(plaintext.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        out.stdout
    };
    write(
        "secrets/age-keys/machines/web/pub",
        format!("{machine_public}\n").as_bytes(),
    );
    write(
        "secrets/age-keys/machines/web/key.age",
        &age_encrypt(&public, &format!("{machine_private}\n")),
    );
    write(
        "secrets/clan-vars/per-machine/web/openssh/ssh-key/ssh-key.age",
        &age_encrypt(
            &machine_public,
            "-----BEGIN OPENSSH PRIVATE KEY-----\nxyz\n",
        ),
    );
    write(
        "vars/per-machine/web/openssh/ssh-key.pub/value",
        b"ssh-ed25519 AAAAC3Nza web\n",
    );
    let list = clan(&lab, &flake, &["vars", "list", "web"]);
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert_eq!(
        list.stdout,
        "openssh/ssh-key ********\nopenssh/ssh-key.pub ssh-ed25519 AAAAC3Nza web\n"
    );
    let get = clan(&lab, &flake, &["vars", "get", "web", "openssh/ssh-key"]);
    assert_eq!(get.stdout, "-----BEGIN OPENSSH PRIVATE KEY-----\nxyz\n");
    assert_eq!(clan(&lab, &flake, &["vars", "check", "web"]).code, 0);
    // Nothing to generate: the repository is complete.
    let generated = clan(&lab, &flake, &["vars", "generate", "web"]);
    assert!(
        generated.stderr.contains("web: every var is generated"),
        "{}",
        generated.stderr
    );
}

#[test]
fn ctrl_c_during_a_generator_stores_nothing_and_removes_its_directory() {
    let lab = Lab::start(&[]);
    let (private, public) = identity();
    install_identity(&lab, &private);
    // A mark of this test's own in what the generator writes: its private directory (in
    // /dev/shm, seen from outside its sandbox) is the one whose $out/key holds it.
    let mark = format!("s3cr3t-in-progress-{}", std::process::id());
    // A sleep of this test's own, to look for afterwards.
    let sleep = format!("sleep 30.{}", std::process::id());
    let flake = lab.write_flake(&format!(
        r#"{{
          vars.settings.secretStore = "age"; vars.settings.recipients.default = [ "{public}" ];
          machines.m = system {{ vars = {{
            slow = {{ files.key = {{ }}; script = "echo {mark} > $out/key; {sleep}"; }};
          }}; }};
        }}"#
    ));
    let child = lab.spawn_on_workstation(
        &flake,
        &[env!("CARGO_BIN_EXE_clan"), "vars", "generate", "m"],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let find = || {
        std::fs::read_dir("/dev/shm")
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("clan-vars-"))
            })
            .find(|p| {
                std::fs::read_to_string(p.join("out/key")).is_ok_and(|k| k == format!("{mark}\n"))
            })
    };
    let dir = loop {
        if let Some(dir) = find() {
            break dir.display().to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the generator never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(std::path::Path::new(&dir).is_dir(), "{dir}");
    // Ctrl-C reaches clan (the terminal's SIGINT; clan's children have groups of their own).
    let flake_arg = flake.display().to_string();
    let pids = Command::new("pgrep")
        .args([
            "-f",
            &format!("{} vars generate m", env!("CARGO_BIN_EXE_clan")),
        ])
        .output()
        .unwrap();
    let mut signalled = false;
    for pid in String::from_utf8_lossy(&pids.stdout).lines() {
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
        if cwd.display().to_string() == flake_arg {
            Command::new("kill").args(["-INT", pid]).status().unwrap();
            signalled = true;
        }
    }
    assert!(signalled, "clan's process was not found");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted while generator slow of m ran"));
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
    assert!(
        !flake.join("secrets/clan-vars").exists(),
        "something was stored"
    );
    // Nothing of the generator outlives it, in its sandbox either.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !Command::new("pgrep")
        .args(["-f", &sleep])
        .output()
        .unwrap()
        .stdout
        .is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "{sleep} left running");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn vars_upload_alone_then_a_deploy_without_secrets_decrypts_them() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let (private, public) = identity();
    install_identity(&lab, &private);
    let flake = one_target_flake(
        &lab,
        &public,
        r#"{ api = { files.token = { }; script = "echo tok-upload-alone > $out/token"; }; }"#,
        "/root/secret-vars-alone",
    );
    // Generates what is missing, then uploads under the target's deploy lock.
    let upload = clan(&lab, &flake, &["vars", "upload", "m"]);
    assert_eq!(upload.code, 0, "{}", upload.stderr);
    assert!(upload.stderr.contains("m: generating api"));
    assert!(
        upload.stderr.contains("uploading 2 files"),
        "{}",
        upload.stderr
    );
    let location = lab.host("target").root().join("secret-vars-alone");
    assert!(location.join("key.txt").is_file());
    assert!(location.join("per-machine/m/api/token/token.age").is_file());
    assert_eq!(
        sh(&lab, "target", "ls /run/clan/holder 2>/dev/null | wc -l"),
        "0",
        "the lock was not released"
    );
    // The deploy itself uploads nothing, and the activation decrypts what is there.
    let run = clan(&lab, &flake, &["machines", "update", "m", "--no-secrets"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(!run.stderr.contains("upload the secrets"));
    assert_eq!(
        sh(&lab, "target", "cat /run/secrets/api/token"),
        "tok-upload-alone"
    );
}

#[test]
fn runtime_inputs_are_built_here_and_on_the_generators_path() {
    let lab = Lab::start(&[]);
    let (private, public) = identity();
    install_identity(&lab, &private);
    // A package built on the workstation when the generator needs it: bin/tool prints a word.
    let flake = lab.write_flake(&format!(
        r#"{{
          vars.settings.secretStore = "age"; vars.settings.recipients.default = [ "{public}" ];
          machines.m = system {{ vars = {{
            made = {{
              files.word.secret = false;
              runtimeInputs = [ (derivation {{
                name = "vars-tool";
                system = "x86_64-linux";
                builder = "/bin/sh";
                PATH = "/usr/bin:/bin";
                args = [ "-c" "mkdir -p $out/bin; echo 'echo from-the-tool' > $out/bin/tool; chmod +x $out/bin/tool" ];
              }}) ];
              script = "tool > $out/word";
            }};
          }}; }};
        }}"#
    ));
    let generated = clan(&lab, &flake, &["vars", "generate", "m"]);
    assert_eq!(generated.code, 0, "{}", generated.stderr);
    assert_eq!(
        clan(&lab, &flake, &["vars", "get", "m", "made/word"]).stdout,
        "from-the-tool\n"
    );
}

// A fleet deployed on a terminal, where one machine's generator asks a hidden question: the
// live lines are on the screen while machines are evaluated, the prompt goes between them
// (they are cleared while it waits), it is answered, and both machines deploy.
#[test]
fn a_prompt_during_a_fleet_deploy_on_a_terminal() {
    let lab = Lab::start(&[HostSpec::new("t1"), HostSpec::new("t2")]);
    let (private, public) = identity();
    install_identity(&lab, &private);
    let flake = lab.write_flake(&format!(
        r#"{{
          vars.settings.secretStore = "age"; vars.settings.recipients.default = [ "{public}" ];
          inventory.machines.m1.deploy.targetHost = "root@{t1}";
          inventory.machines.m2.deploy.targetHost = "root@{t2}";
          machines.m1 = system {{ }};
          machines.m2 = {{ imports = [ (system {{ vars = {{
            api = {{ prompts.token = {{ type = "hidden"; persist = true; description = "API token of m2"; }}; script = "true"; }};
          }}; }}) ];
            clan.core.vars.age.secretLocation = "/root/secret-vars-fleet"; }};
        }}"#,
        t1 = lab.ip("t1"),
        t2 = lab.ip("t2"),
    ));
    let token = "tok-fleet-on-a-tty";
    let run = clan_on_terminal(&lab, &flake, &["machines", "update"], &format!("{token}\n"));
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(run.stdout.contains("API token of m2"), "{}", run.stdout);
    assert!(lab.host("t1").system_profile().is_some());
    assert_eq!(sh(&lab, "t2", "cat /run/secrets/api/token"), token);
}

// A checkout that lacks the machine's key (never committed, so a clone or CI has the secrets
// but not the key) never makes a new one: generate tracks the key in git with the secrets,
// and without it the dry run, the deploy and `vars check` stop naming the missing files,
// while the target keeps the key that opens its secrets.
#[test]
fn a_checkout_without_the_machine_key_never_makes_a_new_one() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let flake = token_clan_in_git(&lab);
    let git = git_in(&flake);
    let generated = clan(&lab, &flake, &["vars", "generate", "m"]);
    assert_eq!(generated.code, 0, "{}", generated.stderr);
    // Everything generate wrote is tracked, the machine's key included.
    let tracked = git(&["ls-files"]);
    for f in [
        "secrets/age-keys/machines/m/pub",
        "secrets/age-keys/machines/m/key.age",
        "secrets/clan-vars/per-machine/m/api/token/token.age",
    ] {
        assert!(tracked.lines().any(|l| l == f), "{f} untracked:\n{tracked}");
    }
    let first = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let key_on_target = sh(&lab, "target", "cat /root/secret-vars/key.txt");
    assert!(key_on_target.starts_with("AGE-SECRET-KEY-1"));
    let switches = lab.host("target").switch_log().len();

    // The checkout without the key.
    git(&["rm", "-q", "-r", "--cached", "secrets/age-keys"]);
    std::fs::remove_dir_all(flake.join("secrets/age-keys/machines/m")).unwrap();
    let missing = "machine m's key is missing";
    let dry = clan(&lab, &flake, &["machines", "update", "m", "--dry-run"]);
    assert_eq!(dry.code, 2, "{}", dry.stderr);
    assert!(dry.stderr.contains(missing), "{}", dry.stderr);
    assert!(
        dry.stderr.contains("secrets/age-keys/machines/m/pub"),
        "{}",
        dry.stderr
    );
    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains(missing), "{}", run.stderr);
    assert!(run.stderr.contains("untracked"), "{}", run.stderr);
    let generate = clan(&lab, &flake, &["vars", "generate", "m"]);
    assert_eq!(generate.code, 2, "{}", generate.stderr);
    assert!(generate.stderr.contains(missing), "{}", generate.stderr);
    let check = clan(&lab, &flake, &["vars", "check", "m"]);
    assert_eq!(check.code, 1, "{}", check.stderr);
    // No new key anywhere; the target keeps the one that opens its secrets.
    assert!(!flake.join("secrets/age-keys/machines/m/pub").exists());
    assert_eq!(
        sh(&lab, "target", "cat /root/secret-vars/key.txt"),
        key_on_target
    );
    assert_eq!(lab.host("target").switch_log().len(), switches);
}

// The upload only ever replaces what clan put there: a secretLocation that is a directory
// with someone's data is refused on the target and left as it was; one that names a
// directory of the system is refused before anything runs.
#[test]
fn the_upload_never_replaces_a_directory_it_did_not_make() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let (private, public) = identity();
    install_identity(&lab, &private);
    let generators = r#"{ api = { files.token = { }; script = "echo tok > $out/token"; }; }"#;
    let data = lab.host("target").root().join("important/db.sqlite");
    std::fs::create_dir_all(data.parent().unwrap()).unwrap();
    std::fs::write(&data, "the user's data").unwrap();
    let flake = one_target_flake(&lab, &public, generators, "/root/important");
    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains(
            "clan: refused /root/important: it is a directory with files that clan did not put there"
        ),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read_to_string(&data).unwrap(), "the user's data");
    assert!(!lab.host("target").root().join("important.d").exists());
    assert!(lab.host("target").switch_log().is_empty());

    let system = one_target_flake(&lab, &public, generators, "/etc");
    let run = clan(&lab, &system, &["machines", "update", "m"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("a directory of the system"),
        "{}",
        run.stderr
    );
    assert!(lab.host("target").switch_log().is_empty());
}

// Nothing in /run/clan is trusted: a script planted at the path of clan's own is replaced,
// never run; a /run/clan that is a symlink, belongs to another user or is writable by others
// stops the deploy before anything runs there.
#[test]
fn planted_scripts_in_run_clan_never_run() {
    let lab = Lab::start(&[HostSpec::new("target").kind(HostKind::Systemd)]);
    let deploy = |variant: &str| {
        let f = lab.write_flake(&format!(
            r#"{{ inventory.machines.m.deploy.targetHost = "root@{}"; machines.m = system {{ variant = "{variant}"; }}; }}"#,
            lab.ip("target")
        ));
        (
            clan(&lab, &f, &["machines", "update", "m"]),
            toplevel(&lab, &f, "m"),
        )
    };
    let (first, v1) = deploy("v1");
    assert_eq!(first.code, 0, "{}", first.stderr);
    // Every installed script replaced by one that leaves a mark (still root's, mode 0600).
    sh(
        &lab,
        "target",
        "for f in /run/clan/*.sh; do printf '#!/bin/sh\\ntouch /root/planted-ran\\n' > \"$f\"; done",
    );
    let (second, v2) = deploy("v2");
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(!lab.host("target").root().join("planted-ran").exists());
    assert_eq!(
        lab.host("target").system_profile().as_deref(),
        Some(v2.as_str())
    );
    assert_ne!(v1, v2);
    for (plant, why) in [
        (
            "mv /run/clan /run/clan-real && ln -s /run/clan-real /run/clan",
            "it is a symbolic link",
        ),
        ("chown 65534 /run/clan", "it belongs to user 65534, not 0"),
        ("chmod 0777 /run/clan", "others may write to it (mode 777)"),
    ] {
        sh(&lab, "target", plant);
        let (run, _) = deploy("v3");
        assert_ne!(run.code, 0, "{plant}");
        assert!(
            run.stderr
                .contains(&format!("clan: unsafe /run/clan: {why}")),
            "{plant}: {}",
            run.stderr
        );
        assert_eq!(
            lab.host("target").system_profile().as_deref(),
            Some(v2.as_str()),
            "{plant}"
        );
        sh(
            &lab,
            "target",
            "if [ -L /run/clan ]; then rm /run/clan && mv /run/clan-real /run/clan; fi; chown 0:0 /run/clan; chmod 0755 /run/clan",
        );
    }
    assert!(!lab.host("target").root().join("planted-ran").exists());
}

// Generators run in a sandbox: one from any module tries to read the user's AGE_KEY, ssh key
// and age identity file, to reach the network and to write outside $out, and sees none of
// it. With --no-sandbox (warned about) the same generator sees all of it: the test can fail.
#[test]
fn generators_see_nothing_of_the_user() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let (private, public) = identity();
    let identity_file = install_identity(&lab, &private);
    let escape = lab.host(WORKSTATION).root().join("escaped");
    let probe = format!(
        r#"{{ probe = {{ files.seen.secret = false; script = "r=; if [ -n \"\${{AGE_KEY:-}}\" ]; then r=\"$r env\"; fi; if cat /root/.ssh/id_ed25519 >/dev/null 2>&1; then r=\"$r ssh\"; fi; if cat {id} >/dev/null 2>&1; then r=\"$r identity\"; fi; if (exec 3<>/dev/tcp/{t}/22) 2>/dev/null; then r=\"$r network\"; fi; if touch /root/escaped 2>/dev/null; then r=\"$r write\"; fi; echo \"seen:$r\" > $out/seen"; }}; }}"#,
        id = "/root/.config/sops/age/keys.txt",
        t = lab.ip("target"),
    );
    assert!(identity_file.exists());
    let flake = one_target_flake(&lab, &public, &probe, "/root/secret-vars");
    let generate = |extra: &[&str]| {
        let key_arg = format!("AGE_KEY={private}");
        let mut argv = vec![
            "env",
            key_arg.as_str(),
            env!("CARGO_BIN_EXE_clan"),
            "vars",
            "generate",
            "m",
            "--regenerate",
        ];
        argv.extend_from_slice(extra);
        let out = lab.run_on_workstation(&flake, &argv);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        let seen =
            std::fs::read_to_string(flake.join("vars/per-machine/m/probe/seen/value")).unwrap();
        (seen.trim().to_string(), stderr)
    };
    let (seen, _) = generate(&[]);
    assert_eq!(seen, "seen:", "the sandboxed generator saw:{seen}");
    assert!(!escape.exists());
    let (seen, stderr) = generate(&["--no-sandbox"]);
    assert_eq!(seen, "seen: env ssh identity network write");
    assert!(stderr.contains("warning: --no-sandbox"), "{stderr}");
    assert!(escape.exists());
}

// A failing generator's own output (a script run with `set -x` prints what it handles) is
// shown on the terminal, never put in the --json report.
#[test]
fn a_failing_generators_output_stays_out_of_the_json_report() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let (private, public) = identity();
    install_identity(&lab, &private);
    let generators =
        r#"{ api = { files.token = { }; script = "set -x; token=tok-traced-7c1e; exit 3"; }; }"#;
    let flake = one_target_flake(&lab, &public, generators, "/root/secret-vars");
    let run = clan(&lab, &flake, &["machines", "update", "m", "--json"]);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("tok-traced-7c1e"), "{}", run.stderr);
    assert!(!run.stdout.contains("tok-traced-7c1e"), "{}", run.stdout);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        report["errors"][0]["code"], "vars.generator-failed",
        "{report}"
    );
}

// A var that exists in another store's layout (the sops store, the default) is generated
// already, under a clan that selects the age store: generate and the deploy refuse to make a new one beside it, naming the
// file, and store nothing.
#[test]
fn a_secret_in_another_stores_layout_is_never_generated_again() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let (private, public) = identity();
    install_identity(&lab, &private);
    let generators = r#"{ api = { files.token = { }; script = "echo tok > $out/token"; }; }"#;
    let flake = one_target_flake(&lab, &public, generators, "/root/secret-vars");
    let sops_file = flake.join("vars/per-machine/m/api/token/secret");
    std::fs::create_dir_all(sops_file.parent().unwrap()).unwrap();
    std::fs::write(
        &sops_file,
        r#"{"data":"ENC[AES256_GCM,data:x,iv:y,tag:z,type:str]","sops":{}}"#,
    )
    .unwrap();
    for args in [
        &["vars", "generate", "m"][..],
        &["machines", "update", "m"][..],
    ] {
        let run = clan(&lab, &flake, args);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains(&format!(
                "machine m's secret api/token exists in the sops layout ({})",
                sops_file.display()
            )),
            "{args:?}: {}",
            run.stderr
        );
    }
    assert!(!flake.join("secrets").exists(), "something was generated");
    assert!(lab.host("target").switch_log().is_empty());
}

// clan-core's generator options: a changed `validation` makes the generator run again, and
// what depends on it, nothing else (its hash stored where clan-core stores it); a secret
// with `restartUnits` that changed puts its units on NixOS's activation restart list; a
// `multiline-hidden` prompt takes several lines (the terminal's echo off meanwhile).
#[test]
fn validation_restart_units_and_hidden_multiline_prompts() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let (private, public) = identity();
    install_identity(&lab, &private);
    let generators = r#"{
      cert = { validation = { domain = "a.example"; }; files.key.restartUnits = [ "web.service" ];
               script = "head -c 16 /dev/urandom | base64 > $out/key"; };
      chain = { dependencies = [ "cert" ]; files.pem = { }; script = "cat $in/cert/key > $out/pem"; };
      other = { files.token = { }; script = "head -c 16 /dev/urandom | base64 > $out/token"; };
      note = { prompts.text = { type = "multiline-hidden"; persist = true; }; script = "cat $prompts/text > $out/text"; };
    }"#;
    let flake = one_target_flake(&lab, &public, generators, "/root/secret-vars");
    let generated = clan_on_terminal(
        &lab,
        &flake,
        &["vars", "generate", "m"],
        "first hidden line\nsecond hidden line\n\x04",
    );
    // (What is typed here reaches the terminal before the prompt turns its echo off, so
    // whether it shows cannot be told from this output.)
    assert_eq!(generated.code, 0, "{}", generated.all());
    assert!(
        generated
            .all()
            .contains("m/note: text (not shown; end with Ctrl-D")
    );
    let get = |var: &str| clan(&lab, &flake, &["vars", "get", "m", var]).stdout;
    assert_eq!(get("note/text"), "first hidden line\nsecond hidden line\n");
    let hash_file = flake.join("vars/per-machine/m/cert/.validation-hash");
    let expected = {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(br#"{"domain":"a.example"}"#);
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert_eq!(std::fs::read_to_string(&hash_file).unwrap(), expected);
    assert!(
        !flake
            .join("vars/per-machine/m/other/.validation-hash")
            .exists()
    );
    let (key, pem, token) = (get("cert/key"), get("chain/pem"), get("other/token"));

    // The first deploy brings the secret: its unit is restarted after the switch.
    let restart_list = "cat /run/nixos/activation-restart-list 2>/dev/null; rm -f /run/nixos/activation-restart-list";
    assert_eq!(clan(&lab, &flake, &["machines", "update", "m"]).code, 0);
    assert_eq!(sh(&lab, "target", restart_list), "web.service");

    // Another validation: cert runs again, and chain (which depends on it); other does not.
    let nix = std::fs::read_to_string(flake.join("flake.nix")).unwrap();
    std::fs::write(
        flake.join("flake.nix"),
        nix.replace("a.example", "b.example"),
    )
    .unwrap();
    let again = clan(&lab, &flake, &["vars", "generate", "m"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert_ne!(get("cert/key"), key);
    assert_ne!(get("chain/pem"), pem);
    assert_eq!(get("chain/pem"), get("cert/key"));
    assert_eq!(get("other/token"), token);
    assert_ne!(std::fs::read_to_string(&hash_file).unwrap(), expected);

    // The changed secret restarts its unit once; an unchanged one does not.
    assert_eq!(clan(&lab, &flake, &["machines", "update", "m"]).code, 0);
    assert_eq!(sh(&lab, "target", restart_list), "web.service");
    assert_eq!(clan(&lab, &flake, &["machines", "update", "m"]).code, 0);
    assert_eq!(sh(&lab, "target", restart_list), "");
}

// A repository written with this tool's earlier layout (`<gen>/<file>.age`) is refused by
// name, never read as missing and generated again; `clan vars fix` moves it to clan-core's
// age layout (`<gen>/<file>/<file>.age`) and stages the move in git, changing no secret;
// the deploy then decrypts it on the target.
#[test]
fn the_earlier_layout_is_moved_by_vars_fix_and_never_generated_again() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let flake = token_clan_in_git(&lab);
    let git = git_in(&flake);
    assert_eq!(clan(&lab, &flake, &["vars", "generate", "m"]).code, 0);
    let token = clan(&lab, &flake, &["vars", "get", "m", "api/token"]).stdout;
    assert!(token.starts_with("tok-"), "{token}");
    // Put back where the earlier versions of this tool kept it.
    let new = "secrets/clan-vars/per-machine/m/api/token/token.age";
    let old = "secrets/clan-vars/per-machine/m/api/token.age";
    git(&["mv", new, old]);
    let encrypted = std::fs::read(flake.join(old)).unwrap();

    for args in [
        &["vars", "list", "m"][..],
        &["vars", "generate", "m"][..],
        &["machines", "update", "m", "--dry-run"][..],
        &["machines", "update", "m"][..],
    ] {
        let run = clan(&lab, &flake, args);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(
            run.stderr
                .contains("the repository holds 1 secret(s) in this tool's earlier layout")
                && run.stderr.contains(&flake.join(old).display().to_string())
                && run.stderr.contains("run `clan vars fix`"),
            "{args:?}: {}",
            run.stderr
        );
    }
    let json = clan(&lab, &flake, &["machines", "update", "m", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(report["errors"][0]["code"], "vars.old-layout", "{report}");
    assert_eq!(std::fs::read(flake.join(old)).unwrap(), encrypted);
    assert!(!flake.join(new).exists(), "generated again");
    assert!(lab.host("target").switch_log().is_empty());

    let fix = clan(&lab, &flake, &["vars", "fix"]);
    assert_eq!(fix.code, 0, "{}", fix.stderr);
    assert!(
        fix.stderr
            .contains("moved 1 secret(s) of the repository to clan-core's age layout"),
        "{}",
        fix.stderr
    );
    assert_eq!(
        std::fs::read(flake.join(new)).unwrap(),
        encrypted,
        "no secret changed"
    );
    assert!(!flake.join(old).exists());
    let tracked = git(&["ls-files"]);
    assert!(tracked.lines().any(|l| l == new), "{tracked}");
    assert!(!tracked.lines().any(|l| l == old), "{tracked}");

    let deploy = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(deploy.code, 0, "{}", deploy.stderr);
    assert_eq!(
        sh(&lab, "target", "cat /run/secrets/api/token"),
        token.trim()
    );

    // A target still holding the earlier layout (uploaded before the move; a deploy with
    // --no-secrets leaves it) activates all the same.
    let uploaded = std::fs::canonicalize(lab.host("target").root().join("secret-vars")).unwrap();
    let dir = uploaded.join("per-machine/m/api");
    std::fs::rename(dir.join("token/token.age"), dir.join("token.age")).unwrap();
    std::fs::remove_dir(dir.join("token")).unwrap();
    sh(&lab, "target", "rm -rf /run/secrets /run/secrets.d");
    let again = clan(
        &lab,
        &flake,
        &["machines", "update", "m", "--no-secrets", "--reactivate"],
    );
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(
        sh(&lab, "target", "cat /run/secrets/api/token"),
        token.trim()
    );
}

// `clan vars set`: a var made by hand, from standard input, stored as generate stores it
// (the secret encrypted to the machine's key, staged in git), and deployed.
#[test]
fn vars_set_stores_a_value_as_generate_would() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let (private, public) = identity();
    install_identity(&lab, &private);
    let generators = r#"{ api = { files.token = { }; files.url.secret = false;
        script = "echo tok-$RANDOM > $out/token; echo https://a > $out/url"; }; }"#;
    let flake = one_target_flake(&lab, &public, generators, "/root/secret-vars");
    let git = git_in(&flake);
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    let set = |var: &str, value: &str| {
        lab.run_on_workstation_with_input(
            &flake,
            &[env!("CARGO_BIN_EXE_clan"), "vars", "set", "m", var],
            value,
        )
    };
    // Before anything was generated: the machine's key is made for it.
    let out = set("api/token", "typed-by-hand\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        clan(&lab, &flake, &["vars", "get", "m", "api/token"]).stdout,
        "typed-by-hand\n"
    );
    let tracked = git(&["ls-files"]);
    for f in [
        "secrets/clan-vars/per-machine/m/api/token/token.age",
        "secrets/age-keys/machines/m/key.age",
    ] {
        assert!(tracked.lines().any(|l| l == f), "{f} untracked:\n{tracked}");
    }
    let out = set("api/url", "https://b\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The rest is generated; what was set stays.
    assert_eq!(clan(&lab, &flake, &["machines", "update", "m"]).code, 0);
    assert_eq!(
        sh(&lab, "target", "cat /run/secrets/api/token"),
        "typed-by-hand"
    );
    assert_eq!(
        std::fs::read_to_string(flake.join("vars/per-machine/m/api/url/value")).unwrap(),
        "https://b\n"
    );
    let unknown = set("api/nope", "x");
    assert_eq!(unknown.status.code(), Some(2));
}
