//! Clan flakes for the tests: this repository's Nix library with `minimalSystem`, whose
//! systems are plain derivations (`fixtures/flake.nix`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::*;

/// The fixture flake: a clan built with this repo's library and `minimalSystem`, whose
/// systems are plain derivations with a `switch-to-configuration` that records its calls.
/// `@LIB@`, `@NIXPKGS@`, `@CLAN_ARGS@` and `@SHARED_SECONDS@` are filled in.
const FIXTURE_FLAKE: &str = include_str!("../fixtures/flake.nix");

/// nixpkgs' real `lib` (a flake with `lib`: the module system, no packages): the
/// `CLAN_NIXPKGS_LIB` directory, else `../shared/nixpkgs-lib` next to this repository, else
/// the copy vendored in `lab/nixpkgs-lib` (unchanged; see its PROVENANCE.md).
pub fn nixpkgs_lib() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLAN_NIXPKGS_LIB") {
        return PathBuf::from(dir);
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/nixpkgs-lib");
    let vendored = Path::new(env!("CARGO_MANIFEST_DIR")).join("nixpkgs-lib");
    let found = [beside, PathBuf::from("/work/shared/nixpkgs-lib"), vendored]
        .into_iter()
        .find(|d| d.join("flake.nix").exists())
        .expect("nixpkgs' lib not found: set CLAN_NIXPKGS_LIB to a checkout of github:nix-community/nixpkgs.lib");
    found.canonicalize().expect("nixpkgs lib path")
}

/// A Nix evaluation command (`nix-instantiate`, `nix`) that never touches the machine's own
/// `/nix` or home: its store is a chroot store under `dir` (`NIX_REMOTE`), its home and
/// caches are `dir` too. For tests that evaluate without a lab host: several of them may run
/// at once, each creating a store database of its own.
pub fn isolated_nix(program: &str, dir: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .env("NIX_REMOTE", dir.join("store"))
        .env("HOME", dir)
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("XDG_STATE_HOME", dir.join("state"))
        .env("NIX_CONFIG", "experimental-features = nix-command flakes")
        .env_remove("NIX_PATH");
    command
}

impl Lab {
    /// Writes a clan flake on the workstation and returns its directory. `clan_args` is a Nix
    /// attrset expression given to `lib.clan`; it can use `system { … }` to define a
    /// machine's configuration: `system { variant = "2"; networking.buildHost = "…"; }`.
    pub fn write_flake(&self, clan_args: &str) -> PathBuf {
        self.write_flake_with_shared_seconds(clan_args, 0)
    }

    /// [`Lab::write_flake`], with the shared dependency's build taking `seconds`.
    pub fn write_flake_with_shared_seconds(&self, clan_args: &str, seconds: u32) -> PathBuf {
        self.write_flake_in("flake", clan_args, seconds)
    }

    /// [`Lab::write_flake`] into the directory `rel` of the lab (any name: spaces, `#`…).
    pub fn write_flake_in(&self, rel: &str, clan_args: &str, seconds: u32) -> PathBuf {
        let lib = self.clan_lib();
        let flake = self.dir.join(rel);
        let _ = fs::remove_file(flake.join("flake.lock"));
        write(
            &flake.join("flake.nix"),
            &FIXTURE_FLAKE
                .replace("@LIB@", &lib.display().to_string())
                .replace("@NIXPKGS@", &nixpkgs_lib().display().to_string())
                .replace("@CLAN_ARGS@", clan_args)
                .replace("@SHARED_SECONDS@", &seconds.to_string()),
        );
        flake
    }

    /// This repository's Nix library, copied into the lab with its `nixpkgs` input pointed
    /// at [`nixpkgs_lib`] (nothing else of nixpkgs is reachable here).
    pub fn clan_lib(&self) -> PathBuf {
        let lib = self.dir.join("clan-lib");
        if !lib.exists() {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            fs::create_dir_all(&lib).expect("lib dir");
            let flake = fs::read_to_string(repo.join("flake.nix")).expect("flake.nix");
            write(
                &lib.join("flake.nix"),
                &flake.replace(
                    "github:NixOS/nixpkgs/nixos-unstable",
                    &format!("path:{}", nixpkgs_lib().display()),
                ),
            );
            run(Command::new("cp").arg("-r").arg(repo.join("nix")).arg(&lib));
        }
        lib
    }

    /// Writes `text` to `rel` inside the flake directory (call after [`Lab::write_flake`]).
    pub fn write_flake_file(&self, rel: &str, text: &str) {
        write(&self.dir.join("flake").join(rel), text);
    }
}
