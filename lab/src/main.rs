//! `clan-lab demo CLAN_BINARY`: a real deploy on a lab with a builder and a target, telling
//! the guide's first-deploy story: strict host key checking stops the second hop, then
//! `--host-key-check accept-new` records the target's key and the deploy goes through.

use std::path::Path;
use std::process::ExitCode;

use clan_lab::{HostSpec, Lab};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some("demo"), Some(clan)) = (args.get(1).map(String::as_str), args.get(2)) else {
        eprintln!("usage: clan-lab demo PATH_TO_CLAN_BINARY");
        return ExitCode::from(2);
    };
    let clan = Path::new(clan)
        .canonicalize()
        .expect("the clan binary exists");
    let lab = Lab::start(&[HostSpec::new("builder"), HostSpec::new("target")]);
    let (builder, target) = (lab.ip("builder"), lab.ip("target"));
    println!(
        "Lab: workstation, builder at {builder}, target at {target} (real sshd and nix each)."
    );
    let flake = lab.write_flake(&format!(
        r#"{{
          inventory.machines.my-machine = {{
            deploy.targetHost = "root@{target}";
            deploy.buildHost  = "root@{builder}";
          }};
          machines.my-machine = system {{ }};
        }}"#
    ));
    let clan = clan.display().to_string();
    let update = |extra: &[&str]| {
        let mut argv = vec![clan.as_str(), "machines", "update", "my-machine"];
        argv.extend_from_slice(extra);
        println!("\n$ clan {}", argv[1..].join(" "));
        let out = lab.run_on_workstation(&flake, &argv);
        print!("{}", String::from_utf8_lossy(&out.stdout));
        print!("{}", String::from_utf8_lossy(&out.stderr));
        println!("(exit {})", out.status.code().unwrap_or(-1));
        out.status.success()
    };

    println!("\n# The plan, without running it:");
    update(&["--dry-run"]);
    println!("\n# First deploy: the builder has never seen the target's host key.");
    update(&[]);
    println!("\n# The fix the error names:");
    let ok = update(&["--host-key-check", "accept-new"]);

    let t = lab.host("target");
    println!("\n# What each host holds now:");
    println!(
        "target system profile -> {}",
        t.system_profile().unwrap_or("(unset)".into())
    );
    for line in t.switch_log() {
        println!("target ran switch-to-configuration: {line}");
    }
    if let Some(out) = t.system_profile() {
        println!(
            "builder store has it: {}",
            lab.host("builder").has_path(&out)
        );
        println!(
            "workstation store has it: {}",
            lab.host("workstation").has_path(&out)
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
