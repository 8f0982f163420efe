# Evaluation tests of lib.clan on nixpkgs' real lib, run by tests/nix_lib.rs:
#   nix-instantiate --eval --strict --json nix/tests --arg nixpkgs '{ lib = import <nixpkgs-lib>; }'
# Each attribute is true when the behaviour holds; `refused` lists what must not evaluate.
{ nixpkgs }:
let
  clanLib = import ../lib.nix { defaultNixpkgs = nixpkgs; };
  base = {
    self = null;
    inherit nixpkgs;
    nixosSystem = clanLib.minimalSystem;
    directory = ./example;
  };
  clan = args: clanLib.clan (base // args);
  ok = clan {
    imports = [
      ({ lib, config, ... }: {
        inventory.machines.web1.deploy.targetHost = lib.mkDefault "root@web1";
        inventory.machines.web1.tags = [ "web" ];
        machines.web1 = { config, ... }: { system.build.toplevel = { name = "t-${config.networking.hostName}"; }; };
      })
      { inventory.machines.web1.deploy.targetHost = "root@web1.override"; }
    ];
  };
  fails = v: !(builtins.tryEval (builtins.deepSeq v v)).success;
in
{
  mkDefaultLosesToAPlainValue =
    ok.clanInternals.inventory.machines.web1.deploy.targetHost == "root@web1.override";
  machinesFromTheDirectoryAndJson =
    builtins.attrNames ok.nixosConfigurations == [ "disk1" "json1" "web1" ];
  configurationAndHardwareImported =
    ok.nixosConfigurations.disk1.config.networking.hostName == "from-file"
    && ok.nixosConfigurations.disk1.config.clan.core.networking.buildHost == "root@builder.from.hardware";
  hostNameDefaultsToTheMachineName =
    ok.nixosConfigurations.web1.config.system.build.toplevel.name == "t-web1";
  inventoryJsonRead = ok.clanInternals.inventory.machines.json1.tags == [ "from-json" ];
  instancesRefused = fails (clan { inventory.instances.sshd = { }; }).clanInternals.machines;
  pkgsForSystemRefused = fails (clan { pkgsForSystem = _: null; }).nixosConfigurations;
  unknownInventoryKeyRefused =
    fails (clan { inventory.machines.x.deploy.tagetHost = "typo"; }).clanInternals.inventory;
  darwinRefused = fails (clan { inventory.machines.x.machineClass = "darwin"; }).clanInternals.inventory;
}
