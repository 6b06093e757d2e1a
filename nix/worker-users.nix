# The accounts of the build worker's image: root (the worker), nobody, and
# the nixbld build users Nix runs builders as (nix.conf's
# build-users-group), so that a package set's builder never runs as the
# root process that holds the task's credentials.
#
# Pure: the tests evaluate it.
#
#   nix-instantiate --eval --strict --json --expr "import ./nix/worker-users.nix { }"
{ buildUsers ? 8 }:

let
  ids = builtins.genList (i: i + 1) buildUsers;
  user = n: "nixbld${toString n}:x:${toString (30000 + n)}:30000:Nix build user ${toString n}:/var/empty:/bin/false";
in
{
  passwd = builtins.concatStringsSep "\n" ([
    "root:x:0:0:root:/root:/bin/sh"
    "nobody:x:65534:65534:nobody:/var/empty:/bin/false"
  ] ++ map user ids) + "\n";

  group = builtins.concatStringsSep "\n" [
    "root:x:0:"
    "nixbld:x:30000:${builtins.concatStringsSep "," (map (n: "nixbld${toString n}") ids)}"
    "nogroup:x:65534:"
  ] + "\n";
}
