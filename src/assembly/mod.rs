//! Cold pulls in seconds: images assembled from a signed Nix binary cache
//! by the registry itself (the Lambda function, or the local server), with
//! no worker, no Nix, and no code of the package set run.
//!
//! ```text
//! pull of a new image
//!   -> attrs.rs   names -> outputs, from the revision's attribute index
//!                 (made once per revision by `nixery index`, jobs.rs)
//!   -> binary_cache   the closure from narinfos, every signature checked
//!   -> builder    the same steps and writers as a build: layering, each
//!                 new layer streamed NAR -> tar -> compressed, byte for
//!                 byte the layer a worker packs from its Nix store
//! ```
//!
//! [`FromCache`] says when (`NIXERY_FROM_CACHE`): `first` tries the cache
//! and builds what it cannot give, as before; `only` never builds (the
//! posture of a public instance); `never` is the build path alone.
//!
//! | file | holds |
//! |---|---|
//! | `attrs.rs` | the attribute index: its stored form, the lookup, the catalog that reads it |
//! | `store.rs` | [`store::CacheStore`], the binary cache as a source of store paths |
//! | `jobs.rs` | index jobs: made with Nix, asked for by pulls |

pub(crate) mod attrs;
pub(crate) mod jobs;
pub(crate) mod store;

use std::str::FromStr;

/// When images are assembled from the binary cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FromCache {
    /// From the cache when it can give the image, else built.
    #[default]
    First,
    /// From the cache alone; never a build.
    Only,
    /// Always built.
    Never,
}

impl FromStr for FromCache {
    type Err = String;
    fn from_str(value: &str) -> Result<FromCache, String> {
        match value {
            "first" => Ok(FromCache::First),
            "only" => Ok(FromCache::Only),
            "never" => Ok(FromCache::Never),
            other => Err(format!("{other:?} is not first, only or never")),
        }
    }
}

impl std::fmt::Display for FromCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FromCache::First => "first",
            FromCache::Only => "only",
            FromCache::Never => "never",
        })
    }
}

/// The binary cache images are assembled from, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// The cache's URL (`https://`, `http://` or `file://`).
    pub substituter: String,
    /// Trusted keys, as Nix writes them (`name:base64 ...`).
    pub trusted_keys: String,
    pub mode: FromCache,
}

#[cfg(test)]
mod tests;
