# The clan Nix library.
#
# `clan { self; inventory; machines; nixpkgs; … }` turns a clan definition into flake outputs:
#   nixosConfigurations.<name>  one NixOS system per machine
#   clanInternals.inventory     the inventory as written (the CLI reads deploy.* from it)
#   clanInternals.machines      the same configurations, for the CLI's single evaluation
# `clanCoreModule` declares clan.core.networking.{targetHost,buildHost,forwardAgent}.
# `minimalSystem` is a small stand-in for nixpkgs.lib.nixosSystem (no nixpkgs needed): it
# evaluates modules with option defaults and recursive merging, which is enough for systems
# whose toplevel is a plain derivation (tests, demos).
let
  inherit (builtins)
    attrNames
    concatMap
    foldl'
    isAttrs
    isFunction
    isPath
    isString
    listToAttrs
    mapAttrs
    pathExists
    removeAttrs
    ;

  # Derivations and option declarations are leaves, never merged into.
  isMergeable = v: isAttrs v && (v.type or null) != "derivation" && !(v ? _type);
  recursiveUpdate =
    a: b:
    a
    // mapAttrs (
      n: v: if isMergeable v && isMergeable (a.${n} or null) then recursiveUpdate a.${n} v else v
    ) b;

  clanCoreModule =
    { lib, ... }:
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
      options.clan.core.networking = {
        targetHost = host "SSH address of this machine, `[user@]host[:port][?OPTION=VALUE&…]`; the inventory's deploy.targetHost wins over it.";
        buildHost = host "SSH address of the machine that builds this system; the inventory's deploy.buildHost and --build-host win over it. Unset: build on the target.";
        forwardAgent = lib.mkOption {
          type = lib.types.nullOr lib.types.bool;
          default = null;
          description = "Forward the workstation's SSH agent to the build host; the inventory's deploy.forwardAgent wins over it.";
        };
      };
    };

  miniLib = {
    mkOption = attrs: attrs // { _type = "option"; };
    mkDefault = v: v;
    mkForce = v: v;
    mkOverride = _: v: v;
    types =
      let
        type = name: { inherit name; };
      in
      {
        str = type "str";
        bool = type "bool";
        int = type "int";
        path = type "path";
        package = type "package";
        anything = type "anything";
        nullOr = _: type "nullOr";
        listOf = _: type "listOf";
        attrsOf = _: type "attrsOf";
        submodule = _: type "submodule";
      };
  };

  optionDefaults =
    opts: if (opts._type or null) == "option" then opts.default or null else mapAttrs (_: optionDefaults) opts;

  minimalSystem =
    {
      modules,
      specialArgs ? { },
      ...
    }:
    let
      args = {
        inherit config;
        lib = miniLib;
        options = { };
        pkgs = throw "clan.lib.minimalSystem has no nixpkgs: use nixpkgs.lib.nixosSystem for real systems";
      }
      // specialArgs;
      load =
        m:
        let
          v = if isPath m || isString m then import m else m;
        in
        if isFunction v then v args else v;
      expand =
        m:
        let
          v = load m;
        in
        [ v ] ++ concatMap expand (v.imports or [ ]);
      all = concatMap expand modules;
      configPart = v: if v ? config || v ? options then v.config or { } else removeAttrs v [ "imports" ];
      defaults = foldl' recursiveUpdate { } (map (v: optionDefaults (v.options or { })) all);
      config = foldl' recursiveUpdate defaults (map configPart all);
    in
    {
      inherit config;
      _type = "configuration";
      class = "nixos";
    };

  # Accept clan-core's argument names, so an existing clan flake needs few changes.
  clan =
    {
      self ? null,
      directory ? self,
      imports ? [ ],
      meta ? { },
      inventory ? { },
      machines ? { },
      specialArgs ? { },
      nixpkgs ? null,
      nixosSystem ? null,
      ...
    }:
    let
      importPart =
        i:
        let
          v = if isPath i || isString i then import i else i;
        in
        if isFunction v then v { } else v;
      definition = foldl' recursiveUpdate { inventory = { }; machines = { }; } (
        map importPart imports ++ [ { inherit meta inventory machines; } ]
      );
      buildSystem =
        if nixosSystem != null then
          nixosSystem
        else if nixpkgs != null then
          nixpkgs.lib.nixosSystem
        else
          throw "clan.lib.clan: pass `nixpkgs` (for nixpkgs.lib.nixosSystem) or `nixosSystem`";
      inventoryMachines = definition.inventory.machines or { };
      names = attrNames (inventoryMachines // definition.machines);
      machineFile =
        name:
        if directory == null then
          [ ]
        else
          let
            file = "${toString directory}/machines/${name}/configuration.nix";
          in
          if pathExists file then [ file ] else [ ];
      modulesFor =
        name:
        [
          clanCoreModule
          ({ lib, ... }: { networking.hostName = lib.mkDefault name; })
        ]
        ++ machineFile name
        ++ (if definition.machines ? ${name} then [ definition.machines.${name} ] else [ ]);
      nixosConfigurations = listToAttrs (
        map (name: {
          inherit name;
          value = buildSystem {
            modules = modulesFor name;
            specialArgs = specialArgs;
          };
        }) names
      );
      clanInternals = {
        inventory = definition.inventory;
        machines = nixosConfigurations;
        meta = definition.meta or { };
      };
    in
    {
      config = { inherit nixosConfigurations clanInternals; };
      inherit nixosConfigurations clanInternals;
    };
in
{
  inherit clan clanCoreModule minimalSystem;
}
