//! Metrics, without extra infrastructure: counters kept in this process,
//! read as Prometheus text at `/metrics` (local server) and written as
//! CloudWatch embedded-metric-format lines (Lambda and worker logs), which
//! CloudWatch turns into metrics by itself.

/// The CloudWatch namespace of every metric.
pub const NAMESPACE: &str = "Nixery";
/// The dimension every metric carries: which part of the deployment
/// reported it ([`SERVICE_FUNCTION`] or [`SERVICE_WORKER`]).
pub const SERVICE_DIMENSION: &str = "Service";
pub const SERVICE_FUNCTION: &str = "function";
pub const SERVICE_WORKER: &str = "worker";
/// The second dimension of [`ERRORS`]: the registry error code.
pub const ERROR_CODE_DIMENSION: &str = "ErrorCode";

/// Requests answered (function).
pub const REQUESTS: &str = "Requests";
/// Error responses (function), also by [`ERROR_CODE_DIMENSION`].
pub const ERRORS: &str = "Errors";
/// Manifests answered from this instance's cache, or not (function).
pub const CACHE_HITS: &str = "CacheHits";
pub const CACHE_MISSES: &str = "CacheMisses";
/// Blob bytes sent by the function, and sent to storage by redirect.
pub const BYTES_SERVED: &str = "BytesServed";
pub const BYTES_REDIRECTED: &str = "BytesRedirected";
/// Builds finished, and of those the failed ones (worker; the local
/// server counts its own).
pub const BUILDS: &str = "Builds";
pub const BUILD_FAILURES: &str = "BuildFailures";
/// Images assembled from the binary cache (function, or local server),
/// and of those asked for, the ones the cache could not give (passed on
/// to workers, or failed when images come from the cache only).
pub const ASSEMBLIES: &str = "Assemblies";
pub const ASSEMBLIES_PASSED_ON: &str = "AssembliesPassedOn";
pub const ASSEMBLY_FAILURES: &str = "AssemblyFailures";
/// Milliseconds from a build's start to its image record.
pub const BUILD_DURATION: &str = "BuildDuration";
pub const LAYERS_NEW: &str = "LayersNew";
pub const LAYERS_REUSED: &str = "LayersReused";
pub const BYTES_UPLOADED: &str = "BytesUploaded";

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde_json::{json, Map, Value};

use crate::builder::{BuildError, BuildStats, Built};

/// The most build durations one EMF line carries (CloudWatch takes 100
/// values per metric in one line).
const EMF_MAX_VALUES: usize = 100;

type Labels = Vec<(&'static str, String)>;

/// This process's counters.
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    cache: Family<Labels, Counter>,
    bytes_served: Counter,
    bytes_redirected: Counter,
    builds: Family<Labels, Counter>,
    assemblies: Family<Labels, Counter>,
    build_seconds: Histogram,
    layers: Family<Labels, Counter>,
    bytes_uploaded: Counter,
    /// With EMF on: the service it reports as, and what was counted since
    /// the last line.
    emf: Option<(&'static str, Mutex<Pending>)>,
}

/// Counts since the last EMF line.
#[derive(Debug, Default)]
struct Pending {
    counts: BTreeMap<&'static str, u64>,
    errors: BTreeMap<String, u64>,
    durations_ms: Vec<u64>,
}

impl Metrics {
    /// Counters for `/metrics`; with `emf` (the service: function or
    /// worker), also written to stdout in embedded metric format by
    /// [`Metrics::flush`].
    pub fn new(emf: Option<&'static str>) -> Metrics {
        let mut registry = Registry::with_prefix("nixery");
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by HTTP status",
            requests.clone(),
        );
        let errors = Family::<Labels, Counter>::default();
        registry.register(
            "errors",
            "Error responses, by registry error code",
            errors.clone(),
        );
        let cache = Family::<Labels, Counter>::default();
        registry.register(
            "manifest_cache",
            "Manifests by tag answered from the cache (hit) or not (miss)",
            cache.clone(),
        );
        let bytes_served = Counter::default();
        registry.register(
            "bytes_served",
            "Blob bytes sent by this process",
            bytes_served.clone(),
        );
        let bytes_redirected = Counter::default();
        registry.register(
            "bytes_redirected",
            "Blob bytes sent by storage, through a redirect",
            bytes_redirected.clone(),
        );
        let builds = Family::<Labels, Counter>::default();
        registry.register(
            "builds",
            "Builds finished, by outcome (done or failed)",
            builds.clone(),
        );
        let assemblies = Family::<Labels, Counter>::default();
        registry.register(
            "assemblies",
            "Images assembled from the binary cache, by outcome (done, failed, or passed on to a build)",
            assemblies.clone(),
        );
        let build_seconds = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "build_duration_seconds",
            "Time from a build's start to its image record",
            build_seconds.clone(),
        );
        let layers = Family::<Labels, Counter>::default();
        registry.register(
            "layers",
            "Layers of finished builds, new or reused",
            layers.clone(),
        );
        let bytes_uploaded = Counter::default();
        registry.register(
            "bytes_uploaded",
            "Bytes of new layers builds stored",
            bytes_uploaded.clone(),
        );
        Metrics {
            registry,
            requests,
            errors,
            cache,
            bytes_served,
            bytes_redirected,
            builds,
            assemblies,
            build_seconds,
            layers,
            bytes_uploaded,
            emf: emf.map(|service| (service, Mutex::new(Pending::default()))),
        }
    }

    fn pending(&self, update: impl FnOnce(&mut Pending)) {
        if let Some((_, pending)) = &self.emf {
            update(&mut pending.lock().expect("never poisoned"));
        }
    }

    fn add(&self, name: &'static str, n: u64) {
        self.pending(|p| *p.counts.entry(name).or_default() += n);
    }

    /// A request answered with `status`; `error_code` for an error.
    pub fn request(&self, status: u16, error_code: Option<&str>) {
        self.requests
            .get_or_create(&vec![("status", status.to_string())])
            .inc();
        self.add(REQUESTS, 1);
        if let Some(code) = error_code {
            self.errors
                .get_or_create(&vec![("code", code.to_string())])
                .inc();
            self.add(ERRORS, 1);
            self.pending(|p| *p.errors.entry(code.to_string()).or_default() += 1);
        }
    }

    /// A manifest by tag: from this process's cache, or not.
    pub fn manifest_cache(&self, hit: bool) {
        let label = if hit { "hit" } else { "miss" };
        self.cache
            .get_or_create(&vec![("result", label.to_string())])
            .inc();
        self.add(if hit { CACHE_HITS } else { CACHE_MISSES }, 1);
    }

    /// Blob bytes sent by this process, or by storage through a redirect.
    pub fn blob_sent(&self, bytes: u64, redirected: bool) {
        if redirected {
            self.bytes_redirected.inc_by(bytes);
            self.add(BYTES_REDIRECTED, bytes);
        } else {
            self.bytes_served.inc_by(bytes);
            self.add(BYTES_SERVED, bytes);
        }
    }

    /// A build ended: with what it did, or failed.
    pub fn build_ended(&self, outcome: Result<&BuildStats, ()>) {
        let label = if outcome.is_ok() { "done" } else { "failed" };
        self.builds
            .get_or_create(&vec![("outcome", label.to_string())])
            .inc();
        self.add(BUILDS, 1);
        self.add(BUILD_FAILURES, u64::from(outcome.is_err()));
        if let Ok(stats) = outcome {
            self.layers_and_time(stats);
        }
    }

    /// An assembly from the binary cache ended: with what it did, failed
    /// (`Err(true)`), or the image went on to a build (`Err(false)`).
    pub fn assembly_ended(&self, outcome: Result<&BuildStats, bool>) {
        let label = match outcome {
            Ok(_) => "done",
            Err(true) => "failed",
            Err(false) => "passed_on",
        };
        self.assemblies
            .get_or_create(&vec![("outcome", label.to_string())])
            .inc();
        match outcome {
            Ok(stats) => {
                self.add(ASSEMBLIES, 1);
                self.layers_and_time(stats);
            }
            Err(true) => self.add(ASSEMBLY_FAILURES, 1),
            Err(false) => self.add(ASSEMBLIES_PASSED_ON, 1),
        }
    }

    /// What a finished build or assembly stored, and how long it took.
    fn layers_and_time(&self, stats: &BuildStats) {
        self.build_seconds.observe(stats.elapsed_ms as f64 / 1000.0);
        for (kind, n) in [("new", stats.layers_new), ("reused", stats.layers_reused)] {
            self.layers
                .get_or_create(&vec![("kind", kind.to_string())])
                .inc_by(n as u64);
        }
        self.bytes_uploaded.inc_by(stats.bytes_uploaded);
        self.add(LAYERS_NEW, stats.layers_new as u64);
        self.add(LAYERS_REUSED, stats.layers_reused as u64);
        self.add(BYTES_UPLOADED, stats.bytes_uploaded);
        self.pending(|p| {
            if p.durations_ms.len() < EMF_MAX_VALUES {
                p.durations_ms.push(stats.elapsed_ms);
            }
        });
    }

    /// Whether counts go to stdout as EMF (in Lambda and on workers).
    pub fn writes_emf(&self) -> bool {
        self.emf.is_some()
    }

    /// A build's result, as a dispatcher got it: counted when it built an
    /// image or failed for good (a transient failure, retried, is neither;
    /// an image found stored already was no build).
    pub fn build_outcome(&self, outcome: &Result<Built, BuildError>) {
        match outcome {
            Ok(Built {
                stats: Some(stats), ..
            }) if stats.assembled => self.assembly_ended(Ok(stats)),
            Ok(Built {
                stats: Some(stats), ..
            }) => self.build_ended(Ok(stats)),
            // The binary cache could not give it, and nothing else may.
            Err(BuildError::NoSourceLeft(_)) => self.assembly_ended(Err(true)),
            // The binary cache could not give it: a worker builds it.
            Err(BuildError::NotHere(_)) => self.assembly_ended(Err(false)),
            Err(error) if error.failure().is_some() => self.build_ended(Err(())),
            Ok(_) | Err(_) => {}
        }
    }

    /// Everything, in Prometheus (OpenMetrics) text format.
    pub fn prometheus_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String never fails");
        text
    }

    /// With EMF on, writes what was counted since the last call as one
    /// line on stdout (none if nothing was).
    pub fn flush(&self) {
        let Some((service, pending)) = &self.emf else {
            return;
        };
        let taken = std::mem::take(&mut *pending.lock().expect("never poisoned"));
        if let Some(line) = emf_line(service, &taken, crate::storage::records::unix_now_ms()) {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// The unit CloudWatch shows a metric in.
fn unit(name: &str) -> &'static str {
    match name {
        BYTES_SERVED | BYTES_REDIRECTED | BYTES_UPLOADED => "Bytes",
        BUILD_DURATION => "Milliseconds",
        _ => "Count",
    }
}

/// One EMF document: the counts by [`SERVICE_DIMENSION`], and errors also
/// by [`ERROR_CODE_DIMENSION`] (one document per code, as a document has
/// one value per dimension). Lines, joined by newlines.
fn emf_line(service: &str, pending: &Pending, now_ms: u64) -> Option<String> {
    let mut lines = Vec::new();
    let document = |metrics: Vec<(&str, Value)>, dimensions: Vec<(&str, &str)>| {
        let names: Vec<&str> = dimensions.iter().map(|(k, _)| *k).collect();
        let mut doc = Map::new();
        doc.insert(
            "_aws".into(),
            json!({
                "Timestamp": now_ms,
                "CloudWatchMetrics": [{
                    "Namespace": NAMESPACE,
                    "Dimensions": [names],
                    "Metrics": metrics.iter()
                        .map(|(name, _)| json!({ "Name": name, "Unit": unit(name) }))
                        .collect::<Vec<_>>(),
                }],
            }),
        );
        for (key, value) in dimensions {
            doc.insert(key.into(), json!(value));
        }
        for (name, value) in metrics {
            doc.insert(name.into(), value);
        }
        Value::Object(doc).to_string()
    };
    let mut metrics: Vec<(&str, Value)> = pending
        .counts
        .iter()
        .map(|(name, n)| (*name, json!(n)))
        .collect();
    if !pending.durations_ms.is_empty() {
        metrics.push((BUILD_DURATION, json!(pending.durations_ms)));
    }
    if !metrics.is_empty() {
        lines.push(document(metrics, vec![(SERVICE_DIMENSION, service)]));
    }
    for (code, n) in &pending.errors {
        lines.push(document(
            vec![(ERRORS, json!(n))],
            vec![(SERVICE_DIMENSION, service), (ERROR_CODE_DIMENSION, code)],
        ));
    }
    (!lines.is_empty()).then(|| lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_counts_what_happened() {
        let metrics = Metrics::new(None);
        metrics.request(200, None);
        metrics.request(404, Some("MANIFEST_UNKNOWN"));
        metrics.manifest_cache(true);
        metrics.blob_sent(1000, false);
        metrics.blob_sent(5000, true);
        metrics.build_ended(Ok(&BuildStats {
            elapsed_ms: 3000,
            layers_new: 2,
            layers_reused: 1,
            bytes_uploaded: 700,
            bytes_total: 900,
            assembled: false,
        }));
        metrics.build_ended(Err(()));
        let text = metrics.prometheus_text();
        for line in [
            "nixery_requests_total{status=\"404\"} 1",
            "nixery_errors_total{code=\"MANIFEST_UNKNOWN\"} 1",
            "nixery_manifest_cache_total{result=\"hit\"} 1",
            "nixery_bytes_served_total 1000",
            "nixery_bytes_redirected_total 5000",
            "nixery_builds_total{outcome=\"failed\"} 1",
            "nixery_build_duration_seconds_sum 3.0",
            "nixery_layers_total{kind=\"new\"} 2",
            "nixery_bytes_uploaded_total 700",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        // Without EMF nothing is kept for it.
        assert!(metrics.emf.is_none());
    }

    #[test]
    fn emf_lines_carry_the_deltas_with_their_dimensions() {
        let metrics = Metrics::new(Some(SERVICE_WORKER));
        metrics.request(404, Some("MANIFEST_UNKNOWN"));
        metrics.build_ended(Ok(&BuildStats {
            elapsed_ms: 1234,
            ..BuildStats::default()
        }));
        let pending = std::mem::take(&mut *metrics.emf.as_ref().unwrap().1.lock().unwrap());
        let text = emf_line(SERVICE_WORKER, &pending, 42).unwrap();
        let docs: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(docs.len(), 2, "{text}");
        let main = &docs[0];
        assert_eq!(main["_aws"]["Timestamp"], 42);
        let directive = &main["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], NAMESPACE);
        assert_eq!(directive["Dimensions"], json!([[SERVICE_DIMENSION]]));
        assert_eq!(main[SERVICE_DIMENSION], SERVICE_WORKER);
        // Every metric named has its value in the document.
        for metric in directive["Metrics"].as_array().unwrap() {
            let name = metric["Name"].as_str().unwrap();
            assert!(!main[name].is_null(), "{name}: {main}");
        }
        assert_eq!(main[BUILDS], 1);
        assert_eq!(main[BUILD_FAILURES], 0);
        assert_eq!(main[BUILD_DURATION], json!([1234]));
        assert_eq!(main[REQUESTS], 1);
        let by_code = &docs[1];
        assert_eq!(
            by_code["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            json!([[SERVICE_DIMENSION, ERROR_CODE_DIMENSION]])
        );
        assert_eq!(by_code[ERROR_CODE_DIMENSION], "MANIFEST_UNKNOWN");
        assert_eq!(by_code[ERRORS], 1);
        // Nothing since: no line.
        assert_eq!(emf_line(SERVICE_WORKER, &Pending::default(), 43), None);
    }
}
