//! The `kvfleet-controlplane` binary: check-config, migrate, token create/generate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use kvfleet_controlplane::auth;
use sqlx::PgPool;

fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kvfleet-controlplane"));
    // Only what each test passes: no DATABASE_URL or KVFLEET_* from the caller's environment.
    command.env_remove("DATABASE_URL");
    for (key, _) in std::env::vars() {
        if key.starts_with("KVFLEET_") {
            command.env_remove(key);
        }
    }
    command.env("RUST_LOG", "warn");
    command
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The URL of the per-test database (trust auth on the test cluster: no password).
fn url_of(pool: &PgPool) -> String {
    let options = pool.connect_options();
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap()
    )
}

#[test]
fn check_config_prints_every_problem_with_its_location() {
    let dir = std::env::temp_dir().join(format!("kvfleet-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"nowhere\"\n[database]\nurl = \"postgres://x@h/db\"\n[liveness]\nlost_after = \"1s\"\ncolour = 3\n",
    )
    .unwrap();
    let output = binary()
        .args(["check-config", "--config"])
        .arg(&bad)
        .env("KVFLEET_WATCH__MAX_WAIT", "forever")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let (_, stderr) = text(&output);
    let path = bad.display().to_string();
    for want in [
        format!("{path}:1: listen: must be an address"),
        format!("{path}:6: liveness.colour: unknown setting"),
        "environment variable KVFLEET_WATCH__MAX_WAIT: watch.max_wait".to_owned(),
        "liveness.lost_after: must be longer than liveness.unhealthy_after".to_owned(),
    ] {
        assert!(stderr.contains(&want), "missing {want:?} in:\n{stderr}");
    }
    assert!(stderr.starts_with("4 configuration problem(s)"), "{stderr}");

    let good = dir.join("good.toml");
    std::fs::write(&good, include_str!("../controlplane.example.toml")).unwrap();
    let output = binary()
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(output.status.success(), "{:?}", text(&output));
    // Flags override the file.
    let output = binary()
        .args(["check-config", "--set", "ca.cert_validity=1m", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let (_, stderr) = text(&output);
    assert!(
        stderr.contains("ca.cert_validity: must be at least 1h"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn token_generate_prints_one_valid_token() {
    let output = binary().args(["token", "generate"]).output().unwrap();
    assert!(output.status.success());
    let (stdout, _) = text(&output);
    assert!(auth::parse_token(stdout.trim()).is_ok(), "{stdout:?}");
    let output = binary()
        .args([
            "token",
            "create",
            "--role",
            "agent",
            "--name",
            "x",
            "--database-url",
            "postgres://x@h/db",
        ])
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "agent credentials only come from registration"
    );
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn migrate_and_token_create_work_against_a_database(pool: PgPool) {
    let url = url_of(&pool);
    let output = binary()
        .args(["migrate", "--database-url", &url, "--config", "/dev/null"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{:?}", text(&output));
    assert!(text(&output).1.contains("schema is up to date"));

    let output = binary()
        .args([
            "token",
            "create",
            "--role",
            "operator",
            "--name",
            "ops",
            "--config",
            "/dev/null",
        ])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(output.status.success(), "{:?}", text(&output));
    let (stdout, stderr) = text(&output);
    let token = stdout.trim();
    assert!(!stderr.contains(token), "the token goes to stdout only");
    let prefix = auth::parse_token(token).unwrap().prefix.to_owned();
    let (role, hash): (String, Vec<u8>) =
        sqlx::query_as("SELECT role, secret_hash FROM api_tokens WHERE prefix = $1")
            .bind(&prefix)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(role, "operator");
    assert_eq!(hash, auth::hash_token(token));
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'token.create'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(audited, 1);

    // `ca`: before the first start there is no CA, and it says what to do.
    let ca = || {
        binary()
            .args(["ca", "--config", "/dev/null"])
            .env("DATABASE_URL", &url)
            .output()
            .unwrap()
    };
    let output = ca();
    assert!(!output.status.success());
    assert!(text(&output).1.contains("start the control plane once"));
    // Once the CA exists: its certificate on stdout, the line agents pin on stderr.
    let mut config = kvfleet_controlplane::Config::new(url.clone());
    config.ca.key_file =
        std::env::temp_dir().join(format!("kvfleet-cli-ca-{}.key", std::process::id()));
    let state = kvfleet_controlplane::AppState::new(pool.clone(), config)
        .await
        .unwrap();
    let output = ca();
    assert!(output.status.success(), "{:?}", text(&output));
    let (stdout, stderr) = text(&output);
    assert_eq!(stdout.trim(), state.ca.cert_pem().trim());
    assert!(
        stderr.contains(&format!("ca_fingerprint = \"{}\"", state.ca.fingerprint())),
        "{stderr}"
    );
}

/// `serve` under a stand-in for systemd: READY=1 once it accepts requests, WATCHDOG=1 pings,
/// and on SIGTERM STOPPING=1 and a clean exit.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn serve_speaks_the_systemd_notify_protocol(pool: PgPool) {
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};

    let dir = std::env::temp_dir().join(format!("kvfleet-sd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&socket_path);
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = binary()
        .args([
            "serve",
            "--config",
            "/dev/null",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--database-url", &url_of(&pool)])
        // The first admin token goes to a file (0600); not to /var/lib/kvfleet from a test.
        .args([
            "--set",
            &format!(
                "auth.bootstrap_token_file={}",
                dir.join("admin-token").display()
            ),
        ])
        .args([
            "--set",
            &format!("ca.key_file={}", dir.join("ca.key").display()),
        ])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let mut receive = || {
        let n = socket.recv(&mut buf).expect("a notification within 20 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(receive(), "READY=1");
    // Ready means ready: the API answers now.
    let status = reqwest::get(format!("http://127.0.0.1:{port}/api/v1/status"))
        .await
        .unwrap();
    assert_eq!(status.status(), reqwest::StatusCode::OK);
    let started = Instant::now();
    assert_eq!(receive(), "WATCHDOG=1");
    assert_eq!(receive(), "WATCHDOG=1");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "pings at half of WATCHDOG_USEC"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut got = receive();
    while got == "WATCHDOG=1" {
        got = receive();
    }
    assert_eq!(got, "STOPPING=1");
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
