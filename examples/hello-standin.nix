# The main example: a build on the standin guest, through the plugin.
#
#   cargo build --release && scripts/register
#   nix-build --plugin-files "$PWD/target/release/libnix_winvm.so" examples/hello-standin.nix
#
# (--plugin-files takes an absolute path: Nix's build hook loads the plugin again from another
# folder, and the plugin refuses a relative path. scripts/example does all of this.)
#
# The first build installs and suspends the image (three cached derivations); later builds
# revive it. Change `script` and only the last derivation is rebuilt.
{ accel ? "tcg", message ? "hello from the standin guest" }:
let
  image = builtins.windowsImage { guest = "standin"; inherit accel; };
in
builtins.windowsDerivation {
  name = "hello-standin";
  inherit image message;
  script = ''
    mkdir -p $out
    echo "$message" > $out/greeting
    uname -a > $out/uname
    date -u +%Y > $out/year
  '';
}
