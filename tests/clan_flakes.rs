//! Real clan flakes, on nixpkgs' real module system (`../shared/nixpkgs-lib`): the layouts
//! and habits of clan-core users (machines/ directories, clan.nix as a module, mkDefault,
//! `self`, inventory.json, hardware-configuration.nix, clan-core's output shape), what is
//! refused rather than ignored, clan-core's selection semantics, and evaluation errors.

mod common;
use common::*;

use std::path::Path;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

// A machine that exists only as machines/mail1/ (configuration.nix using `self` and the
// legacy `nixpkgs.system`, hardware-configuration.nix setting its build host), a clan.nix
// written as a module with `lib.mkDefault`, and a machine defined only in inventory.json:
// all evaluate through the real module system and deploy.
#[test]
fn clan_core_layout_deploys() {
    let lab = Lab::builder_and_target();
    let f = lab.write_flake(r#"{ imports = [ ./clan.nix ]; }"#);
    write(
        &f.join("clan.nix"),
        &format!(
            r#"{{ lib, config, self, ... }}: {{
                 meta.name = "lab";
                 inventory.machines.mail1.deploy.targetHost = lib.mkDefault "root@{t}";
                 inventory.machines.mail1.tags = [ "mail" ];
                 machines.web9 = {{ ... }}: {{ imports = [ (self.fixture.system {{ variant = "web9"; }}) ]; }};
               }}"#,
            t = lab.ip("target")
        ),
    );
    write(
        &f.join("machines/mail1/configuration.nix"),
        r#"{ self, lib, ... }: {
             imports = [ (self.fixture.system { hostPlatform = null; }) ];
             nixpkgs.system = "x86_64-linux";
           }"#,
    );
    write(
        &f.join("machines/mail1/hardware-configuration.nix"),
        &format!(
            r#"{{ lib, ... }}: {{
                 clan.core.networking.buildHost = "root@{b}";
                 boot.loader.grub.device = "nodev";
               }}"#,
            b = lab.ip("builder")
        ),
    );
    write(
        &f.join("inventory.json"),
        &format!(
            r#"{{ "machines": {{ "web9": {{ "deploy": {{ "targetHost": "root@{t}" }}, "tags": [ "web" ] }} }} }}"#,
            t = lab.ip("target")
        ),
    );
    // The mkDefault'ed address and the inventory.json one are both read; mail1 builds on the
    // builder named in its hardware configuration.
    let show = clan(&lab, &f, &["machines", "show", "--json"]);
    assert_eq!(show.code, 0);
    let shown: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(
        shown["mail1"]["buildHost"]["value"],
        format!("root@{}", lab.ip("builder"))
    );
    lab.trust("builder", "target");
    let out = toplevel(&lab, &f, "mail1");
    let run = clan(&lab, &f, &["machines", "update", "mail1"]);
    assert_eq!(run.code, 0);
    assert!(
        lab.host("builder").has_path(&out),
        "not built on the builder"
    );
    assert_eq!(
        lab.host("target").system_profile().as_deref(),
        Some(out.as_str())
    );
    let web9 = clan(&lab, &f, &["machines", "update", "web9", "--dry-run"]);
    assert_eq!(web9.code, 0);
    assert!(web9.stdout.contains(&format!(
        "web9: deploy to root@{} (inventory.machines.web9.deploy.targetHost)",
        lab.ip("target")
    )));
}

// What clan-core supports and this tool does not is refused, naming the key: never
// silently ignored (an sshd service of clan-core's older `inventory.services`, ignored,
// would lock the user out).
#[test]
fn unsupported_clan_core_features_are_refused() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    for (setting, key) in [
        (r#"pkgsForSystem = system: null;"#, "pkgsForSystem"),
        (r#"inventory.services.x = { };"#, "inventory.services"),
    ] {
        let f = lab.write_flake(&format!(
            r#"{{ {setting} inventory.machines.m.deploy.targetHost = "root@{}"; machines.m = system {{ }}; }}"#,
            lab.ip("target")
        ));
        let run = clan(&lab, &f, &["machines", "update", "m"]);
        assert_eq!(run.code, 2, "{setting}");
        assert!(
            run.stderr.contains(&format!(
                "`{key}` is set, but this clan tool does not support it"
            )),
            "{setting}: {}",
            run.stderr
        );
        assert!(!run.stderr.contains("must expose clanInternals"));
        assert_eq!(lab.host("target").system_profile(), None);
    }
}

// A flake whose outputs have clan-core's shape (clanInternals.machines.<system>.<name>)
// deploys unchanged.
#[test]
fn clan_core_output_shape_deploys() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let f = lab.write_flake(&format!(
        r#"{{ inventory.machines.jon.deploy.targetHost = "root@{}"; machines.jon = system {{ }}; }}"#,
        lab.ip("target")
    ));
    // Reshape the outputs as clan-core does.
    let text = std::fs::read_to_string(f.join("flake.nix")).unwrap();
    let text = text.replace(
        "inherit (clan.config) nixosConfigurations clanInternals;",
        r#"inherit (clan.config) nixosConfigurations;
      clanInternals = {
        inventoryClass.inventory = clan.config.clanInternals.inventory;
        # clan-core's vars settings hold functions (its fileModule), which JSON cannot.
        vars.settings = { secretModule = "clan_lib.vars.secret_modules.sops"; fileModule = file: { }; };
        machines = {
          aarch64-darwin = { };
          aarch64-linux = clan.config.nixosConfigurations;
          x86_64-linux = clan.config.nixosConfigurations;
        };
      };"#,
    );
    std::fs::write(f.join("flake.nix"), text).unwrap();
    let out = toplevel(&lab, &f, "jon");
    let run = clan(&lab, &f, &["machines", "update", "jon"]);
    assert_eq!(run.code, 0);
    assert_eq!(
        lab.host("target").system_profile().as_deref(),
        Some(out.as_str())
    );
}

// A machine whose inventory says it is not NixOS (clan-core's `machineClass = "darwin"`):
// left out of the default selection with the reason, and refused by name when named, before
// anything is built.
#[test]
fn a_darwin_machine_is_named_and_left_out() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let t = lab.ip("target");
    let f = lab.write_flake(&format!(
        r#"{{ inventory.machines = {{ m.deploy.targetHost = "root@{t}";
               mac = {{ deploy.targetHost = "root@{t}"; machineClass = "darwin"; }}; }};
             machines = {{ m = system {{ }}; mac = system {{ }}; }}; }}"#
    ));
    let all = clan(&lab, &f, &["machines", "update", "--dry-run"]);
    assert_eq!(all.code, 0, "{}", all.all());
    assert!(
        all.stderr.contains(
            "mac: skipped (its machineClass is not nixos: this tool deploys NixOS machines only)"
        ),
        "{}",
        all.stderr
    );
    assert!(all.stdout.contains("m: deploy to"), "{}", all.stdout);
    let named = clan(&lab, &f, &["machines", "update", "mac", "--json"]);
    assert_eq!(named.code, 2, "{}", named.all());
    let report: serde_json::Value = serde_json::from_str(&named.stdout).unwrap();
    assert_eq!(report["errors"][0]["code"], "machine.not-nixos", "{report}");
    assert!(
        named.stderr.contains("machine mac is a darwin machine"),
        "{}",
        named.stderr
    );
    assert_eq!(lab.host("target").system_profile(), None);
}

// clan-core's selection: --tags selects the machines having every tag (with names: those
// names, filtered); without names, every machine with a targetHost that does not require an
// explicit update, the others listed as skipped; --target-host with one machine only.
#[test]
fn tags_and_default_selection() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let t = lab.ip("target");
    let f = lab.write_flake(&format!(
        r#"{{
          inventory.machines = {{
            a = {{ deploy.targetHost = "root@{t}"; tags = [ "web" "db" ]; }};
            b = {{ deploy.targetHost = "root@{t}"; tags = [ "web" ]; }};
            c = {{ tags = [ "web" ]; }};
            d = {{ deploy.targetHost = "root@{t}"; requireExplicitUpdate = true; }};
          }};
          # c has no domain, so no address: clan-core's default root@c.<meta.domain> is off.
          machines = {{ a = system {{ }}; b = system {{ }}; c = {{ imports = [ (system {{ }}) ]; networking.domain = null; }}; d = system {{ }}; }};
        }}"#
    ));
    let planned = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["machines", "update", "--dry-run"];
        all.extend_from_slice(args);
        let run = clan(&lab, &f, &all);
        assert_eq!(run.code, 0, "{args:?}");
        ["a", "b", "c", "d"]
            .iter()
            .filter(|m| run.stdout.contains(&format!("\n{m}: deploy to ")))
            .map(|m| m.to_string())
            .collect()
    };
    assert_eq!(planned(&["--tags", "web", "db"]), ["a"]);
    assert_eq!(planned(&["a", "b", "--tags", "db"]), ["a"]);
    assert_eq!(planned(&["d"]), ["d"]);
    // `clan machines list`: every machine with its tags, or those having the tags.
    let list = clan(&lab, &f, &["machines", "list"]);
    assert_eq!(list.code, 0, "{}", list.stderr);
    let names = |out: &str| -> Vec<String> {
        out.lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    };
    assert_eq!(names(&list.stdout), ["a", "b", "c", "d"]);
    assert!(
        list.stdout.contains("a  web db all nixos"),
        "{}",
        list.stdout
    );
    let web = clan(&lab, &f, &["machines", "list", "--tags", "web"]);
    assert_eq!(names(&web.stdout), ["a", "b", "c"]);
    // The tags clan-core computes: every machine has `all` and its class.
    assert_eq!(planned(&["--tags", "all"]), ["a", "b"]);
    assert_eq!(planned(&["--tags", "nixos", "db"]), ["a"]);
    assert_eq!(planned(&["d", "--tags", "all"]), ["d"]);
    // clan-core's words: `clan m u`, `--debug`, and the flake found from a directory inside
    // it, or from $CLAN_DIR.
    let short = clan(&lab, &f, &["m", "u", "a", "--dry-run", "--debug"]);
    assert_eq!(short.code, 0, "{}", short.stderr);
    assert!(short.stdout.contains("\na: deploy to "), "{}", short.stdout);
    let inside = f.join("machines");
    std::fs::create_dir_all(&inside).unwrap();
    let clan_bin = env!("CARGO_BIN_EXE_clan");
    let from_inside =
        lab.run_on_workstation(&inside, &[clan_bin, "machines", "show", "a", "--json"]);
    assert!(
        from_inside.status.success(),
        "{}",
        String::from_utf8_lossy(&from_inside.stderr)
    );
    assert!(String::from_utf8_lossy(&from_inside.stdout).contains(&format!("root@{t}")));
    let clan_dir = format!("CLAN_DIR={}", f.display());
    let from_env = lab.run_on_workstation(
        &lab.dir,
        &[
            "env", &clan_dir, clan_bin, "machines", "show", "a", "--json",
        ],
    );
    assert!(
        from_env.status.success(),
        "{}",
        String::from_utf8_lossy(&from_env.stderr)
    );
    let all = clan(&lab, &f, &["machines", "update", "--dry-run"]);
    assert_eq!(all.code, 0);
    assert!(all.stderr.contains("c: skipped (no targetHost is set)"));
    assert!(
        all.stderr
            .contains("d: skipped (requireExplicitUpdate is set: name it to update it)")
    );
    assert_eq!(planned(&[]), ["a", "b"]);
    let none = clan(&lab, &f, &["machines", "update", "--tags", "db", "nope"]);
    assert_eq!(none.code, 2);
    assert!(none.stderr.contains("no machine has all the tags db, nope"));
    let two = clan(
        &lab,
        &f,
        &[
            "machines",
            "update",
            "a",
            "b",
            "--target-host",
            &format!("root@{t}"),
        ],
    );
    assert_eq!(two.code, 2);
    assert!(
        two.stderr
            .contains("--target-host names one address, but 2 machines")
    );
}

// Evaluation errors are configuration errors (exit 2); the clanInternals hint only when
// that is what is missing; --show-trace is offered and passed; --option reaches Nix; the
// configuration's warnings are shown; a closed output pipe ends quietly.
#[test]
fn evaluation_errors_warnings_and_options() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let t = lab.ip("target");
    let broken = lab.write_flake(&format!(
        r#"{{ inventory.machines.m.deploy.targetHost = "root@{t}"; machines.m = {{ ... }}: {{ imports = [ (system {{ }}) ]; networking.hostName = throw "the fixture's configuration is broken"; }}; }}"#
    ));
    let run = clan(&lab, &broken, &["machines", "update", "m"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("the fixture's configuration is broken"));
    assert!(!run.stderr.contains("must expose clanInternals"));
    assert!(run.stderr.contains("--show-trace"));
    let traced = clan(&lab, &broken, &["machines", "update", "m", "--show-trace"]);
    assert_eq!(traced.code, 2);
    assert!(traced.stderr.contains("while evaluating"), "no trace");
    // Nix's error keeps its line breaks: each line of its trace is a line of the detail.
    let detail: Vec<&str> = traced
        .stderr
        .lines()
        .filter(|l| l.starts_with("  | "))
        .collect();
    assert!(detail.len() > 3, "{}", traced.stderr);
    assert!(
        detail.iter().any(|l| l
            .trim_start_matches("  | ")
            .trim_start()
            .starts_with("… while evaluating")),
        "{}",
        traced.stderr
    );

    let f = lab.write_flake(&format!(
        r#"{{ inventory.machines.m.deploy.targetHost = "root@{t}"; machines.m = {{ ... }}: {{ imports = [ (system {{ }}) ]; warnings = [ "this fixture warns" ]; }}; }}"#
    ));
    let run = clan(
        &lab,
        &f,
        &[
            "machines",
            "update",
            "m",
            "--dry-run",
            "--option",
            "max-jobs",
            "3",
        ],
    );
    assert_eq!(run.code, 0);
    assert!(run.stderr.contains("m: warning: this fixture warns"));
    assert!(
        run.stdout
            .contains("nix-store --realise --option max-jobs 3 ")
    );

    // `clan machines show | true`: the closed pipe ends it quietly, no panic.
    let clan_bin = env!("CARGO_BIN_EXE_clan");
    let out = lab.run_on_workstation(
        &f,
        &[
            "sh",
            "-c",
            &format!("{clan_bin} machines show m | true; echo done"),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A flake without clanInternals gets the hint.
    let text = std::fs::read_to_string(f.join("flake.nix")).unwrap();
    std::fs::write(
        f.join("flake.nix"),
        text.replace(
            "inherit (clan.config) nixosConfigurations clanInternals;",
            "inherit (clan.config) nixosConfigurations;",
        ),
    )
    .unwrap();
    let run = clan(&lab, &f, &["machines", "update", "m"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("the flake must expose clanInternals"));
}

// Evaluation workers evaluate several machines in one `nix eval` each: one machine's
// evaluation error fails that machine only; the others deploy (also the ones its worker had
// not reached yet); the summary shows the error; the exit code is not 0.
#[test]
fn an_evaluation_error_fails_only_its_machine() {
    let lab = Lab::start(&[
        HostSpec::new("t1"),
        HostSpec::new("t2"),
        HostSpec::new("t3"),
    ]);
    let f = lab.write_flake(&format!(
        r#"{{
          inventory.machines = {{
            m1.deploy.targetHost = "root@{}";
            m2.deploy.targetHost = "root@{}";
            m3.deploy.targetHost = "root@{}";
          }};
          machines = {{
            m1 = system {{ }};
            m2 = {{ ... }}: {{ imports = [ (system {{ }}) ]; networking.hostName = throw "m2 is broken on purpose"; }};
            m3 = system {{ }};
          }};
        }}"#,
        lab.ip("t1"),
        lab.ip("t2"),
        lab.ip("t3")
    ));
    let run = clan(
        &lab,
        &f,
        // One evaluation worker for all three: the broken machine stops its `nix eval`
        // halfway, and the machine after it is evaluated all the same.
        &["machines", "update", "--eval-jobs", "1", "--json"],
    );
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("m2: evaluation failed"));
    assert!(run.stderr.contains("m2 is broken on purpose"));
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let result = |m: &str| result_of(&report, m);
    assert_eq!(result("m1").as_deref(), Some("deployed"));
    assert_eq!(result("m2").as_deref(), Some("failed"));
    assert_eq!(result("m3").as_deref(), Some("deployed"));
    assert!(lab.host("t1").system_profile().is_some());
    assert_eq!(lab.host("t2").system_profile(), None);
    assert!(lab.host("t3").system_profile().is_some());
}

// Ctrl-C while the flake is evaluated: the evaluation stops (no `nix eval` left running),
// the run exits 130 and says nothing happened.
#[test]
fn ctrl_c_during_evaluation_exits_130() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let f = lab.write_flake(&format!(
        r#"{{ inventory.machines.slow.deploy.targetHost = "root@{}";
             machines.slow = {{ ... }}: {{
               imports = [ (system {{ }}) ];
               networking.hostName =
                 let f = n: if n == 0 then 0 else 1 + f (n - 1);
                 in builtins.seq (builtins.foldl' (a: i: a + (f 1000)) 0 (builtins.genList (x: x) 200000)) "slow";
             }}; }}"#,
        lab.ip("target")
    ));
    let child = lab.spawn_on_workstation(
        &f,
        &[
            env!("CARGO_BIN_EXE_clan"),
            "machines",
            "update",
            "slow",
            "--json",
        ],
    );
    // This lab's evaluations only: their command line names its flake.
    let marker = format!("{}#clanInternals", f.display());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let evaluating = || {
        let out = std::process::Command::new("pgrep")
            .args(["-f", &marker])
            .output()
            .unwrap();
        !out.stdout.is_empty()
    };
    while !evaluating() {
        assert!(
            std::time::Instant::now() < deadline,
            "no evaluation started"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(130), "{marker}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "it did not stop promptly"
    );
    assert!(stderr.contains(
        "interrupted while evaluating the flake: nothing was copied, built or activated"
    ));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["exitCode"], 130);
    // Its evaluations end with it (a moment for the killed processes to be reaped).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while evaluating() {
        assert!(
            std::time::Instant::now() < deadline,
            "nix eval left running"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(lab.host("target").system_profile(), None);
}

// Streaming: each machine goes on to its build as soon as it is evaluated. With one machine
// slow to evaluate, the fast one's build starts first (the run's log timestamps say so).
#[test]
fn a_fast_machine_builds_while_a_slow_one_is_evaluated() {
    let lab = Lab::start(&[HostSpec::new("t1"), HostSpec::new("t2")]);
    let f = lab.write_flake(&format!(
        r#"{{
          inventory.machines = {{
            fast.deploy.targetHost = "root@{}";
            slow.deploy.targetHost = "root@{}";
          }};
          machines = {{
            fast = system {{ }};
            slow = {{ ... }}: {{
              imports = [ (system {{ }}) ];
              networking.hostName =
                let f = n: if n == 0 then 0 else 1 + f (n - 1);
                in builtins.seq (builtins.foldl' (a: i: a + (f 1000)) 0 (builtins.genList (x: x) 40000)) "slow";
            }};
          }};
        }}"#,
        lab.ip("t1"),
        lab.ip("t2")
    ));
    let run = clan(
        &lab,
        &f,
        &["machines", "update", "--eval-jobs", "2", "--json"],
    );
    assert_eq!(run.code, 0);
    // When each machine's realise started, from the build logs' step headers.
    let lines = run_log_lines(&lab, &run.stdout);
    let started = |drv_name: &str| -> f64 {
        lines
            .iter()
            .find(|(_, l)| l.contains("nix-store --realise") && l.contains(drv_name))
            .unwrap_or_else(|| panic!("no realise of {drv_name} in the logs"))
            .0
    };
    let fast = started("nixos-system-fast.drv");
    let slow = started("nixos-system-slow.drv");
    assert!(
        fast + 1.0 < slow,
        "the fast machine's build did not start first: fast {fast}, slow {slow}"
    );
    assert!(lab.host("t1").system_profile().is_some());
    assert!(lab.host("t2").system_profile().is_some());
}

// clan-core's default template, as a user has it, with `clan-core` pointed at this
// repository (and `nixosSystem` this library's minimal system, the lab having no nixpkgs):
// its `sshd` and `users` instances are served by this repository's own service modules.
// `--tags all` deploys both machines through a build host, each to its default address from
// `meta.domain` (reached through the workstation's and the build host's ~/.ssh/config), and
// each target gets its own persistent host key and root's password hash as secrets.
#[test]
fn clan_cores_template_deploys_on_this_library() {
    let lab = Lab::start(&[
        HostSpec::new("builder"),
        HostSpec::new("web"),
        HostSpec::new("db"),
    ]);
    let mut ssh_config = String::new();
    for m in ["web", "db"] {
        ssh_config.push_str(&format!("Host {m}.tlab\n  HostName {}\n", lab.ip(m)));
        lab.trust("builder", m);
    }
    lab.prepend_ssh_config(clan_lab::WORKSTATION, &ssh_config);
    lab.prepend_ssh_config("builder", &ssh_config);
    let id = install_age_identity(&lab);
    for m in ["web", "db"] {
        lab.install_sops(m);
    }

    let f = lab.dir.join("template");
    // The template's flake.nix, with minimalSystem for the lab's plain-derivation systems.
    write(
        &f.join("flake.nix"),
        &format!(
            r#"{{
  inputs.clan-core.url = "path:{lib}";
  inputs.nixpkgs.follows = "clan-core/nixpkgs";
  outputs = {{ self, clan-core, nixpkgs, ... }}@inputs:
    let
      clan = clan-core.lib.clan {{
        inherit self;
        imports = [ ./clan.nix ];
        specialArgs = {{ inherit inputs; }};
        nixosSystem = clan-core.lib.minimalSystem;
      }};
    in
    {{
      inherit (clan.config) nixosConfigurations nixosModules clanInternals;
      clan = clan.config;
    }};
}}"#,
            lib = lab.clan_lib().display()
        ),
    );
    write(
        &f.join("toplevel.nix"),
        include_str!("../lab/fixtures/toplevel.nix"),
    );
    // The template's clan.nix, filled in: two machines and the lab's systems, whose secrets
    // are in the sops store (the default, as in the template), decrypted on the targets by
    // the lab's sops, the key uploaded under each target's own /root.
    let machine = |m: &str| {
        format!(
            r#"machines.{m} = {{ config, ... }}: {{
      system.build.toplevel = toplevel "{m}" {{ varsActivation = config.clan.core.vars.activationScript; }};
      clan.core.vars.sops.command = "/root/.lab/bin/sops";
      clan.core.vars.sops.secretUploadDirectory = "/root/sops-nix";
    }};"#
        )
    };
    write(
        &f.join("clan.nix"),
        &format!(
            r#"let toplevel = import ./toplevel.nix {{ shared = null; }}; in {{
  meta.name = "tlab";
  meta.domain = "tlab";
  inventory.machines = {{
    web = {{ deploy.buildHost = "root@{b}"; }};
    db = {{ deploy.buildHost = "root@{b}"; }};
  }};
  inventory.instances = {{
    sshd = {{
      roles.server.tags.all = {{ }};
      roles.server.settings.authorizedKeys = {{
        "admin-machine-1" = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITemplateAdminKey admin";
      }};
    }};
    user-root = {{
      module = {{ name = "users"; }};
      roles.default.tags.all = {{ }};
      roles.default.settings = {{ user = "root"; prompt = true; }};
    }};
  }};
  {web}
  {db}
}}"#,
            b = lab.ip("builder"),
            web = machine("web"),
            db = machine("db"),
        ),
    );
    let lock = lab.run_on_workstation(&f, &["nix", "flake", "lock"]);
    assert!(
        lock.status.success(),
        "{}",
        String::from_utf8_lossy(&lock.stderr)
    );

    // The addresses are the domain's defaults.
    let show = clan(&lab, &f, &["machines", "show", "web", "--json"]);
    assert_eq!(show.code, 0, "{}", show.all());
    let shown: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(shown["web"]["targetHost"]["value"], "root@web.tlab");
    assert_eq!(
        shown["web"]["targetHost"]["source"],
        "the default of clan.core.networking.targetHost in web's configuration: root@<hostName>.<meta.domain>"
    );

    // You join the clan's sops users once; root's password is asked once per machine (db
    // first), on a terminal.
    let keygen = clan(&lab, &f, &["vars", "keygen", "--user", "admin"]);
    assert_eq!(keygen.code, 0, "{}", keygen.all());
    assert!(
        keygen.stdout.contains(&id.to_public().to_string()),
        "{}",
        keygen.stdout
    );
    let generated = clan_on_terminal(&lab, &f, &["vars", "generate"], "db-root-pw\nweb-root-pw\n");
    assert_eq!(generated.code, 0, "{}", generated.all());
    let run = clan(&lab, &f, &["machines", "update", "--tags", "all"]);
    assert_eq!(run.code, 0, "{}", run.all());
    for m in ["web", "db"] {
        let out = toplevel(&lab, &f, m);
        assert!(
            lab.host("builder").has_path(&out),
            "{m} not built on the builder"
        );
        assert_eq!(lab.host(m).system_profile().as_deref(), Some(out.as_str()));
        // The host key: decrypted on its machine, its public half in the repository.
        let sh = |line: &str| {
            let o = lab.exec(m, &["sh", "-c", line]);
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        };
        let public_on_target = sh(&format!(
            "ssh-keygen -y -f /run/secrets/vars/per-machine/{m}/openssh/ssh.id_ed25519"
        ));
        let public_in_repo = std::fs::read_to_string(f.join(format!(
            "vars/per-machine/{m}/openssh/ssh.id_ed25519.pub/value"
        )))
        .unwrap();
        assert!(
            public_on_target.starts_with("ssh-ed25519 "),
            "{m}: {public_on_target}"
        );
        assert!(
            public_in_repo.starts_with(&public_on_target),
            "{m}: {public_in_repo} / {public_on_target}"
        );
        // The host key is certified by the clan's one authority for <machine>.<domain>.
        let cert = f.join(format!(
            "vars/per-machine/{m}/openssh-cert/ssh.id_ed25519-cert.pub/value"
        ));
        let shown = std::process::Command::new("ssh-keygen")
            .arg("-L")
            .arg("-f")
            .arg(&cert)
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
        let ca =
            std::fs::read_to_string(f.join("vars/shared/openssh-ca/id_ed25519.pub/value")).unwrap();
        let fingerprint = std::process::Command::new("ssh-keygen")
            .args(["-l", "-f"])
            .arg(f.join("vars/shared/openssh-ca/id_ed25519.pub/value"))
            .output()
            .unwrap();
        let fingerprint = String::from_utf8_lossy(&fingerprint.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap_or("?")
            .to_string();
        assert!(ca.starts_with("ssh-ed25519 "), "{ca}");
        assert!(
            shown.contains("host certificate")
                && shown.contains(&format!("{m}.tlab"))
                && shown.contains(&fingerprint),
            "{m}: {shown}"
        );
        // The authority's private key never reaches a machine.
        assert_eq!(
            sh("test -e /run/secrets/vars/shared/openssh-ca && echo deployed"),
            "",
            "{m}: the CA key is deploy = false"
        );
        // root's password hash, before users are made; the password itself never leaves
        // the repository.
        let hash = sh(&format!(
            "cat /run/secrets-for-users/vars/per-machine/{m}/user-password-root/user-password-hash"
        ));
        assert!(hash.starts_with('$'), "{m}: {hash}");
        if hash.starts_with("$6$") {
            let salt = hash.split('$').nth(2).unwrap_or_default().to_string();
            let expected = sh(&format!("openssl passwd -6 -salt '{salt}' '{m}-root-pw'"));
            assert_eq!(hash, expected, "{m}: the hash of the typed password");
        }
        assert_eq!(
            sh(&format!(
                "test -e /run/secrets/vars/per-machine/{m}/user-password-root && echo deployed"
            )),
            "",
            "{m}: user-password is deploy = false"
        );
        assert_eq!(
            sh("grep -rl root-pw /root/sops-nix /run/secrets /run/secrets-for-users | wc -l"),
            "0"
        );
    }
}

// Shell completion names the clan's machines and tags, read from the flake the command
// would use (here the current directory's), as the user types.
#[test]
fn completion_names_the_clans_machines_and_tags() {
    let lab = Lab::start(&[]);
    let f = lab.write_flake(
        r#"{ inventory.machines.web1.tags = [ "web" ]; inventory.machines.web2 = { };
             inventory.machines.db.tags = [ "database" ];
             machines.web1 = system { }; machines.web2 = system { }; machines.db = system { }; }"#,
    );
    let complete = |words: &[&str]| -> Vec<String> {
        let mut argv = vec![
            "env",
            "COMPLETE=fish",
            env!("CARGO_BIN_EXE_clan"),
            "--",
            "clan",
        ];
        argv.extend_from_slice(words);
        let out = lab.run_on_workstation(&f, &argv);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('\t').next().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(complete(&["machines", "update", "web"]), ["web1", "web2"]);
    assert_eq!(complete(&["machines", "update", "web1", "d"]), ["db"]);
    // An empty word: the machines, then the flags.
    let names: Vec<String> = complete(&["vars", "list", ""])
        .into_iter()
        .filter(|w| !w.starts_with('-'))
        .collect();
    assert_eq!(names, ["db", "web1", "web2"]);
    assert_eq!(
        complete(&["machines", "update", "--tags", "da"]),
        ["database"]
    );
    assert_eq!(complete(&["machines", "list", "--tags", "w"]), ["web"]);
}

// Evaluation workers: small machines share a worker's `nix eval` to the end (6 machines,
// 2 workers: the index and two evaluations, where each machine had its own); a worker whose
// `nix eval` grows past twice what its first machine left it holding starts again for the
// machines it has left (NixOS-sized machines on nixpkgs' real lib, one worker), and no
// machine is lost on the way. `nix` is wrapped to count the evaluations.
#[test]
fn evaluation_workers_share_a_nix_eval_and_start_again_when_it_grows() {
    let lab = Lab::start(&[HostSpec::new("target")]);
    let wrap = lab.dir.join("wrap");
    std::fs::create_dir_all(&wrap).unwrap();
    let count = lab.dir.join("evaluations");
    std::fs::write(
        wrap.join("nix"),
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" eval \"*) echo eval >> {};; esac\nexec /usr/bin/nix \"$@\"\n",
            count.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        wrap.join("nix"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!("PATH={}:/usr/bin:/bin:/usr/sbin:/sbin", wrap.display());
    let target = lab.ip("target").to_string();
    let evaluate = |machines: &str, names: &[String], jobs: &str| -> usize {
        let inventory: String = names
            .iter()
            .map(|m| format!(r#"{m}.deploy.targetHost = "root@{target}";"#))
            .collect();
        let flake = lab.write_flake(&format!(
            "{{ inventory.machines = {{ {inventory} }}; machines = {{ {machines} }}; }}"
        ));
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/synthetic-machine.nix"),
            flake.join("synthetic-machine.nix"),
        )
        .unwrap();
        let _ = std::fs::remove_file(&count);
        let out = lab.run_on_workstation(
            &flake,
            &[
                "env",
                &path,
                env!("CARGO_BIN_EXE_clan"),
                "machines",
                "update",
                "--dry-run",
                "--eval-jobs",
                jobs,
            ],
        );
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0), "{printed}");
        for m in names {
            assert!(
                printed.contains(&format!("{m}.drv")),
                "{m} is not in the plan: {printed}"
            );
        }
        std::fs::read_to_string(&count).unwrap().lines().count()
    };
    let small: Vec<String> = (1..=6).map(|i| format!("s{i}")).collect();
    let machines: String = small
        .iter()
        .map(|m| format!("{m} = system {{ }};"))
        .collect();
    assert_eq!(evaluate(&machines, &small, "2"), 3);
    let big: Vec<String> = (1..=4).map(|i| format!("b{i}")).collect();
    let machines: String = big
        .iter()
        .map(|m| format!(r#"{m} = import ./synthetic-machine.nix {{ name = "{m}"; }};"#))
        .collect();
    let evaluations = evaluate(&machines, &big, "1");
    assert!(
        evaluations >= 3,
        "one worker kept four NixOS-sized machines: {evaluations} evaluations"
    );
}
