# The `users` clan service, written from clan-core's documented behaviour (its
# clanServices/users): one user per instance (`user`, by default the instance's name) whose
# password hash is a var (`user-password-<user>`: the password, prompted or made, kept
# encrypted in the repository and never deployed; its hash decrypted on the machine before
# users are created, `neededFor = "users"`), with `users.mutableUsers = false` on every
# machine that has such a user. Not here: identities and their exports.
{ lib, ... }:
let
  inherit (lib) mkOption types;
in
{
  _class = "clan.service";
  manifest.name = "clan/users";
  manifest.description = "Users whose passwords are vars";

  roles.default = {
    description = "Has the user.";
    interface = {
      options = {
        user = mkOption {
          type = types.str;
          description = "The user's name (default: the instance's name).";
        };
        prompt = mkOption {
          type = types.bool;
          default = true;
          description = "Ask for the password when the var is generated (left empty: one is made).";
        };
        groups = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "The user's extra groups.";
        };
        share = mkOption {
          type = types.bool;
          default = false;
          description = "One password for every machine that has the user.";
        };
        openssh.authorizedKeys.keys = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        openssh.authorizedKeys.keyFiles = mkOption {
          type = types.listOf types.path;
          default = [ ];
        };
      };
    };
    perInstance =
      { extendSettings, instanceName, ... }:
      let
        settings = extendSettings { user = lib.mkOptionDefault instanceName; };
        generator = "user-password-${settings.user}";
      in
      {
        nixosModule =
          { config, lib, ... }:
          let
            pkgs = config._module.args.pkgs or null;
          in
          {
            users.users.${settings.user} = {
              isNormalUser = settings.user != "root";
              extraGroups = settings.groups;
              hashedPasswordFile = config.clan.core.vars.generators.${generator}.files.user-password-hash.path;
              openssh.authorizedKeys = {
                inherit (settings.openssh.authorizedKeys) keys keyFiles;
              };
            };
            clan.core.vars.generators.${generator} = {
              share = settings.share;
              files.user-password-hash.neededFor = "users";
              files.user-password.deploy = false;
              prompts = lib.optionalAttrs settings.prompt {
                user-password = {
                  type = "hidden";
                  persist = true;
                  description = "Password of user ${settings.user} (leave empty to have one made)";
                };
              };
              runtimeInputs = lib.optionals (pkgs != null) [
                pkgs.coreutils
                pkgs.mkpasswd
              ];
              # As clan-core: the prompted password, or a made one; its hash with mkpasswd
              # (or openssl where mkpasswd is missing), without a trailing newline.
              script = ''
                if [ -s "$prompts/user-password" ]; then
                  cat "$prompts/user-password" > "$out/user-password"
                else
                  head -c 18 /dev/urandom | base64 | tr -d '\n/+' > "$out/user-password"
                fi
                if command -v mkpasswd >/dev/null; then
                  mkpasswd -s < "$out/user-password" | tr -d '\n' > "$out/user-password-hash"
                else
                  openssl passwd -6 -stdin < "$out/user-password" | tr -d '\n' > "$out/user-password-hash"
                fi
              '';
            };
          };
      };
  };

  perMachine =
    { ... }:
    {
      nixosModule.users.mutableUsers = false;
    };
}
