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

use std::collections::BTreeMap;

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

/// How the image runs (image-spec `config.md`, `config`). Fields left
/// empty are left out, so images without them keep their bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    #[serde(rename = "Env")]
    pub env: Vec<String>,
    #[serde(rename = "Cmd", skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(
        rename = "ExposedPorts",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub exposed_ports: BTreeMap<String, Empty>,
    #[serde(rename = "Labels", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `{}`: the value of each exposed port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// What a declared image sets in its config, over what the build finds
/// (the fields of [`RunConfig`] people set; see `images::declared`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigOverrides {
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=value`, over the build's own (`PATH`, certificates).
    #[serde(rename = "Env", default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `port/tcp`, `port/udp` or `port/sctp` (a bare port means tcp).
    #[serde(
        rename = "ExposedPorts",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub exposed_ports: BTreeMap<String, Empty>,
    #[serde(rename = "Labels", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl ConfigOverrides {
    /// The most bytes a declared config takes: it travels in every build
    /// request (an SQS message holds 256 KiB).
    pub const MAX_BYTES: usize = 16 * 1024;

    /// What the image spec requires of each field: the field and why not.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let size = serde_json::to_vec(self).map_or(usize::MAX, |b| b.len());
        if size > Self::MAX_BYTES {
            return Err((
                "config",
                format!("{size} bytes; the limit is {}", Self::MAX_BYTES),
            ));
        }
        // Text for a runtime, never a terminal's control sequences.
        let fields = [
            ("Cmd", self.cmd.iter().flatten().collect::<Vec<_>>()),
            ("Entrypoint", self.entrypoint.iter().flatten().collect()),
            ("Env", self.env.iter().collect()),
            ("WorkingDir", self.working_dir.iter().collect()),
            (
                "Labels",
                self.labels.iter().flat_map(|(k, v)| [k, v]).collect(),
            ),
        ];
        for (field, texts) in fields {
            if texts.iter().any(|t| t.contains(|c: char| c.is_control())) {
                return Err((field, "control characters are not allowed".to_string()));
            }
        }
        for var in &self.env {
            let name = var
                .split_once('=')
                .map(|(name, _)| name)
                .unwrap_or_default();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(("Env", format!("{var:?} is not KEY=value")));
            }
        }
        if let Some(dir) = &self.working_dir {
            if !dir.starts_with('/') {
                return Err(("WorkingDir", format!("{dir:?} is not an absolute path")));
            }
        }
        if let Some(user) = &self.user {
            if user.is_empty() || user.contains(|c: char| c.is_whitespace() || c.is_control()) {
                return Err((
                    "User",
                    format!("{user:?} is not a user (name, uid, or user:group)"),
                ));
            }
        }
        for port in self.exposed_ports.keys() {
            let (number, protocol) = port.split_once('/').unwrap_or((port, "tcp"));
            let digits = !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit());
            let number_ok = digits && number.parse::<u16>().is_ok_and(|n| n > 0);
            if !number_ok || !matches!(protocol, "tcp" | "udp" | "sctp") {
                return Err((
                    "ExposedPorts",
                    format!("{port:?} is not port/tcp, port/udp or port/sctp"),
                ));
            }
        }
        Ok(())
    }
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
            config: RunConfig {
                env,
                cmd,
                entrypoint: None,
                working_dir: None,
                user: None,
                exposed_ports: BTreeMap::new(),
                labels: BTreeMap::new(),
            },
            rootfs: RootFs {
                kind: "layers".to_string(),
                diff_ids,
            },
            history,
        }
    }

    /// The config with what a declared image sets: its `Env` over the
    /// build's (a variable set in both takes the declared value), and its
    /// other fields as given.
    pub fn with(mut self, overrides: &ConfigOverrides) -> ImageConfig {
        let run = &mut self.config;
        for var in &overrides.env {
            let name = var.split_once('=').map_or(var.as_str(), |(name, _)| name);
            run.env
                .retain(|old| old.split_once('=').map_or(old.as_str(), |(n, _)| n) != name);
            run.env.push(var.clone());
        }
        if overrides.cmd.is_some() {
            run.cmd.clone_from(&overrides.cmd);
        }
        run.entrypoint.clone_from(&overrides.entrypoint);
        run.working_dir.clone_from(&overrides.working_dir);
        run.user.clone_from(&overrides.user);
        run.exposed_ports.clone_from(&overrides.exposed_ports);
        run.labels.clone_from(&overrides.labels);
        self
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
