//! Past one build host: Nix remote builders behind the build host (the third hop), checked
//! by the preflight the way Nix's build hook will reach them.

mod common;
use common::*;

fn builders_lab() -> Lab {
    let lab = Lab::start(&[
        HostSpec::new("builder"),
        HostSpec::new("b1"),
        HostSpec::new("b2"),
        HostSpec::new("t1"),
        HostSpec::new("t2"),
        HostSpec::new("t3"),
    ]);
    for t in ["t1", "t2", "t3"] {
        lab.trust("builder", t);
    }
    lab
}

fn fleet(lab: &Lab, builders: &str) -> std::path::PathBuf {
    let machines = ["t1", "t2", "t3"];
    let inventory: String = machines
        .iter()
        .map(|m| {
            format!(
                r#"{m} = {{ deploy.targetHost = "root@{}"; deploy.buildHost = "root@{}"; deploy.builders = "{builders}"; }};"#,
                lab.ip(m),
                lab.ip("builder")
            )
        })
        .collect();
    let systems: String = machines
        .iter()
        .map(|m| format!("{m} = system {{ shared = true; }};"))
        .collect();
    lab.write_flake(&format!(
        "{{ inventory.machines = {{ {inventory} }}; machines = {{ {systems} }}; }}"
    ))
}

// The build host hands the fleet's derivations to its two Nix builders (its own max-jobs 0
// through --option): they are built there, the deploy succeeds.
#[test]
fn a_build_host_with_two_nix_builders() {
    let lab = builders_lab();
    lab.trust("builder", "b1");
    lab.trust("builder", "b2");
    let spec = format!(
        "ssh://root@{} x86_64-linux ; ssh://root@{} x86_64-linux",
        lab.ip("b1"),
        lab.ip("b2")
    );
    let f = fleet(&lab, &spec);
    let outs: Vec<String> = ["t1", "t2", "t3"]
        .iter()
        .map(|m| toplevel(&lab, &f, m))
        .collect();
    let dry = clan(&lab, &f, &["machines", "update", "--dry-run"]);
    assert!(
        dry.stdout.contains(&format!("--option builders '{spec}'")),
        "{}",
        dry.stdout
    );
    let run = clan(
        &lab,
        &f,
        &["machines", "update", "--option", "max-jobs", "0"],
    );
    assert_eq!(run.code, 0);
    assert_eq!(
        lab.host("builder").shared_builds(),
        0,
        "the build host built"
    );
    assert_eq!(
        lab.host("b1").shared_builds() + lab.host("b2").shared_builds(),
        1,
        "the shared part is built once, on a builder"
    );
    for (m, out) in ["t1", "t2", "t3"].iter().zip(&outs) {
        assert!(
            lab.host("b1").has_path(out) || lab.host("b2").has_path(out),
            "{m} was not built on a builder"
        );
        assert_eq!(lab.host(m).system_profile().as_deref(), Some(out.as_str()));
    }
}

// A builder whose host key the build host lacks: the preflight names the third hop and the
// fix before anything is built.
#[test]
fn a_builder_the_build_host_cannot_verify_stops_the_preflight() {
    let lab = builders_lab();
    lab.trust("builder", "b1");
    let spec = format!(
        "ssh://root@{} x86_64-linux ; ssh://root@{} x86_64-linux",
        lab.ip("b1"),
        lab.ip("b2")
    );
    let f = fleet(&lab, &spec);
    let run = clan(&lab, &f, &["machines", "update", "t1"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains(&format!(
            "host key verification failed on the third hop (build host root@{} → Nix builder root@{})",
            lab.ip("builder"),
            lab.ip("b2")
        )),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains(&format!("ssh-keyscan {}", lab.ip("b2")))
    );
    assert_eq!(lab.host("t1").system_profile(), None);
    assert_eq!(
        lab.host("b1").shared_builds() + lab.host("b2").shared_builds(),
        0
    );
    // A builder spec from the command line wins, and is checked.
    let bad = clan(
        &lab,
        &f,
        &[
            "machines",
            "update",
            "t1",
            "--builders",
            "ssh://b1?ProxyCommand=x",
        ],
    );
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("invalid builders"));
}

/// A build host, two targets, a binary cache the build host fills at /root/cache (its own
/// file:// store), served over HTTP to the targets; the signing key made by setup-cache.
fn cache_lab() -> (Lab, String, String) {
    let mut lab = Lab::start(&[
        HostSpec::new("builder"),
        HostSpec::new("t1"),
        HostSpec::new("t2"),
    ]);
    let plain = lab.write_flake(&format!(
        r#"{{ inventory.machines.t1 = {{ deploy.targetHost = "root@{}"; deploy.buildHost = "root@{}"; }}; machines.t1 = system {{ }}; }}"#,
        lab.ip("t1"),
        lab.ip("builder")
    ));
    let setup = clan(
        &lab,
        &plain,
        &[
            "machines",
            "setup-cache",
            "t1",
            "--key-name",
            "lab-cache",
            "--upload",
            "file:///root/cache",
        ],
    );
    assert_eq!(setup.code, 0);
    let key = setup.stdout.trim().to_string();
    assert!(key.starts_with("lab-cache:"), "{key}");
    let url = lab.serve_http(&lab.host("builder").root().join("cache"));
    (lab, url, key)
}

fn cache_flake(lab: &Lab, url: &str, key: &str) -> std::path::PathBuf {
    let machines = ["t1", "t2"];
    let inventory: String = machines
        .iter()
        .map(|m| {
            format!(
                r#"{m}.deploy = {{ targetHost = "root@{}"; buildHost = "root@{}"; copyMode = "cache";
                   cache = {{ upload = "file:///root/cache"; url = "{url}"; publicKey = "{key}"; }}; }};"#,
                lab.ip(m),
                lab.ip("builder")
            )
        })
        .collect();
    lab.write_flake(&format!(
        r#"{{ inventory.machines = {{ {inventory} }}; machines = {{ t1 = system {{ }}; t2 = system {{ }}; }}; }}"#
    ))
}

// Cache mode: the build host signs the closures into its cache; each target substitutes
// from it over HTTP and checks the signature with its own trusted key. The build host never
// logs in to the targets.
#[test]
fn cache_mode_targets_substitute_signed_closures() {
    let (lab, url, key) = cache_lab();
    for t in ["t1", "t2"] {
        lab.append_nix_conf(t, &format!("trusted-public-keys = {key}"));
    }
    let f = cache_flake(&lab, &url, &key);
    let outs: Vec<String> = ["t1", "t2"].iter().map(|m| toplevel(&lab, &f, m)).collect();
    let run = clan(&lab, &f, &["machines", "update", "-v"]);
    assert_eq!(run.code, 0);
    assert!(run.stderr.contains("clan-cache-upload"));
    for (t, out) in ["t1", "t2"].iter().zip(&outs) {
        assert_eq!(lab.host(t).system_profile().as_deref(), Some(out.as_str()));
        let sigs = lab.exec(t, &["nix-store", "-q", "--hash", out]);
        assert!(sigs.status.success());
        let info = lab.exec(
            t,
            &[
                "nix",
                "--extra-experimental-features",
                "nix-command",
                "path-info",
                "--sigs",
                out,
            ],
        );
        assert!(
            String::from_utf8_lossy(&info.stdout).contains("lab-cache:"),
            "{t}: not signed by the cache key: {}",
            String::from_utf8_lossy(&info.stdout)
        );
        assert!(
            !lab.host(t)
                .sshd_log()
                .contains(&format!("from {}", lab.ip("builder"))),
            "the build host logged in to {t}"
        );
        // Nor did the targets fetch from the build host over ssh (no nix-store --serve).
        assert!(
            !lab.host("builder")
                .sshd_log()
                .contains(&format!("from {}", lab.ip(t))),
            "{t} logged in to the build host"
        );
    }
}

// A file:// cache shared by path (hosts share /tmp here, as machines may share a mount):
// the build host writes it, the targets read it.
#[test]
fn cache_mode_with_a_cache_shared_by_path() {
    let (lab, _, key) = cache_lab();
    let shared = lab.dir.join("shared-cache");
    let url = format!("file://{}", shared.display());
    let f = lab.write_flake(&format!(
        r#"{{ inventory.machines.t1.deploy = {{ targetHost = "root@{}"; buildHost = "root@{}"; copyMode = "cache";
             cache = {{ upload = "{url}"; url = "{url}"; publicKey = "{key}"; }}; }};
           machines.t1 = system {{ variant = "by-path"; }}; }}"#,
        lab.ip("t1"),
        lab.ip("builder")
    ));
    lab.append_nix_conf("t1", &format!("trusted-public-keys = {key}"));
    // The cache must exist before the preflight reaches it: setup-cache opens it.
    let setup = clan(
        &lab,
        &f,
        &["machines", "setup-cache", "t1", "--key-name", "lab-cache"],
    );
    assert_eq!(setup.code, 0);
    let out = toplevel(&lab, &f, "t1");
    let run = clan(&lab, &f, &["machines", "update", "t1"]);
    assert_eq!(run.code, 0);
    assert_eq!(
        lab.host("t1").system_profile().as_deref(),
        Some(out.as_str())
    );
    assert!(shared.join("nix-cache-info").exists());
}

// A target that does not trust the key, or cannot reach the cache: the preflight says so,
// with the NixOS option to set; nothing is activated on it (the others go on).
#[test]
fn cache_mode_preflight_checks_trust_and_reach() {
    let (lab, url, key) = cache_lab();
    lab.append_nix_conf("t1", &format!("trusted-public-keys = {key}"));
    let f = cache_flake(&lab, &url, &key);
    let run = clan(&lab, &f, &["machines", "update"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains(&format!(
        "t2: the target root@{} does not trust the binary cache's key {key}",
        lab.ip("t2")
    )));
    assert!(run.stderr.contains(&format!(
        "nix.settings.trusted-public-keys = [ \"{key}\" ];"
    )));
    // The others go on: a machine whose preflight fails fails alone.
    assert!(lab.host("t1").system_profile().is_some());
    assert_eq!(lab.host("t2").system_profile(), None);

    let before = lab.host("t1").switch_log().len();
    let unreachable = url.rsplit_once(':').map(|(h, _)| format!("{h}:9")).unwrap();
    let f = cache_flake(&lab, &unreachable, &key);
    // t1 runs this system already: --reactivate, so that it is deployed (and checked) again.
    let run = clan(&lab, &f, &["machines", "update", "t1", "--reactivate"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("cannot reach the binary cache"));
    assert_eq!(
        lab.host("t1").switch_log().len(),
        before,
        "t1 was activated"
    );
}
