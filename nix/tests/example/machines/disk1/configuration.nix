{ self, ... }:
{
  networking.hostName = "from-file";
  system.build.toplevel = { name = "toplevel-of-disk1"; };
  nixpkgs.system = if self == null then "x86_64-linux" else "x86_64-linux";
}
