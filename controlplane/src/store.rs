//! The Postgres store. The schema lives in `migrations/` at the workspace root and is embedded
//! into the binary, so a control plane always knows exactly which schema it was built for.

use sqlx::PgPool;
use sqlx::migrate::{MigrateError, Migrator};

/// Every migration this build knows, in order.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Brings the database up to this build's schema. sqlx takes a Postgres advisory lock while it
/// migrates, so replicas starting together apply each migration once.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    MIGRATOR.run(pool).await
}
