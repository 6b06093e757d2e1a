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
/// Milliseconds from a build's start to its image record.
pub const BUILD_DURATION: &str = "BuildDuration";
pub const LAYERS_NEW: &str = "LayersNew";
pub const LAYERS_REUSED: &str = "LayersReused";
pub const BYTES_UPLOADED: &str = "BytesUploaded";
