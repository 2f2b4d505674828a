//! The kvfleet control plane as a library; `main.rs` only parses arguments and calls in here.
//!
//! [`run`] serves the REST API on a listener it is given (tests bind `127.0.0.1:0`) until the
//! shutdown future completes, and takes part in the leader election that runs the background
//! loops (placement, liveness, metrics maintenance) on exactly one replica.
//!
//! - [`config`]: typed configuration from file + environment + flags.
//! - [`store`]: the Postgres schema (migrations embedded from `migrations/`), audit rows,
//!   desired-state generations.
//! - [`auth`]: bearer tokens, roles, the authorization matrix; [`auth_gate`]: the verified-token
//!   cache and the per-address failed-authentication budget in front of the token lookup.
//! - [`api`]: `/api/v1` handlers, problem JSON, the OpenAPI document, wire types.
//! - [`ca`]: the node CA issuing agents' peer certificates; [`ca_key`]: its private key sealed
//!   at rest under a key file on the control-plane hosts.
//! - [`placement`] and [`liveness`]: pure decisions; [`leader`]: the election and the loops
//!   that apply them; [`metrics`]: fleet metrics from heartbeats.
//! - [`systemd`]: `READY=1` / `WATCHDOG=1` / `STOPPING=1` for the `Type=notify` unit.
//! - [`kv_index`]: the KV index authority: event uploads, the sequenced stream, snapshots.
//! - [`planner`]: the SLA planner's loop and the deployments' policies (the pure decisions are
//!   in `kvfleet-planner`).
//! - `rows`: decoding the API's resources from Postgres rows, shared by the API, the leader's
//!   loops and the planner (so none of them imports another for it).
//! - [`ui`]: the admin web UI's static files (from `web-ui/`), served under `/ui/`.
//! - [`telemetry`]: the one Prometheus registry every module registers into, served at
//!   `/metrics`; [`fleet_gauges`]: the inventory and SLA targets as gauges.
//!
//! - [`tls`]: HTTPS for the API and the UI (`[tls]`): the operator's certificate or one the
//!   fleet CA issues (and renews), and a listener with concurrent, time-limited handshakes.

/// A query string built with `format!` from compile-time constants only (column lists, lock
/// clauses); never from input. Every value from a request is a bind parameter.
macro_rules! sql {
    ($($arg:tt)*) => {
        sqlx::AssertSqlSafe(format!($($arg)*))
    };
}

pub mod api;
pub mod auth;
pub mod auth_gate;
pub mod ca;
pub mod ca_key;
pub mod config;
pub mod fleet_gauges;
pub mod kv_index;
pub mod leader;
pub mod liveness;
pub mod metrics;
pub mod placement;
pub mod planner;
pub(crate) mod rows;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod ui;

use std::future::{Future, IntoFuture as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};

pub use config::Config;

/// Shared by every request handler and background loop of one replica.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
pub struct Inner {
    /// The admin pool: REST API and web UI requests (`database.max_connections`).
    pub pool: PgPool,
    /// The agent pool: join, heartbeat, desired state, KV events, certificate renewal
    /// (`database.agent_max_connections`), so an API flood cannot starve heartbeats.
    pub agent_pool: PgPool,
    /// The leader's loops (`database.leader_max_connections`).
    pub leader_pool: PgPool,
    /// The verified-token cache and failed-authentication budget in front of token lookups.
    pub auth_gate: auth_gate::AuthGate,
    /// The leader epoch this replica holds while it leads (the fence its loops' writes check).
    pub fence: std::sync::Mutex<Option<leader::Fence>>,
    pub config: Config,
    pub ca: ca::NodeCa,
    /// The fleet's block-hash secret, derived from the CA sealing key (`ca_key`) and handed to
    /// agents in their desired state. Never logged (`Debug` redacts it), never in an admin
    /// response.
    pub fleet_hash_secret: kvfleet_proto::hash::FleetHashSecret,
    /// The API's HTTPS identity; `None` serves plain HTTP (`[tls] mode = "off"`).
    pub tls: Option<tls::ServerTls>,
    /// Node ids whose desired-state generation changed (fed from Postgres NOTIFY, so changes
    /// made by any replica wake this replica's watchers).
    pub desired_changed: broadcast::Sender<uuid::Uuid>,
    /// Flips to true when the replica starts shutting down; long polls return at once.
    pub stopping: watch::Sender<bool>,
    /// The fleet-wide KV block index, rebuilt from Postgres at start.
    pub kv: kv_index::KvIndex,
    leader: AtomicBool,
    /// The registry behind `/metrics`, and the handles each module records through.
    pub telemetry: telemetry::Telemetry,
    pub http: api::HttpMetrics,
    pub agents: api::agent::AgentMetrics,
    pub db: store::DbMetrics,
    pub leader_metrics: leader::LeaderMetrics,
    pub fleet_gauges: fleet_gauges::FleetGauges,
}

impl std::ops::Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// Builds the state from a migrated pool (loads or creates the node CA).
    pub async fn new(pool: PgPool, config: Config) -> anyhow::Result<Self> {
        Self::with_kv_config(pool, config, kv_index::KvIndexConfig::default()).await
    }

    /// [`AppState::new`] with KV index tuning (tests shorten its retention and intervals).
    pub async fn with_kv_config(
        pool: PgPool,
        config: Config,
        kv: kv_index::KvIndexConfig,
    ) -> anyhow::Result<Self> {
        let kv = kv_index::KvIndex::load(&pool, kv)
            .await
            .context("rebuilding the KV index from Postgres")?;
        let (ca, sealing) =
            ca_key::load_or_create(&pool, &config.ca.key_file, config.ca.ca_validity)
                .await
                .context("loading the node CA")?;
        let fleet_hash_secret = sealing.fleet_hash_secret();
        let tls = tls::ServerTls::new(
            &config.tls,
            &ca,
            config.ca.cert_validity,
            chrono::Utc::now(),
        )
        .context("setting up HTTPS ([tls])")?;
        // Watchers that fall behind re-read the database, so a small buffer is enough.
        let (desired_changed, _) = broadcast::channel(4096);
        // Each module registers its metrics; the registry is frozen before serving.
        let mut registry = telemetry::registry();
        let http = api::HttpMetrics::register(&mut registry);
        let agents = api::agent::AgentMetrics::register(&mut registry);
        let db = store::DbMetrics::register(&mut registry, &pool);
        let leader_metrics = leader::LeaderMetrics::register(&mut registry);
        let fleet_gauges = fleet_gauges::FleetGauges::register(&mut registry);
        kv.register_metrics(&mut registry);
        let auth_gate = auth_gate::AuthGate::new(&config.auth, &mut registry);
        // Same server and credentials as the admin pool; opened lazily, as traffic arrives.
        let side_pool = |max: u32| {
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(config.database.connect_timeout)
                .connect_lazy_with((*pool.connect_options()).clone())
        };
        let agent_pool = side_pool(config.database.agent_max_connections);
        let leader_pool = side_pool(config.database.leader_max_connections);
        store::register_pool_metrics(&mut registry, "agent", &agent_pool);
        store::register_pool_metrics(&mut registry, "leader", &leader_pool);
        Ok(AppState(Arc::new(Inner {
            pool,
            agent_pool,
            leader_pool,
            auth_gate,
            fence: std::sync::Mutex::new(None),
            config,
            ca,
            fleet_hash_secret,
            tls,
            desired_changed,
            stopping: watch::channel(false).0,
            kv,
            leader: AtomicBool::new(false),
            telemetry: telemetry::Telemetry::new(registry),
            http,
            agents,
            db,
            leader_metrics,
            fleet_gauges,
        })))
    }

    /// Whether this replica currently holds the leader lock.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    fn set_leader(&self, fence: Option<leader::Fence>) {
        let leader = fence.is_some();
        *self
            .fence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fence;
        self.leader.store(leader, Ordering::Relaxed);
        self.leader_metrics.set_leading(leader);
    }

    /// The fence this replica's leader loops write under; `None` unless it leads.
    pub fn fence(&self) -> Option<leader::Fence> {
        *self
            .fence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The pool a request needing `permission` uses: agent traffic (`Agent`, `Register`) the
    /// agent pool, everything else the admin pool.
    pub fn pool_for_permission(&self, permission: auth::Permission) -> &PgPool {
        match permission {
            auth::Permission::Agent | auth::Permission::Register => &self.agent_pool,
            _ => &self.pool,
        }
    }

    /// The pool for a caller of `role` (agents and join tokens: the agent pool).
    pub fn pool_for(&self, role: auth::Role) -> &PgPool {
        match role {
            auth::Role::Agent | auth::Role::Join => &self.agent_pool,
            _ => &self.pool,
        }
    }
}

/// Connects, migrates, bootstraps the admin token if needed, then serves on `listener` until
/// `shutdown` completes. Background tasks stop with it; in-flight requests get to finish.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_notifying(config, listener, shutdown, None).await
}

/// [`run`], telling systemd (when `notifier` is set) when it is ready, that it is alive, and
/// when it stops.
pub async fn run_notifying(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    notifier: Option<systemd::Notifier>,
) -> anyhow::Result<()> {
    let pool = store::connect(&config.database)
        .await
        .with_context(|| format!("connecting to {}", config::redact_url(&config.database.url)))?;
    store::migrate(&pool)
        .await
        .context("migrating the database")?;
    if bootstrap_admin(&pool, &config).await?.is_some() {
        // The path only: the token itself never goes to a log line.
        tracing::warn!(
            path = %config.auth.bootstrap_token_file.display(),
            "created the first admin token and wrote it to this file (mode 0600); \
             store it safely and delete the file"
        );
    }
    if config.join.auto_approve {
        // Said at every start: with it, a leaked join token alone puts a machine in the fleet.
        tracing::warn!(
            "[join] auto_approve is on: every node a join token registers is admitted without \
             an admin's approval (labs and `kvfleet dev` only)"
        );
    }
    let state = AppState::new(pool, config).await?;
    serve_notifying(state, listener, shutdown, notifier).await
}

/// How long in-flight requests may run once shutdown begins.
pub const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves an already-built state (the bench and tests that need the state use this).
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_notifying(state, listener, shutdown, None).await
}

async fn serve_notifying(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    notifier: Option<systemd::Notifier>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(notifier) = &notifier {
        // Migrated, CA loaded, listener bound: requests are accepted from here on.
        if let Err(error) = notifier.notify("READY=1") {
            tracing::warn!(%error, "cannot notify systemd");
        }
        if let Some(interval) = notifier.watchdog_interval() {
            tasks.spawn(watchdog(notifier.clone(), interval, stop_rx.clone()));
        }
    }
    tasks.spawn(leader::run_elections(state.clone(), stop_rx.clone()));
    tasks.spawn(api::agent::forward_notifications(
        state.clone(),
        stop_rx.clone(),
    ));
    tasks.spawn(kv_index::run(state.clone(), stop_rx.clone()));
    tasks.spawn(fleet_gauges::run(state.clone(), stop_rx.clone()));

    let app = api::router(state.clone());
    let local = listener.local_addr().ok();
    let ca_fingerprint = state.ca.fingerprint();
    let mut http_stop = stop_rx.clone();
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let stopping = state.clone();
    let stop_notifier = notifier.clone();
    let graceful = async move {
        tokio::select! {
            () = shutdown => {}
            _ = http_stop.changed() => {}
        }
        // Wake long polls so they answer now instead of holding the drain open.
        stopping.stopping.send_replace(true);
        if let Some(notifier) = &stop_notifier {
            let _ = notifier.notify("STOPPING=1");
        }
        let _ = fired_tx.send(());
    };
    let served = match &state.tls {
        Some(server_tls) => {
            tracing::info!(addr = ?local, %ca_fingerprint, "serving /api/v1 over HTTPS (agents pin this fleet CA fingerprint)");
            tasks.spawn(renew_certificate(
                state.clone(),
                server_tls.clone(),
                stop_rx.clone(),
            ));
            serve_until_drained(server_tls.listener(listener), app, graceful, fired_rx).await
        }
        None => {
            tracing::info!(addr = ?local, "serving /api/v1 over plain HTTP ([tls] mode = \"off\": loopback or behind a TLS proxy only)");
            serve_until_drained(listener, app, graceful, fired_rx).await
        }
    };
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    state.pool.close().await;
    state.agent_pool.close().await;
    state.leader_pool.close().await;
    served.context("serving HTTP")
}

/// Serves `app` on `listener` until `graceful` completes, then lets requests finish for at most
/// [`DRAIN_DEADLINE`] (counted from when `fired` says the drain began).
async fn serve_until_drained<L>(
    listener: L,
    app: axum::Router,
    graceful: impl Future<Output = ()> + Send + 'static,
    fired: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
    for<'a> api::ClientAddr:
        axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, L>>,
{
    // The peer address rides along for the failed-authentication budget.
    let app = app.into_make_service_with_connect_info::<api::ClientAddr>();
    let serving = axum::serve(listener, app).with_graceful_shutdown(graceful);
    tokio::select! {
        served = serving.into_future() => served,
        () = async {
            if fired.await.is_ok() {
                tokio::time::sleep(DRAIN_DEADLINE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!("requests still running after the {DRAIN_DEADLINE:?} drain deadline; closing");
            Ok(())
        }
    }
}

/// Reissues the fleet-CA HTTPS certificate when it is due (checked hourly).
async fn renew_certificate(
    state: AppState,
    server_tls: tls::ServerTls,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match server_tls.renew(&state.ca, state.config.ca.cert_validity, chrono::Utc::now()) {
            Ok(true) => tracing::info!("renewed the control plane's HTTPS certificate"),
            Ok(false) => {}
            Err(error) => {
                tracing::error!(%error, "renewing the control plane's HTTPS certificate failed; retrying in an hour")
            }
        }
        if store::sleep_or_shutdown(std::time::Duration::from_secs(3600), &mut stop).await {
            return;
        }
    }
}

/// Pings the systemd watchdog while the server runs.
async fn watchdog(
    notifier: systemd::Notifier,
    interval: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if let Err(error) = notifier.notify("WATCHDOG=1") {
            tracing::warn!(%error, "cannot ping the systemd watchdog");
        }
        if store::sleep_or_shutdown(interval, &mut stop).await {
            return;
        }
    }
}

/// Makes sure an admin can get in. With `auth.bootstrap_admin_token` set, that token is
/// inserted if its prefix is not known yet. Otherwise, when no live admin token exists, one is
/// created, written to `auth.bootstrap_token_file` (0600) before the transaction commits (a
/// token nobody can read is not committed) and returned. Serialized by an advisory lock so
/// replicas starting together create one token, not two.
pub async fn bootstrap_admin(pool: &PgPool, config: &Config) -> anyhow::Result<Option<String>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(leader::BOOTSTRAP_LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let created = if let Some(token) = &config.auth.bootstrap_admin_token {
        let prefix = auth::parse_token(token)
            .map_err(|e| anyhow::anyhow!("auth.bootstrap_admin_token: {e}"))?
            .prefix
            .to_owned();
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_tokens WHERE prefix = $1)")
                .bind(&prefix)
                .fetch_one(&mut *tx)
                .await?;
        if !exists {
            create_admin(&mut tx, "bootstrap", Some(token)).await?;
        }
        None
    } else {
        let any_admin: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL
             AND (expires_at IS NULL OR expires_at > now()))",
        )
        .fetch_one(&mut *tx)
        .await?;
        if any_admin {
            None
        } else {
            let token = create_admin(&mut tx, "bootstrap", None).await?;
            let path = &config.auth.bootstrap_token_file;
            write_private(path, &format!("{token}\n")).with_context(|| {
                format!(
                    "writing the first admin token to {} (auth.bootstrap_token_file)",
                    path.display()
                )
            })?;
            Some(token)
        }
    };
    tx.commit().await?;
    Ok(created)
}

/// Writes `text` to `path` readable by its owner only, replacing what was there: the one writer
/// of token files for the control plane and the `kvfleet` CLI. A missing parent directory is
/// made owner-only (0700); the text goes to a temporary file created 0600 (never briefly wider,
/// its mode narrowed again in case a crashed run left one wider) that is synced and renamed over
/// `path`, so a reader sees the old file or the whole new one.
pub fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
    // systemd's StateDirectory= makes the default directory; started by hand (or on a host
    // without the unit) it may not exist yet.
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Creates an admin token (with its audit row) inside `tx`; returns the plain token.
pub async fn create_admin(
    tx: &mut sqlx::PgConnection,
    name: &str,
    token: Option<&str>,
) -> anyhow::Result<String> {
    create_token(tx, name, auth::Role::Admin, token).await
}

/// Creates a token of any non-agent role as the local operator (CLI, bootstrap).
pub async fn create_token(
    tx: &mut sqlx::PgConnection,
    name: &str,
    role: auth::Role,
    token: Option<&str>,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        role != auth::Role::Agent,
        "agent credentials are minted by registration"
    );
    let new = auth::NewToken {
        name,
        role,
        node_id: None,
        created_by: None,
        expires_at: None,
        // The local operator's tokens (break-glass CLI, tests, benches) are unlimited; the
        // REST API's join tokens are single-use by default.
        uses: None,
    };
    let (id, token) = auth::insert_token(tx, &new, token).await?;
    store::audit(
        tx,
        store::AuditEntry {
            actor_token: None,
            actor: "local operator",
            action: "token.create",
            target_type: "token",
            target_id: Some(id.to_string()),
            before: None,
            after: Some(serde_json::json!({ "name": name, "role": role.as_str() })),
            request_id: None,
        },
    )
    .await?;
    Ok(token)
}
