//! The landing page at `/`: what this registry is, how to pull from it
//! (with the host the visitor used), where packages come from, and the
//! builds in progress on any instance, with a link to all recent builds.

use std::fmt::Write;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use super::pages::{esc, host, html_response};
use super::AppState;

pub(super) async fn page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let base = state.base_url(&headers);
    let host = match base.split_once("://") {
        Some((_, host)) => host.to_string(),
        None => host(&headers).unwrap_or_else(|| "<this-host>".to_string()),
    };
    let mut out = String::new();
    out.push_str("<h1>nixery</h1>");
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
    out.push_str("</p><h2>Builds in progress</h2>");
    match state.builds.list().await {
        Ok(builds) => {
            let running: Vec<_> = builds.iter().filter(|b| b.in_progress()).collect();
            if running.is_empty() {
                out.push_str("<p>None right now.</p>");
            } else {
                out.push_str("<ul>");
                for build in running {
                    let _ = write!(
                        out,
                        "<li><a href=\"{}\"><code>{}:{}</code></a> <span class=\"{}\">{}</span> {}</li>",
                        esc(&build.url),
                        esc(&build.name),
                        esc(&build.tag),
                        build.state,
                        build.state,
                        esc(build.step.map_or("", |s| s.label()))
                    );
                }
                out.push_str("</ul>");
            }
        }
        Err(error) => {
            tracing::warn!(%error, "listing builds for the landing page failed");
            out.push_str("<p>The build status cannot be read right now.</p>");
        }
    }
    out.push_str("<p><a href=\"/builds\">Recent builds and failures</a> (also as <a href=\"/api/builds\">JSON</a>).</p>");
    html_response("nixery", &out)
}
