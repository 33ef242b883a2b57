# A flake with no inputs that calls the builtins directly. It evaluates in pure mode (no
# --impure): the plugin names only store paths that were in the store before evaluation.
#
#   nix --extra-experimental-features 'nix-command flakes' \
#       --plugin-files /abs/path/to/libnix_winvm.so build ./examples/flake
#
# On Debian, scripts/setup then `cargo build --release && scripts/register` make the plugin
# and put what it names into the store; on NixOS, the module does (nix-winvm.enable = true;
# the plugin is in nix.conf's plugin-files, so no --plugin-files is needed).
{
  outputs = { self }: {
    packages.x86_64-linux.default = builtins.windowsDerivation {
      name = "hello-from-a-flake";
      image = builtins.windowsImage { guest = "standin"; accel = "tcg"; };
      script = ''
        mkdir -p $out
        echo "hello from a flake, in the standin guest" > $out/greeting
      '';
    };
  };
}
