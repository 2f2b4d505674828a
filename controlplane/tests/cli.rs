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
}
