//! The admin web UI: the static files of `web-ui/`, compiled into the binary and served under
//! `/ui/`.
//!
//! The UI is plain ES modules and CSS with no build step, so what is in `web-ui/` is exactly
//! what ships; the package carries no separate asset directory that could drift from the
//! binary. It talks only to the documented `/api/v1` (it has no endpoints of its own here).
//!
//! Routing: `/ui/<asset>` serves that file with its content type; any other path under `/ui/`
//! without a file extension is a page of the single-page app and gets `index.html` (so
//! `/ui/nodes/<id>` can be bookmarked and reloaded); an unknown path with an extension is 404.
//! `/` and `/ui` redirect to `/ui/`.
//!
//! Caching: file names carry no content hash, so every response says `no-cache` (the browser
//! revalidates) with a strong `ETag` (SHA-256 of the bytes), and a matching `If-None-Match`
//! answers 304 without a body. A new binary therefore shows its new UI on the next load.
//! Responses also carry a strict Content-Security-Policy (scripts, styles and connections
//! from this origin only; no inline script or style) and `X-Content-Type-Options: nosniff`.

use std::collections::HashMap;
use std::sync::OnceLock;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use sha2::{Digest as _, Sha256};

/// One embedded file.
#[derive(Debug)]
pub struct Asset {
    /// The path below `web-ui/` (and below `/ui/`).
    pub path: &'static str,
    pub content_type: &'static str,
    pub bytes: &'static [u8],
}

macro_rules! assets {
    ($($path:literal => $content_type:literal),+ $(,)?) => {
        /// Every file the UI is made of. A test checks this list against the `web-ui/`
        /// directory, so a file added there and forgotten here fails the build's tests.
        pub const ASSETS: &[Asset] = &[$(Asset {
            path: $path,
            content_type: $content_type,
            bytes: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../web-ui/", $path)),
        }),+];
    };
}

assets! {
    "index.html" => "text/html; charset=utf-8",
    "style.css" => "text/css; charset=utf-8",
    "favicon.svg" => "image/svg+xml",
    "js/app.js" => "text/javascript; charset=utf-8",
    "js/api.js" => "text/javascript; charset=utf-8",
    "js/dom.js" => "text/javascript; charset=utf-8",
    "js/chart.js" => "text/javascript; charset=utf-8",
    "js/format.js" => "text/javascript; charset=utf-8",
    "js/pages/overview.js" => "text/javascript; charset=utf-8",
    "js/pages/node.js" => "text/javascript; charset=utf-8",
    "js/pages/deployments.js" => "text/javascript; charset=utf-8",
    "js/pages/models.js" => "text/javascript; charset=utf-8",
    "js/pages/kv.js" => "text/javascript; charset=utf-8",
    "js/pages/decisions.js" => "text/javascript; charset=utf-8",
    "js/pages/planner.js" => "text/javascript; charset=utf-8",
    "js/pages/audit.js" => "text/javascript; charset=utf-8",
    "js/pages/tokens.js" => "text/javascript; charset=utf-8",
}

/// Sent with every UI response. `connect-src 'self'`: the UI calls only this origin's API.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The routes of the UI; merged into the API router (they need no state).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(serve))
        .route("/ui/{*path}", get(serve))
}

fn by_path() -> &'static HashMap<&'static str, (&'static Asset, HeaderValue)> {
    static INDEX: OnceLock<HashMap<&'static str, (&'static Asset, HeaderValue)>> = OnceLock::new();
    INDEX.get_or_init(|| {
        ASSETS
            .iter()
            .map(|asset| {
                let digest = Sha256::digest(asset.bytes);
                let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
                // Hex digits and quotes only, so this cannot fail; fall back to no ETag if it did.
                let etag = HeaderValue::from_str(&format!("\"{hex}\""))
                    .unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
                (asset.path, (asset, etag))
            })
            .collect()
    })
}

/// Which asset answers `path` (the part after `/ui/`): the file itself, `index.html` for an
/// app route, or none (404).
pub fn resolve(path: &str) -> Option<&'static Asset> {
    let path = path.trim_start_matches('/');
    if let Some((asset, _)) = by_path().get(path) {
        return Some(asset);
    }
    let last = path.rsplit('/').next().unwrap_or("");
    if last.contains('.') {
        None
    } else {
        by_path().get("index.html").map(|(asset, _)| *asset)
    }
}

async fn serve(uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().strip_prefix("/ui").unwrap_or(uri.path());
    let Some(asset) = resolve(path) else {
        return (StatusCode::NOT_FOUND, format!("no UI file {path}")).into_response();
    };
    let Some((_, etag)) = by_path().get(asset.path) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim() == etag.to_str().unwrap_or(""))
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.bytes,
        )
            .into_response()
    };
    let h = response.headers_mut();
    h.insert(header::ETAG, etag.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
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

    fn files_under(dir: &std::path::Path, base: &std::path::Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            // The browser tests and their npm dependencies are not part of the UI.
            if [
                "tests",
                "node_modules",
                "package.json",
                "package-lock.json",
                "README.md",
            ]
            .contains(&rel.as_str())
            {
                continue;
            }
            if path.is_dir() {
                files_under(&path, base, out);
            } else {
                out.push(rel);
            }
        }
    }

    /// Every file in web-ui/ is embedded, and nothing embedded is missing from web-ui/.
    #[test]
    fn every_ui_file_is_embedded() {
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web-ui");
        let mut on_disk = Vec::new();
        files_under(&base, &base, &mut on_disk);
        on_disk.sort();
        let mut embedded: Vec<String> = ASSETS.iter().map(|a| a.path.to_owned()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded);
    }

    #[test]
    fn app_routes_fall_back_to_index_and_missing_files_do_not() {
        assert_eq!(resolve("/").unwrap().path, "index.html");
        assert_eq!(resolve("/nodes/1b2c").unwrap().path, "index.html");
        assert_eq!(resolve("/js/app.js").unwrap().path, "js/app.js");
        assert!(resolve("/js/nope.js").is_none());
        assert!(resolve("/favicon.ico").is_none());
    }

    /// Every module the UI imports is embedded (a typo in an import would be a blank page).
    #[test]
    fn every_import_resolves_to_an_embedded_file() {
        for asset in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            let text = std::str::from_utf8(asset.bytes).unwrap();
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let spec = line.rsplit(" from ").next().unwrap_or(line);
                let spec = spec
                    .trim()
                    .trim_start_matches("import ")
                    .trim_end_matches(';')
                    .trim_matches(|c| c == '\'' || c == '"');
                let target = spec.strip_prefix("/ui/").unwrap_or_else(|| {
                    panic!(
                        "{}: import {spec:?} should be absolute (/ui/...)",
                        asset.path
                    )
                });
                assert!(
                    resolve(target).is_some_and(|a| a.path == target),
                    "{}: {spec}",
                    asset.path
                );
            }
        }
    }
}
