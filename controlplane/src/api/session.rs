//! `GET /api/v1/whoami`: who the caller's token says it is, and what it may do.
//!
//! Clients (the web UI, the CLI) show or hide actions by role instead of trying them and
//! reading 403s. Read-only and side-effect free; it does not reveal anything the caller could
//! not learn by calling the other routes.

use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::extract::{Caller, Read};
use super::problem::Problem;
use crate::auth::{Permission, Role};

/// The caller's token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub token_id: Uuid,
    /// `name (prefix)`, as the audit log records the caller.
    pub actor: String,
    pub role: Role,
    /// What the role allows: `read`, `operate`, `admin` (see the authorization matrix).
    pub permissions: Vec<String>,
}

/// The caller's identity and permissions (viewer+; agent and join tokens get 403).
#[utoipa::path(get, path = "/api/v1/whoami", tag = "tokens",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = WhoAmI), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn whoami(caller: Caller<Read>) -> Json<WhoAmI> {
    let role = caller.principal.role;
    let permissions = [
        (Permission::Read, "read"),
        (Permission::Operate, "operate"),
        (Permission::Admin, "admin"),
    ]
    .into_iter()
    .filter(|(p, _)| role.allows(*p))
    .map(|(_, name)| name.to_owned())
    .collect();
    Json(WhoAmI {
        token_id: caller.principal.token_id,
        actor: caller.principal.actor,
        role,
        permissions,
    })
}
