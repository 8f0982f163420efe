# A NixOS-sized machine for the evaluation benchmark, on nixpkgs' real module system:
# MODULES modules declaring OPTIONS options each (1,500 × 12 = 18,000 by default, about
# what a NixOS configuration has), some set with mkDefault, all read by the toplevel so that
# evaluating it forces every value.
{ name, modules ? 1500, options ? 12 }:
{ lib, config, ... }:
let
  optionNames = map (j: "o${toString j}") (lib.range 1 options);
in
{
  imports = lib.genList (
    i:
    { lib, ... }:
    {
      options.synthetic."m${toString i}" = lib.genAttrs optionNames (
        o:
        lib.mkOption {
          type = lib.types.str;
          default = "${name}-${toString i}-${o}";
        }
      );
      config.synthetic."m${toString i}".o1 = lib.mkDefault "set-${toString i}";
    }
  ) modules;
  nixpkgs.hostPlatform = "x86_64-linux";
  system.build.toplevel = derivation {
    name = "nixos-system-${name}";
    system = "x86_64-linux";
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    configHash = builtins.hashString "sha256" (builtins.toJSON config.synthetic);
    # A system the target accepts: nixos-version and a switch-to-configuration that does
    # nothing.
    args = [ "-c" "mkdir -p $out/bin; echo $configHash > $out/hash; echo synthetic > $out/nixos-version; printf '#!/bin/sh\\nexit 0\\n' > $out/bin/switch-to-configuration; chmod +x $out/bin/switch-to-configuration" ];
  };
}
