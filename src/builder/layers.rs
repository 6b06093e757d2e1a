//! Grouping a closure into layers, the way Nixery does it.
//!
//! The aim is reuse: a path that many images share should land in a layer
//! that is the same in all of them. The algorithm (Nixery's, from its
//! `layers` package):
//!
//! 1. **Graph.** Every store path of the closure is a node with an edge to
//!    each path it refers to. A synthetic image root gets an edge to
//!    * each requested package (`roots`),
//!    * each *heavy* path, whose closure (its own NAR size plus that of
//!      everything it refers to, transitively) exceeds
//!      [`HEAVY_CLOSURE_BYTES`],
//!    * each *popular* path, whose [`Popularity::weight`] is at least
//!      [`POPULAR_WEIGHT`],
//!    * each path no other path of the closure refers to (in a closure made
//!      from the requested packages these are requested anyway), and, should
//!      references form a cycle that nothing else reaches, the smallest path
//!      not yet reached, repeatedly; so every path hangs under the root.
//! 2. **Candidates.** The dominator tree of that graph from the image root
//!    (computed by `petgraph`): each child of the root, with everything it
//!    dominates, is a layer candidate. A path that several packages need is
//!    dominated by the root alone, so it becomes a candidate of its own.
//! 3. **Rating.** A candidate's rating is the popularity weight of its top
//!    path (the child of the root) times the total NAR size of its paths.
//! 4. **Budget.** If there are more candidates than `budget`, the
//!    `budget - 1` highest-rated candidates stay layers of their own and all
//!    the others are merged into one last layer. (Nixery merges the two
//!    lowest-rated candidates and keeps merging the result with the next
//!    lowest until the budget holds, which comes to the same.)
//!
//! **Order.** Layers come in descending rating, ties broken by the top path
//! (the smaller path first); the merged layer, if any, comes last. Popular
//! and big layers, the likeliest to be shared, thus come first. The paths of
//! a layer are sorted.
//!
//! **Determinism.** Only the closure's content counts: the order of `roots`
//! or of a path's references, duplicate roots and whatever ran before change
//! nothing; equal inputs give equal layers in equal order.
//!
//! **Edge cases.** An empty closure gives no layers; a `budget` of 0 counts
//! as 1. Roots and references that are not paths of the closure are ignored,
//! as are self-references. Cycles cannot occur in Nix closures, but they do
//! no harm: a cycle's paths are ordinary nodes of the graph.
//!
//! The budget for package layers comes from `NIXERY_LAYER_BUDGET` (see
//! `config`); the customisation layer is extra. This module does no I/O.
//!
//! ```
//! use nixery::builder::layers::group;
//! use nixery::builder::nix::{Closure, PathInfo};
//! use nixery::builder::popularity::Popularity;
//! let mut closure = Closure::new();
//! for (p, size) in [("/nix/store/a", 1), ("/nix/store/b", 9), ("/nix/store/c", 5)] {
//!     let info = PathInfo { nar_size: size, nar_hash: String::new(), references: vec![] };
//!     closure.insert(p.to_string(), info);
//! }
//! let roots: Vec<String> = closure.keys().cloned().collect();
//! let layers = group(&closure, &roots, &Popularity::none(), 2);
//! // Ratings: b 9, c 5, a 1. The best-rated stays alone, the rest is merged.
//! assert_eq!(layers[0].paths, ["/nix/store/b"]);
//! assert_eq!(layers[1].paths, ["/nix/store/a", "/nix/store/c"]);
//! ```

use petgraph::algo::{dominators, tarjan_scc};
use petgraph::graph::{DiGraph, NodeIndex};
use sha2::{Digest, Sha256};

use super::nix::Closure;
use super::popularity::Popularity;
use crate::storage::keys::LayerKey;

/// A path whose closure is larger than this (in bytes of NAR) gets a layer
/// candidate of its own. Nixery's threshold.
pub const HEAVY_CLOSURE_BYTES: u64 = 100_000_000;

/// A path with at least this popularity weight gets a layer candidate of its
/// own. Nixery's threshold.
pub const POPULAR_WEIGHT: u64 = 100;

/// Store paths packed together as one image layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Sorted, non-empty.
    pub paths: Vec<String>,
}

impl Layer {
    /// The layer's storage key: what its bytes depend on (its paths, what
    /// they hold, and how it is compressed), hashed. Equal keys mean
    /// reusable layers. Each path counts with its NarHash (from
    /// `closure`), so a layer packed from a Nix store is reused for an
    /// image assembled from a binary cache, and the other way round, only
    /// where the bytes are the same: never a local build that differs
    /// from what the cache signed.
    pub fn key(&self, compression: &str, closure: &Closure) -> LayerKey {
        let mut hash = Sha256::new();
        // v3: entries normalised as a NAR has them (see `pack`), and
        // each path's NarHash.
        hash.update(b"nixery-layer-v3\0");
        hash.update(compression.as_bytes());
        for path in &self.paths {
            hash.update(b"\0");
            hash.update(path.as_bytes());
            hash.update(b"\0");
            let nar_hash = closure.get(path).map_or("", |info| info.nar_hash.as_str());
            hash.update(nar_hash.as_bytes());
        }
        LayerKey::parse(&hex::encode(hash.finalize())).expect("a sha256 is a layer key")
    }
}

/// A dominator subtree under the image root.
struct Candidate {
    /// Index of the subtree's top path.
    top: usize,
    /// Indices of its paths, sorted.
    members: Vec<usize>,
    rating: u128,
}

/// Groups a closure into at most `budget` layers; `roots` are the store
/// paths of the requested packages. See the module docs for the rules.
pub fn group(
    closure: &Closure,
    roots: &[String],
    popularity: &Popularity,
    budget: usize,
) -> Vec<Layer> {
    let budget = budget.max(1);
    // Nodes are numbered in path order, so comparing indices compares paths.
    let paths: Vec<&String> = closure.keys().collect();
    let n = paths.len();
    if n == 0 {
        return Vec::new();
    }
    let index_of = |path: &str| paths.binary_search_by(|p| p.as_str().cmp(path)).ok();
    let references: Vec<Vec<usize>> = closure
        .values()
        .enumerate()
        .map(|(i, info)| {
            let mut refs: Vec<usize> = info
                .references
                .iter()
                .filter_map(|r| index_of(r))
                .filter(|&j| j != i)
                .collect();
            refs.sort_unstable();
            refs.dedup();
            refs
        })
        .collect();
    let sizes: Vec<u64> = closure.values().map(|info| info.nar_size).collect();
    let weights: Vec<u64> = paths.iter().map(|p| popularity.weight(p)).collect();

    let mut graph: DiGraph<(), (), u32> =
        DiGraph::with_capacity(n + 1, n + references.iter().map(Vec::len).sum::<usize>());
    for _ in 0..n {
        graph.add_node(());
    }
    for (i, refs) in references.iter().enumerate() {
        for &j in refs {
            graph.add_edge(NodeIndex::new(i), NodeIndex::new(j), ());
        }
    }
    let closure_sizes = closure_sizes(&graph, &sizes);

    let mut attached = vec![false; n];
    for root in roots {
        if let Some(i) = index_of(root) {
            attached[i] = true;
        }
    }
    let mut referred = vec![false; n];
    for &j in references.iter().flatten() {
        referred[j] = true;
    }
    for i in 0..n {
        if !referred[i] || closure_sizes[i] > HEAVY_CLOSURE_BYTES || weights[i] >= POPULAR_WEIGHT {
            attached[i] = true;
        }
    }
    // Only a cycle can still be out of reach: attach the smallest path not
    // reached, until all are.
    let mut reached = vec![false; n];
    let mut stack: Vec<usize> = (0..n).filter(|&i| attached[i]).collect();
    let mut unreached_from = 0;
    loop {
        while let Some(i) = stack.pop() {
            if !reached[i] {
                reached[i] = true;
                stack.extend(references[i].iter().copied().filter(|&j| !reached[j]));
            }
        }
        match (unreached_from..n).find(|&i| !reached[i]) {
            Some(i) => {
                attached[i] = true;
                stack.push(i);
                unreached_from = i + 1;
            }
            None => break,
        }
    }

    let root = graph.add_node(());
    for i in (0..n).filter(|&i| attached[i]) {
        graph.add_edge(root, NodeIndex::new(i), ());
    }
    let dominators = dominators::simple_fast(&graph, root);
    let mut dominated: Vec<Vec<usize>> = vec![Vec::new(); n + 1];
    for i in 0..n {
        let parent = dominators
            .immediate_dominator(NodeIndex::new(i))
            .expect("every path hangs under the root");
        dominated[parent.index()].push(i);
    }

    let mut candidates: Vec<Candidate> = dominated[root.index()]
        .iter()
        .map(|&top| {
            let mut members = Vec::new();
            let mut stack = vec![top];
            while let Some(i) = stack.pop() {
                members.push(i);
                stack.extend_from_slice(&dominated[i]);
            }
            members.sort_unstable();
            let size: u128 = members.iter().map(|&i| u128::from(sizes[i])).sum();
            Candidate {
                top,
                members,
                rating: u128::from(weights[top]).saturating_mul(size),
            }
        })
        .collect();
    candidates.sort_by(|a, b| b.rating.cmp(&a.rating).then(a.top.cmp(&b.top)));

    let mut groups: Vec<Vec<usize>> = Vec::with_capacity(candidates.len().min(budget));
    if candidates.len() > budget {
        let rest = candidates.split_off(budget - 1);
        groups.extend(candidates.into_iter().map(|c| c.members));
        let mut merged: Vec<usize> = rest.into_iter().flat_map(|c| c.members).collect();
        merged.sort_unstable();
        groups.push(merged);
    } else {
        groups.extend(candidates.into_iter().map(|c| c.members));
    }
    groups
        .into_iter()
        .map(|members| Layer {
            paths: members.into_iter().map(|i| paths[i].clone()).collect(),
        })
        .collect()
}

/// The closure size of each path node of `graph` (all its nodes): the sum
/// of `sizes` over every node it reaches, itself included. Works on the
/// condensation, so cycles are fine; a bit set per strongly connected
/// component keeps shared dependencies from being counted twice.
fn closure_sizes(graph: &DiGraph<(), (), u32>, sizes: &[u64]) -> Vec<u64> {
    let n = sizes.len();
    let words = n.div_ceil(64);
    let mut component = vec![usize::MAX; n];
    let mut reachable: Vec<Vec<u64>> = Vec::new();
    let mut totals = vec![0; n];
    // Tarjan yields components in reverse topological order: everything a
    // component refers to outside itself comes before it.
    for (c, members) in tarjan_scc(graph).into_iter().enumerate() {
        for m in &members {
            component[m.index()] = c;
        }
        let mut set = vec![0u64; words];
        for m in &members {
            set[m.index() / 64] |= 1 << (m.index() % 64);
            for next in graph.neighbors(*m) {
                let other = component[next.index()];
                if other != c {
                    for (word, bits) in set.iter_mut().zip(&reachable[other]) {
                        *word |= bits;
                    }
                }
            }
        }
        let mut total: u64 = 0;
        for (w, &word) in set.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                total = total.saturating_add(sizes[w * 64 + bits.trailing_zeros() as usize]);
                bits &= bits - 1;
            }
        }
        for m in &members {
            totals[m.index()] = total;
        }
        reachable.push(set);
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::nix::PathInfo;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    const MB: u64 = 1_000_000;

    fn p(name: &str) -> String {
        format!("/nix/store/{:0>32}-{name}", name.len())
    }

    /// A closure from (name, NAR size, references by name).
    fn closure_of(entries: &[(&str, u64, &[&str])]) -> Closure {
        entries
            .iter()
            .map(|(name, size, refs)| {
                (
                    p(name),
                    PathInfo {
                        nar_size: *size,
                        nar_hash: String::new(),
                        references: refs.iter().map(|r| p(r)).collect(),
                    },
                )
            })
            .collect()
    }

    fn names(layers: &[Layer]) -> Vec<Vec<String>> {
        layers
            .iter()
            .map(|l| l.paths.iter().map(|p| p[44..].to_string()).collect())
            .collect()
    }

    fn popular(entries: &[(&str, u64)]) -> Popularity {
        Popularity::from_counts(entries.iter().map(|(n, c)| (n.to_string(), *c)).collect())
    }

    /// Every path in exactly one layer, at most `budget` layers, each sorted
    /// and non-empty.
    fn check_partition(
        closure: &Closure,
        layers: &[Layer],
        budget: usize,
    ) -> Result<(), TestCaseError> {
        prop_assert!(layers.len() <= budget.max(1));
        let mut seen = BTreeSet::new();
        for layer in layers {
            prop_assert!(!layer.paths.is_empty());
            prop_assert!(layer.paths.windows(2).all(|w| w[0] < w[1]));
            for path in &layer.paths {
                prop_assert!(closure.contains_key(path), "{} is not in the closure", path);
                prop_assert!(seen.insert(path.clone()), "{} twice", path);
            }
        }
        prop_assert_eq!(seen.len(), closure.len());
        Ok(())
    }

    /// The documented order, checked on a DAG: every layer that is a single
    /// candidate (all but a possibly merged last one) has one top path (no
    /// other path of the layer refers to it), and these layers come in
    /// descending rating, then ascending top path.
    fn check_order(
        closure: &Closure,
        layers: &[Layer],
        popularity: &Popularity,
        budget: usize,
    ) -> Result<(), TestCaseError> {
        let candidates = if layers.len() == budget.max(1) {
            layers.len().saturating_sub(1)
        } else {
            layers.len()
        };
        let mut keys = Vec::new();
        for layer in &layers[..candidates] {
            let inside: &BTreeSet<&String> = &layer.paths.iter().collect();
            let referred: BTreeSet<&String> = layer
                .paths
                .iter()
                .flat_map(|path| {
                    closure[path]
                        .references
                        .iter()
                        .filter(move |r| *r != path && inside.contains(r))
                })
                .collect();
            let tops: Vec<&String> = layer
                .paths
                .iter()
                .filter(|path| !referred.contains(path))
                .collect();
            prop_assert_eq!(tops.len(), 1, "a candidate has one top: {:?}", layer);
            let size: u128 = layer
                .paths
                .iter()
                .map(|path| u128::from(closure[path].nar_size))
                .sum();
            let rating = u128::from(popularity.weight(tops[0])) * size;
            keys.push((std::cmp::Reverse(rating), tops[0].clone()));
        }
        prop_assert!(keys.windows(2).all(|w| w[0] < w[1]), "order: {:?}", keys);
        Ok(())
    }

    /// A generated closure: `n` paths whose name order is unrelated to the
    /// edge direction; names repeat (`n0`..`n5`) so popularity is shared;
    /// sizes are tiny (for ties) or large (for heavy closures).
    #[derive(Debug, Clone)]
    struct Generated {
        closure: Closure,
        roots: Vec<String>,
        popularity: Popularity,
    }

    fn generated(acyclic: bool) -> impl Strategy<Value = Generated> {
        (1usize..48)
            .prop_flat_map(move |n| {
                (
                    Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
                    proptest::collection::vec((0usize..6, prop_oneof![0u64..3, 0u64..40 * MB]), n),
                    proptest::collection::vec((0..n, 0..n), 0..3 * n),
                    proptest::collection::vec(0..n + 1, 0..5),
                    proptest::collection::vec(0u64..200, 6),
                )
            })
            .prop_map(move |(order, nodes, edges, roots, counts)| {
                let path = |i: usize| format!("/nix/store/{:032}-n{}", order[i], nodes[i].0);
                let mut closure: Closure = (0..nodes.len())
                    .map(|i| {
                        (
                            path(i),
                            PathInfo {
                                nar_size: nodes[i].1,
                                nar_hash: String::new(),
                                references: vec![],
                            },
                        )
                    })
                    .collect();
                for (a, b) in edges {
                    let (from, to) = if acyclic {
                        (a.min(b), a.max(b))
                    } else {
                        (a, b)
                    };
                    if !acyclic || from != to {
                        closure
                            .get_mut(&path(from))
                            .expect("generated")
                            .references
                            .push(path(to));
                    }
                }
                // Index n is a root outside the closure.
                let roots = roots
                    .into_iter()
                    .map(|i| {
                        if i < nodes.len() {
                            path(i)
                        } else {
                            "/nix/store/missing".into()
                        }
                    })
                    .collect();
                let popularity =
                    Popularity::from_counts((0..6).map(|k| (format!("n{k}"), counts[k])).collect());
                Generated {
                    closure,
                    roots,
                    popularity,
                }
            })
    }

    /// The same input in another order: references and roots permuted by
    /// `seed`, roots repeated.
    fn shuffled(g: &Generated, seed: u64) -> (Closure, Vec<String>) {
        let mut state = seed | 1;
        let mut shuffle = |items: &mut Vec<String>| {
            for i in (1..items.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                items.swap(i, (state % (i as u64 + 1)) as usize);
            }
        };
        let mut closure = g.closure.clone();
        for info in closure.values_mut() {
            shuffle(&mut info.references);
        }
        let mut roots: Vec<String> = g.roots.iter().chain(&g.roots).cloned().collect();
        shuffle(&mut roots);
        (closure, roots)
    }

    proptest! {
        #[test]
        fn dag_layers_partition_fit_and_follow_the_order(g in generated(true), budget in 0usize..12) {
            let layers = group(&g.closure, &g.roots, &g.popularity, budget);
            check_partition(&g.closure, &layers, budget)?;
            check_order(&g.closure, &layers, &g.popularity, budget)?;
        }

        #[test]
        fn cyclic_graphs_still_partition(g in generated(false), budget in 0usize..12) {
            let layers = group(&g.closure, &g.roots, &g.popularity, budget);
            check_partition(&g.closure, &layers, budget)?;
        }

        #[test]
        fn input_order_changes_nothing(g in generated(true), seed in any::<u64>(), budget in 1usize..12) {
            let (closure, roots) = shuffled(&g, seed);
            prop_assert_eq!(group(&closure, &roots, &g.popularity, budget), group(&g.closure, &g.roots, &g.popularity, budget));
        }

        #[test]
        fn input_order_changes_nothing_with_cycles(g in generated(false), seed in any::<u64>(), budget in 1usize..12) {
            let (closure, roots) = shuffled(&g, seed);
            prop_assert_eq!(group(&closure, &roots, &g.popularity, budget), group(&g.closure, &g.roots, &g.popularity, budget));
        }

        #[test]
        fn a_larger_budget_only_splits(g in generated(true), budget in 1usize..12) {
            // With one more layer allowed, the kept layers stay and the
            // merged one gives up its best candidate: layers are only split.
            let small = group(&g.closure, &g.roots, &g.popularity, budget);
            let large = group(&g.closure, &g.roots, &g.popularity, budget + 1);
            for layer in &large {
                let whole = small.iter().find(|s| s.paths.contains(&layer.paths[0])).expect("partition");
                prop_assert!(layer.paths.iter().all(|p| whole.paths.contains(p)));
            }
            prop_assert!(small.iter().take(budget - 1).all(|l| large.contains(l)) || small.len() < budget);
        }
    }

    /// Nixery's documented example: requested A, B, C, D; E is shared (and
    /// popular), D owns F, G is heavy and under F.
    fn nixery_example() -> (Closure, Vec<String>, Popularity) {
        let closure = closure_of(&[
            ("a", 1, &["e"]),
            ("b", 2, &["e"]),
            ("c", 3, &["e", "d"]),
            ("d", 4, &["f"]),
            ("e", 10, &[]),
            ("f", 5, &["g"]),
            ("g", 150 * MB, &[]),
        ]);
        let roots = ["a", "b", "c", "d"].map(p).to_vec();
        (closure, roots, popular(&[("e", 1000)]))
    }

    #[test]
    fn nixery_example_by_budget() {
        let (closure, roots, popularity) = nixery_example();
        let layers = |budget| names(&group(&closure, &roots, &popularity, budget));
        // Ratings: g 150M (heavy), e 10 * 1000, d+f 9, c 3, b 2, a 1.
        // f, d and c are heavy too (g is in their closures).
        assert_eq!(layers(1), [vec!["a", "b", "c", "d", "e", "f", "g"]]);
        assert_eq!(layers(2), [vec!["g"], vec!["a", "b", "c", "d", "e", "f"]]);
        assert_eq!(
            layers(3),
            [vec!["g"], vec!["e"], vec!["a", "b", "c", "d", "f"]]
        );
        assert_eq!(
            layers(5),
            [
                vec!["g"],
                vec!["e"],
                vec!["f"],
                vec!["d"],
                vec!["a", "b", "c"]
            ]
        );
        let all = [
            vec!["g"],
            vec!["e"],
            vec!["f"],
            vec!["d"],
            vec!["c"],
            vec!["b"],
            vec!["a"],
        ];
        assert_eq!(layers(7), all);
        assert_eq!(layers(94), all);
    }

    #[test]
    fn a_light_dependency_stays_with_its_only_user() {
        let (mut closure, roots, popularity) = nixery_example();
        closure.get_mut(&p("g")).unwrap().nar_size = 6;
        let layers = names(&group(&closure, &roots, &popularity, 94));
        // Nothing is heavy now: d owns f and g.
        assert_eq!(
            layers,
            [
                vec!["e"],
                vec!["d", "f", "g"],
                vec!["c"],
                vec!["b"],
                vec!["a"]
            ]
        );
    }

    #[test]
    fn heavy_closures_and_popular_paths_get_candidates_of_their_own() {
        // r -> x -> y and r -> z -> w; only r is requested.
        let graph = |y: u64| {
            closure_of(&[
                ("r", 1, &["x", "z"]),
                ("x", 1, &["y"]),
                ("y", y, &[]),
                ("z", 1, &["w"]),
                ("w", 50 * MB, &[]),
            ])
        };
        let roots = [p("r")];
        let none = Popularity::none();
        // r's closure is heavy, but x's and z's are not: one candidate.
        assert_eq!(
            names(&group(&graph(60 * MB), &roots, &none, 94)),
            [vec!["r", "w", "x", "y", "z"]]
        );
        // y pushes x over the threshold: x and y stand alone.
        assert_eq!(
            names(&group(&graph(120 * MB), &roots, &none, 94)),
            [vec!["y"], vec!["r", "w", "z"], vec!["x"]]
        );
        // A popular path deep down gets its own candidate too.
        let popularity = popular(&[("z", POPULAR_WEIGHT)]);
        assert_eq!(
            names(&group(&graph(1), &roots, &popularity, 94)),
            [vec!["w", "z"], vec!["r", "x", "y"]]
        );
        let popularity = popular(&[("z", POPULAR_WEIGHT - 1)]);
        assert_eq!(
            names(&group(&graph(1), &roots, &popularity, 94)),
            [vec!["r", "w", "x", "y", "z"]]
        );
    }

    #[test]
    fn ties_are_broken_by_the_top_path() {
        let closure = closure_of(&[("c", 5, &[]), ("a", 5, &[]), ("bb", 5, &[]), ("d", 2, &[])]);
        let roots: Vec<String> = closure.keys().cloned().collect();
        let none = Popularity::none();
        // p() pads by name length, so "bb" sorts after the one-letter names.
        assert_eq!(
            names(&group(&closure, &roots, &none, 4)),
            [vec!["a"], vec!["c"], vec!["bb"], vec!["d"]]
        );
        assert_eq!(
            names(&group(&closure, &roots, &none, 3)),
            [vec!["a"], vec!["c"], vec!["d", "bb"]]
        );
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        let none = Popularity::none();
        assert!(group(&Closure::new(), &[p("x")], &none, 5).is_empty());
        // Unknown roots and references, a self-reference, budget 0.
        let closure = closure_of(&[("a", 1, &["a", "ghost"]), ("b", 1, &["a"])]);
        assert_eq!(
            names(&group(&closure, &[p("nope")], &none, 0)),
            [vec!["a", "b"]]
        );
        assert_eq!(names(&group(&closure, &[], &none, 5)), [vec!["a", "b"]]);
        // A cycle that nothing reaches hangs under its smallest path.
        let cycle = closure_of(&[
            ("a", 1, &["b"]),
            ("b", 1, &["c"]),
            ("c", 1, &["a"]),
            ("d", 9, &[]),
        ]);
        assert_eq!(
            names(&group(&cycle, &[], &none, 5)),
            [vec!["d"], vec!["a", "b", "c"]]
        );
        // Requested paths on a cycle split it.
        let roots = [p("b"), p("a")];
        assert_eq!(
            names(&group(&cycle, &roots, &none, 5)),
            [vec!["d"], vec!["b", "c"], vec!["a"]]
        );
    }

    #[test]
    fn closure_sizes_count_shared_paths_once() {
        // a -> b -> d, a -> c -> d, d -> e -> d (a cycle).
        let closure = closure_of(&[
            ("a", 1, &["b", "c"]),
            ("b", 2, &["d"]),
            ("c", 4, &["d"]),
            ("d", 8, &["e"]),
            ("e", 16, &["d"]),
        ]);
        let order: BTreeMap<String, usize> = closure
            .keys()
            .enumerate()
            .map(|(i, p)| (p.clone(), i))
            .collect();
        let mut graph: DiGraph<(), (), u32> = DiGraph::new();
        for _ in 0..closure.len() {
            graph.add_node(());
        }
        for (path, info) in &closure {
            for r in &info.references {
                graph.add_edge(NodeIndex::new(order[path]), NodeIndex::new(order[r]), ());
            }
        }
        let sizes: Vec<u64> = closure.values().map(|i| i.nar_size).collect();
        assert_eq!(closure_sizes(&graph, &sizes), [31, 26, 28, 24, 24]);
    }

    /// About the size of a large nixpkgs image, with a 3000-long chain
    /// through it and several heavy and popular paths.
    #[test]
    fn a_large_closure_groups_correctly() {
        const N: usize = 3000;
        let path = |i: usize| format!("/nix/store/{:032}-pkg{}", (i * 7919) % N, i % 97);
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut closure = Closure::new();
        for i in 0..N {
            let mut references: Vec<String> = Vec::new();
            if i + 1 < N {
                references.push(path(i + 1));
                for _ in 0..(next() % 8) {
                    references.push(path(i + 1 + (next() as usize) % (N - i - 1)));
                }
            }
            closure.insert(
                path(i),
                PathInfo {
                    nar_size: next() % 100_000,
                    nar_hash: String::new(),
                    references,
                },
            );
        }
        let roots: Vec<String> = (0..N).step_by(300).map(path).collect();
        let popularity =
            Popularity::from_counts((0..97).map(|k| (format!("pkg{k}"), k * 3)).collect());
        for budget in [1, 10, 94, N] {
            let layers = group(&closure, &roots, &popularity, budget);
            check_partition(&closure, &layers, budget).unwrap();
            check_order(&closure, &layers, &popularity, budget).unwrap();
            if budget == N {
                assert!(
                    layers.len() > 94,
                    "heavy and popular paths split the chain: {}",
                    layers.len()
                );
            }
        }
    }

    #[test]
    fn keys_depend_on_paths_what_they_hold_and_compression() {
        let a = Layer {
            paths: vec!["/nix/store/a".into()],
        };
        let b = Layer {
            paths: vec!["/nix/store/b".into()],
        };
        let hashed = |hash: &str| -> Closure {
            ["/nix/store/a", "/nix/store/b"]
                .iter()
                .map(|p| {
                    let info = PathInfo {
                        nar_size: 1,
                        nar_hash: hash.to_string(),
                        references: vec![],
                    };
                    (p.to_string(), info)
                })
                .collect()
        };
        let (one, other) = (hashed("sha256:1"), hashed("sha256:2"));
        assert_ne!(a.key("gzip", &one), b.key("gzip", &one));
        assert_ne!(a.key("gzip", &one), a.key("zstd", &one));
        assert_eq!(a.key("gzip", &one), a.clone().key("gzip", &one));
        // The same path with other contents is another layer.
        assert_ne!(a.key("gzip", &one), a.key("gzip", &other));
    }
}
