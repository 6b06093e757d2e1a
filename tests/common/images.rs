//! A small real image stored the way a build stores one, for tests whose
//! dispatch stands in for Nix.

use bytes::Bytes;
use nixery::builder::BuildRequest;
use nixery::oci::digest::sha256_digest;
use nixery::oci::manifest::{Descriptor, ImageConfig, Manifest, MEDIA_TYPE_CONFIG};
use nixery::storage::keys::{BlobKey, ImageRecordKey, ManifestKey};
use nixery::storage::records::{self, unix_now, ImageRecord};
use nixery::storage::Storage;

/// The bytes of the one layer.
pub const LAYER: &[u8] = b"not really a tar, but bytes with a digest";

/// Stores a config blob, a one-layer manifest and, last, the image record
/// of `request`; the record.
pub async fn store_image(storage: &dyn Storage, request: &BuildRequest) -> ImageRecord {
    let layer = Descriptor::of("application/vnd.oci.image.layer.v1.tar+gzip", LAYER);
    storage
        .put(
            &BlobKey::of_digest(&layer.digest),
            Bytes::from_static(LAYER),
        )
        .await
        .unwrap();
    let config = ImageConfig::new(
        &request.architecture,
        vec![layer.digest.clone()],
        vec![],
        None,
    )
    .to_bytes();
    let config_descriptor = Descriptor::of(MEDIA_TYPE_CONFIG, &config);
    storage
        .put(
            &BlobKey::of_digest(&config_descriptor.digest),
            Bytes::from(config),
        )
        .await
        .unwrap();
    let manifest = Manifest::new(config_descriptor, vec![layer]).to_bytes();
    let digest = sha256_digest(&manifest);
    let size = manifest.len() as u64;
    storage
        .put(&ManifestKey::of_digest(&digest), Bytes::from(manifest))
        .await
        .unwrap();
    let record = ImageRecord {
        manifest_digest: digest,
        media_type: nixery::oci::manifest::MEDIA_TYPE_MANIFEST.to_string(),
        size,
        packages: request.packages.clone(),
        architecture: request.architecture.clone(),
        built_at: unix_now(),
        sbom: None,
    };
    records::write(storage, &ImageRecordKey::of(&request.image_key()), &record)
        .await
        .unwrap();
    record
}
