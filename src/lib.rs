//! A container registry that builds images on demand with Nix.
//!
//! `docker pull <host>/shell/curl/jq` returns an image with exactly those
//! packages: built with Nix the first time it is asked for, served from
//! storage ever after.
//!
//! The modules follow a request down, and nothing calls back up:
//!
//! ```text
//! registry  (HTTP: routes, errors, pages)
//!   -> images    (the image service: served, fresh, or built?)
//!     -> dispatch  (where a build runs: in process, or workers over SQS)
//!       -> builder   (one build: Nix, layers, packing, customisation)
//!         -> storage   (the bucket or directory; records)
//! app     (the object graph, built once from the configuration)
//! gc      (`nixery gc`: what storage still needs, and the rest deleted)
//! oci     (names, manifests, digests: pure, used by all)
//! binary_cache  (a signed Nix binary cache: narinfos, closures, NAR streams)
//! assembly      (images assembled from a binary cache, with no Nix: the
//!                attribute index and the cache as a source of store paths)
//! source  (what a tag means for the package source)
//! config  (the command line and settings; only the binary reads it)
//! ```

pub mod app;
pub mod assembly;
pub(crate) mod aws;
pub mod binary_cache;
pub mod builder;
pub mod config;
pub mod dispatch;
pub(crate) mod fetch;
pub mod gc;
pub mod images;
pub mod metrics;
pub mod oci;
pub mod registry;
pub mod source;
pub mod storage;
