{
  description = "clan: deploy NixOS machines, building on a separate build host";

  # nixpkgs is used for its lib (the module system) and, unless the user's flake brings its
  # own `nixpkgs` input (`lib.clan` takes `self.inputs.nixpkgs` first), for nixosSystem.
  # clan-core's template follows it as `clan-core/nixpkgs`.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      clanLib = import ./nix/lib.nix { defaultNixpkgs = nixpkgs; };
    in
    {
      lib = {
        inherit (clanLib) clan minimalSystem;
      };
      nixosModules.clanCore = clanLib.clanCoreModule;
    };
}
