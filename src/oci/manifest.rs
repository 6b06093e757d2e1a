//! OCI image manifest and image config, as served.
//!
//! Implements the OCI image spec's `application/vnd.oci.image.manifest.v1+json`
//! (image-spec `manifest.md`) and `application/vnd.oci.image.config.v1+json`
//! (`config.md`). Both are serialised once, stored, and served byte for byte:
//! their digests are the sha256 of exactly these bytes. Nothing in them
//! depends on time or on what was cached before, so equal inputs give equal
//! bytes.
//!
//! ```
//! use nixery::oci::manifest::{ImageConfig, Descriptor, Manifest, MEDIA_TYPE_CONFIG};
//! let config = ImageConfig::new("amd64", vec!["sha256:aa".into()], vec!["PATH=/bin".into()], None);
//! let bytes = config.to_bytes();
//! let manifest = Manifest::new(Descriptor::of(MEDIA_TYPE_CONFIG, &bytes), vec![]);
//! assert!(String::from_utf8(manifest.to_bytes()).unwrap().contains("\"schemaVersion\":2"));
//! ```

use serde::{Deserialize, Serialize};

use super::digest::sha256_digest;

pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// An image index (image-spec `image-index.md`): one manifest per platform.
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The empty JSON object an artifact manifest has for a config
/// (image-spec `manifest.md`, "Guidance for an Empty Descriptor").
pub const MEDIA_TYPE_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_JSON: &[u8] = b"{}";
/// Docker's name for an index, which Docker clients ask for.
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// A content descriptor (image-spec `descriptor.md`). The optional fields
/// are left out when empty, so descriptors without them keep their bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    /// The platform of a manifest in an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// The artifact type of a manifest in a referrers index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    /// Describes some bytes.
    pub fn of(media_type: &str, bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest: sha256_digest(bytes),
            size: bytes.len() as u64,
            platform: None,
            artifact_type: None,
        }
    }
}

/// `os` and `architecture` of an image (image-index `platform`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

impl Platform {
    pub fn linux(architecture: &str) -> Platform {
        Platform {
            architecture: architecture.to_string(),
            os: "linux".to_string(),
        }
    }
}

/// An image index: the manifests of one image for several platforms, or
/// the artifacts that refer to a manifest (the referrers API's answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    pub media_type: String,
    pub manifests: Vec<Descriptor>,
}

impl ImageIndex {
    pub fn new(manifests: Vec<Descriptor>) -> ImageIndex {
        ImageIndex {
            schema_version: 2,
            media_type: MEDIA_TYPE_INDEX.to_string(),
            manifests,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an index always serialises")
    }
}

/// The media type a stored manifest or index states (its `mediaType`).
pub fn media_type_of(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Typed {
        media_type: Option<String>,
    }
    serde_json::from_slice::<Typed>(bytes).ok()?.media_type
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    pub media_type: String,
    /// What an artifact manifest holds (an SBOM, ...); none for images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    /// The manifest an artifact is about (the referrers API lists it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
}

impl Manifest {
    pub fn new(config: Descriptor, layers: Vec<Descriptor>) -> Manifest {
        Manifest {
            schema_version: 2,
            media_type: MEDIA_TYPE_MANIFEST.to_string(),
            artifact_type: None,
            config,
            layers,
            subject: None,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serialises")
    }
}

/// The image config: always complete (Kubernetes refuses images without one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    pub config: RunConfig,
    pub rootfs: RootFs,
    pub history: Vec<History>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    #[serde(rename = "Env")]
    pub env: Vec<String>,
    #[serde(rename = "Cmd", skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub created_by: String,
}

impl ImageConfig {
    pub fn new(
        architecture: &str,
        diff_ids: Vec<String>,
        env: Vec<String>,
        cmd: Option<Vec<String>>,
    ) -> ImageConfig {
        let history = diff_ids
            .iter()
            .map(|_| History {
                created_by: "nixery".to_string(),
            })
            .collect();
        ImageConfig {
            architecture: architecture.to_string(),
            os: "linux".to_string(),
            config: RunConfig { env, cmd },
            rootfs: RootFs {
                kind: "layers".to_string(),
                diff_ids,
            },
            history,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a config always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_every_required_field() {
        let config = ImageConfig::new(
            "arm64",
            vec!["sha256:11".into()],
            vec!["PATH=/bin".into()],
            Some(vec!["bash".into()]),
        );
        let value: serde_json::Value = serde_json::from_slice(&config.to_bytes()).unwrap();
        assert_eq!(value["architecture"], "arm64");
        assert_eq!(value["os"], "linux");
        assert_eq!(value["rootfs"]["type"], "layers");
        assert_eq!(value["rootfs"]["diff_ids"][0], "sha256:11");
        assert_eq!(value["config"]["Env"][0], "PATH=/bin");
        assert_eq!(value["config"]["Cmd"][0], "bash");
        assert_eq!(value["history"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn serialisation_is_stable() {
        let make = || {
            let config = ImageConfig::new("amd64", vec![], vec![], None).to_bytes();
            Manifest::new(Descriptor::of(MEDIA_TYPE_CONFIG, &config), vec![]).to_bytes()
        };
        assert_eq!(make(), make());
        let parsed: Manifest = serde_json::from_slice(&make()).unwrap();
        assert_eq!(parsed.to_bytes(), make());
    }
}
