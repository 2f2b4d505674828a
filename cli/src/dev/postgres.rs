//! The private PostgreSQL cluster of `kvfleet dev`, under `<state>/pg`.
//!
//! Created once with `initdb`, listening on 127.0.0.1 only, started with `pg_ctl`, and reused
//! when it is already running (a previous `kvfleet dev` that was killed, or `--keep-postgres`).
//! PostgreSQL refuses to run as root, so as root every server command runs as the `postgres`
//! user through `runuser`, and the cluster's directory belongs to it.
//!
//! Authentication (never `trust`): TCP connections need the `kvfleet` role's scram password,
//! generated once into `<state>/pg/kvfleet-password` (0600) and carried in the URL handed to the
//! control plane through its environment, not its command line; the superuser is reached only
//! through the cluster's own socket directory with `peer` authentication (set-up SQL, run as the
//! superuser's own Unix user). A cluster made by an older `kvfleet dev` with `trust` is switched
//! over at its next start.

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
pub(crate) struct Cluster {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Whether server commands go through `runuser -u postgres`.
    as_postgres: bool,
    /// The database superuser: `postgres` when run as root (through `runuser`), else the Unix
    /// user running `kvfleet dev`, so that `peer` authentication maps one to the other.
    superuser: String,
    /// The `kvfleet` role's password.
    password: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir)
            .field("port", &self.port)
            .field("superuser", &self.superuser)
            .finish_non_exhaustive()
    }
}

/// Who may connect how: the superuser over the socket as its own Unix user, everyone else over
/// TCP with a scram password. Written at every start, so an old `trust` cluster is switched over.
const PG_HBA: &str = "\
# Written by kvfleet dev at every start; edits are replaced.
local all all peer
host all all 127.0.0.1/32 scram-sha-256
";

fn current_user() -> anyhow::Result<String> {
    let output = Command::new("id")
        .arg("-un")
        .output()
        .context("running id -un")?;
    let name = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    anyhow::ensure!(!name.is_empty(), "id -un printed no user name");
    Ok(name)
}

/// The `kvfleet` role's password: made once (random, URL-safe) and kept at `path`, 0600.
fn password(path: &Path) -> anyhow::Result<String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let text = text.trim();
        if !text.is_empty() {
            return Ok(text.to_owned());
        }
    }
    let mut bytes = [0u8; 24];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?,
        &mut bytes,
    )
    .context("reading /dev/urandom")?;
    let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    crate::admin::config::write_private(path, &format!("{password}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(password)
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
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cluster = Cluster {
            bindir,
            dir: dir.to_path_buf(),
            port,
            as_postgres,
            superuser: if as_postgres {
                "postgres".to_owned()
            } else {
                current_user()?
            },
            password: password(&dir.join("kvfleet-password"))?,
        };
        let data = cluster.data();
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
            if cluster.write_hba()? {
                let mut reload = cluster.server_command("pg_ctl");
                reload.arg("-D").arg(&data).arg("reload");
                run_quiet(&mut reload).context("reloading PostgreSQL's pg_hba.conf")?;
            }
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
                    .args(["--auth-local=peer", "--auth-host=scram-sha-256"])
                    .args(["-U", &cluster.superuser, "-E", "UTF8"]);
                run_quiet(&mut initdb).context("initdb")?;
            }
            cluster.write_hba()?;
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

    /// The `kvfleet` role's URL. It holds the password: hand it to children through their
    /// environment, never their command line (which every local user can read).
    pub(crate) fn url(&self) -> String {
        format!(
            "postgres://kvfleet:{}@127.0.0.1:{}/kvfleet",
            self.password, self.port
        )
    }

    /// Puts [`PG_HBA`] in place; whether it changed (a running server then reloads it).
    fn write_hba(&self) -> anyhow::Result<bool> {
        let path = self.data().join("pg_hba.conf");
        if std::fs::read_to_string(&path).is_ok_and(|text| text == PG_HBA) {
            return Ok(false);
        }
        // The file exists (initdb made it) and keeps its owner; only its text is replaced.
        std::fs::write(&path, PG_HBA).with_context(|| format!("writing {}", path.display()))?;
        Ok(true)
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

    /// The `kvfleet` role (with its password, set at every start) and database, created when
    /// missing (idempotent). Run as the superuser over the socket; the SQL (and the password in
    /// it) goes through stdin.
    fn create_database(&self) -> anyhow::Result<()> {
        let sql = format!(
            "\
SELECT 'CREATE ROLE kvfleet LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kvfleet')
\\gexec
ALTER ROLE kvfleet PASSWORD '{}';
SELECT 'CREATE DATABASE kvfleet OWNER kvfleet' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'kvfleet')
\\gexec
",
            self.password
        );
        let mut child = self
            .server_command("psql")
            .args(["-q", "-h"])
            .arg(&self.dir)
            .args(["-p", &self.port.to_string()])
            .args([
                "-U",
                &self.superuser,
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running psql")?;
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, sql.as_bytes()).context("writing to psql")?;
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
