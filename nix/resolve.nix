# Resolves a list of package names against a package set, for one image.
#
# Called by the registry as
#
#   nix-instantiate --eval --strict --json --read-write-mode \
#     resolve.nix --argstr request '<json>'
#
# where <json> is, for example,
#
#   { "source": { "type": "path", "path": "/srv/nixpkgs" },
#     "system": "x86_64-linux",
#     "packages": [ "hello", "python3packages.numpy" ],
#     "implicit": [ "cacert", "iana-etc" ] }
#
# Sources: { "type": "path", "path" }, { "type": "git", "url", "rev", "ref" },
# { "type": "channel", "name" } and { "type": "commit", "rev" } (nixpkgs).
#
# Package names arrive only as JSON data: nothing here splices them into
# Nix code. The result, printed as JSON, is
#
#   { "packages": [ { "name": "hello", "drvPath": "/nix/store/...drv",
#                     "outputs": [ "out" ], "paths": [ "/nix/store/...-hello" ] } ],
#     "unknown":  [ "names that are not packages" ] }
#
# Implicit packages the set lacks are left out silently; requested ones are
# listed in "unknown". Evaluating `drvPath` with --read-write-mode writes the
# derivations to the store, so the caller can realise exactly the listed
# outputs.
{ request }:

let
  req = builtins.fromJSON request;
  source = req.source;

  tree =
    if source.type == "path" then /. + source.path
    else if source.type == "git" then
      builtins.fetchGit ({ url = source.url; rev = source.rev; }
        // (if source.ref or null != null then { ref = source.ref; } else { allRefs = true; }))
    else if source.type == "channel" then
      builtins.fetchTarball "https://nixos.org/channels/${source.name}/nixexprs.tar.xz"
    else if source.type == "commit" then
      builtins.fetchTarball "https://github.com/NixOS/nixpkgs/archive/${source.rev}.tar.gz"
    else throw "unsupported package source type ${source.type}";

  pkgs = import tree { system = req.system; };

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;

  # "a.b.c" -> [ "a" "b" "c" ]
  splitDots = s: builtins.filter builtins.isString (builtins.split "[.]" s);

  isDerivation = x: builtins.isAttrs x && (x.type or null) == "derivation";

  # One step down an attribute path: the exact name first, then the only
  # (or, if several, the alphabetically first) name equal to it ignoring
  # case. Registry names are lowercase, nixpkgs attributes are not.
  step = set: name:
    if !(builtins.isAttrs set) || isDerivation set then null
    else if set ? ${name} then set.${name}
    else
      let
        matches = builtins.filter (n: toLower n == toLower name) (builtins.attrNames set);
      in
        if matches == [ ] then null
        else set.${builtins.head (builtins.sort builtins.lessThan matches)};

  # Attribute lookups may throw (removed packages in nixpkgs do): those
  # count as unknown too.
  lookup = name:
    let
      found = builtins.tryEval (builtins.foldl' (set: part: if set == null then null else step set part) pkgs (splitDots name));
    in
      if found.success && isDerivation found.value then found.value else null;

  outputsOf = drv:
    drv.meta.outputsToInstall or [ (drv.outputName or "out") ];

  describe = r: rec {
    inherit (r) name;
    drvPath = r.drv.drvPath;
    outputs = outputsOf r.drv;
    paths = map (o: r.drv.${o}.outPath) outputs;
  };

  resolve = names: map (name: { inherit name; drv = lookup name; }) names;
  requested = resolve req.packages;
  implicit = builtins.filter (r: r.drv != null && !(builtins.elem r.name req.packages)) (resolve (req.implicit or [ ]));

in {
  packages = map describe (builtins.filter (r: r.drv != null) requested ++ implicit);
  unknown = map (r: r.name) (builtins.filter (r: r.drv == null) requested);
}
