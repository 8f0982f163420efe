# Clan vars: what a machine declares (`clan.core.vars.generators`), where its files are at
# run time, and the activation that decrypts the secrets on the target, for both of
# clan-core's stores (`clan.core.vars.settings.secretStore`).
#
# The workstation (`clan vars generate`) runs the generators and stores public files in the
# repository at vars/per-machine/<machine>/<generator>/<file>/value (vars/shared/… for
# shared generators).
#
# sops (the default): secrets at vars/<scope>/<generator>/<file>/secret, sops-encrypted to
# the keys their machines/ and users/ links name (clan-core's layout). Each is copied alone
# into the store and carried by the system; the deploy uploads only the machine's key, to
# `clan.core.vars.sops.secretUploadDirectory`/key.txt. Activation decrypts them with sops
# (`clan.core.vars.sops.command`) to clan-core's paths: /run/secrets-for-users/vars/<scope>/
# <generator>/<file> (neededFor "users", before users are created), /run/secrets/vars/…
# ("services", after), <secretUploadDirectory>/activation/… ("activation").
#
# age: secrets encrypted to the machine's age key at
# secrets/clan-vars/<scope>/<generator>/<file>/<file>.age (clan-core's age layout). The deploy
# (and `clan vars upload`) sends the machine's private key and its encrypted secrets straight
# to the target, into `clan.core.vars.age.secretLocation`. Activation decrypts them with age:
# "users" into /run/secrets-for-users/<generator>/<file>, "services" into /run/secrets/…,
# "activation" into <secretLocation>/activation/….
#
# "partitioning" files are for installers and never deployed.
{
  lib,
  config,
  options,
  ...
}:
let
  inherit (lib) mkOption types;
  cfg = config.clan.core.vars;
  machine = config.clan.core.settings.machine.name;
  directory = config.clan.core.settings.directory;
  loc = cfg.age.secretLocation;
  sops = cfg.settings.secretStore == "sops";
  upload = cfg.sops.secretUploadDirectory;

  # Where each phase's secrets are decrypted to: the age store's own directories, or
  # sops-nix's (as clan-core's sops module points them, under vars/).
  runDirs =
    if sops then
      {
        users = "/run/secrets-for-users/vars";
        services = "/run/secrets/vars";
        activation = "${upload}/activation";
        partitioning = "/run/partitioning-secrets";
      }
    else
      {
        users = "/run/secrets-for-users";
        services = "/run/secrets";
        activation = "${loc}/activation";
        partitioning = "/run/partitioning-secrets";
      };

  # Where a generator's files live in the repository, relative to its root.
  scope = gen: if gen.share then "shared" else "per-machine/${machine}";
  # A generator's folder below a phase's directory: clan-core's `rel_dir` in the sops
  # store, the generator's name in the age store.
  runDir = gen: if sops then "${scope gen}/${gen.name}" else gen.name;
  # A sops secret in the repository, copied alone into the store (the system carries it to
  # the target); not generated yet: an error naming the command, as for a public value.
  sopsFile =
    gen: name:
    let
      file = "${toString directory}/vars/${scope gen}/${gen.name}/${name}/secret";
    in
    if directory != null && builtins.pathExists file then
      builtins.path {
        path = file;
        name = lib.strings.sanitizeDerivationName "${scope gen}_${gen.name}_${name}";
      }
    else
      throw "clan vars: ${gen.name}/${name} of machine ${machine} is not generated yet: run `clan vars generate ${machine}`";

  fileModule =
    gen:
    { name, config, ... }:
    let
      file = config;
      valueFile = "${toString directory}/vars/${scope gen}/${gen.name}/${name}/value";
      notGenerated = "clan vars: ${gen.name}/${name} of machine ${machine} is not generated yet: run `clan vars generate ${machine}`";
    in
    {
      options = {
        name = mkOption {
          type = types.str;
          default = name;
          readOnly = true;
        };
        secret = mkOption {
          type = types.bool;
          default = true;
          description = "Encrypted in the repository and only decrypted on the target (true), or a public value in the repository and the store (false).";
        };
        deploy = mkOption {
          type = types.bool;
          default = true;
          description = "Upload this secret to the machine.";
        };
        owner = mkOption {
          type = types.str;
          default = "root";
        };
        group = mkOption {
          type = types.str;
          default = "root";
        };
        mode = mkOption {
          type = types.strMatching "0?[0-7]{3}";
          default = "0400";
        };
        neededFor = mkOption {
          type = types.enum [
            "partitioning"
            "activation"
            "users"
            "services"
          ];
          default = "services";
          description = "When the secret must exist on the target: users are created after activation-time and users secrets, services after all.";
        };
        restartUnits = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "systemd units restarted after an activation that changed this secret (NixOS's activation restart list).";
        };
        path = mkOption {
          type = types.str;
          readOnly = true;
          description = "Where the file is on the machine at run time.";
          default =
            if file.secret then
              "${runDirs.${file.neededFor}}/${runDir gen}/${name}"
            else
              builtins.toFile name file.value;
        };
        value = mkOption {
          type = types.str;
          readOnly = true;
          description = "The content of a public file, at evaluation.";
          default =
            if file.secret then
              throw "clan vars: ${gen.name}/${name} is secret: it has no value at evaluation (use its `path`)"
            else if directory != null && builtins.pathExists valueFile then
              builtins.readFile valueFile
            else
              throw notGenerated;
        };
      };
    };

  promptModule =
    { name, ... }:
    {
      options = {
        name = mkOption {
          type = types.str;
          default = name;
          readOnly = true;
        };
        description = mkOption {
          type = types.str;
          default = name;
        };
        type = mkOption {
          type = types.enum [
            "hidden"
            "line"
            "multiline"
            "multiline-hidden"
          ];
          default = "line";
        };
        persist = mkOption {
          type = types.bool;
          default = false;
          description = "Store the answer as a (secret) file of the same name.";
        };
      };
    };

  generatorModule =
    { name, config, ... }:
    {
      options = {
        name = mkOption {
          type = types.str;
          default = name;
          readOnly = true;
        };
        share = mkOption {
          type = types.bool;
          default = false;
          description = "One value for every machine that declares this generator with share = true.";
        };
        dependencies = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "Generators whose files this one reads in $in/<generator>/<file>.";
        };
        runtimeInputs = mkOption {
          type = types.listOf types.package;
          default = [ ];
          description = "Packages on the script's PATH (their bin/), built on the workstation.";
        };
        script = mkOption {
          type = types.either types.str types.path;
          default = "";
          description = "Shell script that writes each file to $out/<file>; answers are in $prompts/<prompt>.";
        };
        prompts = mkOption {
          type = types.attrsOf (types.submodule promptModule);
          default = { };
        };
        files = mkOption {
          type = types.attrsOf (types.submodule (fileModule config));
          default = { };
        };
        validation = mkOption {
          description = "Values that, when they change, make the generator run again (and those that depend on it).";
          default = null;
          type =
            let
              leaf = types.oneOf [ types.bool types.int types.str ];
            in
            types.nullOr (types.oneOf [ leaf (types.attrsOf (types.oneOf [ leaf (types.attrsOf leaf) ])) ]);
        };
        validationHash = mkOption {
          type = types.nullOr types.str;
          readOnly = true;
          description = "sha256 of the validation's JSON, as clan-core computes it; stored beside the generator's values.";
          default =
            if config.validation == null then null else builtins.hashString "sha256" (builtins.toJSON config.validation);
        };
      };
      # A persisted prompt is a file of the same name.
      config.files = lib.mapAttrs (_: _: { }) (lib.filterAttrs (_: p: p.persist) config.prompts);
    };

  # The files activation decrypts, per phase.
  deployed =
    phase:
    lib.concatMap (
      gen:
      map (file: { inherit gen file; }) (
        lib.filter (f: f.secret && f.deploy && f.neededFor == phase) (lib.attrValues gen.files)
      )
    ) (lib.attrValues cfg.generators);

  q = lib.escapeShellArg;

  phaseScript =
    phase:
    let
      files = deployed phase;
      dir = runDirs.${phase};
    in
    lib.optionalString (files != [ ]) (
      ''
        clan_vars_begin ${q dir}
      ''
      + lib.concatMapStrings (
        { gen, file }:
        let
          owner = if phase == "users" then "root" else file.owner;
          group = if phase == "users" then "root" else file.group;
        in
        ''
          clan_vars_file ${q dir} ${q (runDir gen)} ${q file.name} ${
            q (if sops then "${sopsFile gen file.name}" else "${scope gen}/${gen.name}/${file.name}/${file.name}.age")
          } ${q owner} ${q group} ${q file.mode}${lib.concatMapStrings (u: " " + q u) file.restartUnits}
        ''
      ) files
      + ''
        clan_vars_commit ${q dir}
      ''
    );

  # `clan_vars_decrypt SOURCE OUT`: one secret, decrypted with the machine's key.
  decrypt =
    if sops then
      ''
        # A sops file (binary store) from the system closure, opened by sops with the
        # machine's key.
        clan_vars_decrypt() {
          SOPS_AGE_KEY_FILE="$key" "$sops" --decrypt --input-type binary --output-type binary "$1" > "$2"
        }
      ''
    else
      ''
        clan_vars_decrypt() {
          "$age" -d -i "$key" -o "$2" "$1"
        }
      '';

  header = ''
    set -eu
    loc=${q (if sops then upload else loc)}
    ${if sops then "sops=${q cfg.sops.command}" else "age=${q cfg.age.command}"}
    machine=${q machine}
    key="$loc/key.txt"
    if [ ! -r "$key" ]; then
      echo "clan vars: this machine's key is not at $key: run 'clan vars upload $machine' (or deploy without --no-secrets)" >&2
      exit 1
    fi
    # Each phase's directory DIR is a link to DIR.d/v.N, swapped with one rename: readers
    # see the old files or the new ones, never none.
    clan_vars_begin() {
      mkdir -p "$1.d"; chmod 0751 "$1.d"
      rm -rf "$1.d/new"; mkdir "$1.d/new"; chmod 0751 "$1.d/new"
    }
    clan_vars_file() {
      mkdir -p "$1.d/new/$2"; chmod 0751 "$1.d/new/$2"
      case "$4" in
        /*) src="$4" ;;
        *)
          # A target whose secrets were uploaded in the earlier layout (<gen>/<file>.age, before
          # `clan vars fix` moved them; a deploy with --no-secrets leaves them) still activates.
          src="$loc/$4"
          if [ ! -e "$src" ] && [ -e "$loc/''${4%/*}.age" ]; then src="$loc/''${4%/*}.age"; fi
          ;;
      esac
      if ! (umask 077; clan_vars_decrypt "$src" "$1.d/new/$2/$3"); then
        echo "clan vars: cannot decrypt $src with this machine's key: run 'clan vars upload $machine'" >&2
        exit 1
      fi
      if ! chown "$5:$6" "$1.d/new/$2/$3"; then
        echo "clan vars: cannot give $2/$3 to $5:$6 (does that user and group exist?)" >&2
        exit 1
      fi
      chmod "$7" "$1.d/new/$2/$3"
      # restartUnits: a secret that is new or changed restarts its units once the switch
      # is done (NixOS's switch-to-configuration reads this list).
      # (sha256sum: coreutils is on the activation's PATH, cmp is not.)
      if [ "$#" -gt 7 ] && [ "$(sha256sum < "$1.d/new/$2/$3")" != "$(sha256sum < "$1/$2/$3" 2>/dev/null || true)" ]; then
        shift 7
        mkdir -p /run/nixos
        for unit in "$@"; do echo "$unit" >> /run/nixos/activation-restart-list; done
      fi
    }
    clan_vars_commit() {
      v="v.$(date +%s).$$"
      mv "$1.d/new" "$1.d/$v"
      if [ -d "$1" ] && [ ! -L "$1" ]; then rm -rf "$1"; fi
      ln -s "''${1##*/}.d/$v" "$1.link.$$"
      mv -T "$1.link.$$" "$1"
      for old in "$1.d"/*; do
        if [ "$old" != "$1.d/$v" ]; then rm -rf "$old"; fi
      done
    }
  '';

  script = phases: lib.optionalString (lib.any (p: deployed p != [ ]) phases) (
    header + decrypt + lib.concatMapStrings phaseScript phases
  );

  # A NixOS activation snippet: every snippet runs in one shared shell, so the decryption
  # runs in a subshell of its own (its `set -eu` and `exit` stay there) and a failure is
  # reported the NixOS way (_localstatus) without aborting the snippets after it.
  snippet = phases:
    let body = script phases; in
    lib.optionalString (body != "") ''
      if ! (
      ${body}
      ); then
        echo "clan vars: decrypting this machine's secrets failed (see above)" >&2
        _localstatus=1
      fi
    '';

  usersFilesNotRoot = lib.filter (x: x.file.owner != "root" || x.file.group != "root") (
    deployed "users"
  );
in
{
  options.clan.core.settings = {
    machine.name = mkOption {
      type = types.str;
      description = "The machine's name in the clan (set by lib.clan).";
    };
    directory = mkOption {
      type = types.nullOr types.raw;
      default = null;
      description = "The clan's directory (set by lib.clan): vars are read from it.";
    };
  };

  options.clan.core.sops.defaultGroups = mkOption {
    type = types.listOf types.str;
    default = [ ];
    description = "sops groups (sops/groups/<g>) every sops secret of this machine is also encrypted to, as in clan-core.";
  };

  options.clan.core.vars = {
    generators = mkOption {
      type = types.attrsOf (types.submodule generatorModule);
      default = { };
      description = "What `clan vars generate` makes for this machine.";
    };
    settings.secretStore = mkOption {
      type = types.enum [
        "age"
        "sops"
      ];
      default = "sops";
      description = "The store that keeps this machine's secrets (set by lib.clan from the clan's vars.settings.secretStore).";
    };
    settings.secretModule = mkOption {
      type = types.nullOr types.str;
      readOnly = true;
      default =
        if sops then "clan_lib.vars.secret_modules.sops" else null;
      description = "The sops store's name as clan-core's CLI reads it (its layout is clan-core's); null for this tool's age store.";
    };
    sops.secretUploadDirectory = mkOption {
      type = types.str;
      default = "/var/lib/sops-nix";
      description = "Where the deploy puts the machine's age key (key.txt) for the sops store; activation-phase secrets are decrypted below it, in activation/.";
    };
    sops.command = mkOption {
      type = types.str;
      default =
        if config._module.args ? pkgs then "${config._module.args.pkgs.sops}/bin/sops" else "sops";
      defaultText = "\${pkgs.sops}/bin/sops, or `sops` from PATH without nixpkgs";
      description = "The sops program that decrypts the sops store's secrets on the target (`sops --decrypt --input-type binary --output-type binary FILE`, the key in SOPS_AGE_KEY_FILE).";
    };
    age.secretLocation = mkOption {
      type = types.str;
      default = "/etc/secret-vars";
      description = "Where uploads put the machine's key and encrypted secrets on the target (root-only).";
    };
    age.command = mkOption {
      type = types.str;
      default =
        if config._module.args ? pkgs then "${config._module.args.pkgs.age}/bin/age" else "age";
      defaultText = "\${pkgs.age}/bin/age, or `age` from PATH without nixpkgs";
      description = "The age program that decrypts on the target.";
    };
    activationScript = mkOption {
      type = types.str;
      readOnly = true;
      description = "The whole decryption (users, activation, services phases), for systems without system.activationScripts; NixOS runs the phases as activation scripts.";
      default =
        if usersFilesNotRoot != [ ] then
          throw "clan vars: ${(builtins.head usersFilesNotRoot).gen.name}/${(builtins.head usersFilesNotRoot).file.name} is neededFor = \"users\": it is decrypted before users exist, so its owner and group must be root"
        else
          script [
            "users"
            "activation"
            "services"
          ];
    };
  };

  config = lib.optionalAttrs (options ? system.activationScripts) {
    system.activationScripts = lib.mkIf (cfg.activationScript != "") {
      clan-vars-for-users = {
        deps = [ "specialfs" ];
        text = snippet [
          "users"
          "activation"
        ];
      };
      users.deps = [ "clan-vars-for-users" ];
      clan-vars = {
        deps = [
          "users"
          "groups"
          "specialfs"
        ];
        text = snippet [ "services" ];
      };
    };
  };
}
