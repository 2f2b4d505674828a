//! Postgres going away and coming back, on a private cluster this test starts (the shared test
//! cluster must never be restarted). While the database is down the API answers 503 problem
//! JSON and the leader steps down; when it returns, requests, heartbeats, leadership and
//! placement resume without restarting the control plane.
//!
//! Needs root (PostgreSQL runs as the `postgres` user via `runuser`) and a PostgreSQL server
//! under /usr/lib/postgresql; skips with a printed reason otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl Cluster {
    fn pg_ctl(&self, args: &[&str]) {
        let status = self.pg_ctl_status(args);
        assert!(
            status.success(),
            "pg_ctl {args:?} failed; its log:\n{}",
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn pg_ctl_status(&self, args: &[&str]) -> std::process::ExitStatus {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "30"]);
        command.args(args);
        if args.first() == Some(&"start") {
            command.args(["-o", &options]);
        }
        command.status().unwrap()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a private cluster, or says why it cannot.
fn private_cluster() -> Result<Cluster, String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| format!("id: {e}"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root (PostgreSQL must be started as the postgres user)".into());
    }
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| "no PostgreSQL under /usr/lib/postgresql".to_owned())?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .max()
        .ok_or("no initdb under /usr/lib/postgresql/*/bin")?;
    let dir = PathBuf::from(format!(
        "/var/tmp/kvfleet-cp-resilience-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    chown_postgres(&dir)?;
    let status = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join("initdb"))
        .arg("-D")
        .arg(dir.join("data"))
        .args(["--auth=trust", "-U", "postgres"])
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("runuser: {e}"))?;
    if !status.success() {
        return Err("initdb failed".into());
    }
    let mut cluster = Cluster { bin, dir, port: 0 };
    // The port is free when picked but other tests bind ephemeral ports concurrently, so one
    // may take it before the server does: pick again when the start fails.
    for _ in 0..5 {
        cluster.port = {
            let socket = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            socket.local_addr().map_err(|e| e.to_string())?.port()
        };
        if cluster.pg_ctl_status(&["start"]).success() {
            return Ok(cluster);
        }
        eprintln!(
            "private PostgreSQL did not start on port {}; its log:\n{}",
            cluster.port,
            cluster.log_text()
        );
    }
    panic!("private PostgreSQL did not start in 5 tries (logs above)");
}

fn chown_postgres(dir: &Path) -> Result<(), String> {
    let status = Command::new("chown")
        .arg("postgres:postgres")
        .arg(dir)
        .status()
        .map_err(|e| e.to_string())?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| "chown failed (no postgres user?)".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_rides_out_a_postgres_restart() {
    let cluster = match private_cluster() {
        Ok(cluster) => cluster,
        Err(reason) => {
            eprintln!("skipped: {reason}");
            return;
        }
    };
    let mut config = test_config();
    config.database.url = cluster.url();
    config.database.connect_timeout = Duration::from_secs(1);
    let admin = kvfleet_controlplane::auth::generate_token();
    config.auth.bootstrap_admin_token = Some(admin.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kvfleet_controlplane::run(config, listener, async move {
        let _ = stopped.await;
    }));
    let url = |path: &str| format!("{base}{path}");
    let leader =
        || async { call(Method::GET, &url("/status"), None, None).await.body["leader"] == true };
    eventually(Duration::from_secs(10), "the server to lead", || async {
        leader().await.then_some(())
    })
    .await;
    let join = call(
        Method::POST,
        &url("/tokens"),
        Some(&admin),
        Some(&json!({"name": "join", "role": "join"})),
    )
    .await;
    let join = join.body["secret"].as_str().unwrap().to_owned();
    let registered = call(
        Method::POST,
        &url("/agent/register"),
        Some(&join),
        Some(&register_body("gpu-a", 1)),
    )
    .await;
    assert_eq!(registered.status, StatusCode::OK);
    let agent = registered.body["credential"].as_str().unwrap().to_owned();
    let node = registered.body["node_id"].as_str().unwrap().to_owned();

    cluster.pg_ctl(&["-m", "fast", "stop"]);
    // Down: clear 503 problems, no hangs, and the leader steps down.
    for (method, path, token) in [
        (Method::GET, "/nodes", &admin),
        (Method::POST, "/agent/heartbeat", &agent),
    ] {
        let started = tokio::time::Instant::now();
        let r = call(method.clone(), &url(path), Some(token), Some(&json!({}))).await;
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{method} {path}: {r:?}"
        );
        assert_eq!(r.content_type, "application/problem+json");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    eventually(
        Duration::from_secs(10),
        "the leader to step down",
        || async { (!leader().await).then_some(()) },
    )
    .await;
    // /metrics answers from memory while the database is away, and shows the outage.
    let metrics = reqwest::get(base.replace("/api/v1", "/metrics"))
        .await
        .unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.unwrap();
    let api_errors = sample(&text, "kvfleet_cp_db_errors_total{source=\"api\"}");
    assert!(
        api_errors >= 2.0,
        "both 503s count as database errors: {api_errors}\n{text}"
    );
    assert_eq!(sample(&text, "kvfleet_cp_leader"), 0.0, "{text}");

    cluster.pg_ctl(&["start"]);
    // Back: everything resumes on its own.
    eventually(Duration::from_secs(15), "the API to answer", || async {
        (call(Method::GET, &url("/nodes"), Some(&admin), None)
            .await
            .status
            == StatusCode::OK)
            .then_some(())
    })
    .await;
    let beat = call(
        Method::POST,
        &url("/agent/heartbeat"),
        Some(&agent),
        Some(&json!({})),
    )
    .await;
    assert_eq!(beat.status, StatusCode::OK);
    eventually(Duration::from_secs(15), "leadership to return", || async {
        leader().await.then_some(())
    })
    .await;
    call(
        Method::POST,
        &url("/models"),
        Some(&admin),
        Some(&json!({"name": "m", "format": "mock", "path": "/m"})),
    )
    .await;
    let d = call(
        Method::POST,
        &url("/deployments"),
        Some(&admin),
        Some(&json!({"name": "d", "model": "m"})),
    )
    .await;
    assert_eq!(d.status, StatusCode::CREATED, "{d:?}");
    eventually(
        Duration::from_secs(10),
        "placement after the restart",
        || async {
            let w = call(
                Method::GET,
                &url(&format!("/workers?node_id={node}")),
                Some(&admin),
                None,
            )
            .await;
            (w.body["items"].as_array().is_some_and(|a| a.len() == 1)).then_some(())
        },
    )
    .await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// The value of the sample named exactly `series` (name and labels) in Prometheus text.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Postgres over TLS, verified (`sslmode=verify-full` with the operator's CA in `sslrootcert`):
/// the control plane connects, migrates and serves over it; a server whose certificate is not
/// from that CA is refused, and so is a plain connection to a server that allows only TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_talks_to_postgres_over_verified_tls() {
    let cluster = match private_cluster() {
        Ok(cluster) => cluster,
        Err(reason) => {
            eprintln!("skipped: {reason}");
            return;
        }
    };
    // The database's certificate comes from an operator's CA (a fresh one here), for
    // `localhost` and 127.0.0.1.
    let now = chrono::Utc::now();
    let day = Duration::from_secs(86_400);
    let (pg_ca, _) = kvfleet_controlplane::ca::NodeCa::generate("db CA", now, day * 30).unwrap();
    let server_cert = pg_ca
        .issue_server(&["localhost".into(), "127.0.0.1".into()], now, day)
        .unwrap();
    let (foreign_ca, _) =
        kvfleet_controlplane::ca::NodeCa::generate("another CA", now, day * 30).unwrap();
    let data = cluster.dir.join("data");
    std::fs::write(data.join("server.crt"), &server_cert.cert_pem).unwrap();
    std::fs::write(
        data.join("server.key"),
        server_cert.private_key_pem.as_deref().unwrap(),
    )
    .unwrap();
    let root = cluster.dir.join("db-ca.pem");
    std::fs::write(&root, pg_ca.cert_pem()).unwrap();
    let foreign = cluster.dir.join("foreign-ca.pem");
    std::fs::write(&foreign, foreign_ca.cert_pem()).unwrap();
    for file in ["server.crt", "server.key"] {
        use std::os::unix::fs::PermissionsExt as _;
        let path = data.join(file);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let status = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
    }
    // TCP only over TLS, with a password (scram); the socket stays trusted for the set-up.
    let password = "tls-test-password";
    let psql = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(cluster.bin.join("psql"))
        .arg("-h")
        .arg(&cluster.dir)
        .args(["-p", &cluster.port.to_string(), "-q", "-c"])
        .arg(format!("ALTER ROLE postgres PASSWORD '{password}'"))
        .status()
        .unwrap();
    assert!(psql.success());
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .unwrap();
    std::io::Write::write_all(&mut conf, b"\nssl = on\n").unwrap();
    drop(conf);
    cluster.pg_ctl(&["-m", "fast", "restart"]);

    let url = |host: &str, mode: &str, root: &Path| {
        format!(
            "postgres://postgres:{password}@{host}:{}/postgres?sslmode={mode}&sslrootcert={}",
            cluster.port,
            root.display()
        )
    };
    let connect = |url: String| async move {
        let mut config = test_config();
        config.database.url = url;
        config.database.max_connections = 2;
        config.database.connect_timeout = Duration::from_secs(5);
        kvfleet_controlplane::store::connect(&config.database).await
    };

    let pool = connect(url("localhost", "verify-full", &root))
        .await
        .expect("verify-full with the database's CA connects");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl, "the connection is encrypted");
    pool.close().await;

    let err = connect(url("localhost", "verify-full", &foreign))
        .await
        .expect_err("a certificate from another CA is refused");
    assert!(
        format!("{err}").to_lowercase().contains("certificate"),
        "{err}"
    );
    let err = connect(url("127.0.0.1", "disable", &root))
        .await
        .expect_err("a plain connection is refused by a TLS-only server");
    assert!(format!("{err}").contains("no encryption"), "{err}");

    // The control plane itself: migrates and serves over the verified connection.
    let mut config = test_config();
    config.database.url = url("localhost", "verify-full", &root);
    let admin = kvfleet_controlplane::auth::generate_token();
    config.auth.bootstrap_admin_token = Some(admin.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kvfleet_controlplane::run(config, listener, async move {
        let _ = stopped.await;
    }));
    eventually(Duration::from_secs(15), "the API to answer", || async {
        (call(Method::GET, &format!("{base}/nodes"), Some(&admin), None)
            .await
            .status
            == StatusCode::OK)
            .then_some(())
    })
    .await;
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
