//! The software bill of materials of an image: an SPDX 2.3 JSON document
//! with one package per store path of the image's Nix closure.
//!
//! Spec: SPDX 2.3 (<https://spdx.github.io/spdx-spec/v2.3/>): clause 6
//! (document creation information), 7 (packages) and 11 (relationships),
//! in the JSON form of its schema (`schemas/spdx-schema.json` at the
//! `v2.3` tag of spdx/spdx-spec), which `tests/sbom.rs` validates against.
//!
//! | SPDX field | from |
//! |---|---|
//! | `name`, `versionInfo` | the store path's name, split as nixpkgs names are ([`parse_store_name`]) |
//! | `comment` | the store path, for people |
//! | `externalRefs` | `OTHER` `nix-store-path`: the store path, for tools; for a requested package's outputs also `OTHER` `nix-derivation`: its `.drv` |
//! | `licenseDeclared`, `homepage`, `summary` | a requested package's `meta` ([`PackageMeta`]); `NOASSERTION` or absent for every other path |
//! | `downloadLocation`, `licenseConcluded` | `NOASSERTION`: a store path is built, not downloaded, and nobody has looked at its files |
//!
//! The store path is an external reference (7.21), not `sourceInfo` (7.12):
//! `sourceInfo` is free text about where the package's *source* came from,
//! while the store path identifies the package itself and is what a tool
//! reading the document looks the package up by. Category `OTHER` is the
//! one SPDX 2.3 (annex F) leaves open to types of one's own; its locator
//! must have no spaces, which a store path never has.
//!
//! Relationships: `SPDXRef-DOCUMENT DESCRIBES` each output of each
//! requested (and implicit) package, and each path `DEPENDS_ON` each path
//! it refers to.
//!
//! Everything is derived from the input: the creation time is the image's
//! build time, not the clock, and packages and relationships come out
//! sorted by store path, so the same input always gives the same bytes
//! (a rebuild of an image, at another time, gives a new document).
//! Package sets are code from outside, so everything they said (names,
//! meta) is only ever data in the document: serde escapes it, SPDX ids are
//! made of the store path's hash and name with anything outside the id
//! grammar replaced (or of a SHA-256 of the path, for anything that is not
//! a store path), and license ids and homepages that are not well formed
//! are left out rather than copied in.
//!
//! ```
//! use std::collections::BTreeMap;
//! use nixery::builder::nix::{PathInfo, ResolvedPackage};
//! use nixery::builder::sbom::{document, SbomInput};
//!
//! let hello = "/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-hello-2.12.1";
//! let bash = "/nix/store/pxjvj7jdcp3gj05xb4r5hzrjcn13h6ah-bash-interactive-5.2";
//! let mut closure = BTreeMap::new();
//! let info = |references: Vec<String>| PathInfo { nar_size: 1, nar_hash: String::new(), references };
//! closure.insert(hello.to_string(), info(vec![bash.to_string()]));
//! closure.insert(bash.to_string(), info(vec![]));
//! let roots = [ResolvedPackage {
//!     name: "hello".into(),
//!     drv_path: "/nix/store/yvk3jvafqy8dyj6y3dbddjn7brw8w4i4-hello-2.12.1.drv".into(),
//!     outputs: vec!["out".into()],
//!     paths: vec![hello.into()],
//!     meta: Default::default(),
//! }];
//! let doc = document(&SbomInput {
//!     image_name: "hello:latest",
//!     image_key: "0123abcd",
//!     manifest_digest: "sha256:4567ef",
//!     created: 0,
//!     roots: &roots,
//!     closure: &closure,
//! });
//! assert_eq!(doc.creation_info.created, "1970-01-01T00:00:00Z");
//! // Sorted by store path, so by hash.
//! assert_eq!(doc.packages[0].name, "hello");
//! assert_eq!(doc.packages[0].version_info.as_deref(), Some("2.12.1"));
//! assert_eq!(doc.packages[1].name, "bash-interactive");
//! assert_eq!(
//!     doc.relationships[1].spdx_element_id,
//!     "SPDXRef-0sd4izqfaqmcmqvjk51zk001a4xv7q74-hello-2.12.1"
//! );
//! assert_eq!(doc.relationships[1].relationship_type, "DEPENDS_ON");
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::nix::{is_store_path, Closure, PackageMeta, ResolvedPackage};
use crate::oci::digest::sha256_hex;
use crate::storage::records::rfc3339;

/// The media type of the document ([`spdx`]'s bytes).
pub const MEDIA_TYPE: &str = "application/spdx+json";

const SPDX_VERSION: &str = "SPDX-2.3";
/// SPDX 2.3 clause 6.2: the only data license a document may have.
const DATA_LICENSE: &str = "CC0-1.0";
const DOCUMENT_ID: &str = "SPDXRef-DOCUMENT";
const NOASSERTION: &str = "NOASSERTION";
/// Where document namespaces live. SPDX asks for a unique absolute URI,
/// which need not resolve; `.invalid` (RFC 2606) never does and is nobody's
/// domain, so no deployment claims a name it does not own.
const NAMESPACE_BASE: &str = "https://nixery.invalid/spdx/";
/// `externalRefs` types (category `OTHER`) for a package's store path and
/// for the derivation a requested package's outputs are built by.
pub const STORE_PATH_REF: &str = "nix-store-path";
pub const DERIVATION_REF: &str = "nix-derivation";
/// Outputs whose name nixpkgs appends to a store path's name
/// (`glibc-2.39-52-bin`): no part of the package's version.
const OUTPUT_SUFFIXES: &[&str] = &[
    "bin", "dev", "out", "lib", "man", "doc", "devdoc", "info", "debug", "static",
];

/// What the document of one image is made from.
#[derive(Debug, Clone, Copy)]
pub struct SbomInput<'a> {
    /// The name the image was pulled as (`hello/curl:latest`): the
    /// document's name. Empty: the image key instead.
    pub image_name: &'a str,
    /// The image's key, which with `manifest_digest` makes the document's
    /// namespace.
    pub image_key: &'a str,
    /// `sha256:...` of the image manifest the document describes.
    pub manifest_digest: &'a str,
    /// When the image was built, in Unix seconds.
    pub created: u64,
    /// The requested and implicit packages, in the order resolved: a path
    /// that is the output of several takes the first one's meta.
    pub roots: &'a [ResolvedPackage],
    /// Every path of the image, with its references.
    pub closure: &'a Closure,
}

/// An SPDX 2.3 document (clause 6), as far as this module fills it in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    pub spdx_version: String,
    pub data_license: String,
    #[serde(rename = "SPDXID")]
    pub spdx_id: String,
    pub name: String,
    pub document_namespace: String,
    pub comment: String,
    pub creation_info: CreationInfo,
    pub packages: Vec<Package>,
    pub relationships: Vec<Relationship>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreationInfo {
    /// RFC 3339 in UTC, to the second (clause 6.9).
    pub created: String,
    pub creators: Vec<String>,
}

/// An SPDX package (clause 7): one store path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Package {
    #[serde(rename = "SPDXID")]
    pub spdx_id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_info: Option<String>,
    pub download_location: String,
    pub files_analyzed: bool,
    pub license_concluded: String,
    pub license_declared: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub homepage: Option<String>,
    /// nixpkgs' `meta.description` is the one-line kind SPDX calls a
    /// summary (7.18); its `description` (7.19) is for longer text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    pub comment: String,
    pub external_refs: Vec<ExternalRef>,
}

/// An external reference of a package (clause 7.21).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalRef {
    pub reference_category: String,
    pub reference_type: String,
    pub reference_locator: String,
}

/// A relationship between two elements (clause 11).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Relationship {
    pub spdx_element_id: String,
    pub relationship_type: String,
    pub related_spdx_element: String,
}

/// The SBOM of an image as SPDX 2.3 JSON: the same input, the same bytes.
pub fn spdx(input: &SbomInput) -> Vec<u8> {
    serde_json::to_vec(&document(input)).expect("a document of strings always serialises")
}

/// The SBOM of an image, before serialisation.
pub fn document(input: &SbomInput) -> Document {
    // Every path the document names: the closure, and (should a caller
    // pass a closure that misses them) the roots' outputs and every
    // reference, so that no relationship points at a missing package.
    let mut paths: BTreeSet<&str> = BTreeSet::new();
    for (path, info) in input.closure {
        paths.insert(path.as_str());
        paths.extend(info.references.iter().map(String::as_str));
    }
    let mut roots: BTreeMap<&str, (&ResolvedPackage, &str)> = BTreeMap::new();
    for package in input.roots {
        for (path, output) in package.paths.iter().zip(&package.outputs) {
            roots
                .entry(path.as_str())
                .or_insert((package, output.as_str()));
            paths.insert(path.as_str());
        }
    }
    let ids = spdx_ids(&paths);

    let packages = paths
        .iter()
        .map(|path| package(path, &ids[path], roots.get(path).copied()))
        .collect();

    let mut relationships: Vec<Relationship> = roots
        .keys()
        .map(|path| relationship(DOCUMENT_ID, "DESCRIBES", &ids[path]))
        .collect();
    for (path, info) in input.closure {
        let references: BTreeSet<&str> = info
            .references
            .iter()
            .map(String::as_str)
            .filter(|r| r != path)
            .collect();
        for reference in references {
            relationships.push(relationship(
                &ids[path.as_str()],
                "DEPENDS_ON",
                &ids[reference],
            ));
        }
    }

    let name = if input.image_name.is_empty() {
        input.image_key
    } else {
        input.image_name
    };
    Document {
        spdx_version: SPDX_VERSION.to_string(),
        data_license: DATA_LICENSE.to_string(),
        spdx_id: DOCUMENT_ID.to_string(),
        name: name.to_string(),
        document_namespace: format!(
            "{NAMESPACE_BASE}{}/{}",
            uri_segment(input.image_key),
            uri_segment(input.manifest_digest)
        ),
        comment: format!(
            "The Nix closure of image {name}: manifest {}, image key {}.",
            input.manifest_digest, input.image_key
        ),
        creation_info: CreationInfo {
            created: rfc3339(input.created),
            creators: vec![format!("Tool: nixery-{}", env!("CARGO_PKG_VERSION"))],
        },
        packages,
        relationships,
    }
}

/// A store path's name, split into the parts nixpkgs makes it of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreName<'a> {
    /// The 32-character hash, when the path's last component starts with one.
    pub hash: Option<&'a str>,
    /// The package name: everything before the version.
    pub name: &'a str,
    /// From the first `-` followed by a digit on (as `pname-version`),
    /// without a trailing output name (`-bin`, `-dev`, ...).
    pub version: Option<&'a str>,
}

/// Splits `/nix/store/<hash>-<pname>-<version>[-<output>]`:
/// `hello-2.12.1` is `hello` 2.12.1, `python3.11-numpy-1.26.4` is
/// `python3.11-numpy` 1.26.4, `glibc-2.39-52-bin` is `glibc` 2.39-52, and
/// `etc` or `source` have no version. This is the rule of Nix's
/// `builtins.parseDrvName` (first `-` not followed by a letter) narrowed to
/// digits, plus the output suffix, which is not part of a version.
pub fn parse_store_name(path: &str) -> StoreName<'_> {
    let base = path.rsplit('/').next().unwrap_or(path);
    let (hash, full) = match base.split_at_checked(32) {
        Some((hash, rest)) if is_nix_hash(hash) && rest.len() > 1 && rest.starts_with('-') => {
            (Some(hash), &rest[1..])
        }
        _ => (None, base),
    };
    // Byte offsets are char boundaries here: `-` and digits are ASCII.
    let bytes = full.as_bytes();
    let split = (1..bytes.len().saturating_sub(1))
        .find(|&i| bytes[i] == b'-' && bytes[i + 1].is_ascii_digit());
    match split {
        Some(i) => StoreName {
            hash,
            name: &full[..i],
            version: Some(without_output(&full[i + 1..])),
        },
        None => StoreName {
            hash,
            name: full,
            version: None,
        },
    }
}

/// `2.39-52-bin` -> `2.39-52`.
fn without_output(version: &str) -> &str {
    match version.rsplit_once('-') {
        Some((rest, output)) if !rest.is_empty() && OUTPUT_SUFFIXES.contains(&output) => rest,
        _ => version,
    }
}

/// 32 characters of Nix's base-32 alphabet (digits and lowercase letters
/// but `e`, `o`, `t`, `u`).
fn is_nix_hash(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b.is_ascii_lowercase() && !b"eotu".contains(&b)))
}

/// A unique SPDX id (`SPDXRef-[a-zA-Z0-9.-]+`) for each path: `SPDXRef-`
/// and the path's last component, its characters outside that set made
/// `-`, for a store path; for anything else, or where two store paths
/// would meet in one id that way, `SPDXRef-path-` and the path's SHA-256.
/// The two forms cannot meet: a store path's id has its first `-` after
/// the 32-character hash.
fn spdx_ids<'a>(paths: &BTreeSet<&'a str>) -> BTreeMap<&'a str, String> {
    let mut used = BTreeSet::new();
    let mut ids = BTreeMap::new();
    for path in paths {
        let readable = is_store_path(path).then(|| {
            let base = &path["/nix/store/".len()..];
            let safe: String = base
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            format!("SPDXRef-{safe}")
        });
        let id = match readable {
            Some(id) if !used.contains(&id) => id,
            _ => format!("SPDXRef-path-{}", sha256_hex(path.as_bytes())),
        };
        used.insert(id.clone());
        ids.insert(*path, id);
    }
    ids
}

fn package(path: &str, id: &str, root: Option<(&ResolvedPackage, &str)>) -> Package {
    let parsed = parse_store_name(path);
    let name = [parsed.name, path]
        .into_iter()
        .find(|n| !n.is_empty())
        .unwrap_or("unnamed");
    let meta = root.map(|(package, _)| &package.meta);
    let mut external_refs = Vec::new();
    if is_store_path(path) {
        external_refs.push(other_ref(STORE_PATH_REF, path));
    }
    let mut comment = format!("Nix store path {path}");
    if let Some((package, output)) = root {
        if is_store_path(&package.drv_path) {
            external_refs.push(other_ref(DERIVATION_REF, &package.drv_path));
        }
        comment = format!(
            "{comment}: output {output} of {} ({})",
            package.name, package.drv_path
        );
    }
    Package {
        spdx_id: id.to_string(),
        name: name.to_string(),
        version_info: parsed.version.map(str::to_string),
        download_location: NOASSERTION.to_string(),
        files_analyzed: false,
        license_concluded: NOASSERTION.to_string(),
        license_declared: meta
            .and_then(license_expression)
            .unwrap_or_else(|| NOASSERTION.to_string()),
        homepage: meta
            .and_then(|m| m.homepage.as_deref())
            .filter(|h| is_web_url(h))
            .map(str::to_string),
        summary: meta.and_then(|m| m.description.clone()),
        comment,
        external_refs,
    }
}

/// The package's SPDX license ids joined with `AND` (nixpkgs lists every
/// license that applies to some part), or `None` if it names none that
/// is well formed.
fn license_expression(meta: &PackageMeta) -> Option<String> {
    let mut ids: Vec<&str> = Vec::new();
    for id in meta.license.iter().map(String::as_str) {
        if is_license_id(id) && !ids.contains(&id) {
            ids.push(id);
        }
    }
    (!ids.is_empty()).then(|| ids.join(" AND "))
}

/// An SPDX license id (`idstring`, with an optional `+`) that stands on
/// its own in an expression: not an operator or a special value, and not
/// a `LicenseRef-` whose text this document would have to carry.
fn is_license_id(id: &str) -> bool {
    let core = id.strip_suffix('+').unwrap_or(id);
    !core.is_empty()
        && core
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !["AND", "OR", "WITH", "NONE", "NOASSERTION"]
            .iter()
            .any(|k| core.eq_ignore_ascii_case(k))
        && !core.starts_with("LicenseRef-")
        && !core.starts_with("DocumentRef-")
}

/// An `http(s)` URL with a host and nothing a URL cannot hold unescaped.
fn is_web_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    rest.is_some_and(|rest| {
        !rest.is_empty()
            && !rest.starts_with('/')
            && url
                .chars()
                .all(|c| c.is_ascii_graphic() && !"\"<>\\^`{|}".contains(c))
    })
}

fn other_ref(kind: &str, locator: &str) -> ExternalRef {
    ExternalRef {
        reference_category: "OTHER".to_string(),
        reference_type: kind.to_string(),
        reference_locator: locator.to_string(),
    }
}

fn relationship(from: &str, kind: &str, to: &str) -> Relationship {
    Relationship {
        spdx_element_id: from.to_string(),
        relationship_type: kind.to_string(),
        related_spdx_element: to.to_string(),
    }
}

/// One URI path segment holding `s`: unreserved characters and `:` as
/// they are, every other byte (`.` too, so no segment is `..`) as `%XX`.
fn uri_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HELLO: &str = "/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-hello-2.12.1";
    const BASH: &str = "/nix/store/pxjvj7jdcp3gj05xb4r5hzrjcn13h6ah-bash-interactive-5.2";
    const BUSYBOX: &str = "/nix/store/7y2ywdwx3w8zr3kpw5g1rm4bhmlakgfs-busybox-1.35.0";
    const MULTI: &str = "/nix/store/9gwwjb5jlf4z6l8w96rdgl1mflvh97v1-libmulti-1.0";
    const MULTI_DEV: &str = "/nix/store/43g6w52n7238vcsi001ci4vqwy54nkfv-libmulti-1.0-dev";

    use crate::builder::nix::test_closure as closure;

    fn root(name: &str, outputs: &[(&str, &str)], meta: PackageMeta) -> ResolvedPackage {
        ResolvedPackage {
            name: name.to_string(),
            drv_path: format!("/nix/store/yvk3jvafqy8dyj6y3dbddjn7brw8w4i4-{name}.drv"),
            outputs: outputs.iter().map(|(o, _)| o.to_string()).collect(),
            paths: outputs.iter().map(|(_, p)| p.to_string()).collect(),
            meta,
        }
    }

    fn input<'a>(roots: &'a [ResolvedPackage], closure: &'a Closure) -> SbomInput<'a> {
        SbomInput {
            image_name: "hello/libmulti:latest",
            image_key: "4f0e1a",
            manifest_digest: "sha256:abc123",
            created: 1_795_840_200,
            roots,
            closure,
        }
    }

    fn small() -> (Vec<ResolvedPackage>, Closure) {
        let roots = vec![
            root(
                "hello",
                &[("out", HELLO)],
                PackageMeta {
                    license: vec!["GPL-3.0-or-later".into()],
                    homepage: Some("https://www.gnu.org/software/hello/".into()),
                    description: Some("Prints \"Hello, world!\"".into()),
                    ..PackageMeta::default()
                },
            ),
            root(
                "libmulti",
                &[("out", MULTI), ("dev", MULTI_DEV)],
                PackageMeta::default(),
            ),
        ];
        let closure = closure(&[
            (HELLO, &[BASH, HELLO]),
            (BASH, &[BUSYBOX]),
            (BUSYBOX, &[]),
            (MULTI, &[]),
            (MULTI_DEV, &[MULTI]),
        ]);
        (roots, closure)
    }

    fn id(path: &str) -> String {
        format!("SPDXRef-{}", &path["/nix/store/".len()..])
    }

    #[test]
    fn a_small_closure_gives_its_packages_and_relationships() {
        let (roots, closure) = small();
        let doc = document(&input(&roots, &closure));
        assert_eq!(doc.spdx_version, "SPDX-2.3");
        assert_eq!(doc.data_license, "CC0-1.0");
        assert_eq!(doc.spdx_id, "SPDXRef-DOCUMENT");
        assert_eq!(doc.name, "hello/libmulti:latest");
        assert_eq!(
            doc.document_namespace,
            "https://nixery.invalid/spdx/4f0e1a/sha256:abc123"
        );
        assert_eq!(doc.creation_info.created, "2026-11-28T04:30:00Z");
        assert_eq!(
            doc.creation_info.creators,
            vec![format!("Tool: nixery-{}", env!("CARGO_PKG_VERSION"))]
        );

        let by_path: BTreeMap<&str, &Package> = doc
            .packages
            .iter()
            .map(|p| (p.external_refs[0].reference_locator.as_str(), p))
            .collect();
        assert_eq!(
            by_path.keys().copied().collect::<Vec<_>>(),
            closure.keys().map(String::as_str).collect::<Vec<_>>()
        );
        let hello = by_path[HELLO];
        assert_eq!(hello.spdx_id, id(HELLO));
        assert_eq!(
            (hello.name.as_str(), hello.version_info.as_deref()),
            ("hello", Some("2.12.1"))
        );
        assert_eq!(hello.license_declared, "GPL-3.0-or-later");
        assert_eq!(hello.license_concluded, "NOASSERTION");
        assert_eq!(hello.download_location, "NOASSERTION");
        assert!(!hello.files_analyzed);
        assert_eq!(
            hello.homepage.as_deref(),
            Some("https://www.gnu.org/software/hello/")
        );
        assert_eq!(hello.summary.as_deref(), Some("Prints \"Hello, world!\""));
        assert!(hello.comment.contains(HELLO));
        assert_eq!(
            hello.external_refs,
            vec![
                other_ref(STORE_PATH_REF, HELLO),
                other_ref(
                    DERIVATION_REF,
                    "/nix/store/yvk3jvafqy8dyj6y3dbddjn7brw8w4i4-hello.drv"
                ),
            ]
        );
        // A dependency: name and version from its path, no meta.
        let bash = by_path[BASH];
        assert_eq!(
            (bash.name.as_str(), bash.version_info.as_deref()),
            ("bash-interactive", Some("5.2"))
        );
        assert_eq!(bash.license_declared, "NOASSERTION");
        assert_eq!((&bash.homepage, &bash.summary), (&None, &None));
        assert_eq!(bash.external_refs, vec![other_ref(STORE_PATH_REF, BASH)]);
        // Both outputs of libmulti are the same software.
        let dev = by_path[MULTI_DEV];
        assert_eq!(
            (dev.name.as_str(), dev.version_info.as_deref()),
            ("libmulti", Some("1.0"))
        );
        assert!(dev.comment.contains("output dev of libmulti"));

        let relationships: Vec<(String, &str, String)> = doc
            .relationships
            .iter()
            .map(|r| {
                (
                    r.spdx_element_id.clone(),
                    r.relationship_type.as_str(),
                    r.related_spdx_element.clone(),
                )
            })
            .collect();
        let describes = |p| ("SPDXRef-DOCUMENT".to_string(), "DESCRIBES", id(p));
        let depends = |a, b| (id(a), "DEPENDS_ON", id(b));
        assert_eq!(
            relationships,
            vec![
                describes(HELLO),
                describes(MULTI_DEV),
                describes(MULTI),
                depends(HELLO, BASH),
                depends(MULTI_DEV, MULTI),
                depends(BASH, BUSYBOX),
            ]
        );
    }

    #[test]
    fn identical_input_gives_identical_bytes() {
        let (roots, closure) = small();
        let first = spdx(&input(&roots, &closure));
        // The same closure built up in another order, references unsorted.
        let mut shuffled = Closure::new();
        for (path, info) in closure.iter().rev() {
            let mut info = info.clone();
            info.references.reverse();
            shuffled.insert(path.clone(), info);
        }
        assert_eq!(first, spdx(&input(&roots, &shuffled)));
        assert_eq!(first, spdx(&input(&roots, &closure)));
        let value: serde_json::Value = serde_json::from_slice(&first).unwrap();
        assert_eq!(value["spdxVersion"], "SPDX-2.3");
        assert_eq!(value["packages"][0]["filesAnalyzed"], false);
        assert!(value["packages"][0].get("versionInfo").is_some());
    }

    #[test]
    fn store_names_split_like_nixpkgs() {
        fn split(path: &str) -> (&str, Option<&str>) {
            let n = parse_store_name(path);
            (n.name, n.version)
        }
        let h = "/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-";
        for (name, expected) in [
            ("hello-2.12.1", ("hello", Some("2.12.1"))),
            (
                "python3.11-numpy-1.26.4",
                ("python3.11-numpy", Some("1.26.4")),
            ),
            ("glibc-2.39-52-bin", ("glibc", Some("2.39-52"))),
            ("glibc-2.39-52", ("glibc", Some("2.39-52"))),
            ("libmulti-1.0-dev", ("libmulti", Some("1.0"))),
            (
                "bash-interactive-5.2-p15",
                ("bash-interactive", Some("5.2-p15")),
            ),
            ("iana-etc-20230316", ("iana-etc", Some("20230316"))),
            ("7zip-23.01", ("7zip", Some("23.01"))),
            ("etc", ("etc", None)),
            ("source", ("source", None)),
            ("hello-world", ("hello-world", None)),
            ("-1.0", ("-1.0", None)),
            ("a-1", ("a", Some("1"))),
            ("a-", ("a-", None)),
        ] {
            assert_eq!(split(&format!("{h}{name}")), expected, "{name}");
            assert_eq!(
                parse_store_name(&format!("{h}{name}")).hash,
                Some("0sd4izqfaqmcmqvjk51zk001a4xv7q74")
            );
        }
        // No hash: the whole last component is the name.
        assert_eq!(
            parse_store_name("hello-2.12.1"),
            StoreName {
                hash: None,
                name: "hello",
                version: Some("2.12.1")
            }
        );
        assert_eq!(parse_store_name("/nix/store/hello-2.12.1").hash, None);
        assert_eq!(
            parse_store_name("/nix/store/EEEEizqfaqmcmqvjk51zk001a4xv7q74-x").hash,
            None
        );
        assert_eq!(split(""), ("", None));
        assert_eq!(split("/nix/store/"), ("", None));
        assert_eq!(split("é-1"), ("é", Some("1")));
        assert_eq!(split("é"), ("é", None));
    }

    #[test]
    fn hostile_paths_and_meta_stay_data() {
        let evil =
            r#"/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-x","SPDXID":"SPDXRef-DOCUMENT"}],"x":["#;
        let spaced = "/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-a b\n-1.0";
        let roots = vec![root(
            "evil\"name",
            &[("out", evil)],
            PackageMeta {
                license: vec![
                    "MIT OR (".into(),
                    "AND".into(),
                    "LicenseRef-secret".into(),
                    "MIT".into(),
                    "Apache-2.0+".into(),
                    "MIT".into(),
                ],
                homepage: Some("javascript:alert(1)".into()),
                description: Some("\"}]\u{0}</script>".into()),
                ..PackageMeta::default()
            },
        )];
        let closure = closure(&[(evil, &[spaced, HELLO]), (spaced, &[]), (HELLO, &[])]);
        let bytes = spdx(&input(&roots, &closure));
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let packages = value["packages"].as_array().unwrap();
        assert_eq!(packages.len(), 3);
        let ids: BTreeSet<&str> = packages
            .iter()
            .map(|p| p["SPDXID"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 3);
        assert!(ids.iter().all(|id| is_spdx_id(id)), "{ids:?}");
        assert!(!ids.contains("SPDXRef-DOCUMENT"));
        let evil_package = packages
            .iter()
            .find(|p| p["comment"].as_str().unwrap().contains(evil))
            .unwrap();
        assert_eq!(evil_package["licenseDeclared"], "MIT AND Apache-2.0+");
        assert!(evil_package.get("homepage").is_none());
        assert_eq!(evil_package["summary"], "\"}]\u{0}</script>");
        // Neither the path nor the derivation (named after the package) is
        // a store path, so no externalRef (whose locator may hold no
        // space); the comment still has them.
        assert_eq!(evil_package["externalRefs"], serde_json::json!([]));
        assert!(evil_package["comment"]
            .as_str()
            .unwrap()
            .contains("-evil\"name.drv"));
        assert_eq!(value["relationships"].as_array().unwrap().len(), 3);
        for r in value["relationships"].as_array().unwrap() {
            assert!(ids.contains(r["relatedSpdxElement"].as_str().unwrap()));
        }
    }

    #[test]
    fn ids_are_unique_even_where_names_meet() {
        let a = "/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-a+b";
        let b = "/nix/store/0sd4izqfaqmcmqvjk51zk001a4xv7q74-a_b";
        let paths: BTreeSet<&str> = [a, b, "relative-1.0", "/elsewhere/x"].into();
        let ids = spdx_ids(&paths);
        assert_eq!(ids[a], "SPDXRef-0sd4izqfaqmcmqvjk51zk001a4xv7q74-a-b");
        assert!(ids[b].starts_with("SPDXRef-path-"));
        assert!(ids["relative-1.0"].starts_with("SPDXRef-path-"));
        assert_eq!(ids.values().collect::<BTreeSet<_>>().len(), 4);
    }

    #[test]
    fn licenses_and_homepages_that_are_not_well_formed_are_left_out() {
        let meta = |ids: &[&str]| PackageMeta {
            license: ids.iter().map(|s| s.to_string()).collect(),
            ..PackageMeta::default()
        };
        assert_eq!(license_expression(&meta(&[])), None);
        assert_eq!(license_expression(&meta(&["", "a b", "or"])), None);
        assert_eq!(
            license_expression(&meta(&["GPL-2.0-only", "LGPL-2.1-or-later"])).as_deref(),
            Some("GPL-2.0-only AND LGPL-2.1-or-later")
        );
        assert!(is_web_url("https://www.gnu.org/software/hello/"));
        assert!(is_web_url("http://example.org"));
        for bad in [
            "",
            "https://",
            "https:///x",
            "ftp://x.org",
            "see README",
            "https://x.org/a b",
            "https://x.org/\"",
        ] {
            assert!(!is_web_url(bad), "{bad}");
        }
    }

    #[test]
    fn namespaces_are_one_absolute_uri_per_image_and_manifest() {
        assert_eq!(uri_segment("sha256:ab09"), "sha256:ab09");
        assert_eq!(uri_segment("../a b/#?"), "%2E%2E%2Fa%20b%2F%23%3F");
        let (roots, closure) = small();
        let a = document(&input(&roots, &closure)).document_namespace;
        let mut other = input(&roots, &closure);
        other.manifest_digest = "sha256:def456";
        assert_ne!(a, document(&other).document_namespace);
        other.image_name = "";
        assert_eq!(document(&other).name, "4f0e1a");
    }

    fn is_spdx_id(id: &str) -> bool {
        id.strip_prefix("SPDXRef-").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        })
    }

    proptest! {
        // Any name without a `/` (which would start another component).
        #[test]
        fn any_store_name_splits_into_its_own_parts(
            hash in "[0-9a-df-np-sv-z]{32}",
            name in "[a-zA-Z0-9+._?=-]{1,20}|[^/]{0,20}",
        ) {
            let path = format!("/nix/store/{hash}-{name}");
            let parsed = parse_store_name(&path);
            let full = if parsed.hash.is_some() { name.as_str() } else { &path["/nix/store/".len()..] };
            prop_assert!(full.starts_with(parsed.name));
            if let Some(version) = parsed.version {
                let rest = &full[parsed.name.len()..];
                prop_assert!(rest.starts_with('-') && rest[1..].starts_with(version));
                prop_assert!(version.starts_with(|c: char| c.is_ascii_digit()));
            } else {
                prop_assert_eq!(parsed.name, full);
            }
        }

        // One hash and names that often sanitise alike (`a+b`, `a_b`),
        // or anything at all.
        #[test]
        fn any_paths_get_unique_well_formed_ids(
            paths in proptest::collection::btree_set(
                "/nix/store/0{32}-[a+_]{1,3}|\\PC{0,12}", 0..20),
        ) {
            let paths: BTreeSet<&str> = paths.iter().map(String::as_str).collect();
            let ids = spdx_ids(&paths);
            prop_assert_eq!(ids.len(), paths.len());
            prop_assert_eq!(ids.values().collect::<BTreeSet<_>>().len(), paths.len());
            prop_assert!(ids.values().all(|id| is_spdx_id(id)), "{:?}", ids);
        }
    }

    #[test]
    fn created_is_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_840_200), "2026-11-28T04:30:00Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
    }
}
