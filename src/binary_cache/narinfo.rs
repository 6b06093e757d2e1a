//! `<hash>.narinfo`: what a binary cache says about one store path, parsed
//! strictly (Nix's `libstore/nar-info.cc` reads and writes the format).
//!
//! A narinfo is lines of `Key: value`:
//!
//! ```text
//! StorePath: /nix/store/<hash>-hello-2.12.1
//! URL: nar/<filehash>.nar.xz           where the compressed NAR is, relative to the cache
//! Compression: xz                      xz | zstd | bzip2 | none (absent: bzip2)
//! FileHash: sha256:<nix32>             of the compressed file (optional)
//! FileSize: 41204                      of the compressed file (optional)
//! NarHash: sha256:<nix32>              of the uncompressed NAR
//! NarSize: 226552                      of the uncompressed NAR (> 0)
//! References: <hash>-glibc-2.37 ...    base names, space-separated (maybe none)
//! Deriver: <hash>-hello-2.12.1.drv     (optional; "unknown-deriver" means none)
//! Sig: cache.nixos.org-1:<base64>      (may repeat)
//! CA: fixed:r:sha256:<nix32>           (optional, for content-addressed paths)
//! ```
//!
//! What a hostile cache could do with it, and what stops it here:
//! - Unknown keys are ignored (as Nix does); a key given twice (but `Sig`)
//!   or a required key missing (`StorePath`, `URL`, `NarHash`, `NarSize`) is
//!   refused, as is a line without `": "`.
//! - Every store path (`StorePath`, `References`, `Deriver`) must be well
//!   formed ([`StorePath`]); references may not repeat.
//! - Hashes must be sha256 in nix32 (or base16, which Nix also writes);
//!   sizes decimal and `NarSize` non-zero.
//! - `URL` must be a relative path of plain segments (`[A-Za-z0-9._+=~-]`,
//!   no `.` or `..`, no scheme, query, `%` or `\`), so it cannot point the
//!   client at another host or outside the cache.
//! - The text and the number of references are bounded ([`NarInfoLimits`]).
//!
//! [`NarInfo::fingerprint`] is what the `Sig` lines sign
//! (`ValidPathInfo::fingerprint`):
//! `1;<StorePath>;sha256:<nix32 NarHash>;<NarSize>;<References as full paths, sorted, comma-separated>`.
//!
//! ```
//! use nixery::binary_cache::{NarInfo, NarInfoLimits};
//! let text = "StorePath: /nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1
//! URL: nar/0kh8b6ggc6b5rjpd4c6c5pxd9h2sy6z7j6mksr7ngvm0ywh7brsd.nar.xz
//! Compression: xz
//! NarHash: sha256:1yf3p87fsqig07crd9sj9wh7i9jpsa0x86a22fqbls7c81lc7ws2
//! NarSize: 226560
//! References: 7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1
//! ";
//! let info = NarInfo::parse(text.as_bytes(), &NarInfoLimits::default()).unwrap();
//! assert_eq!(
//!     info.fingerprint(),
//!     "1;/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1;\
//!      sha256:1yf3p87fsqig07crd9sj9wh7i9jpsa0x86a22fqbls7c81lc7ws2;226560;\
//!      /nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1"
//! );
//! // A URL that leaves the cache is refused.
//! let elsewhere = text.replace("URL: nar/", "URL: https://elsewhere.example/nar/");
//! assert!(NarInfo::parse(elsewhere.as_bytes(), &NarInfoLimits::default()).is_err());
//! ```
//!
//! The integration tests check signatures that Nix itself made over this
//! fingerprint (`nix copy --to 'file://...?secret-key=...'`).

use std::collections::BTreeSet;
use std::fmt;

use super::decompress::{Compression, DecompressError};
use super::nix32::{self, Nix32Error};
use super::store_path::{StorePath, StorePathError};

/// Bounds on what a narinfo may make us hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarInfoLimits {
    /// The most bytes of narinfo text read.
    pub max_bytes: usize,
    /// The most references one path may have.
    pub max_references: usize,
}

impl Default for NarInfoLimits {
    fn default() -> Self {
        NarInfoLimits {
            // A narinfo with 10,000 references (about 50 bytes each) fits.
            max_bytes: 1 << 20,
            max_references: 10_000,
        }
    }
}

/// A sha256 digest, as narinfos carry them.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Hash(pub [u8; 32]);

impl Sha256Hash {
    /// `sha256:<nix32>`, the form Nix writes and signs.
    pub fn to_nix32_string(&self) -> String {
        format!("sha256:{}", nix32::encode(&self.0))
    }

    /// Parses `sha256:<52 nix32 chars>` or `sha256:<64 hex digits>`.
    pub fn parse(text: &str) -> Result<Sha256Hash, HashError> {
        let shown = || text.chars().take(100).collect::<String>();
        let digest = text
            .strip_prefix("sha256:")
            .ok_or_else(|| HashError::NotSha256 { text: shown() })?;
        let bytes = match digest.len() {
            52 => nix32::decode(digest, 32).map_err(|source| HashError::Nix32 {
                text: shown(),
                source,
            })?,
            64 => hex::decode(digest).map_err(|_| HashError::Hex { text: shown() })?,
            length => {
                return Err(HashError::Length {
                    text: shown(),
                    length,
                })
            }
        };
        let mut out = [0; 32];
        out.copy_from_slice(&bytes);
        Ok(Sha256Hash(out))
    }

    /// As [`Sha256Hash::parse`], and also the SRI form (`sha256-<base64>`)
    /// newer Nix prints in `nix path-info --json`.
    pub fn parse_any(text: &str) -> Result<Sha256Hash, HashError> {
        use base64::Engine;
        let Some(encoded) = text.strip_prefix("sha256-") else {
            return Sha256Hash::parse(text);
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| HashError::Base64 {
                text: text.chars().take(100).collect(),
            })?;
        let mut out = [0; 32];
        out.copy_from_slice(&bytes);
        Ok(Sha256Hash(out))
    }
}

/// Why a narinfo hash is not a sha256 Nix can have written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("{text:?} is not a sha256 hash (no `sha256:` prefix)")]
    NotSha256 { text: String },
    #[error("{text:?}: {source}")]
    Nix32 { text: String, source: Nix32Error },
    #[error("{text:?} is not hexadecimal")]
    Hex { text: String },
    #[error("{text:?} is not the base64 of a sha256")]
    Base64 { text: String },
    #[error("{text:?} has a digest of {length} characters, not 52 (nix32) or 64 (hex)")]
    Length { text: String, length: usize },
}

impl fmt::Display for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix32_string())
    }
}

impl fmt::Debug for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A parsed, well-formed narinfo (not yet known to be trusted: see
/// [`super::signature::TrustedKeys::verify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// The compressed NAR, relative to the cache URL (checked: see the
    /// module doc).
    pub url: String,
    pub compression: Compression,
    pub file_hash: Option<Sha256Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
    /// Full store paths, sorted; may include the path itself.
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    /// `Sig` values, `<key name>:<base64>`, in order, unchecked.
    pub signatures: Vec<String>,
    pub ca: Option<String>,
}

/// Why a narinfo was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarInfoError {
    #[error("the narinfo is over {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the narinfo is not UTF-8")]
    NotUtf8,
    #[error("line {line} is not `Key: value`")]
    Line { line: usize },
    #[error("{key} is given twice")]
    Duplicate { key: &'static str },
    #[error("{key} is missing")]
    Missing { key: &'static str },
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("{key}: {source}")]
    Hash {
        key: &'static str,
        source: HashError,
    },
    #[error("{key}: {source}")]
    StorePath {
        key: &'static str,
        source: StorePathError,
    },
    #[error("References lists {count} paths, over the limit of {limit}")]
    TooManyReferences { count: usize, limit: usize },
    #[error("References lists {path} twice")]
    DuplicateReference { path: StorePath },
    #[error("Compression: {0}")]
    Compression(#[from] DecompressError),
}

impl NarInfo {
    /// Parses narinfo text under `limits`.
    pub fn parse(text: &[u8], limits: &NarInfoLimits) -> Result<NarInfo, NarInfoError> {
        if text.len() > limits.max_bytes {
            return Err(NarInfoError::TooLarge {
                limit: limits.max_bytes,
            });
        }
        let text = std::str::from_utf8(text).map_err(|_| NarInfoError::NotUtf8)?;

        let mut fields = Fields::default();
        for (number, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(": ")
                .or_else(|| line.strip_suffix(':').map(|key| (key, "")))
                .ok_or(NarInfoError::Line { line: number + 1 })?;
            fields.set(key, value)?;
        }

        let invalid = |key, reason: String| NarInfoError::Invalid { key, reason };
        let store_path = fields
            .store_path
            .ok_or(NarInfoError::Missing { key: "StorePath" })?;
        let store_path =
            store_path
                .parse::<StorePath>()
                .map_err(|source| NarInfoError::StorePath {
                    key: "StorePath",
                    source,
                })?;
        let url = fields.url.ok_or(NarInfoError::Missing { key: "URL" })?;
        check_relative_url(url).map_err(|reason| invalid("URL", reason))?;
        let compression = match fields.compression {
            // Nix's default for narinfos written before the field existed.
            None => Compression::Bzip2,
            Some(name) => name.parse()?,
        };
        let nar_hash = Sha256Hash::parse(
            fields
                .nar_hash
                .ok_or(NarInfoError::Missing { key: "NarHash" })?,
        )
        .map_err(|source| NarInfoError::Hash {
            key: "NarHash",
            source,
        })?;
        let nar_size = parse_size(
            fields
                .nar_size
                .ok_or(NarInfoError::Missing { key: "NarSize" })?,
        )
        .map_err(|reason| invalid("NarSize", reason))?;
        if nar_size == 0 {
            return Err(invalid("NarSize", "is 0".into()));
        }
        let file_hash = fields
            .file_hash
            .map(Sha256Hash::parse)
            .transpose()
            .map_err(|source| NarInfoError::Hash {
                key: "FileHash",
                source,
            })?;
        let file_size = fields
            .file_size
            .map(parse_size)
            .transpose()
            .map_err(|reason| invalid("FileSize", reason))?;

        let mut references = BTreeSet::new();
        let names = fields
            .references
            .unwrap_or("")
            .split(' ')
            .filter(|s| !s.is_empty());
        for (count, name) in names.enumerate() {
            if count >= limits.max_references {
                let count = fields
                    .references
                    .unwrap_or("")
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .count();
                return Err(NarInfoError::TooManyReferences {
                    count,
                    limit: limits.max_references,
                });
            }
            let path =
                StorePath::from_base_name(name).map_err(|source| NarInfoError::StorePath {
                    key: "References",
                    source,
                })?;
            if let Some(path) = references.replace(path) {
                return Err(NarInfoError::DuplicateReference { path });
            }
        }

        let deriver =
            match fields.deriver {
                None | Some("unknown-deriver") => None,
                Some(name) => Some(StorePath::from_base_name(name).map_err(|source| {
                    NarInfoError::StorePath {
                        key: "Deriver",
                        source,
                    }
                })?),
            };

        Ok(NarInfo {
            store_path,
            url: url.to_string(),
            compression,
            file_hash,
            file_size,
            nar_hash,
            nar_size,
            references,
            deriver,
            signatures: fields.signatures.into_iter().map(str::to_string).collect(),
            ca: fields.ca.map(str::to_string),
        })
    }

    /// What the `Sig` lines sign, exactly as Nix computes it:
    /// `1;<StorePath>;sha256:<nix32>;<NarSize>;<references, comma-separated>`.
    pub fn fingerprint(&self) -> String {
        let references: Vec<&str> = self.references.iter().map(StorePath::as_str).collect();
        format!(
            "1;{};{};{};{}",
            self.store_path,
            self.nar_hash.to_nix32_string(),
            self.nar_size,
            references.join(",")
        )
    }
}

/// The recognised keys, each at most once (but `Sig`).
#[derive(Default)]
struct Fields<'a> {
    store_path: Option<&'a str>,
    url: Option<&'a str>,
    compression: Option<&'a str>,
    file_hash: Option<&'a str>,
    file_size: Option<&'a str>,
    nar_hash: Option<&'a str>,
    nar_size: Option<&'a str>,
    references: Option<&'a str>,
    deriver: Option<&'a str>,
    ca: Option<&'a str>,
    signatures: Vec<&'a str>,
}

impl<'a> Fields<'a> {
    fn set(&mut self, key: &str, value: &'a str) -> Result<(), NarInfoError> {
        let (name, slot) = match key {
            "StorePath" => ("StorePath", &mut self.store_path),
            "URL" => ("URL", &mut self.url),
            "Compression" => ("Compression", &mut self.compression),
            "FileHash" => ("FileHash", &mut self.file_hash),
            "FileSize" => ("FileSize", &mut self.file_size),
            "NarHash" => ("NarHash", &mut self.nar_hash),
            "NarSize" => ("NarSize", &mut self.nar_size),
            "References" => ("References", &mut self.references),
            "Deriver" => ("Deriver", &mut self.deriver),
            "CA" => ("CA", &mut self.ca),
            "Sig" => {
                self.signatures.push(value);
                return Ok(());
            }
            // Unknown keys (System, ...) are ignored, as Nix does.
            _ => return Ok(()),
        };
        if slot.replace(value).is_some() {
            return Err(NarInfoError::Duplicate { key: name });
        }
        Ok(())
    }
}

/// A size: decimal digits only (no sign, no spaces), fitting in a u64.
fn parse_size(text: &str) -> Result<u64, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a decimal size"));
    }
    text.parse().map_err(|_| format!("{text:?} is too large"))
}

/// Checks that a narinfo's URL can only name a file inside the cache.
fn check_relative_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err("is empty".into());
    }
    if url.len() > 1024 {
        return Err("is over 1024 bytes".into());
    }
    if let Some(c) = url
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "._+=~-/".contains(c)))
    {
        return Err(format!(
            "{url:?} has the character {c:?}: only a relative path of plain names is allowed"
        ));
    }
    for segment in url.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(format!(
                "{url:?} is not a relative path of plain names (segment {segment:?})"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HELLO: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1";
    const GLIBC: &str = "1mfkqh9jn8rpkhwwykx1m1xbr1s5v3vd-glibc-2.37-8";

    fn sample() -> String {
        format!(
            "StorePath: {HELLO}\n\
             URL: nar/0kh8b6ggc6b5rjpd4c6c5pxd9h2sy6z7j6mksr7ngvm0ywh7brsd.nar.xz\n\
             Compression: xz\n\
             FileHash: sha256:0kh8b6ggc6b5rjpd4c6c5pxd9h2sy6z7j6mksr7ngvm0ywh7brsd\n\
             FileSize: 50264\n\
             NarHash: sha256:1yf3p87fsqig07crd9sj9wh7i9jpsa0x86a22fqbls7c81lc7ws2\n\
             NarSize: 226560\n\
             References: {GLIBC} 7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1\n\
             Deriver: ib9qm6gz6l7a1sdpzsnz3rgdp4lhk5js-hello-2.12.1.drv\n\
             System: x86_64-linux\n\
             Sig: cache.nixos.org-1:aaaa\n\
             Sig: other-1:bbbb\n"
        )
    }

    fn parse(text: &str) -> Result<NarInfo, NarInfoError> {
        NarInfo::parse(text.as_bytes(), &NarInfoLimits::default())
    }

    #[test]
    fn parses_every_field() {
        let info = parse(&sample()).unwrap();
        assert_eq!(info.store_path.as_str(), HELLO);
        assert_eq!(info.compression, Compression::Xz);
        assert_eq!(info.file_size, Some(50264));
        assert_eq!(info.nar_size, 226560);
        assert_eq!(
            info.references
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>(),
            [format!("/nix/store/{GLIBC}").as_str(), HELLO]
        );
        assert_eq!(info.deriver.unwrap().name(), "hello-2.12.1.drv");
        assert_eq!(info.signatures, ["cache.nixos.org-1:aaaa", "other-1:bbbb"]);
        assert_eq!(info.ca, None);
    }

    #[test]
    fn fingerprint_is_what_nix_signs() {
        let info = parse(&sample()).unwrap();
        assert_eq!(
            info.fingerprint(),
            format!(
                "1;{HELLO};sha256:1yf3p87fsqig07crd9sj9wh7i9jpsa0x86a22fqbls7c81lc7ws2;226560;\
                 /nix/store/{GLIBC},{HELLO}"
            )
        );
        // A hex NarHash is signed in its nix32 form.
        let hex = sample().replace(
            "NarHash: sha256:1yf3p87fsqig07crd9sj9wh7i9jpsa0x86a22fqbls7c81lc7ws2",
            &format!("NarHash: sha256:{}", hex::encode(info.nar_hash.0)),
        );
        assert_eq!(parse(&hex).unwrap().fingerprint(), info.fingerprint());
    }

    #[test]
    fn defaults_and_empty_references() {
        let text = format!(
            "StorePath: {HELLO}\nURL: nar/x.nar.bz2\n\
             NarHash: sha256:1yf3p87fsqig07crd9sj9wh7i9jpsa0x86a22fqbls7c81lc7ws2\n\
             NarSize: 1\nReferences: \nDeriver: unknown-deriver"
        );
        let info = parse(&text).unwrap();
        assert_eq!(info.compression, Compression::Bzip2);
        assert!(info.references.is_empty());
        assert_eq!(info.deriver, None);
        assert_eq!(info.file_hash, None);
        assert!(info.fingerprint().ends_with(";1;"));
    }

    #[test]
    fn refuses_missing_and_duplicate_keys() {
        for key in ["StorePath", "URL", "NarHash", "NarSize"] {
            let text: String = sample()
                .lines()
                .filter(|l| !l.starts_with(&format!("{key}:")))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(
                parse(&text),
                Err(NarInfoError::Missing {
                    key: match key {
                        "StorePath" => "StorePath",
                        "URL" => "URL",
                        "NarHash" => "NarHash",
                        _ => "NarSize",
                    }
                })
            );
        }
        let twice = format!("{}NarSize: 226560\n", sample());
        assert_eq!(
            parse(&twice),
            Err(NarInfoError::Duplicate { key: "NarSize" })
        );
        let garbage = format!("{}this is not a field\n", sample());
        assert_eq!(parse(&garbage), Err(NarInfoError::Line { line: 13 }));
    }

    #[test]
    fn refuses_bad_values() {
        let cases = [
            ("NarSize: 226560", "NarSize: -1"),
            ("NarSize: 226560", "NarSize: 0"),
            ("NarSize: 226560", "NarSize: 99999999999999999999999"),
            ("NarSize: 226560", "NarSize: +5"),
            ("FileSize: 50264", "FileSize: 5 0"),
            (
                "NarHash: sha256:1yf3p87fsqig07crd9sj9wh7i9jpsa0x86a22fqbls7c81lc7ws2",
                "NarHash: md5:1yf3p87fsqig07crd9sj9wh7i",
            ),
            (
                "NarHash: sha256:1yf3p87fsqig07crd9sj9wh7i9jpsa0x86a22fqbls7c81lc7ws2",
                "NarHash: sha256:1yf3p87fsqig07crd9sj9wh7i9jpsa0x86a22fqbls7c81lc7ws",
            ),
            (
                "NarHash: sha256:1yf3p87fsqig07crd9sj9wh7i9jpsa0x86a22fqbls7c81lc7ws2",
                "NarHash: sha256:eyf3p87fsqig07crd9sj9wh7i9jpsa0x86a22fqbls7c81lc7ws2",
            ),
            ("Compression: xz", "Compression: br"),
            (
                HELLO,
                "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello/../../etc",
            ),
            (HELLO, "/tmp/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello"),
            (GLIBC, "../1mfkqh9jn8rpkhwwykx1m1xbr1s5v3vd-glibc"),
            (GLIBC, "/nix/store/1mfkqh9jn8rpkhwwykx1m1xbr1s5v3vd-glibc"),
            (
                "Deriver: ib9qm6gz6l7a1sdpzsnz3rgdp4lhk5js-hello-2.12.1.drv",
                "Deriver: hello.drv",
            ),
        ];
        for (from, to) in cases {
            let text = sample().replace(from, to);
            assert_ne!(text, sample());
            assert!(parse(&text).is_err(), "accepted {to:?}");
        }
        let twice = sample().replace(
            &format!("References: {GLIBC}"),
            &format!("References: {GLIBC} {GLIBC}"),
        );
        assert!(matches!(
            parse(&twice),
            Err(NarInfoError::DuplicateReference { .. })
        ));
    }

    #[test]
    fn refuses_urls_outside_the_cache() {
        for url in [
            "",
            "/etc/passwd",
            "../nar/x.nar",
            "nar/../../x.nar",
            "nar/./x.nar",
            "nar//x.nar",
            "http://evil.example/x.nar",
            "//evil.example/x.nar",
            "file:///etc/passwd",
            "nar/%2e%2e/x",
            "nar\\..\\x",
            "nar/x.nar?y",
            "nar/x.nar#y",
            "nar/x y.nar",
            "nar/",
        ] {
            let text = sample().replace(
                "URL: nar/0kh8b6ggc6b5rjpd4c6c5pxd9h2sy6z7j6mksr7ngvm0ywh7brsd.nar.xz",
                &format!("URL: {url}"),
            );
            assert!(
                matches!(parse(&text), Err(NarInfoError::Invalid { key: "URL", .. })),
                "accepted {url:?}: {:?}",
                parse(&text)
            );
        }
        assert!(check_relative_url("nar/1abc.nar.zst").is_ok());
    }

    #[test]
    fn bounds_size_and_references() {
        let limits = NarInfoLimits {
            max_bytes: 100,
            max_references: 10,
        };
        assert_eq!(
            NarInfo::parse(sample().as_bytes(), &limits),
            Err(NarInfoError::TooLarge { limit: 100 })
        );
        let many: Vec<String> = (0..20).map(|i| format!("{}-p{i}", &GLIBC[..32])).collect();
        let text = sample().replace(
            &format!("References: {GLIBC} 7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1"),
            &format!("References: {}", many.join(" ")),
        );
        let limits = NarInfoLimits {
            max_references: 10,
            ..NarInfoLimits::default()
        };
        assert_eq!(
            NarInfo::parse(text.as_bytes(), &limits),
            Err(NarInfoError::TooManyReferences {
                count: 20,
                limit: 10
            })
        );
    }

    #[test]
    fn refuses_non_utf8() {
        let mut bytes = sample().into_bytes();
        bytes.push(0xff);
        assert_eq!(
            NarInfo::parse(&bytes, &NarInfoLimits::default()),
            Err(NarInfoError::NotUtf8)
        );
    }

    proptest! {
        /// Whatever the text, parsing returns (never panics), and whatever
        /// it accepts has a URL that stays in the cache.
        #[test]
        fn arbitrary_text_never_panics(text in "((StorePath|URL|NarHash|NarSize|References|Sig|[A-Za-z]{1,8}): [ -~]{0,80}\n){0,12}") {
            if let Ok(info) = parse(&text) {
                prop_assert!(check_relative_url(&info.url).is_ok());
            }
        }

        #[test]
        fn fields_survive_a_rewrite(
            size in 1u64..u64::MAX,
            refs in proptest::collection::btree_set("[0-9a-df-np-sv-z]{32}-[a-z]{1,8}", 0..8),
        ) {
            let text = format!(
                "StorePath: {HELLO}\nURL: nar/a.nar\nCompression: none\n\
                 NarHash: sha256:1yf3p87fsqig07crd9sj9wh7i9jpsa0x86a22fqbls7c81lc7ws2\n\
                 NarSize: {size}\nReferences: {}\n",
                refs.iter().cloned().collect::<Vec<_>>().join(" ")
            );
            let info = parse(&text).unwrap();
            prop_assert_eq!(info.nar_size, size);
            let got: Vec<String> = info.references.iter().map(|p| p.base_name().to_string()).collect();
            prop_assert_eq!(got, refs.into_iter().collect::<Vec<_>>());
        }
    }
}
