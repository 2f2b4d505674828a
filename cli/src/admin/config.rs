//! Where the admin commands find the control plane and their token.
//!
//! Precedence: `--url`/`--token` flags, then `KVFLEET_URL`/`KVFLEET_TOKEN` (clap reads both
//! into [`ApiOpts`]), then the file `kvfleet login` writes: `$KVFLEET_CLI_CONFIG`, else
//! `$XDG_CONFIG_HOME/kvfleet/cli.toml`, else `~/.config/kvfleet/cli.toml`. The file holds a
//! secret, so it is written with mode 0600 (its directory 0700) and replaced atomically.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::client::{Client, normalize_url};
use super::{ApiOpts, CliError, ExitCodeKind};

/// The saved login.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CliFile {
    pub(crate) url: Option<String>,
    pub(crate) token: Option<String>,
    /// The CA file an https control plane is trusted through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ca_file: Option<PathBuf>,
}

/// The config file's path.
pub(crate) fn path() -> Result<PathBuf, CliError> {
    if let Some(path) = std::env::var_os("KVFLEET_CLI_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|p| !p.is_empty())
                .map(|home| PathBuf::from(home).join(".config"))
        })
        .ok_or_else(|| {
            CliError::usage("neither HOME nor XDG_CONFIG_HOME is set: set KVFLEET_CLI_CONFIG")
        })?;
    Ok(base.join("kvfleet").join("cli.toml"))
}

/// The saved login, or an empty one when there is no file.
pub(crate) fn load() -> Result<CliFile, CliError> {
    let path = path()?;
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|e| {
            CliError::usage(format!(
                "{}: {e}\n  fix it or run `kvfleet login` again",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CliFile::default()),
        Err(e) => Err(CliError::usage(format!("reading {}: {e}", path.display()))),
    }
}

/// Writes `text` to `path` readable by its owner only, replacing what was there: the CLI's one
/// writer of files that hold a token (the login file, `kvfleet dev`'s tokens and configs). A
/// missing parent directory is made owner-only (0700); the text goes to a temporary file created
/// 0600 (its mode narrowed again in case a crashed run left one wider) that is synced and renamed
/// over `path`, so a reader sees the old file or the whole new one.
pub(crate) fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    out.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    out.write_all(text.as_bytes())?;
    out.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Writes the login file (0600), creating its directory (0700).
pub(crate) fn save(file: &CliFile) -> Result<PathBuf, CliError> {
    let path = path()?;
    let text = toml::to_string(file)
        .map_err(|e| CliError::new(ExitCodeKind::Api, format!("encoding the login: {e}")))?;
    write_private(
        &path,
        &format!(
            "# Written by `kvfleet login`. KVFLEET_URL / KVFLEET_TOKEN and --url / --token override it.\n{text}"
        ),
    )
    .map_err(|e| CliError::usage(format!("writing {}: {e}", path.display())))?;
    Ok(path)
}

/// Removes the login file; `Ok(false)` when there was none.
pub(crate) fn remove() -> Result<bool, CliError> {
    let path = path()?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(CliError::usage(format!("removing {}: {e}", path.display()))),
    }
}

/// A client from the flags, the environment and the saved login. A token is required unless
/// `token_optional` (e.g. `status`, which needs none).
pub(crate) fn client(opts: &ApiOpts, token_optional: bool) -> Result<Client, CliError> {
    // With the URL and the token given, the login file is not read at all (a service without
    // HOME has none); its CA file goes with its URL, so it is not wanted then either.
    let saved = if opts.url.is_some() && opts.token.is_some() {
        CliFile::default()
    } else {
        load()?
    };
    let saved_url = saved.url.as_deref().and_then(|u| normalize_url(u).ok());
    let url = opts.url.clone().or(saved.url).ok_or_else(|| {
        CliError::usage(
            "no control plane configured: run `kvfleet login URL`, or pass --url / set KVFLEET_URL",
        )
    })?;
    let url = normalize_url(&url).map_err(CliError::usage)?;
    let token = opts.token.clone().or(saved.token).filter(|t| !t.is_empty());
    if token.is_none() && !token_optional {
        return Err(CliError::new(
            ExitCodeKind::Auth,
            "no token: run `kvfleet login`, or pass --token / set KVFLEET_TOKEN",
        ));
    }
    // The saved CA file vouches for the saved URL only.
    let saved_ca = saved.ca_file.filter(|_| saved_url.as_ref() == Some(&url));
    let ca_file = opts.ca_file.clone().or(saved_ca);
    let ca_pem = read_ca_file(ca_file.as_deref())?;
    Client::new(url, token, ca_pem.as_deref()).map_err(CliError::from)
}

/// The CA file's bytes, with an error that names it.
pub(crate) fn read_ca_file(path: Option<&std::path::Path>) -> Result<Option<Vec<u8>>, CliError> {
    path.map(|path| {
        std::fs::read(path)
            .map_err(|e| CliError::usage(format!("reading the CA file {}: {e}", path.display())))
    })
    .transpose()
}
