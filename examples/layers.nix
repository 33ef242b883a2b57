# Layers: software installed on top of an image, each layer its own cached derivation.
#
#   nix-build --plugin-files "$PWD/target/release/libnix_winvm.so" examples/layers.nix
#
# The base image is made once (three derivations). `tools` revives it, runs its commands and
# is saved as an image of its own; `greeting` does the same on top of `tools`. The build
# revives the top layer and sees what both installed. Change `greeting`'s commands (or
# `--argstr message ...`) and only that layer and the build are built again.
{ accel ? "tcg", message ? "hello from the second layer" }:
let
  base = builtins.windowsImage { guest = "standin"; inherit accel; };

  # A file from the host, copied onto the guest's disk: the command names it, so the layer
  # depends on it (a Windows layer would run an installer the same way).
  tool = builtins.toFile "count-words" ''
    #!/bin/sh
    wc -w < "$1" | tr -d ' '
  '';
  tools = builtins.windowsImage {
    inherit base;
    name = "standin-with-tools";
    installCommands = [
      "mkdir -p /opt/tools/bin"
      "cp ${tool} /opt/tools/bin/count-words && chmod 755 /opt/tools/bin/count-words"
    ];
  };

  greeting = builtins.windowsImage {
    base = tools;
    name = "standin-with-greeting";
    installCommands = [ "echo '${message}' > /opt/greeting" ];
  };
in
builtins.windowsDerivation {
  name = "layers-example";
  image = greeting;
  script = ''
    mkdir -p $out
    cp /opt/greeting $out/greeting
    /opt/tools/bin/count-words /opt/greeting > $out/words
  '';
}
