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

  # A test with several machines (README, "Tests with several machines"): each node revived
  # from its image (or layer) on one test network, 192.168.1.N with the node's name as host
  # name (N from 1, in the order of the names), driven by `testScript`, Python with the NixOS
  # test driver's verbs (src/builder/driver.py). $out holds the log, the screenshots, each
  # node's serial log and capture, the test network's capture and junit.xml; a failing test
  # keeps them in its build folder (nix-build -K). `driverInteractive` is a program that
  # starts the same nodes at a Python prompt; leaving it stops every VM.
  #
  # A function of the library, not a builtin: it takes everything it needs from its images'
  # derivations (the builder, the tools closure, the accelerator's system feature), as `tools`
  # does above, so the plugin's evaluation has nothing to add.
  windowsTest = { name, nodes, testScript, timeout ? 3600 }:
    let
      names = builtins.attrNames nodes;
      attrsOf = node: nodes.${node}.drvAttrs or (throw
        "nix-winvm: windowsTest: nodes.${node} is not an image (a builtins.windowsImage or a layer)");
      first = attrsOf (if names == [ ] then throw "nix-winvm: windowsTest: `nodes` is empty" else builtins.head names);
      # Each node maps its image's memory stage as a build does (an image of the plugin's
      # names it as winvmMemory).
      nodeList = map (node: { name = node; image = "${nodes.${node}}"; }
        // (if nodes.${node} ? winvmMemory then { memory = "${nodes.${node}.winvmMemory}"; } else { })) names;
      features = builtins.concatLists (map (node: (attrsOf node).requiredSystemFeatures or [ ]) names);
      uniqueFeatures = builtins.foldl' (acc: f: if builtins.elem f acc then acc else acc ++ [ f ]) [ ] features;
      common = {
        inherit (first) system;
        winvmTestNodes = builtins.toJSON nodeList;
        inherit testScript;
      } // (if first ? winvmTools then { inherit (first) winvmTools; } else { })
        // (if first ? winvmToolsLib then { inherit (first) winvmToolsLib; } else { });
      test = derivation (common // {
        inherit name;
        inherit (first) builder;
        args = [ "test" ];
        winvmTestTimeout = toString timeout;
        requiredSystemFeatures = uniqueFeatures;
      });
      # The prompt: a script that runs the builder's `test-interactive` on the same nodes with
      # the same tools (outside the sandbox, as the user who runs it).
      driverInteractive = derivation (common // {
        name = "${name}-driver-interactive";
        builder = "${first.winvmTools}/bin/sh";
        winvmBuilder = first.builder;
        args = [ "-c" ''
          mkdir -p $out/bin
          printf '%s\n' "$testScript" > $out/test-script.py
          {
            echo '#!'"$winvmTools/bin/sh"
            echo "export winvmTools=$winvmTools''${winvmToolsLib:+ winvmToolsLib=$winvmToolsLib}"
            printf "exec %s test-interactive '%s' %s/test-script.py\n" "$winvmBuilder" "$winvmTestNodes" "$out"
          } > $out/bin/nix-winvm-test-driver
          "$winvmTools/bin/busybox" chmod 755 $out/bin/nix-winvm-test-driver
        '' ];
      });
    in
    test // { inherit driverInteractive; };

  # Offline toolchains as layers: visualStudioBuildToolsLayer, cygwinPackagesLayer, pythonLayer
  # (nix/toolchains.nix). The names they had before (visualStudioBuildTools, cygwinPackages,
  # python) throw an error that names the new one.
  inherit (import ./toolchains.nix { inherit windowsImage; })
    visualStudioBuildToolsLayer cygwinPackagesLayer pythonLayer
    visualStudioBuildTools cygwinPackages python;
}
