//! Flake evaluation on the workstation: one `nix eval --json` process for every machine of a
//! deploy. The build host never evaluates, so private flake inputs are only fetched here.

use std::collections::BTreeMap;
use std::process::Command;

use serde::Deserialize;

use crate::error::{Error, Hint};

/// Everything the deploy needs to know about one machine, as written in the flake.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineFacts {
    /// `inventory.machines.<m>.deploy.targetHost`
    pub inventory_target_host: Option<String>,
    /// `inventory.machines.<m>.deploy.buildHost`
    pub inventory_build_host: Option<String>,
    /// `clan.core.networking.targetHost`
    pub config_target_host: Option<String>,
    /// `clan.core.networking.buildHost`
    pub config_build_host: Option<String>,
    /// `inventory.machines.<m>.deploy.forwardAgent`
    #[serde(default)]
    pub inventory_forward_agent: Option<bool>,
    /// `clan.core.networking.forwardAgent`
    #[serde(default)]
    pub config_forward_agent: Option<bool>,
    /// The target's system (`nixpkgs.hostPlatform`), if the configuration sets one.
    pub system: Option<String>,
    /// `system.build.toplevel.drvPath`
    #[serde(rename = "toplevelDrv")]
    pub drv_path: String,
    /// `system.build.toplevel.outPath`
    #[serde(rename = "toplevelOut")]
    pub out_path: String,
}

/// The result of evaluating a flake for a deploy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Evaluation {
    /// Every machine the flake defines.
    pub machines: Vec<String>,
    /// Tags of each machine from the inventory.
    pub tags: BTreeMap<String, Vec<String>>,
    /// Facts for the requested machines (all of them when none were requested).
    pub selected: BTreeMap<String, MachineFacts>,
}

/// The `--apply` function. `@WANTED@` becomes a Nix list of the requested names; an unknown
/// name is left out here and reported by the caller, which knows the full machine list.
const APPLY: &str = r#"ci:
let
  wanted = @WANTED@;
  inventoryMachines = ci.inventory.machines or { };
  all = builtins.attrNames ci.machines;
  names = if wanted == [ ] then all else builtins.filter (n: builtins.elem n all) wanted;
  facts = name:
    let
      inv = inventoryMachines.${name} or { };
      config = ci.machines.${name}.config;
      net = config.clan.core.networking or { };
      platform = config.nixpkgs.hostPlatform or null;
      toplevel = config.system.build.toplevel;
    in {
      inventoryTargetHost = inv.deploy.targetHost or null;
      inventoryBuildHost = inv.deploy.buildHost or null;
      configTargetHost = net.targetHost or null;
      configBuildHost = net.buildHost or null;
      inventoryForwardAgent = inv.deploy.forwardAgent or null;
      configForwardAgent = net.forwardAgent or null;
      system = if platform == null then null else if builtins.isString platform then platform else platform.system or null;
      # Not `outPath`: JSON output would turn the whole set into that string.
      toplevelDrv = toplevel.drvPath;
      toplevelOut = toplevel.outPath;
    };
in {
  machines = all;
  tags = builtins.listToAttrs (map (n: { name = n; value = (inventoryMachines.${n} or { }).tags or [ ]; }) all);
  selected = builtins.listToAttrs (map (n: { name = n; value = facts n; }) names);
}"#;

/// A Nix string literal for `s`: JSON escaping plus `$` escaped, so `${` never interpolates.
fn nix_string(s: &str) -> String {
    serde_json::to_string(s)
        .expect("a string always serializes")
        .replace('$', "\\$")
}

/// The `nix eval` argv for `flake` and the requested machines (empty: all).
pub fn eval_command(flake: &str, wanted: &[String]) -> Vec<String> {
    let list = format!(
        "[ {} ]",
        wanted
            .iter()
            .map(|n| nix_string(n))
            .collect::<Vec<_>>()
            .join(" ")
    );
    vec![
        "nix".into(),
        "--extra-experimental-features".into(),
        "nix-command flakes".into(),
        "eval".into(),
        "--json".into(),
        format!("{flake}#clanInternals"),
        "--apply".into(),
        APPLY.replace("@WANTED@", &list),
    ]
}

/// Evaluates `flake` for `wanted` machines in one `nix eval` process.
pub fn evaluate(flake: &str, wanted: &[String]) -> Result<Evaluation, Error> {
    let argv = eval_command(flake, wanted);
    let output = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| {
            Error::new(format!("cannot run nix to evaluate {flake}: {e}"))
                .hint(Hint::text("install Nix (2.8 or newer) on this workstation"))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(Error::new(format!("evaluating the flake {flake} failed"))
            .detail(stderr.trim_end().to_string())
            .hint(Hint::text(
                "the flake must expose clanInternals (use this repo's lib.clan; see the README)",
            )));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| {
        Error::new(format!(
            "the flake {flake} evaluated to something unexpected: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_nix_string() {
        assert_eq!(nix_string("a\"${b}\n"), r#""a\"\${b}\n""#);
        let argv = eval_command("/f", &["x".into(), "y$(z)".into()]);
        assert_eq!(argv[5], "/f#clanInternals");
        assert!(argv[7].contains(r#"wanted = [ "x" "y\$(z)" ];"#));
    }

    #[test]
    fn parses_the_evaluation() {
        let json = r#"{"machines":["m"],"tags":{"m":["web"]},"selected":{"m":{
            "inventoryTargetHost":"root@t","inventoryBuildHost":null,"configTargetHost":null,
            "configBuildHost":"root@b","system":"x86_64-linux",
            "toplevelDrv":"/nix/store/a-s.drv","toplevelOut":"/nix/store/b-s"}}}"#;
        let eval: Evaluation = serde_json::from_str(json).unwrap();
        assert_eq!(
            eval.selected["m"].config_build_host.as_deref(),
            Some("root@b")
        );
        assert_eq!(eval.tags["m"], vec!["web".to_string()]);
    }
}
