{
  # The project is developed and tested on Debian machines with Nix 2.8, 2.26 and 2.34 built
  # from source (README); this flake follows nixpkgs' conventions but has not been built with
  # nixpkgs here (no nixpkgs is reachable). The plugin must be compiled against the headers of
  # the exact Nix that loads it: the package takes `nix` as an argument (override it), and the
  # NixOS module builds it against the system's `nix.package`.
  description = "nix-winvm: Windows builds as first-class Nix derivations (plugin + VM builder)";

  inputs.nixpkgs.url = "nixpkgs";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      nix-winvm = pkgs.callPackage ./nix/package.nix { };
    in
    {
      packages.${system} = {
        default = nix-winvm;
        inherit nix-winvm;
      };
      lib = import ./nix { };
      overlays.default = final: prev: { nix-winvm = final.callPackage ./nix/package.nix { }; };
      nixosModules.default = import ./nix/module.nix { inherit nix-winvm; };
      checks.${system}.build = nix-winvm;
    };
}
