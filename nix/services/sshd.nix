# The `sshd` clan service, written from clan-core's documented behaviour (its
# clanServices/sshd). The server role gives a machine a persistent ed25519 host key made
# once as a var (`openssh`: the private key a secret, decrypted on the machine; the public
# key a value in the repository), sshd with password logins off, root's authorized keys
# from `authorizedKeys`, and its own host key as a known host. With `certificate.enable`
# (on by default, as in clan-core) the clan has one ssh certificate authority (the shared
# var `openssh-ca`, its private key never deployed), each server's host key is signed for
# `<machine>.<domain>` of the clan's domain and the search domains (`openssh-cert`, made
# again when those names change), and servers and clients trust host certificates the
# authority signed for `*.<domain>`. Not yet here: the RSA host key (refused by name).
{ lib, ... }:
let
  inherit (lib) mkOption types;
  # `pkgs` where the system has nixpkgs (NixOS), else nothing: the generators then run
  # with the workstation's programs (ssh-keygen).
  pkgsOf = config: config._module.args.pkgs or null;
  keygen = comment: name: ''ssh-keygen -t ed25519 -N "" -C "${comment}" -f "$out"/${name}'';
  searchDomains = mkOption {
    type = types.listOf types.str;
    default = [ ];
    description = "More domains the host certificates are for (and trusted under).";
  };

  # The clan's certificate authority: one key pair for every machine (shared), the private
  # half kept in the repository only.
  caGenerator = pkgs: {
    share = true;
    files.id_ed25519.deploy = false;
    files."id_ed25519.pub".secret = false;
    runtimeInputs = lib.optionals (pkgs != null) [ pkgs.openssh ];
    script = keygen "" "id_ed25519";
  };

  # The domains certificates are for: the machine's domain, then `extra`.
  domainsOf = config: extra: lib.unique (lib.optional (config.networking.domain != null) config.networking.domain ++ extra);

  # Trust host certificates the authority signed, under each domain.
  trustCa = config: domains: {
    programs.ssh.knownHosts.ssh-ca = {
      certAuthority = true;
      extraHostNames = map (d: "*.${d}") domains;
      publicKey = config.clan.core.vars.generators.openssh-ca.files."id_ed25519.pub".value;
    };
  };

  # Every server's settings of an instance (`roles` as perInstance gets it).
  servers = roles: lib.attrValues (roles.server.machines or { });
  anyCertificate = roles: lib.any (m: m.settings.certificate.enable) (servers roles);
  serversSearchDomains = roles: lib.concatMap (m: m.settings.certificate.searchDomains) (servers roles);
in
{
  _class = "clan.service";
  manifest.name = "clan/sshd";
  manifest.description = "A persistent host key, sshd, root's authorized keys, and host certificates";

  roles.server = {
    description = "Runs sshd with a host key made once and kept as a var, certified by the clan's authority.";
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
        hostKeys.rsa.enable = mkOption {
          type = types.bool;
          default = false;
          description = "Not supported by this clan tool yet (clan-core's RSA host key); true is refused.";
        };
        certificate.enable = mkOption {
          type = types.bool;
          default = true;
          description = "Sign the host key with the clan's certificate authority.";
        };
        certificate.searchDomains = searchDomains;
      };
    };
    perInstance =
      {
        settings,
        instanceName,
        machine,
        roles,
        ...
      }:
      if settings.hostKeys.rsa.enable then
        throw "clan: inventory.instances.${instanceName}.roles.server.settings.hostKeys.rsa.enable: not supported by this clan tool yet"
      else
        {
          nixosModule =
            { config, lib, ... }:
            let
              pkgs = pkgsOf config;
              generators = config.clan.core.vars.generators;
              domains = domainsOf config (settings.certificate.searchDomains ++ serversSearchDomains roles);
              certified = settings.certificate.enable && domains != [ ];
              names = map (d: "${machine.name}.${d}") domains;
            in
            lib.mkMerge [
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
              }
              (lib.mkIf certified {
                clan.core.vars.generators.openssh-ca = caGenerator pkgs;
                # The host key signed for the machine's names; made again when they change.
                clan.core.vars.generators.openssh-cert = {
                  files."ssh.id_ed25519-cert.pub".secret = false;
                  dependencies = [
                    "openssh"
                    "openssh-ca"
                  ];
                  validation = {
                    name = machine.name;
                    domains = lib.concatStringsSep "," domains;
                  };
                  runtimeInputs = lib.optionals (pkgs != null) [ pkgs.openssh ];
                  script = ''
                    cd "$(mktemp -d)"
                    cp "$in/openssh-ca/id_ed25519" ca; chmod 600 ca
                    cp "$in/openssh/ssh.id_ed25519.pub" host.pub
                    ssh-keygen -q -s ca -I ${machine.name} -h -n ${lib.concatStringsSep "," names} host.pub
                    mv host-cert.pub "$out/ssh.id_ed25519-cert.pub"
                  '';
                };
                services.openssh.settings.HostCertificate =
                  generators.openssh-cert.files."ssh.id_ed25519-cert.pub".path;
              })
              (lib.mkIf certified (trustCa config domains))
            ];
        };
  };

  roles.client = {
    description = "Trusts host certificates the clan's authority signed.";
    interface.options.certificate.searchDomains = searchDomains;
    perInstance =
      { settings, roles, ... }:
      {
        nixosModule =
          { config, lib, ... }:
          let
            domains = domainsOf config (settings.certificate.searchDomains ++ serversSearchDomains roles);
          in
          lib.mkIf (anyCertificate roles && domains != [ ]) (
            {
              clan.core.vars.generators.openssh-ca = caGenerator (pkgsOf config);
            }
            // trustCa config domains
          );
      };
  };
}
