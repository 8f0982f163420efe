# Evaluation tests of lib.clan on nixpkgs' real lib, run by tests/nix_lib.rs:
#   nix-instantiate --eval --strict --json nix/tests --arg nixpkgs '{ lib = import <nixpkgs-lib>; }'
# Each attribute is true when the behaviour holds; `refused` lists what must not evaluate.
{ nixpkgs }:
let
  lib = nixpkgs.lib;
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
  varsClan = clan {
    vars.settings.recipients.default = [ "age1example" ];
    machines.web1 = {
      clan.core.vars.generators.greeting = {
        files.hello.secret = false;
        script = "echo hi > $out/hello";
      };
      clan.core.vars.generators.db = {
        prompts.password = { type = "hidden"; persist = true; };
        files.hash = { owner = "nobody"; group = "nogroup"; mode = "0440"; };
        files.rootpw.neededFor = "users";
        files.part.neededFor = "partitioning";
        files.tls = { restartUnits = [ "web.service" "proxy.service" ]; };
        dependencies = [ "greeting" ];
        validation = { domain = "example.org"; port = 443; };
      };
      clan.core.vars.generators.missing.files.pub.secret = false;
      system.build.toplevel = { name = "t"; };
    };
    machines.bad = {
      clan.core.vars.generators.g.files.f = { neededFor = "users"; owner = "alice"; };
    };
    # Declares NixOS's activation scripts, so the module fills them in as on NixOS.
    machines.nixoslike = { lib, ... }: {
      options.system.activationScripts = lib.mkOption {
        type = lib.types.attrsOf lib.types.unspecified;
        default = { };
      };
      config.clan.core.vars.generators.db = {
        files.hash = { };
        files.rootpw.neededFor = "users";
      };
    };
  };
  snippets = varsClan.nixosConfigurations.nixoslike.config.system.activationScripts;
  isolated = text:
    lib.hasPrefix "if ! (\n" text && lib.hasInfix "_localstatus=1" text && lib.hasInfix "set -eu" text;
  web1vars = varsClan.nixosConfigurations.web1.config.clan.core.vars;
  script = web1vars.activationScript;
  has = needle: lib.hasInfix needle script;

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
  # As clan-core: a machine's default address is root@<hostName>.<meta.domain> (domain
  # "clan" unless set); an explicit one wins; no domain, no default.
  targetHostDefaultsToTheDomain =
    (clan { machines.m = { }; }).nixosConfigurations.m.config.clan.core.networking.targetHost
      == "root@m.clan"
    && (clan { meta.domain = "lab.lan"; machines.m = { }; }).nixosConfigurations.m.config.clan.core.networking.targetHost
      == "root@m.lab.lan";
  explicitTargetHostWinsOverTheDomain =
    (clan { machines.m.clan.core.networking.targetHost = "root@10.0.0.1"; }).nixosConfigurations.m.config.clan.core.networking.targetHost
      == "root@10.0.0.1";
  noDomainNoDefaultTargetHost =
    (clan { meta.domain = null; machines.m = { }; }).nixosConfigurations.m.config.clan.core.networking.targetHost == null
    && (clan { machines.m.networking.domain = null; }).nixosConfigurations.m.config.clan.core.networking.targetHost == null;
  installedAtAccepted = ok.clanInternals.inventory.machines.json1.installedAt == 1733468400;
  instancesRefused = fails (clan { inventory.instances.sshd = { }; }).clanInternals.machines;
  pkgsForSystemRefused = fails (clan { pkgsForSystem = _: null; }).nixosConfigurations;
  unknownInventoryKeyRefused =
    fails (clan { inventory.machines.x.deploy.tagetHost = "typo"; }).clanInternals.inventory;
  darwinRefused = fails (clan { inventory.machines.x.machineClass = "darwin"; }).clanInternals.inventory;
  varsSettingsExposed = varsClan.clanInternals.vars.settings.recipients.default == [ "age1example" ];
  publicValueReadFromTheRepository = web1vars.generators.greeting.files.hello.value == "hi there";
  publicPathInTheStore = lib.hasPrefix builtins.storeDir web1vars.generators.greeting.files.hello.path;
  secretPathsByPhase =
    web1vars.generators.db.files.hash.path == "/run/secrets/db/hash"
    && web1vars.generators.db.files.rootpw.path == "/run/secrets-for-users/db/rootpw"
    && web1vars.generators.db.files.password.secret;
  missingPublicValueFails = fails web1vars.generators.missing.files.pub.value;
  secretValueFails = fails web1vars.generators.db.files.hash.value;
  activationDecryptsEachDeployedSecret =
    has "clan_vars_file /run/secrets db hash per-machine/web1/db/hash/hash.age nobody nogroup 0440\n"
    && has "clan_vars_file /run/secrets-for-users db rootpw per-machine/web1/db/rootpw/rootpw.age root root 0400\n"
    && has "clan_vars_file /run/secrets db password "
    && !(has " part ") && !(has " hello ");
  restartUnitsFollowTheirFile =
    has "clan_vars_file /run/secrets db tls per-machine/web1/db/tls/tls.age root root 0400 web.service proxy.service\n";
  validationHashIsClanCores =
    web1vars.generators.db.validationHash
    == builtins.hashString "sha256" (builtins.toJSON { domain = "example.org"; port = 443; })
    && web1vars.generators.greeting.validationHash == null;
  usersSecretsMustBeRootOwned = fails varsClan.nixosConfigurations.bad.config.clan.core.vars.activationScript;
  activationSnippetsRunInTheirOwnSubshell =
    isolated snippets.clan-vars.text && isolated snippets.clan-vars-for-users.text
    && snippets.users.deps == [ "clan-vars-for-users" ];
  noVarsNoScript = ok.nixosConfigurations.web1.config.clan.core.vars.activationScript == "";
}
