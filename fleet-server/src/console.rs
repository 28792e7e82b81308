//! The operator console: a single-page app (`console/index.html`, `app.js`, `style.css`) that
//! talks to the REST API with the operator's token.
//!
//! The files are built into the binary, so the console works on a server with no access to the
//! internet and `cargo build` needs no JavaScript tool chain. The console holds no authority of
//! its own: it signs in with an API token and every action goes through the same role checks
//! as `fleetctl`.
//!
//! For work on the console itself, `DRIFTGATE_CONSOLE_DIR=fleet-server/console` serves the files
//! from that directory instead, read on every request, so an edit shows on reload.

use std::path::PathBuf;
use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

/// One file of the console.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    embedded: &'static str,
}

const ASSETS: [Asset; 3] = [
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        embedded: include_str!("../console/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        embedded: include_str!("../console/app.js"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        embedded: include_str!("../console/style.css"),
    },
];

/// Scripts only from this server, no framing, no plugins: the page holds an API token, so an
/// injected script must have nowhere to come from. Inline style attributes stay allowed (the
/// charts and progress bars size themselves with them); inline scripts do not.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; \
     object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The console's routes: `/` (the app) and `/console/{file}` (its script and style sheet).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|headers: HeaderMap| async move { serve("index.html", &headers) }))
        .route(
            "/console/{file}",
            get(|Path(file): Path<String>, headers: HeaderMap| async move {
                serve(&file, &headers)
            }),
        )
}

fn development_dir() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("DRIFTGATE_CONSOLE_DIR").map(PathBuf::from))
        .as_ref()
}

/// The file's bytes: from `DRIFTGATE_CONSOLE_DIR` when set, else the embedded copy.
fn contents(asset: &Asset) -> Result<String, String> {
    match development_dir() {
        Some(dir) => std::fs::read_to_string(dir.join(asset.name))
            .map_err(|e| format!("{}: {e}", dir.join(asset.name).display())),
        None => Ok(asset.embedded.to_string()),
    }
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    // Only the known files: a name is looked up, never joined onto a path.
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return (StatusCode::NOT_FOUND, "no such console file\n").into_response();
    };
    let body = match contents(asset) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(error = %e, "console file unreadable");
            return (StatusCode::INTERNAL_SERVER_ERROR, e).into_response();
        }
    };
    // Revalidated on every load (a new server version must show at once), but a 304 when
    // the browser's copy is current.
    let etag = format!(
        "\"{}\"",
        hex::encode(&Sha256::digest(body.as_bytes())[..12])
    );
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        body.into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_the_embedded_files() {
        let index = ASSETS[0].embedded;
        assert!(index.contains("/console/app.js"), "index.html loads app.js");
        assert!(
            index.contains("/console/style.css"),
            "index.html loads style.css"
        );
        // Offline: nothing from another origin.
        for asset in &ASSETS {
            for scheme in ["http://", "https://", "//cdn"] {
                assert!(
                    !asset.embedded.contains(&format!("src=\"{scheme}"))
                        && !asset.embedded.contains(&format!("href=\"{scheme}")),
                    "{} loads something from elsewhere",
                    asset.name
                );
            }
        }
    }
}
