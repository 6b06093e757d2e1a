//! Store paths as binary caches name them: `/nix/store/<hash>-<name>`,
//! checked once when they come in (Nix's `libstore/path.cc`).
//!
//! The hash part is 32 nix32 characters (a 160-bit digest, see
//! [`super::nix32`]). The name is 1 to 211 characters from
//! `[A-Za-z0-9+-._?=]`, and is not `.` or `..` (nor starts with `.-` or
//! `..-`). Only the default store directory `/nix/store` is accepted: a
//! binary cache's `StoreDir` is that for every cache the registry reads.
//!
//! ```
//! use nixery::binary_cache::StorePath;
//! let path: StorePath = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1".parse().unwrap();
//! assert_eq!(path.hash_part(), "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz");
//! assert_eq!(path.name(), "hello-2.12.1");
//! assert!("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-../etc".parse::<StorePath>().is_err());
//! ```

use std::fmt;
use std::str::FromStr;

use super::nix32;

/// The store directory of every path this module accepts.
pub const STORE_DIR: &str = "/nix/store";

/// Characters of a store path's hash part.
pub const HASH_LEN: usize = 32;

/// The longest name Nix accepts (`StorePath::MaxPathLen`).
pub const MAX_NAME_LEN: usize = 211;

/// A well-formed store path under [`STORE_DIR`].
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath(String);

/// Why a string is not a store path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("{path:?} is not under {STORE_DIR}/")]
    NotInStore { path: String },
    #[error("{path:?} has no `<hash>-<name>` base name")]
    Shape { path: String },
    #[error("{path:?} has a hash part that is not 32 nix32 characters")]
    Hash { path: String },
    #[error("{path:?} has an empty name")]
    EmptyName { path: String },
    #[error("{path:?} has a name longer than {MAX_NAME_LEN} characters")]
    NameTooLong { path: String },
    #[error("{path:?} has a name with the character {character:?}")]
    NameCharacter { path: String, character: char },
    #[error("{path:?} has a name that is `.` or `..`")]
    DotName { path: String },
}

impl StorePath {
    /// The path for a base name `<hash>-<name>` (as in a narinfo's
    /// `References` and `Deriver`).
    pub fn from_base_name(base: &str) -> Result<StorePath, StorePathError> {
        check_base_name(base, base)?;
        Ok(StorePath(format!("{STORE_DIR}/{base}")))
    }

    /// The full path, `/nix/store/<hash>-<name>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.0[STORE_DIR.len() + 1..]
    }

    /// The 32 nix32 characters that name the path's narinfo in a cache.
    pub fn hash_part(&self) -> &str {
        &self.base_name()[..HASH_LEN]
    }

    /// What follows the hash and its dash.
    pub fn name(&self) -> &str {
        &self.base_name()[HASH_LEN + 1..]
    }
}

fn check_base_name(path: &str, base: &str) -> Result<(), StorePathError> {
    let shape = || StorePathError::Shape {
        path: path.to_string(),
    };
    if base.len() < HASH_LEN + 1 || !base.is_char_boundary(HASH_LEN) {
        return Err(shape());
    }
    let (hash, rest) = base.split_at(HASH_LEN);
    if !hash.bytes().all(nix32::is_nix32_char) {
        return Err(StorePathError::Hash {
            path: path.to_string(),
        });
    }
    let name = rest.strip_prefix('-').ok_or_else(shape)?;
    if name.is_empty() {
        return Err(StorePathError::EmptyName {
            path: path.to_string(),
        });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong {
            path: path.to_string(),
        });
    }
    if let Some(character) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)))
    {
        return Err(StorePathError::NameCharacter {
            path: path.to_string(),
            character,
        });
    }
    let dotted = name == "." || name == ".." || name.starts_with(".-") || name.starts_with("..-");
    if dotted {
        return Err(StorePathError::DotName {
            path: path.to_string(),
        });
    }
    Ok(())
}

impl FromStr for StorePath {
    type Err = StorePathError;

    fn from_str(path: &str) -> Result<StorePath, StorePathError> {
        let base = path
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore {
                path: path.to_string(),
            })?;
        check_base_name(path, base)?;
        Ok(StorePath(path.to_string()))
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl AsRef<str> for StorePath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HASH: &str = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz";

    #[test]
    fn accepts_nix_names() {
        for name in [
            "hello-2.12.1",
            "a",
            "python3.11-foo_bar+baz?x=y",
            ".hidden",
            "..a",
        ] {
            let path: StorePath = format!("/nix/store/{HASH}-{name}").parse().unwrap();
            assert_eq!(path.name(), name);
            assert_eq!(path.hash_part(), HASH);
            assert_eq!(path.base_name(), format!("{HASH}-{name}"));
            assert_eq!(StorePath::from_base_name(path.base_name()).unwrap(), path);
        }
        let longest = "x".repeat(MAX_NAME_LEN);
        assert!(format!("/nix/store/{HASH}-{longest}")
            .parse::<StorePath>()
            .is_ok());
    }

    #[test]
    fn refuses_malformed_paths() {
        let long = "x".repeat(MAX_NAME_LEN + 1);
        let bad = [
            format!("/nix/store/{HASH}"),
            format!("/nix/store/{HASH}-"),
            format!("/nix/store/{HASH}_hello"),
            format!("/nix/store/{HASH}-hello/bin"),
            format!("/nix/store/{HASH}-hel lo"),
            format!("/nix/store/{HASH}-héllo"),
            format!("/nix/store/{HASH}-{long}"),
            format!("/nix/store/{HASH}-.."),
            format!("/nix/store/{HASH}-."),
            format!("/nix/store/{HASH}-..-x"),
            format!("/nix/store/{}-hello", "e".repeat(32)),
            format!("/nix/store/{}-hello", &HASH[..31]),
            format!("/nix/store//{HASH}-hello"),
            format!("/gnu/store/{HASH}-hello"),
            format!("nix/store/{HASH}-hello"),
            format!("/nix/store/ü{}-hello", &HASH[..30]),
            "/nix/store".to_string(),
            String::new(),
        ];
        for path in bad {
            assert!(path.parse::<StorePath>().is_err(), "{path:?} was accepted");
        }
        assert!(StorePath::from_base_name(&format!("../{HASH}-x")).is_err());
    }

    proptest! {
        #[test]
        fn parse_agrees_with_the_grammar(name in "[A-Za-z0-9+._?= /é-]{0,12}") {
            let text = format!("/nix/store/{HASH}-{name}");
            let grammar = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || "+-._?=".contains(c))
                && name != "." && name != ".."
                && !name.starts_with(".-") && !name.starts_with("..-");
            prop_assert_eq!(text.parse::<StorePath>().is_ok(), grammar);
        }
    }
}
