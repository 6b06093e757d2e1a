//! Where a cache's client may connect: the redirects it follows and the
//! addresses host names resolve to.
//!
//! A cache may send its client elsewhere (a CDN, a mirror), at most
//! [`MAX_REDIRECTS`] hops, never from `https` down to `http`, and never
//! from a public host to a local or private one: the function runs beside
//! metadata services and loopback ports that the cache has no business
//! reaching through it. Literal addresses are checked as the redirect is
//! followed (`refused_redirect`); names are checked by the addresses they
//! resolve to (`OutwardResolver`). Credentials are not sent on to another
//! host (reqwest drops them).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use reqwest::Url;

/// Redirects followed from one request, at most.
pub const MAX_REDIRECTS: usize = 5;

/// Where a cache may send its client (to a CDN, a mirror): at most
/// [`MAX_REDIRECTS`] hops, never from `https` down to `http`, and never
/// from a public host to a local or private one (a metadata service, a
/// loopback port) that the function can reach and the cache should not.
/// Credentials are not sent on to another host (reqwest drops them).
pub(super) fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let refused = match attempt.previous().first() {
            Some(first) => refused_redirect(first, attempt.url(), attempt.previous().len()),
            None => None,
        };
        match refused {
            Some(reason) => attempt.error(reason),
            None => attempt.follow(),
        }
    })
}

/// Why the `hops`th redirect of a request to `first`, to `next`, is not
/// followed, if it is not.
fn refused_redirect(first: &Url, next: &Url, hops: usize) -> Option<String> {
    if hops > MAX_REDIRECTS {
        Some(format!("more than {MAX_REDIRECTS} redirects"))
    } else if first.scheme() == "https" && next.scheme() != "https" {
        Some(format!("from https to {}", next.scheme()))
    } else if is_inward(next) && !is_inward(first) {
        let host = next.host_str().unwrap_or_default();
        Some(format!("to {host}, a local or private host"))
    } else if is_link_local(next) && next.host_str() != first.host_str() {
        // Metadata services: never, unless the cache is there itself.
        let host = next.host_str().unwrap_or_default();
        Some(format!("to {host}, a link-local host"))
    } else {
        None
    }
}

/// Whether `url` names this machine or a private network: `localhost`,
/// or an address [`is_inward_ip`].
pub(super) fn is_inward(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return true;
    };
    match host.trim_matches(['[', ']']).parse::<IpAddr>() {
        Ok(ip) => is_inward_ip(ip),
        Err(_) => {
            let name = host.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    }
}

/// Whether `url`'s host is a link-local address (169.254/16, fe80::/10),
/// where clouds answer their metadata services.
fn is_link_local(url: &Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    host.trim_matches(['[', ']'])
        .parse::<IpAddr>()
        .is_ok_and(is_link_local_ip)
}

/// Whether `ip` is link-local, or an IPv4 link-local address in IPv6.
fn is_link_local_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => ip.is_link_local(),
        IpAddr::V6(ip) => {
            ip.segments()[0] & 0xffc0 == 0xfe80
                || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_link_local())
        }
    }
}

/// Whether `ip` is not a public internet address: loopback, private,
/// shared (100.64/10, where some clouds keep their metadata service),
/// link-local (169.254/16: metadata services), IETF protocol space
/// (192.0.0/24), unspecified, broadcast; for IPv6 also unique-local and
/// link-local, and IPv4 addresses carried in IPv6 (mapped, compatible,
/// NAT64 64:ff9b::/96) by the IPv4 they carry.
pub fn is_inward_ip(ip: IpAddr) -> bool {
    let v4 = |ip: Ipv4Addr| {
        let [a, b, c, _] = ip.octets();
        ip.is_loopback()
            || ip.is_private()
            || ip.is_link_local()
            || ip.is_unspecified()
            || ip.is_broadcast()
            || (a == 100 && b & 0xc0 == 64)
            || (a == 192 && b == 0 && c == 0)
    };
    match ip {
        IpAddr::V4(ip) => v4(ip),
        IpAddr::V6(ip) => {
            let segments = ip.segments();
            let carried = Ipv4Addr::from((u32::from(segments[6]) << 16) | u32::from(segments[7]));
            ip.is_loopback()
                || ip.is_unspecified()
                || segments[0] & 0xfe00 == 0xfc00
                || segments[0] & 0xffc0 == 0xfe80
                || ip.to_ipv4_mapped().is_some_and(v4)
                // IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::a.b.c.d)
                || (segments[..6] == [0; 6] && v4(carried))
                || (segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && v4(carried))
        }
    }
}

/// Resolves host names for a cache's client, leaving out inward addresses
/// ([`is_inward_ip`]) for every name but the cache's own when the cache is
/// public, and link-local ones whatever the cache: a redirect to a name that resolves to a metadata service or a
/// loopback port (`metadata.google.internal`, `127.0.0.1.nip.io`) fails to
/// connect. (IP literals are not resolved: `refused_redirect` checks
/// those.)
pub(super) struct OutwardResolver {
    /// The cache's own host name, resolved as it is.
    pub(super) own: String,
    /// The cache itself is local or private: so may its redirects be.
    pub(super) inward_allowed: bool,
}

impl reqwest::dns::Resolve for OutwardResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        let own = host.eq_ignore_ascii_case(&self.own);
        let inward_allowed = self.inward_allowed;
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| {
                    own || !is_inward_ip(addr.ip())
                        || (inward_allowed && !is_link_local_ip(addr.ip()))
                })
                .collect();
            if found.is_empty() {
                let message = format!("{host} has no public address");
                return Err(message.into());
            }
            Ok(Box::new(found.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A reqwest error and its causes, without the URL (the caller names the
/// object).
pub(super) fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out".to_string()
    } else if error.is_connect() {
        "could not connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_stay_public_and_encrypted_once_they_were() {
        let url = |s: &str| Url::parse(s).unwrap();
        let public = url("https://cache.example.org/nix-cache-info");
        for next in [
            "https://cdn.example.net/nar/x.nar.xz",
            "https://cache.example.org/other",
        ] {
            assert_eq!(refused_redirect(&public, &url(next), 1), None, "{next}");
        }
        for next in [
            "http://cdn.example.net/nar/x.nar.xz",
            "https://169.254.169.254/latest/meta-data/",
            "https://169.254.170.2/v2/credentials",
            "https://127.0.0.1:9000/",
            "https://localhost/",
            "https://10.0.0.7/",
            "https://192.168.1.1/",
            "https://[::1]/",
            "https://[fe80::1]/",
            "https://[fd00::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://0.0.0.0/",
        ] {
            let reason = refused_redirect(&public, &url(next), 1);
            assert!(reason.is_some(), "{next} is followed");
        }
        assert!(refused_redirect(&public, &public, MAX_REDIRECTS + 1)
            .unwrap()
            .contains("more than 5"));
        // A cache that is itself local (a test, a sidecar) may stay local.
        let local = url("http://127.0.0.1:8080/cache/x.narinfo");
        assert_eq!(
            refused_redirect(&local, &url("http://127.0.0.1:9090/x"), 1),
            None
        );
    }

    #[test]
    fn inward_addresses_are_every_non_public_kind() {
        for inward in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.0.1",
            "169.254.169.254",
            "100.100.100.200",
            "192.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(is_inward_ip(inward.parse().unwrap()), "{inward}");
        }
        for outward in ["8.8.8.8", "100.128.0.1", "151.101.2.217", "2a04:4e42::1"] {
            assert!(!is_inward_ip(outward.parse().unwrap()), "{outward}");
        }
        // A private cache may redirect within its network, never to a
        // metadata service.
        let url = |s: &str| Url::parse(s).unwrap();
        let private = url("http://10.0.0.5/cache/x.narinfo");
        assert_eq!(
            refused_redirect(&private, &url("http://10.0.0.6/x"), 1),
            None
        );
        for metadata in ["http://169.254.169.254/", "http://[fe80::1]/"] {
            assert!(refused_redirect(&private, &url(metadata), 1).is_some());
        }
    }

    #[tokio::test]
    async fn names_that_resolve_inward_are_refused_unless_the_cache_is_there() {
        use reqwest::dns::Resolve;
        let resolve = |own: &str, inward_allowed: bool| {
            let resolver = OutwardResolver {
                own: own.to_string(),
                inward_allowed,
            };
            resolver.resolve("localhost".parse().unwrap())
        };
        // A public cache redirecting to a name of this machine.
        let error = resolve("cache.example.org", false).await.err().unwrap();
        assert!(error.to_string().contains("no public address"), "{error}");
        // The cache's own name, or a local cache: as resolved.
        for (own, inward_allowed) in [("localhost", false), ("127.0.0.1", true)] {
            let addrs: Vec<_> = resolve(own, inward_allowed).await.unwrap().collect();
            assert!(addrs.iter().any(|a| a.ip().is_loopback()), "{addrs:?}");
        }
    }
}
