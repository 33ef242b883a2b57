# NixOS module: loads nix-winvm's plugin into the system's Nix.
#
#   imports = [ nix-winvm.nixosModules.default ];
#   nix-winvm.enable = true;
#
# The plugin is built against the system's own `nix.package` (a plugin loads only into the Nix
# whose headers it was built with); a package built for another Nix is refused at evaluation.
{ nix-winvm }:
{ config, lib, ... }:
let
  cfg = config.nix-winvm;
in
{
  options.nix-winvm = {
    enable = lib.mkEnableOption "nix-winvm's builtins (windowsImage, windowsDerivation, runInWindowsVM)";
    package = lib.mkOption {
      type = lib.types.package;
      default = nix-winvm.override { nix = config.nix.package; };
      defaultText = lib.literalExpression "nix-winvm.override { nix = config.nix.package; }";
      description = "nix-winvm built against the Nix it is loaded into.";
    };
    kvm = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Announce the `kvm` system feature, which images with `accel = "kvm"` (the default)
        require. Turn off on machines without hardware virtualisation; use `accel = "tcg"` there.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [{
      assertion = (cfg.package.nixVersion or null) == config.nix.package.version;
      message = "nix-winvm.package was built for Nix ${toString (cfg.package.nixVersion or "an unknown version")}, "
        + "but the system runs Nix ${config.nix.package.version}: the plugin would refuse to load. "
        + "Use nix-winvm.override { nix = config.nix.package; }.";
    }];
    nix.settings.plugin-files = [ "${cfg.package}/lib/libnix_winvm.so" ];
    # At the option-default priority, so that it adds to NixOS' default features
    # (nixos-test, benchmark, big-parallel, ...) instead of replacing them.
    nix.settings.system-features = lib.mkIf cfg.kvm (lib.mkOptionDefault [ "kvm" ]);
  };
}
