{
  description = "clan: deploy NixOS machines, building on a separate build host";

  # No inputs: nixpkgs comes from the user's flake (`lib.clan { inherit nixpkgs; … }`),
  # so this library never pins or fetches a second nixpkgs.
  outputs =
    { self }:
    let
      clanLib = import ./nix/lib.nix;
    in
    {
      lib = {
        inherit (clanLib) clan minimalSystem;
      };
      nixosModules.clanCore = clanLib.clanCoreModule;
    };
}
