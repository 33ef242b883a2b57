# A local Cygwin package directory (`cygwinRepo` of builtins.windowsImage), built from a pinned
# setup.ini with fixed-output fetches only.
#
#   import ./nix/cygwin.nix {
#     setupIni = ./setup.ini;              # a copy of <mirror>/x86_64/setup.ini, kept in your repo
#     packages = [ "make" "gcc-core" ];    # extra packages; Base, openssh and cygrunsrv are always in
#     mirror = "https://<a Cygwin mirror>/cygwin";   # no trailing slash needed
#     setupExe = ./setup-x86_64.exe;       # or a fixed-output fetch of it
#   }
#
# Arguments:
#   setupIni   path of the pinned setup.ini. Every archive is fetched with the sha512 this file
#              states, so pinning the file pins the whole package set.
#   packages   Cygwin package names installed on top of the Base category and openssh +
#              cygrunsrv. Use the same list as `cygwinPackages` of builtins.windowsImage; the
#              media stage refuses a repository that lacks any package the image needs.
#   mirror     the mirror root URL: archive `x86_64/release/bash/bash-...tar.xz` of setup.ini is
#              fetched from "${mirror}/x86_64/release/bash/bash-...tar.xz". Any URL scheme that
#              Nix's builtin fetcher knows works (https, http, file).
#   setupExe   setup-x86_64.exe (a path or a derivation). Cygwin changes it often and publishes
#              no stable URL, so pin the copy you use.
#   tools, shell, toolPath, system
#              the builder that assembles the directory: a POSIX shell (run with `-c SCRIPT`)
#              and a PATH holding `mkdir`, `cp` and `ln`. The defaults take them from `tools`,
#              the tools closure the plugin's derivations run with (`tools` of nix/default.nix,
#              which needs the plugin loaded): its bin/ holds busybox's sh, mkdir, cp and ln,
#              in the closure scripts/tools-closure makes and in nix/package.nix's. A build
#              that names the closure gets it in its sandbox, so nothing comes from the host.
#              Without the plugin, or to use other programs, pass shell and toolPath, e.g.
#              shell = "${pkgs.bash}/bin/bash"; toolPath = "${pkgs.coreutils}/bin";
#              `system` is "x86_64-linux", the only system the plugin's builds run on; pure
#              evaluation (flakes) has no builtins.currentSystem.
#
# Result: a derivation whose output is laid out as the install medium wants it:
#   $out/setup-x86_64.exe
#   $out/cygwin-packages/nix-winvm-mirror/x86_64/setup.ini
#   $out/cygwin-packages/nix-winvm-mirror/<install path of each archive>   (symlinks into the store)
# plus the attributes `roots`, `closure` (package names, sorted) and `archives`
# ({ name; path; url; sha512; size; } per package that has an archive), computed at
# evaluation time without network.
#
# The setup.ini reader below is a small re-implementation of the Rust parser in
# src/guest/windows/cygwin.rs, which is the reference (the tests in
# src/guest/windows/media/repo.rs check that both give the same closure for
# tests/fixtures/setup.ini). It reads, for the current
# (unlabelled or [curr]) version of each package: category, requires, depends2, provides and
# install. Dependencies are `depends2` when present, else `requires`; version constraints in
# parentheses are dropped; `_windows` is satisfied by Windows itself; a name that is no package
# resolves to the alphabetically first package that `provides` it. Differences from the Rust
# parser: it drops every double-quoted string before reading lines (setup's lexer has no escapes,
# so a quote always ends the string; Rust only opens a string right after `key:`), and it checks
# the install lines of the packages it fetches only, where Rust refuses any malformed line.

{ setupIni
, packages ? [ ]
, mirror
, setupExe
  # Read only by the defaults of shell and toolPath.
, tools ? (import ./. { }).tools
  # Busybox's sh (bin/sh -> busybox), not bin/busybox: Nix runs a builder with its file name
  # as argv[0], and busybox run as `busybox` takes its first argument as the applet's name.
, shell ? "${tools}/bin/sh"
  # A PATH even for busybox: Debian's static busybox runs its applets without one, which
  # other builds of busybox (nixpkgs') need not do.
, toolPath ? "${tools}/bin"
, system ? "x86_64-linux"
, name ? "cygwin-repo"
}:

let
  inherit (builtins)
    attrNames concatLists concatStringsSep elem elemAt filter foldl' genList genericClosure
    head isString length listToAttrs match replaceStrings sort split stringLength substring;

  # Keep in sync with REQUIRED_PACKAGES in src/guest/windows/cygwin.rs.
  requiredPackages = [ "openssh" "cygrunsrv" ];
  # Keep in sync with LOCAL_MIRROR_DIR and media::CYGWIN_PACKAGES_DIR.
  packagesDir = "cygwin-packages";
  mirrorDir = "nix-winvm-mirror";
  windowsPseudoPackage = "_windows";

  strings = list: filter isString list;
  uniqueSorted = list: sort (a: b: a < b) (attrNames (listToAttrs (map (n: { name = n; value = null; }) list)));

  # setup.ini without carriage returns and without the text of quoted strings: what remains
  # is pure line structure (`@ name`, `[label]`, `key: value`).
  unquoted =
    let pieces = strings (split "\"" (replaceStrings [ "\r" ] [ "" ] (builtins.readFile setupIni)));
    in concatStringsSep "" (genList (i: if i / 2 * 2 == i then elemAt pieces i else "") (length pieces));

  # One string per package, starting with its name; the first piece is the header.
  chunks = let all = strings (split "\n@" ("\n" + unquoted)); in genList (i: elemAt all (i + 1)) (length all - 1);

  trim = s: let m = match "[[:space:]]*(.*[^[:space:]])[[:space:]]*" s; in if m == null then "" else head m;

  # The fields of the current version: lines before the first version label, and after a
  # `[curr]` label. A later field overwrites an earlier one, as in the Rust parser.
  readChunk = chunk:
    let
      lines = strings (split "\n" chunk);
      step = state: line:
        let
          first = substring 0 1 line;
          t = trim line;
          isLabel = (first == "[" || first == " " || first == "\t")
            && substring 0 1 t == "[" && substring (stringLength t - 1) 1 t == "]";
          field = match "[[:space:]]*(category|requires|depends2|provides|install)[[:space:]]*:(.*)" line;
        in
        if isLabel then state // { current = t == "[curr]"; }
        else if state.current && field != null
        then state // { fields = state.fields // { ${head field} = trim (elemAt field 1); }; }
        else state;
      fields = (foldl' step { current = true; fields = { }; } (genList (i: elemAt lines (i + 1)) (length lines - 1))).fields;
    in
    {
      name = trim (head lines);
      value = fields;
    };

  packageFields = listToAttrs (map readChunk chunks);

  # Drops parenthesised version constraints, innermost first, so nesting is handled too.
  withoutConstraints = value:
    let stripped = concatStringsSep "" (strings (split "\\([^()]*\\)" value));
    in if stripped == value then value else withoutConstraints stripped;

  # `a, b (>= 1.0), c` or the older `a b c`: names only.
  dependencyList = value:
    filter (n: n != "") (strings (split "[[:space:],]+" (withoutConstraints value)));

  field = fields: key: fields.${key} or null;

  dependsOf = n:
    let f = packageFields.${n}; in
    if f ? depends2 then dependencyList f.depends2
    else if f ? requires then dependencyList f.requires
    else [ ];

  categoriesOf = n: let c = field packageFields.${n} "category"; in if c == null then [ ] else dependencyList c;

  # The alphabetically first package providing a name wins (listToAttrs keeps the first).
  providers = listToAttrs (concatLists (map
    (n: let p = field packageFields.${n} "provides"; in
      map (v: { name = v; value = n; }) (if p == null then [ ] else dependencyList p))
    (attrNames packageFields)));

  resolve = requiredBy: n:
    if packageFields ? ${n} then n
    else if providers ? ${n} then providers.${n}
    else if requiredBy == null then throw "cygwin package '${n}' (requested for installation) is not in setup.ini"
    else throw "cygwin package '${n}' (required by '${requiredBy}') is not in setup.ini";

  baseCategory = filter (n: elem "Base" (categoriesOf n)) (attrNames packageFields);

  roots = uniqueSorted (baseCategory ++ requiredPackages ++ packages);

  closure = sort (a: b: a < b) (map (item: item.key) (genericClosure {
    startSet = map (n: { key = resolve null n; }) roots;
    operator = item:
      map (d: { key = resolve item.key d; })
        (filter (d: d != windowsPseudoPackage) (dependsOf item.key));
  }));

  trimmedMirror =
    if stringLength mirror > 0 && substring (stringLength mirror - 1) 1 mirror == "/"
    then substring 0 (stringLength mirror - 1) mirror
    else mirror;

  # `path size sha512`, checked like the Rust parser checks it.
  parseInstall = n: value:
    let
      m = match "([^[:space:]]+)[[:space:]]+([0-9]+)[[:space:]]+([0-9a-fA-F]{128})" value;
      path = head m;
      parts = split "/" path;
      safe = substring 0 1 path != "/" && match ".*\\\\.*" path == null
        && filter (p: isString p && (p == "" || p == "." || p == "..")) parts == [ ];
    in
    if m == null then throw "setup.ini: install line of cygwin package '${n}' is not 'path size sha512' with a 128-digit hex sha512: ${value}"
    else if !safe then throw "setup.ini: install path '${path}' of cygwin package '${n}' is not a plain relative path"
    else {
      name = n;
      inherit path;
      url = "${trimmedMirror}/${path}";
      size = builtins.fromJSON (elemAt m 1);
      sha512 = replaceStrings [ "A" "B" "C" "D" "E" "F" ] [ "a" "b" "c" "d" "e" "f" ] (elemAt m 2);
    };

  archives = concatLists (map
    (n: let i = field packageFields.${n} "install"; in if i == null then [ ] else [ (parseInstall n i) ])
    closure);

  # Store path names allow letters, digits and + - . _ ? =
  storeName = s: "cygwin-" + concatStringsSep "_" (strings (split "[^A-Za-z0-9+._?=-]+" (baseNameOf s)));

  fetchArchive = a: import <nix/fetchurl.nix> {
    inherit (a) url sha512;
    name = storeName a.path;
  };

  repo = derivation {
    inherit name system;
    builder = shell;
    PATH = toolPath;
    inherit setupExe;
    setupIni = "${setupIni}";
    # Pairs of (path below the mirror directory, fetched file); paths hold no whitespace.
    archiveLinks = concatLists (map (a: [ a.path (fetchArchive a) ]) archives);
    args = [
      "-c"
      ''
        set -eu
        mirror="$out/${packagesDir}/${mirrorDir}"
        mkdir -p "$mirror/x86_64"
        cp "$setupIni" "$mirror/x86_64/setup.ini"
        ln -s "$setupExe" "$out/setup-x86_64.exe"
        set -- $archiveLinks
        while [ "$#" -ge 2 ]; do
          target="$mirror/$1"
          mkdir -p "''${target%/*}"
          ln -s "$2" "$target"
          shift 2
        done
      ''
    ];
  };
in
repo // { inherit roots closure archives; }
