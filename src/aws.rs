//! What every AWS client of this crate shares: region and credentials from
//! the standard chain, an optional endpoint of an AWS-compatible server,
//! a short connect timeout and a bound on each attempt, so a dead endpoint
//! is an error, never a hang.

use std::time::Duration;

use aws_config::SdkConfig;

/// The SDK configuration for one client: `endpoint` replaces AWS's,
/// `attempt_timeout` bounds one try, `max_attempts` counts the tries.
pub async fn sdk_config(
    endpoint: Option<&str>,
    attempt_timeout: Duration,
    max_attempts: u32,
) -> SdkConfig {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(attempt_timeout)
        .build();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(timeouts)
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(max_attempts));
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}
