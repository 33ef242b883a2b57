# Offline toolchains as image layers: Visual Studio Build Tools from a layout, more Cygwin
# packages, Python from its installer.
#
#   let winvm = import ./nix { }; in
#   winvm.visualStudioBuildToolsLayer { base = image; layout = { name = "RESTRICTDIST-vsbt"; hash = "sha256-..."; }; }
#
# Each function returns a layer, `windowsImage { base; installCommands; name; }`: the commands
# run once, in order, in Cygwin bash in the guest, as Administrator, and the result is an image
# of its own (docs/WINDOWS.md, "Layers: software on top of the image"). The guest has no
# network. Everything an installer needs comes from the Nix store, which the guest sees
# read-only at /nix/store, and Windows programs at \\192.168.0.2\winvm\store\.
#
# The commands follow Microsoft's, Cygwin's and Python's documentation. No Windows media exist
# on this project's machines, so tests/toolchains.rs checks the commands generated here, never
# their run.
#
# `windowsImage` is an argument so that the functions can be evaluated without the plugin:
#   import ./nix/toolchains.nix { windowsImage = args: args; }
{ windowsImage }:

let
  inherit (builtins)
    all attrNames concatStringsSep elemAt filter genList hasContext head isAttrs isBool isList
    isPath isString length listToAttrs match replaceStrings sort stringLength substring tail
    toString typeOf;

  # How Windows programs in the guest name a store path (`cygpath -w /nix/store/x`). Keep in
  # sync with crate::spec::CONTROLLER_IP, SESSION_SHARE and SESSION_STORE.
  storeShareWindows = "\\\\192.168.0.2\\winvm\\store\\";

  # Where the commands keep their logs and copies on the guest's own disk, next to the
  # install's C:\nix-winvm (guest::windows::scripts::INSTALL_WORK_DIR).
  layersDir = "C:\\nix-winvm\\layers";

  # Keep in sync with guest::windows::CYGWIN_ROOT.
  cygwinRoot = "C:\\cygwin64";

  # Keep in sync with nix/cygwin.nix (packagesDir, mirrorDir) and media::names::CYGWIN_SETUP_EXE.
  cygwinPackagesDir = "cygwin-packages";
  cygwinMirrorDir = "nix-winvm-mirror";
  cygwinSetupExe = "setup-x86_64.exe";

  # Microsoft's files carry this marker, so binary caches can refuse them (docs/WINDOWS.md,
  # RESTRICTDIST). A layer holds a Windows disk, so every layer carries it too.
  restrictedPrefix = "RESTRICTDIST-";

  hasPrefix = prefix: s: substring 0 (stringLength prefix) s == prefix;
  restricted = n: if hasPrefix restrictedPrefix n then n else restrictedPrefix + n;
  isDerivation = v: isAttrs v && (v.type or null) == "derivation";
  uniqueSorted = list: sort (a: b: a < b) (attrNames (listToAttrs (map (n: { name = n; value = null; }) list)));

  # The plugin's wording for a value's type: "got a string", "got an integer".
  describe = v:
    if isDerivation v then "a derivation"
    else {
      int = "an integer";
      float = "a float";
      bool = "a Boolean";
      string = "a string";
      path = "a path";
      "null" = "null";
      set = "a set";
      list = "a list";
      lambda = "a function";
      primop = "a function";
    }.${typeOf v} or (typeOf v);

  # Single quotes for bash: only ' itself needs care.
  shellQuote = s: "'" + replaceStrings [ "'" ] [ "'\\''" ] s + "'";

  # The checks run in order before the layer is made; the first that fails is the error.
  check = fn: checks: value:
    if checks == [ ] then value
    else if (head checks).ok then check fn (tail checks) value
    else throw "${fn}: ${(head checks).message}";

  # A list of strings, checked as the plugin checks its own lists; `what` says what they are.
  stringListChecks = { attr, what, allowEmpty ? false }: v:
    let
      bad = filter (i: !isString (elemAt v i)) (genList (i: i) (length v));
    in
    [
      {
        ok = isList v;
        message = "attribute '${attr}' must be a list of strings (${what}), got ${describe v}";
      }
      {
        ok = allowEmpty || v != [ ];
        message = "attribute '${attr}' is an empty list; give one or more ${what}";
      }
      {
        ok = bad == [ ];
        message = "element ${toString (head bad)} of attribute '${attr}' must be a string, got ${describe (elemAt v (head bad))}";
      }
    ];

  # Names that go into a Windows command line inside double quotes, and into bash only through
  # shellQuote: an absolute path without " or % (cmd.exe expands %...% even inside quotes) and
  # without a trailing backslash (\" would escape the closing quote).
  windowsPath = v: isString v && match "[A-Za-z]:\\\\([^\"%\r\n]*[^\"%\r\n\\\\])?" v != null;

  # Microsoft: "Make sure that your full installation path is fewer than 80 characters", and
  # the same for the layout's path.
  shortWindowsPath = v: stringLength v < 80;

  # The name of the store path that `p` is or is in: /nix/store/<32 characters of hash>-<name>/...
  storeNameOf = p:
    let top = head (builtins.split "/" (substring (stringLength builtins.storeDir + 1) (stringLength p) p));
    in substring 33 (stringLength top) top;

  # A store path as Windows programs in the guest see it.
  windowsPathOf = storePath:
    storeShareWindows
    + replaceStrings [ "/" ] [ "\\" ] (substring (stringLength builtins.storeDir + 1) (stringLength storePath) storePath);

  # A store input of the layer: a path (copied to the store), a derivation, or a string that
  # already names a store path with its dependency (builtins.storePath, "${drv}/sub"). A plain
  # string carries no dependency, so the build's sandbox would not show it to the guest.
  storeInput = fn: attr: expected: v:
    if isPath v || isDerivation v || (isAttrs v && v ? outPath) then "${v}"
    else if isString v && hasContext v && hasPrefix builtins.storeDir v then v
    else if isString v then
      throw "${fn}: attribute '${attr}' must be ${expected}, got a string that is no store path with a dependency (use a path, a derivation or builtins.storePath)"
    else throw "${fn}: attribute '${attr}' must be ${expected}, got ${describe v}";

  # A folder the user adds to the store once, like nixpkgs' requireFile but with plain
  # `derivation`. When it is missing, the build must fail with the command that adds it. No
  # shell exists in the sandbox, and Nix shows a failed build's output, not its attributes.
  # A `message` attribute with `builder = "fail"` would leave only "executing 'fail': No such
  # file or directory" on screen and the instruction hidden in the .drv. So the builder is
  # the instruction itself, as a path that does not exist: Nix stops with
  #   executing '/NAME is not in the Nix store. Add the folder once with: nix-store ...': No such file or directory
  # (Nix 2.8 prints stray bytes around it; the text is intact.) Each piece between slashes
  # stays under 255 bytes for names up to 150 characters, so the error is ENOENT, not
  # "File name too long". The path `nix-store --add-fixed --recursive sha256 NAME` makes is
  # this derivation's output, so once added nothing builds. The hash is `hash`, in SRI form
  # (`nix hash path DIR`), or `sha256`, in hexadecimal or base 32 (`nix-hash --type sha256 DIR`).
  requiredFolder = fn: attr: spec:
    let
      keys = attrNames spec;
      n = spec.name or null;
      given = filter (k: spec ? ${k}) [ "sha256" "hash" ];
      # null when none is given: the checks refuse that before the hash is read.
      key = if given == [ ] then null else head given;
      hash = spec.${key};
      sriShape = "\"sha256-\" and 44 characters of base64 (nix hash path DIR)";
    in
    check fn ([
      {
        ok = filter (k: k != "name" && k != "sha256" && k != "hash") keys == [ ];
        message = "attribute '${attr}' as a set must be { name; hash; } or { name; sha256; }, got the attributes ${concatStringsSep ", " keys}";
      }
      {
        ok = length given < 2;
        message = "attribute '${attr}' has both 'hash' and 'sha256'; give one of them, the folder's hash";
      }
      {
        ok = given != [ ];
        message = "attribute '${attr}' lacks the folder's hash: give 'hash' (${sriShape}) or 'sha256' (64 hexadecimal digits, nix-hash --type sha256 DIR)";
      }
      {
        ok = spec ? name;
        message = "attribute '${attr}' lacks 'name', the folder's name in the store";
      }
      {
        ok = isString n && match "[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]*" n != null && stringLength n <= 150;
        message = "attribute '${attr}.name' must be a store name (letters, digits and + - . _ ? =, not starting with a dot, at most 150 characters), got ${if isString n then "\"${n}\"" else describe n}";
      }
      {
        ok = hasPrefix restrictedPrefix n;
        message = "attribute '${attr}.name' (\"${n}\") must start with ${restrictedPrefix}: Microsoft's files may not be redistributed, and binary caches refuse store paths with that marker (docs/WINDOWS.md, RESTRICTDIST)";
      }
    ] ++ (if key != "hash" then [
      {
        ok = isString hash && (match "[0-9a-fA-F]{64}" hash != null || match "[0-9a-df-np-sv-z]{52}" hash != null);
        message = "attribute '${attr}.sha256' must be a SHA-256 of the folder, 64 hexadecimal digits (nix-hash --type sha256 DIR) or 52 base-32 characters, got ${if isString hash then "\"${hash}\"" else describe hash}";
      }
    ] else [
      {
        ok = isString hash;
        message = "attribute '${attr}.hash' must be a string, ${sriShape}, got ${describe hash}";
      }
      {
        # 32 bytes in base64: 43 digits and one "=". The last digit holds the hash's last 4
        # bits and 2 zero bits: any other would be a hash that another string names too.
        ok = match "sha256-[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=" hash != null;
        message = "attribute '${attr}.hash' must be a SHA-256 of the folder in SRI form, ${sriShape}, got \"${hash}\"";
      }
    ]))
      (derivation {
        name = n;
        system = "x86_64-linux";
        builder = "/${n} is not in the Nix store. Add the folder once with: nix-store --add-fixed --recursive sha256 ./${n}";
        outputHashMode = "recursive";
        outputHashAlgo = "sha256";
        # Nix reads either form; the .drv holds the hash in hexadecimal, so both forms of one
        # hash make the same derivation.
        outputHash = hash;
        preferLocalBuild = true;
      });

  # What every command starts with. `say` and `warn` print with printf: Windows paths hold
  # backslashes, which some shells' echo would read as escapes.
  prelude = ''
    set -eu
    say() { printf 'nix-winvm layer: %s\n' "$*"; }
    warn() { printf 'nix-winvm layer: %s\n' "$*" >&2; }
  '';

  # Runs one Windows command line from a batch file and sets $status to the program's whole
  # exit code: Cygwin gives a shell only the low byte of a Windows program's exit code (3010
  # reads as 194), and the installers report on all 32 bits. In a batch file cmd.exe waits for
  # GUI programs too. TEMP and TMP point at the log folder, where the installers leave their
  # logs. The command line is the batch's own line, so its quotes are cmd.exe's, not bash's.
  runWindows = ''
    run_windows() {
      mkdir -p "$1"
      logs_w=$(cygpath -w "$1")
      printf '@echo off\r\nset "TEMP=%s"\r\nset "TMP=%s"\r\n%s\r\n>"%s\\exit-code" echo %%ERRORLEVEL%%\r\n' \
        "$logs_w" "$logs_w" "$2" "$logs_w" > "$1/run.cmd"
      rm -f "$1/exit-code"
      say "running $2"
      (cd "$1" && "$(cygpath -S)/cmd.exe" /d /c "$(cygpath -w "$1/run.cmd")") < /dev/null || true
      if [ -f "$1/exit-code" ]; then status=$(tr -cd '0-9-' < "$1/exit-code"); else status=; fi
      if [ -z "$status" ]; then
        warn "cmd.exe recorded no exit code for: $2"
        exit 1
      fi
    }
  '';

  layerOf = { base, name, timeout, installCommands }:
    windowsImage ({ inherit base installCommands; name = restricted name; }
      // (if timeout == null then { } else { inherit timeout; }));

  nameChecks = name: [{
    ok = isString name && name != "";
    message = "attribute 'name' must be a non-empty string, got ${if name == "" then "an empty string" else describe name}";
  }];

  # ---------------------------------------------------------------------------------------
  # Visual Studio Build Tools from an offline layout.
  #
  # The layout is made once on a networked Windows machine:
  #   vs_BuildTools.exe --layout C:\RESTRICTDIST-vsbt --add Microsoft.VisualStudio.Workload.VCTools --includeRecommended --lang en-US
  # and added to the store (docs/WINDOWS.md). Microsoft's steps for an offline client: import
  # the layout's root certificates (certificates\*.cer, with certutil into the machine's Root
  # store), then run the layout's bootstrapper with --noWeb and the same --add options, and
  # --wait, which makes it return the installer's exit code: 0, or 3010 for success that asks
  # for a restart.
  visualStudioBuildToolsLayer =
    { base
    , layout
    , workloads ? [ "Microsoft.VisualStudio.Workload.VCTools" ]
    , includeRecommended ? true
    , installPath ? "C:\\BuildTools"
    , name ? "vs-buildtools"
    , timeout ? null
    }:
    let
      fn = "visualStudioBuildToolsLayer";
      layoutPath =
        if isAttrs layout && !isDerivation layout && !(layout ? outPath)
        then "${requiredFolder fn "layout" layout}"
        else storeInput fn "layout"
          "a path or derivation holding the layout, or { name; hash; } (or { name; sha256; }) for a folder added with `nix-store --add-fixed --recursive sha256 DIR`"
          layout;
      layoutWindows = windowsPathOf layoutPath;
      logs = "${layersDir}\\vs-buildtools";
      installArgs =
        " --noWeb --quiet --wait --norestart"
        + concatStringsSep "" (map (w: " --add \"${w}\"") workloads)
        + (if includeRecommended then " --includeRecommended" else "")
        + " --installPath \"${installPath}\"";
    in
    check fn (stringListChecks { attr = "workloads"; what = "workload or component IDs"; } workloads ++ [
      {
        ok = all (w: match "[A-Za-z0-9._-]+(;[A-Za-z]+)*" w != null) workloads;
        message = "attribute 'workloads': ${concatStringsSep ", " (map (w: "\"${w}\"") (filter (w: match "[A-Za-z0-9._-]+(;[A-Za-z]+)*" w == null) workloads))} is not a workload or component ID such as \"Microsoft.VisualStudio.Workload.VCTools\" or \"...;includeRecommended\"";
      }
      {
        ok = isBool includeRecommended;
        message = "attribute 'includeRecommended' must be a Boolean, got ${describe includeRecommended}";
      }
      {
        ok = windowsPath installPath;
        message = "attribute 'installPath' must be an absolute Windows path such as \"C:\\BuildTools\", without \" or % and without a trailing backslash, got ${if isString installPath then "\"${installPath}\"" else describe installPath}";
      }
      {
        ok = shortWindowsPath installPath;
        message = "attribute 'installPath' (\"${installPath}\") must be shorter than 80 characters, as Microsoft requires";
      }
      {
        ok = hasPrefix restrictedPrefix (storeNameOf layoutPath);
        message = "the layout's store path, ${layoutPath}, must have a name that starts with ${restrictedPrefix}: Microsoft's files may not be redistributed, and binary caches refuse store paths with that marker (docs/WINDOWS.md, RESTRICTDIST)";
      }
      {
        ok = shortWindowsPath layoutWindows;
        message = "the layout's path in the guest, ${layoutWindows}, must be shorter than 80 characters, as Microsoft requires of layouts: give the layout a name of at most 20 characters, such as \"RESTRICTDIST-vsbt\"";
      }
    ] ++ nameChecks name)
      (layerOf {
        inherit base name timeout;
        installCommands = [
          ''
            ${prelude}
            ${runWindows}
            layout=${shellQuote layoutPath}
            logs=$(cygpath -u ${shellQuote logs})
            system32=$(cygpath -S -w)
            say "Visual Studio Build Tools, step 1 of 2: the root certificates of the layout $layout"
            # Microsoft's list for offline machines; the Root store of the machine, not the user.
            for cert in manifestRootCertificate.cer manifestCounterSignRootCertificate.cer vs_installer_opc.RootCertificate.cer; do
              if [ -f "$layout/certificates/$cert" ]; then
                run_windows "$logs" "\"$system32\\certutil.exe\" -addstore -f Root \"$(cygpath -w "$layout/certificates/$cert")\""
                if [ "$status" != 0 ]; then
                  warn "certutil failed with exit code $status on $cert"
                  exit 1
                fi
              else
                say "$cert is not in the layout's certificates folder; skipped"
              fi
            done
          ''
          ''
            ${prelude}
            ${runWindows}
            layout=${shellQuote layoutPath}
            logs=$(cygpath -u ${shellQuote logs})
            install_path=${shellQuote installPath}
            install_dir=$(cygpath -u "$install_path")
            workloads=${shellQuote (concatStringsSep " " workloads)}
            args=${shellQuote installArgs}
            say "Visual Studio Build Tools, step 2 of 2: installing $workloads into $install_path from $layout, offline"
            if [ ! -f "$layout/vs_buildtools.exe" ]; then
              warn "the layout has no vs_buildtools.exe at its top; it holds:"
              ls "$layout" >&2
              exit 1
            fi
            run_windows "$logs" "\"$(cygpath -w "$layout")\\vs_buildtools.exe\"$args"
            case $status in
              0) say "the Visual Studio installer succeeded" ;;
              3010) say "the Visual Studio installer succeeded and asks for a restart (exit code 3010); Microsoft counts that as success, and the layer is saved without one" ;;
              *)
                case $status in
                  740) meaning="elevation required" ;;
                  1001) meaning="the Visual Studio installer is already running" ;;
                  1003) meaning="Visual Studio is in use" ;;
                  1602|5004) meaning="the operation was canceled" ;;
                  1618) meaning="another installation is running" ;;
                  1641) meaning="the installer started a restart, which a layer cannot survive" ;;
                  5003) meaning="the bootstrapper could not get the installer: the layout is incomplete" ;;
                  5005) meaning="the bootstrapper could not parse its command line" ;;
                  5007) meaning="blocked: the machine does not meet the requirements" ;;
                  8001) meaning="the Arm machine check failed" ;;
                  8002) meaning="the background download precheck failed" ;;
                  8003) meaning="an out-of-support component was selected" ;;
                  8004) meaning="the target folder failed" ;;
                  8005) meaning="verifying the source payloads failed: is the layout complete, and were its certificates imported?" ;;
                  8006) meaning="Visual Studio processes are running" ;;
                  -1073720687) meaning="connectivity failure: with --noWeb this means a package the install needs is not in the layout" ;;
                  -1073741510) meaning="the installer was terminated" ;;
                  *) meaning="see the installer's logs" ;;
                esac
                warn "the Visual Studio installer failed with exit code $status: $meaning"
                for log in "$logs"/dd_*errors*.log "$logs"/dd_bootstrapper_*.log; do
                  if [ -f "$log" ]; then
                    printf -- '--- %s (the last 40 lines)\n' "$log" >&2
                    tail -n 40 "$log" >&2
                  fi
                done
                exit 1
                ;;
            esac
            if [ ! -f "$install_dir/Common7/Tools/VsDevCmd.bat" ]; then
              warn "the installer reported success, but $install_dir/Common7/Tools/VsDevCmd.bat is missing"
              exit 1
            fi
            say "Visual Studio Build Tools are in $install_path"
          ''
        ];
      });

  # ---------------------------------------------------------------------------------------
  # More Cygwin packages on an installed image, from a package folder such as nix/cygwin.nix
  # makes: Cygwin's setup, unattended, local install into the existing root, the same flags as
  # the image's install.cmd. Setup installs what is asked and what it lacks, and upgrades
  # nothing already installed (no --upgrade-also).
  #
  # Setup exits 0 even when a package is missing from the folder (it only logs "Package 'x'
  # not found."), so the command checks /etc/setup/installed.db afterwards. It exits 118 when
  # it had to leave files in use for the next restart, which a layer never has: an error here.
  cygwinPackagesLayer =
    { base
    , repo
    , packages
    , name ? "cygwin-packages"
    , timeout ? null
    }:
    let
      fn = "cygwinPackagesLayer";
      # nix/cygwin.nix's folder is symlinks into other store paths, and the store share does
      # not follow symlinks into the rest of the store (the controller's Samba refuses links
      # that leave the share). So its folder is rebuilt in the guest from the store paths it
      # was made from, which are plain files; any other folder is copied as it is.
      fromCygwinNix = isAttrs repo && repo ? archiveLinks && repo ? setupIni && repo ? setupExe;
      repoPath = storeInput fn "repo" "a Cygwin package folder (a path or derivation, as nix/cygwin.nix makes)" repo;
      pairs = links: if links == [ ] then [ ] else [ [ (head links) (head (tail links)) ] ] ++ pairs (tail (tail links));
      source = if fromCygwinNix then "the packages of ${repo.name or "cygwin-repo"} (nix/cygwin.nix)" else "the package folder ${repoPath}";
      stage = "${layersDir}\\cygwin";
      logs = "${layersDir}\\cygwin-setup";
      sorted = uniqueSorted packages;
      setupArgs =
        " --quiet-mode --no-verify --local-install"
        + " --local-package-dir \"${stage}\\${cygwinPackagesDir}\""
        + " --root \"${cygwinRoot}\""
        + " --packages ${concatStringsSep "," sorted}"
        + " --wait --no-desktop --no-shortcuts --no-startmenu";
      copyCommand =
        if fromCygwinNix then ''
          mirror="$stage/${cygwinPackagesDir}/${cygwinMirrorDir}"
          mkdir -p "$mirror/x86_64"
          cp ${shellQuote "${repo.setupExe}"} "$stage/${cygwinSetupExe}"
          cp ${shellQuote "${repo.setupIni}"} "$mirror/x86_64/setup.ini"
          # Pairs of (path below the mirror folder, archive in the store).
          set -- \
            ${concatStringsSep " \\\n  " (map (p: "${shellQuote (head p)} ${shellQuote "${head (tail p)}"}") (pairs repo.archiveLinks))}
          while [ "$#" -ge 2 ]; do
            mkdir -p "$mirror/$(dirname "$1")"
            cp "$2" "$mirror/$1"
            shift 2
          done
        '' else ''
          repo=${shellQuote repoPath}
          cp "$repo/${cygwinSetupExe}" "$stage/${cygwinSetupExe}"
          cp -R "$repo/${cygwinPackagesDir}" "$stage/${cygwinPackagesDir}"
        '';
    in
    check fn (stringListChecks { attr = "packages"; what = "Cygwin package names"; } packages ++ [
      {
        ok = all (p: match "[A-Za-z0-9._+-]+" p != null) packages;
        message = "attribute 'packages': ${concatStringsSep ", " (map (p: "\"${p}\"") (filter (p: match "[A-Za-z0-9._+-]+" p == null) packages))} is not a Cygwin package name (letters, digits and . _ + -)";
      }
    ] ++ nameChecks name)
      (builtins.seq repoPath (layerOf {
        inherit base name timeout;
        installCommands = [
          ''
            ${prelude}
            stage=$(cygpath -u ${shellQuote stage})
            say "Cygwin packages, step 1 of 2: copying "${shellQuote source}" to "${shellQuote stage}
            rm -rf "$stage"
            mkdir -p "$stage"
            ${copyCommand}
            # Windows runs a file only if its ACL grants execute, which Cygwin maps from the mode.
            chmod +x "$stage/${cygwinSetupExe}"
            say "$(find "$stage/${cygwinPackagesDir}" -type f | wc -l) files copied"
          ''
          ''
            ${prelude}
            ${runWindows}
            stage=$(cygpath -u ${shellQuote stage})
            logs=$(cygpath -u ${shellQuote logs})
            packages=${shellQuote (concatStringsSep " " sorted)}
            args=${shellQuote setupArgs}
            say "Cygwin packages, step 2 of 2: installing $packages into ${cygwinRoot} with Cygwin's setup, offline"
            run_windows "$logs" "\"$(cygpath -w "$stage")\\${cygwinSetupExe}\"$args"
            case $status in
              0) ;;
              118)
                warn "Cygwin's setup had to leave files in use for the next restart (exit code 118), and a layer never restarts. Install from the setup.ini the image was installed from, so that no installed package is upgraded, or put the packages in the image's cygwinPackages"
                tail -n 30 /var/log/setup.log >&2 || true
                exit 1
                ;;
              *)
                warn "Cygwin's setup failed with exit code $status"
                tail -n 30 /var/log/setup.log >&2 || true
                exit 1
                ;;
            esac
            missing=
            for p in $packages; do
              awk -v p="$p" '$1 == p { found = 1 } END { exit !found }' /etc/setup/installed.db || missing="$missing $p"
            done
            if [ -n "$missing" ]; then
              warn "Cygwin's setup finished, but these packages are not installed:$missing (is each one in the folder's setup.ini, by its own name?)"
              tail -n 30 /var/log/setup.log >&2 || true
              exit 1
            fi
            rm -rf "$stage"
            say "installed $packages"
          ''
        ];
      }));

  # ---------------------------------------------------------------------------------------
  # Python from the official Windows installer (python-3.X.Y-amd64.exe), which holds every
  # component of a default install; only the debug binaries and symbols would be downloaded,
  # so they stay off. Then, given a folder of wheels, pip installs from it alone.
  pythonLayer =
    { base
    , installer
    , wheels ? null
    , packages ? [ ]
    , targetDir ? "C:\\Python"
    , name ? "python"
    , timeout ? null
    }:
    let
      fn = "pythonLayer";
      installerPath = storeInput fn "installer" "the Python installer .exe (a path or derivation)" installer;
      wheelsPath = storeInput fn "wheels" "a folder of wheels (a path or derivation)" wheels;
      logs = "${layersDir}\\python";
      wheelsStage = "${layersDir}\\python-wheels";
      installArgs =
        " /quiet InstallAllUsers=1 PrependPath=1 Include_test=0 Include_debug=0 Include_symbols=0 Shortcuts=0"
        + " TargetDir=\"${targetDir}\""
        + " /log \"${logs}\\install.log\"";
      steps = if wheels == null then "1" else "2";
    in
    check fn ([
      {
        ok = match ".*\\.[eE][xX][eE]" installerPath != null;
        message = "attribute 'installer' must be a store path whose name ends in .exe, because Windows runs programs by their extension, got ${installerPath}";
      }
    ] ++ stringListChecks { attr = "packages"; what = "pip requirements"; allowEmpty = true; } packages ++ [
      {
        ok = all (p: match "[^-\r\n][^\r\n]*" p != null) packages;
        message = "attribute 'packages': every requirement must be a non-empty line that does not start with -";
      }
      {
        ok = wheels == null || packages != [ ];
        message = "attribute 'packages' must name what to install from 'wheels', e.g. [ \"numpy\" ]";
      }
      {
        ok = wheels != null || packages == [ ];
        message = "attribute 'packages' needs 'wheels', a folder of wheels: the guest has no network, so pip installs with --no-index";
      }
      {
        ok = windowsPath targetDir;
        message = "attribute 'targetDir' must be an absolute Windows path such as \"C:\\Python\", without \" or % and without a trailing backslash, got ${if isString targetDir then "\"${targetDir}\"" else describe targetDir}";
      }
    ] ++ nameChecks name)
      (builtins.seq (if wheels == null then null else wheelsPath) (layerOf {
        inherit base name timeout;
        installCommands = [
          ''
            ${prelude}
            ${runWindows}
            installer=${shellQuote installerPath}
            logs=$(cygpath -u ${shellQuote logs})
            target_dir=${shellQuote targetDir}
            args=${shellQuote installArgs}
            say "Python, step 1 of ${steps}: installing $installer into $target_dir for all users"
            run_windows "$logs" "\"$(cygpath -w "$installer")\"$args"
            case $status in
              0) say "the Python installer succeeded" ;;
              3010) say "the Python installer succeeded and asks for a restart (exit code 3010); the layer is saved without one" ;;
              *)
                warn "the Python installer failed with exit code $status"
                tail -n 40 "$logs/install.log" >&2 || true
                exit 1
                ;;
            esac
            "$(cygpath -u "$target_dir")/python.exe" --version
          ''
        ] ++ (if wheels == null then [ ] else [
          ''
            ${prelude}
            wheels=${shellQuote wheelsPath}
            stage=$(cygpath -u ${shellQuote wheelsStage})
            python="$(cygpath -u ${shellQuote targetDir})/python.exe"
            say "Python, step 2 of 2: pip install --no-index from $wheels:"${concatStringsSep "" (map (p: " ${shellQuote p}") packages)}
            rm -rf "$stage"
            mkdir -p "$stage"
            cp -R "$wheels/." "$stage/"
            if ! "$python" -m pip install --no-index --disable-pip-version-check --find-links "$(cygpath -w "$stage")"${concatStringsSep "" (map (p: " ${shellQuote p}") packages)}; then
              warn "pip failed"
              exit 1
            fi
            rm -rf "$stage"
          ''
        ]);
      }));

  # ---------------------------------------------------------------------------------------
  # The names before the `Layer` suffix: `cygwinPackages` is also an attribute of
  # builtins.windowsImage (a list), and `python` said nothing of what the function makes.
  renamed = old: new: throw "nix-winvm: `${old}` was renamed `${new}` (nix/toolchains.nix); call winvm.${new} with the same arguments";
in
{
  inherit visualStudioBuildToolsLayer cygwinPackagesLayer pythonLayer;
  visualStudioBuildTools = renamed "visualStudioBuildTools" "visualStudioBuildToolsLayer";
  cygwinPackages = renamed "cygwinPackages" "cygwinPackagesLayer";
  python = renamed "python" "pythonLayer";
}
