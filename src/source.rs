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
        url: SourceUrl,
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
    Git { url: SourceUrl },
    /// A nixpkgs channel; a tag that is a commit pins nixpkgs to it.
    Channel { name: String },
}

impl std::fmt::Display for PackageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Where it lies on the operator's machine is nobody else's business.
            PackageSource::Path(_) => write!(f, "a local package set"),
            PackageSource::Git { url } if url.is_local() => write!(f, "a local git repository"),
            PackageSource::Git { url } => write!(f, "the git repository {url}"),
            PackageSource::Channel { name } => write!(f, "the nixpkgs channel {name}"),
        }
    }
}

/// How long `git ls-remote` may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceError {
    #[error("tag {tag:?} is not a branch, tag or commit of {url}")]
    UnknownRef { tag: String, url: SourceUrl },
    #[error("revision {rev} is not reachable from the allowed refs ({allowed}) of {url}")]
    NotReachable {
        rev: String,
        url: SourceUrl,
        allowed: String,
    },
    /// `message` is what git (or the API) said, with URLs redacted: see
    /// [`SourceError::git`].
    #[error("could not read the refs of {url}: {message}")]
    Git { url: SourceUrl, message: String },
}

impl SourceError {
    /// A failure to read `url`; `message` (git's stderr, an HTTP error)
    /// quotes URLs, so they are redacted here, once.
    pub fn git(url: &SourceUrl, message: impl AsRef<str>) -> SourceError {
        SourceError::Git {
            url: url.clone(),
            message: redact_urls(message.as_ref()),
        }
    }
}

/// The URL of a package repository. Its text goes only where it is used
/// (to git, to Nix, through the build queue: [`SourceUrl::expose`] and
/// serde); everywhere it is shown (`Display`, `Debug`: pages, errors,
/// logs) it goes without credentials or query ([`redact_urls`]), and a
/// local path is not shown at all. So a token in `NIXERY_PKGS_REPO` is
/// safe from every `tracing` field and `format!` by construction.
///
/// ```
/// use nixery::source::SourceUrl;
/// let url = SourceUrl::new("https://me:token@example.org/pkgs.git?private_token=t");
/// assert_eq!(url.to_string(), "https://***@example.org/pkgs.git?***");
/// assert_eq!(format!("{url:?}"), "SourceUrl(\"https://***@example.org/pkgs.git?***\")");
/// assert_eq!(SourceUrl::new("/srv/pkgs").to_string(), "a local repository");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SourceUrl(String);

impl SourceUrl {
    pub fn new(url: impl Into<String>) -> SourceUrl {
        SourceUrl(url.into())
    }

    /// The whole URL, credentials included: for git and Nix only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A path on this machine (git's rule: no `scheme://`, and no `:`
    /// before the first `/`, as in `host:path`), or a `file://` URL.
    pub fn is_local(&self) -> bool {
        let url = self.0.as_str();
        if let Some((scheme, _)) = url.split_once("://") {
            return scheme == "file";
        }
        match (url.find(':'), url.find('/')) {
            (Some(colon), Some(slash)) => slash < colon,
            (Some(_), None) => false,
            (None, _) => true,
        }
    }
}

impl From<&str> for SourceUrl {
    fn from(url: &str) -> SourceUrl {
        SourceUrl::new(url)
    }
}

impl From<String> for SourceUrl {
    fn from(url: String) -> SourceUrl {
        SourceUrl(url)
    }
}

impl std::fmt::Display for SourceUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_local() {
            f.write_str("a local repository")
        } else {
            f.write_str(&redact_urls(&self.0))
        }
    }
}

impl std::fmt::Debug for SourceUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SourceUrl").field(&self.to_string()).finish()
    }
}

/// A source fixed for one pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub arg: SourceArg,
    /// Whether the same `arg` can give different packages over time, so
    /// that images built from it expire after the TTL.
    pub moving: bool,
}

/// Which revisions of a git source a tag may select.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllowedRefs {
    /// Only commits reachable from refs matching these patterns (git
    /// refspec globs such as `refs/heads/*`).
    Reachable(Vec<String>),
    /// Any commit the repository has, under any ref (pull requests too).
    Any,
}

impl Default for AllowedRefs {
    fn default() -> AllowedRefs {
        AllowedRefs::Reachable(vec!["refs/heads/*".into(), "refs/tags/*".into()])
    }
}

/// Where nixpkgs commits are checked by default: the compare endpoint of
/// GitHub's REST API for nixpkgs.
pub const DEFAULT_NIXPKGS_API: &str = "https://api.github.com/repos/NixOS/nixpkgs";

/// The most tag lookups remembered at once.
const REMEMBER_MAX: usize = 10_000;

/// How long one call to the compare API may take.
const API_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a lookup's outcome stands: a resolution for the tag TTL, a
/// refusal or failure for the failure TTL.
pub fn kept_for<T>(
    found: &Result<T, SourceError>,
    ttl: Duration,
    failure_ttl: Duration,
) -> Duration {
    if found.is_ok() {
        ttl
    } else {
        failure_ttl
    }
}

/// A local package set: always the directory as it is now.
fn path_source(path: &std::path::Path) -> Resolved {
    Resolved {
        arg: SourceArg::Path {
            path: path.to_string_lossy().into_owned(),
        },
        moving: true,
    }
}

/// `text` with every URL in it (`scheme://...`) shown without what may be
/// a secret: user info (`https://user:token@host`) becomes `***@`, and a
/// query or fragment (`?private_token=...`) becomes `?***`. For anything
/// that quotes URLs and reaches a page, an error, a log line or a build
/// status: Nix's and git's messages, fetch errors.
pub fn redact_urls(text: &str) -> String {
    // Where a URL quoted in a message ends.
    let ends_url = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>' | '\\');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let end = after.find(ends_url).unwrap_or(after.len());
        let url = &after[..end];
        let authority_end = url.find(['/', '?', '#']).unwrap_or(url.len());
        let (authority, tail) = url.split_at(authority_end);
        match authority.rfind('@') {
            Some(user_end) => {
                out.push_str("***");
                out.push_str(&authority[user_end..]);
            }
            None => out.push_str(authority),
        }
        match tail.find(['?', '#']) {
            Some(query) => {
                out.push_str(&tail[..=query]);
                out.push_str("***");
            }
            None => out.push_str(tail),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// A pinned nixpkgs commit.
fn commit(rev: &str) -> Resolved {
    Resolved {
        arg: SourceArg::Commit {
            rev: rev.to_string(),
        },
        moving: false,
    }
}

/// A tag's resolution (or why it failed), and when it was looked up.
type Lookup = (Result<Resolved, SourceError>, Instant);

/// Resolves tags against the configured source, remembering git lookups
/// for the TTL and failed ones for the failure TTL.
#[derive(Debug)]
pub struct Sources {
    source: PackageSource,
    ttl: Duration,
    failure_ttl: Duration,
    allowed: AllowedRefs,
    remembered: Mutex<HashMap<String, Lookup>>,
    /// Who answers git lookups.
    git: std::sync::Arc<dyn GitResolver>,
    /// The nixpkgs API that says whether a commit is on a channel.
    nixpkgs_api: String,
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
            failure_ttl: Duration::ZERO,
            allowed: AllowedRefs::default(),
            remembered: Mutex::default(),
            git: std::sync::Arc::new(LocalGit::default()),
            nixpkgs_api: DEFAULT_NIXPKGS_API.to_string(),
        }
    }

    /// Checks nixpkgs commits against this API (GitHub's REST API for a
    /// repository: `<api>/compare/<base>...<head>`) instead of GitHub's.
    pub fn checking_nixpkgs_at(mut self, api: impl Into<String>) -> Sources {
        self.nixpkgs_api = api.into().trim_end_matches('/').to_string();
        self
    }

    /// Remembers a tag that named nothing (or a repository that could not
    /// be read) for this long, so repeated pulls do not ask again.
    pub fn remembering_failures(mut self, failure_ttl: Duration) -> Sources {
        self.failure_ttl = failure_ttl;
        self
    }

    /// Has git lookups answered by `git` instead of the local binary.
    pub fn resolving_git_with(mut self, git: std::sync::Arc<dyn GitResolver>) -> Sources {
        self.git = git;
        self
    }

    /// Which revisions of a git source tags may select.
    pub fn allowing(mut self, allowed: AllowedRefs) -> Sources {
        self.allowed = allowed;
        self
    }

    pub fn source(&self) -> &PackageSource {
        &self.source
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// What `tag` means now, asking the repository (or GitHub) when it
    /// has not been asked recently.
    pub async fn resolve(&self, tag: &str) -> Result<Resolved, SourceError> {
        if let Some(known) = self.resolve_cached(tag) {
            return known;
        }
        let found = match &self.source {
            PackageSource::Channel { name } => {
                self.nixpkgs_commit(name, tag).await.map(|()| commit(tag))
            }
            PackageSource::Git { url } => self.resolve_git(url, tag).await,
            PackageSource::Path(path) => Ok(path_source(path)),
        };
        self.remember(tag, found.clone());
        found
    }

    /// What `tag` means, if that needs no lookup (a path, a channel name)
    /// or one was made recently; `None` if it would take a lookup. For
    /// callers who may not cause one (anonymous pulls of a private
    /// registry).
    pub fn resolve_cached(&self, tag: &str) -> Option<Result<Resolved, SourceError>> {
        match &self.source {
            PackageSource::Path(path) => Some(Ok(path_source(path))),
            PackageSource::Channel { name } if !is_commit(tag) => Some(Ok(Resolved {
                arg: SourceArg::Channel { name: name.clone() },
                moving: true,
            })),
            PackageSource::Channel { .. } if self.allowed == AllowedRefs::Any => {
                Some(Ok(commit(tag)))
            }
            PackageSource::Channel { .. } | PackageSource::Git { .. } => self.recall(tag),
        }
    }

    /// Keeps a lookup's outcome. Tags come from clients, so the memory is
    /// bounded: when full, expired entries go, and if none has, all do.
    fn remember(&self, tag: &str, found: Result<Resolved, SourceError>) {
        let mut remembered = self.remembered.lock().expect("never poisoned");
        if remembered.len() >= REMEMBER_MAX {
            remembered.retain(|_, (found, at)| at.elapsed() < self.kept_for(found));
            if remembered.len() >= REMEMBER_MAX {
                remembered.clear();
            }
        }
        remembered.insert(tag.to_string(), (found, Instant::now()));
    }

    /// A lookup made recently enough to answer again.
    fn recall(&self, tag: &str) -> Option<Result<Resolved, SourceError>> {
        let remembered = self.remembered.lock().expect("never poisoned");
        let (found, at) = remembered.get(tag)?;
        (at.elapsed() < self.kept_for(found)).then(|| found.clone())
    }

    /// How long a lookup's outcome is answered again.
    fn kept_for<T>(&self, found: &Result<T, SourceError>) -> Duration {
        kept_for(found, self.ttl, self.failure_ttl)
    }

    /// Whether a nixpkgs commit is on the channel's branch or on master
    /// (GitHub serves forks' commits under nixpkgs' own URLs, so a commit
    /// hash alone proves nothing).
    async fn nixpkgs_commit(&self, channel: &str, rev: &str) -> Result<(), SourceError> {
        let api = &self.nixpkgs_api;
        let api_url = SourceUrl::new(api.as_str());
        let unreadable = |message: String| SourceError::git(&api_url, message);
        let client = reqwest::Client::builder()
            .timeout(API_TIMEOUT)
            .user_agent(concat!("nixery/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| unreadable(e.to_string()))?;
        let bases = [channel, "master"];
        for base in bases {
            // Both are plain names and hex: nothing to escape.
            let url = format!("{api}/compare/{base}...{rev}");
            let response = client
                .get(&url)
                .header("Accept", "application/vnd.github+json")
                .send()
                .await
                .map_err(|e| unreadable(e.to_string()))?;
            let status = response.status();
            if status == reqwest::StatusCode::NOT_FOUND
                || status == reqwest::StatusCode::UNPROCESSABLE_ENTITY
            {
                // Unknown here, or no history in common with the base.
                continue;
            }
            if !status.is_success() {
                return Err(unreadable(format!("{url} answered {status}")));
            }
            #[derive(serde::Deserialize)]
            struct Comparison {
                status: String,
            }
            let body = response
                .bytes()
                .await
                .map_err(|e| unreadable(e.to_string()))?;
            let comparison: Comparison =
                serde_json::from_slice(&body).map_err(|e| unreadable(e.to_string()))?;
            // The commit is behind (an ancestor of) the base, or is it.
            if matches!(comparison.status.as_str(), "behind" | "identical") {
                return Ok(());
            }
        }
        Err(SourceError::NotReachable {
            rev: rev.to_string(),
            url: api_url,
            allowed: bases.join(", "),
        })
    }

    async fn resolve_git(&self, url: &SourceUrl, tag: &str) -> Result<Resolved, SourceError> {
        let lookup = GitLookup {
            url: url.clone(),
            tag: tag.to_string(),
            allowed: self.allowed.clone(),
        };
        Ok(Resolved {
            arg: self.git.resolve(&lookup).await?,
            moving: false,
        })
    }
}

/// A question about a git source: what `tag` means in `url`, within the
/// allowed refs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitLookup {
    pub url: SourceUrl,
    pub tag: String,
    pub allowed: AllowedRefs,
}

/// Who answers git lookups: [`LocalGit`] with the `git` binary, or a
/// process that has one (the Lambda runtime has none; see
/// `dispatch::sqs::QueueGit`).
#[async_trait::async_trait]
pub trait GitResolver: Send + Sync + std::fmt::Debug + 'static {
    async fn resolve(&self, lookup: &GitLookup) -> Result<SourceArg, SourceError>;
}

/// Git lookups with the local `git`: `ls-remote` for names, and a local
/// mirror of the allowed refs to tell whether a commit is on them.
#[derive(Debug, Default)]
pub struct LocalGit {
    /// Serialises fetches into the local mirrors.
    mirror: tokio::sync::Mutex<()>,
}

#[async_trait::async_trait]
impl GitResolver for LocalGit {
    async fn resolve(&self, lookup: &GitLookup) -> Result<SourceArg, SourceError> {
        let GitLookup { url, tag, allowed } = lookup;
        let (rev, git_ref) = if is_commit(tag) {
            match allowed {
                AllowedRefs::Any => (tag.to_string(), None),
                AllowedRefs::Reachable(patterns) => {
                    let _one_fetch_at_a_time = self.mirror.lock().await;
                    let found = reachable_from(url, tag, patterns).await?;
                    (tag.to_string(), Some(found))
                }
            }
        } else {
            let (rev, git_ref) = ls_remote(url, tag).await?;
            // A name must be an allowed ref too (the default branch, HEAD,
            // always is).
            if let (AllowedRefs::Reachable(patterns), Some(found)) = (allowed, &git_ref) {
                let matches = |pattern: &String| match pattern.strip_suffix('*') {
                    Some(prefix) => found.starts_with(prefix),
                    None => found == pattern,
                };
                if !patterns.iter().any(matches) {
                    return Err(SourceError::NotReachable {
                        rev: tag.to_string(),
                        url: url.clone(),
                        allowed: patterns.join(" "),
                    });
                }
            }
            // `latest`: the default branch, which fetchGit calls HEAD.
            (rev, Some(git_ref.unwrap_or_else(|| "HEAD".to_string())))
        };
        Ok(SourceArg::Git {
            url: url.clone(),
            rev,
            git_ref,
        })
    }
}

/// Runs git with a fixed argument list; stdout on success.
async fn git(url: &SourceUrl, args: &[&str]) -> Result<std::process::Output, SourceError> {
    let git_error = |message: String| SourceError::git(url, message);
    let mut command = Command::new("git");
    command
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(GIT_TIMEOUT, command.output())
        .await
        .map_err(|_| git_error(format!("git took more than {} s", GIT_TIMEOUT.as_secs())))?
        .map_err(|e| git_error(format!("could not run git: {e}")))
}

/// The directory of the local mirrors: this user's alone (mode 0700), so
/// that nothing else on the machine (a builder without a sandbox) can plant
/// a repository, or its configuration, where git will look.
fn mirror_root() -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let root = std::env::temp_dir().join(format!("nixery-git-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {}: {e}", root.display())),
    }
    let meta = std::fs::symlink_metadata(&root).map_err(|e| e.to_string())?;
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is not a private directory of this user; refusing to use it",
            root.display()
        ));
    }
    Ok(root)
}

/// The first ref matching `patterns` (sorted by name, branches before
/// tags) whose history holds `rev`, after fetching those refs into a local
/// mirror of the repository. Commits only other refs hold (`refs/pull/*`,
/// a fork's objects) are refused.
async fn reachable_from(
    url: &SourceUrl,
    rev: &str,
    patterns: &[String],
) -> Result<String, SourceError> {
    let mirror = mirror_root()
        .map_err(|message| SourceError::git(url, message))?
        .join(&crate::oci::digest::sha256_hex(url.expose().as_bytes())[..32]);
    let mirror_arg = mirror.to_string_lossy().into_owned();
    let failed = |output: &std::process::Output| {
        SourceError::git(url, String::from_utf8_lossy(&output.stderr).trim())
    };
    if !mirror.join("HEAD").exists() {
        let init = git(url, &["init", "--bare", "--quiet", &mirror_arg]).await?;
        if !init.status.success() {
            return Err(failed(&init));
        }
    }
    let refspecs: Vec<String> = patterns.iter().map(|p| format!("+{p}:{p}")).collect();
    let mut fetch: Vec<&str> = vec![
        "-C",
        &mirror_arg,
        "fetch",
        "--quiet",
        "--prune",
        "--no-tags",
        "--",
        url.expose(),
    ];
    fetch.extend(refspecs.iter().map(String::as_str));
    let fetched = git(url, &fetch).await?;
    if !fetched.status.success() {
        return Err(failed(&fetched));
    }
    let not_reachable = || SourceError::NotReachable {
        rev: rev.to_string(),
        url: url.clone(),
        allowed: patterns.join(" "),
    };
    let object = format!("{rev}^{{commit}}");
    let exists = git(url, &["-C", &mirror_arg, "cat-file", "-e", &object]).await?;
    if !exists.status.success() {
        return Err(not_reachable());
    }
    let mut list: Vec<&str> = vec![
        "-C",
        &mirror_arg,
        "for-each-ref",
        "--format=%(refname)",
        "--contains",
        rev,
        "--",
    ];
    list.extend(patterns.iter().map(|p| p.trim_end_matches('*')));
    let holding = git(url, &list).await?;
    if !holding.status.success() {
        return Err(failed(&holding));
    }
    let mut refs: Vec<String> = String::from_utf8_lossy(&holding.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    refs.sort_by_key(|r| (!r.starts_with("refs/heads/"), r.clone()));
    refs.into_iter().next().ok_or_else(not_reachable)
}

/// The commit a tag names in a repository: `latest` is HEAD, then a branch,
/// then a git tag (peeled to its commit).
async fn ls_remote(url: &SourceUrl, tag: &str) -> Result<(String, Option<String>), SourceError> {
    let patterns: Vec<String> = if tag == "latest" {
        vec!["HEAD".to_string()]
    } else {
        vec![
            format!("refs/heads/{tag}"),
            format!("refs/tags/{tag}"),
            format!("refs/tags/{tag}^{{}}"),
        ]
    };
    let mut args = vec!["ls-remote", "--symref", "--", url.expose()];
    args.extend(patterns.iter().map(String::as_str));
    let output = git(url, &args).await?;
    if !output.status.success() {
        return Err(SourceError::git(
            url,
            String::from_utf8_lossy(&output.stderr).trim(),
        ));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    // `ref: refs/heads/main<TAB>HEAD`: the default branch, by name.
    let default_branch = text
        .lines()
        .filter_map(|line| line.strip_prefix("ref: ")?.split_once('\t'))
        .find(|(_, name)| *name == "HEAD")
        .map(|(target, _)| target.to_string());
    let refs: HashMap<String, String> = text
        .lines()
        .filter(|line| !line.starts_with("ref: "))
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
            url: url.clone(),
        }),
        Some(pattern) => {
            let rev = refs[&pattern].clone();
            let git_ref = if pattern == "HEAD" {
                default_branch
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
            PackageSource::Git {
                url: url.as_str().into(),
            },
            Duration::from_secs(60),
        );
        let rev = |resolved: Resolved| match resolved.arg {
            SourceArg::Git { rev, git_ref, .. } => (rev, git_ref),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            rev(sources.resolve("latest").await.unwrap()),
            (one.clone(), Some("refs/heads/main".into()))
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
            (two.clone(), Some("refs/heads/feature".into()))
        );
        assert_eq!(
            sources.resolve("nope").await,
            Err(SourceError::UnknownRef {
                tag: "nope".into(),
                url: url.as_str().into()
            })
        );

        // A moved branch is seen once the remembered resolution expires.
        git(r, &["branch", "-f", "feature", "main"]);
        assert_eq!(rev(sources.resolve("feature").await.unwrap()).0, two);
        let fresh = Sources::new(PackageSource::Git { url: url.into() }, Duration::ZERO);
        assert_eq!(rev(fresh.resolve("feature").await.unwrap()).0, one);
    }

    #[tokio::test]
    async fn commits_only_a_pull_request_holds_are_refused_unless_any_is_allowed() {
        let repo = tempfile::tempdir().unwrap();
        let r = repo.path();
        git(r, &["init", "-q"]);
        std::fs::write(r.join("a"), "1").unwrap();
        git(r, &["add", "a"]);
        git(r, &["commit", "-qm", "one"]);
        let on_main = git(r, &["rev-parse", "HEAD"]);
        git(r, &["tag", "v1"]);
        // A commit reachable only from refs/pull/1/head, as a pull request
        // from anyone leaves on a forge.
        git(r, &["checkout", "-qb", "contribution"]);
        std::fs::write(r.join("a"), "evil").unwrap();
        git(r, &["commit", "-qam", "evil"]);
        let pull = git(r, &["rev-parse", "HEAD"]);
        git(r, &["update-ref", "refs/pull/1/head", &pull]);
        git(r, &["checkout", "-q", "main"]);
        git(r, &["branch", "-D", "contribution"]);

        let url = r.to_str().unwrap().to_string();
        let sources = Sources::new(
            PackageSource::Git {
                url: url.as_str().into(),
            },
            Duration::from_secs(60),
        )
        .remembering_failures(Duration::from_secs(60));
        match sources.resolve(&on_main).await.unwrap().arg {
            SourceArg::Git { git_ref, .. } => {
                assert_eq!(git_ref.as_deref(), Some("refs/heads/main"))
            }
            other => panic!("{other:?}"),
        }
        let refused = sources.resolve(&pull).await.unwrap_err();
        assert!(
            matches!(&refused, SourceError::NotReachable { rev, .. } if *rev == pull),
            "{refused:?}"
        );
        // A commit nobody has: refused the same way.
        let nothing = "0".repeat(40);
        assert!(matches!(
            sources.resolve(&nothing).await,
            Err(SourceError::NotReachable { .. })
        ));
        // Remembered: merging it later is seen after the failure TTL only.
        git(r, &["branch", "merged", &pull]);
        assert!(sources.resolve(&pull).await.is_err());
        let later = Sources::new(
            PackageSource::Git {
                url: url.as_str().into(),
            },
            Duration::from_secs(60),
        );
        assert!(later.resolve(&pull).await.is_ok());

        // Names must be allowed refs too.
        let narrow = Sources::new(
            PackageSource::Git {
                url: url.as_str().into(),
            },
            Duration::from_secs(60),
        )
        .allowing(AllowedRefs::Reachable(vec!["refs/heads/main".into()]));
        assert!(narrow.resolve("main").await.is_ok());
        assert!(narrow.resolve("latest").await.is_ok());
        assert!(matches!(
            narrow.resolve("v1").await,
            Err(SourceError::NotReachable { .. })
        ));

        // The operator may widen it.
        let any = Sources::new(
            PackageSource::Git { url: url.into() },
            Duration::from_secs(60),
        )
        .allowing(AllowedRefs::Any);
        git(r, &["branch", "-D", "merged"]);
        match any.resolve(&pull).await.unwrap().arg {
            SourceArg::Git { git_ref, .. } => assert_eq!(git_ref, None),
            other => panic!("{other:?}"),
        }
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
        // (Whether a commit is on the channel is asked of GitHub, which
        // tests/security.rs stands in for; here any commit is allowed.)
        let channel = channel.allowing(AllowedRefs::Any);
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

    #[test]
    fn credentials_and_queries_in_urls_are_redacted() {
        assert_eq!(
            redact_urls("fetching https://user:ghp_secret@github.com/o/r.git failed"),
            "fetching https://***@github.com/o/r.git failed"
        );
        assert_eq!(
            redact_urls("'https://token@host' and ssh://git@host:22/r"),
            "'https://***@host' and ssh://***@host:22/r"
        );
        assert_eq!(
            redact_urls("/srv/repo and https://host/x"),
            "/srv/repo and https://host/x"
        );
        // Queries and fragments carry tokens too; the URL ends where a
        // quote, a space or a JSON escape does.
        assert_eq!(
            redact_urls("unable to download 'http://u:p@h:1/f?private_token=s': refused"),
            "unable to download 'http://***@h:1/f?***': refused"
        );
        assert_eq!(
            redact_urls(r#"{"msg":"error: 'https://h/x?a=1&b=2\"' #frag"}"#),
            r#"{"msg":"error: 'https://h/x?***\"' #frag"}"#
        );
        assert_eq!(
            redact_urls("https://h/p#access_token=t done"),
            "https://h/p#*** done"
        );
        assert_eq!(redact_urls("https://h/a@b/c"), "https://h/a@b/c");
        assert_eq!(redact_urls("https://"), "https://");
    }

    #[test]
    fn source_urls_show_no_secret_and_no_local_path() {
        let url = SourceUrl::new("https://me:pw@example.org/pkgs?private_token=t");
        assert_eq!(
            PackageSource::Git { url: url.clone() }.to_string(),
            "the git repository https://***@example.org/pkgs?***"
        );
        assert!(!format!("{url:?}").contains("pw"));
        assert_eq!(
            url.expose(),
            "https://me:pw@example.org/pkgs?private_token=t"
        );
        // The queue and Nix get the whole URL.
        let arg = SourceArg::Git {
            url: url.clone(),
            rev: "r".into(),
            git_ref: None,
        };
        assert!(serde_json::to_string(&arg).unwrap().contains("me:pw@"));
        assert!(!format!("{arg:?}").contains("me:pw@"));
        let error = SourceError::git(
            &url,
            "fatal: 'https://me:pw@example.org/pkgs?private_token=t'",
        );
        assert!(!error.to_string().contains("pw"), "{error}");
        assert!(!error.to_string().contains("private_token"), "{error}");
        for local in ["/srv/pkgs", "./pkgs", "pkgs", "file:///srv/pkgs"] {
            assert!(SourceUrl::new(local).is_local(), "{local}");
            assert_eq!(
                PackageSource::Git { url: local.into() }.to_string(),
                "a local git repository"
            );
        }
        for remote in ["git@github.com:o/r.git", "https://h/r", "host:r"] {
            assert!(!SourceUrl::new(remote).is_local(), "{remote}");
        }
        assert_eq!(
            PackageSource::Path("/home/me/pkgs".into()).to_string(),
            "a local package set"
        );
    }
}
