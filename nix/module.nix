# NixOS module: loads the plugin into the system's Nix. Thin draft (see flake.nix).
{ nix-winvm }:
{ config, lib, ... }:
{
  options.nix-winvm.enable = lib.mkEnableOption "nix-winvm's builtins (windowsImage, windowsDerivation, runInWindowsVM)";
  config = lib.mkIf config.nix-winvm.enable {
    nix.settings.plugin-files = [ "${nix-winvm}/lib/libnix_winvm.so" ];
    nix.settings.system-features = [ "kvm" ];
  };
}
