//! The SBOM of a real image closure: resolve, realise and read the closure
//! of fixture packages with real Nix, make the SPDX document, and have two
//! independent validators check it:
//!
//! - the official SPDX 2.3 JSON schema (`schemas/spdx-schema.json` at the
//!   `v2.3` tag of spdx/spdx-spec, which the PyPI package `lib4sbom` ships
//!   byte for byte as `lib4sbom/schemas/spdx/2.3-schema.json`), with
//!   Python's `jsonschema`;
//! - `pyspdxtools` (PyPI `spdx-tools`, the SPDX project's own), which also
//!   checks what the schema cannot: the SPDX id grammar, that every
//!   relationship names an element of the document, license expressions,
//!   URIs and URLs.
//!
//! Both are installed by `.ci/setup --test`. A broken document must fail
//! them, or passing would mean nothing: one test checks that too.
// The integration tier: needs real Nix and the SPDX validators (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{fixture_pkgs, unique};
use nixery::builder::nix::{Closure, Nix, ResolveRequest, Resolved, SourceArg};
use nixery::builder::sbom::{spdx, SbomInput, STORE_PATH_REF};
use serde_json::Value;

/// Validates the official SPDX 2.3 JSON schema against the document named
/// by argv[1], after checking that the schema is the one for 2.3.
const SCHEMA_CHECK: &str = r#"
import json, sys
from importlib.resources import files
import jsonschema
schema = json.loads(files("lib4sbom").joinpath("schemas/spdx/2.3-schema.json").read_text())
if schema.get("title") != "SPDX 2.3":
    sys.exit("lib4sbom's schema is not SPDX 2.3's: " + repr(schema.get("title")))
jsonschema.Draft7Validator.check_schema(schema)
with open(sys.argv[1]) as f:
    document = json.load(f)
errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(document), key=str)
for error in errors:
    print("/".join(map(str, error.absolute_path)) + ": " + error.message, file=sys.stderr)
sys.exit(1 if errors else 0)
"#;

/// Runs both validators on an SPDX JSON file; what they said if either
/// rejects it.
fn validate(file: &Path) -> Result<(), String> {
    let mut failures = Vec::new();
    let schema = Command::new("python3")
        .args(["-c", SCHEMA_CHECK])
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .expect("running python3 (installed by .ci/setup --test)");
    if !schema.status.success() {
        failures.push(format!(
            "SPDX 2.3 JSON schema: {}{}",
            String::from_utf8_lossy(&schema.stdout),
            String::from_utf8_lossy(&schema.stderr)
        ));
    }
    let tools = Command::new("pyspdxtools")
        .arg("-i")
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .expect("running pyspdxtools (PyPI spdx-tools, installed by .ci/setup --test)");
    if !tools.status.success() {
        failures.push(format!(
            "pyspdxtools: {}{}",
            String::from_utf8_lossy(&tools.stdout),
            String::from_utf8_lossy(&tools.stderr)
        ));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

fn path_source(dir: &Path) -> SourceArg {
    SourceArg::Path {
        path: dir.to_string_lossy().into_owned(),
    }
}

async fn resolve(nix: &Nix, source: SourceArg, packages: &[&str], implicit: &[&str]) -> Resolved {
    nix.resolve(&ResolveRequest {
        source,
        system: "x86_64-linux".to_string(),
        packages: packages.iter().map(|p| p.to_string()).collect(),
        implicit: implicit.iter().map(|p| p.to_string()).collect(),
        not_before: 0,
    })
    .await
    .expect("resolving")
}

/// The document of a real closure, and the closure.
async fn fixture_sbom() -> (Vec<u8>, Closure, Resolved) {
    let nix = Nix::new(Duration::from_secs(300));
    let resolved = resolve(
        &nix,
        path_source(&fixture_pkgs()),
        &["hello", "bashInteractive", "libmulti"],
        &["cacert"],
    )
    .await;
    assert!(resolved.unknown.is_empty(), "{:?}", resolved.unknown);
    nix.realise(&resolved.packages, |_| {})
        .await
        .expect("realising");
    let roots: Vec<String> = resolved
        .packages
        .iter()
        .flat_map(|p| p.paths.clone())
        .collect();
    let closure = nix.closure(&roots).await.expect("reading the closure");
    let bytes = spdx(&SbomInput {
        image_name: "hello/bashInteractive/libmulti:latest",
        image_key: "5e0f7c2d9a1b4c3e8f6a7b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e",
        manifest_digest: "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        created: 1_795_840_200,
        roots: &resolved.packages,
        closure: &closure,
    });
    (bytes, closure, resolved)
}

fn write(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
    // pyspdxtools picks its parser by the file's ending.
    let file = dir.join(format!("sbom-{}.spdx.json", unique()));
    std::fs::write(&file, bytes).expect("writing the document");
    file
}

#[tokio::test]
async fn a_real_closure_makes_a_valid_spdx_2_3_document() {
    let (bytes, closure, resolved) = fixture_sbom().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), &bytes);
    if let Err(problems) = validate(&file) {
        panic!(
            "invalid SPDX 2.3 document:\n{problems}\n{}",
            String::from_utf8_lossy(&bytes)
        );
    }

    let doc: Value = serde_json::from_slice(&bytes).unwrap();
    let packages = doc["packages"].as_array().unwrap();
    // Every closure path, each once, by its store path.
    let listed: Vec<&str> = packages
        .iter()
        .map(|p| {
            let refs = p["externalRefs"].as_array().unwrap();
            let store: Vec<&str> = refs
                .iter()
                .filter(|r| r["referenceType"] == STORE_PATH_REF)
                .map(|r| r["referenceLocator"].as_str().unwrap())
                .collect();
            assert_eq!(store.len(), 1, "{p}");
            assert!(p["comment"].as_str().unwrap().contains(store[0]));
            store[0]
        })
        .collect();
    let expected: Vec<&str> = closure.keys().map(String::as_str).collect();
    assert_eq!(listed, expected);
    assert!(
        closure.len() >= 6,
        "hello, bash, busybox, libmulti out and dev, cacert: {closure:?}"
    );

    // The document describes exactly the requested and implicit outputs.
    let id_of = |path: &str| {
        packages
            .iter()
            .zip(&listed)
            .find(|(_, p)| **p == path)
            .map(|(package, _)| package["SPDXID"].as_str().unwrap().to_string())
            .unwrap()
    };
    let relationships = doc["relationships"].as_array().unwrap();
    let related = |kind: &str, from: &str| -> BTreeSet<String> {
        relationships
            .iter()
            .filter(|r| r["relationshipType"] == kind && r["spdxElementId"] == from)
            .map(|r| r["relatedSpdxElement"].as_str().unwrap().to_string())
            .collect()
    };
    let roots: BTreeSet<String> = resolved
        .packages
        .iter()
        .flat_map(|p| p.paths.iter().map(|path| id_of(path)))
        .collect();
    assert_eq!(roots.len(), 5);
    assert_eq!(related("DESCRIBES", "SPDXRef-DOCUMENT"), roots);
    // And each path depends on exactly what it refers to.
    for (path, info) in &closure {
        let refs: BTreeSet<String> = info.references.iter().map(|r| id_of(r)).collect();
        assert_eq!(related("DEPENDS_ON", &id_of(path)), refs, "{path}");
    }

    // Meta of the requested packages, from the fixture package set.
    let hello = &packages[listed
        .iter()
        .position(|p| p.ends_with("-hello-2.12.1"))
        .unwrap()];
    assert_eq!(hello["name"], "hello");
    assert_eq!(hello["versionInfo"], "2.12.1");
    assert_eq!(hello["licenseDeclared"], "GPL-3.0-or-later");
    assert_eq!(hello["homepage"], "https://www.gnu.org/software/hello/");
    assert_eq!(hello["summary"], "Prints \"Hello, world!\"");
    let bash = &packages[listed
        .iter()
        .position(|p| p.ends_with("-bash-interactive-5.2"))
        .unwrap()];
    // A list of licenses, one without an SPDX id; a list of homepages.
    assert_eq!(bash["licenseDeclared"], "GPL-3.0-or-later");
    assert_eq!(bash["homepage"], "https://www.gnu.org/software/bash/");
    let busybox = &packages[listed
        .iter()
        .position(|p| p.ends_with("-busybox-1.35.0"))
        .unwrap()];
    assert_eq!(busybox["licenseDeclared"], "NOASSERTION");
    assert!(busybox.get("homepage").is_none());
}

#[tokio::test]
async fn the_validators_reject_broken_documents() {
    let (bytes, _, _) = fixture_sbom().await;
    let dir = tempfile::tempdir().unwrap();
    let good: Value = serde_json::from_slice(&bytes).unwrap();
    // Each validator catches what the other cannot: the schema knows the
    // field names and types, pyspdxtools the ids, references and licenses.
    const SCHEMA: &str = "SPDX 2.3 JSON schema";
    const TOOLS: &str = "pyspdxtools";
    type Breakage = (&'static str, &'static str, fn(&mut Value));
    let breakages: [Breakage; 6] = [
        ("no spdxVersion", SCHEMA, |d| {
            d.as_object_mut().unwrap().remove("spdxVersion");
        }),
        ("a misspelt field", SCHEMA, |d| {
            let p = d["packages"][0].as_object_mut().unwrap();
            let v = p.remove("versionInfo").unwrap();
            p.insert("version".into(), v);
        }),
        ("a string for a boolean", SCHEMA, |d| {
            d["packages"][0]["filesAnalyzed"] = "false".into();
        }),
        ("a bad SPDX id", TOOLS, |d| {
            d["packages"][0]["SPDXID"] = "SPDXRef-a/b".into();
        }),
        ("a relationship to nothing", TOOLS, |d| {
            d["relationships"][0]["relatedSpdxElement"] = "SPDXRef-missing".into();
        }),
        ("a bad license expression", TOOLS, |d| {
            d["packages"][0]["licenseDeclared"] = "MIT OR (".into();
        }),
    ];
    for (what, validator, breakage) in breakages {
        let mut broken = good.clone();
        breakage(&mut broken);
        let file = write(dir.path(), &serde_json::to_vec(&broken).unwrap());
        match validate(&file) {
            Ok(()) => panic!("{what} passed validation"),
            Err(problems) => assert!(
                problems.contains(validator),
                "{what}: {validator} did not catch it: {problems}"
            ),
        }
    }
}

/// Package meta that throws, has the wrong type or is missing: the package
/// still resolves, with the meta it has.
#[tokio::test]
async fn broken_meta_still_resolves() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("default.nix"),
        r#"
{ system ? builtins.currentSystem }:
let
  # Evaluated only, never built.
  mk = name: attrs: derivation { inherit name system; builder = "/bin/sh"; } // attrs;
in {
  metaThrows = mk "meta-throws-1.0" { meta = throw "no meta"; };
  fieldsThrow = mk "fields-throw-1.0" {
    pname = throw "no pname";
    version = throw "no version";
    meta = {
      license = throw "no license";
      homepage = throw "no homepage";
      description = throw "no description";
    };
  };
  elementsThrow = mk "elements-throw-1.0" {
    meta = {
      license = [ (throw "x") { spdxId = throw "y"; } { spdxId = "MIT"; } "Apache-2.0" { spdxId = 3; } ];
      homepage = [ (throw "z") "https://example.org" ];
      description = "d${throw "interpolated"}";
    };
  };
  wrongTypes = mk "wrong-types-1.0" {
    pname = 1;
    version = [ "1" ];
    meta = { license = "MIT"; homepage = { url = "x"; }; description = 42; };
  };
  metaNotAttrs = mk "meta-not-attrs" { meta = "a string"; };
  fine = mk "fine-2.0" {
    pname = "fine";
    version = "2.0";
    meta = {
      license = [ { spdxId = "MIT"; } { spdxId = "Apache-2.0"; } ];
      homepage = "https://example.org/fine";
      description = "Fine";
    };
  };
}
"#,
    )
    .unwrap();
    let nix = Nix::new(Duration::from_secs(120));
    let names = [
        "metaThrows",
        "fieldsThrow",
        "elementsThrow",
        "wrongTypes",
        "metaNotAttrs",
        "fine",
    ];
    let resolved = resolve(&nix, path_source(dir.path()), &names, &[]).await;
    assert!(resolved.unknown.is_empty(), "{:?}", resolved.unknown);
    let got: Vec<&str> = resolved.packages.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(got, names);
    for package in &resolved.packages[..5] {
        assert_eq!(package.outputs, ["out"], "{}", package.name);
        let meta = &package.meta;
        assert_eq!(
            (
                &meta.pname,
                &meta.version,
                &meta.homepage,
                &meta.description
            ),
            (&None, &None, &None, &None),
            "{}",
            package.name
        );
        let license: &[&str] = if package.name == "elementsThrow" {
            &["MIT"]
        } else {
            &[]
        };
        assert_eq!(meta.license, license, "{}", package.name);
    }
    let fine = &resolved.packages[5].meta;
    assert_eq!(fine.pname.as_deref(), Some("fine"));
    assert_eq!(fine.version.as_deref(), Some("2.0"));
    assert_eq!(fine.license, ["MIT", "Apache-2.0"]);
    assert_eq!(fine.homepage.as_deref(), Some("https://example.org/fine"));
    assert_eq!(fine.description.as_deref(), Some("Fine"));
}

/// What the registry answers at `path`, as JSON, with its content type.
async fn get_json(server: &common::Server, path: &str) -> (String, serde_json::Value) {
    let response = reqwest::get(server.url(path)).await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    (content_type, response.json().await.unwrap())
}

#[tokio::test]
async fn every_image_s_sbom_is_found_through_the_referrers_api() {
    let server = common::Server::start();
    let response = reqwest::get(server.url("/v2/shell/hello/manifests/latest"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let image = response.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string();

    let (content_type, index) =
        get_json(&server, &format!("/v2/shell/hello/referrers/{image}")).await;
    assert_eq!(content_type, "application/vnd.oci.image.index.v1+json");
    let listed = index["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{index}");
    assert_eq!(listed[0]["artifactType"], nixery::builder::sbom::MEDIA_TYPE);

    // The artifact manifest names the image as its subject, and the SBOM.
    let artifact = listed[0]["digest"].as_str().unwrap();
    let (_, manifest) = get_json(&server, &format!("/v2/shell/hello/manifests/{artifact}")).await;
    assert_eq!(manifest["subject"]["digest"], image.as_str());
    assert_eq!(manifest["artifactType"], nixery::builder::sbom::MEDIA_TYPE);
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.empty.v1+json"
    );
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let document = reqwest::get(server.url(&format!("/v2/shell/hello/blobs/{layer}")))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    validate(&write(dir.path(), &document)).unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&document).unwrap();
    assert!(
        parsed["packages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "hello" && p["versionInfo"] == "2.12.1"),
        "{parsed}"
    );

    // Filtered by artifact type, which the answer says.
    let filtered = reqwest::get(server.url(&format!(
        "/v2/shell/hello/referrers/{image}?artifactType=application%2Fspdx%2Bjson"
    )))
    .await
    .unwrap();
    assert_eq!(filtered.headers()["oci-filters-applied"], "artifactType");
    let filtered: serde_json::Value = filtered.json().await.unwrap();
    assert_eq!(filtered["manifests"].as_array().unwrap().len(), 1);
    let (_, other) = get_json(
        &server,
        &format!("/v2/shell/hello/referrers/{image}?artifactType=application/vnd.example"),
    )
    .await;
    assert_eq!(other["manifests"], serde_json::json!([]));

    // A manifest nothing refers to has an empty list; a bad digest is a
    // registry error.
    let (_, none) = get_json(&server, &format!("/v2/shell/hello/referrers/{artifact}")).await;
    assert_eq!(none["manifests"], serde_json::json!([]));
    let bad = reqwest::get(server.url("/v2/shell/hello/referrers/sha256:nothex"))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // skopeo reads the artifact like any manifest, and checks its blobs.
    let copy = dir.path().join("artifact");
    common::skopeo_copy(
        &server,
        &format!("shell/hello@{artifact}"),
        &format!("dir:{}", copy.display()),
    );
    let copied: serde_json::Value =
        serde_json::from_slice(&std::fs::read(copy.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(copied["subject"]["digest"], image.as_str());
}
