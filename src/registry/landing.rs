//! The landing page at `/`: what this registry is, how to pull from it
//! (with the host the visitor used), where packages come from, and the
//! recent builds and errors of this instance.

use std::fmt::Write;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::images::activity::Event;

/// Escapes text for HTML.
fn esc(text: &str) -> String {
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

/// The host pulls should name: the forwarded host behind a proxy, else Host.
fn host(headers: &HeaderMap) -> String {
    let raw = headers
        .get("x-forwarded-host")
        .or_else(|| headers.get(header::HOST))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("<this-host>");
    // Only characters a host (and port) may have: nothing else reaches the page.
    raw.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        .collect()
}

fn table(out: &mut String, title: &str, events: &[Event], empty: &str) {
    let _ = write!(out, "<h2>{}</h2>", esc(title));
    if events.is_empty() {
        let _ = write!(out, "<p>{}</p>", esc(empty));
        return;
    }
    out.push_str("<table><tr><th>when (UTC)</th><th>image</th><th>result</th></tr>");
    for event in events {
        let _ = write!(
            out,
            "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
            esc(&format_time(event.at)),
            esc(&event.image),
            esc(&event.outcome)
        );
    }
    out.push_str("</table>");
}

/// `YYYY-MM-DD HH:MM:SS` from Unix seconds (civil-from-days, proleptic Gregorian).
fn format_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub(super) async fn page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let host = host(&headers);
    let mut out = String::new();
    out.push_str("<!doctype html><html><head><meta charset=\"utf-8\"><title>nixery</title>");
    out.push_str("<style>body{font-family:sans-serif;max-width:50em;margin:2em auto;padding:0 1em}code,pre{background:#f3f3f3}td,th{padding:.2em .6em;text-align:left;vertical-align:top}</style>");
    out.push_str("</head><body><h1>nixery</h1>");
    out.push_str("<p>A container registry that builds images on demand with Nix. The image name is the package list: ");
    out.push_str("each path component is a package, <code>shell</code> adds bash and coreutils, and a leading <code>arm64</code> builds for 64-bit ARM.</p>");
    let _ = write!(
        out,
        "<pre>docker pull {h}/shell/curl/jq\ndocker pull {h}/arm64/shell/htop\ndocker pull {h}/python3packages.numpy</pre>",
        h = esc(&host)
    );
    let _ = write!(
        out,
        "<p>Packages come from {}.",
        esc(&state.images.sources().source().to_string())
    );
    let implicit = &state.images.settings().implicit_packages;
    if !implicit.is_empty() {
        let _ = write!(out, " Every image also has {}.", esc(&implicit.join(", ")));
    }
    out.push_str("</p>");
    table(
        &mut out,
        "Recent builds",
        &state.images.activity().builds(),
        "No builds yet on this instance.",
    );
    table(
        &mut out,
        "Recent errors",
        &state.images.activity().errors(),
        "No errors.",
    );
    out.push_str("</body></html>");
    let mut response = out.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_escaping() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(1_795_840_200), "2026-11-28 04:30:00");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(esc("<a href='x'>&"), "&lt;a href=&#39;x&#39;&gt;&amp;");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::HOST,
            HeaderValue::from_static("reg.example.org:8080<script>"),
        );
        assert_eq!(host(&headers), "reg.example.org:8080script");
    }
}
