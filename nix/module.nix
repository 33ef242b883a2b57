# NixOS module: loads nix-winvm's plugin into the system's Nix.
#
#   imports = [ nix-winvm.nixosModules.default ];
#   nix-winvm.enable = true;
#
# The plugin is built with the system's own `pkgs` against the system's own `nix.package`: a
# plugin loads only into the Nix whose headers it was built with, and it must share that Nix's
# glibc and libstdc++. A package built for another Nix is refused at evaluation, and so is Lix.
{ config, lib, pkgs, ... }:
let
  cfg = config.nix-winvm;
  systemNix = config.nix.package;
in
{
  options.nix-winvm = {
    enable = lib.mkEnableOption "nix-winvm's builtins (windowsImage, windowsDerivation, runInWindowsVM)";
    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { nix = systemNix; };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { nix = config.nix.package; }";
      description = "nix-winvm built against the Nix it is loaded into.";
    };
    kvm = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Add the `kvm` system feature, which images with `accel = "kvm"` (the default) require,
        to the system's features (through `extra-system-features`, so NixOS' own list stays).
        Turn off on machines without hardware virtualisation; use `accel = "tcg"` there.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = !(lib.hasInfix "lix" (lib.getName systemNix));
        message = "nix-winvm does not support Lix yet (nix.package is ${lib.getName systemNix}): "
          + "its plugin interface differs from Nix's. Set nix.package to a Nix (pkgs.nix) to use nix-winvm.";
      }
      {
        assertion = (cfg.package.nixVersion or null) == systemNix.version;
        message = "nix-winvm.package was built for Nix ${toString (cfg.package.nixVersion or "an unknown version")}, "
          + "but the system runs Nix ${systemNix.version}: the plugin would refuse to load. "
          + "Use pkgs.callPackage with nix = config.nix.package.";
      }
    ];
    nix.settings.plugin-files = [ "${cfg.package}/lib/libnix_winvm.so" ];
    # Added to the system's features, whatever sets `system-features` (NixOS sets its default
    # list with mkDefault; a user's own list replaces it).
    nix.settings.extra-system-features = lib.mkIf cfg.kvm [ "kvm" ];
  };
}
