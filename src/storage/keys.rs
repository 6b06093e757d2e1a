//! Every storage key of the layout: built here, and parsed back here.
//!
//! A key is a value of the type of what it names ([`BlobKey`],
//! [`ImageRecordKey`], [`StatusKey`], ...), made only by this module's
//! constructors from typed identities ([`ImageKey`], [`LayerKey`], hex
//! digests). Each dereferences to the `&str` the [`super::Storage`] trait
//! takes. Garbage collection lists by [`Prefix`] and reads names back
//! with [`Parsed::of`], so the layout is written down once.
//!
//! ```
//! use nixery::storage::keys::{BlobKey, ImageKey, ImageRecordKey, Parsed, Prefix};
//! let image = ImageKey::parse(&"ab".repeat(32)).unwrap();
//! let record = ImageRecordKey::of(&image);
//! assert_eq!(&*record, format!("images/{}", "ab".repeat(32)));
//! assert_eq!(Parsed::of(&record), Some(Parsed::ImageRecord(image)));
//! assert!(BlobKey::of(&"0".repeat(64)).starts_with(Prefix::Blobs.as_str()));
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// Whether `text` is a sha256 in lowercase hex.
fn is_hex64(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// An identity that is a sha256 in lowercase hex: parsed, never assumed.
macro_rules! hash_identity {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// `text` if it is 64 lowercase hex digits.
            pub fn parse(text: &str) -> Option<$name> {
                is_hex64(text).then(|| $name(text.to_string()))
            }

            /// The identity of what `canonical` describes: its sha256.
            pub fn hash_of(canonical: &[u8]) -> $name {
                $name(crate::oci::digest::sha256_hex(canonical))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(text: String) -> Result<$name, String> {
                $name::parse(&text).ok_or_else(|| {
                    format!(concat!("not a ", stringify!($name), ": {:?}"), text)
                })
            }
        }

        impl From<$name> for String {
            fn from(key: $name) -> String {
                key.0
            }
        }
    };
}

hash_identity!(
    /// An image: the hash of everything that decides its bytes (see
    /// `builder::request`). Names its record, its build status and its
    /// `served/` marker.
    ImageKey
);
hash_identity!(
    /// A reusable layer: the hash of its store paths and compression.
    LayerKey
);
hash_identity!(
    /// A multi-platform index: the hash of its images' keys, in order.
    IndexKey
);
hash_identity!(
    /// A package set at one revision (a resolved package source): the
    /// hash of its canonical form. Names its attribute index.
    RevisionKey
);

/// The top-level folders of the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prefix {
    Blobs,
    Manifests,
    Layers,
    Images,
    Indexes,
    Referrers,
    Builds,
    Served,
    Sources,
    Holds,
    Staging,
    Attrs,
}

impl Prefix {
    /// The prefix as listed: the folder and a `/`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Prefix::Blobs => "blobs/",
            Prefix::Manifests => "manifests/",
            Prefix::Layers => "layers/",
            Prefix::Images => "images/",
            Prefix::Indexes => "indexes/",
            Prefix::Referrers => "referrers/",
            Prefix::Builds => "builds/",
            Prefix::Served => "served/",
            Prefix::Sources => "sources/",
            Prefix::Holds => "holds/",
            Prefix::Staging => "staging/",
            Prefix::Attrs => "attrs/",
        }
    }
}

/// One kind of key: a string made by this module, read as `&str`.
macro_rules! key_kind {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

key_kind!(
    /// `blobs/sha256/<hex>`: a layer, an image config, an SBOM document.
    BlobKey
);
key_kind!(
    /// `manifests/sha256/<hex>`: a manifest or index, exactly as served.
    ManifestKey
);
key_kind!(
    /// `layers/<layer-key>`: a layer record.
    LayerRecordKey
);
key_kind!(
    /// `images/<image-key>`: an image record, written last by its build.
    ImageRecordKey
);
key_kind!(
    /// `indexes/<index-key>`: the record of a multi-platform index.
    IndexRecordKey
);
key_kind!(
    /// `referrers/<hex>`: the referrers index of a manifest.
    ReferrersKey
);
key_kind!(
    /// `builds/<image-key>`: a build's status.
    StatusKey
);
key_kind!(
    /// `builds/<image-key>.<attempt>`: the claim of one attempt.
    ClaimKey
);
key_kind!(
    /// `builds/recent/<inverted-ms>-<image-key>`: that a build was asked for.
    RecentKey
);
key_kind!(
    /// `served/<image-key>`: that an image was pulled.
    ServedKey
);
key_kind!(
    /// `sources/<lookup-hash>`: a worker's answer to a git lookup.
    GitAnswerKey
);
key_kind!(
    /// `holds/<hex>`: that a build (or the registry composing an index)
    /// relies on the stored blob or manifest with sha256 `<hex>`, which it
    /// found and did not write.
    HoldKey
);
key_kind!(
    /// `staging/<unique>`: an upload in flight.
    StagingKey
);
key_kind!(
    /// `attrs/<revision>/<system>/head`: what an attribute index is of,
    /// written last, after its shards.
    AttrsHeadKey
);
key_kind!(
    /// `attrs/<revision>/<system>/<nn>`: one shard of an attribute index.
    AttrsShardKey
);
key_kind!(
    /// `attrs/<revision>/<system>/claim`: that an index job was asked for.
    AttrsClaimKey
);
key_kind!(
    /// `attrs/<revision>/<system>/popularity`: how many of the revision's
    /// store paths refer to each package (Nixery's popularity format).
    AttrsPopularityKey
);

impl BlobKey {
    /// The blob with sha256 `hex` (already checked to be hex).
    pub fn of(hex: &str) -> BlobKey {
        BlobKey(format!("blobs/sha256/{hex}"))
    }

    /// The blob of a `sha256:<hex>` digest.
    pub fn of_digest(digest: &str) -> BlobKey {
        BlobKey::of(crate::oci::digest::hex_of(digest))
    }
}

impl ManifestKey {
    pub fn of(hex: &str) -> ManifestKey {
        ManifestKey(format!("manifests/sha256/{hex}"))
    }

    pub fn of_digest(digest: &str) -> ManifestKey {
        ManifestKey::of(crate::oci::digest::hex_of(digest))
    }
}

impl LayerRecordKey {
    pub fn of(layer: &LayerKey) -> LayerRecordKey {
        LayerRecordKey(format!("layers/{layer}"))
    }
}

impl ImageRecordKey {
    pub fn of(image: &ImageKey) -> ImageRecordKey {
        ImageRecordKey(format!("images/{image}"))
    }
}

impl IndexRecordKey {
    pub fn of(index: &IndexKey) -> IndexRecordKey {
        IndexRecordKey(format!("indexes/{index}"))
    }
}

impl ReferrersKey {
    /// The referrers of the manifest with sha256 `hex`.
    pub fn of(hex: &str) -> ReferrersKey {
        ReferrersKey(format!("referrers/{hex}"))
    }
}

impl StatusKey {
    pub fn of(image: &ImageKey) -> StatusKey {
        StatusKey(format!("builds/{image}"))
    }
}

impl ClaimKey {
    pub fn of(image: &ImageKey, attempt: u32) -> ClaimKey {
        ClaimKey(format!("builds/{image}.{attempt}"))
    }
}

/// Where [`RecentKey`]s live: under `builds/`, so that garbage collection
/// takes old ones with the statuses.
pub const RECENT_PREFIX: &str = "builds/recent/";

impl RecentKey {
    /// A note made at `ms` (Unix milliseconds): the newest sort first.
    pub fn of(image: &ImageKey, ms: u64) -> RecentKey {
        let inverted = 9_999_999_999_999u64.saturating_sub(ms);
        RecentKey(format!("{RECENT_PREFIX}{inverted:013}-{image}"))
    }
}

impl ServedKey {
    pub fn of(key: &str) -> ServedKey {
        ServedKey(format!("served/{key}"))
    }
}

impl GitAnswerKey {
    /// The answer to the lookup whose canonical form hashes to `hex`.
    pub fn of(hex: &str) -> GitAnswerKey {
        GitAnswerKey(format!("sources/{hex}"))
    }
}

impl HoldKey {
    /// The hold on the content with sha256 `hex` (a blob or a manifest).
    pub fn of(hex: &str) -> HoldKey {
        HoldKey(format!("holds/{hex}"))
    }

    /// The hold on what a content-addressed key names (`blobs/...`,
    /// `manifests/...`), if it is one.
    pub fn on(key: &str) -> Option<HoldKey> {
        super::digest_of_key(key).map(HoldKey::of)
    }
}

impl StagingKey {
    /// A name no other upload uses (see [`super::unique_name`]).
    pub fn unique(what: &str) -> StagingKey {
        StagingKey(format!("staging/{}", super::unique_name(what)))
    }
}

/// Whether `system` is a Nix system name (`x86_64-linux`): it is part of
/// the attribute index's keys.
fn is_system(system: &str) -> bool {
    !system.is_empty()
        && system
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

impl AttrsHeadKey {
    pub fn of(revision: &RevisionKey, system: &str) -> AttrsHeadKey {
        debug_assert!(is_system(system));
        AttrsHeadKey(format!("attrs/{revision}/{system}/head"))
    }
}

impl AttrsShardKey {
    pub fn of(revision: &RevisionKey, system: &str, shard: u8) -> AttrsShardKey {
        debug_assert!(is_system(system));
        AttrsShardKey(format!("attrs/{revision}/{system}/{shard:02x}"))
    }
}

impl AttrsPopularityKey {
    pub fn of(revision: &RevisionKey, system: &str) -> AttrsPopularityKey {
        debug_assert!(is_system(system));
        AttrsPopularityKey(format!("attrs/{revision}/{system}/popularity"))
    }
}

impl AttrsClaimKey {
    pub fn of(revision: &RevisionKey, system: &str) -> AttrsClaimKey {
        debug_assert!(is_system(system));
        AttrsClaimKey(format!("attrs/{revision}/{system}/claim"))
    }
}

/// What a key names, read back from a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A blob, by its sha256 (hex).
    Blob(String),
    /// A manifest, by its sha256 (hex).
    Manifest(String),
    LayerRecord(LayerKey),
    ImageRecord(ImageKey),
    IndexRecord(IndexKey),
    /// The referrers of a manifest, by its sha256 (hex).
    Referrers(String),
    Status(ImageKey),
    Claim(ImageKey, u32),
    Recent(ImageKey),
    /// The marker of an image or index key (both are hashes).
    Served(String),
    GitAnswer(String),
    /// A hold, on the content with this sha256 (hex).
    Hold(String),
    Staging,
    /// Part of the attribute index of a revision (its head, a shard, a
    /// claim).
    Attrs(RevisionKey),
}

impl Parsed {
    /// What `key` names, if it is a key of the layout.
    pub fn of(key: &str) -> Option<Parsed> {
        let hex = |text: &str| is_hex64(text).then(|| text.to_string());
        if let Some(rest) = key.strip_prefix("blobs/sha256/") {
            return hex(rest).map(Parsed::Blob);
        }
        if let Some(rest) = key.strip_prefix("manifests/sha256/") {
            return hex(rest).map(Parsed::Manifest);
        }
        if let Some(rest) = key.strip_prefix(RECENT_PREFIX) {
            let (_, image) = rest.split_once('-')?;
            return ImageKey::parse(image).map(Parsed::Recent);
        }
        if let Some(rest) = key.strip_prefix(Prefix::Builds.as_str()) {
            return match rest.split_once('.') {
                Some((image, attempt)) => Some(Parsed::Claim(
                    ImageKey::parse(image)?,
                    attempt.parse().ok()?,
                )),
                None => ImageKey::parse(rest).map(Parsed::Status),
            };
        }
        if key.starts_with(Prefix::Staging.as_str()) {
            return Some(Parsed::Staging);
        }
        if let Some(rest) = key.strip_prefix(Prefix::Attrs.as_str()) {
            let mut parts = rest.split('/');
            let revision = RevisionKey::parse(parts.next()?)?;
            let system = parts.next()?;
            let name = parts.next()?;
            let known = name == "head"
                || name == "claim"
                || name == "popularity"
                || (name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit()));
            return (is_system(system) && known && parts.next().is_none())
                .then_some(Parsed::Attrs(revision));
        }
        let (prefix, rest) = key.split_once('/')?;
        match prefix {
            "layers" => LayerKey::parse(rest).map(Parsed::LayerRecord),
            "images" => ImageKey::parse(rest).map(Parsed::ImageRecord),
            "indexes" => IndexKey::parse(rest).map(Parsed::IndexRecord),
            "referrers" => hex(rest).map(Parsed::Referrers),
            "served" => hex(rest).map(Parsed::Served),
            "sources" => hex(rest).map(Parsed::GitAnswer),
            "holds" => hex(rest).map(Parsed::Hold),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_back_to_what_it_names() {
        let image = ImageKey::parse(&"1".repeat(64)).unwrap();
        let layer = LayerKey::parse(&"2".repeat(64)).unwrap();
        let index = IndexKey::parse(&"3".repeat(64)).unwrap();
        let revision = RevisionKey::parse(&"5".repeat(64)).unwrap();
        let hex = "4".repeat(64);
        let cases: Vec<(String, Parsed)> = vec![
            (BlobKey::of(&hex).to_string(), Parsed::Blob(hex.clone())),
            (
                ManifestKey::of(&hex).to_string(),
                Parsed::Manifest(hex.clone()),
            ),
            (
                LayerRecordKey::of(&layer).to_string(),
                Parsed::LayerRecord(layer.clone()),
            ),
            (
                ImageRecordKey::of(&image).to_string(),
                Parsed::ImageRecord(image.clone()),
            ),
            (
                IndexRecordKey::of(&index).to_string(),
                Parsed::IndexRecord(index.clone()),
            ),
            (
                ReferrersKey::of(&hex).to_string(),
                Parsed::Referrers(hex.clone()),
            ),
            (
                StatusKey::of(&image).to_string(),
                Parsed::Status(image.clone()),
            ),
            (
                ClaimKey::of(&image, 3).to_string(),
                Parsed::Claim(image.clone(), 3),
            ),
            (
                RecentKey::of(&image, 1_700_000_000_000).to_string(),
                Parsed::Recent(image.clone()),
            ),
            (
                ServedKey::of(image.as_str()).to_string(),
                Parsed::Served(image.to_string()),
            ),
            (
                GitAnswerKey::of(&hex).to_string(),
                Parsed::GitAnswer(hex.clone()),
            ),
            (HoldKey::of(&hex).to_string(), Parsed::Hold(hex.clone())),
            (StagingKey::unique("layer").to_string(), Parsed::Staging),
            (
                AttrsHeadKey::of(&revision, "x86_64-linux").to_string(),
                Parsed::Attrs(revision.clone()),
            ),
            (
                AttrsShardKey::of(&revision, "aarch64-linux", 0xa7).to_string(),
                Parsed::Attrs(revision.clone()),
            ),
            (
                AttrsClaimKey::of(&revision, "x86_64-linux").to_string(),
                Parsed::Attrs(revision.clone()),
            ),
        ];
        for (key, parsed) in cases {
            assert_eq!(Parsed::of(&key), Some(parsed), "{key}");
            super::super::check_key(&key).unwrap();
        }
        for bad in [
            "blobs/sha256/xyz",
            "images/ABC",
            "other/x",
            "builds/1.x",
            "attrs/x/x86_64-linux/head",
            "attrs/5555555555555555555555555555555555555555555555555555555555555555/x86_64-linux/zz",
        ] {
            assert_eq!(Parsed::of(bad), None, "{bad}");
        }
    }

    #[test]
    fn recent_notes_sort_newest_first() {
        let image = ImageKey::parse(&"a".repeat(64)).unwrap();
        assert!(RecentKey::of(&image, 2_000) < RecentKey::of(&image, 1_000));
    }

    #[test]
    fn identities_are_checked_when_read() {
        assert!(ImageKey::parse("../etc").is_none());
        assert!(serde_json::from_str::<ImageKey>("\"nope\"").is_err());
        let key: ImageKey = serde_json::from_str(&format!("\"{}\"", "f".repeat(64))).unwrap();
        assert_eq!(serde_json::to_string(&key).unwrap(), format!("\"{key}\""));
    }
}
