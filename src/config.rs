//! Every setting, read once at start from the environment.
//!
//! Names follow Nixery's where the meaning is the same. Each setting is one
//! constant below with its default; an invalid or missing value fails at
//! start with a message that names the variable.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `PORT` | `8080` | port of the local server (on 127.0.0.1) |
//! | `NIXERY_LISTEN` | `127.0.0.1:$PORT` | full listen address; overrides `PORT` |
//! | `NIXERY_CHANNEL` | `nixos-unstable` | a nixpkgs channel; the tag is ignored unless it is a nixpkgs commit |
//! | `NIXERY_PKGS_REPO` | unset | a git repository of a package set; the tag is a branch, tag or commit (`latest`: the default branch) |
//! | `NIXERY_PKGS_PATH` | unset | a local package set: a directory whose `default.nix` is called like nixpkgs; the tag is ignored |
//! | `NIXERY_TAG_TTL` | `21600` | seconds an image from a moving source (channel, path) or a branch's resolution stays current |
//! | `NIXERY_IMPLICIT_PACKAGES` | `cacert iana-etc` | packages added to every image (those the package set lacks are skipped) |
//! | `NIX_POPULARITY_URL` | unset | popularity data for layering (`http(s)://`, `file://` or `s3://bucket/key`) |
//! | `NIXERY_STORAGE_BACKEND` | `filesystem` | where images are stored: `filesystem` or `s3` |
//! | `STORAGE_PATH` | (required for `filesystem`) | the storage root directory |
//! | `NIXERY_S3_BUCKET` | (required for `s3`) | the bucket |
//! | `NIXERY_S3_PREFIX` | empty | a key prefix inside the bucket |
//! | `NIXERY_S3_ENDPOINT` | AWS | any S3-compatible server (path-style addressing) |
//! | `NIXERY_PRESIGN_SECONDS` | `3600` | lifetime of presigned blob URLs |
//! | `NIX_TIMEOUT` | `600` | seconds one Nix command may run before it is stopped |
//! | `NIXERY_LAYER_BUDGET` | `94` | most layers for the packages (the customisation layer comes on top) |
//! | `NIXERY_BUILDER` | `local` | `local`: build in-process with the local Nix; `sqs`: send builds to workers |
//! | `NIXERY_QUEUE_URL` | (required for `sqs` and workers) | the build queue |
//! | `NIXERY_SQS_ENDPOINT` | AWS | any SQS-compatible server |
//! | `NIXERY_BUILD_TIMEOUT` | `840` | seconds a pull waits for a build (below Lambda's 900 s limit) |
//! | `NIXERY_FAILURE_TTL` | `60` | seconds a failed build is remembered before it is tried again |
//! | `NIXERY_HEARTBEAT_SECONDS` | `10` | how often a worker reports progress; six silent intervals mean it died |

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

pub const PORT: &str = "PORT";
pub const NIXERY_LISTEN: &str = "NIXERY_LISTEN";
pub const NIXERY_PKGS_PATH: &str = "NIXERY_PKGS_PATH";
pub const NIXERY_PKGS_REPO: &str = "NIXERY_PKGS_REPO";
pub const NIXERY_CHANNEL: &str = "NIXERY_CHANNEL";
pub const NIXERY_TAG_TTL: &str = "NIXERY_TAG_TTL";
pub const NIXERY_IMPLICIT_PACKAGES: &str = "NIXERY_IMPLICIT_PACKAGES";
pub const NIX_POPULARITY_URL: &str = "NIX_POPULARITY_URL";
pub const NIXERY_STORAGE_BACKEND: &str = "NIXERY_STORAGE_BACKEND";
pub const STORAGE_PATH: &str = "STORAGE_PATH";
pub const NIXERY_S3_BUCKET: &str = "NIXERY_S3_BUCKET";
pub const NIXERY_S3_PREFIX: &str = "NIXERY_S3_PREFIX";
pub const NIXERY_S3_ENDPOINT: &str = "NIXERY_S3_ENDPOINT";
pub const NIXERY_PRESIGN_SECONDS: &str = "NIXERY_PRESIGN_SECONDS";
pub const NIX_TIMEOUT: &str = "NIX_TIMEOUT";
pub const NIXERY_LAYER_BUDGET: &str = "NIXERY_LAYER_BUDGET";
pub const NIXERY_BUILDER: &str = "NIXERY_BUILDER";
pub const NIXERY_QUEUE_URL: &str = "NIXERY_QUEUE_URL";
pub const NIXERY_SQS_ENDPOINT: &str = "NIXERY_SQS_ENDPOINT";
pub const NIXERY_BUILD_TIMEOUT: &str = "NIXERY_BUILD_TIMEOUT";
pub const NIXERY_FAILURE_TTL: &str = "NIXERY_FAILURE_TTL";
pub const NIXERY_HEARTBEAT_SECONDS: &str = "NIXERY_HEARTBEAT_SECONDS";

/// Every variable this module reads.
pub const ALL_VARIABLES: [&str; 22] = [
    NIXERY_BUILDER,
    NIXERY_QUEUE_URL,
    NIXERY_SQS_ENDPOINT,
    NIXERY_BUILD_TIMEOUT,
    NIXERY_FAILURE_TTL,
    NIXERY_HEARTBEAT_SECONDS,
    PORT,
    NIXERY_LISTEN,
    NIXERY_PKGS_PATH,
    NIXERY_PKGS_REPO,
    NIXERY_CHANNEL,
    NIXERY_TAG_TTL,
    NIXERY_IMPLICIT_PACKAGES,
    NIX_POPULARITY_URL,
    NIXERY_STORAGE_BACKEND,
    STORAGE_PATH,
    NIXERY_S3_BUCKET,
    NIXERY_S3_PREFIX,
    NIXERY_S3_ENDPOINT,
    NIXERY_PRESIGN_SECONDS,
    NIX_TIMEOUT,
    NIXERY_LAYER_BUDGET,
];

const DEFAULT_PORT: u16 = 8080;
pub const DEFAULT_CHANNEL: &str = "nixos-unstable";
/// nixos-unstable moves about daily; four rebuild chances a day at most.
const DEFAULT_TAG_TTL_SECS: u64 = 6 * 3600;
/// As in Nixery: certificates and /etc/services in every image.
const DEFAULT_IMPLICIT_PACKAGES: [&str; 2] = ["cacert", "iana-etc"];
const DEFAULT_NIX_TIMEOUT_SECS: u64 = 600;
/// Lambda stops a function after at most 900 s; a minute of margin lets
/// the waiting pull answer "still building" before that.
const DEFAULT_BUILD_TIMEOUT_SECS: u64 = 840;
const DEFAULT_FAILURE_TTL_SECS: u64 = 60;
/// Presigned URLs are checked when a download starts, not while it runs, so
/// the lifetime only has to cover the time from the redirect to the
/// client's (possibly retried or resumed) request. An hour leaves room for
/// a client that pulls many large layers over a slow link, a few at a time,
/// and stays well inside the lifetime of a Lambda function's credentials.
pub const DEFAULT_PRESIGN_SECONDS: u64 = 3600;
/// SigV4 presigned URLs cannot live longer than seven days.
const MAX_PRESIGN_SECONDS: u64 = 7 * 24 * 3600;
pub const DEFAULT_LAYER_BUDGET: usize = 94;
/// Docker and containerd refuse images with more than 127 layers; one is the
/// customisation layer.
pub const MAX_LAYER_BUDGET: usize = 126;

/// A setting that is missing or cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is not set: {hint}")]
    Missing {
        var: &'static str,
        hint: &'static str,
    },
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
}

/// Where images are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageConfig {
    Filesystem {
        root: PathBuf,
    },
    S3 {
        bucket: String,
        prefix: String,
        endpoint: Option<String>,
        presign_ttl: Duration,
    },
}

/// How builds are run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuilderConfig {
    /// In this process, with the local Nix.
    Local,
    /// By workers, through a queue.
    Sqs,
}

/// The build queue, for the `sqs` builder and for workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    pub url: String,
    pub endpoint: Option<String>,
}

/// Where packages come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackageSource {
    /// A local directory called like nixpkgs; the tag does not select anything.
    Path(PathBuf),
    /// A git repository; the tag names a branch, tag or commit.
    Git { url: String },
    /// A nixpkgs channel; a tag that is a commit pins nixpkgs to it.
    Channel { name: String },
}

impl std::fmt::Display for PackageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PackageSource::Path(path) => write!(f, "the package set at {}", path.display()),
            PackageSource::Git { url } => write!(f, "the git repository {url}"),
            PackageSource::Channel { name } => write!(f, "the nixpkgs channel {name}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub source: PackageSource,
    pub storage: StorageConfig,
    pub nix_timeout: Duration,
    pub layer_budget: usize,
    pub tag_ttl: Duration,
    pub implicit_packages: Vec<String>,
    pub popularity_url: Option<String>,
    pub builder: BuilderConfig,
    /// Set when `NIXERY_QUEUE_URL` is (required by `sqs` and workers).
    pub queue: Option<QueueConfig>,
    pub build_timeout: Duration,
    pub failure_ttl: Duration,
    pub heartbeat: Duration,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Config::from_vars(&vars)
    }

    /// Reads settings from a map of variables (the environment, or a test's).
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let get = |var: &str| vars.get(var).map(|v| v.trim()).filter(|v| !v.is_empty());

        let port = match get(PORT) {
            None => DEFAULT_PORT,
            Some(v) => v.parse::<u16>().map_err(|e| invalid(PORT, v, e))?,
        };
        let listen = match get(NIXERY_LISTEN) {
            None => SocketAddr::from(([127, 0, 0, 1], port)),
            Some(v) => v.parse().map_err(|e| invalid(NIXERY_LISTEN, v, e))?,
        };

        let set: Vec<&str> = [NIXERY_PKGS_PATH, NIXERY_PKGS_REPO, NIXERY_CHANNEL]
            .into_iter()
            .filter(|v| get(v).is_some())
            .collect();
        if set.len() > 1 {
            return Err(invalid(
                set[1],
                get(set[1]).unwrap_or_default(),
                format!(
                    "only one package source may be set, and {} is set too",
                    set[0]
                ),
            ));
        }
        let source = if let Some(v) = get(NIXERY_PKGS_PATH) {
            let path = PathBuf::from(v);
            if !path.join("default.nix").is_file() {
                return Err(invalid(
                    NIXERY_PKGS_PATH,
                    v,
                    "the directory has no default.nix",
                ));
            }
            PackageSource::Path(
                path.canonicalize()
                    .map_err(|e| invalid(NIXERY_PKGS_PATH, v, e))?,
            )
        } else if let Some(v) = get(NIXERY_PKGS_REPO) {
            PackageSource::Git { url: v.to_string() }
        } else {
            let name = get(NIXERY_CHANNEL).unwrap_or(DEFAULT_CHANNEL);
            if !plain_name(name) {
                return Err(invalid(
                    NIXERY_CHANNEL,
                    name,
                    "a channel name has only letters, digits, '-', '.' and '_'",
                ));
            }
            PackageSource::Channel {
                name: name.to_string(),
            }
        };

        let tag_ttl = Duration::from_secs(number(
            NIXERY_TAG_TTL,
            get(NIXERY_TAG_TTL),
            DEFAULT_TAG_TTL_SECS,
            0..=u64::MAX,
            "",
        )?);
        let implicit_packages = match vars.get(NIXERY_IMPLICIT_PACKAGES) {
            None => DEFAULT_IMPLICIT_PACKAGES
                .iter()
                .map(|p| p.to_string())
                .collect(),
            Some(v) => {
                let names: Vec<String> = v
                    .split([' ', ','])
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .collect();
                if let Some(bad) = names.iter().find(|n| !plain_name(n)) {
                    return Err(invalid(
                        NIXERY_IMPLICIT_PACKAGES,
                        v,
                        format!("{bad:?} is not a package attribute"),
                    ));
                }
                names
            }
        };
        let popularity_url = match get(NIX_POPULARITY_URL) {
            None => None,
            Some(v)
                if ["http://", "https://", "file://", "s3://"]
                    .iter()
                    .any(|p| v.starts_with(p)) =>
            {
                Some(v.to_string())
            }
            Some(v) => {
                return Err(invalid(
                    NIX_POPULARITY_URL,
                    v,
                    "must start with http://, https://, file:// or s3://",
                ))
            }
        };

        let storage = match get(NIXERY_STORAGE_BACKEND).unwrap_or("filesystem") {
            "filesystem" => match get(STORAGE_PATH) {
                None => {
                    return Err(ConfigError::Missing {
                        var: STORAGE_PATH,
                        hint: "the filesystem storage backend needs a root directory",
                    })
                }
                Some(v) => StorageConfig::Filesystem {
                    root: PathBuf::from(v),
                },
            },
            "s3" => {
                let bucket = get(NIXERY_S3_BUCKET).ok_or(ConfigError::Missing {
                    var: NIXERY_S3_BUCKET,
                    hint: "the s3 storage backend needs a bucket name",
                })?;
                let endpoint = http_url(NIXERY_S3_ENDPOINT, get(NIXERY_S3_ENDPOINT))?;
                let presign_ttl = Duration::from_secs(number(
                    NIXERY_PRESIGN_SECONDS,
                    get(NIXERY_PRESIGN_SECONDS),
                    DEFAULT_PRESIGN_SECONDS,
                    1..=MAX_PRESIGN_SECONDS,
                    &format!("must be between 1 and {MAX_PRESIGN_SECONDS} (seven days)"),
                )?);
                StorageConfig::S3 {
                    bucket: bucket.to_string(),
                    prefix: get(NIXERY_S3_PREFIX).unwrap_or("").to_string(),
                    endpoint,
                    presign_ttl,
                }
            }
            other => {
                return Err(invalid(
                    NIXERY_STORAGE_BACKEND,
                    other,
                    "supported backends are `filesystem` and `s3`",
                ))
            }
        };

        let seconds = |var: &'static str, default: u64| -> Result<Duration, ConfigError> {
            number(
                var,
                get(var),
                default,
                1..=u64::MAX,
                "must be at least 1 second",
            )
            .map(Duration::from_secs)
        };
        let nix_timeout = seconds(NIX_TIMEOUT, DEFAULT_NIX_TIMEOUT_SECS)?;
        let layer_budget = number(
            NIXERY_LAYER_BUDGET,
            get(NIXERY_LAYER_BUDGET),
            DEFAULT_LAYER_BUDGET as u64,
            1..=MAX_LAYER_BUDGET as u64,
            &format!("must be between 1 and {MAX_LAYER_BUDGET}"),
        )? as usize;

        let queue = match get(NIXERY_QUEUE_URL) {
            None => None,
            Some(url) => Some(QueueConfig {
                url: url.to_string(),
                endpoint: http_url(NIXERY_SQS_ENDPOINT, get(NIXERY_SQS_ENDPOINT))?,
            }),
        };
        let builder = match get(NIXERY_BUILDER).unwrap_or("local") {
            "local" => BuilderConfig::Local,
            "sqs" if queue.is_none() => {
                return Err(ConfigError::Missing {
                    var: NIXERY_QUEUE_URL,
                    hint: "the sqs builder sends builds to this queue",
                })
            }
            "sqs" => BuilderConfig::Sqs,
            other => {
                return Err(invalid(
                    NIXERY_BUILDER,
                    other,
                    "supported builders are `local` and `sqs`",
                ))
            }
        };
        let build_timeout = seconds(NIXERY_BUILD_TIMEOUT, DEFAULT_BUILD_TIMEOUT_SECS)?;
        let failure_ttl = seconds(NIXERY_FAILURE_TTL, DEFAULT_FAILURE_TTL_SECS)?;
        let heartbeat = seconds(
            NIXERY_HEARTBEAT_SECONDS,
            crate::build::status::DEFAULT_HEARTBEAT_SECS,
        )?;

        Ok(Config {
            listen,
            source,
            storage,
            nix_timeout,
            layer_budget,
            tag_ttl,
            implicit_packages,
            popularity_url,
            builder,
            queue,
            build_timeout,
            failure_ttl,
            heartbeat,
        })
    }
}

fn invalid(var: &'static str, value: &str, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        var,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// A whole number: `default` when unset, refused with `outside` when not
/// in `range`.
fn number(
    var: &'static str,
    value: Option<&str>,
    default: u64,
    range: RangeInclusive<u64>,
    outside: &str,
) -> Result<u64, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    match value.parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(n),
        Ok(_) => Err(invalid(var, value, outside)),
        Err(e) => Err(invalid(var, value, e)),
    }
}

/// An optional endpoint URL of a service.
fn http_url(var: &'static str, value: Option<&str>) -> Result<Option<String>, ConfigError> {
    match value {
        None => Ok(None),
        Some(v) if v.starts_with("http://") || v.starts_with("https://") => Ok(Some(v.to_string())),
        Some(v) => Err(invalid(var, v, "must be an http:// or https:// URL")),
    }
}

/// Channel and attribute names: letters, digits, `-`, `.` and `_`.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pkgs_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("default.nix"), "{ ... }: { }").unwrap();
        dir
    }

    #[test]
    fn defaults() {
        let pkgs = pkgs_dir();
        let config = Config::from_vars(&vars(&[
            (NIXERY_PKGS_PATH, pkgs.path().to_str().unwrap()),
            (STORAGE_PATH, "/tmp/x"),
        ]))
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.nix_timeout, Duration::from_secs(600));
        assert_eq!(config.layer_budget, 94);
        assert_eq!(
            config.storage,
            StorageConfig::Filesystem {
                root: "/tmp/x".into()
            }
        );
        assert_eq!(config.implicit_packages, ["cacert", "iana-etc"]);
        let channel = Config::from_vars(&vars(&[(STORAGE_PATH, "/tmp/x")])).unwrap();
        assert_eq!(
            channel.source,
            PackageSource::Channel {
                name: "nixos-unstable".into()
            }
        );
        let none = Config::from_vars(&vars(&[
            (STORAGE_PATH, "/tmp/x"),
            (NIXERY_IMPLICIT_PACKAGES, ""),
        ]))
        .unwrap();
        assert!(none.implicit_packages.is_empty());
    }

    #[test]
    fn s3_settings() {
        let pkgs = pkgs_dir();
        let config = Config::from_vars(&vars(&[
            (NIXERY_PKGS_PATH, pkgs.path().to_str().unwrap()),
            (NIXERY_STORAGE_BACKEND, "s3"),
            (NIXERY_S3_BUCKET, "images"),
            (NIXERY_S3_PREFIX, "nixery/"),
            (NIXERY_S3_ENDPOINT, "http://127.0.0.1:9000"),
        ]))
        .unwrap();
        assert_eq!(
            config.storage,
            StorageConfig::S3 {
                bucket: "images".into(),
                prefix: "nixery/".into(),
                endpoint: Some("http://127.0.0.1:9000".into()),
                presign_ttl: Duration::from_secs(DEFAULT_PRESIGN_SECONDS),
            }
        );
    }

    #[test]
    fn errors_name_the_variable() {
        let pkgs = pkgs_dir();
        let p = pkgs.path().to_str().unwrap();
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (
                vec![
                    (NIXERY_PKGS_PATH, p),
                    (NIXERY_CHANNEL, "nixos-24.05"),
                    (STORAGE_PATH, "/x"),
                ],
                NIXERY_CHANNEL,
            ),
            (
                vec![
                    (NIXERY_PKGS_REPO, "/r"),
                    (NIXERY_CHANNEL, "nixos-24.05"),
                    (STORAGE_PATH, "/x"),
                ],
                NIXERY_CHANNEL,
            ),
            (
                vec![(NIXERY_CHANNEL, "nixos unstable"), (STORAGE_PATH, "/x")],
                NIXERY_CHANNEL,
            ),
            (
                vec![(STORAGE_PATH, "/x"), (NIXERY_TAG_TTL, "soon")],
                NIXERY_TAG_TTL,
            ),
            (
                vec![(STORAGE_PATH, "/x"), (NIX_POPULARITY_URL, "ftp://x")],
                NIX_POPULARITY_URL,
            ),
            (
                vec![
                    (STORAGE_PATH, "/x"),
                    (NIXERY_IMPLICIT_PACKAGES, "cacert;rm"),
                ],
                NIXERY_IMPLICIT_PACKAGES,
            ),
            (
                vec![(STORAGE_PATH, "/x"), (NIXERY_BUILDER, "sqs")],
                NIXERY_QUEUE_URL,
            ),
            (
                vec![(STORAGE_PATH, "/x"), (NIXERY_BUILDER, "lambda")],
                NIXERY_BUILDER,
            ),
            (
                vec![
                    (STORAGE_PATH, "/x"),
                    (NIXERY_QUEUE_URL, "http://q"),
                    (NIXERY_SQS_ENDPOINT, "q:1"),
                ],
                NIXERY_SQS_ENDPOINT,
            ),
            (
                vec![(STORAGE_PATH, "/x"), (NIXERY_BUILD_TIMEOUT, "0")],
                NIXERY_BUILD_TIMEOUT,
            ),
            (
                vec![(STORAGE_PATH, "/x"), (NIXERY_FAILURE_TTL, "x")],
                NIXERY_FAILURE_TTL,
            ),
            (
                vec![(STORAGE_PATH, "/x"), (NIXERY_HEARTBEAT_SECONDS, "-1")],
                NIXERY_HEARTBEAT_SECONDS,
            ),
            (
                vec![(NIXERY_PKGS_PATH, "/nonexistent"), (STORAGE_PATH, "/x")],
                NIXERY_PKGS_PATH,
            ),
            (vec![(NIXERY_PKGS_PATH, p)], STORAGE_PATH),
            (
                vec![(NIXERY_PKGS_PATH, p), (STORAGE_PATH, "/x"), (PORT, "http")],
                PORT,
            ),
            (
                vec![
                    (NIXERY_PKGS_PATH, p),
                    (STORAGE_PATH, "/x"),
                    (NIXERY_LISTEN, "nowhere"),
                ],
                NIXERY_LISTEN,
            ),
            (
                vec![
                    (NIXERY_PKGS_PATH, p),
                    (STORAGE_PATH, "/x"),
                    (NIX_TIMEOUT, "0"),
                ],
                NIX_TIMEOUT,
            ),
            (
                vec![
                    (NIXERY_PKGS_PATH, p),
                    (STORAGE_PATH, "/x"),
                    (NIXERY_LAYER_BUDGET, "500"),
                ],
                NIXERY_LAYER_BUDGET,
            ),
            (
                vec![
                    (NIXERY_PKGS_PATH, p),
                    (STORAGE_PATH, "/x"),
                    (NIXERY_STORAGE_BACKEND, "gcs"),
                ],
                NIXERY_STORAGE_BACKEND,
            ),
            (
                vec![(NIXERY_PKGS_PATH, p), (NIXERY_STORAGE_BACKEND, "s3")],
                NIXERY_S3_BUCKET,
            ),
            (
                vec![
                    (NIXERY_PKGS_PATH, p),
                    (NIXERY_STORAGE_BACKEND, "s3"),
                    (NIXERY_S3_BUCKET, "b"),
                    (NIXERY_S3_ENDPOINT, "localhost:9000"),
                ],
                NIXERY_S3_ENDPOINT,
            ),
            (
                vec![
                    (NIXERY_PKGS_PATH, p),
                    (NIXERY_STORAGE_BACKEND, "s3"),
                    (NIXERY_S3_BUCKET, "b"),
                    (NIXERY_PRESIGN_SECONDS, "0"),
                ],
                NIXERY_PRESIGN_SECONDS,
            ),
        ];
        for (pairs, var) in cases {
            let err = Config::from_vars(&vars(&pairs)).unwrap_err().to_string();
            assert!(err.starts_with(var), "{err:?} does not name {var}");
        }
    }
}
