# The Nix library over nix-winvm's builtins.
#
#   let winvm = import ./nix { }; in winvm.runCommandWindows "hello" { image = ...; } "echo hi > $out"
#
# Every function checks that the plugin is loaded and says how to load it when it is not.
{ }:
let
  builtin = name:
    builtins.${name} or (throw ''
      nix-winvm: builtins.${name} does not exist: load the plugin with
        --plugin-files /path/to/libnix_winvm.so   (or plugin-files = ... in nix.conf)'');
in
rec {
  windowsImage = args: builtin "windowsImage" args;
  windowsDerivation = args: builtin "windowsDerivation" args;
  runInWindowsVM = drv: builtin "runInWindowsVM" drv;

  # Like nixpkgs' runCommand: name, environment, script.
  runCommandWindows = name: env: script: windowsDerivation (env // { inherit name script; });

  # The standin guest: a Linux stand-in for Windows + Cygwin, for tests and machines without
  # Windows media. `accel = "kvm"` where the CPU has hardware virtualisation.
  standinImage = { accel ? "kvm", ... }@args: windowsImage ({ guest = "standin"; } // args // { inherit accel; });

  # The tools closure the plugin's derivations run with (their attribute `winvmTools`), as a
  # string with its context: a build that names it gets the whole closure in its sandbox.
  # nix/cygwin.nix takes its shell and commands from it (bin/sh, mkdir, cp and ln: busybox).
  # A standin image's arguments are the cheapest the plugin takes; reading one attribute of its
  # derivation writes no .drv and builds nothing. Where the store lacks the closure, an impure
  # evaluation gets the plugin's host copy as a path, which the string copies in: the same
  # store path, content-addressed.
  tools =
    let
      closure = (windowsImage { guest = "standin"; }).drvAttrs.winvmTools or (throw ''
        nix-winvm: this plugin names no tools closure (its builder finds its programs by itself), so
        nix/cygwin.nix has no default shell: give it shell and toolPath, e.g.
          shell = "''${pkgs.bash}/bin/bash"; toolPath = "''${pkgs.coreutils}/bin";'');
    in
    "${closure}";

  # Cygwin package directory from a pinned setup.ini (see docs/WINDOWS.md).
  cygwinRepo = import ./cygwin.nix;

  # An image made of another: `installCommands` run once on top of `base`, and the result is
  # saved as an image of its own (docs/WINDOWS.md, "Layers: software on top of the image").
  layer = { base, installCommands ? [ ], ... }@args: windowsImage args;

  # Offline toolchains as layers: visualStudioBuildToolsLayer, cygwinPackagesLayer, pythonLayer
  # (nix/toolchains.nix). The names they had before (visualStudioBuildTools, cygwinPackages,
  # python) throw an error that names the new one.
  inherit (import ./toolchains.nix { inherit windowsImage; })
    visualStudioBuildToolsLayer cygwinPackagesLayer pythonLayer
    visualStudioBuildTools cygwinPackages python;
}
