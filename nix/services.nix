# Clan services: clan-core's `inventory.instances`, evaluated on the module system.
#
# An instance names a service module (`module.name`, by default the instance's name) and
# where it comes from (`module.input`: null, this repository's own `clan.modules`; "self",
# the clan's own `modules`; anything else, `inputs.<input>.clan.modules`), and gives roles
# to machines: `roles.<role>.machines.<m>.settings`, `roles.<role>.tags` (a list, or
# `<tag>.settings`), `roles.<role>.settings`, `roles.<role>.extraModules`.
#
# A service module (class "clan.service") has `manifest.name`, `roles.<role>.{description,
# interface, perInstance}` and `perMachine`. A role's members are its machines plus every
# machine carrying one of its tags (the machine's own tags, `inventory.tags`, and the
# computed `all` and `nixos`). Each member's settings are the role's `interface` evaluated
# with the role's settings, the machine's and its tags' (merged by the module system, as in
# clan-core). `perInstance { instanceName, machine, roles, settings, extendSettings, meta,
# … }` and `perMachine { machine, instances, meta, … }` are modules returning `nixosModule`,
# which is imported into the member machine. Exports (`exports`, `mkExports`) are refused
# by name.
{
  lib,
  config,
  self,
  ownModules,
  machineNames,
}:
let
  inherit (lib)
    attrNames
    attrValues
    concatMap
    elem
    filter
    filterAttrs
    genAttrs
    mapAttrs
    mkOption
    types
    unique
    ;
  inventory = config.inventory;

  # The tags of machine `m`: its own, the `inventory.tags` that list it, `all`, `nixos`.
  tagsOf =
    m:
    unique (
      (inventory.machines.${m}.tags or [ ])
      ++ attrNames (filterAttrs (_: members: elem m members) inventory.tags)
      ++ [
        "all"
        "nixos"
      ]
    );

  exportsRefused =
    what: throw "clan: ${what}: clan service exports are not supported by this clan tool";

  # What a service module declares.
  serviceInterface = {
    options = {
      manifest = mkOption {
        type = types.submodule {
          freeformType = types.attrsOf types.raw;
          options.name = mkOption {
            type = types.str;
            description = "The service's name.";
          };
        };
      };
      roles = mkOption {
        default = { };
        type = types.attrsOf (
          types.submodule {
            options = {
              description = mkOption {
                type = types.nullOr types.str;
                default = null;
              };
              interface = mkOption {
                type = types.deferredModule;
                default = { };
                description = "The options of the role's settings.";
              };
              perInstance = mkOption {
                type = types.deferredModule;
                default = { };
                description = "A module of { instanceName, machine, roles, settings, extendSettings, meta, … } giving nixosModule.";
              };
            };
          }
        );
      };
      perMachine = mkOption {
        type = types.deferredModule;
        default = { };
        description = "A module of { machine, instances, meta, … } giving nixosModule.";
      };
      exports = mkOption {
        type = types.raw;
        default = { };
      };
    };
  };

  # What perInstance and perMachine give.
  resultInterface = {
    options = {
      nixosModule = mkOption {
        type = types.deferredModule;
        default = { };
      };
      darwinModule = mkOption {
        type = types.deferredModule;
        default = { };
      };
      exports = mkOption {
        type = types.lazyAttrsOf types.raw;
        default = { };
      };
    };
  };

  # Where instance `i`'s module comes from, in words, and the modules there.
  source =
    i: inst:
    let
      input = inst.module.input;
    in
    if input == null then
      {
        where = "this clan tool's own clan.modules";
        modules = ownModules;
      }
    else if input == "self" then
      {
        where = "this clan's `modules`";
        modules = config.modules;
      }
    else if self == null || !(self.inputs or { } ? ${input}) then
      throw "clan: inventory.instances.${i}.module.input = \"${input}\": the flake has no input ${input}"
    else
      {
        where = "inputs.${input}.clan.modules";
        modules =
          self.inputs.${input}.clan.modules
            or (throw "clan: inventory.instances.${i}.module.input = \"${input}\": inputs.${input} has no clan.modules");
      };

  resolve =
    i: inst:
    let
      from = source i inst;
      name = inst.module.name;
    in
    from.modules.${name}
      or (throw "clan: inventory.instances.${i}: no service module \"${name}\" in ${from.where} (it has: ${lib.concatStringsSep ", " (attrNames from.modules)})");

  evalService =
    i: inst:
    (lib.evalModules {
      class = "clan.service";
      specialArgs = {
        meta = config.meta;
        directory = config.directory;
      };
      modules = [
        serviceInterface
        (resolve i inst)
        { _file = "inventory.instances.${i}"; }
      ];
    }).config;

  # One instance: its service, each role's members and settings, and what it imports into
  # each machine.
  instance =
    i: inst:
    let
      service = evalService i inst;
      unknownRoles = filter (r: !(service.roles ? ${r})) (attrNames inst.roles);
      members =
        r:
        let
          role = inst.roles.${r};
          named = attrNames role.machines;
          unknown = filter (m: !(elem m machineNames)) named;
          tagged = filter (m: lib.any (t: elem t (tagsOf m)) (attrNames role.tags)) machineNames;
        in
        if unknown != [ ] then
          throw "clan: inventory.instances.${i}.roles.${r}.machines.${builtins.head unknown}: no such machine in this clan"
        else
          lib.sort lib.lessThan (unique (named ++ tagged));
      settingsWith =
        r: m: extra:
        (lib.evalModules {
          specialArgs.meta = config.meta;
          modules = [
            service.roles.${r}.interface
            inst.roles.${r}.settings
          ]
          ++ lib.optional (inst.roles.${r}.machines ? ${m}) inst.roles.${r}.machines.${m}.settings
          ++ map (t: inst.roles.${r}.tags.${t}.settings) (
            filter (t: elem t (tagsOf m)) (attrNames inst.roles.${r}.tags)
          )
          ++ extra;
        }).config;
      roleNames = attrNames inst.roles;
      rolesOf = m: filter (r: elem m (members r)) roleNames;
      rolesArg = mapAttrs (r: _: {
        machines = genAttrs (members r) (m: {
          settings = settingsWith r m [ ];
        });
        settings =
          (lib.evalModules {
            specialArgs.meta = config.meta;
            modules = [
              service.roles.${r}.interface
              inst.roles.${r}.settings
            ];
          }).config;
      }) inst.roles;
      perInstance =
        r: m:
        (lib.evalModules {
          specialArgs = {
            instanceName = i;
            machine = {
              name = m;
              roles = rolesOf m;
            };
            roles = rolesArg;
            settings = settingsWith r m [ ];
            extendSettings = extra: settingsWith r m [ extra ];
            meta = config.meta;
            exports = exportsRefused "inventory.instances.${i} reads exports";
            mkExports = _: exportsRefused "inventory.instances.${i} makes exports";
          };
          modules = [
            resultInterface
            service.roles.${r}.perInstance
          ];
        }).config;
    in
    if unknownRoles != [ ] then
      throw "clan: inventory.instances.${i}.roles.${builtins.head unknownRoles}: service ${service.manifest.name} has no such role (it has: ${lib.concatStringsSep ", " (attrNames service.roles)})"
    else
      {
        inherit service members rolesOf;
        key = "${if inst.module.input == null then "<clan>" else inst.module.input}-${inst.module.name}";
        roles = rolesArg;
        # The module is resolved (and its errors shown) whether or not `m` takes part.
        imports =
          m:
          builtins.seq service.manifest.name concatMap (
            r:
            [ (perInstance r m).nixosModule ] ++ inst.roles.${r}.extraModules
          ) (rolesOf m);
      };

  instances = mapAttrs instance inventory.instances;

  # perMachine, once per service module (by input and name) and machine that takes part in
  # any of its instances.
  groups = lib.groupBy (i: instances.${i}.key) (attrNames instances);
  perMachine =
    m:
    concatMap (
      key:
      let
        mine = filter (i: instances.${i}.rolesOf m != [ ]) groups.${key};
        first = instances.${builtins.head mine};
      in
      lib.optional (mine != [ ]) (
        (lib.evalModules {
          specialArgs = {
            machine = {
              name = m;
              roles = unique (concatMap (i: instances.${i}.rolesOf m) mine);
            };
            instances = genAttrs mine (i: {
              inherit (instances.${i}) roles;
            });
            meta = config.meta;
            settings = throw "clan: perMachine has no `settings` (they are per instance: read instances.<name>.roles)";
            exports = exportsRefused "service ${key} reads exports";
            mkExports = _: exportsRefused "service ${key} makes exports";
          };
          modules = [
            resultInterface
            first.service.perMachine
          ];
        }).config.nixosModule
      )
    ) (attrNames groups);
in
{
  inherit tagsOf;
  # The NixOS modules the instances give machine `m`.
  importsOf = m: concatMap (i: instances.${i}.imports m) (attrNames instances) ++ perMachine m;
  # Each instance's role members, for people and tests.
  members = mapAttrs (_: inst: genAttrs (attrNames inst.roles) inst.members) instances;
}
