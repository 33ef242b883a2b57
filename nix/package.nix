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
, symlinkJoin
, pkgsStatic
, qemu_kvm
, vde2
, samba
, dropbear
, openssh
, mtools
, xz
, coreutils
, xorriso
, OVMF
}:

let
  cargoToml = lib.importTOML ../Cargo.toml;
  # Every program the builder starts, as one store path: the derivations the plugin creates
  # name it (winvmTools), so their sandbox has it and needs nothing else, on NixOS too. busybox
  # goes into the VMs' initramfs and must be static. xorriso writes the answer CD of UEFI
  # installs; OVMF.fd (FV/OVMF_CODE.fd, FV/OVMF_VARS.fd) is their firmware.
  tools = [ qemu_kvm vde2 samba pkgsStatic.busybox dropbear openssh mtools xz coreutils xorriso OVMF.fd ];
  winvmTools = symlinkJoin { name = "winvm-tools"; paths = tools; };
in
rustPlatform.buildRustPackage {
  pname = "nix-winvm";
  inherit (cargoToml.package) version;
  src = lib.cleanSource ../.;
  cargoLock.lockFile = ../Cargo.lock;

  # bindgenHook: libclang for build.rs' bindgen, which reads <linux/kvm.h> and <libvdeplug.h>.
  nativeBuildInputs = [ pkg-config rustPlatform.bindgenHook ];
  # build.rs reads the version, include paths and -std= from `pkg-config nix-expr`; the builder
  # links vde2's libvdeplug to plug into the VMs' switch.
  buildInputs = [ nix boost nlohmann_json openssl vde2 ];

  # The builder finds QEMU and friends here inside the sandbox of this package's own build
  # (src/tools.rs); the derivations it creates get winvmTools instead.
  NIX_WINVM_TOOLS = lib.makeBinPath tools;

  # The tests start VMs and the real nix: scripts/test runs them.
  doCheck = false;

  # cargo's install hook puts the cdylib into $out/lib, the builder into $out/bin: the plugin
  # finds its builder at ../bin/nix-winvm-builder and the tools closure it names at
  # ../share/nix-winvm/tools/tools.path (src/plugin/plan.rs). That file keeps winvmTools in the
  # package's runtime closure. The builder is a store path already: nothing is patched.
  postInstall = ''
    mkdir -p $out/share/nix-winvm/tools
    echo ${winvmTools} > $out/share/nix-winvm/tools/tools.path
  '';

  passthru = {
    # The Nix this plugin can be loaded into (checked by the NixOS module).
    nixVersion = nix.version;
    inherit nix winvmTools;
  };

  meta = {
    description = "Windows builds as first-class Nix derivations: a Nix plugin and its VM builder";
    license = lib.licenses.mit;
    platforms = [ "x86_64-linux" ];
    mainProgram = "nix-winvm-builder";
  };
}
