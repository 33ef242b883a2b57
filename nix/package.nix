# nix-winvm for nixpkgs: the plugin (lib/libnix_winvm.so) and what the derivations it makes run
# on: the builder, the tools and the VMs' kernel, each a derivation of its own.
#
# A Nix plugin must be compiled against the headers of the exact Nix that loads it, so `nix` is
# an argument: the NixOS module passes `config.nix.package`, with the system's own `pkgs`. Only
# the plugin depends on `nix`. The builder is the same crate built without the `plugin` feature:
# a Nix upgrade rebuilds the plugin alone, and the builder, the tools and the kernel, which every
# image's derivation names, keep their store paths, so no image is made again.
#
# The plugin finds the three in lib/nix-winvm.paths.json, beside itself. Because that file names
# them, they are in the plugin's runtime closure: any store that has the plugin has them too, and
# evaluation needs no host path.
#
# The names below (attributes, outputs, the layout of each output) were taken from nixpkgs' own
# files; this project's machines cannot build nixpkgs, so tests/fixtures/module-eval.nix evaluates
# this file against stubs that fail on any name nixpkgs lacks.
{ lib
, rustPlatform
, pkg-config
, nix
, boost
, nlohmann_json
, openssl
, zlib
, symlinkJoin
, runCommand
, writeText
, closureInfo
, linuxPackages
, xz
, zstd
, pkgsStatic
, qemu_kvm
, vde2
, samba
, e2fsprogs
, dropbear
, openssh
, mtools
, coreutils
, xorriso
, OVMF
, python3
}:

let
  cargoToml = lib.importTOML ../Cargo.toml;
  inherit (cargoToml.package) version;
  cargoLock.lockFile = ../Cargo.lock;

  # Only what cargo reads: editing the README, docs/, tests/ or nix/ rebuilds nothing. Cargo.toml
  # declares the benches, so cargo wants their files even when it builds none of them.
  crateFiles = [ ../Cargo.toml ../Cargo.lock ../build.rs ../src ../benches ];
  builderSrc = lib.fileset.toSource { root = ../.; fileset = lib.fileset.unions crateFiles; };
  # The C++ shim is compiled into the plugin only.
  pluginSrc = lib.fileset.toSource { root = ../.; fileset = lib.fileset.unions (crateFiles ++ [ ../cpp ]); };

  # The builder: every derivation the plugin makes runs it, and every image is named after it. It
  # must not depend on `nix`: built with --no-default-features, build.rs never asks pkg-config for
  # nix-expr and compiles no C++ shim (Cargo.toml's `plugin` feature gates both). It links
  # libvdeplug (vde2) to plug into the VMs' switch, and libssh2's OpenSSL and zlib.
  builder = rustPlatform.buildRustPackage {
    pname = "nix-winvm-builder";
    inherit version cargoLock;
    src = builderSrc;
    buildNoDefaultFeatures = true;
    cargoBuildFlags = [ "--bin" "nix-winvm-builder" ];
    # bindgenHook: libclang for build.rs' bindgen, which reads <linux/kvm.h> and <libvdeplug.h>.
    nativeBuildInputs = [ pkg-config rustPlatform.bindgenHook ];
    buildInputs = [ vde2 openssl zlib ];
    # The tests start VMs and the real nix: scripts/test runs them.
    doCheck = false;
    # Building the binary also links the crate's cdylib, inert without the plugin feature; only
    # the plugin package ships a libnix_winvm.so.
    postInstall = ''
      rm -rf $out/lib
    '';
    meta = {
      description = "The builder of nix-winvm's derivations: a VDE switch and a QEMU pair in the Nix sandbox";
      license = lib.licenses.mit;
      platforms = [ "x86_64-linux" ];
      mainProgram = "nix-winvm-builder";
    };
  };

  # What the controller VM runs from its system disk: smbd and the builder (as its agent), with
  # every store path they load from (their interpreter and RUNPATHs point into /nix/store; smbd
  # also loads Samba's modules from its own output). The builder reads the list from the tools:
  # share/nix-winvm/controller-closure/store-paths.
  controllerClosure = closureInfo { rootPaths = [ samba builder ]; };

  # Every program the builder starts (src/tools.rs and its callers): qemu-system-x86_64 and
  # qemu-img (qemu_kvm), vde_switch (vde2), smbd (samba), busybox (static: it goes into the VMs'
  # initramfs), dropbear (the standin guest's sshd), ssh-keygen (openssh), xz, mke2fs (e2fsprogs:
  # the controller's system disk), mformat, mmd and mcopy (mtools), sha512sum (coreutils) and
  # xorriso (the media of Windows images); OVMF's `fd` output holds FV/OVMF_CODE.fd and
  # FV/OVMF_VARS.fd, the firmware of UEFI images; python3 runs a test's driver (windowsTest).
  # stdenv's move-sbin hook leaves every package's sbin/ a link to bin/; the builder looks in
  # both. busybox's applet links (bin/sh, and mkdir, cp and ln, which coreutils has too) are
  # nix/cygwin.nix's default shell and PATH, as in scripts/tools-closure's closure.
  tools = [ qemu_kvm vde2 samba pkgsStatic.busybox dropbear openssh xz e2fsprogs mtools coreutils xorriso OVMF.fd python3 ];
  winvmTools = symlinkJoin {
    name = "winvm-tools";
    paths = tools;
    postBuild = ''
      mkdir -p $out/share/nix-winvm
      ln -s ${controllerClosure} $out/share/nix-winvm/controller-closure
    '';
  };

  # The VMs' kernel, laid out as the builder reads it (src/builder/stages.rs, media): vmlinuz at
  # the top, and modules/ a flat folder of uncompressed NAME.ko files (src/initramfs/modules.rs
  # reads each module's .modinfo and unpacks no compressed module). nixpkgs' kernel installs
  # bzImage at the top of its output and compresses its modules (.ko.xz). The modules kept are
  # those scripts/setup keeps from Debian's kernel, with every dependency depmod recorded in
  # modules.dep; modules.builtin says which modules this kernel has built in.
  kernel = linuxPackages.kernel;
  winvmKernel = runCommand "winvm-kernel" { nativeBuildInputs = [ xz zstd ]; } ''
    moddir=${kernel}/lib/modules/${kernel.modDirVersion}
    mkdir -p $out/modules
    cp ${kernel}/bzImage $out/vmlinuz
    echo ${kernel.modDirVersion} > $out/version
    find $moddir/kernel -name '*.ko*' | while read -r m; do
      case "$(basename "$m")" in
        virtio*|9p*|9pnet*|netfs*|fscache*|cifs*|e1000*|failover*|net_failover*|ctr.ko*|gcm.ko*|\
        ghash*|ccm.ko*|cmac.ko*|sha512*|sha256*|md4*|md5*|hmac*|des_generic*|libdes*|arc4*|libarc4*|ecb*|\
        cifs_arc4*|cifs_md4*|crc32*|dns_resolver*|nls_*|aes*|gf128mul*|cryptd*|crypto_simd*|sha1*|\
        aead*|seqiv*|echainiv*|jitterentropy*|drbg*|rng*|af_alg*|algif*|libaes*|virtio_rng*|oid_registry*|asn1*|\
        ext4*|jbd2*|mbcache*|crc16*|crc64*|crc-t10dif*|crct10dif*|libcrc32c*|overlay.ko*)
          echo "''${m#$moddir/}" ;;
      esac
    done | sort -u > wanted
    # Add what the kept modules depend on, until nothing new comes.
    while :; do
      awk -F': *' 'NR == FNR { want[$0] = 1; next } ($1 in want) { n = split($2, d, " "); for (i = 1; i <= n; i++) print d[i] }' \
        wanted $moddir/modules.dep | cat wanted - | sort -u > wanted.next
      if cmp -s wanted wanted.next; then break; fi
      mv wanted.next wanted
    done
    while read -r rel; do
      name=$(basename "$rel")
      case "$name" in
        *.ko.xz) xz -dc "$moddir/$rel" > "$out/modules/''${name%.xz}" ;;
        *.ko.zst) zstd -dcq "$moddir/$rel" > "$out/modules/''${name%.zst}" ;;
        *.ko.gz) gzip -dc "$moddir/$rel" > "$out/modules/''${name%.gz}" ;;
        *.ko) cp "$moddir/$rel" "$out/modules/$name" ;;
      esac
    done < wanted
    if [ -f $moddir/modules.builtin ]; then cp $moddir/modules.builtin $out/modules/modules.builtin; fi
  '';

  # The record the plugin reads beside itself (lib/nix-winvm.paths.json).
  paths = {
    builder.path = "${builder}/bin/nix-winvm-builder";
    tools.path = "${winvmTools}";
    kernel.path = "${winvmKernel}";
  };
  pathsRecord = writeText "nix-winvm.paths.json" (builtins.toJSON paths);
in
rustPlatform.buildRustPackage {
  pname = "nix-winvm";
  inherit version cargoLock;
  src = pluginSrc;
  cargoBuildFlags = [ "--lib" ];

  nativeBuildInputs = [ pkg-config rustPlatform.bindgenHook ];
  # build.rs reads the version, include paths and -std= from `pkg-config nix-expr`.
  buildInputs = [ nix boost nlohmann_json openssl zlib vde2 ];

  doCheck = false;

  # cargo's install hook puts the cdylib into $out/lib; the record goes beside it.
  postInstall = ''
    install -Dm644 ${pathsRecord} $out/lib/nix-winvm.paths.json
  '';

  passthru = {
    # The Nix this plugin can be loaded into (checked by the NixOS module).
    nixVersion = nix.version;
    inherit nix builder tools winvmTools winvmKernel controllerClosure paths pathsRecord;
  };

  meta = {
    description = "Windows builds as first-class Nix derivations: a Nix plugin and its VM builder";
    license = lib.licenses.mit;
    platforms = [ "x86_64-linux" ];
  };
}
