//! Popularity data: how widely each package is used, so that layering can
//! keep widely shared paths in layers of their own.
//!
//! The format is Nixery's: one JSON object mapping a package name to a
//! count, e.g. `{"glibc-2.40-66": 31807, "openssl-3.0.15": 2840}`. The count
//! is the number of store paths of a package set that refer to a path of that
//! name directly. Nixery's `popcount` tool derives it from the `References:`
//! lines of every narinfo of a channel; [`Popularity::compute`] derives it
//! from closure graphs, and [`Popularity::to_json`] writes it in the same
//! format. The service loads such a file (from `NIX_POPULARITY_URL`) at start;
//! without one, [`Popularity::none`] weighs every path the same.
//!
//! A store path maps to a name by dropping its directory and the 32-character
//! hash, as [`package_name`] documents: `/nix/store/<hash>-openssl-3.0.15`
//! has the name `openssl-3.0.15`. Names keep their version, so popularity
//! data is only useful for a package set close to the one it was made from.
//!
//! This module does no I/O: the caller reads the file or URL.
//!
//! ```
//! use nixery::builder::popularity::Popularity;
//! let popularity = Popularity::parse(br#"{"openssl-3.0.15": 2840}"#).unwrap();
//! assert_eq!(popularity.weight("/nix/store/q8m6bflzqnjb7ch3pcwyyrc9wlpbvw5k-openssl-3.0.15"), 2840);
//! assert_eq!(popularity.weight("/nix/store/3d2ckvmhr3bj6h0ghd0jvbd1kh5ifg4a-hello-2.12.1"), 1);
//! assert_eq!(Popularity::none().weight("/nix/store/q8m6bflzqnjb7ch3pcwyyrc9wlpbvw5k-openssl-3.0.15"), 1);
//! ```

use std::collections::{BTreeMap, BTreeSet};

use super::nix::Closure;

/// Length of the hash part of a store path's base name.
const HASH_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum PopularityError {
    /// The data is not a JSON object of names to non-negative integers.
    #[error(
        "popularity data ({len} bytes) is not a JSON object of package name to count: {source}"
    )]
    Format {
        len: usize,
        source: serde_json::Error,
    },
}

/// Reference counts by package name (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Popularity {
    counts: BTreeMap<String, u64>,
}

impl Popularity {
    /// No data: every path weighs 1.
    pub fn none() -> Popularity {
        Popularity::default()
    }

    /// Popularity from counts by package name.
    pub fn from_counts(counts: BTreeMap<String, u64>) -> Popularity {
        Popularity { counts }
    }

    /// Reads Nixery's format: a JSON object of package name to count.
    pub fn parse(json: &[u8]) -> Result<Popularity, PopularityError> {
        serde_json::from_slice(json)
            .map(Popularity::from_counts)
            .map_err(|source| PopularityError::Format {
                len: json.len(),
                source,
            })
    }

    /// Computes popularity from closure graphs (for example one per package
    /// of a package set): for each package name, how many distinct store
    /// paths refer to a path of that name. A path that occurs in several
    /// closures is counted once; self-references do not count, references
    /// do not need to be inside the closure that lists them.
    pub fn compute<'a>(closures: impl IntoIterator<Item = &'a Closure>) -> Popularity {
        let mut referrers: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for closure in closures {
            for (path, info) in closure {
                let refs = referrers.entry(path.as_str()).or_default();
                refs.extend(
                    info.references
                        .iter()
                        .map(String::as_str)
                        .filter(|r| *r != path),
                );
            }
        }
        let mut counts = BTreeMap::new();
        for reference in referrers.values().flatten() {
            *counts
                .entry(package_name(reference).to_string())
                .or_insert(0) += 1;
        }
        Popularity { counts }
    }

    /// Serialises to Nixery's format, keys sorted, so equal data gives equal
    /// bytes.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.counts).expect("a map of strings to integers always serialises")
    }

    /// How popular a store path is: the count of its [`package_name`], and 1
    /// for names without data (or with a count of 0), so every path weighs
    /// at least 1.
    pub fn weight(&self, store_path: &str) -> u64 {
        self.counts
            .get(package_name(store_path))
            .copied()
            .unwrap_or(0)
            .max(1)
    }

    /// Number of package names with data.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// The package name of a store path, the key of popularity data: the base
/// name (after the last `/`) without its leading hash, where the hash is 32
/// characters of `0-9a-z` followed by `-`. A base name without such a hash
/// is returned whole.
///
/// ```
/// use nixery::builder::popularity::package_name;
/// assert_eq!(package_name("/nix/store/q8m6bflzqnjb7ch3pcwyyrc9wlpbvw5k-openssl-3.0.15"), "openssl-3.0.15");
/// assert_eq!(package_name("q8m6bflzqnjb7ch3pcwyyrc9wlpbvw5k-openssl-3.0.15"), "openssl-3.0.15");
/// assert_eq!(package_name("openssl-3.0.15"), "openssl-3.0.15");
/// ```
pub fn package_name(store_path: &str) -> &str {
    let base = store_path.rsplit('/').next().unwrap_or(store_path);
    let bytes = base.as_bytes();
    let hashed = bytes.len() > HASH_LEN
        && bytes[HASH_LEN] == b'-'
        && bytes[..HASH_LEN]
            .iter()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
    if hashed {
        &base[HASH_LEN + 1..]
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::nix::PathInfo;
    use proptest::prelude::*;

    const H1: &str = "00000000000000000000000000000001";
    const H2: &str = "00000000000000000000000000000002";
    const H3: &str = "00000000000000000000000000000003";

    fn path(hash: &str, name: &str) -> String {
        format!("/nix/store/{hash}-{name}")
    }

    use crate::builder::nix::test_closure as closure;

    #[test]
    fn names_drop_directory_and_hash_only() {
        assert_eq!(package_name(&path(H1, "glibc-2.40-66")), "glibc-2.40-66");
        assert_eq!(
            package_name(&path(H1, "glibc-2.40-66-bin")),
            "glibc-2.40-66-bin"
        );
        // Not a hash: too short, wrong characters, no dash.
        assert_eq!(package_name("/nix/store/abc-foo"), "abc-foo");
        assert_eq!(
            package_name("/nix/store/0000000000000000000000000000000A-foo"),
            "0000000000000000000000000000000A-foo"
        );
        assert_eq!(package_name(&format!("/nix/store/{H1}")), H1);
        assert_eq!(package_name(&format!("/nix/store/{H1}-")), "");
        assert_eq!(package_name(""), "");
    }

    #[test]
    fn parse_reads_nixerys_format() {
        let popularity =
            Popularity::parse(br#"{"glibc-2.40-66": 31807, "zlib-1.3.1": 0}"#).unwrap();
        assert_eq!(popularity.len(), 2);
        assert_eq!(popularity.weight(&path(H1, "glibc-2.40-66")), 31807);
        assert_eq!(
            popularity.weight(&path(H2, "glibc-2.40-66")),
            31807,
            "any hash, same name"
        );
        assert_eq!(popularity.weight(&path(H1, "zlib-1.3.1")), 1, "0 weighs 1");
        assert_eq!(popularity.weight(&path(H1, "unknown")), 1);
        assert!(Popularity::parse(b"{}").unwrap().is_empty());
    }

    #[test]
    fn parse_rejects_other_shapes_with_context() {
        for bad in [
            &b"[1, 2]"[..],
            br#"{"a": -1}"#,
            br#"{"a": "1"}"#,
            br#"{"a": 1.5}"#,
            b"{",
            b"",
        ] {
            let error = Popularity::parse(bad).unwrap_err();
            let message = error.to_string();
            assert!(
                message.contains("not a JSON object of package name to count"),
                "{message}"
            );
            assert!(
                message.contains(&format!("({} bytes)", bad.len())),
                "{message}"
            );
        }
    }

    #[test]
    fn none_weighs_everything_the_same() {
        let none = Popularity::none();
        assert!(none.is_empty());
        assert_eq!(none.weight(&path(H1, "glibc")), 1);
        assert_eq!(none.weight("anything"), 1);
    }

    #[test]
    fn compute_counts_distinct_referrers_by_name() {
        let glibc = path(H1, "glibc-2.40");
        let glibc_other = path(H2, "glibc-2.40");
        let bash = path(H1, "bash-5.2");
        let curl = path(H1, "curl-8.9");
        let jq = path(H3, "jq-1.7");
        // bash is in both closures: its references count once.
        let a = closure(&[
            (&bash, &[&glibc, &bash]),
            (&glibc, &[&glibc]),
            (&curl, &[&glibc, &bash]),
        ]);
        let b = closure(&[(&bash, &[&glibc]), (&glibc, &[]), (&jq, &[&glibc_other])]);
        let popularity = Popularity::compute([&a, &b]);
        assert_eq!(popularity.to_json(), r#"{"bash-5.2":1,"glibc-2.40":3}"#);
        assert_eq!(popularity.weight(&glibc), 3);
        assert_eq!(Popularity::compute([]), Popularity::none());
    }

    #[test]
    fn to_json_sorts_keys() {
        let counts: BTreeMap<String, u64> = [("zz", 1), ("aa", 2), ("mm", 3)]
            .map(|(k, v)| (k.to_string(), v))
            .into();
        assert_eq!(
            Popularity::from_counts(counts).to_json(),
            r#"{"aa":2,"mm":3,"zz":1}"#
        );
    }

    proptest! {
        #[test]
        fn json_round_trips(counts in proptest::collection::btree_map(".{0,12}", any::<u64>(), 0..20)) {
            let popularity = Popularity::from_counts(counts);
            let json = popularity.to_json();
            let back = Popularity::parse(json.as_bytes()).unwrap();
            prop_assert_eq!(&back, &popularity);
            prop_assert_eq!(back.to_json(), json);
        }

        #[test]
        fn compute_ignores_closure_order(
            edges in proptest::collection::vec((0usize..12, 0usize..12), 0..40),
        ) {
            let name = |i: usize| path(&format!("{i:032}"), &format!("p{}", i % 5));
            let mut one = Closure::new();
            for (from, to) in &edges {
                one.entry(name(*from)).or_insert(PathInfo { nar_size: 1, nar_hash: String::new(), references: vec![] }).references.push(name(*to));
            }
            let mut reversed = one.clone();
            for info in reversed.values_mut() {
                info.references.reverse();
            }
            let (first, second): (Closure, Closure) = one.clone().into_iter().partition(|(p, _)| p.as_bytes()[42] % 2 == 0);
            let whole = Popularity::compute([&one]);
            prop_assert_eq!(&Popularity::compute([&reversed]), &whole);
            prop_assert_eq!(&Popularity::compute([&second, &first, &one]), &whole);
        }
    }
}
