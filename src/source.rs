//! Package sources: what a pull's tag means, resolved to something fixed.
//!
//! | source | tag | resolved to | moving? |
//! |---|---|---|---|
//! | local path (`NIXERY_PKGS_PATH`) | ignored | the path | yes: rebuilt after the TTL |
//! | git (`NIXERY_PKGS_REPO`) | branch, tag, commit; `latest` = default branch | a commit | no: a commit is fixed |
//! | channel (`NIXERY_CHANNEL`) | ignored, unless a 40-hex nixpkgs commit | the channel, or that commit | the channel yes, a commit no |
//!
//! The resolved source is part of every image key, so a branch that moves
//! gives new images once its resolution is looked up again: resolutions of
//! branch names are kept for the tag TTL, so a pull does not ask the
//! repository every time.
//!
//! ```
//! use nixery::source::is_commit;
//! assert!(is_commit("0123456789abcdef0123456789abcdef01234567"));
//! assert!(!is_commit("latest"));
//! ```

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::process::Command;

/// Where the packages come from, as the resolver expression expects it: a
/// source resolved to a revision where it has one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceArg {
    /// A local directory.
    Path { path: String },
    /// A commit of a git repository; `ref` is the branch or tag it was
    /// found through (`None`: any ref may hold it).
    Git {
        url: String,
        rev: String,
        #[serde(rename = "ref")]
        git_ref: Option<String>,
    },
    /// The current state of a nixpkgs channel.
    Channel { name: String },
    /// A nixpkgs commit.
    Commit { rev: String },
}

/// Where packages come from (exactly one, chosen by the settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackageSource {
    /// A local directory called like nixpkgs; the tag does not select anything.
    Path(std::path::PathBuf),
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

/// How long `git ls-remote` may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("tag {tag:?} is not a branch, tag or commit of {url}")]
    UnknownRef { tag: String, url: String },
    #[error("could not read the refs of {url}: {message}")]
    Git { url: String, message: String },
}

/// A source fixed for one pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub arg: SourceArg,
    /// Whether the same `arg` can give different packages over time, so
    /// that images built from it expire after the TTL.
    pub moving: bool,
}

/// Resolves tags against the configured source, remembering git lookups
/// for the TTL.
#[derive(Debug)]
pub struct Sources {
    source: PackageSource,
    ttl: Duration,
    remembered: Mutex<HashMap<String, (Resolved, Instant)>>,
}

/// A full commit hash, as a tag may give one.
pub fn is_commit(tag: &str) -> bool {
    tag.len() == 40
        && tag
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Sources {
    pub fn new(source: PackageSource, ttl: Duration) -> Sources {
        Sources {
            source,
            ttl,
            remembered: Mutex::default(),
        }
    }

    pub fn source(&self) -> &PackageSource {
        &self.source
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// What `tag` means now.
    pub async fn resolve(&self, tag: &str) -> Result<Resolved, SourceError> {
        match &self.source {
            PackageSource::Path(path) => Ok(Resolved {
                arg: SourceArg::Path {
                    path: path.to_string_lossy().into_owned(),
                },
                moving: true,
            }),
            PackageSource::Channel { name } => Ok(if is_commit(tag) {
                Resolved {
                    arg: SourceArg::Commit {
                        rev: tag.to_string(),
                    },
                    moving: false,
                }
            } else {
                Resolved {
                    arg: SourceArg::Channel { name: name.clone() },
                    moving: true,
                }
            }),
            PackageSource::Git { url } => {
                if is_commit(tag) {
                    let arg = SourceArg::Git {
                        url: url.clone(),
                        rev: tag.to_string(),
                        git_ref: None,
                    };
                    return Ok(Resolved { arg, moving: false });
                }
                if let Some((resolved, at)) =
                    self.remembered.lock().expect("never poisoned").get(tag)
                {
                    if at.elapsed() < self.ttl {
                        return Ok(resolved.clone());
                    }
                }
                let (rev, git_ref) = ls_remote(url, tag).await?;
                let resolved = Resolved {
                    arg: SourceArg::Git {
                        url: url.clone(),
                        rev,
                        git_ref,
                    },
                    moving: false,
                };
                self.remembered
                    .lock()
                    .expect("never poisoned")
                    .insert(tag.to_string(), (resolved.clone(), Instant::now()));
                Ok(resolved)
            }
        }
    }
}

/// The commit a tag names in a repository: `latest` is HEAD, then a branch,
/// then a git tag (peeled to its commit).
async fn ls_remote(url: &str, tag: &str) -> Result<(String, Option<String>), SourceError> {
    let git_error = |message: String| SourceError::Git {
        url: url.to_string(),
        message,
    };
    let patterns: Vec<String> = if tag == "latest" {
        vec!["HEAD".to_string()]
    } else {
        vec![
            format!("refs/heads/{tag}"),
            format!("refs/tags/{tag}"),
            format!("refs/tags/{tag}^{{}}"),
        ]
    };
    let mut command = Command::new("git");
    command
        .arg("ls-remote")
        .arg(url)
        .args(&patterns)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(GIT_TIMEOUT, command.output())
        .await
        .map_err(|_| {
            git_error(format!(
                "git ls-remote took more than {} s",
                GIT_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| git_error(format!("could not run git: {e}")))?;
    if !output.status.success() {
        return Err(git_error(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    let refs: HashMap<String, String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(rev, name)| (name.to_string(), rev.to_string()))
        .collect();
    let found = patterns
        .iter()
        .rev()
        .filter(|p| refs.contains_key(*p))
        // Prefer a branch, then a peeled tag, then a tag object.
        .min_by_key(|p| {
            if p.starts_with("refs/heads/") {
                0
            } else if p.ends_with("^{}") {
                1
            } else {
                2
            }
        })
        .cloned();
    match found {
        None => Err(SourceError::UnknownRef {
            tag: tag.to_string(),
            url: url.to_string(),
        }),
        Some(pattern) => {
            let rev = refs[&pattern].clone();
            let git_ref = if pattern == "HEAD" {
                None
            } else {
                Some(pattern.trim_end_matches("^{}").to_string())
            };
            Ok((rev, git_ref))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &std::path::Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.org",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[tokio::test]
    async fn git_tags_resolve_to_commits() {
        let repo = tempfile::tempdir().unwrap();
        let r = repo.path();
        git(r, &["init", "-q"]);
        std::fs::write(r.join("a"), "1").unwrap();
        git(r, &["add", "a"]);
        git(r, &["commit", "-qm", "one"]);
        let one = git(r, &["rev-parse", "HEAD"]);
        git(r, &["tag", "-a", "v1", "-m", "annotated"]);
        git(r, &["checkout", "-qb", "feature"]);
        std::fs::write(r.join("a"), "2").unwrap();
        git(r, &["commit", "-qam", "two"]);
        let two = git(r, &["rev-parse", "HEAD"]);
        git(r, &["checkout", "-q", "main"]);

        let url = r.to_str().unwrap().to_string();
        let sources = Sources::new(
            PackageSource::Git { url: url.clone() },
            Duration::from_secs(60),
        );
        let rev = |resolved: Resolved| match resolved.arg {
            SourceArg::Git { rev, git_ref, .. } => (rev, git_ref),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            rev(sources.resolve("latest").await.unwrap()),
            (one.clone(), None)
        );
        assert_eq!(
            rev(sources.resolve("feature").await.unwrap()),
            (two.clone(), Some("refs/heads/feature".into()))
        );
        assert_eq!(
            rev(sources.resolve("v1").await.unwrap()),
            (one.clone(), Some("refs/tags/v1".into()))
        );
        assert_eq!(
            rev(sources.resolve(&two).await.unwrap()),
            (two.clone(), None)
        );
        assert_eq!(
            sources.resolve("nope").await,
            Err(SourceError::UnknownRef {
                tag: "nope".into(),
                url: url.clone()
            })
        );

        // A moved branch is seen once the remembered resolution expires.
        git(r, &["branch", "-f", "feature", "main"]);
        assert_eq!(rev(sources.resolve("feature").await.unwrap()).0, two);
        let fresh = Sources::new(PackageSource::Git { url }, Duration::ZERO);
        assert_eq!(rev(fresh.resolve("feature").await.unwrap()).0, one);
    }

    #[tokio::test]
    async fn channels_and_paths() {
        let channel = Sources::new(
            PackageSource::Channel {
                name: "nixos-unstable".into(),
            },
            Duration::from_secs(1),
        );
        let latest = channel.resolve("latest").await.unwrap();
        assert!(latest.moving);
        assert_eq!(latest, channel.resolve("anything").await.unwrap());
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            channel.resolve(commit).await.unwrap(),
            Resolved {
                arg: SourceArg::Commit { rev: commit.into() },
                moving: false
            }
        );
        let path = Sources::new(PackageSource::Path("/pkgs".into()), Duration::from_secs(1));
        assert!(path.resolve("v2").await.unwrap().moving);
    }
}
