# Lists a package set's attributes, for the registry's attribute index
# (`nixery index`): every attribute of the top-level set and of the sets it
# recurses into, with what a pull needs to assemble an image of it without
# Nix. Called as
#
#   nix-instantiate --eval --strict --json index.nix --argstr request '<json>' \
#     --arg common "$(cat common.nix)"
#
# with <json> = { "source": <as for resolve.nix>, "system": "x86_64-linux",
# "maxDepth": 3, "names": null }: the result is then the top-level names,
# { "names": [ ... ] }. With "names": [ "hello", "python3Packages" ] (some
# of those), the result describes those attributes and what is below them:
#
#   { "entries": [ { "path": [ "python3Packages", "numpy" ], "kind": "drv",
#                    "drvPath": "/nix/store/...drv", "outputs": [ "out" ],
#                    "paths": [ "/nix/store/...-numpy-1.26.4" ],
#                    "meta": { "pname", "version", "license", "homepage",
#                              "description" } }, ... ] }
#
# Kinds: "drv" (a derivation: resolve.nix would find it), "set" (an
# attribute set recursed into: every attribute of it is listed too),
# "opaque" (an attribute set not recursed into: the index cannot answer for
# names below it), "broken" (a derivation whose outputs or derivation do
# not evaluate: only Nix can say what a build of it does), "none" (not a
# package: anything else, or a value that throws).
#
# What counts as a package, its outputs, and its meta are decided by
# common.nix, as in resolve.nix (the tests compare the two on the test
# package set). The names a request gives are ones this file listed;
# a pull's package names never reach it: the registry looks them up in the
# list. (The caller asks in batches of names, so that one attribute whose
# evaluation fails in a way no tryEval catches, such as a read outside the
# package set in restricted mode, loses only itself.)
{ request, common }:

let
  inherit (common) isDerivation try stringOr metaOf describeMeta outputsOf;
  req = builtins.fromJSON request;
  source = req.source;
  maxDepth = req.maxDepth or 3;

  tree = common.treeOf source;

  pkgs = import tree { system = req.system; };

  # A derivation's outputs and store paths, or null if any of it throws
  # (resolve.nix would fail to describe it: only a build can say why).
  describeDrv = drv:
    let
      outputs = outputsOf drv;
      described = {
        drvPath = drv.drvPath;
        inherit outputs;
        paths = map (o: drv.${o}.outPath) outputs;
      };
      checked = builtins.tryEval (builtins.deepSeq described described);
    in
      if checked.success
        && builtins.isList outputs
        && builtins.all builtins.isString outputs
      then checked.value
      else null;

  entry = path: value: depth:
    let
      v = builtins.tryEval value;
      x = v.value;
    in
      if !v.success then [ { inherit path; kind = "none"; } ]
      else if isDerivation x then
        (let d = describeDrv x; in
          if d == null then [ { inherit path; kind = "broken"; } ]
          else [ (d // { inherit path; kind = "drv"; meta = describeMeta x; }) ])
      else if builtins.isAttrs x then
        (if depth < maxDepth && (try (x.recurseForDerivations or false)) == true
         then [ { inherit path; kind = "set"; } ] ++ walk path x (depth + 1)
         else [ { inherit path; kind = "opaque"; } ])
      else [ { inherit path; kind = "none"; } ];

  walk = prefix: set: depth:
    builtins.concatLists (map (name: entry (prefix ++ [ name ]) set.${name} depth)
      (builtins.attrNames set));

in
  if req.names or null == null
  then { names = builtins.attrNames pkgs; }
  else { entries = builtins.concatLists (map (name: entry [ name ] pkgs.${name} 1) req.names); }
