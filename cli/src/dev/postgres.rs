//! The private PostgreSQL cluster of `kvfleet dev`, under `<state>/pg`.
//!
//! Created once with `initdb` (trust authentication, listening on 127.0.0.1 only), started with
//! `pg_ctl`, and reused when it is already running (a previous `kvfleet dev` that was killed,
//! or `--keep-postgres`). PostgreSQL refuses to run as root, so as root every server command
//! runs as the `postgres` user through `runuser`, and the cluster's directory belongs to it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// The newest installed server's bin directory (`/usr/lib/postgresql/*/bin`, Debian's layout),
/// else the directory of `pg_ctl` on PATH.
pub(crate) fn find_bindir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    if let Some((_, bin)) = dirs.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .find(|dir| dir.join("pg_ctl").exists() && dir.join("initdb").exists())
}

/// The private cluster (running once [`Cluster::ensure`] returns).
#[derive(Debug)]
pub(crate) struct Cluster {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Whether server commands go through `runuser -u postgres`.
    as_postgres: bool,
}

fn is_root() -> bool {
    // No libc call (the workspace denies unsafe): ask id(1), which every Debian system has.
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl Cluster {
    /// The cluster under `dir` on `port`, started if needed; its database `kvfleet` exists.
    pub(crate) fn ensure(bindir: PathBuf, dir: &Path, port: u16) -> anyhow::Result<Cluster> {
        let as_postgres = is_root();
        let cluster = Cluster {
            bindir,
            dir: dir.to_path_buf(),
            port,
            as_postgres,
        };
        let data = cluster.data();
        std::fs::create_dir_all(&cluster.dir)
            .with_context(|| format!("creating {}", cluster.dir.display()))?;
        if as_postgres {
            // The server runs as postgres: it owns its directory and must reach it.
            run_quiet(Command::new("chown").arg("postgres:").arg(&cluster.dir))
                .context("giving the cluster directory to the postgres user")?;
        }
        if cluster.ready() {
            if !data.join("postmaster.pid").exists() {
                bail!(
                    "another PostgreSQL already listens on 127.0.0.1:{port}: pass --pg-port, \
                     or set DATABASE_URL to use it"
                );
            }
            crate::dev::progress(&format!(
                "reusing the running PostgreSQL cluster on port {port}"
            ));
        } else {
            if !data.join("PG_VERSION").exists() {
                crate::dev::progress(&format!(
                    "creating a PostgreSQL cluster in {}",
                    data.display()
                ));
                let mut initdb = cluster.server_command("initdb");
                initdb
                    .arg("-D")
                    .arg(&data)
                    .args(["--auth=trust", "-U", "postgres", "-E", "UTF8"]);
                run_quiet(&mut initdb).context("initdb")?;
            }
            crate::dev::progress(&format!("starting PostgreSQL on 127.0.0.1:{port}"));
            let mut start = cluster.server_command("pg_ctl");
            start
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(cluster.dir.join("server.log"))
                .args(["-w", "-t", "60", "start", "-o"])
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1",
                    cluster.dir.display()
                ));
            run_quiet(&mut start).with_context(|| {
                format!(
                    "starting PostgreSQL (its log: {})",
                    cluster.dir.join("server.log").display()
                )
            })?;
        }
        cluster.create_database()?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub(crate) fn url(&self) -> String {
        format!("postgres://kvfleet@127.0.0.1:{}/kvfleet", self.port)
    }

    fn server_command(&self, program: &str) -> Command {
        let bin = self.bindir.join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(bin);
            command
        } else {
            Command::new(bin)
        }
    }

    fn ready(&self) -> bool {
        Command::new(self.bindir.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The `kvfleet` role and database, created when missing (idempotent).
    fn create_database(&self) -> anyhow::Result<()> {
        const SQL: &str = "\
SELECT 'CREATE ROLE kvfleet LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kvfleet')
\\gexec
SELECT 'CREATE DATABASE kvfleet OWNER kvfleet' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'kvfleet')
\\gexec
";
        let mut child = Command::new(self.bindir.join("psql"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running psql")?;
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, SQL.as_bytes()).context("writing to psql")?;
        }
        let output = child.wait_with_output().context("running psql")?;
        if !output.status.success() {
            bail!(
                "creating the kvfleet database failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// Stops the server (fast shutdown: open sessions are ended, data is safe).
    pub(crate) fn stop(&self) -> anyhow::Result<()> {
        let mut stop = self.server_command("pg_ctl");
        stop.arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "-t", "30", "stop"]);
        run_quiet(&mut stop).context("stopping PostgreSQL")
    }
}

/// Runs a command, folding its output into the error when it fails.
fn run_quiet(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {:?}", command.get_program()))?;
    if output.status.success() {
        return Ok(());
    }
    bail!(
        "{:?} failed ({}): {}{}",
        command.get_program(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim(),
        String::from_utf8_lossy(&output.stdout).trim()
    )
}
