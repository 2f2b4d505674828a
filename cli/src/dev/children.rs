//! The child processes of `kvfleet dev` (control plane, agent): started in their own process
//! groups so that a terminal's Ctrl-C reaches only `kvfleet dev`, which then stops them in
//! order (agent first, so it drains while the control plane still answers). A pid file per
//! child lets the next `kvfleet dev` stop leftovers of one that was killed (`kill -9`), which
//! would otherwise hold the ports.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::{Child, Command};

/// One supervised child.
#[derive(Debug)]
pub(crate) struct Supervised {
    pub(crate) name: &'static str,
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
    pid_file: PathBuf,
}

/// Finds a binary next to the running `kvfleet` (how `cargo build` and the packages lay them
/// out), else on PATH. `KVFLEET_<NAME>_BIN` (e.g. `KVFLEET_AGENT_BIN`) overrides both.
pub(crate) fn find_binary(name: &str, env: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        // Test binaries live in target/debug/deps; the programs are one level up.
        for candidate in [dir.join(name), dir.join("..").join(name)] {
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH")
        && let Some(found) = std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    {
        return Ok(found);
    }
    anyhow::bail!(
        "cannot find {name}: build it (`cargo build -p {name}`; scripts/dev.sh does) so that it \
         lies next to kvfleet, put it on PATH, or set {env}"
    )
}

/// Starts `command` with stdout and stderr appended to `log`, in its own process group.
pub(crate) fn spawn(
    name: &'static str,
    mut command: Command,
    state: &Path,
) -> anyhow::Result<Supervised> {
    let log = state.join(format!("{name}.log"));
    let pid_file = state.join(format!("{name}.pid"));
    stop_leftover(name, &pid_file);
    // One log per run (the previous one kept as .log.1), so the tail shown on failure is
    // this run's.
    if log.exists() {
        let _ = std::fs::rename(&log, state.join(format!("{name}.log.1")));
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("opening {}", log.display()))?;
    command
        // Plain log files, without terminal colour codes.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(false);
    let child = command
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", command.as_std().get_program()))?;
    if let Some(pid) = child.id() {
        // Best effort: without the file, only a leftover after `kill -9` goes unnoticed.
        let _ = std::fs::write(&pid_file, format!("{pid}\n"));
    }
    Ok(Supervised {
        name,
        child,
        log,
        pid_file,
    })
}

/// Stops what an earlier `kvfleet dev` that was killed left running in `state`.
pub(crate) fn stop_leftovers(state: &Path, names: &[&str]) {
    for name in names {
        stop_leftover(name, &state.join(format!("{name}.pid")));
    }
}

/// A process left by an earlier `kvfleet dev` that was killed: stop it if it still runs the
/// same program (a recycled pid of something else is left alone).
fn stop_leftover(name: &str, pid_file: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains(name) {
        crate::dev::progress(&format!(
            "stopping {name} left by an earlier run (pid {pid})"
        ));
        signal(pid, "TERM", false);
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        signal(pid, "KILL", true);
    }
    let _ = std::fs::remove_file(pid_file);
}

/// `kill -SIG pid` (or the whole process group), without unsafe code.
fn signal(pid: u32, sig: &str, group: bool) {
    let target = if group {
        format!("-{pid}")
    } else {
        pid.to_string()
    };
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(target)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Supervised {
    /// SIGTERM, then up to `grace` for a clean exit, then SIGKILL to the process group (its
    /// workers included).
    pub(crate) async fn stop(mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            let _ = std::fs::remove_file(&self.pid_file);
            return;
        }
        if let Some(pid) = self.child.id() {
            signal(pid, "TERM", false);
            match tokio::time::timeout(grace, self.child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    eprintln!("{} did not stop within {grace:?}; killing it", self.name);
                    signal(pid, "KILL", true);
                    let _ = self.child.wait().await;
                }
            }
            // Workers the child started share its group; none may outlive it.
            signal(pid, "KILL", true);
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }

    /// The last lines of the child's log, for an error message.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        all[start..].join("\n")
    }
}
