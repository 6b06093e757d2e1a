//! Why a build gave no image, and what that means, decided in one place:
//! [`BuildError::verdict`] says whether the image failed (and what its
//! pullers are told, [`Failure`]) or the builder did (and the build is
//! tried again, with nothing remembered).

use serde::{Deserialize, Serialize};

use super::customisation::CustomisationError;
use super::nix::NixError;
use super::pack::PackError;
use crate::storage::records::RecordError;
use crate::storage::StorageError;

/// Why a build failed, as the puller is told (and as a worker records it
/// in the build status for every puller to read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Failure {
    #[error("unknown packages: {}", names.join(", "))]
    UnknownPackages { names: Vec<String> },
    #[error("building the image failed: {message}")]
    Build { message: String },
    #[error("the image would hold {size} bytes of store paths, over this registry's limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    /// Images come from the binary cache only, and it lacks this one.
    #[error("{what} is not in the binary cache{}; this registry assembles images from it only", cache.as_ref().map(|c| format!(" {c}")).unwrap_or_default())]
    NotInCache { what: String, cache: Option<String> },
    #[error("the binary cache {cache} is unavailable; try again shortly")]
    CacheUnavailable { cache: String },
    #[error("the binary cache {cache} sent data for {path} that is refused: {reason}")]
    CacheRefused {
        path: String,
        cache: String,
        reason: String,
    },
    /// The package set at this revision has no attribute index yet.
    #[error("this revision of the package set has no attribute index for {system} yet; images of it are assembled once `nixery index` has made one: pull again later")]
    Indexing { system: String },
    /// Images come from the binary cache only, and assembling this one
    /// was interrupted or ran out of time.
    #[error("assembling the image from the binary cache did not finish ({reason}); pull again to try again")]
    Unassembled { reason: String },
}

/// Why a source of store paths cannot give an image, where another may
/// (a binary cache that lacks a path, where Nix can build it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotHere {
    #[error("the package set at this revision has no attribute index for {system} yet")]
    NoIndex { system: String },
    #[error("the attribute index of this revision for {system} is older than the image may be")]
    StaleIndex { system: String },
    #[error("the attribute index cannot say what {name:?} is")]
    NotIndexed { name: String },
    #[error("{path} is not in the binary cache {cache}")]
    NotInCache { path: String, cache: String },
    #[error("the binary cache {cache} is unavailable: {message}")]
    Unavailable { cache: String, message: String },
    #[error("the binary cache {cache} sent data for {path} that is refused: {message}")]
    Refused {
        path: String,
        cache: String,
        message: String,
    },
}

impl NotHere {
    /// What the pullers are told when no other source is left.
    pub fn failure(&self) -> Failure {
        match self {
            NotHere::NoIndex { system } | NotHere::StaleIndex { system } => Failure::Indexing {
                system: system.clone(),
            },
            NotHere::NotIndexed { name } => Failure::NotInCache {
                what: format!("package {name:?}"),
                cache: None,
            },
            NotHere::NotInCache { path, cache } => Failure::NotInCache {
                what: path.clone(),
                cache: Some(cache.clone()),
            },
            NotHere::Unavailable { cache, .. } => Failure::CacheUnavailable {
                cache: cache.clone(),
            },
            NotHere::Refused {
                path,
                cache,
                message,
            } => Failure::CacheRefused {
                path: path.clone(),
                cache: cache.clone(),
                reason: message.clone(),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("unknown packages: {}", .0.join(", "))]
    UnknownPackages(Vec<String>),
    #[error(transparent)]
    Nix(#[from] NixError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error(transparent)]
    Customisation(#[from] CustomisationError),
    #[error("build task failed: {0}")]
    Task(String),
    #[error("the image would hold {size} bytes of store paths, over the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    /// The disk filled up again right after the store was collected.
    #[error("the image does not fit in the builder's disk space ({free} bytes free after collecting garbage)")]
    NoRoom { free: u64 },
    /// This source cannot give the image; the next one (or the workers)
    /// may.
    #[error("not from this source: {0}")]
    NotHere(NotHere),
    /// No source was left to try after this one.
    #[error("{0}")]
    NoSourceLeft(NotHere),
}

/// What a failed build means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The image cannot be built as asked: its pullers are told
    /// `failure`, and it is remembered for the failure TTL. `internal`:
    /// the server's fault rather than the package set's (the log gets an
    /// error, and the puller no details).
    Failed { failure: Failure, internal: bool },
    /// The builder failed, not the image: nothing is remembered, and the
    /// build may be tried again.
    Retry(Retry),
}

/// Why a build is worth trying again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The builder ran out of disk space (in the Nix store or packing).
    DiskFull,
    /// Storage failed under the build.
    Storage,
    /// Nobody wanted the build any more.
    Cancelled,
    /// Another builder is to build it (a worker, where the function could
    /// not assemble it from the binary cache).
    Elsewhere,
}

impl std::fmt::Display for Retry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Retry::DiskFull => "the builder's disk was full",
            Retry::Storage => "storage failed under the build",
            Retry::Cancelled => "the build was cancelled",
            Retry::Elsewhere => "the build goes to another builder",
        })
    }
}

impl BuildError {
    /// The one place a failed build becomes what its pullers are told.
    pub fn verdict(&self) -> Verdict {
        let failed = |failure| Verdict::Failed {
            failure,
            internal: false,
        };
        let internal = || Verdict::Failed {
            failure: Failure::Build {
                message: "an internal error (the build's log has the details)".to_string(),
            },
            internal: true,
        };
        let io_full = |e: &std::io::Error| e.kind() == std::io::ErrorKind::StorageFull;
        match self {
            BuildError::UnknownPackages(names) => failed(Failure::UnknownPackages {
                names: names.clone(),
            }),
            BuildError::TooLarge { size, limit } => failed(Failure::TooLarge {
                size: *size,
                limit: *limit,
            }),
            BuildError::NoRoom { .. } => failed(Failure::Build {
                message: self.to_string(),
            }),
            BuildError::Nix(NixError::Failed { command, message }) => failed(Failure::Build {
                // Nix quotes fetchers' URLs, which may carry a token.
                message: format!("{command}: {}", crate::source::redact_urls(message)),
            }),
            BuildError::Nix(NixError::Timeout { command, seconds }) => failed(Failure::Build {
                message: format!("{command} was stopped after {seconds} s"),
            }),
            BuildError::Nix(NixError::DiskFull { .. }) => Verdict::Retry(Retry::DiskFull),
            BuildError::Nix(NixError::Spawn { .. } | NixError::Output { .. }) => internal(),
            BuildError::Pack(PackError::Io { source, .. }) if io_full(source) => {
                Verdict::Retry(Retry::DiskFull)
            }
            BuildError::Storage(StorageError::Io { source, .. })
            | BuildError::Record(RecordError::Storage(StorageError::Io { source, .. }))
                if io_full(source) =>
            {
                Verdict::Retry(Retry::DiskFull)
            }
            // A layer no storage call can ever hold: the image's failure.
            BuildError::Storage(StorageError::TooLarge { .. }) => failed(Failure::Build {
                message: self.to_string(),
            }),
            BuildError::Storage(_) | BuildError::Record(RecordError::Storage(_)) => {
                Verdict::Retry(Retry::Storage)
            }
            BuildError::NotHere(_) => Verdict::Retry(Retry::Elsewhere),
            BuildError::NoSourceLeft(reason) => failed(reason.failure()),
            BuildError::Pack(PackError::NotHere(reason)) => failed(reason.failure()),
            BuildError::Pack(PackError::Cancelled)
            | BuildError::Customisation(CustomisationError::Cancelled) => {
                Verdict::Retry(Retry::Cancelled)
            }
            // A package set whose links make an endless tree: its failure.
            BuildError::Customisation(
                CustomisationError::TooLarge { .. } | CustomisationError::TooManyEntries { .. },
            ) => failed(Failure::Build {
                message: self.to_string(),
            }),
            BuildError::Record(RecordError::Unreadable { .. })
            | BuildError::Pack(_)
            | BuildError::Customisation(_)
            | BuildError::Task(_) => internal(),
        }
    }

    /// What the pullers are told, if the image failed; `None` if the build
    /// should be tried again.
    pub fn failure(&self) -> Option<Failure> {
        match self.verdict() {
            Verdict::Failed { failure, .. } => Some(failure),
            Verdict::Retry(_) => None,
        }
    }

    /// Whether the builder ran out of disk space: a fault of the machine,
    /// never of the image.
    pub fn is_disk_full(&self) -> bool {
        self.verdict() == Verdict::Retry(Retry::DiskFull)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_never_remembered_as_the_image_s_failure() {
        let nix = BuildError::Nix(NixError::DiskFull {
            command: "nix-store",
            message: "No space left on device".into(),
        });
        assert!(nix.is_disk_full());
        assert_eq!(nix.failure(), None);
        let pack = BuildError::Pack(PackError::Io {
            path: "/tmp/layer".into(),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        });
        assert!(pack.is_disk_full());
        assert_eq!(pack.failure(), None);
        let other = BuildError::Pack(PackError::Io {
            path: "/tmp/layer".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
        assert!(!other.is_disk_full());
        assert!(other.failure().is_some());
        // Full again right after collecting: the image does not fit, and
        // that is remembered like any failed build.
        let huge = BuildError::Storage(StorageError::TooLarge {
            key: "blobs/sha256/x".into(),
            size: 6 << 40,
            limit: 5 << 40,
        });
        assert!(huge
            .failure()
            .unwrap()
            .to_string()
            .contains("over the storage's limit"));
        let no_room = BuildError::NoRoom { free: 1234 };
        assert!(!no_room.is_disk_full());
        assert!(no_room
            .failure()
            .unwrap()
            .to_string()
            .contains("1234 bytes free"));
    }

    #[test]
    fn failures_say_what_failed_and_transient_errors_are_not_remembered() {
        let nix = BuildError::Nix(NixError::Failed {
            command: "nix-build",
            message: "builder for hello failed".into(),
        });
        assert_eq!(
            nix.failure().unwrap().to_string(),
            "building the image failed: nix-build: builder for hello failed"
        );
        let unknown = BuildError::UnknownPackages(vec!["nope".into()]);
        assert_eq!(
            unknown.failure(),
            Some(Failure::UnknownPackages {
                names: vec!["nope".into()]
            })
        );
        let storage = BuildError::Storage(StorageError::InvalidKey { key: "k".into() });
        assert_eq!(storage.verdict(), Verdict::Retry(Retry::Storage));
        // Internal details stay in the log.
        let task = BuildError::Task("panicked at src/secret/path.rs".into());
        assert!(!task.failure().unwrap().to_string().contains("secret"));
        assert!(matches!(
            task.verdict(),
            Verdict::Failed { internal: true, .. }
        ));
        assert!(matches!(
            nix.verdict(),
            Verdict::Failed {
                internal: false,
                ..
            }
        ));
    }
}
