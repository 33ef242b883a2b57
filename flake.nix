{
  # The project is developed and tested on Debian machines with Nix 2.8, 2.26 and 2.34 built
  # from source (README). This flake follows nixpkgs' names as read in nixpkgs' own files, but no
  # nixpkgs can be fetched or built on those machines: tests/plugin_eval.rs evaluates the package
  # and the module against stubs that fail on any name nixpkgs lacks. There is no flake.lock yet:
  # the first `nix flake lock` (or any use of the flake) records the revision of the branch below.
  description = "nix-winvm: Windows builds as first-class Nix derivations (plugin + VM builder)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      # Built against nixpkgs' default Nix. The NixOS module builds it against the system's.
      nix-winvm = pkgs.callPackage ./nix/package.nix { };
      # The module in a system that does nothing else: its nix.conf is checked by the system's
      # own Nix with the plugin loaded (NixOS' nix.checkConfig), so the check proves the plugin
      # loads into that Nix.
      moduleSystem = nixpkgs.lib.nixosSystem {
        modules = [
          self.nixosModules.default
          {
            nixpkgs.hostPlatform = system;
            boot.isContainer = true;
            system.stateVersion = "25.11";
            nix-winvm.enable = true;
          }
        ];
      };
    in
    {
      packages.${system} = {
        default = nix-winvm;
        inherit nix-winvm;
        nix-winvm-builder = nix-winvm.builder;
        winvm-tools = nix-winvm.winvmTools;
        winvm-kernel = nix-winvm.winvmKernel;
      };

      lib = import ./nix { };

      overlays.default = final: prev: { nix-winvm = final.callPackage ./nix/package.nix { }; };

      # Uses the importing system's `pkgs` and `nix.package`, not this flake's nixpkgs.
      nixosModules.default = ./nix/module.nix;

      checks.${system} = {
        plugin = nix-winvm;
        builder = nix-winvm.builder;
        tools = nix-winvm.winvmTools;
        kernel = nix-winvm.winvmKernel;
        module-nix-conf = moduleSystem.config.environment.etc."nix/nix.conf".source;
        # No Nix in the builder's closure: a Nix upgrade leaves the builder, and every image, alone.
        builder-without-nix = pkgs.runCommand "builder-without-nix" { } ''
          if grep -v -e '-nix-winvm-builder-' ${pkgs.closureInfo { rootPaths = [ nix-winvm.builder ]; }}/store-paths \
              | grep -E -e '-(nix|lix)(-[a-z]+)*-[0-9]'; then
            echo "nix is in the closure of the builder (the paths above)" >&2
            exit 1
          fi
          touch $out
        '';
      };

      devShells.${system}.default = pkgs.mkShell {
        # The plugin's build inputs (nix's headers, boost, libclang for bindgen, vde2, ...), cargo
        # and rustc, and the programs the tests start.
        inputsFrom = [ nix-winvm ];
        packages = [ pkgs.clippy pkgs.rustfmt ] ++ nix-winvm.tools;
      };

      formatter.${system} = pkgs.nixfmt;
    };
}
