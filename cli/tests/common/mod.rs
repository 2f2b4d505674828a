//! Shared by the CLI's integration tests: a real control plane (the library, on 127.0.0.1:0)
//! over a throwaway database on `$DATABASE_URL`'s server, and a way to run the `kvfleet`
//! binary against it with a private login file.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use sqlx::Connection as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A control plane on its own database.
pub struct ControlPlane {
    pub addr: SocketAddr,
    pub admin_token: String,
    /// A directory for this test's files (the CLI's login file goes here).
    pub dir: PathBuf,
    admin_url: String,
    database: String,
    /// Serving https from a fleet-CA certificate; the CA's PEM (what `--ca-file` names).
    pub ca_pem: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// `postgres://u@h:p/db?x` with another database name.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, ""), |(b, q)| (b, q));
    let server = base.rsplit_once('/').map_or(base, |(s, _)| s);
    if query.is_empty() {
        format!("{server}/{database}")
    } else {
        format!("{server}/{database}?{query}")
    }
}

impl ControlPlane {
    /// Starts one, or returns `None` (after printing why) when `$DATABASE_URL` is not set.
    pub async fn start(test: &str) -> Option<ControlPlane> {
        Self::start_with(test, false).await
    }

    /// [`ControlPlane::start`], serving https (`[tls] mode = "fleet-ca"`) when `https`.
    pub async fn start_with(test: &str, https: bool) -> Option<ControlPlane> {
        let Some(admin_url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
            eprintln!(
                "skipped {test}: DATABASE_URL is not set (source scripts/lib/common.sh && \
                 ensure_test_postgres)"
            );
            return None;
        };
        let database = format!("kvfleet_cli_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("connecting to DATABASE_URL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.ok();

        let admin_token = kvfleet_controlplane::auth::generate_token();
        let mut config = kvfleet_controlplane::Config::new(with_database(&admin_url, &database));
        config.auth.bootstrap_admin_token = Some(admin_token.clone());
        config.database.max_connections = 8;
        config.ca.key_file =
            std::env::temp_dir().join(format!("kvfleet-cli-test-{database}-ca.key"));
        // Approval required: the CLI tests approve and reject joins themselves.
        config.join.auto_approve = false;
        if https {
            config.tls = kvfleet_controlplane::config::TlsConfig::FleetCa {
                names: vec!["127.0.0.1".into()],
            };
        }
        let database_url = config.database.url.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(kvfleet_controlplane::run(config, listener, async move {
            let _ = stopped.await;
        }));
        let dir = std::env::temp_dir().join(format!("kvfleet-cli-test-{database}"));
        std::fs::create_dir_all(&dir).unwrap();
        let cp = ControlPlane {
            addr,
            admin_token,
            dir,
            admin_url,
            database,
            ca_pem: None,
            stop: Some(stop),
            task: Some(task),
        };
        if https {
            // Started when its CA is in the database and its port answers TLS.
            let mut cp = cp;
            let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
            for _ in 0..200 {
                let ca: Option<(String,)> = sqlx::query_as("SELECT cert_pem FROM node_ca LIMIT 1")
                    .fetch_optional(&pool)
                    .await
                    .unwrap_or(None);
                if let Some((pem,)) = ca
                    && tokio::net::TcpStream::connect(cp.addr).await.is_ok()
                {
                    cp.ca_pem = Some(pem);
                    pool.close().await;
                    return Some(cp);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the https control plane did not start");
        }
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if client
                .get(format!("{}/api/v1/status", cp.url()))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Some(cp);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the control plane did not start");
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The login file the CLI uses in this test.
    pub fn cli_config(&self) -> PathBuf {
        self.dir.join("cli.toml")
    }

    /// Runs `kvfleet ARGS` with this test's login file, no KVFLEET_URL/KVFLEET_TOKEN unless
    /// `env` sets them, and `stdin` on standard input.
    pub async fn kvfleet(&self, args: &[&str], env: &[(&str, &str)], stdin: &str) -> Run {
        kvfleet_with(&self.cli_config(), args, env, stdin).await
    }

    /// `kvfleet ARGS` as the admin (through the environment, not the login file).
    pub async fn admin(&self, args: &[&str]) -> Run {
        let url = self.url();
        self.kvfleet(
            args,
            &[("KVFLEET_URL", &url), ("KVFLEET_TOKEN", &self.admin_token)],
            "",
        )
        .await
    }

    /// Writes a file into the test directory and returns its path.
    pub fn file(&self, name: &str, text: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("the control plane stops within 20 s")
                .unwrap()
                .unwrap();
        }
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            )))
            .execute(&mut conn)
            .await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The outcome of one `kvfleet` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    #[track_caller]
    pub fn expect(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "{self:?}");
        self
    }
}

pub async fn kvfleet_with(
    config: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: &str,
) -> Run {
    use tokio::io::AsyncWriteExt as _;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvfleet"));
    command
        .args(args)
        .env("KVFLEET_CLI_CONFIG", config)
        .env_remove("KVFLEET_URL")
        .env_remove("KVFLEET_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let output: Output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("kvfleet finishes within 60 s")
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
