//! The attribute index of a package set at one revision, for one system:
//! every attribute `nix/index.nix` lists, with its outputs' store paths
//! and the metadata an SBOM needs, so that a pull can find its packages
//! without evaluating anything.
//!
//! It is stored in 256 shards by the hash of each attribute path written
//! in lower case (`attrs/<revision>/<system>/<nn>`, zstd-compressed JSON),
//! and a head written last (`attrs/<revision>/<system>/head`), so that a
//! function with a cold start reads one small object and then only the
//! shards of the names asked for (one per level of a dotted name that the
//! lookup reaches: a name whose first level is unknown costs one shard,
//! however many dots follow), and keeps what it read for a while
//! ([`Catalog`]).
//!
//! [`Catalog::look_up`] answers a name exactly as `nix/resolve.nix`
//! would, one level at a time ([`Resolving`]): at each level the attribute
//! of that exact name, else the one equal to it ignoring ASCII case that
//! sorts first by bytes; a derivation at the end is the package; a name
//! that stops at anything else is not a package; a name that goes below a
//! set the index did not list is one only Nix can answer.
//!
//! For example, `python3packages.numpy` reads the shard of
//! `python3packages`, where it finds the set `python3Packages` (no
//! attribute has the exact name; this one is equal to it ignoring case),
//! then the shard of `python3packages.numpy`, where it finds the package
//! `python3Packages.numpy`. `nope.numpy.x.y` reads the shard of `nope`
//! alone, finds nothing, and is not a package.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::builder::nix::{AttributeKind, ListedAttribute};
use crate::source::SourceArg;
use crate::storage::keys::{AttrsHeadKey, AttrsShardKey, RevisionKey};
use crate::storage::records::{self, RecordError};
use crate::storage::{Storage, StorageError};

/// Bumped whenever the stored form changes (an older index is rebuilt).
pub const FORMAT: u32 = 1;
/// Shards of an index: one byte of a path's hash.
pub const SHARDS: usize = 256;
/// The most bytes one shard may decompress to. A shard of nixpkgs is of
/// the order of a megabyte (its attributes at a kilobyte or so each, over
/// 256 shards); one past this is a corrupt (or hostile) index, refused
/// before it is parsed.
const MAX_SHARD: u64 = 32 << 20;
/// How long a head read from storage is believed; and that there is none
/// (an index job may make one any moment).
const HEAD_TTL: Duration = Duration::from_secs(60);
const NO_HEAD_TTL: Duration = Duration::from_secs(5);
/// Shards kept in memory at most (the least recently used go first).
const SHARDS_KEPT: usize = 512;
/// Bytes of shards kept in memory at most, counted as their JSON
/// (decompressed): twice the largest shard there may be, and tens of
/// nixpkgs' shards.
const KEPT_BYTES: u64 = 64 << 20;

/// The revision an index is of: the resolved package source's identity.
pub fn revision_of(source: &SourceArg) -> RevisionKey {
    let canonical = serde_json::to_vec(source).expect("a source always serialises");
    RevisionKey::hash_of(&canonical)
}

/// What an index is of, and when it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub format: u32,
    pub source: SourceArg,
    pub system: String,
    /// Unix seconds.
    pub indexed_at: u64,
    pub entries: u64,
}

impl Head {
    /// Whether the index is recent enough for a build that accepts nothing
    /// made before `not_before` (the freshness rule of images).
    pub fn is_current(&self, not_before: u64) -> bool {
        records::is_current(self.indexed_at, not_before)
    }
}

/// An attribute path as the shards are keyed: names joined by `.`, ASCII
/// lower case.
pub fn lower_path(path: &[String]) -> String {
    path.join(".").to_ascii_lowercase()
}

/// The shard of a lower-case path.
pub fn shard_of(lower: &str) -> u8 {
    Sha256::digest(lower.as_bytes())[0]
}

/// What the index says of a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A package: its outputs and their store paths.
    Package(Box<ListedAttribute>),
    /// Not a package (Nix would say "unknown" too).
    NotAPackage,
    /// Only Nix can say (below a set the index did not list, or a package
    /// that does not evaluate).
    Unknown,
}

/// A name being looked up as `nix/resolve.nix` would, one level at a
/// time, so that the candidates of a level are fetched only once the
/// levels above it have been passed: [`Resolving::wanted`] names the
/// lower-case path of the next level, [`Resolving::choose`] picks among
/// the attributes listed under it, until it answers.
struct Resolving<'n> {
    parts: Vec<&'n str>,
    /// The attribute path chosen so far: one name per level passed.
    chosen: Vec<String>,
}

impl<'n> Resolving<'n> {
    /// The lookup of `name`; its answer at once if it names nothing.
    fn start(name: &'n str) -> Result<Resolving<'n>, Lookup> {
        let parts: Vec<&str> = name.split('.').filter(|p| !p.is_empty()).collect();
        if parts.is_empty() {
            return Err(Lookup::NotAPackage);
        }
        Ok(Resolving {
            parts,
            chosen: Vec::new(),
        })
    }

    /// The lower-case path the next level is chosen among.
    fn wanted(&self) -> String {
        let level = self.chosen.len();
        let wanted: Vec<String> = self.parts[..=level].iter().map(|p| p.to_string()).collect();
        lower_path(&wanted)
    }

    /// Chooses the next level among `candidates` (the listed attributes
    /// whose lower-case path is [`Resolving::wanted`]); the answer, if
    /// the name ends here (it always does at its last level).
    fn choose(&mut self, candidates: Vec<&ListedAttribute>) -> Option<Lookup> {
        let level = self.chosen.len();
        let part = self.parts[level];
        let here: Vec<&ListedAttribute> = candidates
            .into_iter()
            .filter(|a| a.path.len() == level + 1 && a.path[..level] == self.chosen[..])
            .collect();
        // The exact name, else the first equal to it ignoring case.
        let exact = here.iter().find(|a| a.path[level] == part);
        let attribute = match exact {
            Some(found) => *found,
            None => match here
                .iter()
                .min_by(|a, b| a.path[level].as_bytes().cmp(b.path[level].as_bytes()))
            {
                Some(found) => *found,
                // The parent set (the top level, or a listed set) has no
                // such attribute.
                None => return Some(Lookup::NotAPackage),
            },
        };
        let last = level + 1 == self.parts.len();
        match (attribute.kind, last) {
            (AttributeKind::Drv, true) => Some(Lookup::Package(Box::new(attribute.clone()))),
            (AttributeKind::Broken, true) => Some(Lookup::Unknown),
            (AttributeKind::Opaque, false) => Some(Lookup::Unknown),
            (AttributeKind::Set, false) => {
                self.chosen = attribute.path.clone();
                None
            }
            // A derivation is not looked into; a set or a non-package is
            // not a package.
            (AttributeKind::Drv | AttributeKind::Broken | AttributeKind::None, false)
            | (AttributeKind::Set | AttributeKind::Opaque | AttributeKind::None, true) => {
                Some(Lookup::NotAPackage)
            }
        }
    }
}

/// Why an index could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum AttrsError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("attribute index shard {key} is unreadable: {message}")]
    Shard { key: String, message: String },
    /// Larger than any real package set's shard: the index is corrupt.
    #[error(
        "attribute index shard {key} decompresses to more than {limit} bytes: the index is corrupt"
    )]
    ShardTooLarge { key: String, limit: u64 },
}

/// A head read, when it was read, by revision and system.
type Heads = HashMap<(RevisionKey, String), (Instant, Option<Head>)>;

/// Shards read, kept while they fit in so many shards and so many bytes
/// (a catalog's are [`SHARDS_KEPT`] and [`KEPT_BYTES`]): the least
/// recently used go first.
struct Kept {
    max_shards: usize,
    max_bytes: u64,
    /// By key: the shard, its size, and when it was last used.
    shards: HashMap<String, (Arc<Vec<ListedAttribute>>, u64, u64)>,
    /// Keys by when they were last used (a counter).
    by_use: BTreeMap<u64, String>,
    bytes: u64,
    uses: u64,
}

impl Kept {
    fn new(max_shards: usize, max_bytes: u64) -> Kept {
        Kept {
            max_shards,
            max_bytes,
            shards: HashMap::new(),
            by_use: BTreeMap::new(),
            bytes: 0,
            uses: 0,
        }
    }

    fn get(&mut self, key: &str) -> Option<Arc<Vec<ListedAttribute>>> {
        self.uses += 1;
        let (shard, _, used) = self.shards.get_mut(key)?;
        let key = self
            .by_use
            .remove(used)
            .expect("every kept shard is in by_use");
        *used = self.uses;
        self.by_use.insert(self.uses, key);
        Some(shard.clone())
    }

    /// Keeps `shard` of `size` bytes, dropping the least recently used
    /// until it fits; one larger than the whole bound is not kept.
    fn insert(&mut self, key: &str, shard: Arc<Vec<ListedAttribute>>, size: u64) {
        self.remove(key);
        if size > self.max_bytes || self.max_shards == 0 {
            return;
        }
        while self.bytes + size > self.max_bytes || self.shards.len() >= self.max_shards {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((_, dropped, _)) = self.shards.remove(&oldest) {
                self.bytes -= dropped;
            }
        }
        self.uses += 1;
        self.bytes += size;
        self.by_use.insert(self.uses, key.to_string());
        self.shards
            .insert(key.to_string(), (shard, size, self.uses));
    }

    fn remove(&mut self, key: &str) {
        if let Some((_, size, used)) = self.shards.remove(key) {
            self.by_use.remove(&used);
            self.bytes -= size;
        }
    }

    fn clear(&mut self) {
        self.shards.clear();
        self.by_use.clear();
        self.bytes = 0;
    }
}

/// Attribute indexes in storage, with what was read of them kept in
/// memory (heads for a minute, shards up to a bound).
pub struct Catalog {
    storage: Arc<dyn Storage>,
    heads: Mutex<Heads>,
    shards: Mutex<Kept>,
}

impl Catalog {
    pub fn new(storage: Arc<dyn Storage>) -> Catalog {
        Catalog {
            storage,
            heads: Mutex::default(),
            shards: Mutex::new(Kept::new(SHARDS_KEPT, KEPT_BYTES)),
        }
    }

    /// The head of the index of `source` for `system`, if there is one of
    /// this format.
    pub async fn head(&self, source: &SourceArg, system: &str) -> Result<Option<Head>, AttrsError> {
        let revision = revision_of(source);
        let slot = (revision.clone(), system.to_string());
        if let Some((at, head)) = self.heads.lock().expect("never poisoned").get(&slot) {
            let ttl = if head.is_some() {
                HEAD_TTL
            } else {
                NO_HEAD_TTL
            };
            if at.elapsed() < ttl {
                return Ok(head.clone());
            }
        }
        let head: Option<Head> =
            records::read(&*self.storage, &AttrsHeadKey::of(&revision, system)).await?;
        let head = head.filter(|h| h.format == FORMAT && h.system == system && h.source == *source);
        let mut heads = self.heads.lock().expect("never poisoned");
        if heads.len() > 1024 {
            heads.clear();
        }
        heads.insert(slot, (Instant::now(), head.clone()));
        Ok(head)
    }

    /// Looks up `names` in the index `head` heads, level by level: only
    /// the shards of the levels a name reaches are read (see [`Resolving`]).
    pub async fn look_up(&self, head: &Head, names: &[String]) -> Result<Vec<Lookup>, AttrsError> {
        let revision = revision_of(&head.source);
        let mut found = Vec::with_capacity(names.len());
        for name in names {
            let mut resolving = match Resolving::start(name) {
                Ok(resolving) => resolving,
                Err(answer) => {
                    found.push(answer);
                    continue;
                }
            };
            let answer = loop {
                let wanted = resolving.wanted();
                let shard = self
                    .shard(&revision, &head.system, shard_of(&wanted))
                    .await?;
                // Every attribute of this path is in this path's shard.
                let candidates: Vec<&ListedAttribute> = shard
                    .iter()
                    .filter(|a| lower_path(&a.path) == wanted)
                    .collect();
                if let Some(answer) = resolving.choose(candidates) {
                    break answer;
                }
            };
            found.push(answer);
        }
        Ok(found)
    }

    /// Every attribute the index `head` heads lists. The shards are read
    /// afresh and not kept: they would only push out the ones lookups use.
    pub async fn all_entries(&self, head: &Head) -> Result<Vec<ListedAttribute>, AttrsError> {
        let revision = revision_of(&head.source);
        let mut all = Vec::new();
        for shard in 0..=u8::MAX {
            let key = AttrsShardKey::of(&revision, &head.system, shard);
            all.extend(self.read_shard(&key).await?.0);
        }
        Ok(all)
    }

    /// A shard, from memory or else from storage (then kept).
    async fn shard(
        &self,
        revision: &RevisionKey,
        system: &str,
        shard: u8,
    ) -> Result<Arc<Vec<ListedAttribute>>, AttrsError> {
        let key = AttrsShardKey::of(revision, system, shard);
        if let Some(found) = self.shards.lock().expect("never poisoned").get(&key) {
            return Ok(found);
        }
        let (entries, size) = self.read_shard(&key).await?;
        let entries = Arc::new(entries);
        self.shards
            .lock()
            .expect("never poisoned")
            .insert(&key, entries.clone(), size);
        Ok(entries)
    }

    /// A shard from storage (an absent one is empty), and the size of its
    /// JSON.
    async fn read_shard(
        &self,
        key: &AttrsShardKey,
    ) -> Result<(Vec<ListedAttribute>, u64), AttrsError> {
        match self.storage.get(key).await? {
            None => Ok((Vec::new(), 0)),
            Some(bytes) => decode_shard(&bytes, MAX_SHARD).map_err(|refused| match refused {
                Refused::TooLarge => AttrsError::ShardTooLarge {
                    key: key.to_string(),
                    limit: MAX_SHARD,
                },
                Refused::Unreadable(message) => AttrsError::Shard {
                    key: key.to_string(),
                    message,
                },
            }),
        }
    }

    /// Stores the index of `source` for `system`: every shard, then the
    /// head (the commit point). Replaces an older index of the same
    /// revision (a moving source's).
    pub async fn write(
        &self,
        source: &SourceArg,
        system: &str,
        entries: Vec<ListedAttribute>,
        indexed_at: u64,
    ) -> Result<Head, AttrsError> {
        let revision = revision_of(source);
        let count = entries.len() as u64;
        let mut shards: Vec<Vec<ListedAttribute>> = vec![Vec::new(); SHARDS];
        for entry in entries {
            shards[shard_of(&lower_path(&entry.path)) as usize].push(entry);
        }
        for (n, mut shard) in shards.into_iter().enumerate() {
            shard.sort_by(|a, b| a.path.cmp(&b.path));
            let key = AttrsShardKey::of(&revision, system, n as u8);
            self.storage.put(&key, encode_shard(&shard)).await?;
        }
        let head = Head {
            format: FORMAT,
            source: source.clone(),
            system: system.to_string(),
            indexed_at,
            entries: count,
        };
        records::write(&*self.storage, &AttrsHeadKey::of(&revision, system), &head).await?;
        self.heads
            .lock()
            .expect("never poisoned")
            .remove(&(revision.clone(), system.to_string()));
        self.shards.lock().expect("never poisoned").clear();
        Ok(head)
    }
}

fn encode_shard(entries: &[ListedAttribute]) -> Bytes {
    let json = serde_json::to_vec(entries).expect("attributes always serialise");
    Bytes::from(zstd::encode_all(&json[..], 9).expect("compressing into memory never fails"))
}

/// Why a shard was refused.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// It decompresses to more than the limit.
    TooLarge,
    Unreadable(String),
}

/// A shard's entries, and the size of its JSON (at most `limit`).
fn decode_shard(bytes: &[u8], limit: u64) -> Result<(Vec<ListedAttribute>, u64), Refused> {
    let unreadable = |e: std::io::Error| Refused::Unreadable(e.to_string());
    let mut json = Vec::new();
    zstd::stream::read::Decoder::new(bytes)
        .map_err(unreadable)?
        .take(limit + 1)
        .read_to_end(&mut json)
        .map_err(unreadable)?;
    if json.len() as u64 > limit {
        return Err(Refused::TooLarge);
    }
    let entries = serde_json::from_slice(&json).map_err(|e| Refused::Unreadable(e.to_string()))?;
    Ok((entries, json.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    fn attr(path: &[&str], kind: AttributeKind) -> ListedAttribute {
        let drv = kind == AttributeKind::Drv;
        let name = path.join("-");
        ListedAttribute {
            path: path.iter().map(|s| s.to_string()).collect(),
            kind,
            drv_path: drv.then(|| format!("/nix/store/{}-{name}.drv", "a".repeat(32))),
            outputs: if drv { vec!["out".into()] } else { vec![] },
            paths: if drv {
                vec![format!("/nix/store/{}-{name}", "b".repeat(32))]
            } else {
                vec![]
            },
            meta: Default::default(),
        }
    }

    fn set() -> Vec<ListedAttribute> {
        vec![
            attr(&["hello"], AttributeKind::Drv),
            attr(&["Hello"], AttributeKind::Drv),
            attr(&["bashInteractive"], AttributeKind::Drv),
            attr(&["BashInteractive2"], AttributeKind::Drv),
            attr(&["python3Packages"], AttributeKind::Set),
            attr(&["python3Packages", "numpy"], AttributeKind::Drv),
            attr(&["python3Packages", "NumPy"], AttributeKind::Drv),
            attr(&["python3Packages", "lib"], AttributeKind::None),
            attr(&["haskellPackages"], AttributeKind::Opaque),
            attr(&["broken"], AttributeKind::Broken),
            attr(&["lib"], AttributeKind::None),
        ]
    }

    /// What `name` is among all of `entries` at once.
    fn find(entries: &[ListedAttribute], name: &str) -> Lookup {
        let mut resolving = match Resolving::start(name) {
            Ok(resolving) => resolving,
            Err(answer) => return answer,
        };
        loop {
            let wanted = resolving.wanted();
            let candidates = entries
                .iter()
                .filter(|e| lower_path(&e.path) == wanted)
                .collect();
            if let Some(answer) = resolving.choose(candidates) {
                return answer;
            }
        }
    }

    fn package_path(lookup: Lookup) -> Vec<String> {
        match lookup {
            Lookup::Package(found) => found.path.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn names_resolve_as_nix_resolves_them() {
        let entries = set();
        // The exact name first, then case-insensitively.
        assert_eq!(package_path(find(&entries, "hello")), ["hello"]);
        assert_eq!(package_path(find(&entries, "Hello")), ["Hello"]);
        assert_eq!(package_path(find(&entries, "HELLO")), ["Hello"]);
        assert_eq!(
            package_path(find(&entries, "bashinteractive")),
            ["bashInteractive"]
        );
        // Nested, at each level.
        assert_eq!(
            package_path(find(&entries, "python3packages.numpy")),
            ["python3Packages", "numpy"]
        );
        assert_eq!(
            package_path(find(&entries, "python3Packages.NUMPY")),
            ["python3Packages", "NumPy"]
        );
        // Not packages.
        for name in [
            "lib",
            "nope",
            "python3packages",
            "python3Packages.lib",
            "hello.out",
            "python3Packages.nope",
        ] {
            assert_eq!(find(&entries, name), Lookup::NotAPackage, "{name}");
        }
        // Only Nix knows.
        for name in ["haskellPackages.aeson", "broken"] {
            assert_eq!(find(&entries, name), Lookup::Unknown, "{name}");
        }
    }

    #[tokio::test]
    async fn an_index_is_written_in_shards_and_read_back_by_name() {
        let storage = Arc::new(MemoryStorage::new());
        let catalog = Catalog::new(storage.clone());
        let source = SourceArg::Path {
            path: "/pkgs".into(),
        };
        assert_eq!(catalog.head(&source, "x86_64-linux").await.unwrap(), None);
        let head = Catalog::new(storage.clone())
            .write(&source, "x86_64-linux", set(), 1000)
            .await
            .unwrap();
        assert_eq!(head.entries, set().len() as u64);
        // A fresh catalog (a cold start) reads the head and few shards.
        let catalog = Catalog::new(storage.clone());
        let head = catalog
            .head(&source, "x86_64-linux")
            .await
            .unwrap()
            .unwrap();
        assert!(head.is_current(1000) && !head.is_current(1001));
        let before = storage.calls();
        let names = vec!["python3packages.numpy".to_string(), "nope".to_string()];
        let found = catalog.look_up(&head, &names).await.unwrap();
        assert_eq!(package_path(found[0].clone()), ["python3Packages", "numpy"]);
        assert_eq!(found[1], Lookup::NotAPackage);
        assert!(
            storage.calls() - before <= 3,
            "read more shards than the names need"
        );
        // Another system has no index.
        assert_eq!(catalog.head(&source, "aarch64-linux").await.unwrap(), None);
        // Every object is a key of the layout.
        for key in storage.keys() {
            assert!(
                matches!(
                    crate::storage::keys::Parsed::of(&key),
                    Some(crate::storage::keys::Parsed::Attrs(_))
                ),
                "{key}"
            );
        }
    }

    #[test]
    fn a_shard_that_decompresses_without_end_is_refused() {
        let bomb = zstd::encode_all(std::io::repeat(b' ').take(1 << 20), 19).unwrap();
        assert!(bomb.len() < 1000);
        assert_eq!(decode_shard(&bomb, 1 << 16).unwrap_err(), Refused::TooLarge);
        assert!(decode_shard(b"not zstd", 1 << 16).is_err());
        let good = encode_shard(&set());
        assert_eq!(decode_shard(&good, 1 << 16).unwrap().0, set());
    }

    /// An index of `entries` written to fresh memory storage, and a cold
    /// catalog that has read its head.
    async fn stored(entries: Vec<ListedAttribute>) -> (Arc<MemoryStorage>, Catalog, Head) {
        let storage = Arc::new(MemoryStorage::new());
        let source = SourceArg::Path {
            path: "/pkgs".into(),
        };
        Catalog::new(storage.clone())
            .write(&source, "x86_64-linux", entries, 1000)
            .await
            .unwrap();
        let catalog = Catalog::new(storage.clone());
        let head = catalog
            .head(&source, "x86_64-linux")
            .await
            .unwrap()
            .unwrap();
        (storage, catalog, head)
    }

    /// The distinct shards of these lower-case paths.
    fn shards_of(paths: &[&str]) -> u64 {
        let mut shards: Vec<u8> = paths.iter().map(|p| shard_of(p)).collect();
        shards.sort_unstable();
        shards.dedup();
        shards.len() as u64
    }

    #[tokio::test]
    async fn a_long_dotted_name_reads_only_the_shards_of_the_levels_it_reaches() {
        let mut entries = set();
        entries.extend([
            attr(&["a"], AttributeKind::Set),
            attr(&["a", "b"], AttributeKind::Set),
            attr(&["a", "b", "c"], AttributeKind::Drv),
        ]);
        // 255 bytes, 128 levels.
        let dots = |first: &str| {
            let mut name = first.to_string();
            while name.len() + 2 <= 255 {
                name.push_str(".x");
            }
            name
        };
        let cases = [
            // Unknown at the first level: one shard, not 128.
            (dots("nope"), vec!["nope"]),
            (dots("hello"), vec!["hello"]),
            (dots("a.b.c"), vec!["a", "a.b", "a.b.c"]),
            (dots("a.b"), vec!["a", "a.b", "a.b.x"]),
            ("a.b.c".to_string(), vec!["a", "a.b", "a.b.c"]),
        ];
        for (name, reached) in cases {
            let (storage, catalog, head) = stored(entries.clone()).await;
            let before = storage.calls();
            let found = catalog
                .look_up(&head, std::slice::from_ref(&name))
                .await
                .unwrap();
            assert_eq!(found, vec![find(&entries, &name)], "{name}");
            assert_eq!(storage.calls() - before, shards_of(&reached), "{name}");
        }
    }

    #[tokio::test]
    async fn looking_up_level_by_level_answers_as_the_whole_index_does() {
        let mut entries = set();
        entries.extend([
            attr(&["a"], AttributeKind::Set),
            attr(&["A"], AttributeKind::Drv),
            attr(&["a", "b"], AttributeKind::Set),
            attr(&["a", "B"], AttributeKind::Opaque),
            attr(&["a", "b", "c"], AttributeKind::Drv),
            attr(&["a", "b", "C"], AttributeKind::Broken),
            attr(&["a", "b", "d"], AttributeKind::None),
        ]);
        let names: Vec<String> = [
            "hello",
            "HELLO",
            "Hello",
            "hello.out",
            "nope",
            "nope.hello",
            "lib",
            "broken",
            "broken.x",
            "python3packages",
            "python3Packages.numpy",
            "python3packages.NUMPY",
            "python3packages.lib",
            "python3packages.nope",
            "haskellPackages.aeson",
            "haskellpackages",
            "a",
            "A",
            "a.b",
            "a.B",
            "a.B.c",
            "a.b.c",
            "a.b.C",
            "a.B.C",
            "a.b.d",
            "a.b.e",
            "a.b.c.d",
            "A.b.c",
            "",
            ".",
            "..hello",
            "hello.",
            "python3packages..numpy",
            "a..b.c",
        ]
        .iter()
        .map(|n| n.to_string())
        .collect();
        let (_, catalog, head) = stored(entries.clone()).await;
        let found = catalog.look_up(&head, &names).await.unwrap();
        let whole: Vec<Lookup> = names.iter().map(|n| find(&entries, n)).collect();
        assert_eq!(found, whole);
    }

    #[test]
    fn kept_shards_stay_within_their_bytes_dropping_the_least_recently_used() {
        let shard = |n: usize| Arc::new(vec![attr(&[&format!("p{n}")], AttributeKind::Drv)]);
        let mut kept = Kept::new(100, 1000);
        for n in 0..3 {
            kept.insert(&format!("s{n}"), shard(n), 300);
        }
        assert_eq!(kept.bytes, 900);
        // s0 is used, so s1 is the one to go.
        assert!(kept.get("s0").is_some());
        kept.insert("s3", shard(3), 300);
        assert_eq!(kept.bytes, 900);
        assert!(kept.get("s1").is_none());
        for key in ["s0", "s2", "s3"] {
            assert!(kept.get(key).is_some(), "{key}");
        }
        // A large one pushes out as many as it takes.
        kept.insert("big", shard(4), 1000);
        assert_eq!(kept.bytes, 1000);
        assert_eq!(kept.shards.len(), 1);
        // One over the whole bound is not kept, nor does it push out any.
        kept.insert("huge", shard(5), 1001);
        assert!(kept.get("huge").is_none());
        assert!(kept.get("big").is_some());
        // Kept again under a key it had: counted once.
        kept.insert("big", shard(6), 10);
        assert_eq!(kept.bytes, 10);
        // And never more shards than its count, small as they are.
        let mut kept = Kept::new(4, 1000);
        for n in 0..10 {
            kept.insert(&format!("s{n}"), shard(n), 1);
            assert!(kept.shards.len() <= 4);
        }
        assert_eq!(kept.by_use.len(), kept.shards.len());
        assert_eq!(kept.bytes, 4);
    }

    #[tokio::test]
    async fn a_catalog_keeps_no_more_than_its_bytes_of_shards() {
        let entries: Vec<ListedAttribute> = (0..2000)
            .map(|n| attr(&[&format!("package{n}")], AttributeKind::Drv))
            .collect();
        let (_, catalog, head) = stored(entries).await;
        let names: Vec<String> = (0..2000).map(|n| format!("package{n}")).collect();
        catalog.look_up(&head, &names).await.unwrap();
        let total = {
            let kept = catalog.shards.lock().unwrap();
            // Every shard the names are in was read, and fitted.
            let lower: Vec<&str> = names.iter().map(String::as_str).collect();
            assert_eq!(kept.shards.len() as u64, shards_of(&lower));
            let total: u64 = kept.shards.values().map(|(_, size, _)| size).sum();
            assert_eq!(kept.bytes, total);
            assert!(kept.bytes <= KEPT_BYTES);
            total
        };
        // With room for a few, a few are kept.
        *catalog.shards.lock().unwrap() = Kept::new(SHARDS_KEPT, 4 * total / SHARDS as u64);
        catalog.look_up(&head, &names).await.unwrap();
        let kept = catalog.shards.lock().unwrap();
        assert!(kept.bytes <= 4 * total / SHARDS as u64);
        assert!((1..8).contains(&kept.shards.len()), "{}", kept.shards.len());
    }

    #[tokio::test]
    async fn a_shard_too_large_for_any_package_set_is_a_corrupt_index() {
        let (storage, catalog, head) = stored(set()).await;
        let bomb = zstd::encode_all(std::io::repeat(b' ').take(MAX_SHARD + 1), 19).unwrap();
        let key = AttrsShardKey::of(&revision_of(&head.source), &head.system, shard_of("hello"));
        storage.put(&key, Bytes::from(bomb)).await.unwrap();
        let refused = catalog
            .look_up(&head, &["hello".to_string()])
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, AttrsError::ShardTooLarge { key: k, limit } if *k == *key && *limit == MAX_SHARD),
            "{refused:?}"
        );
        assert!(refused.to_string().contains("corrupt"), "{refused}");
        // Nothing of it was kept.
        assert_eq!(catalog.shards.lock().unwrap().bytes, 0);
    }
}
