//! The HTTP client of the admin commands: one bearer token, JSON in and out, RFC 7807 problem
//! JSON turned into [`ApiError`], lists followed across pages.
//!
//! Every failure is classified once here ([`ApiError::exit_code`]) so that scripts can trust
//! the exit status: unreachable, not authenticated/allowed, not found, or refused.

use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::ExitCodeKind;
use kvfleet_proto::api::Page;

/// RFC 7807 problem details as the control plane sends them (`application/problem+json`).
/// Only read here: the control plane owns the definition; unknown fields are ignored.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub(crate) struct Problem {
    #[serde(rename = "type", default)]
    pub(crate) type_: String,
    #[serde(default)]
    pub(crate) title: String,
    #[serde(default)]
    pub(crate) status: u16,
    #[serde(default)]
    pub(crate) detail: String,
    #[serde(default)]
    pub(crate) invalid_params: Vec<InvalidParam>,
}

/// One field the server refused, by its dotted JSON path (`sla.ttft_ms`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub(crate) struct InvalidParam {
    pub(crate) name: String,
    pub(crate) reason: String,
}

/// Why a call failed.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// No connection, a timeout, or not an HTTP server at all.
    Unreachable { url: String, reason: String },
    /// The server answered with an error status.
    Status {
        status: StatusCode,
        problem: Box<Problem>,
        request_id: Option<String>,
    },
    /// A success status with a body we cannot read (a different server, a newer API).
    Decode { url: String, reason: String },
}

impl ApiError {
    pub(crate) fn exit_code(&self) -> ExitCodeKind {
        match self {
            ApiError::Unreachable { .. } => ExitCodeKind::Unreachable,
            ApiError::Status { status, .. } => match *status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ExitCodeKind::Auth,
                StatusCode::NOT_FOUND => ExitCodeKind::NotFound,
                _ => ExitCodeKind::Api,
            },
            ApiError::Decode { .. } => ExitCodeKind::Api,
        }
    }

    /// The problem, when the server sent one.
    pub(crate) fn problem(&self) -> Option<&Problem> {
        match self {
            ApiError::Status { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Unreachable { url, reason } => write!(
                f,
                "cannot reach the control plane at {url}: {reason}\n  \
                 check the URL (kvfleet login, --url, KVFLEET_URL) and that \
                 kvfleet-controlplane is running"
            ),
            ApiError::Status {
                status,
                problem,
                request_id,
            } => {
                let what = if problem.detail.is_empty() {
                    problem.title.as_str()
                } else {
                    problem.detail.as_str()
                };
                if problem.invalid_params.is_empty() {
                    write!(f, "{what} (HTTP {})", status.as_u16())?;
                } else {
                    write!(f, "{} (HTTP {}):", problem.title, status.as_u16())?;
                    for param in &problem.invalid_params {
                        write!(f, "\n  {}: {}", param.name, param.reason)?;
                    }
                }
                match *status {
                    StatusCode::UNAUTHORIZED => write!(
                        f,
                        "\n  the token is missing, malformed, expired or revoked: \
                         run `kvfleet login` or set KVFLEET_TOKEN"
                    )?,
                    StatusCode::FORBIDDEN => {
                        write!(f, "\n  this token's role may not do this")?;
                    }
                    _ => {}
                }
                if status.is_server_error()
                    && let Some(id) = request_id
                {
                    write!(
                        f,
                        "\n  request id {id} (the control plane's log has details)"
                    )?;
                }
                Ok(())
            }
            ApiError::Decode { url, reason } => {
                write!(f, "unexpected answer from {url}: {reason}")
            }
        }
    }
}

/// A connection to one control plane.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    http: reqwest::Client,
    /// `http://host:port`, without `/api/v1` and without a trailing slash.
    base: String,
    token: Option<String>,
}

/// The base URL as typed (`host:8080`, `http://host:8080/`, `http://host:8080/api/v1`) in the
/// one form the client uses: scheme, host, port.
pub(crate) fn normalize_url(url: &str) -> Result<String, String> {
    let raw = url.trim();
    let with_scheme = if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("http://{raw}")
    };
    let parsed = reqwest::Url::parse(&with_scheme).map_err(|e| format!("{url:?}: {e}"))?;
    let scheme = match parsed.scheme() {
        scheme @ ("http" | "https") => scheme,
        other => return Err(format!("{url:?}: unsupported scheme {other:?}")),
    };
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{url:?}: no host"))?;
    // A path prefix (a proxy's) is kept; the API's own `/api/v1` is added per call.
    let path = parsed.path().trim_end_matches('/');
    let path = path.strip_suffix("/api/v1").unwrap_or(path);
    let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
    Ok(format!("{scheme}://{host}{port}{path}"))
}

impl Client {
    /// A client for `base`. An `https` control plane is trusted through `ca_pem` (the fleet
    /// CA's certificate, `--ca-file`) alone, never the system's roots: it is this fleet's CA
    /// that vouches for it.
    pub(crate) fn new(
        base: String,
        token: Option<String>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, ApiError> {
        let unreachable = |reason: String| ApiError::Unreachable {
            url: base.clone(),
            reason,
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("kvfleet-cli/", env!("CARGO_PKG_VERSION")));
        let roots = match ca_pem {
            Some(pem) => reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| unreachable(format!("the CA file (--ca-file) is not PEM: {e}")))?,
            None => Vec::new(),
        };
        if base.starts_with("https://") && roots.is_empty() {
            return Err(unreachable(
                "an https control plane needs its CA certificate: pass --ca-file (or set \
                 KVFLEET_CA_FILE) with the PEM from GET /api/v1/ca or the control plane's [tls] files"
                    .into(),
            ));
        }
        builder = builder.tls_certs_only(roots);
        let http = builder.build().map_err(|e| unreachable(e.to_string()))?;
        Ok(Client { http, base, token })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    /// Sends one request; `Ok(None)` for 204 No Content.
    async fn send<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<Option<T>, ApiError> {
        let mut url = reqwest::Url::parse(&self.url(path)).map_err(|e| ApiError::Unreachable {
            url: self.base.clone(),
            reason: format!("bad URL: {e}"),
        })?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let url = url.to_string();
        let (status, bytes) = self.exchange(method, &url, body).await?;
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ApiError::Decode {
                url,
                reason: format!("{e} (is this a kvfleet control plane of a compatible version?)"),
            })
    }

    /// GET of any path under the server's root (`/api/v1/status`, `/ui/`, `/metrics`): the
    /// body as text, for `kvfleet api`.
    pub(crate) async fn get_raw(&self, path: &str) -> Result<String, ApiError> {
        let url = format!("{}{path}", self.base);
        let (_, bytes) = self.exchange::<()>(Method::GET, &url, None).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// One request and its whole answer; an error status becomes [`ApiError::Status`] with the
    /// problem JSON it carried (or one made from the body).
    async fn exchange<B: Serialize + ?Sized>(
        &self,
        method: Method,
        url: &str,
        body: Option<&B>,
    ) -> Result<(StatusCode, Vec<u8>), ApiError> {
        let mut request = self.http.request(method, url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| ApiError::Unreachable {
            url: self.base.clone(),
            reason: error_chain(&e),
        })?;
        let status = response.status();
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = response.bytes().await.map_err(|e| ApiError::Unreachable {
            url: self.base.clone(),
            reason: error_chain(&e),
        })?;
        if !status.is_success() {
            let problem = serde_json::from_slice::<Problem>(&bytes)
                .ok()
                .filter(|p| p.status != 0 || !p.title.is_empty())
                .unwrap_or_else(|| Problem {
                    title: status.canonical_reason().unwrap_or("error").to_owned(),
                    status: status.as_u16(),
                    detail: String::from_utf8_lossy(&bytes)
                        .trim()
                        .chars()
                        .take(500)
                        .collect(),
                    ..Problem::default()
                });
            return Err(ApiError::Status {
                status,
                problem: Box::new(problem),
                request_id,
            });
        }
        Ok((status, bytes.to_vec()))
    }

    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ApiError> {
        self.send::<(), T>(Method::GET, path, query, None)
            .await?
            .ok_or_else(|| self.empty(path))
    }

    /// POST/PATCH with a JSON body, expecting a JSON answer.
    pub(crate) async fn write<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        self.send(method, path, &[], body)
            .await?
            .ok_or_else(|| self.empty(path))
    }

    /// DELETE; the answer (when there is one) is returned as JSON.
    pub(crate) async fn delete(&self, path: &str) -> Result<Option<serde_json::Value>, ApiError> {
        self.send::<(), serde_json::Value>(Method::DELETE, path, &[], None)
            .await
    }

    /// Every item of a list, following `next_cursor` (at most `max` items when given).
    pub(crate) async fn list<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        max: Option<usize>,
    ) -> Result<Vec<T>, ApiError> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let want = max.map_or(500, |m| m.saturating_sub(items.len()).clamp(1, 500));
            let mut q: Vec<(&str, String)> = query.to_vec();
            q.push(("limit", want.to_string()));
            if let Some(c) = &cursor {
                q.push(("cursor", c.clone()));
            }
            let page: Page<T> = self.get(path, &q).await?;
            items.extend(page.items);
            if max.is_some_and(|m| items.len() >= m) {
                items.truncate(max.unwrap_or(usize::MAX));
                return Ok(items);
            }
            match page.next_cursor {
                Some(next) if Some(&next) != cursor.as_ref() => cursor = Some(next),
                _ => return Ok(items),
            }
        }
    }

    fn empty(&self, path: &str) -> ApiError {
        ApiError::Decode {
            url: self.url(path),
            reason: "no body where one was expected".to_owned(),
        }
    }
}

/// `error: source: source`, because reqwest's top-level message ("error sending request") hides
/// the useful part ("Connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let more = inner.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalized() {
        for (input, want) in [
            ("127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("http://cp.example:8080/", "http://cp.example:8080"),
            ("http://cp.example:8080/api/v1/", "http://cp.example:8080"),
            ("http://cp.example", "http://cp.example"),
        ] {
            assert_eq!(normalize_url(input).as_deref(), Ok(want), "{input}");
        }
        assert_eq!(
            normalize_url("https://cp.example:8443/").unwrap(),
            "https://cp.example:8443"
        );
        for bad in ["ftp://x", "http://", ""] {
            assert!(normalize_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn statuses_map_to_exit_codes() {
        let status = |s: StatusCode| ApiError::Status {
            status: s,
            problem: Box::default(),
            request_id: None,
        };
        assert_eq!(
            status(StatusCode::UNAUTHORIZED).exit_code(),
            ExitCodeKind::Auth
        );
        assert_eq!(
            status(StatusCode::FORBIDDEN).exit_code(),
            ExitCodeKind::Auth
        );
        assert_eq!(
            status(StatusCode::NOT_FOUND).exit_code(),
            ExitCodeKind::NotFound
        );
        assert_eq!(
            status(StatusCode::UNPROCESSABLE_ENTITY).exit_code(),
            ExitCodeKind::Api
        );
        let unreachable = ApiError::Unreachable {
            url: "x".into(),
            reason: "refused".into(),
        };
        assert_eq!(unreachable.exit_code(), ExitCodeKind::Unreachable);
    }

    #[test]
    fn validation_problems_name_each_field() {
        let error = ApiError::Status {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            problem: Box::new(Problem {
                type_: "/api/v1/problems/validation".into(),
                title: "The request is invalid".into(),
                status: 422,
                detail: "sla.ttft_ms: must be > 0".into(),
                invalid_params: vec![InvalidParam {
                    name: "sla.ttft_ms".into(),
                    reason: "must be > 0".into(),
                }],
            }),
            request_id: None,
        };
        let text = error.to_string();
        assert!(text.contains("\n  sla.ttft_ms: must be > 0"), "{text}");
    }
}
