{ lib, ... }:
{
  clan.core.networking.buildHost = lib.mkDefault "root@builder.from.hardware";
  boot.loader.grub.device = "nodev";
}
