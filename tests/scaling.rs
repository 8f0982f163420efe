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
