//! The control plane's agent endpoints over HTTP (`/api/v1/agent/*`), with the wire types of
//! `kvfleet_proto::api` and one error type the driver branches on.

use std::time::Duration;

use futures_util::future::BoxFuture;
use kvfleet_proto::api::{
    DesiredState, FleetDirectory, Heartbeat, HeartbeatResponse, IssuedCertificate, RegisterRequest,
    RegisterResponse, RenewRequest,
};
use kvfleet_proto::kv_stream::{KvEventBatch, KvEventBatchResult, KvSnapshot, KvStreamPage};
use reqwest::StatusCode;

use crate::frontend::response_store::{RemoteResponses, Stored};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpError {
    /// No answer: connection refused, reset, timed out. Retry with backoff.
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    /// 401: the bearer token is not (or no longer) valid: the node was removed or the
    /// credential revoked.
    #[error("the control plane refused the credential (401): {0}")]
    Unauthorized(String),
    /// 409 on registration: a live node already has this hostname.
    #[error("conflict (409): {0}")]
    Conflict(String),
    /// Any other error status, with the problem's detail.
    #[error("the control plane answered {status}: {detail}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The problem JSON's `detail` (or `title`, or the body).
        detail: String,
    },
    /// A 2xx whose body is not what the protocol says.
    #[error("unexpected response from the control plane: {0}")]
    BadResponse(String),
}

impl CpError {
    /// Whether retrying later may help without changing anything (server errors and
    /// unreachability); 4xx other than 401 mean this agent sends something wrong.
    pub fn is_transient(&self) -> bool {
        match self {
            CpError::Unreachable(_) | CpError::BadResponse(_) => true,
            CpError::Rejected { status, .. } => *status >= 500 || *status == 429,
            CpError::Unauthorized(_) | CpError::Conflict(_) => false,
        }
    }
}

/// A client for one control plane.
#[derive(Debug, Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
    timeout: Duration,
}

impl Api {
    /// A client for the control plane at `url` (`http://host:port` or `https://…`, no path),
    /// each call limited to `timeout` (long polls get their wait on top). `tls`: the config an
    /// `https` control plane is verified with (see `trust`); without it only `http` works.
    pub fn new(
        url: &str,
        timeout: Duration,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<Self, CpError> {
        let mut builder = reqwest::Client::builder().connect_timeout(timeout);
        builder = match tls {
            Some(tls) => builder.tls_backend_preconfigured(tls).https_only(true),
            None => builder.tls_certs_only([]),
        };
        let client = builder
            .build()
            .map_err(|e| CpError::Unreachable(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            client,
            base: url.trim_end_matches('/').to_owned(),
            timeout,
        })
    }

    /// `POST /api/v1/agent/register` with a join token or the node's credential.
    pub async fn register(
        &self,
        bearer: &str,
        request: &RegisterRequest,
    ) -> Result<RegisterResponse, CpError> {
        self.post("/api/v1/agent/register", bearer, request).await
    }

    /// `POST /api/v1/agent/heartbeat`.
    pub async fn heartbeat(
        &self,
        bearer: &str,
        beat: &Heartbeat,
    ) -> Result<HeartbeatResponse, CpError> {
        self.post("/api/v1/agent/heartbeat", bearer, beat).await
    }

    /// `GET /api/v1/agent/desired-state`: at once without `after`, else a long poll of up to
    /// `wait` for a generation other than `after`.
    pub async fn desired_state(
        &self,
        bearer: &str,
        after: Option<i64>,
        wait: Duration,
    ) -> Result<DesiredState, CpError> {
        let path = match after {
            Some(generation) => format!(
                "/api/v1/agent/desired-state?after_generation={generation}&wait_s={}",
                wait.as_secs()
            ),
            None => "/api/v1/agent/desired-state".to_owned(),
        };
        self.get(&path, bearer, self.timeout + wait).await
    }

    /// `POST /api/v1/agent/certificate`.
    pub async fn renew(
        &self,
        bearer: &str,
        request: &RenewRequest,
    ) -> Result<IssuedCertificate, CpError> {
        self.post("/api/v1/agent/certificate", bearer, request)
            .await
    }

    /// `POST /api/v1/agent/kv-events`: one batch of this node's KV events and workers' loads.
    pub async fn upload_kv_events(
        &self,
        bearer: &str,
        batch: &KvEventBatch,
    ) -> Result<KvEventBatchResult, CpError> {
        self.post("/api/v1/agent/kv-events", bearer, batch).await
    }

    /// `GET /api/v1/agent/fleet`: every running worker with its model and node's peer address.
    pub async fn fleet_directory(&self, bearer: &str) -> Result<FleetDirectory, CpError> {
        self.get("/api/v1/agent/fleet", bearer, self.timeout).await
    }

    /// `GET /api/v1/agent/kv-snapshot`: the whole fleet KV index as of one stream position.
    pub async fn kv_snapshot(&self, bearer: &str) -> Result<KvSnapshot, CpError> {
        // A snapshot of a large fleet is big: give it the long-poll allowance too.
        self.get("/api/v1/agent/kv-snapshot", bearer, self.timeout * 4)
            .await
    }

    /// `GET /api/v1/agent/kv-stream?after=..&loads_after=..&wait_s=..`: the changes after
    /// `after` and the loads reported since load version `loads_after`, waiting up to `wait`
    /// when there are none.
    pub async fn kv_stream(
        &self,
        bearer: &str,
        after: u64,
        loads_after: u64,
        wait: Duration,
    ) -> Result<KvStreamPage, CpError> {
        let path = format!(
            "/api/v1/agent/kv-stream?after={after}&loads_after={loads_after}&wait_s={}",
            wait.as_secs()
        );
        self.get(&path, bearer, self.timeout + wait).await
    }

    /// `PUT /api/v1/agent/responses/{id}`: store a response (`{"owner", "body"}`).
    pub async fn put_response(
        &self,
        bearer: &str,
        id: &str,
        stored: &Stored,
    ) -> Result<(), CpError> {
        let call = self
            .client
            .put(self.url(&format!("/api/v1/agent/responses/{id}")))
            .bearer_auth(bearer)
            .timeout(self.timeout)
            .json(stored);
        self.send_empty(call).await
    }

    /// `GET /api/v1/agent/responses/{id}`; `None` when the control plane has none.
    pub async fn get_response(&self, bearer: &str, id: &str) -> Result<Option<Stored>, CpError> {
        match self
            .get(
                &format!("/api/v1/agent/responses/{id}"),
                bearer,
                self.timeout,
            )
            .await
        {
            Ok(stored) => Ok(Some(stored)),
            Err(CpError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `DELETE /api/v1/agent/responses/{id}`; `false` when the control plane had none.
    pub async fn delete_response(&self, bearer: &str, id: &str) -> Result<bool, CpError> {
        let call = self
            .client
            .delete(self.url(&format!("/api/v1/agent/responses/{id}")))
            .bearer_auth(bearer)
            .timeout(self.timeout);
        match self.send_empty(call).await {
            Ok(()) => Ok(true),
            Err(CpError::Rejected { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `POST path` with `bearer` and a JSON body, within the call timeout.
    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        bearer: &str,
        body: &B,
    ) -> Result<T, CpError> {
        let call = self
            .client
            .post(self.url(path))
            .bearer_auth(bearer)
            .timeout(self.timeout)
            .json(body);
        self.send(call).await
    }

    /// `GET path` (with its query) with `bearer`, answered within `timeout`.
    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        bearer: &str,
        timeout: Duration,
    ) -> Result<T, CpError> {
        let call = self
            .client
            .get(self.url(path))
            .bearer_auth(bearer)
            .timeout(timeout);
        self.send(call).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// [`Api::send`] for calls answered with no body (204).
    async fn send_empty(&self, call: reqwest::RequestBuilder) -> Result<(), CpError> {
        match self.send::<serde_json::Value>(call).await {
            Ok(_) | Err(CpError::BadResponse(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn send<T: DeserializeOwned>(&self, call: reqwest::RequestBuilder) -> Result<T, CpError> {
        let response = call
            .send()
            .await
            .map_err(|e| CpError::Unreachable(describe(&e)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| CpError::Unreachable(describe(&e)))?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| CpError::BadResponse(e.to_string()));
        }
        let detail = problem_detail(&body);
        Err(match status {
            StatusCode::UNAUTHORIZED => CpError::Unauthorized(detail),
            StatusCode::CONFLICT => CpError::Conflict(detail),
            _ => CpError::Rejected {
                status: status.as_u16(),
                detail,
            },
        })
    }
}

/// The control plane's response store, for [`crate::frontend::response_store`], with the
/// node's current credential.
#[derive(Debug)]
pub struct RemoteStore {
    /// The client.
    pub api: Api,
    /// The node's credential.
    pub bearer: String,
}

impl RemoteResponses for RemoteStore {
    fn put(&self, id: String, stored: Stored) -> BoxFuture<'static, Result<(), String>> {
        let (api, bearer) = (self.api.clone(), self.bearer.clone());
        Box::pin(async move {
            api.put_response(&bearer, &id, &stored)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn get(&self, id: String) -> BoxFuture<'static, Result<Option<Stored>, String>> {
        let (api, bearer) = (self.api.clone(), self.bearer.clone());
        Box::pin(async move {
            api.get_response(&bearer, &id)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn delete(&self, id: String) -> BoxFuture<'static, Result<bool, String>> {
        let (api, bearer) = (self.api.clone(), self.bearer.clone());
        Box::pin(async move {
            api.delete_response(&bearer, &id)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// The problem JSON's `detail` (or `title`), or the start of the body.
fn problem_detail(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    parsed
        .as_ref()
        .and_then(|v| v.get("detail").or_else(|| v.get("title")))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

/// reqwest's error with its causes (the top level alone says only "error sending request").
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
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
    fn problem_details_and_transience() {
        assert_eq!(
            problem_detail(br#"{"title":"Conflict","detail":"a live node named \"a\" exists"}"#),
            "a live node named \"a\" exists"
        );
        assert_eq!(problem_detail(br#"{"title":"Not Found"}"#), "Not Found");
        assert_eq!(problem_detail(b"plain"), "plain");
        assert!(CpError::Unreachable("x".into()).is_transient());
        assert!(
            CpError::Rejected {
                status: 503,
                detail: String::new()
            }
            .is_transient()
        );
        assert!(
            !CpError::Rejected {
                status: 422,
                detail: String::new()
            }
            .is_transient()
        );
        assert!(!CpError::Unauthorized(String::new()).is_transient());
    }
}
