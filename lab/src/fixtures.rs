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

/// The fixtures' systems (`toplevel.nix` beside each fixture flake).
const FIXTURE_TOPLEVEL: &str = include_str!("../fixtures/toplevel.nix");

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

/// clan-core's own library, offline: the `CLAN_CORE_FIXTURE` directory, else
/// `../shared/clan-core-fixture` next to this repository (read-only: tests copy from it).
pub fn clan_core_fixture() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLAN_CORE_FIXTURE") {
        return PathBuf::from(dir);
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/clan-core-fixture");
    [beside, PathBuf::from("/work/shared/clan-core-fixture")]
        .into_iter()
        .find(|d| d.join("overrides").exists())
        .expect(
            "clan-core's fixture not found: set CLAN_CORE_FIXTURE to ../shared/clan-core-fixture",
        )
        .canonicalize()
        .expect("clan-core fixture path")
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
        write(&flake.join("toplevel.nix"), FIXTURE_TOPLEVEL);
        flake
    }

    /// A clan made by clan-core's own library (`../shared/clan-core-fixture`: clan-core's
    /// lib, modules and services, with stubbed nixpkgs packages), written into the lab's
    /// directory `rel` as a user has it: clan-core's default template's `flake.nix`
    /// unchanged, `clan_nix` as its `clan.nix`, and a lock whose inputs point at the
    /// fixture (no network). `clan_nix` can use `toplevel "NAME" { … }` (this lab's
    /// recording systems, as in [`Lab::write_flake`]) for `system.build.toplevel`.
    pub fn write_clan_core_flake(&self, rel: &str, clan_nix: &str) -> PathBuf {
        let fixture = clan_core_fixture();
        let flake = self.dir.join(rel);
        fs::create_dir_all(&flake).expect("flake dir");
        run(Command::new("cp")
            .arg(fixture.join("example/flake.nix"))
            .arg(&flake));
        write(&flake.join("toplevel.nix"), FIXTURE_TOPLEVEL);
        write(
            &flake.join("clan.nix"),
            &format!("let toplevel = import ./toplevel.nix {{ shared = null; }}; in\n{clan_nix}\n"),
        );
        let overrides = run(Command::new("bash").arg(fixture.join("overrides")));
        let overrides = String::from_utf8_lossy(&overrides.stdout);
        let mut argv = vec!["nix", "flake", "lock"];
        argv.extend(overrides.split_whitespace());
        let out = self.run_on_workstation(&flake, &argv);
        assert!(
            out.status.success(),
            "locking the clan-core flake: {}",
            String::from_utf8_lossy(&out.stderr)
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
