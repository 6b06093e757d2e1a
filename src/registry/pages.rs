//! What the HTML pages share: escaping, times, the host pulls should name,
//! and the document around a page's body.

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

/// Scripts only from this registry, no inline script, no other origin:
/// anything a name or a log line could smuggle into a page stays text.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
     style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const STYLE: &str = "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}\
     code,pre{background:#f3f3f3}pre{padding:.5em;overflow-x:auto}\
     td,th{padding:.2em .6em;text-align:left;vertical-align:top}\
     .queued,.running{color:#a60}.done{color:#070}.failed{color:#b00}";

/// Escapes text for HTML.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The host pulls should name: the forwarded host behind a proxy, else
/// Host; only characters a host (and port) may have.
pub fn host(headers: &HeaderMap) -> Option<String> {
    let raw = headers
        .get("x-forwarded-host")
        .or_else(|| headers.get(header::HOST))
        .and_then(|v| v.to_str().ok())?;
    let host: String = raw
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        .take(255)
        .collect();
    (!host.is_empty()).then_some(host)
}

/// `scheme://host` of this registry as the client reached it (`https`
/// behind a proxy or a Lambda function URL that says so), or nothing
/// without a Host.
pub fn base_url(headers: &HeaderMap) -> String {
    let Some(host) = host(headers) else {
        return String::new();
    };
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
    {
        Some("https") => "https",
        _ => "http",
    };
    format!("{scheme}://{host}")
}

/// A whole HTML document around `body` (already escaped).
pub fn html_response(title: &str, body: &str) -> Response {
    let page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>{} - nixery</title><style>{STYLE}</style></head><body>{body}</body></html>",
        esc(title)
    );
    let mut response = page.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_escaping() {
        assert_eq!(esc("<a href='x'>&"), "&lt;a href=&#39;x&#39;&gt;&amp;");
        let mut headers = HeaderMap::new();
        assert_eq!(base_url(&headers), "");
        headers.insert(
            header::HOST,
            HeaderValue::from_static("reg.example.org:8080<script>"),
        );
        assert_eq!(host(&headers).unwrap(), "reg.example.org:8080script");
        assert_eq!(base_url(&headers), "http://reg.example.org:8080script");
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        headers.insert("x-forwarded-host", HeaderValue::from_static("r.example"));
        assert_eq!(base_url(&headers), "https://r.example");
        headers.insert("x-forwarded-proto", HeaderValue::from_static("javascript"));
        assert_eq!(base_url(&headers), "http://r.example");
    }
}
