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

  # The value of `x`, or null if evaluating it throws. Everything below is
  # printed with --strict, so a throw left in any field would fail the
  # whole request: meta is informative, and a package with a broken one
  # (nixpkgs marks removed or insecure packages with throws) still
  # resolves. tryEval catches only `throw` and `assert`, so each value is
  # also type-checked before it is looked into or returned.
  try = x: let r = builtins.tryEval x; in if r.success then r.value else null;

  stringOr = x: if builtins.isString x then x else null;

  metaOf = drv:
    let m = try (drv.meta or { }); in if builtins.isAttrs m then m else { };

  # meta.license is one license or a list of them (attrsets as in
  # nixpkgs' lib.licenses, or free-form strings, which are no SPDX ids).
  spdxIds = license:
    let
      one = element:
        let l = try element; in
        if builtins.isAttrs l then stringOr (try (l.spdxId or null)) else null;
      all = if builtins.isAttrs license then [ license ]
        else if builtins.isList license then license
        else [ ];
    in
      builtins.filter (id: id != null) (map one all);

  # A string, or the first element of a list that is one (nixpkgs allows
  # a list of homepages).
  firstString = x:
    if builtins.isList x then
      (if builtins.length x > 0 then stringOr (try (builtins.head x)) else null)
    else stringOr x;

  describeMeta = drv:
    let
      m = metaOf drv;
      field = name: try (m.${name} or null);
    in {
      pname = stringOr (try (drv.pname or null));
      version = stringOr (try (drv.version or null));
      license = spdxIds (field "license");
      homepage = firstString (field "homepage");
      description = stringOr (field "description");
    };

  outputsOf = drv:
    (metaOf drv).outputsToInstall or [ (drv.outputName or "out") ];

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
