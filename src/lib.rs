//! A container registry that builds images on demand with Nix.
//!
//! `docker pull <host>/shell/curl/jq` returns an image with exactly those
//! packages: built with Nix the first time it is asked for, served from
//! storage ever after. See the README for the big picture; each module says
//! what it owns.

pub mod aws;
pub mod build;
pub mod config;
pub mod customisation;
pub mod fetch;
pub mod image;
pub mod layers;
pub mod manifest;
pub mod nix;
pub mod pack;
pub mod popularity;
pub mod registry;
pub mod source;
pub mod storage;
