//! Grouping a closure into layers.
//!
//! Every store path of the closure lands in exactly one layer, and there are
//! at most `budget` layers. The rule, for now:
//!
//! * a closure that fits the budget gets one layer per store path (the best
//!   reuse between images: a path's layer is the same in every image);
//! * otherwise the `budget - 1` largest paths (NAR size, ties broken by path)
//!   get a layer each and the rest share one.
//!
//! Layers are ordered by their smallest store path. Nothing depends on the
//! order of the input, so equal closures give equal layers in equal order.
//! This module does no I/O.
//!
//! ```
//! use nixery::layers::group;
//! use nixery::nix::{Closure, PathInfo};
//! let mut closure = Closure::new();
//! for (p, size) in [("/nix/store/a", 1), ("/nix/store/b", 9), ("/nix/store/c", 5)] {
//!     closure.insert(p.to_string(), PathInfo { nar_size: size, references: vec![] });
//! }
//! let layers = group(&closure, 2);
//! assert_eq!(layers[0].paths, ["/nix/store/a", "/nix/store/c"]);
//! assert_eq!(layers[1].paths, ["/nix/store/b"]);
//! ```

use sha2::{Digest, Sha256};

use crate::nix::Closure;

/// Store paths packed together as one image layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Sorted, non-empty.
    pub paths: Vec<String>,
}

impl Layer {
    /// The layer's storage key: what its bytes depend on (its paths and how
    /// it is compressed), hashed. Equal keys mean reusable layers.
    pub fn key(&self, compression: &str) -> String {
        let mut hash = Sha256::new();
        hash.update(b"nixery-layer-v1\0");
        hash.update(compression.as_bytes());
        for path in &self.paths {
            hash.update(b"\0");
            hash.update(path.as_bytes());
        }
        hex::encode(hash.finalize())
    }
}

/// Groups a closure into at most `budget` layers (`budget` >= 1).
pub fn group(closure: &Closure, budget: usize) -> Vec<Layer> {
    let budget = budget.max(1);
    let mut layers: Vec<Layer> = if closure.len() <= budget {
        closure.keys().map(|p| Layer { paths: vec![p.clone()] }).collect()
    } else {
        let mut by_size: Vec<(&String, u64)> = closure.iter().map(|(p, i)| (p, i.nar_size)).collect();
        by_size.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let (alone, rest) = by_size.split_at(budget - 1);
        let mut rest: Vec<String> = rest.iter().map(|(p, _)| (*p).clone()).collect();
        rest.sort();
        alone
            .iter()
            .map(|(p, _)| Layer { paths: vec![(*p).clone()] })
            .chain(std::iter::once(Layer { paths: rest }))
            .collect()
    };
    layers.sort_by(|a, b| a.paths[0].cmp(&b.paths[0]));
    layers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::PathInfo;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn closure_of(sizes: &[(String, u64)]) -> Closure {
        sizes.iter().map(|(p, s)| (p.clone(), PathInfo { nar_size: *s, references: vec![] })).collect()
    }

    proptest! {
        #[test]
        fn every_path_in_exactly_one_layer_within_budget(
            sizes in proptest::collection::btree_map("/nix/store/[a-z]{1,6}", 0u64..1000, 1..60),
            budget in 1usize..20,
        ) {
            let closure = closure_of(&sizes.into_iter().collect::<Vec<_>>());
            let layers = group(&closure, budget);
            prop_assert!(layers.len() <= budget);
            let mut seen = BTreeSet::new();
            for layer in &layers {
                prop_assert!(!layer.paths.is_empty());
                prop_assert!(layer.paths.windows(2).all(|w| w[0] < w[1]));
                for p in &layer.paths {
                    prop_assert!(seen.insert(p.clone()), "{} twice", p);
                }
            }
            prop_assert_eq!(seen.len(), closure.len());
            // The documented order: by smallest path.
            prop_assert!(layers.windows(2).all(|w| w[0].paths[0] < w[1].paths[0]));
        }

        #[test]
        fn input_order_changes_nothing(
            mut sizes in proptest::collection::vec(("/nix/store/[a-z]{1,6}", 0u64..5), 1..40),
            budget in 1usize..10,
        ) {
            sizes.sort();
            sizes.dedup_by(|a, b| a.0 == b.0);
            let forward = group(&closure_of(&sizes), budget);
            sizes.reverse();
            let backward = group(&closure_of(&sizes), budget);
            prop_assert_eq!(forward, backward);
        }
    }

    #[test]
    fn keys_depend_on_paths_and_compression() {
        let a = Layer { paths: vec!["/nix/store/a".into()] };
        let b = Layer { paths: vec!["/nix/store/b".into()] };
        assert_ne!(a.key("gzip-6"), b.key("gzip-6"));
        assert_ne!(a.key("gzip-6"), a.key("zstd"));
        assert_eq!(a.key("gzip-6"), a.clone().key("gzip-6"));
    }
}
