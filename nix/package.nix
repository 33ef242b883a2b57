# nix-winvm for nixpkgs: the plugin (lib/libnix_winvm.so) and its builder (bin/nix-winvm-builder).
#
# A Nix plugin must be compiled against the headers of the exact Nix that loads it, so `nix` is
# an argument: override it with the Nix you run (the NixOS module passes `config.nix.package`).
# The plugin refuses, in one line, to register into any other version.
{ lib
, rustPlatform
, pkg-config
, nix
, boost
, nlohmann_json
, openssl
, qemu_kvm
, vde2
, samba
, busybox
, dropbear
, openssh
}:

let
  cargoToml = lib.importTOML ../Cargo.toml;
  tools = [ qemu_kvm vde2 samba busybox dropbear openssh ];
in
rustPlatform.buildRustPackage {
  pname = "nix-winvm";
  inherit (cargoToml.package) version;
  src = lib.cleanSource ../.;
  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [ pkg-config ];
  # build.rs reads the version, include paths and -std= from `pkg-config nix-expr`.
  buildInputs = [ nix boost nlohmann_json openssl ];

  # The builder finds QEMU and friends here inside the sandbox (src/tools.rs).
  NIX_WINVM_TOOLS = lib.makeBinPath tools;

  # The tests start VMs and the real nix: scripts/test runs them.
  doCheck = false;

  # cargo's install hook puts the cdylib into $out/lib, the builder into $out/bin: the plugin
  # finds its builder at ../bin/nix-winvm-builder (src/plugin/plan.rs).

  passthru = {
    # The Nix this plugin can be loaded into (checked by the NixOS module).
    nixVersion = nix.version;
    inherit nix;
  };

  meta = {
    description = "Windows builds as first-class Nix derivations: a Nix plugin and its VM builder";
    license = lib.licenses.mit;
    platforms = [ "x86_64-linux" ];
    mainProgram = "nix-winvm-builder";
  };
}
