//! The browser console's files, built into the controller so that any serving controller
//! serves the same console with no files to install and no CDN. The console is static: it
//! speaks gRPC-Web to the very API pvctl uses (same methods, same token guard, same audit),
//! so it has no semantics of its own to keep in step. The one exception is the VM's live
//! screen, a websocket ([`crate::vnc`]) behind the same tokens.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// One file of the console.
#[derive(Debug)]
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// A console file under `web/`, at `path`.
macro_rules! web_file {
    ($path:literal, $content_type:expr, $file:literal) => {
        Asset {
            path: $path,
            content_type: $content_type,
            body: include_bytes!(concat!("../web/", $file)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file, at the path the browser fetches it from.
const ASSETS: &[Asset] = &[
    web_file!("/", "text/html; charset=utf-8", "index.html"),
    web_file!("/console/console.js", JS, "console.js"),
    web_file!("/console/console.css", CSS, "console.css"),
    Asset {
        path: "/console/api.proto",
        content_type: "text/plain; charset=utf-8",
        body: proto::PUBLIC_API_PROTO.as_bytes(),
    },
    web_file!(
        "/console/vendor/protobuf.min.js",
        JS,
        "vendor/protobuf.min.js"
    ),
    web_file!("/console/vendor/xterm.js", JS, "vendor/xterm.js"),
    web_file!("/console/vendor/xterm.css", CSS, "vendor/xterm.css"),
    web_file!("/console/vendor/novnc.js", JS, "vendor/novnc.js"),
];

/// Only our own files run: no inline script, no other origin (the token lives in the page).
/// `unsafe-eval` because protobuf.js compiles each message's codec with `new Function`; the
/// console never evaluates text it received.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self' 'unsafe-eval'; \
     img-src 'self' data: blob:; \
     style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// `router` with a route for each console file.
pub fn add_routes(mut router: axum::Router) -> axum::Router {
    for asset in ASSETS {
        router = router.route(
            asset.path,
            axum::routing::get(move || async move { serve(asset) }),
        );
    }
    router
}

fn serve(asset: &'static Asset) -> Response {
    let mut response = asset.body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    // A new controller build may serve new files at the same paths.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_has_content_and_a_unique_path() {
        let mut paths = std::collections::HashSet::new();
        for asset in ASSETS {
            assert!(!asset.body.is_empty(), "{} is empty", asset.path);
            assert!(paths.insert(asset.path), "{} twice", asset.path);
        }
    }

    #[test]
    fn the_page_loads_only_files_the_controller_serves() {
        let page = std::str::from_utf8(ASSETS[0].body).unwrap_or_default();
        let mut referenced = 0;
        for attribute in ["src=\"", "href=\""] {
            for (at, _) in page.match_indices(attribute) {
                let rest = &page[at + attribute.len()..];
                let url = rest.split('"').next().unwrap_or_default();
                if url.starts_with('#') {
                    continue;
                }
                referenced += 1;
                assert!(
                    ASSETS.iter().any(|a| a.path == url),
                    "index.html loads {url}, which the controller does not serve"
                );
            }
        }
        assert!(referenced >= 4, "index.html loads only {referenced} files");
    }
}
