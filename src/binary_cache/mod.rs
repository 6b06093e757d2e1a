//! A client of Nix binary caches: images assembled straight from signed
//! NARs, without Nix and without running any package-set code.
//!
//! A binary cache (cache.nixos.org, or a directory made by
//! `nix copy --to file://...`) is plain files (Nix manual, "Binary Cache";
//! Nix's `libstore/binary-cache-store.cc`):
//!
//! ```text
//! nix-cache-info                 StoreDir, Priority, ...
//! <hash>.narinfo                 one store path: where its NAR is, hashes, sizes, references, signatures
//! nar/<filehash>.nar.<ext>       the path's contents as a compressed NAR
//! ```
//!
//! Nothing a cache sends is believed before it is checked:
//!
//! | step | module | checks |
//! |---|---|---|
//! | store paths | [`store_path`] | `/nix/store/<32 nix32 chars>-<name>`, Nix's name characters |
//! | narinfo | [`narinfo`] | strict `Key: value` lines, required keys once, sizes and hashes well formed, a relative `URL`, bounded size and reference count |
//! | trust | [`signature`] | an ed25519 `Sig` by a trusted key over the fingerprint |
//! | closure | [`client`] | the narinfo is for the path asked for; total NarSize and path count bounded before any NAR is fetched |
//! | NAR file | [`client`], [`decompress`] | FileSize/FileHash of the compressed bytes, then NarSize/NarHash of the NAR, failing the final read on a mismatch |
//! | NAR contents | [`nar`] | names, order, padding, depth, sizes, trailing bytes; contents streamed, never buffered |
//!
//! Hashes are printed in Nix's own base 32 ([`nix32`]).
//!
//! Reading a closure and walking every NAR (blocking work on a blocking
//! thread):
//!
//! ```no_run
//! use std::time::Duration;
//! use nixery::binary_cache::{nar::Node, BinaryCache, CacheOptions, TrustedKeys, StorePath};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let cache = BinaryCache::new("https://cache.nixos.org", TrustedKeys::cache_nixos_org(), CacheOptions::default())?;
//! let root: StorePath = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1".parse()?;
//! let closure = cache.closure(&[root]).await?;
//! for info in closure.paths.values() {
//!     let nar = cache.nar(info).await?;
//!     tokio::task::spawn_blocking(move || {
//!         nixery::binary_cache::nar::walk(nar.into_reader(), &mut |path: &std::path::Path, node: Node<'_>| {
//!             if let Node::File { size, .. } = node { println!("{} ({size} bytes)", path.display()); }
//!             Ok(())
//!         })
//!     }).await??;
//! }
//! # Ok(()) }
//! ```
//!
//! The doc of each module states its format and checks in full.

pub mod client;
pub mod decompress;
pub mod error;
pub mod nar;
pub mod narinfo;
pub mod network;
pub mod nix32;
pub mod reader;
pub mod signature;
pub mod store_path;

#[cfg(test)]
pub(crate) mod testing;

pub use client::{BinaryCache, CacheOptions, Closure};
pub use error::CacheError;
pub use narinfo::{HashError, NarInfo, NarInfoError, NarInfoLimits, Sha256Hash};
pub use reader::{NarReader, NarStream};
pub use signature::{KeyError, SignatureError, TrustedKeys, CACHE_NIXOS_ORG_KEY};
pub use store_path::{StorePath, StorePathError};
