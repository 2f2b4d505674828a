//! The one way an API handler changes something: [`Change`] is a transaction that commits only
//! together with the change's audit row (who, which request, what before and after), so a
//! handler cannot commit a change and forget its record, and no handler writes the begin,
//! audit, commit sequence by hand.

use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, Postgres, Transaction};

use super::problem::ApiError;
use crate::AppState;
use crate::auth::Principal;
use crate::store::{self, AuditEntry};

/// A change in progress by `caller`: run its statements on it (it dereferences to the
/// transaction's connection), then [`Change::commit`] with what it did. Dropped without a
/// commit (an error returned early), it rolls back.
#[derive(Debug)]
pub struct Change<'a> {
    tx: Transaction<'static, Postgres>,
    caller: &'a Principal,
}

impl<'a> Change<'a> {
    /// Opens the change's transaction.
    pub async fn begin(state: &AppState, caller: &'a Principal) -> Result<Self, ApiError> {
        Ok(Self {
            tx: state.pool_for(caller.role).begin().await?,
            caller,
        })
    }

    /// Writes the audit row (`action` on `target_type` `target_id`, with the target's state
    /// before and after) and commits it with the change.
    pub async fn commit(
        mut self,
        action: &str,
        target_type: &str,
        target_id: impl ToString,
        before: Option<Value>,
        after: Option<Value>,
    ) -> Result<(), ApiError> {
        store::audit(
            &mut self.tx,
            AuditEntry {
                actor_token: Some(self.caller.token_id),
                request_id: self.caller.request_id.clone(),
                actor: &self.caller.actor,
                action,
                target_type,
                target_id: Some(target_id.to_string()),
                before,
                after,
            },
        )
        .await?;
        self.tx.commit().await?;
        Ok(())
    }
}

impl std::ops::Deref for Change<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for Change<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}

/// A value as audit JSON (`None` if it does not serialize, which our wire types always do).
pub fn json<T: Serialize>(value: &T) -> Option<Value> {
    serde_json::to_value(value).ok()
}
