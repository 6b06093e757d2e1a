//! The command line and every setting, defined once with clap.
//!
//! Each setting is a flag and an environment variable (the variable's name
//! is shown as the flag's value name, so `nixery serve --help` lists both,
//! with the default). Names follow Nixery's where the meaning is the same.
//! An empty (or blank) variable counts as unset, except
//! `NIXERY_IMPLICIT_PACKAGES`, where empty means "none".
//!
//! Parsing happens in two stages: clap reads flags and variables into the
//! `*Args` structs, checking each value on its own (numbers, ranges, URL
//! schemes, names); [`Cli::mode`] then checks how they combine and returns
//! a [`Mode`], whose variants hold only what that mode uses, in the types
//! of the modules that use them. Nothing below this module reads settings.
//!
//! ```
//! use clap::Parser;
//! use nixery::config::{Cli, Mode};
//! let cli = Cli::try_parse_from(["nixery", "serve", "--storage-path", "/tmp/images"]).unwrap();
//! assert!(matches!(cli.mode(false).unwrap(), Mode::Serve(_)));
//! ```
//!
//! The README's configuration table is [`markdown_table`]'s output; a test
//! checks it, and the deployment template's contract test uses
//! [`variables`].

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::assembly::{CacheConfig, FromCache};
use crate::builder::compress::Compression;
use crate::builder::BuildLimits;
use crate::dispatch::sqs::Timings;
use crate::images::cache::CacheLimits;
use crate::images::ImageSettings;
use crate::oci::name::Arch;
use crate::source::{AllowedRefs, PackageSource};
use crate::storage::StorageConfig;

/// The default nixpkgs channel.
pub const DEFAULT_CHANNEL: &str = "nixos-unstable";
/// SigV4 presigned URLs cannot live longer than seven days.
const MAX_PRESIGN_SECONDS: u64 = 7 * 24 * 3600;
/// Docker and containerd refuse images with more than 127 layers; one is the
/// customisation layer.
pub const MAX_LAYER_BUDGET: u64 = 126;
/// 8 GiB: CUDA or TeX closures fit, a request for all of nixpkgs does not.
const DEFAULT_MAX_IMAGE_SIZE: u64 = 8 << 30;
/// A day: a manifest cache older than that would outlive what garbage
/// collection keeps.
const MAX_CACHE_TTL: u64 = 24 * 3600;
/// 16 GiB: more than any function has.
const MAX_CACHE_SIZE: u64 = 16 << 30;
/// The variable whose empty value means something (no implicit packages).
const EMPTY_MEANS_NONE: &str = "NIXERY_IMPLICIT_PACKAGES";

/// A container registry that builds images on demand with Nix.
///
/// Settings come from flags or the environment variables named in each
/// command's help. Logs go to stderr (RUST_LOG sets the level).
#[derive(Debug, Parser)]
#[command(name = "nixery", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the registry on a local port, or as an AWS Lambda function when
    /// AWS_LAMBDA_RUNTIME_API is set (the Lambda runtime starts it with no
    /// command at all).
    Serve(Box<ServeArgs>),
    /// Takes builds from the queue and runs them with the local Nix,
    /// writing images to the configured storage.
    Worker(WorkerArgs),
    /// Builds the given packages of the configured source and prints
    /// popularity data for NIX_POPULARITY_URL (Nixery's format) on stdout.
    Popularity(PopularityArgs),
    /// Deletes what images not served for a while and everything no image
    /// needs take up in storage, while the registry keeps running; prints
    /// what it deleted (or, with --dry-run, would delete).
    Gc(GcArgs),
    /// Lists the configured package source's attributes at a revision
    /// with Nix and stores its attribute index, from which the registry
    /// assembles images out of the binary cache without Nix; with
    /// --popularity, also counts how many packages' closures hold each
    /// store path (from the cache's narinfos) for NIX_POPULARITY_URL.
    Index(IndexArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub listen: ListenArgs,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub image: ImageArgs,
    #[command(flatten)]
    pub nix: NixArgs,
    #[command(flatten)]
    pub dispatch: DispatchArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
}

/// When images are assembled from the binary cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FromCacheArg {
    /// From the cache when it holds the image, else built.
    First,
    /// From the cache alone: a name or path it lacks is an error, and no
    /// code of the package set runs.
    Only,
    /// Always built.
    Never,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Binary cache")]
pub struct CacheArgs {
    /// A Nix binary cache (https://, http:// or file://) images are
    /// assembled from, without Nix, when its attribute index and the cache
    /// hold them; `https://cache.nixos.org` for a channel source, none
    /// otherwise (`none` turns it off).
    #[arg(long, env = "NIXERY_SUBSTITUTER", value_name = "NIXERY_SUBSTITUTER", hide_env = true,
          value_parser = substituter)]
    pub substituter: Option<String>,
    /// Keys a narinfo must be signed with (`name:base64`, space
    /// separated); an unsigned or otherwise signed one is refused.
    #[arg(long, env = "NIXERY_TRUSTED_KEYS", value_name = "NIXERY_TRUSTED_KEYS", hide_env = true,
          default_value = crate::binary_cache::CACHE_NIXOS_ORG_KEY, value_parser = trusted_keys)]
    pub trusted_keys: String,
    /// When images are assembled from the binary cache instead of built:
    /// when it holds them, else built; only from it (no build, no
    /// package-set code run: a public instance's posture); or never.
    #[arg(long, env = "NIXERY_FROM_CACHE", value_name = "NIXERY_FROM_CACHE", hide_env = true,
          value_enum, default_value_t = FromCacheArg::First)]
    pub from_cache: FromCacheArg,
}

#[derive(Debug, Clone, Args)]
pub struct IndexArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub nix: NixArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// The revision to index, as a pull's tag names it (`latest`: the
    /// channel or default branch as it is now).
    #[arg(long, default_value = "latest", value_parser = tag)]
    pub tag: String,
    /// Platforms to index (amd64, arm64; comma separated).
    #[arg(long, env = "NIXERY_PLATFORMS", value_name = "NIXERY_PLATFORMS", hide_env = true, default_value = "amd64",
          value_parser = platforms)]
    pub platforms: Platforms,
    /// Also count, from the binary cache's narinfos, how many packages'
    /// closures hold each store path, and store it beside the index in
    /// Nixery's popularity format.
    #[arg(long)]
    pub popularity: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthScope {
    /// Anyone pulls what is built; building needs credentials.
    Build,
    /// Every request needs credentials.
    All,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Access")]
pub struct AuthArgs {
    /// An htpasswd file with bcrypt hashes (`htpasswd -B`): a path,
    /// file:// or s3://bucket/key. Unset: a public registry.
    #[arg(
        long,
        env = "NIXERY_HTPASSWD",
        value_name = "NIXERY_HTPASSWD",
        hide_env = true
    )]
    pub htpasswd: Option<String>,
    /// What needs credentials when NIXERY_HTPASSWD is set.
    #[arg(long, env = "NIXERY_AUTH_SCOPE", value_name = "NIXERY_AUTH_SCOPE", hide_env = true, value_enum,
          default_value_t = AuthScope::Build)]
    pub auth_scope: AuthScope,
    /// Where the keys that sign bearer tokens are kept: a key in the
    /// storage, shared by every instance, created with a random key at
    /// the first start (docs/security.md: rotation).
    #[arg(long, env = "NIXERY_TOKEN_KEY", value_name = "NIXERY_TOKEN_KEY", hide_env = true,
          default_value = crate::registry::token::DEFAULT_KEY_OBJECT, value_parser = storage_key)]
    pub token_key: String,
    /// Seconds a bearer token lasts (30 to 3600).
    #[arg(long, env = "NIXERY_TOKEN_TTL", value_name = "NIXERY_TOKEN_TTL", hide_env = true,
          default_value_t = crate::registry::token::DEFAULT_TTL.as_secs(),
          value_parser = clap::value_parser!(u64).range(30..=3600))]
    pub token_ttl: u64,
    /// Wrong passwords one client address may send in a minute; then its
    /// logins get 429 TOOMANYREQUESTS until the minute is over.
    #[arg(long, env = "NIXERY_LOGIN_FAILURES", value_name = "NIXERY_LOGIN_FAILURES", hide_env = true,
          default_value_t = crate::registry::login::DEFAULT_FAILURES,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub login_failures: u32,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub nix: NixArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
}

#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Images neither served nor built for this long lose their record
    /// (30d, 12h, 90m, 45s, or seconds).
    #[arg(long, env = "NIXERY_GC_UNUSED_FOR", value_name = "NIXERY_GC_UNUSED_FOR", hide_env = true,
          default_value = "30d", value_parser = duration)]
    pub unused_for: Duration,
    /// Nothing written more recently is deleted: longer than the longest
    /// build, which writes its objects before the record that names them.
    #[arg(long, env = "NIXERY_GC_GRACE", value_name = "NIXERY_GC_GRACE", hide_env = true,
          default_value = "1d", value_parser = duration)]
    pub grace: Duration,
    /// Print what would be deleted, and delete nothing.
    #[arg(
        long,
        env = "NIXERY_GC_DRY_RUN",
        value_name = "NIXERY_GC_DRY_RUN",
        hide_env = true
    )]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PopularityArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub nix: NixArgs,
    /// Packages whose closures are counted.
    #[arg(required = true, value_name = "PACKAGE", value_parser = package_name)]
    pub packages: Vec<String>,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Local server")]
pub struct ListenArgs {
    /// Port of the local server, on 127.0.0.1.
    #[arg(
        long,
        env = "PORT",
        value_name = "PORT",
        hide_env = true,
        default_value_t = 8080
    )]
    pub port: u16,
    /// Full listen address; overrides the port (port 0 picks a free one).
    #[arg(
        long,
        env = "NIXERY_LISTEN",
        value_name = "NIXERY_LISTEN",
        hide_env = true
    )]
    pub listen: Option<SocketAddr>,
    /// How clients reach this registry (`https://registry.example.org`),
    /// for the pull commands and build status URLs it gives; unset, the
    /// request's Host (or X-Forwarded-Host) says. Set it behind a proxy or
    /// CDN that sends its own Host.
    #[arg(long, env = "NIXERY_PUBLIC_URL", value_name = "NIXERY_PUBLIC_URL", hide_env = true,
          value_parser = public_url)]
    pub public_url: Option<String>,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Package source")]
pub struct SourceArgs {
    #[command(flatten)]
    pub choice: SourceChoice,
    /// Refs of a git source whose history a commit tag must be in
    /// (refspec globs), or `any` for every commit the repository holds,
    /// pull requests included (and, for the channel source, any nixpkgs
    /// commit, unchecked).
    #[arg(long, env = "NIXERY_ALLOWED_REFS", value_name = "NIXERY_ALLOWED_REFS", hide_env = true,
          default_value = "refs/heads/* refs/tags/*", value_parser = allowed_refs)]
    pub allowed_refs: AllowedRefs,
    /// Where nixpkgs commit tags of the channel source are checked: a
    /// repository in GitHub's REST API (its compare endpoint).
    #[arg(long, env = "NIXERY_NIXPKGS_API", value_name = "NIXERY_NIXPKGS_API", hide_env = true,
          default_value = crate::source::DEFAULT_NIXPKGS_API, value_parser = http_url)]
    pub nixpkgs_api: String,
    /// Seconds an image from a moving source (a channel, a path) stays
    /// current, and a branch's commit is remembered.
    #[arg(long, env = "NIXERY_TAG_TTL", value_name = "NIXERY_TAG_TTL", hide_env = true, default_value_t = 6 * 3600)]
    pub tag_ttl: u64,
}

/// One package source at most; the channel when none is given.
#[derive(Debug, Clone, Args)]
#[group(id = "package_source", multiple = false)]
pub struct SourceChoice {
    /// A nixpkgs channel; the tag is ignored unless it is a nixpkgs commit,
    /// which pins the image to it.
    #[arg(long, env = "NIXERY_CHANNEL", value_name = "NIXERY_CHANNEL", hide_env = true, value_parser = package_name,
          default_value = DEFAULT_CHANNEL)]
    pub channel: String,
    /// A git repository of a package set; the tag is a branch, tag or
    /// commit, `latest` the default branch.
    #[arg(
        long,
        env = "NIXERY_PKGS_REPO",
        value_name = "NIXERY_PKGS_REPO",
        hide_env = true
    )]
    pub pkgs_repo: Option<String>,
    /// A directory whose default.nix is called like nixpkgs
    /// (`{ system }: { ... }`); the tag is ignored.
    #[arg(long, env = "NIXERY_PKGS_PATH", value_name = "NIXERY_PKGS_PATH", hide_env = true, value_parser = package_set_dir)]
    pub pkgs_path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Filesystem,
    S3,
    /// In memory, gone at exit (for trying things out).
    Memory,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Storage")]
pub struct StorageArgs {
    /// Where images are stored.
    #[arg(long, env = "NIXERY_STORAGE_BACKEND", value_name = "NIXERY_STORAGE_BACKEND", hide_env = true, value_enum, default_value_t = Backend::Filesystem)]
    pub storage_backend: Backend,
    /// Storage root directory (required for `filesystem`).
    #[arg(
        long,
        env = "STORAGE_PATH",
        value_name = "STORAGE_PATH",
        hide_env = true
    )]
    pub storage_path: Option<PathBuf>,
    /// The bucket (required for `s3`).
    #[arg(
        long,
        env = "NIXERY_S3_BUCKET",
        value_name = "NIXERY_S3_BUCKET",
        hide_env = true
    )]
    pub s3_bucket: Option<String>,
    /// Key prefix inside the bucket.
    #[arg(
        long,
        env = "NIXERY_S3_PREFIX",
        value_name = "NIXERY_S3_PREFIX",
        hide_env = true,
        default_value = ""
    )]
    pub s3_prefix: String,
    /// URL of any S3-compatible server (path-style addressing is used when
    /// set); AWS's otherwise.
    #[arg(long, env = "NIXERY_S3_ENDPOINT", value_name = "NIXERY_S3_ENDPOINT", hide_env = true, value_parser = http_url)]
    pub s3_endpoint: Option<String>,
    /// Lifetime of the presigned URLs blob GETs redirect to, in seconds
    /// (1 s to 7 days).
    #[arg(long, env = "NIXERY_PRESIGN_SECONDS", value_name = "NIXERY_PRESIGN_SECONDS", hide_env = true, default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=MAX_PRESIGN_SECONDS))]
    pub presign_seconds: u64,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Images")]
pub struct ImageArgs {
    /// Most layers for the packages (1 to 126; the customisation layer
    /// comes on top).
    #[arg(long, env = "NIXERY_LAYER_BUDGET", value_name = "NIXERY_LAYER_BUDGET", hide_env = true, default_value_t = 94,
          value_parser = clap::value_parser!(u64).range(1..=MAX_LAYER_BUDGET))]
    pub layer_budget: u64,
    /// Packages added to every image, as Nixery does (those the package set
    /// lacks are skipped; empty for none).
    #[arg(long, env = EMPTY_MEANS_NONE, value_name = EMPTY_MEANS_NONE, hide_env = true, default_value = "cacert iana-etc",
          value_parser = package_list)]
    pub implicit_packages: PackageList,
    /// How layers are compressed: gzip (every client) or zstd (smaller,
    /// faster to unpack; containerd 1.5, podman 3, Docker 23 and later).
    #[arg(long, env = "NIXERY_COMPRESSION", value_name = "NIXERY_COMPRESSION", hide_env = true, default_value = "gzip",
          value_parser = compression)]
    pub compression: Compression,
    /// Seconds a served manifest is answered again from memory, without a
    /// storage call (images of moving sources also expire with their tag
    /// TTL); 0 turns the cache off. Keep it far below the unused time after
    /// which garbage collection removes images.
    #[arg(long, env = "NIXERY_CACHE_TTL", value_name = "NIXERY_CACHE_TTL", hide_env = true, default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(0..=MAX_CACHE_TTL))]
    pub cache_ttl: u64,
    /// Most bytes of memory the manifest cache takes.
    #[arg(long, env = "NIXERY_CACHE_SIZE", value_name = "NIXERY_CACHE_SIZE", hide_env = true, default_value_t = 64 << 20,
          value_parser = clap::value_parser!(u64).range(0..=MAX_CACHE_SIZE))]
    pub cache_size: u64,
    /// Platforms every image is built for (amd64, arm64; comma
    /// separated). With more than one, a tag answers an OCI image index
    /// of one manifest per platform (the first platform's manifest for
    /// clients that take no index); a leading `arm64` in a name still
    /// means that platform alone.
    #[arg(long, env = "NIXERY_PLATFORMS", value_name = "NIXERY_PLATFORMS", hide_env = true, default_value = "amd64",
          value_parser = platforms)]
    pub platforms: Platforms,
    /// Declared images: a JSON file (a path, `file://` or `s3://` URL)
    /// naming images with their packages and config (`Cmd`, `Entrypoint`,
    /// `Env`, `WorkingDir`, `User`, `ExposedPorts`, `Labels`); a declared
    /// name wins over reading it as a package list.
    #[arg(
        long,
        env = "NIXERY_IMAGES",
        value_name = "NIXERY_IMAGES",
        hide_env = true
    )]
    pub images: Option<String>,
}

/// The platforms of `NIXERY_PLATFORMS`, in order, each once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platforms(pub Vec<Arch>);

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Nix")]
pub struct NixArgs {
    /// Seconds one Nix command may run before it is stopped.
    #[arg(long, env = "NIX_TIMEOUT", value_name = "NIX_TIMEOUT", hide_env = true, default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub nix_timeout: u64,
    /// Popularity data for layering, in Nixery's format (http(s)://,
    /// file:// or s3://bucket/key); equal weights otherwise.
    #[arg(long, env = "NIX_POPULARITY_URL", value_name = "NIX_POPULARITY_URL", hide_env = true, value_parser = popularity_url)]
    pub popularity_url: Option<String>,
    /// Builds run at once by this process (further pulls wait their turn).
    #[arg(long, env = "NIXERY_MAX_BUILDS", value_name = "NIXERY_MAX_BUILDS", hide_env = true, default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_builds: u64,
    /// Largest image built, in bytes of uncompressed store paths (its
    /// closure's NAR size); larger ones are refused before packing.
    #[arg(long, env = "NIXERY_MAX_IMAGE_SIZE", value_name = "NIXERY_MAX_IMAGE_SIZE", hide_env = true,
          default_value_t = DEFAULT_MAX_IMAGE_SIZE, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_image_size: u64,
    /// Free bytes the Nix store's disk must have before a build starts;
    /// below that, store paths no image is being built from are deleted
    /// until twice as much is free (0: never; for workers, whose store is
    /// a cache).
    #[arg(
        long,
        env = "NIXERY_MIN_FREE",
        value_name = "NIXERY_MIN_FREE",
        hide_env = true,
        default_value_t = 0
    )]
    pub min_free: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BuilderKind {
    /// Build in the registry process with the local Nix.
    Local,
    /// Hand builds to workers through a queue.
    Sqs,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Builds")]
pub struct DispatchArgs {
    /// Where builds run.
    #[arg(long, env = "NIXERY_BUILDER", value_name = "NIXERY_BUILDER", hide_env = true, value_enum, default_value_t = BuilderKind::Local)]
    pub builder: BuilderKind,
    /// Seconds a pull waits for a build before answering "still being
    /// built" (below Lambda's 900 s limit, with margin).
    #[arg(long, env = "NIXERY_BUILD_TIMEOUT", value_name = "NIXERY_BUILD_TIMEOUT", hide_env = true, default_value_t = 840,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub build_timeout: u64,
    /// Seconds a failed build (or a tag that names nothing) is remembered
    /// and answered without building (or looking) again.
    #[arg(long, env = "NIXERY_FAILURE_TTL", value_name = "NIXERY_FAILURE_TTL", hide_env = true, default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub failure_ttl: u64,
    /// Builds of new images that may wait to start at once: in this
    /// process for a build slot (`local`), or sent to the queue by this
    /// instance and not yet taken by a worker (`sqs`). A pull of yet
    /// another new image gets 429 TOOMANYREQUESTS with Retry-After, and
    /// nothing is built.
    #[arg(long, env = "NIXERY_MAX_QUEUED_BUILDS", value_name = "NIXERY_MAX_QUEUED_BUILDS", hide_env = true,
          default_value_t = 16, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub max_queued_builds: u64,
    /// The queue of the arm64 workers (`sqs` builder): aarch64-linux
    /// builds go there, so that no build needs emulation; unset, they go
    /// to `NIXERY_QUEUE_URL` with the rest.
    #[arg(
        long,
        env = "NIXERY_ARM64_QUEUE_URL",
        value_name = "NIXERY_ARM64_QUEUE_URL",
        hide_env = true
    )]
    pub arm64_queue_url: Option<String>,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Build queue")]
pub struct QueueArgs {
    /// The SQS build queue (required for the `sqs` builder and workers).
    #[arg(
        long,
        env = "NIXERY_QUEUE_URL",
        value_name = "NIXERY_QUEUE_URL",
        hide_env = true
    )]
    pub queue_url: Option<String>,
    /// URL of any SQS-compatible server; AWS's otherwise.
    #[arg(long, env = "NIXERY_SQS_ENDPOINT", value_name = "NIXERY_SQS_ENDPOINT", hide_env = true, value_parser = http_url)]
    pub sqs_endpoint: Option<String>,
    /// How often a worker reports progress, in seconds; six silent
    /// intervals mean it died and the build may be taken over.
    #[arg(long, env = "NIXERY_HEARTBEAT_SECONDS", value_name = "NIXERY_HEARTBEAT_SECONDS", hide_env = true,
          default_value_t = crate::dispatch::status::DEFAULT_HEARTBEAT_SECS, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_seconds: u64,
}

/// Package attribute names, as a setting lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageList(pub Vec<String>);

/// A combination of settings that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is not set: {hint}")]
    Missing {
        var: &'static str,
        hint: &'static str,
    },
    #[error("{var}={value} cannot be used here: {reason}")]
    Conflict {
        var: &'static str,
        value: &'static str,
        reason: &'static str,
    },
}

/// Memory storage lives in one process; a queue's two ends are two.
fn shared_storage(storage: StorageConfig) -> Result<StorageConfig, ConfigError> {
    match storage {
        StorageConfig::Memory => Err(ConfigError::Conflict {
            var: "NIXERY_STORAGE_BACKEND",
            value: "memory",
            reason: "builds through a queue need storage that the registry and its workers share",
        }),
        shared @ (StorageConfig::Filesystem { .. } | StorageConfig::S3 { .. }) => Ok(shared),
    }
}

/// What to run, with everything it needs and nothing else.
#[derive(Debug, Clone)]
pub enum Mode {
    Serve(Box<ServeConfig>),
    Worker(WorkerConfig),
    Popularity(PopularityConfig),
    Gc(GcConfig),
    Index(IndexConfig),
}

/// `nixery index`.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    pub source: PackageSource,
    pub allowed_refs: AllowedRefs,
    pub nixpkgs_api: String,
    pub tag_ttl: Duration,
    pub storage: StorageConfig,
    pub nix: NixConfig,
    pub tag: String,
    pub systems: Vec<String>,
    /// Where popularity is counted from, if asked for.
    pub popularity_from: Option<CacheConfig>,
}

/// `nixery gc`.
#[derive(Debug, Clone)]
pub struct GcConfig {
    pub storage: StorageConfig,
    pub settings: crate::gc::GcSettings,
}

/// The registry.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// How clients reach this registry, when the request cannot say.
    pub public_url: Option<String>,
    /// Where the htpasswd file is, and what it guards.
    pub auth: Option<(String, AuthScope)>,
    /// Bearer tokens and login limits, with `auth`.
    pub tokens: TokenSettings,
    pub source: PackageSource,
    pub allowed_refs: AllowedRefs,
    pub nixpkgs_api: String,
    pub tag_ttl: Duration,
    /// How long a failed build, or a failed lookup of a tag, is remembered.
    pub failure_ttl: Duration,
    pub storage: StorageConfig,
    pub images: ImageSettings,
    /// Where the declared images are (`NIXERY_IMAGES`), if anywhere.
    pub declared_images: Option<String>,
    pub builds: BuildMode,
    /// The binary cache images are assembled from, if any, and the
    /// limits and popularity data of that assembly.
    pub assembly: Option<(CacheConfig, NixConfig)>,
    /// Builds of new images that may wait to start at once.
    pub max_queued_builds: usize,
}

/// Bearer tokens and login limits of a private registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSettings {
    /// The storage key of the signing keys.
    pub key_object: String,
    pub ttl: Duration,
    /// Wrong passwords per address per minute.
    pub login_failures: u32,
}

/// Where the registry's builds run.
#[derive(Debug, Clone)]
pub enum BuildMode {
    /// In this process, with the local Nix.
    Local(NixConfig),
    /// On workers, through a queue.
    Sqs {
        queue: QueueConfig,
        /// Where aarch64-linux builds go instead, if anywhere.
        arm64_queue: Option<String>,
        timings: Timings,
    },
}

/// How Nix is run where builds happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixConfig {
    pub timeout: Duration,
    pub popularity_url: Option<String>,
    pub limits: BuildLimits,
}

/// The build queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    pub url: String,
    pub endpoint: Option<String>,
    pub heartbeat: Duration,
}

/// A build worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub storage: StorageConfig,
    pub nix: NixConfig,
    pub queue: QueueConfig,
}

/// `nixery popularity`.
#[derive(Debug, Clone)]
pub struct PopularityConfig {
    pub source: PackageSource,
    pub tag_ttl: Duration,
    pub nix: NixConfig,
    pub packages: Vec<String>,
}

impl Cli {
    /// Parses the process's arguments and environment, or exits with
    /// clap's message (status 2; `--help` and `--version` exit 0).
    pub fn from_env() -> Cli {
        let matches = command().get_matches();
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }

    /// Checks how the settings combine. `in_lambda`: started by the Lambda
    /// runtime, which gives no command (it means `serve`).
    pub fn mode(self, in_lambda: bool) -> Result<Mode, ModeError> {
        match self.command {
            Some(Command::Serve(args)) => Ok(Mode::Serve(Box::new(args.config()?))),
            Some(Command::Worker(args)) => Ok(Mode::Worker(args.config()?)),
            Some(Command::Popularity(args)) => Ok(Mode::Popularity(args.config())),
            Some(Command::Index(args)) => Ok(Mode::Index(args.config()?)),
            Some(Command::Gc(args)) => Ok(Mode::Gc(GcConfig {
                storage: args.storage.config()?,
                settings: crate::gc::GcSettings {
                    unused_for: args.unused_for,
                    grace: args.grace,
                    dry_run: args.dry_run,
                },
            })),
            None if in_lambda => {
                // The same settings, from the environment alone.
                let matches = command().try_get_matches_from(["nixery", "serve"])?;
                Cli::from_arg_matches(&matches)?.mode(false)
            }
            None => Err(ModeError::NoCommand),
        }
    }
}

/// Why no mode could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Parse(#[from] clap::Error),
    #[error("no command given: try `nixery serve`, or `nixery --help`")]
    NoCommand,
}

impl ServeArgs {
    fn config(self) -> Result<ServeConfig, ConfigError> {
        let listen = self
            .listen
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], self.listen.port)));
        let builds = match self.dispatch.builder {
            BuilderKind::Local => BuildMode::Local(self.nix.config()),
            BuilderKind::Sqs => BuildMode::Sqs {
                queue: self
                    .queue
                    .config("the sqs builder sends builds to this queue")?,
                arm64_queue: self.dispatch.arm64_queue_url.clone(),
                timings: Timings {
                    build_timeout: Duration::from_secs(self.dispatch.build_timeout),
                    heartbeat: Duration::from_secs(self.queue.heartbeat_seconds),
                    failure_ttl: Duration::from_secs(self.dispatch.failure_ttl),
                },
            },
        };
        let storage = match builds {
            BuildMode::Local(_) => self.storage.config()?,
            BuildMode::Sqs { .. } => shared_storage(self.storage.config()?)?,
        };
        let source = self.source.config();
        let assembly = self
            .cache
            .config(&source)?
            .map(|cache| (cache, self.nix.config()));
        Ok(ServeConfig {
            listen,
            public_url: self.listen.public_url.clone(),
            auth: self
                .auth
                .htpasswd
                .clone()
                .map(|file| (file, self.auth.auth_scope)),
            tokens: TokenSettings {
                key_object: self.auth.token_key.clone(),
                ttl: Duration::from_secs(self.auth.token_ttl),
                login_failures: self.auth.login_failures,
            },
            source,
            allowed_refs: self.source.allowed_refs.clone(),
            nixpkgs_api: self.source.nixpkgs_api.clone(),
            tag_ttl: Duration::from_secs(self.source.tag_ttl),
            failure_ttl: Duration::from_secs(self.dispatch.failure_ttl),
            storage,
            images: ImageSettings {
                layer_budget: self.image.layer_budget as usize,
                implicit_packages: self.image.implicit_packages.0,
                compression: self.image.compression,
                platforms: self.image.platforms.0,
                // Read by the binary at start (`NIXERY_IMAGES`).
                declared: Default::default(),
                cache: CacheLimits {
                    ttl: Duration::from_secs(self.image.cache_ttl),
                    max_bytes: self.image.cache_size as usize,
                },
            },
            declared_images: self.image.images.clone(),
            builds,
            max_queued_builds: self.dispatch.max_queued_builds as usize,
            assembly,
        })
    }
}

/// The binary cache of a channel source when none is set.
pub const DEFAULT_SUBSTITUTER: &str = "https://cache.nixos.org";

impl CacheArgs {
    /// The binary cache to assemble from, if any: the one set, else
    /// cache.nixos.org for a channel source; none with `never`.
    fn config(&self, source: &PackageSource) -> Result<Option<CacheConfig>, ConfigError> {
        let substituter = match (&self.substituter, source) {
            (Some(none), _) if none == "none" => None,
            (Some(url), _) => Some(url.clone()),
            (None, PackageSource::Channel { .. }) => Some(DEFAULT_SUBSTITUTER.to_string()),
            (None, PackageSource::Git { .. } | PackageSource::Path(_)) => None,
        };
        let mode = match self.from_cache {
            FromCacheArg::First => FromCache::First,
            FromCacheArg::Only => FromCache::Only,
            FromCacheArg::Never => return Ok(None),
        };
        match substituter {
            Some(substituter) => Ok(Some(CacheConfig {
                substituter,
                trusted_keys: self.trusted_keys.clone(),
                mode,
            })),
            None if mode == FromCache::Only => Err(ConfigError::Missing {
                var: "NIXERY_SUBSTITUTER",
                hint: "NIXERY_FROM_CACHE=only assembles every image from a binary cache",
            }),
            None => Ok(None),
        }
    }
}

impl IndexArgs {
    fn config(self) -> Result<IndexConfig, ConfigError> {
        let source = self.source.config();
        let popularity_from = if self.popularity {
            let cache = self.cache.config(&source)?.ok_or(ConfigError::Missing {
                var: "NIXERY_SUBSTITUTER",
                hint: "--popularity counts references in a binary cache's narinfos",
            })?;
            Some(cache)
        } else {
            None
        };
        Ok(IndexConfig {
            source,
            allowed_refs: self.source.allowed_refs.clone(),
            nixpkgs_api: self.source.nixpkgs_api.clone(),
            tag_ttl: Duration::from_secs(self.source.tag_ttl),
            storage: self.storage.config()?,
            nix: self.nix.config(),
            tag: self.tag,
            systems: self
                .platforms
                .0
                .iter()
                .map(|a| a.nix_system().to_string())
                .collect(),
            popularity_from,
        })
    }
}

impl WorkerArgs {
    fn config(self) -> Result<WorkerConfig, ConfigError> {
        Ok(WorkerConfig {
            storage: shared_storage(self.storage.config()?)?,
            nix: self.nix.config(),
            queue: self.queue.config("a worker takes builds from this queue")?,
        })
    }
}

impl PopularityArgs {
    fn config(self) -> PopularityConfig {
        PopularityConfig {
            source: self.source.config(),
            tag_ttl: Duration::from_secs(self.source.tag_ttl),
            nix: self.nix.config(),
            packages: self.packages,
        }
    }
}

impl SourceArgs {
    fn config(&self) -> PackageSource {
        let choice = &self.choice;
        if let Some(path) = &choice.pkgs_path {
            PackageSource::Path(path.clone())
        } else if let Some(url) = &choice.pkgs_repo {
            PackageSource::Git {
                url: url.as_str().into(),
            }
        } else {
            PackageSource::Channel {
                name: choice.channel.clone(),
            }
        }
    }
}

impl StorageArgs {
    fn config(self) -> Result<StorageConfig, ConfigError> {
        Ok(match self.storage_backend {
            Backend::Filesystem => StorageConfig::Filesystem {
                root: self.storage_path.ok_or(ConfigError::Missing {
                    var: "STORAGE_PATH",
                    hint: "the filesystem storage backend needs a root directory",
                })?,
            },
            Backend::S3 => StorageConfig::S3 {
                bucket: self.s3_bucket.ok_or(ConfigError::Missing {
                    var: "NIXERY_S3_BUCKET",
                    hint: "the s3 storage backend needs a bucket name",
                })?,
                prefix: self.s3_prefix,
                endpoint: self.s3_endpoint,
                presign_ttl: Duration::from_secs(self.presign_seconds),
            },
            Backend::Memory => StorageConfig::Memory,
        })
    }
}

impl NixArgs {
    fn config(&self) -> NixConfig {
        NixConfig {
            timeout: Duration::from_secs(self.nix_timeout),
            popularity_url: self.popularity_url.clone(),
            limits: BuildLimits {
                max_builds: self.max_builds as usize,
                max_image_size: self.max_image_size,
                min_free: self.min_free,
            },
        }
    }
}

impl QueueArgs {
    fn config(&self, needed_by: &'static str) -> Result<QueueConfig, ConfigError> {
        Ok(QueueConfig {
            url: self.queue_url.clone().ok_or(ConfigError::Missing {
                var: "NIXERY_QUEUE_URL",
                hint: needed_by,
            })?,
            endpoint: self.sqs_endpoint.clone(),
            heartbeat: Duration::from_secs(self.heartbeat_seconds),
        })
    }
}

/// The registry's settings when none is given but in-memory storage: the
/// one source of every default, for tests and for the types whose
/// defaults they are.
pub fn defaults() -> ServeConfig {
    let cli = Cli::try_parse_from(["nixery", "serve", "--storage-backend", "memory"])
        .expect("the defaults parse");
    match cli.mode(false) {
        Ok(Mode::Serve(config)) => *config,
        _ => unreachable!("`serve` gives the registry's settings"),
    }
}

/// The build limits when none is set.
pub fn default_limits() -> BuildLimits {
    match defaults().builds {
        BuildMode::Local(nix) => nix.limits,
        BuildMode::Sqs { .. } => unreachable!("the default builder is local"),
    }
}

/// The command definition, with empty variables counted as unset (so that
/// `NIXERY_PKGS_PATH=` does not conflict with another package source).
pub fn command() -> clap::Command {
    let mut cli = Cli::command();
    let commands: Vec<String> = cli
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    for name in commands {
        cli = cli.mut_subcommand(name, |mut sub| {
            let empty: Vec<String> = sub
                .get_arguments()
                .filter(|arg| {
                    arg.get_env().is_some_and(|var| {
                        var != EMPTY_MEANS_NONE
                            && std::env::var_os(var)
                                .is_some_and(|v| v.to_string_lossy().trim().is_empty())
                    })
                })
                .map(|arg| arg.get_id().to_string())
                .collect();
            for id in empty {
                sub = sub.mut_arg(id, |arg| arg.env(None::<&'static str>));
            }
            sub
        });
    }
    cli
}

/// Every environment variable any command reads.
pub fn variables() -> BTreeSet<String> {
    Cli::command()
        .get_subcommands()
        .flat_map(|c| c.get_arguments())
        .filter_map(|arg| arg.get_env())
        .map(|var| var.to_string_lossy().into_owned())
        .collect()
}

/// The README's configuration table: one row per variable, in the order
/// of `nixery serve --help` and then the worker's.
pub fn markdown_table() -> String {
    let mut out = String::from("| variable | flag | default | meaning |\n|---|---|---|---|\n");
    let mut seen = BTreeSet::new();
    let cli = Cli::command();
    for arg in cli.get_subcommands().flat_map(|c| c.get_arguments()) {
        let Some(var) = arg.get_env() else { continue };
        let var = var.to_string_lossy();
        if !seen.insert(var.to_string()) {
            continue;
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = match defaults.as_slice() {
            [] => "unset".to_string(),
            [v] if v.is_empty() => "empty".to_string(),
            values => format!("`{}`", values.join(" ")),
        };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string().replace('\n', " "))
            .unwrap_or_default();
        let choices: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        let help = if choices.is_empty() {
            help
        } else {
            format!("{help}: {}", choices.join(", "))
        };
        let flag = arg.get_long().unwrap_or_default();
        out.push_str(&format!("| `{var}` | `--{flag}` | {default} | {help} |\n"));
    }
    out
}

/// A binary cache URL (`none`: no cache).
fn substituter(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value == "none"
        || ["http://", "https://", "file://"]
            .iter()
            .any(|scheme| value.starts_with(scheme) && value.len() > scheme.len())
    {
        Ok(value.trim_end_matches('/').to_string())
    } else {
        Err(format!(
            "{:?} is not an http(s):// or file:// URL (or none)",
            crate::source::redact_urls(value)
        ))
    }
}

/// Trusted keys, checked as Nix's `trusted-public-keys` would be.
fn trusted_keys(value: &str) -> Result<String, String> {
    crate::binary_cache::TrustedKeys::parse(value)
        .map(|_| value.trim().to_string())
        .map_err(|e| e.to_string())
}

/// A tag, as a pull gives one.
fn tag(value: &str) -> Result<String, String> {
    crate::oci::name::validate_tag(value)
        .map(|()| value.to_string())
        .map_err(|e| e.to_string())
}

fn package_set_dir(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    if !path.join("default.nix").is_file() {
        return Err("the directory has no default.nix".to_string());
    }
    path.canonicalize().map_err(|e| e.to_string())
}

/// `scheme://host[:port]`, nothing after (a trailing `/` is dropped).
fn public_url(value: &str) -> Result<String, String> {
    let url = http_url(value)?;
    let url = url.trim_end_matches('/');
    let (_, authority) = url.split_once("://").unwrap_or_default();
    let plain = !authority.is_empty()
        && authority
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if plain {
        Ok(url.to_string())
    } else {
        Err("must be scheme://host or scheme://host:port, with no path".to_string())
    }
}

/// A key of the storage layout, such as `auth/token-key`.
fn storage_key(value: &str) -> Result<String, String> {
    crate::storage::check_key(value)
        .map(|()| value.to_string())
        .map_err(|_| "must be a storage key such as auth/token-key".to_string())
}

fn http_url(value: &str) -> Result<String, String> {
    if value.starts_with("http://") || value.starts_with("https://") {
        Ok(value.to_string())
    } else {
        Err("must be an http:// or https:// URL".to_string())
    }
}

fn popularity_url(value: &str) -> Result<String, String> {
    if ["http://", "https://", "file://", "s3://"]
        .iter()
        .any(|p| value.starts_with(p))
    {
        Ok(value.to_string())
    } else {
        Err("must start with http://, https://, file:// or s3://".to_string())
    }
}

/// Channel and attribute names: letters, digits, `-`, `.` and `_`.
fn package_name(value: &str) -> Result<String, String> {
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if plain {
        Ok(value.to_string())
    } else {
        Err("a name has only letters, digits, '-', '.' and '_'".to_string())
    }
}

/// `any`, or ref patterns such as `refs/heads/*` separated by spaces.
fn allowed_refs(value: &str) -> Result<AllowedRefs, String> {
    if value.trim() == "any" {
        return Ok(AllowedRefs::Any);
    }
    let patterns: Vec<String> = value
        .split([' ', ','])
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let valid = |p: &String| {
        p.starts_with("refs/")
            && !p.contains("..")
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'*'))
    };
    match patterns.iter().find(|p| !valid(p)) {
        _ if patterns.is_empty() => Err("name at least one ref pattern, or `any`".to_string()),
        Some(bad) => Err(format!("{bad:?} is not a ref pattern like refs/heads/*")),
        None => Ok(AllowedRefs::Reachable(patterns)),
    }
}

/// Names separated by spaces or commas; empty for none.
fn duration(value: &str) -> Result<Duration, String> {
    crate::gc::parse_duration(value)
}

fn compression(value: &str) -> Result<Compression, String> {
    value.parse()
}

fn platforms(value: &str) -> Result<Platforms, String> {
    let mut found: Vec<Arch> = Vec::new();
    for name in value.split([' ', ',']).filter(|p| !p.is_empty()) {
        let arch: Arch = name.parse()?;
        if found.contains(&arch) {
            return Err(format!("{name} is listed twice"));
        }
        found.push(arch);
    }
    if found.is_empty() {
        return Err("no platform given (amd64, arm64)".to_string());
    }
    Ok(Platforms(found))
}

fn package_list(value: &str) -> Result<PackageList, String> {
    value
        .split([' ', ','])
        .filter(|p| !p.is_empty())
        .map(|p| package_name(p).map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()
        .map(PackageList)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Mode, String> {
        let mut argv = vec!["nixery"];
        argv.extend_from_slice(args);
        let matches = Cli::command()
            .try_get_matches_from(argv)
            .map_err(|e| e.to_string())?;
        let cli = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        cli.mode(false).map_err(|e| e.to_string())
    }

    fn serve(args: &[&str]) -> ServeConfig {
        let mut argv = vec!["serve"];
        argv.extend_from_slice(args);
        match parse(&argv) {
            Ok(Mode::Serve(config)) => *config,
            other => panic!("{other:?}"),
        }
    }

    fn pkgs_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("default.nix"), "{ ... }: { }").unwrap();
        dir
    }

    #[test]
    fn defaults() {
        let pkgs = pkgs_dir();
        let p = pkgs.path().to_str().unwrap();
        let config = serve(&["--pkgs-path", p, "--storage-path", "/tmp/x"]);
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert!(
            matches!(&config.builds, BuildMode::Local(nix) if nix.timeout == Duration::from_secs(600))
        );
        assert_eq!(config.images.layer_budget, 94);
        assert_eq!(config.max_queued_builds, 16);
        assert_eq!(
            config.storage,
            StorageConfig::Filesystem {
                root: "/tmp/x".into()
            }
        );
        assert_eq!(config.images.implicit_packages, ["cacert", "iana-etc"]);
        let channel = serve(&["--storage-path", "/tmp/x"]);
        assert_eq!(
            channel.source,
            PackageSource::Channel {
                name: "nixos-unstable".into()
            }
        );
        let none = serve(&["--storage-path", "/tmp/x", "--implicit-packages", ""]);
        assert!(none.images.implicit_packages.is_empty());
    }

    #[test]
    fn s3_and_queue_settings() {
        let config = serve(&[
            "--storage-backend",
            "s3",
            "--s3-bucket",
            "images",
            "--s3-prefix",
            "nixery/",
            "--s3-endpoint",
            "http://127.0.0.1:9000",
            "--builder",
            "sqs",
            "--queue-url",
            "http://q/1/builds",
        ]);
        assert_eq!(
            config.storage,
            StorageConfig::S3 {
                bucket: "images".into(),
                prefix: "nixery/".into(),
                endpoint: Some("http://127.0.0.1:9000".into()),
                presign_ttl: Duration::from_secs(3600),
            }
        );
        let BuildMode::Sqs { queue, timings, .. } = config.builds else {
            panic!("not the sqs builder");
        };
        assert_eq!(queue.url, "http://q/1/builds");
        assert_eq!(timings.build_timeout, Duration::from_secs(840));
        assert_eq!(timings.heartbeat, Duration::from_secs(10));
    }

    #[test]
    fn popularity_needs_no_storage() {
        let mode = parse(&["popularity", "--channel", "nixos-24.05", "hello", "curl"]).unwrap();
        let Mode::Popularity(config) = mode else {
            panic!("{mode:?}")
        };
        assert_eq!(config.packages, ["hello", "curl"]);
    }

    #[test]
    fn errors_name_the_variable() {
        let pkgs = pkgs_dir();
        let p = pkgs.path().to_str().unwrap();
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (
                vec!["serve", "--pkgs-path", p, "--channel", "nixos-24.05"],
                "NIXERY_CHANNEL",
            ),
            (
                vec!["serve", "--pkgs-repo", "/r", "--channel", "nixos-24.05"],
                "NIXERY_CHANNEL",
            ),
            (
                vec!["serve", "--channel", "nixos unstable"],
                "NIXERY_CHANNEL",
            ),
            (vec!["serve", "--tag-ttl", "soon"], "NIXERY_TAG_TTL"),
            (
                vec!["serve", "--popularity-url", "ftp://x"],
                "NIX_POPULARITY_URL",
            ),
            (
                vec!["serve", "--implicit-packages", "cacert;rm"],
                "NIXERY_IMPLICIT_PACKAGES",
            ),
            (
                vec!["serve", "--storage-path", "/x", "--builder", "sqs"],
                "NIXERY_QUEUE_URL",
            ),
            (vec!["serve", "--builder", "lambda"], "NIXERY_BUILDER"),
            (
                vec!["serve", "--sqs-endpoint", "q:1"],
                "NIXERY_SQS_ENDPOINT",
            ),
            (
                vec!["serve", "--build-timeout", "0"],
                "NIXERY_BUILD_TIMEOUT",
            ),
            (vec!["serve", "--failure-ttl", "x"], "NIXERY_FAILURE_TTL"),
            (
                vec!["serve", "--heartbeat-seconds=-1"],
                "NIXERY_HEARTBEAT_SECONDS",
            ),
            (
                vec!["serve", "--pkgs-path", "/nonexistent"],
                "NIXERY_PKGS_PATH",
            ),
            (vec!["serve", "--pkgs-path", p], "STORAGE_PATH"),
            (vec!["serve", "--port", "http"], "PORT"),
            (vec!["serve", "--listen", "nowhere"], "NIXERY_LISTEN"),
            (vec!["serve", "--nix-timeout", "0"], "NIX_TIMEOUT"),
            (
                vec!["serve", "--layer-budget", "500"],
                "NIXERY_LAYER_BUDGET",
            ),
            (
                vec!["serve", "--storage-backend", "gcs"],
                "NIXERY_STORAGE_BACKEND",
            ),
            (vec!["serve", "--storage-backend", "s3"], "NIXERY_S3_BUCKET"),
            (
                vec!["serve", "--s3-endpoint", "localhost:9000"],
                "NIXERY_S3_ENDPOINT",
            ),
            (
                vec!["serve", "--presign-seconds", "0"],
                "NIXERY_PRESIGN_SECONDS",
            ),
            (vec!["worker", "--storage-path", "/x"], "NIXERY_QUEUE_URL"),
            (
                vec!["serve", "--allowed-refs", "main"],
                "NIXERY_ALLOWED_REFS",
            ),
            (
                vec!["serve", "--allowed-refs", "refs/$(x)"],
                "NIXERY_ALLOWED_REFS",
            ),
            (vec!["serve", "--max-builds", "0"], "NIXERY_MAX_BUILDS"),
            (
                vec!["serve", "--max-queued-builds", "many"],
                "NIXERY_MAX_QUEUED_BUILDS",
            ),
            (vec!["serve", "--token-key", "../key"], "NIXERY_TOKEN_KEY"),
            (vec!["serve", "--token-ttl", "5"], "NIXERY_TOKEN_TTL"),
            (
                vec!["serve", "--login-failures", "0"],
                "NIXERY_LOGIN_FAILURES",
            ),
            (
                vec!["serve", "--max-image-size", "big"],
                "NIXERY_MAX_IMAGE_SIZE",
            ),
            (
                vec![
                    "worker",
                    "--storage-backend",
                    "memory",
                    "--queue-url",
                    "http://q",
                ],
                "NIXERY_STORAGE_BACKEND",
            ),
            (
                vec![
                    "serve",
                    "--storage-backend",
                    "memory",
                    "--builder",
                    "sqs",
                    "--queue-url",
                    "http://q",
                ],
                "NIXERY_STORAGE_BACKEND",
            ),
            (vec!["popularity", "hello", "a;b"], "PACKAGE"),
        ];
        for (args, var) in cases {
            let err = parse(&args).unwrap_err();
            assert!(err.contains(var), "{args:?}: {err:?} does not name {var}");
        }
    }

    #[test]
    fn every_setting_has_a_variable_and_help() {
        let vars = variables();
        assert_eq!(vars.len(), 46, "{vars:?}");
        let table = markdown_table();
        for var in &vars {
            let row = table
                .lines()
                .find(|l| l.starts_with(&format!("| `{var}` |")))
                .unwrap_or_else(|| panic!("no row for {var}"));
            assert!(!row.ends_with("|  |"), "{var} has no help: {row}");
        }
    }
}
