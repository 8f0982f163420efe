//! The sops store on this repository's library (`vars.settings.secretStore = "sops"`):
//! `clan vars generate` writes clan-core's sops layout (the machine's key pair under `sops/`,
//! each secret at `vars/<scope>/<gen>/<file>/secret` with its `machines/` and `users/` links,
//! encrypted to exactly the linked keys), the deploy sends the machine's key to
//! `secretUploadDirectory` and the sops files inside the system, and the target decrypts
//! them with sops (here the lab's stand-in, an independent implementation) at clan-core's
//! paths. Never on the build host in the clear.

mod common;
use std::path::Path;
use std::process::Command;

use age::secrecy::ExposeSecret;
use clan_lab::{HostKind, WORKSTATION};
use common::*;

const GENERATORS: &str = r#"{
  base = {
    files.password = { };
    files.greeting.secret = false;
    script = "head -c 24 /dev/urandom | base64 > $out/password; echo hello-public > $out/greeting";
  };
  db = {
    dependencies = [ "base" ];
    files.hash = { owner = "nobody"; group = "nogroup"; mode = "0440"; };
    files.rootpw.neededFor = "users";
    files.draft.deploy = false;
    files.init.neededFor = "activation";
    script = "sha256sum < $in/base/password | cut -d' ' -f1 > $out/hash; echo root-$RANDOM > $out/rootpw; echo draft > $out/draft; echo init-$RANDOM > $out/init";
  };
  ca = {
    share = true;
    files.key = { };
    script = "echo ca-$RANDOM$RANDOM > $out/key";
  };
}"#;

fn git(flake: &Path, args: &[&str]) -> String {
    git_in(flake)(args)
}

fn link(path: &Path) -> String {
    std::fs::read_link(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .display()
        .to_string()
}

/// Code of the first error of a `--json` report.
fn error_code(run: &Run) -> String {
    let report: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|_| panic!("no JSON report: {}", run.all()));
    report["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn the_sops_store_is_generated_as_clan_core_lays_it_out_and_decrypts_on_the_target() {
    let lab = Lab::start(&[
        HostSpec::new("builder"),
        HostSpec::new("target").kind(HostKind::Systemd),
    ]);
    lab.trust("builder", "target");
    let sops = lab.install_sops("target");
    let admin = age::x25519::Identity::generate();
    let keys = lab
        .host(WORKSTATION)
        .root()
        .join(".config/sops/age/keys.txt");
    std::fs::create_dir_all(keys.parent().unwrap()).unwrap();
    std::fs::write(
        &keys,
        format!("# admin\n{}\n", admin.to_string().expose_secret()),
    )
    .unwrap();
    let flake = lab.write_flake(&format!(
        r#"{{
          # The sops store is the default, as in clan-core.
          inventory.machines.m.deploy = {{ targetHost = "root@{t}"; buildHost = "root@{b}"; }};
          machines.m = {{ imports = [ (system {{ vars = {GENERATORS}; publicVarOf = [ "base" "greeting" ]; }}) ];
            clan.core.vars.sops.command = "{sops}"; }};
          # Only the shared generator: it joins what m made.
          machines.o = {{ imports = [ (system {{ vars = {{ ca = {{ share = true; files.key = {{ }}; script = "echo ca-$RANDOM$RANDOM > $out/key"; }}; }}; }}) ]; }};
          # The shared generator declared otherwise: refused beside o.
          machines.p = {{ imports = [ (system {{ vars = {{ ca = {{ share = true; files.key.deploy = false; script = "echo ca-$RANDOM$RANDOM > $out/key"; }}; }}; }}) ]; }};
          # In the age layout: the sops store never generates beside it.
          machines.n = {{ imports = [ (system {{ vars = {{ x = {{ files.s = {{ }}; script = "echo s > $out/s"; }}; }}; }}) ]; }};
        }}"#,
        t = lab.ip("target"),
        b = lab.ip("builder"),
    ));
    git(&flake, &["init", "-q"]);
    git(&flake, &["add", "-A"]);

    // Not a sops user of the clan yet: nothing is made.
    let no_user = clan(&lab, &flake, &["vars", "generate", "m"]);
    assert_eq!(no_user.code, 2, "{}", no_user.all());
    assert!(
        no_user.stderr.contains("no sops user of this clan")
            && no_user.stderr.contains("clan vars keygen"),
        "{}",
        no_user.stderr
    );
    assert!(!flake.join("sops").exists() && !flake.join("vars").exists());

    let keygen = clan(&lab, &flake, &["vars", "keygen", "--user", "admin"]);
    assert_eq!(keygen.code, 0, "{}", keygen.all());
    let generated = clan(&lab, &flake, &["vars", "generate", "m"]);
    assert_eq!(generated.code, 0, "{}", generated.all());

    // clan-core's layout, links and all, tracked by git.
    let key_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(flake.join("sops/machines/m/key.json")).unwrap(),
    )
    .unwrap();
    let machine_public = key_json[0]["publickey"].as_str().unwrap().to_string();
    assert!(machine_public.starts_with("age1"), "{key_json}");
    assert_eq!(key_json[0]["type"], "age");
    let key_dir = flake.join("sops/secrets/m-age.key");
    assert_eq!(link(&key_dir.join("users/admin")), "../../../users/admin");
    assert!(!key_dir.join("machines").exists());
    let password_dir = flake.join("vars/per-machine/m/base/password");
    assert_eq!(
        link(&password_dir.join("machines/m")),
        "../../../../../../sops/machines/m"
    );
    assert_eq!(
        link(&password_dir.join("users/admin")),
        "../../../../../../sops/users/admin"
    );
    // Not deployed: the machine is no recipient.
    assert!(
        !flake
            .join("vars/per-machine/m/db/draft/machines/m")
            .exists()
    );
    assert!(flake.join("vars/shared/ca/key/machines/m").is_symlink());
    assert_eq!(
        std::fs::read_to_string(flake.join("vars/per-machine/m/base/greeting/value")).unwrap(),
        "hello-public\n"
    );
    let tracked = git(&flake, &["ls-files"]);
    for path in [
        "sops/users/admin/key.json",
        "sops/machines/m/key.json",
        "sops/secrets/m-age.key/secret",
        "sops/secrets/m-age.key/users/admin",
        "vars/per-machine/m/base/password/secret",
        "vars/per-machine/m/base/password/machines/m",
        "vars/shared/ca/key/secret",
    ] {
        assert!(
            tracked.lines().any(|l| l == path),
            "{path} untracked:\n{tracked}"
        );
    }
    // sops' binary store, encrypted to exactly the linked keys.
    let text = std::fs::read_to_string(password_dir.join("secret")).unwrap();
    let mut recipients = clan::vars::sops::recipients(&text).unwrap();
    recipients.sort();
    let mut wanted = vec![machine_public.clone(), admin.to_public().to_string()];
    wanted.sort();
    assert_eq!(recipients, wanted);

    let check = clan(&lab, &flake, &["vars", "check", "m"]);
    assert_eq!(check.code, 0, "{}", check.all());
    let list = clan(&lab, &flake, &["vars", "list", "m"]);
    assert!(
        list.stdout.contains("base/greeting hello-public"),
        "{}",
        list.stdout
    );
    let password = clan(&lab, &flake, &["vars", "get", "m", "base/password"]).stdout;
    let hash = clan(&lab, &flake, &["vars", "get", "m", "db/hash"]).stdout;
    let rootpw = clan(&lab, &flake, &["vars", "get", "m", "db/rootpw"]).stdout;
    let ca = clan(&lab, &flake, &["vars", "get", "m", "ca/key"]).stdout;
    assert_eq!(password.trim().len(), 32);
    assert_eq!(hash.trim().len(), 64, "the dependency was read: {hash}");

    // Deployed through the build host: the machine's key to the upload directory, the sops
    // files inside the system; decrypted on the target by sops at clan-core's paths.
    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let out = toplevel(&lab, &flake, "m");
    assert!(
        lab.host("builder").has_path(&out),
        "not built on the builder"
    );
    assert_eq!(lab.current_system("target").as_deref(), Some(out.as_str()));
    let dir = "/run/secrets/vars/per-machine/m";
    assert_eq!(
        sh(&lab, "target", &format!("cat {dir}/base/password")),
        password.trim()
    );
    assert_eq!(
        sh(&lab, "target", &format!("cat {dir}/db/hash")),
        hash.trim()
    );
    assert_eq!(
        sh(&lab, "target", &format!("stat -c '%U:%G %a' {dir}/db/hash")),
        "nobody:nogroup 440"
    );
    assert_eq!(
        sh(
            &lab,
            "target",
            "cat /run/secrets-for-users/vars/per-machine/m/db/rootpw"
        ),
        rootpw.trim()
    );
    assert_eq!(
        sh(&lab, "target", "cat /run/secrets/vars/shared/ca/key"),
        ca.trim()
    );
    assert_eq!(
        sh(&lab, "target", &format!("ls {dir}/db")),
        "hash",
        "only what is deployed (and not for users) is there"
    );
    let init = clan(&lab, &flake, &["vars", "get", "m", "db/init"]).stdout;
    assert_eq!(
        sh(
            &lab,
            "target",
            "cat /var/lib/sops-nix/activation/per-machine/m/db/init"
        ),
        init.trim()
    );
    let machine_key = sh(&lab, "target", "cat /var/lib/sops-nix/key.txt");
    assert!(machine_key.starts_with("AGE-SECRET-KEY-1"), "{machine_key}");
    assert_eq!(
        machine_key
            .parse::<age::x25519::Identity>()
            .unwrap()
            .to_public()
            .to_string(),
        machine_public
    );
    // The option's path is where the file is.
    let path = eval_raw(
        &lab,
        &flake,
        "nixosConfigurations.m.config.clan.core.vars.generators.db.files.hash.path",
    );
    assert_eq!(path, format!("{dir}/db/hash"));
    // Nothing in the clear, nor the machine's key, on the build host.
    let needles = [
        password.trim(),
        hash.trim(),
        rootpw.trim(),
        ca.trim(),
        machine_key.as_str(),
    ];
    let hits = files_containing(&lab.host("builder").dir, &needles);
    assert!(hits.is_empty(), "secret bytes on the build host: {hits:?}");

    // A link added without re-encrypting: named, the deploy (and its dry run) stop; `vars
    // fix` re-encrypts to exactly the linked keys.
    let bob = age::x25519::Identity::generate();
    std::fs::create_dir_all(flake.join("sops/users/bob")).unwrap();
    std::fs::write(
        flake.join("sops/users/bob/key.json"),
        format!(r#"[{{"publickey": "{}", "type": "age"}}]"#, bob.to_public()),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        "../../../../../../sops/users/bob",
        password_dir.join("users/bob"),
    )
    .unwrap();
    git(&flake, &["add", "-A"]);
    let check = clan(&lab, &flake, &["vars", "check", "m"]);
    assert_eq!(check.code, 1, "{}", check.all());
    assert!(
        check.stderr.contains("key of user 'bob'"),
        "{}",
        check.stderr
    );
    for dry in [true, false] {
        let mut args = vec!["machines", "update", "m", "--json"];
        if dry {
            args.push("--dry-run");
        }
        let stopped = clan(&lab, &flake, &args);
        assert_eq!(stopped.code, 2, "{}", stopped.all());
        assert_eq!(error_code(&stopped), "vars.recipients-changed");
    }
    let fix = clan(&lab, &flake, &["vars", "fix", "m"]);
    assert_eq!(fix.code, 0, "{}", fix.all());
    let text = std::fs::read_to_string(password_dir.join("secret")).unwrap();
    assert_eq!(
        clan::vars::sops::decrypt(&text, std::slice::from_ref(&bob)).unwrap()[..],
        password.as_bytes()[..]
    );
    assert_eq!(clan(&lab, &flake, &["vars", "check", "m"]).code, 0);

    // Regenerating one generator keeps the machine's key and the others' secrets.
    let key_before = std::fs::read(key_dir.join("secret")).unwrap();
    let hash_before = std::fs::read(flake.join("vars/per-machine/m/db/hash/secret")).unwrap();
    let again = clan(&lab, &flake, &["vars", "generate", "m", "-g", "ca", "-r"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert_eq!(std::fs::read(key_dir.join("secret")).unwrap(), key_before);
    assert_eq!(
        std::fs::read(flake.join("vars/per-machine/m/db/hash/secret")).unwrap(),
        hash_before
    );
    let new_ca = clan(&lab, &flake, &["vars", "get", "m", "ca/key"]).stdout;
    assert_ne!(new_ca, ca);
    // The next deploy carries it (a new system: the sops file is in it).
    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(
        sh(&lab, "target", "cat /run/secrets/vars/shared/ca/key"),
        new_ca.trim()
    );

    // A machine with nothing of its own to generate joins the shared secret: its key is
    // made, its link added, the secret encrypted to it too (and not made again).
    let differs = clan(&lab, &flake, &["vars", "generate", "o", "p"]);
    assert_eq!(differs.code, 2, "{}", differs.all());
    assert!(
        differs
            .stderr
            .contains("machines o and p declare the shared generator ca differently (in: files)"),
        "{}",
        differs.stderr
    );
    assert!(
        !flake.join("sops/machines/o").exists(),
        "something was made"
    );
    let join = clan(&lab, &flake, &["vars", "generate", "o"]);
    assert_eq!(join.code, 0, "{}", join.all());
    assert!(flake.join("vars/shared/ca/key/machines/o").is_symlink());
    let o_key = clan::vars::sops::decrypt(
        &std::fs::read_to_string(flake.join("sops/secrets/o-age.key/secret")).unwrap(),
        std::slice::from_ref(&admin),
    )
    .unwrap();
    let o_key: age::x25519::Identity = std::str::from_utf8(&o_key).unwrap().trim().parse().unwrap();
    let shared = std::fs::read_to_string(flake.join("vars/shared/ca/key/secret")).unwrap();
    assert_eq!(
        clan::vars::sops::decrypt(&shared, std::slice::from_ref(&o_key)).unwrap()[..],
        new_ca.as_bytes()[..]
    );

    // A machine whose vars are in the age layout while the clan selects sops: refused by
    // name, nothing made beside them.
    let planted = flake.join("secrets/age-keys/machines/n/pub");
    std::fs::create_dir_all(planted.parent().unwrap()).unwrap();
    std::fs::write(&planted, format!("{}\n", bob.to_public())).unwrap();
    let refused = clan(&lab, &flake, &["vars", "generate", "n"]);
    assert_eq!(refused.code, 2, "{}", refused.all());
    assert!(
        refused.stderr.contains("secrets/age-keys/machines/n/pub")
            && refused.stderr.contains("age layout")
            && refused.stderr.contains("sops store"),
        "{}",
        refused.stderr
    );
    assert!(!flake.join("sops/machines/n").exists() && !flake.join("vars/per-machine/n").exists());
}

// The deploy generates what the sops store lacks, as clan-core's does, and the system it then
// builds carries the new sops files: one run, from nothing to secrets on the target.
#[test]
fn a_deploy_generates_into_the_sops_store_and_carries_the_new_files() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let sops = lab.install_sops("target");
    install_age_identity(&lab);
    let flake = lab.write_flake(&format!(
        r#"{{
          inventory.machines.m.deploy.targetHost = "root@{t}";
          machines.m = {{ imports = [ (system {{ vars = {{
              api = {{ files.token = {{ }}; script = "echo tok-$RANDOM$RANDOM > $out/token"; }};
            }}; }}) ];
            clan.core.vars.sops.command = "{sops}";
            clan.core.vars.sops.secretUploadDirectory = "/root/sops-nix"; }};
        }}"#,
        t = lab.ip("target"),
    ));
    git(&flake, &["init", "-q"]);
    git(&flake, &["add", "-A"]);
    assert_eq!(
        clan(&lab, &flake, &["vars", "keygen", "--user", "admin"]).code,
        0
    );
    // A dry run generates nothing, so it cannot evaluate a system that carries secrets not
    // made yet: it says so by name.
    let dry = clan(
        &lab,
        &flake,
        &["machines", "update", "m", "--dry-run", "--json"],
    );
    assert_eq!(dry.code, 2, "{}", dry.all());
    let report: serde_json::Value = serde_json::from_str(&dry.stdout).unwrap();
    assert_eq!(
        report["errors"][0]["code"], "vars.not-generated",
        "{report}"
    );
    assert!(
        dry.stderr.contains("(api)") && dry.stderr.contains("clan vars generate m"),
        "{}",
        dry.stderr
    );
    assert!(!flake.join("vars").exists(), "the dry run generated");
    let run = clan(&lab, &flake, &["machines", "update", "m"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(run.stderr.contains("m: generating api"), "{}", run.stderr);
    let token = clan(&lab, &flake, &["vars", "get", "m", "api/token"]).stdout;
    assert!(token.starts_with("tok-"), "{token}");
    assert_eq!(
        sh(
            &lab,
            "target",
            "cat /run/secrets/vars/per-machine/m/api/token"
        ),
        token.trim()
    );
    // Once they exist, the dry run shows the plan.
    let dry = clan(&lab, &flake, &["machines", "update", "m", "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.all());
    let tracked = git(&flake, &["ls-files", "vars", "sops"]);
    assert!(
        tracked.contains("vars/per-machine/m/api/token/secret"),
        "{tracked}"
    );
}

// A repository that sops and clan-core wrote (clan-core's checks, copied unchanged into
// tests/fixtures/clan-core-sops with their test key), under this repository's library: read
// as it is (nothing generated again: the generators would fail), and deployed through a build
// host; on the target, sops (the lab's stand-in) decrypts the files sops wrote with the key
// the deploy uploaded.
#[test]
fn a_repository_sops_wrote_deploys_and_decrypts_on_the_target() {
    let lab = Lab::start(&[HostSpec::new("builder"), HostSpec::new("target")]);
    lab.trust("builder", "target");
    let sops = lab.install_sops("target");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clan-core-sops");
    let keys = lab
        .host(WORKSTATION)
        .root()
        .join(".config/sops/age/keys.txt");
    std::fs::create_dir_all(keys.parent().unwrap()).unwrap();
    std::fs::copy(fixture.join("admin-age-key.txt"), &keys).unwrap();
    let flake = lab.write_flake(&format!(
        r#"{{
          inventory.machines.peer1.deploy = {{ targetHost = "root@{t}"; buildHost = "root@{b}"; }};
          machines.peer1 = {{ imports = [ (system {{ vars = {{
              dummy-generator = {{ files.generated-password = {{ }}; files.host-id.secret = false; script = "exit 1"; }};
              new-service = {{ files.a-secret = {{ }}; files.not-a-secret.secret = false; script = "exit 1"; }};
            }}; }}) ];
            clan.core.vars.sops.command = "{sops}";
            # Under the target's own /root (the lab's namespace hosts share the machine's /var).
            clan.core.vars.sops.secretUploadDirectory = "/root/sops-nix"; }};
        }}"#,
        t = lab.ip("target"),
        b = lab.ip("builder"),
    ));
    let copied = Command::new("cp")
        .arg("-a")
        .arg(fixture.join("sops"))
        .arg(fixture.join("vars"))
        .arg(&flake)
        .status()
        .unwrap();
    assert!(copied.success());
    git(&flake, &["init", "-q"]);
    git(&flake, &["add", "-A"]);
    git(
        &flake,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "clan-core's files",
        ],
    );

    let list = clan(&lab, &flake, &["vars", "list", "peer1"]);
    assert_eq!(list.code, 0, "{}", list.all());
    for line in [
        "dummy-generator/generated-password ********",
        "dummy-generator/host-id 6745",
        "new-service/a-secret ********",
    ] {
        assert!(list.stdout.contains(line), "{}", list.stdout);
    }
    let check = clan(&lab, &flake, &["vars", "check", "peer1"]);
    assert_eq!(check.code, 0, "{}", check.all());
    let password = clan(
        &lab,
        &flake,
        &["vars", "get", "peer1", "dummy-generator/generated-password"],
    );
    assert_eq!(password.code, 0, "{}", password.all());
    let a_secret = clan(
        &lab,
        &flake,
        &["vars", "get", "peer1", "new-service/a-secret"],
    )
    .stdout;
    assert!(!password.stdout.is_empty() && !a_secret.is_empty());

    let run = clan(&lab, &flake, &["machines", "update", "peer1"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let out = toplevel(&lab, &flake, "peer1");
    assert!(
        lab.host("builder").has_path(&out),
        "not built on the builder"
    );
    assert_activated(&lab, &out);
    let dir = "/run/secrets/vars/per-machine/peer1";
    assert_eq!(
        sh(
            &lab,
            "target",
            &format!("cat {dir}/dummy-generator/generated-password")
        ),
        password.stdout.trim()
    );
    assert_eq!(
        sh(&lab, "target", &format!("cat {dir}/new-service/a-secret")),
        a_secret.trim()
    );
    // The key the deploy uploaded is the one sops encrypted peer1's secrets to.
    let uploaded = sh(&lab, "target", "cat /root/sops-nix/key.txt");
    let public: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("sops/machines/peer1/key.json")).unwrap(),
    )
    .unwrap();
    let public = match &public {
        serde_json::Value::Array(keys) => keys[0]["publickey"].clone(),
        one => one["publickey"].clone(),
    };
    assert_eq!(
        uploaded
            .parse::<age::x25519::Identity>()
            .unwrap()
            .to_public()
            .to_string(),
        public.as_str().unwrap()
    );
    // Nothing was made or changed in the repository.
    assert_eq!(
        git(&flake, &["status", "--porcelain", "--", "sops", "vars"]),
        ""
    );
}
