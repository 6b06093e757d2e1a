//! Narinfo signatures: which caches we trust, and whether a narinfo is
//! signed by one of them (Nix's `libutil/signature/local-keys.cc` and
//! `ValidPathInfo::checkSignatures`).
//!
//! A trusted key is `<name>:<base64 of a 32-byte ed25519 public key>`, and
//! a list of them is whitespace-separated, as in Nix's
//! `trusted-public-keys` setting. A narinfo's `Sig: <name>:<base64 of a
//! 64-byte ed25519 signature>` signs [`NarInfo::fingerprint`]. A narinfo is
//! trusted when at least one `Sig` names a trusted key and verifies under
//! it; signatures by keys we do not know are skipped, as Nix does.
//!
//! ```
//! use nixery::binary_cache::TrustedKeys;
//! let keys = TrustedKeys::parse(nixery::binary_cache::CACHE_NIXOS_ORG_KEY).unwrap();
//! assert_eq!(keys.names().collect::<Vec<_>>(), ["cache.nixos.org-1"]);
//! ```

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};

use super::narinfo::NarInfo;
use super::store_path::StorePath;

/// The key of cache.nixos.org, Nix's default `trusted-public-keys`.
pub const CACHE_NIXOS_ORG_KEY: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

/// Public keys by name.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: BTreeMap<String, VerifyingKey>,
}

/// Why a list of trusted keys was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("no trusted public keys given")]
    Empty,
    #[error("trusted key {key:?} is not `<name>:<base64>`")]
    Malformed { key: String },
    #[error("trusted key {name}: the key is not base64")]
    Base64 { name: String },
    #[error("trusted key {name}: the key is {length} bytes, not 32")]
    Length { name: String, length: usize },
    #[error("trusted key {name}: not an ed25519 public key")]
    NotAKey { name: String },
    #[error("trusted key {name} is given twice with different keys")]
    Conflict { name: String },
}

/// Why a narinfo is not trusted. Each names the store path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("{path} is not signed")]
    Unsigned { path: StorePath },
    #[error("{path} is signed only by keys that are not trusted ({})", names.join(", "))]
    UntrustedKey { path: StorePath, names: Vec<String> },
    #[error("{path} has a signature that is not `<key name>:<base64>`")]
    Malformed { path: StorePath },
    #[error("{path}: the signature by {key} is not base64")]
    Base64 { path: StorePath, key: String },
    #[error("{path}: the signature by {key} is {length} bytes, not 64")]
    Length {
        path: StorePath,
        key: String,
        length: usize,
    },
    #[error("{path}: the signature by {key} does not match the narinfo")]
    Invalid { path: StorePath, key: String },
}

impl TrustedKeys {
    /// Parses a whitespace-separated list of `<name>:<base64>` keys.
    pub fn parse(list: &str) -> Result<TrustedKeys, KeyError> {
        let mut keys = BTreeMap::new();
        for key in list.split_whitespace() {
            let (name, encoded) = key
                .split_once(':')
                .filter(|(name, encoded)| !name.is_empty() && !encoded.is_empty())
                .ok_or_else(|| KeyError::Malformed {
                    key: key.chars().take(100).collect(),
                })?;
            let bytes = BASE64.decode(encoded).map_err(|_| KeyError::Base64 {
                name: name.to_string(),
            })?;
            let bytes: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyError::Length {
                name: name.to_string(),
                length: bytes.len(),
            })?;
            let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::NotAKey {
                name: name.to_string(),
            })?;
            if let Some(previous) = keys.insert(name.to_string(), key) {
                if previous != key {
                    return Err(KeyError::Conflict {
                        name: name.to_string(),
                    });
                }
            }
        }
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(TrustedKeys { keys })
    }

    /// Only cache.nixos.org's key.
    pub fn cache_nixos_org() -> TrustedKeys {
        TrustedKeys::parse(CACHE_NIXOS_ORG_KEY).expect("the built-in key is well formed")
    }

    /// The key names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// The name of a trusted key whose signature on `info` verifies, or
    /// why there is none. When no signature verifies, the error is about
    /// the first signature by a trusted key (or says that none is).
    pub fn verify(&self, info: &NarInfo) -> Result<&str, SignatureError> {
        let path = &info.store_path;
        if info.signatures.is_empty() {
            return Err(SignatureError::Unsigned { path: path.clone() });
        }
        let fingerprint = info.fingerprint();
        let mut first_failure = None;
        let mut untrusted = Vec::new();
        for sig in &info.signatures {
            let Some((name, encoded)) = sig.split_once(':') else {
                first_failure.get_or_insert(SignatureError::Malformed { path: path.clone() });
                continue;
            };
            let Some((trusted_name, key)) = self.keys.get_key_value(name) else {
                untrusted.push(name.chars().take(100).collect());
                continue;
            };
            match check(key, encoded, fingerprint.as_bytes()) {
                Ok(()) => return Ok(trusted_name),
                Err(failure) => {
                    first_failure.get_or_insert(failure.into_error(path, name));
                }
            }
        }
        Err(first_failure.unwrap_or(SignatureError::UntrustedKey {
            path: path.clone(),
            names: untrusted,
        }))
    }
}

enum Failure {
    Base64,
    Length(usize),
    Invalid,
}

impl Failure {
    fn into_error(self, path: &StorePath, key: &str) -> SignatureError {
        let (path, key) = (path.clone(), key.to_string());
        match self {
            Failure::Base64 => SignatureError::Base64 { path, key },
            Failure::Length(length) => SignatureError::Length { path, key, length },
            Failure::Invalid => SignatureError::Invalid { path, key },
        }
    }
}

fn check(key: &VerifyingKey, encoded: &str, message: &[u8]) -> Result<(), Failure> {
    let bytes = BASE64.decode(encoded).map_err(|_| Failure::Base64)?;
    let bytes: [u8; 64] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| Failure::Length(bytes.len()))?;
    // Strict verification refuses the malleable and small-order forms
    // that libsodium (which Nix uses) refuses too.
    key.verify_strict(message, &Signature::from_bytes(&bytes))
        .map_err(|_| Failure::Invalid)
}

impl fmt::Debug for TrustedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binary_cache::narinfo::NarInfoLimits;
    use crate::binary_cache::testing::{test_key, TEST_KEY_NAME};

    fn narinfo(sigs: &[String]) -> NarInfo {
        let mut text = "StorePath: /nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1\n\
             URL: nar/a.nar\nCompression: none\n\
             NarHash: sha256:1yf3p87fsqig07crd9sj9wh7i9jpsa0x86a22fqbls7c81lc7ws2\n\
             NarSize: 120\n\
             References: 7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1\n"
            .to_string();
        for sig in sigs {
            text.push_str(&format!("Sig: {sig}\n"));
        }
        NarInfo::parse(text.as_bytes(), &NarInfoLimits::default()).unwrap()
    }

    fn trusted() -> TrustedKeys {
        TrustedKeys::parse(&format!(
            "{}\n  {}",
            CACHE_NIXOS_ORG_KEY,
            test_key().public_key()
        ))
        .unwrap()
    }

    #[test]
    fn parses_the_default_key_and_lists() {
        let keys = trusted();
        assert_eq!(
            keys.names().collect::<Vec<_>>(),
            ["cache.nixos.org-1", TEST_KEY_NAME]
        );
        assert_eq!(TrustedKeys::cache_nixos_org().names().count(), 1);
        // The same key twice is fine; the same name with another key is not.
        assert!(
            TrustedKeys::parse(&format!("{CACHE_NIXOS_ORG_KEY} {CACHE_NIXOS_ORG_KEY}")).is_ok()
        );
        let other = test_key()
            .public_key()
            .replace(TEST_KEY_NAME, "cache.nixos.org-1");
        assert_eq!(
            TrustedKeys::parse(&format!("{CACHE_NIXOS_ORG_KEY} {other}")),
            Err(KeyError::Conflict {
                name: "cache.nixos.org-1".into()
            })
        );
    }

    #[test]
    fn refuses_malformed_keys() {
        assert_eq!(TrustedKeys::parse("  \n"), Err(KeyError::Empty));
        assert!(matches!(
            TrustedKeys::parse("nocolon"),
            Err(KeyError::Malformed { .. })
        ));
        assert!(matches!(
            TrustedKeys::parse(":abc"),
            Err(KeyError::Malformed { .. })
        ));
        assert!(matches!(
            TrustedKeys::parse("k:!!!"),
            Err(KeyError::Base64 { .. })
        ));
        assert_eq!(
            TrustedKeys::parse("k:AAAA"),
            Err(KeyError::Length {
                name: "k".into(),
                length: 3
            })
        );
    }

    #[test]
    fn a_good_signature_verifies() {
        let mut info = narinfo(&[]);
        let sig = test_key().sign(&info);
        info.signatures = vec!["unknown-1:AAAA".into(), sig];
        assert_eq!(trusted().verify(&info), Ok(TEST_KEY_NAME));
    }

    #[test]
    fn unsigned_is_refused() {
        assert_eq!(
            trusted().verify(&narinfo(&[])),
            Err(SignatureError::Unsigned {
                path: narinfo(&[]).store_path
            })
        );
    }

    #[test]
    fn a_signature_by_an_untrusted_key_is_refused() {
        let mut info = narinfo(&[]);
        let sig = test_key().sign(&info);
        info.signatures = vec![sig];
        let keys = TrustedKeys::cache_nixos_org();
        let err = keys.verify(&info).unwrap_err();
        assert_eq!(
            err,
            SignatureError::UntrustedKey {
                path: info.store_path.clone(),
                names: vec![TEST_KEY_NAME.into()]
            }
        );
        assert!(err.to_string().contains("hello-2.12.1"), "{err}");
    }

    #[test]
    fn a_wrong_signature_is_refused() {
        let info = narinfo(&[]);
        let sig = test_key().sign(&info);
        // Signed, then changed: the fingerprint no longer matches.
        let mut changed = info.clone();
        changed.nar_size += 1;
        changed.signatures = vec![sig.clone()];
        assert_eq!(
            trusted().verify(&changed),
            Err(SignatureError::Invalid {
                path: info.store_path.clone(),
                key: TEST_KEY_NAME.into()
            })
        );
        // Dropping a reference changes the fingerprint too.
        let mut fewer = info.clone();
        fewer.references.clear();
        fewer.signatures = vec![sig];
        assert!(matches!(
            trusted().verify(&fewer),
            Err(SignatureError::Invalid { .. })
        ));
    }

    #[test]
    fn bad_base64_and_wrong_length_are_told_apart() {
        let path = narinfo(&[]).store_path;
        let cases = [
            (
                format!("{TEST_KEY_NAME}:not base64!"),
                SignatureError::Base64 {
                    path: path.clone(),
                    key: TEST_KEY_NAME.into(),
                },
            ),
            (
                format!("{TEST_KEY_NAME}:{}", BASE64.encode([1u8; 63])),
                SignatureError::Length {
                    path: path.clone(),
                    key: TEST_KEY_NAME.into(),
                    length: 63,
                },
            ),
            (
                "no-colon-here".to_string(),
                SignatureError::Malformed { path: path.clone() },
            ),
        ];
        for (sig, expected) in cases {
            assert_eq!(trusted().verify(&narinfo(&[sig])), Err(expected));
        }
    }
}
