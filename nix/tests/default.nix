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
    vars.settings.secretStore = "age"; vars.settings.recipients.default = [ "age1example" ];
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

  # Clan services: a clan's own module (input "self"), roles by name and by tag.
  greeter = { lib, ... }: {
    _class = "clan.service";
    manifest.name = "greeter";
    roles.peer = {
      interface.options = {
        greeting = lib.mkOption { type = lib.types.str; default = "hello"; };
        loud = lib.mkOption { type = lib.types.bool; default = false; };
        names = lib.mkOption { type = lib.types.listOf lib.types.str; default = [ ]; };
      };
      perInstance = { settings, instanceName, machine, roles, ... }: {
        nixosModule.greetings.${instanceName} = {
          inherit (settings) greeting loud names;
          roles = machine.roles;
          peers = builtins.attrNames roles.peer.machines;
        };
      };
    };
    roles.watcher.perInstance = { machine, ... }: { nixosModule.watched = machine.name; };
    perMachine = { machine, instances, ... }: {
      nixosModule.greeterInstances = builtins.attrNames instances;
    };
  };
  servicesClan = extra: clan {
    imports = [ extra ];
    modules.greeter = greeter;
    inventory.machines = {
      a = { tags = [ "web" ]; };
      b = { };
      c = { };
    };
    inventory.tags.db = [ "b" ];
    inventory.instances.hi = {
      module = { name = "greeter"; input = "self"; };
      roles.peer.tags = [ "web" "db" ];
      roles.peer.settings.greeting = "hi";
      roles.peer.machines.b.settings.loud = true;
      roles.watcher.machines.c = { };
    };
    inventory.instances.everyone = {
      module = { name = "greeter"; input = "self"; };
      roles.peer.tags.all.settings.names = [ "from-tag" ];
      roles.peer.machines.c.settings.greeting = "hey";
      roles.peer.extraModules = [ { extra = true; } ];
    };
  };
  services = servicesClan { };
  cfgOf = m: services.nixosConfigurations.${m}.config;
  failsWith = v: !(builtins.tryEval (builtins.deepSeq v v)).success;

in
{
  servicesRoleMembersByNameAndTag =
    services.clanInternals.services.hi == { peer = [ "a" "b" ]; watcher = [ "c" ]; }
    && services.clanInternals.services.everyone.peer == [ "a" "b" "c" "disk1" "json1" ];
  servicesComputedAndInventoryTags =
    services.clanInternals.inventory.machines.b.tags == [ "db" "all" "nixos" ]
    && services.clanInternals.inventory.machines.a.tags == [ "web" "all" "nixos" ];
  # interface defaults < role settings < machine and tag settings.
  servicesSettingsMerge =
    (cfgOf "a").greetings.hi == { greeting = "hi"; loud = false; names = [ ]; roles = [ "peer" ]; peers = [ "a" "b" ]; }
    && (cfgOf "b").greetings.hi.loud
    && (cfgOf "c").greetings.everyone.greeting == "hey"
    && (cfgOf "c").greetings.everyone.names == [ "from-tag" ]
    && (cfgOf "a").greetings.everyone.greeting == "hello";
  servicesPerMachineOncePerService =
    (cfgOf "a").greeterInstances == [ "everyone" "hi" ]
    && (cfgOf "c").greeterInstances == [ "everyone" "hi" ]
    && (cfgOf "c").watched == "c" && !((cfgOf "a") ? watched);
  servicesExtraModules = (cfgOf "a").extra && (cfgOf "c").extra;
  servicesUnknownModuleNamed = failsWith (servicesClan {
    inventory.instances.x.module = { name = "nope"; input = "self"; };
  }).nixosConfigurations.a.config;
  servicesUnknownInputNamed = failsWith (servicesClan {
    inventory.instances.x.module = { name = "greeter"; input = "elsewhere"; };
  }).nixosConfigurations.a.config;
  servicesUnknownRoleNamed = failsWith (servicesClan {
    inventory.instances.x = { module = { name = "greeter"; input = "self"; }; roles.nope.machines.a = { }; };
  }).nixosConfigurations.a.config;
  servicesUnknownMachineNamed = failsWith (servicesClan {
    inventory.instances.x = { module = { name = "greeter"; input = "self"; }; roles.peer.machines.zz = { }; };
  }).nixosConfigurations.a.config;
  # This tool's own sshd and users services, as clan-core's template uses them (the sops store, by default: clan-core's paths).
  ownServicesGiveVars =
    let
      t = clan {
        inventory.machines.m = { };
        inventory.instances = {
          sshd = { roles.server.tags.all = { }; roles.server.settings.authorizedKeys.admin = "ssh-ed25519 AAAA admin"; };
          user-root = { module.name = "users"; roles.default.tags.all = { }; roles.default.settings = { user = "root"; prompt = true; }; };
        };
        machines.m.system.build.toplevel = { name = "t"; };
      };
      c = t.nixosConfigurations.m.config;
      gens = c.clan.core.vars.generators;
    in
    gens.openssh.files."ssh.id_ed25519".secret
    && !gens.openssh.files."ssh.id_ed25519.pub".secret
    && c.services.openssh.hostKeys == [ { path = "/run/secrets/vars/per-machine/m/openssh/ssh.id_ed25519"; type = "ed25519"; } ]
    && c.users.users.root.openssh.authorizedKeys.keys == [ "ssh-ed25519 AAAA admin" ]
    && c.users.users.root.hashedPasswordFile == "/run/secrets-for-users/vars/per-machine/m/user-password-root/user-password-hash"
    && gens.user-password-root.files.user-password-hash.neededFor == "users"
    && !gens.user-password-root.files.user-password.deploy
    && gens.user-password-root.prompts.user-password.type == "hidden"
    && c.users.mutableUsers == false
    # The clan's certificate authority (shared, never deployed) signs the host key for
    # <machine>.<domain>, made again when the names change; servers trust it.
    && gens.openssh-ca.share && !gens.openssh-ca.files.id_ed25519.deploy
    && gens.openssh-cert.dependencies == [ "openssh" "openssh-ca" ]
    && gens.openssh-cert.validationHash != null
    && c.programs.ssh.knownHosts.ssh-ca.extraHostNames == [ "*.clan" ]
    && lib.hasInfix "-n m.clan " gens.openssh-cert.script;
  ownSshdClientTrustsTheAuthority =
    let
      t = clan {
        inventory.machines = { s = { }; c = { }; };
        inventory.instances.sshd = { roles.server.machines.s = { }; roles.client.machines.c = { }; };
        machines.s = { };
        machines.c = { };
      };
      c = t.nixosConfigurations.c.config;
    in
    c.programs.ssh.knownHosts.ssh-ca.certAuthority
    && c.clan.core.vars.generators.openssh-ca.share
    && !(c.clan.core.vars.generators ? openssh);
  ownSshdRsaRefusedByName = failsWith (clan {
    inventory.machines.m = { };
    inventory.instances.sshd = { roles.server.tags.all = { }; roles.server.settings.hostKeys.rsa.enable = true; };
    machines.m = { };
  }).nixosConfigurations.m.config.clan.core.vars.generators;
  mkDefaultLosesToAPlainValue =
    ok.clanInternals.inventory.machines.web1.deploy.targetHost == "root@web1.override";
  machinesFromTheDirectoryAndJson =
    builtins.attrNames ok.nixosConfigurations == [ "disk1" "json1" "web1" ];
  configurationAndHardwareImported =
    ok.nixosConfigurations.disk1.config.networking.hostName == "from-file"
    && ok.nixosConfigurations.disk1.config.clan.core.networking.buildHost == "root@builder.from.hardware";
  hostNameDefaultsToTheMachineName =
    ok.nixosConfigurations.web1.config.system.build.toplevel.name == "t-web1";
  # With the computed tags, as clan-core lists them.
  inventoryJsonRead = ok.clanInternals.inventory.machines.json1.tags == [ "from-json" "all" "nixos" ];
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
  olderServicesRefused = fails (clan { inventory.services.sshd = { }; }).clanInternals.machines.x86_64-linux;
  pkgsForSystemRefused = fails (clan { pkgsForSystem = _: null; }).nixosConfigurations;
  unknownInventoryKeyRefused =
    fails (clan { inventory.machines.x.deploy.tagetHost = "typo"; }).clanInternals.inventory;
  # As clan-core has it: a darwin machine is listed, but is no NixOS configuration.
  darwinListedNotANixosConfiguration =
    let
      c = clan { inventory.machines.x.machineClass = "darwin"; machines.x = { }; machines.y = { }; };
    in
    c.clanInternals.inventory.machines.x.machineClass == "darwin"
    && c.clanInternals.machines.x86_64-linux ? x
    && !(c.nixosConfigurations ? x) && c.nixosConfigurations ? y;
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
