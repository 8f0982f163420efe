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

/// A flake as `nix eval` is given it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlakeRef {
    /// The reference on nix's command line.
    pub reference: String,
    /// The directory nix runs in (the reference is then `.`).
    pub dir: Option<std::path::PathBuf>,
    /// For messages.
    pub shown: String,
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
    /// `builtins.storeDir`.
    #[serde(default, rename = "storeDir")]
    pub store_dir: Option<String>,
}

/// The `--apply` function. `@WANTED@` and `@TAGS@` become Nix lists of the requested names
/// and tags: the selection is the named machines plus those with a requested tag (all
/// machines when both are empty). Unknown names and tags that match nothing are left out
/// here and reported by the caller, which gets the full machine and tag lists.
const APPLY: &str = r#"ci:
let
  wanted = @WANTED@;
  wantedTags = @TAGS@;
  inventoryMachines = ci.inventory.machines or { };
  all = builtins.attrNames ci.machines;
  tagsOf = n: (inventoryMachines.${n} or { }).tags or [ ];
  tagged = builtins.filter (n: builtins.any (t: builtins.elem t wantedTags) (tagsOf n)) all;
  names =
    if wanted == [ ] && wantedTags == [ ] then all
    else builtins.filter (n: builtins.elem n wanted || builtins.elem n tagged) all;
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
  storeDir = builtins.storeDir;
  machines = all;
  tags = builtins.listToAttrs (map (n: { name = n; value = tagsOf n; }) all);
  selected = builtins.listToAttrs (map (n: { name = n; value = facts n; }) names);
}"#;

/// A Nix string literal for `s`: JSON escaping plus `$` escaped, so `${` never interpolates.
fn nix_string(s: &str) -> String {
    serde_json::to_string(s)
        .expect("a string always serializes")
        .replace('$', "\\$")
}

/// A Nix list of strings.
fn nix_list(items: &[String]) -> String {
    format!(
        "[ {} ]",
        items
            .iter()
            .map(|n| nix_string(n))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// The `nix eval` argv for `flake`, the requested machines and tags (both empty: all).
pub fn eval_command(flake: &str, wanted: &[String], tags: &[String]) -> Vec<String> {
    vec![
        "nix".into(),
        "--extra-experimental-features".into(),
        "nix-command flakes".into(),
        "eval".into(),
        "--json".into(),
        format!("{flake}#clanInternals"),
        "--apply".into(),
        APPLY
            .replace("@WANTED@", &nix_list(wanted))
            .replace("@TAGS@", &nix_list(tags)),
    ]
}

/// Evaluates `flake` for the `wanted` machines and those with one of `tags`, in one
/// `nix eval` process.
pub fn evaluate(
    flake_ref: &FlakeRef,
    wanted: &[String],
    tags: &[String],
) -> Result<Evaluation, Error> {
    let argv = eval_command(&flake_ref.reference, wanted, tags);
    let flake = flake_ref.shown.as_str();
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]);
    if let Some(dir) = &flake_ref.dir {
        command.current_dir(dir);
    }
    let output = command.output().map_err(|e| {
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
        let argv = eval_command("/f", &["x".into(), "y$(z)".into()], &["web".into()]);
        assert_eq!(argv[5], "/f#clanInternals");
        assert!(argv[7].contains(r#"wanted = [ "x" "y\$(z)" ];"#));
        assert!(argv[7].contains(r#"wantedTags = [ "web" ];"#));
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
