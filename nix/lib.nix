# The clan Nix library, on nixpkgs' real module system.
#
# `clan { self; imports; meta; inventory; machines; directory; specialArgs; nixpkgs; … }` is a
# module evaluation (class "clan", `lib.evalModules`): every argument but `self`, `nixpkgs`,
# `nixosSystem` and `imports` is configuration of the interface below; `imports` are clan
# modules, which may be functions of `{ lib, config, self, … }`; values may use
# `mkDefault`/`mkForce`. Outputs:
#   nixosConfigurations.<name>  one NixOS system per machine
#   clanInternals.inventory     the inventory, typed (the CLI reads deploy.* from it)
#   clanInternals.machines      the same configurations, for the CLI, per system as
#                               clan-core's (machines.<system>.<name>)
# Machines are found as clan-core finds them: inventory.machines, `machines`, and the
# directories of `<directory>/machines/`, whose configuration.nix and
# hardware-configuration.nix are imported. `inventory.json` in the directory is read.
# Clan services (`inventory.instances`) are evaluated by ./services.nix, with this
# repository's own service modules (./services/) as clan-core's `clan.modules`. What
# clan-core supports and this library does not (the older `inventory.services`,
# pkgsForSystem, templates) is refused with an error naming the key.
#
# `minimalSystem` stands in for nixpkgs.lib.nixosSystem where no full nixpkgs exists (tests,
# demos): the same module system with the few options a toplevel needs.
{ defaultNixpkgs ? null }:
let
  inherit (builtins)
    attrNames
    filter
    pathExists
    readDir
    removeAttrs
    ;

  clanCoreModule =
    { lib, config, ... }:
    let
      host =
        description:
        lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
          inherit description;
        };
    in
    {
      imports = [ ./vars.nix ];
      options.clan.core.networking = {
        # As clan-core: the machine's fully qualified name when it has a domain (by default
        # the clan's meta.domain), else none.
        targetHost = host "SSH address of this machine, `[user@]host[:port][?OPTION=VALUE&…]`; the inventory's deploy.targetHost wins over it. Default: root@<networking.hostName>.<networking.domain> when the machine has a domain (the clan's meta.domain by default), else unset." // {
          default =
            if config.networking.domain or null != null then
              "root@${config.networking.hostName}.${config.networking.domain}"
            else
              null;
          defaultText = lib.literalExpression ''"root@''${networking.hostName}.''${networking.domain}" when networking.domain is set, else null'';
        };
        buildHost = host "SSH address of the machine that builds this system; the inventory's deploy.buildHost and --build-host win over it. Unset: build on the target.";
        forwardAgent = lib.mkOption {
          type = lib.types.nullOr lib.types.bool;
          default = null;
          description = "Forward the workstation's SSH agent to the build host; the inventory's deploy.forwardAgent wins over it.";
        };
      };
      options.clan.core.networking.builders = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "Nix remote builders the build host hands derivations to (Nix's `builders` syntax); the inventory's deploy.builders and --builders win over it.";
      };
      options.clan.core.deployment.requireExplicitUpdate = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = "Leave this machine out of `clan machines update` without machine names.";
      };
    };

  # What `minimalSystem` declares: enough for a toplevel, on the real module system.
  # Anything else a configuration sets at the top level (boot, fileSystems, …) is accepted
  # and ignored, so hardware-configuration.nix files evaluate.
  minimalModule =
    { lib, ... }:
    let
      # As NixOS merges its options: sets recursively, lists concatenated, anything else
      # once (or equal), so several modules may set parts of one (clan services:
      # users.users.root from sshd and users).
      merging = lib.mkOptionType {
        name = "merging";
        description = "anything, merged as NixOS options merge";
        merge =
          loc: defs:
          let
            values = map (d: d.value) defs;
          in
          if builtins.all builtins.isList values then
            builtins.concatLists values
          else if builtins.all (v: builtins.isAttrs v && !lib.isStringLike v) values then
            (lib.types.lazyAttrsOf merging).merge loc defs
          else
            lib.types.anything.merge loc defs;
      };
    in
    {
      freeformType = lib.types.lazyAttrsOf merging;
      options = {
        system.build = lib.mkOption {
          type = lib.types.lazyAttrsOf lib.types.raw;
          default = { };
          description = "Build products; `toplevel` is the system.";
        };
        system.stateVersion = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
        };
        nixpkgs.hostPlatform = lib.mkOption {
          type = lib.types.nullOr (lib.types.either lib.types.str (lib.types.attrsOf lib.types.raw));
          default = null;
        };
        nixpkgs.system = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
        };
        networking.hostName = lib.mkOption {
          type = lib.types.str;
          default = "nixos";
        };
        networking.domain = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
        };
      };
    };

  minimalSystem =
    {
      modules,
      specialArgs ? { },
      lib ? throw "clan.lib.minimalSystem needs `lib` (nixpkgs' lib); lib.clan passes it",
      ...
    }:
    lib.evalModules {
      class = "nixos";
      specialArgs = {
        modulesPath = throw "clan.lib.minimalSystem has no NixOS modules (modulesPath)";
      } // specialArgs;
      modules = [ minimalModule ] ++ modules;
    };

  # This repository's clan service modules: what `module.input = null` names.
  ownModules = {
    sshd = ./services/sshd.nix;
    users = ./services/users.nix;
  };

  # A module of the settings of a role, a machine in it or a tag.
  settingsOption = lib: lib.mkOption {
    type = lib.types.deferredModule;
    default = { };
    description = "Settings, as a module of the role's interface.";
  };

  # An instance of a clan service, as clan-core types it.
  instanceModule =
    lib:
    { name, ... }:
    let
      inherit (lib) mkOption types;
      settingsOnly = types.submodule { options.settings = settingsOption lib; };
    in
    {
      options = {
        module.name = mkOption {
          type = types.str;
          default = name;
          description = "The service module's name (default: the instance's).";
        };
        module.input = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Where the module is: null, this clan tool's own clan.modules; \"self\", this clan's modules; else inputs.<input>.clan.modules.";
        };
        roles = mkOption {
          default = { };
          type = types.attrsOf (
            types.submodule {
              options = {
                machines = mkOption {
                  type = types.attrsOf settingsOnly;
                  default = { };
                };
                tags = mkOption {
                  type = types.coercedTo (types.listOf types.str) (
                    tags: lib.genAttrs tags (_: { })
                  ) (types.attrsOf settingsOnly);
                  default = { };
                };
                settings = settingsOption lib;
                extraModules = mkOption {
                  type = types.listOf types.raw;
                  default = [ ];
                  description = "NixOS modules imported into every member machine.";
                };
              };
            }
          );
        };
      };
    };

  # The interface of a clan, as clan-core names it.
  interface =
    { lib, self, ... }:
    let
      inherit (lib) mkOption types;
      unsupported =
        key: extra:
        mkOption {
          type = types.raw;
          default = null;
          description = "Not supported by this clan tool: setting it is an error naming `${key}`. ${extra}";
        };
      # An optional string setting.
      optionalStr =
        description:
        mkOption {
          type = types.nullOr types.str;
          default = null;
          inherit description;
        };
      machineModule =
        { name, ... }:
        {
          options = {
            name = mkOption {
              type = types.str;
              default = name;
            };
            description = optionalStr "What the machine is, for people.";
            icon = optionalStr "An icon for the machine, for people.";
            tags = mkOption {
              type = types.listOf types.str;
              default = [ ];
              description = "Tags to select machines by (`clan machines update --tags`).";
            };
            machineClass = mkOption {
              type = types.enum [
                "nixos"
                "darwin"
              ];
              default = "nixos";
              description = "As in clan-core; a darwin machine is listed (clanInternals) but is no NixOS configuration, and this tool's deploy leaves it out with the reason.";
            };
            requireExplicitUpdate = mkOption {
              type = types.bool;
              default = false;
              description = "Leave this machine out of `clan machines update` without machine names.";
            };
            installedAt = mkOption {
              type = types.nullOr (types.either types.int types.str);
              default = null;
              description = "When the machine was installed (clan-core's `clan machines install` writes it to inventory.json); informational.";
            };
            deploy = {
              targetHost = optionalStr "SSH address of the machine: [user@]host[:port][?OPTION=VALUE&…].";
              buildHost = optionalStr "SSH address of the host that builds the machine's system; unset: the machine builds it.";
              forwardAgent = mkOption {
                type = types.nullOr types.bool;
                default = null;
              };
              builders = optionalStr "Nix remote builders behind the build host, in Nix's `builders` syntax.";
              copyMode = mkOption {
                type = types.nullOr (types.enum [ "ssh" "cache" ]);
                default = null;
                description = "How the closure reaches the target: ssh (the build host copies it) or cache (the target substitutes it from deploy.cache).";
              };
              cache = {
                upload = optionalStr "Nix store URL the build host copies signed closures to (e.g. file:///srv/cache).";
                url = optionalStr "Substituter URL the target fetches them from (e.g. https://cache.example.com).";
                publicKey = optionalStr "The cache's public signing key (name:base64), which the target must trust.";
              };
              healthCheck = optionalStr "A shell command run on the target (as the deploy user) after a confirmed activation; non-zero: unhealthy.";
            };
          };
        };
    in
    {
      options = {
        meta = mkOption {
          type = types.submodule {
            freeformType = types.attrsOf types.raw;
            options.name = mkOption {
              type = types.str;
              default = "clan";
            };
            options.domain = mkOption {
              type = types.nullOr types.str;
              default = "clan";
              description = "The clan's domain, as clan-core has it: each machine's networking.domain by default, so its targetHost is root@<name>.<domain> unless set; null: no default address.";
            };
          };
          default = { };
        };
        directory = mkOption {
          type = types.nullOr types.raw;
          default = self;
          description = "The directory of the clan (machines/, inventory.json); the flake by default.";
        };
        specialArgs = mkOption {
          type = types.attrsOf types.raw;
          default = { };
          description = "Extra arguments of every machine's modules (`self` is always given).";
        };
        machines = mkOption {
          type = types.attrsOf types.deferredModule;
          default = { };
          description = "NixOS modules per machine.";
        };
        inventory = mkOption {
          type = types.submodule {
            options = {
              meta = mkOption {
                type = types.attrsOf types.raw;
                default = { };
              };
              machines = mkOption {
                type = types.attrsOf (types.submodule machineModule);
                default = { };
              };
              instances = mkOption {
                type = types.attrsOf (types.submodule (instanceModule lib));
                default = { };
                description = "Clan services (clan-core's inventory.instances): each names a service module and gives its roles to machines.";
              };
              services = unsupported "inventory.services" "clan-core's older services: use inventory.instances.";
              modules = unsupported "inventory.modules" "";
              tags = mkOption {
                type = types.attrsOf (types.listOf types.str);
                default = { };
                description = "Tags given to machines by name, besides inventory.machines.<name>.tags (and the computed all and nixos).";
              };
            };
          };
          default = { };
        };
        pkgsForSystem = unsupported "pkgsForSystem" "Set nixpkgs options in the machines' modules.";
        vars.settings = {
          secretStore = mkOption {
            type = types.enum [
              "age"
              "sops"
            ];
            default = "sops";
            description = "Where vars secrets are kept: sops files at clan-core's sops layout (decrypted on the target by sops), or age files at clan-core's age paths (uploaded, decrypted by age). Each machine's clan.core.vars.settings.secretStore defaults to it.";
          };
          recipients.default = mkOption {
            type = types.listOf types.str;
            default = [ ];
            description = "Age public keys of the people who may decrypt every machine's key.";
          };
          recipients.hosts = mkOption {
            type = types.attrsOf (types.listOf types.str);
            default = { };
            description = "Per machine: the age public keys that may decrypt its key, instead of the default ones.";
          };
        };
        modules = mkOption {
          type = types.attrsOf types.raw;
          default = { };
          description = "This clan's own service modules (`module.input = \"self\"` in inventory.instances).";
        };
        templates = unsupported "templates" "";
      };
    };

  clan =
    {
      self ? null,
      nixpkgs ? (if self != null then self.inputs.nixpkgs or defaultNixpkgs else defaultNixpkgs),
      nixosSystem ? null,
      imports ? [ ],
      ...
    }@args:
    let
      lib =
        if nixpkgs != null && nixpkgs ? lib then
          nixpkgs.lib
        else
          throw "clan.lib.clan: no nixpkgs: give your flake a `nixpkgs` input, or pass `nixpkgs`";
      settings = removeAttrs args [
        "self"
        "nixpkgs"
        "nixosSystem"
        "imports"
      ];
      directory0 = settings.directory or self;
      inventoryJson =
        if directory0 != null && pathExists "${toString directory0}/inventory.json" then
          [
            {
              _file = "${toString directory0}/inventory.json";
              inventory = lib.importJSON "${toString directory0}/inventory.json";
            }
          ]
        else
          [ ];
      eval = lib.evalModules {
        class = "clan";
        specialArgs = { inherit self; };
        modules = [ interface ] ++ inventoryJson ++ imports ++ [ settings ];
      };
      config = eval.config;
      # What the interface declares only to refuse (see `unsupported`): any that is set.
      refusals = filter (key: lib.attrByPath (lib.splitString "." key) null config != null) [
        "inventory.services"
        "inventory.modules"
        "pkgsForSystem"
        "templates"
      ];
      checked =
        if refusals == [ ] then
          true
        else
          throw "clan: `${builtins.head refusals}` is set, but this clan tool does not support it (it would be ignored, and what it configures would be missing on the machines): remove it, or configure the same in the machines' NixOS modules";
      buildSystem =
        if nixosSystem != null then
          nixosSystem
        else if nixpkgs ? lib.nixosSystem then
          nixpkgs.lib.nixosSystem
        else
          throw "clan.lib.clan: this nixpkgs has no lib.nixosSystem (only nixpkgs' lib?): pass a full nixpkgs, or `nixosSystem = clan-core.lib.minimalSystem` for plain-derivation systems";
      directory = config.directory;
      dir = if directory == null then null else toString directory;
      dirMachines =
        if dir != null && pathExists "${dir}/machines" then
          attrNames (lib.filterAttrs (_: type: type == "directory") (readDir "${dir}/machines"))
        else
          [ ];
      names = lib.unique (
        attrNames config.inventory.machines ++ attrNames config.machines ++ dirMachines
      );
      machineFiles =
        name:
        if dir == null then
          [ ]
        else
          filter pathExists [
            "${dir}/machines/${name}/configuration.nix"
            "${dir}/machines/${name}/hardware-configuration.nix"
          ];
      services = import ./services.nix {
        inherit lib config self ownModules;
        machineNames = names;
      };
      modulesFor =
        name:
        [
          clanCoreModule
          {
            networking.hostName = lib.mkDefault name;
            networking.domain = lib.mkDefault config.meta.domain;
            clan.core.settings.machine.name = name;
            clan.core.settings.directory = directory;
            clan.core.vars.settings.secretStore = lib.mkDefault config.vars.settings.secretStore;
          }
        ]
        ++ machineFiles name
        ++ lib.optional (config.machines ? ${name}) config.machines.${name}
        ++ services.importsOf name;
      nixosConfigurations = lib.genAttrs names (
        name:
        buildSystem {
          inherit lib;
          modules = modulesFor name;
          specialArgs = {
            inherit self;
          }
          // config.specialArgs;
        }
      );
      # Every output goes through the refusals first. A darwin machine (clan-core deploys it
      # with nix-darwin) is no NixOS configuration; the CLI still sees it, to say why it is
      # left out.
      isDarwin = name: (config.inventory.machines.${name}.machineClass or "nixos") == "darwin";
      outputs = {
        nixosConfigurations = builtins.seq checked (
          lib.filterAttrs (name: _: !isDarwin name) nixosConfigurations
        );
        clanInternals = {
          # Each machine with all its tags (its own, inventory.tags, all, nixos), as
          # clan-core's computed tags give them.
          inventory = builtins.seq checked (
            config.inventory
            // {
              machines = lib.genAttrs names (
                name: (config.inventory.machines.${name} or { }) // { tags = services.tagsOf name; }
              );
            }
          );
          # clan-core's shape, `machines.<system>.<name>`, which clan-core's CLI selects
          # (its library extends each configuration with that system's nixpkgs, for the
          # generators; here the configuration is the same for every system).
          machines = lib.genAttrs [
            "x86_64-linux"
            "aarch64-linux"
            "riscv64-linux"
            "aarch64-darwin"
          ] (_: builtins.seq checked nixosConfigurations);
          meta = config.meta;
          vars.settings = config.vars.settings;
          # Each instance's role members.
          services = builtins.seq checked services.members;
        };
        # clan-core's template inherits it from the clan's config.
        nixosModules = { };
      };
    in
    outputs // { config = outputs; };
in
{
  inherit clan clanCoreModule minimalSystem;
}
