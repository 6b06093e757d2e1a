//! Content digests, as the OCI image spec writes them (`descriptor.md`,
//! "Digests"): `sha256:<64 lowercase hex digits>`. Only sha256 is produced
//! or accepted.
//!
//! ```
//! use nixery::oci::digest::{hex_of, parse, sha256_digest};
//! let digest = sha256_digest(b"");
//! assert_eq!(parse(&digest).unwrap(), hex_of(&digest));
//! assert!(parse("sha256:XYZ").is_err());
//! ```

use sha2::{Digest, Sha256};

/// The sha256 of some bytes, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// The hex part of `sha256:<hex>` (the whole string if it has no prefix).
pub fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// A reference that is not a digest this registry can hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {digest:?}: expected sha256:<64 lowercase hex digits>")]
pub struct InvalidDigest {
    pub digest: String,
}

/// Checks `sha256:<64 lowercase hex>` and returns the hex part.
pub fn parse(reference: &str) -> Result<&str, InvalidDigest> {
    let hex = reference
        .strip_prefix("sha256:")
        .filter(|hex| {
            hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .ok_or_else(|| InvalidDigest {
            digest: reference.to_string(),
        })?;
    Ok(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(parse(&good).unwrap(), "ab".repeat(32));
        for bad in [
            "sha256:",
            "sha256:xyz",
            "sha512:00",
            &format!("sha256:{}", "AB".repeat(32)),
            &format!("sha256:{}", "ab".repeat(33)),
            "latest",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
