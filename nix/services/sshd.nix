# The `sshd` clan service, written from clan-core's documented behaviour (its
# clanServices/sshd): the server role gives a machine a persistent ed25519 host key made
# once as a var (`openssh`: the private key a secret, decrypted on the machine; the public
# key a value in the repository), sshd with password logins off, root's authorized keys
# from `authorizedKeys`, and its own host key as a known host. Not yet here: the host
# certificate authority (`certificate.enable`, which clan-core turns on by default) and
# the RSA host key: setting them is refused by name.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  # `pkgs` where the system has nixpkgs (NixOS), else nothing: the generator then runs with
  # the workstation's programs (ssh-keygen).
  pkgsOf = config: config._module.args.pkgs or null;
  notYet =
    what:
    mkOption {
      type = types.bool;
      default = false;
      description = "Not supported by this clan tool yet (clan-core's ${what}); true is refused.";
    };
in
{
  _class = "clan.service";
  manifest.name = "clan/sshd";
  manifest.description = "A persistent host key, sshd, and root's authorized keys";

  roles.server = {
    description = "Runs sshd with a host key made once and kept as a var.";
    interface = {
      options = {
        authorizedKeys = mkOption {
          type = types.attrsOf types.str;
          default = { };
          description = "Public keys that may log in as root, by a name for people.";
        };
        generateRootKey = mkOption {
          type = types.bool;
          default = false;
          description = "Also make an ssh key for root (the `sshd-root-key` var), and authorize it.";
        };
        hostKeys.rsa.enable = notYet "RSA host key";
        certificate.enable = notYet "host certificate authority, on by default there";
        certificate.searchDomains = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
      };
    };
    perInstance =
      { settings, instanceName, ... }:
      if settings.hostKeys.rsa.enable || settings.certificate.enable then
        throw "clan: inventory.instances.${instanceName}.roles.server.settings.${
          if settings.certificate.enable then "certificate.enable (a host certificate authority)" else "hostKeys.rsa.enable"
        }: not supported by this clan tool yet"
      else
      {
        nixosModule =
          { config, lib, ... }:
          let
            pkgs = pkgsOf config;
            generators = config.clan.core.vars.generators;
            keygen = comment: name: ''ssh-keygen -t ed25519 -N "" -C "${comment}" -f "$out"/${name}'';
          in
          {
            clan.core.vars.generators.openssh = {
              files."ssh.id_ed25519" = { };
              files."ssh.id_ed25519.pub".secret = false;
              runtimeInputs = lib.optionals (pkgs != null) [
                pkgs.coreutils
                pkgs.openssh
              ];
              script = keygen "" "ssh.id_ed25519";
            };
            clan.core.vars.generators.sshd-root-key = lib.mkIf settings.generateRootKey {
              files.id_ed25519 = { };
              files."id_ed25519.pub".secret = false;
              runtimeInputs = lib.optionals (pkgs != null) [ pkgs.openssh ];
              script = keygen "root@${config.networking.hostName}" "id_ed25519";
            };
            services.openssh = {
              enable = true;
              settings.PasswordAuthentication = false;
              hostKeys = [
                {
                  path = generators.openssh.files."ssh.id_ed25519".path;
                  type = "ed25519";
                }
              ];
            };
            users.users.root.openssh.authorizedKeys.keys =
              builtins.attrValues settings.authorizedKeys
              ++ lib.optional settings.generateRootKey generators.sshd-root-key.files."id_ed25519.pub".value;
            programs.ssh.knownHosts.clan-sshd-self-ed25519 = {
              hostNames = [
                "localhost"
                config.networking.hostName
              ]
              ++ lib.optional (
                config.networking.domain != null
              ) "${config.networking.hostName}.${config.networking.domain}";
              publicKey = generators.openssh.files."ssh.id_ed25519.pub".value;
            };
          };
      };
  };

  roles.client = {
    description = "Trusts the servers' host certificates (which this clan tool does not make yet).";
    interface.options.certificate.searchDomains = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    perInstance = { ... }: { nixosModule = { }; };
  };
}
