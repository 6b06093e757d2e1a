//! Bounded login work: what wrong passwords may cost.
//!
//! bcrypt is slow on purpose, so unchecked password checks let anyone
//! spend the registry's cores (48 parallel wrong passwords at cost 12 once
//! delayed a user's first login from 0.27 s to 10 s). Three bounds:
//!
//! - at most one bcrypt per core at a time, for everyone ([`Logins::new`]
//!   sizes the semaphore to the cores);
//! - at most one at a time per client address: a flood from one address
//!   waits on itself (at most [`MAX_WAITING`] requests; more are refused),
//!   so it never holds more than one core;
//! - at most `NIXERY_LOGIN_FAILURES` wrong passwords per address in a
//!   minute; after that the address gets `429 TOOMANYREQUESTS` with
//!   `Retry-After`, without a bcrypt, until the minute is over.
//!
//! The table of addresses holds at most [`MAX_CLIENTS`] (the oldest idle
//! ones go first), so a flood from many addresses cannot grow it. IPv6
//! addresses count by their /64, which one client usually has whole.
//! Credentials that passed are remembered by [`super::auth::Auth`] and
//! skip all of this.
//!
//! The address: the TCP peer of the local server (axum's `ConnectInfo`),
//! or the source IP of the Lambda request context. Headers such as
//! `X-Forwarded-For` are never read: anyone can send them.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use nixery::registry::login::{Client, Logins, Outcome};
//! let logins = Logins::new(2);
//! let client = Client::from_ip("192.0.2.7".parse().unwrap());
//! assert_eq!(logins.check(client, || false).await, Outcome::Failed);
//! assert_eq!(logins.check(client, || false).await, Outcome::Failed);
//! assert!(matches!(logins.check(client, || true).await, Outcome::Throttled { .. }));
//! let other = Client::from_ip("192.0.2.8".parse().unwrap());
//! assert_eq!(logins.check(other, || true).await, Outcome::Passed);
//! # });
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use tokio::sync::Semaphore;

/// Wrong passwords an address may send in a [`WINDOW`] by default.
pub const DEFAULT_FAILURES: u32 = 10;
/// The window failures are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);
/// The most addresses remembered at once.
pub const MAX_CLIENTS: usize = 4096;
/// The most checks of one address waiting their turn.
pub const MAX_WAITING: usize = 16;

/// Who is logging in, as far as the network says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    /// An IPv4 address, or the /64 of an IPv6 one.
    Ip(IpAddr),
    /// No address known (a router driven without a listener, in tests):
    /// all such requests count as one client.
    Unknown,
}

impl Client {
    pub fn from_ip(ip: IpAddr) -> Client {
        match ip {
            IpAddr::V4(_) => Client::Ip(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client::Ip(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Client::Ip(IpAddr::V6(prefix.into()))
                }
            },
        }
    }

    /// The address a request came from: the TCP peer, or in Lambda the
    /// request context's source IP.
    pub fn of(req: &Request) -> Client {
        if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
            return Client::from_ip(peer.ip());
        }
        use lambda_http::request::RequestContext;
        use lambda_http::RequestExt;
        let source = req.request_context_ref().and_then(|context| match context {
            RequestContext::ApiGatewayV2(context) => context.http.source_ip.clone(),
            // Other event sources (API Gateway v1, ALB) are not enabled.
            _ => None,
        });
        source
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .map(Client::from_ip)
            .unwrap_or(Client::Unknown)
    }
}

/// What a password check came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    /// Not checked: too many failures (or waiting checks) from this
    /// address; try again after this long.
    Throttled {
        retry_after: Duration,
    },
}

struct Record {
    failures: u32,
    /// When the first failure of the current window was.
    since: Instant,
    /// Checks of this address hold it in turn.
    turn: Arc<tokio::sync::Mutex<()>>,
    waiting: usize,
}

impl Record {
    fn new() -> Record {
        Record {
            failures: 0,
            since: Instant::now(),
            turn: Arc::new(tokio::sync::Mutex::new(())),
            waiting: 0,
        }
    }

    /// How long this address must wait, if it must.
    fn throttled(&mut self, limit: u32) -> Option<Duration> {
        let elapsed = self.since.elapsed();
        if elapsed >= WINDOW {
            self.failures = 0;
            return None;
        }
        (self.failures >= limit).then(|| WINDOW - elapsed)
    }

    fn idle(&self) -> bool {
        self.waiting == 0 && Arc::strong_count(&self.turn) == 1
    }
}

/// The password checks of one registry process.
pub struct Logins {
    hashing: Semaphore,
    clients: Mutex<HashMap<Client, Record>>,
    limit: u32,
}

impl std::fmt::Debug for Logins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logins")
            .field("limit", &self.limit)
            .field("hashing", &self.hashing.available_permits())
            .finish()
    }
}

/// Counts a check of an address as waiting until it is dropped (also
/// when the request is abandoned mid-wait).
struct Waiting<'a> {
    logins: &'a Logins,
    client: Client,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut clients = self.logins.clients.lock().expect("never poisoned");
        if let Some(record) = clients.get_mut(&self.client) {
            record.waiting = record.waiting.saturating_sub(1);
        }
    }
}

impl Logins {
    /// `limit` wrong passwords per address per [`WINDOW`]; as many
    /// bcrypt checks at once as the machine has cores.
    pub fn new(limit: u32) -> Logins {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Logins {
            hashing: Semaphore::new(cores),
            clients: Mutex::new(HashMap::new()),
            limit: limit.max(1),
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Runs `verify` (a bcrypt check, on a blocking thread) for `client`,
    /// within the bounds above.
    pub async fn check<F>(&self, client: Client, verify: F) -> Outcome
    where
        F: FnOnce() -> bool + Send + 'static,
    {
        let turn = {
            let mut clients = self.clients.lock().expect("never poisoned");
            let Some(record) = self.record(&mut clients, client) else {
                return Outcome::Throttled {
                    retry_after: Duration::from_secs(1),
                };
            };
            if let Some(retry_after) = record.throttled(self.limit) {
                return Outcome::Throttled { retry_after };
            }
            if record.waiting >= MAX_WAITING {
                return Outcome::Throttled {
                    retry_after: Duration::from_secs(1),
                };
            }
            record.waiting += 1;
            record.turn.clone()
        };
        let waiting = Waiting {
            logins: self,
            client,
        };
        let _turn = turn.lock().await;
        drop(waiting);
        // Failures may have come in while this one waited.
        {
            let mut clients = self.clients.lock().expect("never poisoned");
            if let Some(retry_after) = clients
                .get_mut(&client)
                .and_then(|record| record.throttled(self.limit))
            {
                return Outcome::Throttled { retry_after };
            }
        }
        let passed = {
            let Ok(_core) = self.hashing.acquire().await else {
                return Outcome::Failed;
            };
            tokio::task::spawn_blocking(verify).await.unwrap_or(false)
        };
        if passed {
            return Outcome::Passed;
        }
        let mut clients = self.clients.lock().expect("never poisoned");
        if let Some(record) = self.record(&mut clients, client) {
            if record.since.elapsed() >= WINDOW || record.failures == 0 {
                record.failures = 0;
                record.since = Instant::now();
            }
            record.failures += 1;
            if record.failures == self.limit {
                tracing::warn!(
                    ?client,
                    failures = record.failures,
                    "login failures limited"
                );
            }
        }
        Outcome::Failed
    }

    /// The record of `client`, made room for if needed: idle records whose
    /// window is over go first, then the idle one with the oldest window.
    /// `None` when every record is busy.
    fn record<'m>(
        &self,
        clients: &'m mut HashMap<Client, Record>,
        client: Client,
    ) -> Option<&'m mut Record> {
        if !clients.contains_key(&client) && clients.len() >= MAX_CLIENTS {
            clients.retain(|_, r| !(r.idle() && r.since.elapsed() >= WINDOW));
            if clients.len() >= MAX_CLIENTS {
                let oldest = clients
                    .iter()
                    .filter(|(_, r)| r.idle())
                    .min_by_key(|(_, r)| r.since)
                    .map(|(c, _)| *c)?;
                clients.remove(&oldest);
            }
        }
        Some(clients.entry(client).or_insert_with(Record::new))
    }

    /// How many addresses are remembered now.
    pub fn remembered(&self) -> usize {
        self.clients.lock().expect("never poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ip(n: u32) -> Client {
        Client::from_ip(IpAddr::V4(n.into()))
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        let a = Client::from_ip("2001:db8:1:2:3:4:5:6".parse().unwrap());
        let b = Client::from_ip("2001:db8:1:2:ffff::1".parse().unwrap());
        let c = Client::from_ip("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            Client::from_ip("::ffff:192.0.2.1".parse().unwrap()),
            Client::from_ip("192.0.2.1".parse().unwrap())
        );
    }

    #[test]
    fn the_address_is_the_peer_or_the_lambda_source_ip() {
        let mut local = Request::new(axum::body::Body::empty());
        assert_eq!(Client::of(&local), Client::Unknown);
        let peer: SocketAddr = "192.0.2.44:5000".parse().unwrap();
        local.extensions_mut().insert(ConnectInfo(peer));
        assert_eq!(Client::of(&local), ip_client("192.0.2.44"));
        // A Function URL event, as the Lambda runtime delivers it; its
        // headers claim another address, which is not believed.
        let event = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/events/function-url-get-manifest.json"),
        )
        .unwrap();
        let event: lambda_http::request::LambdaRequest = serde_json::from_str(&event).unwrap();
        let mut lambda = axum::http::Request::from(event).map(|_| axum::body::Body::empty());
        lambda
            .headers_mut()
            .insert("x-forwarded-for", "10.9.9.9".parse().unwrap());
        assert_eq!(Client::of(&lambda), ip_client("198.51.100.23"));
    }

    fn ip_client(address: &str) -> Client {
        Client::from_ip(address.parse().unwrap())
    }

    #[tokio::test]
    async fn failures_are_limited_per_address_and_the_window_ends() {
        let logins = Logins::new(3);
        for _ in 0..3 {
            assert_eq!(logins.check(ip(1), || false).await, Outcome::Failed);
        }
        let checked = Arc::new(AtomicUsize::new(0));
        let counting = |checked: &Arc<AtomicUsize>, result: bool| {
            let checked = checked.clone();
            move || {
                checked.fetch_add(1, Ordering::SeqCst);
                result
            }
        };
        let Outcome::Throttled { retry_after } =
            logins.check(ip(1), counting(&checked, true)).await
        else {
            panic!("not throttled");
        };
        assert!(retry_after <= WINDOW && retry_after > WINDOW - Duration::from_secs(5));
        assert_eq!(
            checked.load(Ordering::SeqCst),
            0,
            "a throttled check ran bcrypt"
        );
        // Another address is not affected.
        assert_eq!(
            logins.check(ip(2), counting(&checked, true)).await,
            Outcome::Passed
        );
        // Once the window is over, the address may try again.
        logins
            .clients
            .lock()
            .unwrap()
            .get_mut(&ip(1))
            .unwrap()
            .since -= WINDOW;
        assert_eq!(logins.check(ip(1), || true).await, Outcome::Passed);
    }

    #[tokio::test]
    async fn one_address_checks_one_at_a_time_and_few_wait() {
        let logins = Arc::new(Logins::new(1000));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut checks = Vec::new();
        for _ in 0..40 {
            let (logins, running, most) = (logins.clone(), running.clone(), most.clone());
            checks.push(tokio::spawn(async move {
                logins
                    .check(ip(7), move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                        false
                    })
                    .await
            }));
        }
        let mut throttled = 0;
        for check in checks {
            if matches!(check.await.unwrap(), Outcome::Throttled { .. }) {
                throttled += 1;
            }
        }
        assert_eq!(most.load(Ordering::SeqCst), 1);
        assert!(throttled >= 40 - MAX_WAITING - 1, "{throttled} throttled");
    }

    #[tokio::test]
    async fn the_table_of_addresses_is_bounded() {
        let logins = Logins::new(1);
        for n in 0..(MAX_CLIENTS as u32 + 100) {
            logins.check(ip(n), || false).await;
        }
        assert!(logins.remembered() <= MAX_CLIENTS);
        // The newest addresses are still counted.
        assert!(matches!(
            logins.check(ip(MAX_CLIENTS as u32 + 99), || true).await,
            Outcome::Throttled { .. }
        ));
    }
}
