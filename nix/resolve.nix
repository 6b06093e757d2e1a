# Resolves a list of package names against a package set, for one image.
#
# Called by the registry as
#
#   nix-instantiate --eval --strict --json --read-write-mode \
#     resolve.nix --argstr request '<json>' --arg common "$(cat common.nix)"
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
#                     "outputs": [ "out" ], "paths": [ "/nix/store/...-hello" ],
#                     "meta": { "pname": "hello", "version": "2.12.1",
#                               "license": [ "GPL-3.0-or-later" ],
#                               "homepage": "https://...", "description": "..." } } ],
#     "unknown":  [ "names that are not packages" ] }
#
# `meta` is what the package set says about a package without building it
# (for the image's SBOM): each field is null (or an empty list) when the
# package does not say, says it with another type, or throws. `license`
# holds only SPDX identifiers (`meta.license.spdxId`, of one license or of
# each in a list); licenses without one are left out.
#
# Implicit packages the set lacks are left out silently; requested ones are
# listed in "unknown". Evaluating `drvPath` with --read-write-mode writes the
# derivations to the store, so the caller can realise exactly the listed
# outputs.
{ request, common }:

let
  inherit (common) isDerivation try stringOr metaOf describeMeta outputsOf;
  req = builtins.fromJSON request;
  source = req.source;

  tree = common.treeOf source;

  pkgs = import tree { system = req.system; };

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;

  # "a.b.c" -> [ "a" "b" "c" ]
  splitDots = s: builtins.filter builtins.isString (builtins.split "[.]" s);

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


  describe = r: rec {
    inherit (r) name;
    drvPath = r.drv.drvPath;
    outputs = outputsOf r.drv;
    paths = map (o: r.drv.${o}.outPath) outputs;
    meta = describeMeta r.drv;
  };

  resolve = names: map (name: { inherit name; drv = lookup name; }) names;
  requested = resolve req.packages;
  implicit = builtins.filter (r: r.drv != null && !(builtins.elem r.name req.packages)) (resolve (req.implicit or [ ]));

in {
  packages = map describe (builtins.filter (r: r.drv != null) requested ++ implicit);
  unknown = map (r: r.name) (builtins.filter (r: r.drv == null) requested);
}
