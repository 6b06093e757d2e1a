# What resolve.nix and index.nix must decide alike: where a package
# source's tree is, what a derivation is, and how a package's outputs and
# meta are described. The registry passes this file's value to both as
# their `common` argument (`--arg common <this file>`), so an image
# assembled from the attribute index describes its packages exactly as a
# build's evaluation does.
rec {
  # The package set a request's "source" names.
  treeOf = source:
    if source.type == "path" then /. + source.path
    else if source.type == "git" then
      builtins.fetchGit ({ url = source.url; rev = source.rev; }
        // (if source.ref or null != null then { ref = source.ref; } else { allRefs = true; }))
    else if source.type == "channel" then
      builtins.fetchTarball "https://nixos.org/channels/${source.name}/nixexprs.tar.xz"
    else if source.type == "commit" then
      builtins.fetchTarball "https://github.com/NixOS/nixpkgs/archive/${source.rev}.tar.gz"
    else throw "unsupported package source type ${source.type}";

  isDerivation = x: builtins.isAttrs x && (x.type or null) == "derivation";

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
}
