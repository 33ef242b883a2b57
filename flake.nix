{
  # A first, thin draft: the project is developed and tested on Debian's Nix 2.8 (see README);
  # this flake has not been built on those machines. The plugin must be compiled against the
  # headers of the exact Nix that loads it, so it takes `nix` from the same nixpkgs.
  description = "nix-winvm: Windows builds as first-class Nix derivations (plugin + VM builder)";

  inputs.nixpkgs.url = "nixpkgs";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      tools = with pkgs; [ qemu_kvm vde2 samba busybox dropbear openssh ];
      nix-winvm = pkgs.rustPlatform.buildRustPackage {
        pname = "nix-winvm";
        version = "0.1.0";
        src = self;
        cargoLock.lockFile = ./Cargo.lock;
        nativeBuildInputs = [ pkgs.pkg-config ];
        buildInputs = [ pkgs.nix pkgs.boost pkgs.nlohmann_json pkgs.openssl ];
        # The builder finds QEMU and friends here inside the sandbox (src/tools.rs).
        NIX_WINVM_TOOLS = pkgs.lib.makeBinPath tools;
        doCheck = false; # the tests start VMs and the real nix; run them with scripts/test
      };
    in
    {
      packages.${system}.default = nix-winvm;
      lib = import ./nix { };
      overlays.default = final: prev: { inherit nix-winvm; };
      nixosModules.default = import ./nix/module.nix { inherit nix-winvm; };
      checks.${system}.build = nix-winvm;
    };
}
