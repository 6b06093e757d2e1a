//! What a build is asked for ([`BuildRequest`]), and the key its image is
//! stored under: a hash of everything that decides the image's bytes,
//! computed from the request itself, so that no message from a queue
//! can name one image and ask for another.

use serde::{Deserialize, Serialize};

use super::compress::Compression;
use crate::oci::manifest::ConfigOverrides;
use crate::oci::name::ImageSpec;
use crate::source::{Resolved as ResolvedSource, SourceArg};
use crate::storage::keys::ImageKey;

/// Bumped whenever the bytes of images built from the same inputs change.
pub const IMAGE_FORMAT: u32 = 1;

/// Everything a build needs to know. Its image's key is
/// [`BuildRequest::image_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRequest {
    pub packages: Vec<String>,
    pub system: String,
    pub architecture: String,
    pub source: SourceArg,
    pub layer_budget: usize,
    /// Packages added to every image when the package set has them.
    #[serde(default)]
    pub implicit: Vec<String>,
    /// A stored image built before this time (Unix seconds) is stale: its
    /// source has moved on since. See
    /// [`crate::storage::records::ImageRecord::is_current`].
    #[serde(default)]
    pub not_before: u64,
    /// How the layers are compressed.
    #[serde(default)]
    pub compression: Compression,
    /// The name and tag the image was first asked for as: shown in its
    /// build status, no part of its key.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub tag: String,
    /// What a declared image sets in its config; part of its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigOverrides>,
}

impl BuildRequest {
    /// The request for an image spec: packages (sorted), architecture, the
    /// resolved package source, the implicit packages and the compression
    /// all go into the key.
    pub fn new(
        spec: &ImageSpec,
        source: &ResolvedSource,
        layer_budget: usize,
        implicit: &[String],
        compression: Compression,
        not_before: u64,
    ) -> BuildRequest {
        BuildRequest {
            packages: spec.packages.iter().cloned().collect(),
            system: spec.arch.nix_system().to_string(),
            architecture: spec.arch.oci_name().to_string(),
            source: source.arg.clone(),
            layer_budget,
            implicit: implicit.to_vec(),
            not_before,
            compression,
            name: spec.name.clone(),
            tag: spec.tag.clone(),
            config: spec.config.clone(),
        }
    }

    /// The storage identity of the requested image: a hash of everything
    /// that decides its bytes, and of nothing else (not the name it was
    /// asked for as, not `not_before`).
    pub fn image_key(&self) -> ImageKey {
        let canonical = serde_json::json!({
            "format": IMAGE_FORMAT,
            "packages": self.packages,
            "implicit": self.implicit,
            "system": self.system,
            "source": self.source,
            "layerBudget": self.layer_budget,
            "compression": self.compression.key(),
        });
        let image = ImageKey::hash_of(canonical.to_string().as_bytes());
        match &self.config {
            None => image,
            Some(config) => {
                let declared = serde_json::json!({ "image": image, "config": config });
                ImageKey::hash_of(declared.to_string().as_bytes())
            }
        }
    }
}

/// The span every log line of a build is in, so that each names the image.
pub fn build_span(request: &BuildRequest) -> tracing::Span {
    tracing::info_span!("build", image = %request.image_key())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::name::Arch;

    fn request() -> BuildRequest {
        BuildRequest {
            packages: vec!["hello".into()],
            system: Arch::Amd64.nix_system().into(),
            architecture: Arch::Amd64.oci_name().into(),
            source: SourceArg::Path {
                path: "/pkgs".into(),
            },
            layer_budget: 94,
            implicit: vec![],
            not_before: 0,
            compression: Compression::Gzip,
            name: "hello".into(),
            tag: "latest".into(),
            config: None,
        }
    }

    #[test]
    fn keys_cover_arch_source_packages_and_config() {
        let base = request();
        let commit = |rev: &str| SourceArg::Git {
            url: "/r".into(),
            rev: rev.into(),
            git_ref: None,
        };
        let arm = BuildRequest {
            system: Arch::Arm64.nix_system().into(),
            architecture: Arch::Arm64.oci_name().into(),
            ..base.clone()
        };
        let changes = [
            arm,
            BuildRequest {
                source: SourceArg::Path {
                    path: "/other".into(),
                },
                ..base.clone()
            },
            BuildRequest {
                source: commit("a"),
                ..base.clone()
            },
            BuildRequest {
                source: commit("b"),
                ..base.clone()
            },
            BuildRequest {
                compression: Compression::Zstd,
                ..base.clone()
            },
            BuildRequest {
                packages: vec!["hello".into(), "jq".into()],
                ..base.clone()
            },
            BuildRequest {
                layer_budget: 10,
                ..base.clone()
            },
            BuildRequest {
                implicit: vec!["cacert".into()],
                ..base.clone()
            },
            BuildRequest {
                config: Some(ConfigOverrides::default()),
                ..base.clone()
            },
        ];
        let mut keys: Vec<ImageKey> = changes.iter().map(BuildRequest::image_key).collect();
        keys.push(base.image_key());
        let distinct: std::collections::BTreeSet<&ImageKey> = keys.iter().collect();
        assert_eq!(
            distinct.len(),
            keys.len(),
            "two different inputs share a key"
        );
        // What only labels the build is no part of its key.
        let renamed = BuildRequest {
            name: "other".into(),
            tag: "v1".into(),
            not_before: 12345,
            ..base.clone()
        };
        assert_eq!(renamed.image_key(), base.image_key());
    }

    #[test]
    fn a_message_cannot_carry_a_key_of_its_own() {
        // A queue message naming some other image's key: the key is the
        // request's, whatever the message says.
        let mut json = serde_json::to_value(request()).unwrap();
        json["image_key"] = serde_json::json!("0".repeat(64));
        let read: BuildRequest = serde_json::from_value(json).unwrap();
        assert_eq!(read.image_key(), request().image_key());
        assert!(!serde_json::to_string(&request())
            .unwrap()
            .contains("image_key"));
    }
}
