//! The node CA's private key at rest: sealed (AES-256-GCM) in Postgres under a key that lives
//! only in a file on the control-plane hosts (`ca.key_file`, mode 0600).
//!
//! Someone who reads the database (a dump, a backup, a read-only replica) gets the CA's
//! certificate but not its key, so cannot mint node certificates. Every control-plane replica
//! needs the same key file: the first one to start creates it (and the CA); the operator copies
//! it to the others. The sealed form is bound to the CA's certificate (it is the AEAD's
//! associated data), so a sealed key cannot be paired with another certificate.
//!
//! A database written before sealing existed holds the key in the clear; [`load_or_create`]
//! seals it in place on the first start that has a key file.
//!
//! The same key file also gives the fleet its hash secret ([`SealingKey::fleet_hash_secret`]):
//! a domain-separated SHA-256 of the sealing key, so every replica derives the same secret with
//! no new shared state, and a reader of the database (which never holds it) cannot compute the
//! fleet's block hashes. Changing the key file changes the secret, and with it every block
//! hash in the fleet (the indexes re-sync; docs/security.md).
//!
//! Sealing and opening are pure; the file and the database are the IO around them.

use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sqlx::PgPool;

use kvfleet_proto::hash::FleetHashSecret;

use crate::ca::{CaError, NodeCa, hex};

/// What a sealed key starts with, naming the format so a later one can be told apart.
const SEALED_PREFIX: &str = "kvfleet-sealed:v1:aes-256-gcm:";
/// How a key stored in the clear (before sealing existed) starts.
const CLEAR_PREFIX: &str = "-----BEGIN";
const KEY_LEN: usize = 32;
/// What the fleet hash secret's derivation hashes before the key: never the same input as any
/// other use of the key.
const FLEET_HASH_LABEL: &[u8] = b"kvfleet fleet hash secret v1\0";

/// Why the CA key could not be sealed, opened or its key file used.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(
        "the node CA key in the database is sealed, and ca.key_file ({0}) does not exist: copy \
         that file from the control-plane host that created the fleet (same path, owner-only \
         mode 0600)"
    )]
    KeyFileMissing(PathBuf),
    #[error(
        "ca.key_file ({path}) is readable by group or others (mode {mode:o}): run `chmod 600 {path}`"
    )]
    KeyFileMode { path: String, mode: u32 },
    #[error(
        "ca.key_file ({0}) does not hold a key (64 hex digits): restore it from another \
         control-plane host"
    )]
    KeyFileFormat(PathBuf),
    #[error("ca.key_file ({path}): {source}")]
    KeyFileIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the node CA key in the database cannot be opened with ca.key_file ({0}): it was sealed \
         with another key file (copy the one from the host that created the fleet)"
    )]
    WrongKey(PathBuf),
    #[error("the node CA key in the database is in no format this version knows")]
    UnknownFormat,
}

/// Why the fleet's CA could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Sealing(#[from] SealError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The key that seals the CA key, read from (or created at) `ca.key_file`.
pub struct SealingKey {
    key: LessSafeKey,
    path: PathBuf,
    /// Derived from the key when it is read (see the module docs).
    fleet_hash: FleetHashSecret,
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SealingKey {
    fn from_bytes(bytes: &[u8; KEY_LEN], path: &Path) -> Self {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes)
            .expect("AES-256-GCM takes a 32-byte key, which `bytes` is by its type");
        Self {
            key: LessSafeKey::new(unbound),
            path: path.to_owned(),
            fleet_hash: derive_fleet_hash_secret(bytes),
        }
    }

    /// The fleet's hash secret, handed to agents in their desired state: `SHA-256(label ‖ key)`
    /// as 64 hex digits. Every replica with the same key file derives the same one.
    pub fn fleet_hash_secret(&self) -> FleetHashSecret {
        self.fleet_hash.clone()
    }

    /// Reads the key file. `Ok(None)` when it does not exist; an error when it is readable by
    /// anyone but its owner or does not hold a key.
    pub fn read(path: &Path) -> Result<Option<Self>, SealError> {
        let io = |source| SealError::KeyFileIo {
            path: path.to_owned(),
            source,
        };
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mode = file.metadata().map_err(io)?.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SealError::KeyFileMode {
                path: path.display().to_string(),
                mode,
            });
        }
        let mut text = String::new();
        file.take(1024).read_to_string(&mut text).map_err(io)?;
        let bytes = parse_hex_key(&text).ok_or_else(|| SealError::KeyFileFormat(path.into()))?;
        Ok(Some(Self::from_bytes(&bytes, path)))
    }

    /// Creates a new random key at `path` (0600; its directory 0700 when made) unless a file is
    /// already there, in which case that one is read: two replicas starting together on one host
    /// end up with one key.
    pub fn read_or_create(path: &Path) -> Result<Self, SealError> {
        use std::io::Write as _;
        let io = |source| SealError::KeyFileIo {
            path: path.to_owned(),
            source,
        };
        if let Some(key) = Self::read(path)? {
            return Ok(key);
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io)?;
        }
        let bytes: [u8; KEY_LEN] = rand::random();
        let text = format!(
            "# kvfleet control plane: the key that seals the node CA's private key in Postgres.\n\
             # Every control-plane host needs this same file (mode 0600). Losing it on every host\n\
             # means a new fleet CA: every node then has to join again.\n{}\n",
            hex(&bytes)
        );
        // Exclusive create: a second starter reads the first one's file instead of replacing it.
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        match created {
            Ok(mut file) => {
                file.write_all(text.as_bytes()).map_err(io)?;
                file.sync_all().map_err(io)?;
                tracing::info!(
                    path = %path.display(),
                    "created the key that seals the node CA key (ca.key_file); copy it to every \
                     other control-plane host"
                );
                Ok(Self::from_bytes(&bytes, path))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Self::read(path)?.ok_or_else(|| SealError::KeyFileMissing(path.to_owned()))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Seals `key_pem`, bound to the CA certificate `cert_pem`.
    pub fn seal(&self, key_pem: &str, cert_pem: &str) -> String {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut in_out = key_pem.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(cert_pem.as_bytes()),
                &mut in_out,
            )
            .expect("AES-GCM seals any input shorter than 64 GiB");
        let mut sealed = nonce_bytes.to_vec();
        sealed.extend_from_slice(&in_out);
        format!(
            "{SEALED_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(sealed)
        )
    }

    /// Opens what [`SealingKey::seal`] made for the same certificate.
    pub fn open(&self, sealed: &str, cert_pem: &str) -> Result<String, SealError> {
        let body = sealed
            .strip_prefix(SEALED_PREFIX)
            .ok_or(SealError::UnknownFormat)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| SealError::UnknownFormat)?;
        if bytes.len() < NONCE_LEN {
            return Err(SealError::UnknownFormat);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::UnknownFormat)?;
        let mut in_out = ciphertext.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(cert_pem.as_bytes()), &mut in_out)
            .map_err(|_| SealError::WrongKey(self.path.clone()))?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError::UnknownFormat)
    }
}

fn derive_fleet_hash_secret(key: &[u8; KEY_LEN]) -> FleetHashSecret {
    let mut input = FLEET_HASH_LABEL.to_vec();
    input.extend_from_slice(key);
    FleetHashSecret(hex(
        ring::digest::digest(&ring::digest::SHA256, &input).as_ref()
    ))
}

/// The fleet hash secret of the control planes whose `ca.key_file` is `key_file` (what they
/// hand their agents): for a tool or test that must compute the fleet's block hashes. An error
/// when the file is missing or unusable.
pub fn fleet_hash_secret(key_file: &Path) -> Result<FleetHashSecret, SealError> {
    Ok(SealingKey::read(key_file)?
        .ok_or_else(|| SealError::KeyFileMissing(key_file.to_owned()))?
        .fleet_hash_secret())
}

/// The key's 64 hex digits, on the first line that is neither blank nor a `#` comment.
fn parse_hex_key(text: &str) -> Option<[u8; KEY_LEN]> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))?;
    if line.len() != KEY_LEN * 2 {
        return None;
    }
    let mut key = [0u8; KEY_LEN];
    for (byte, pair) in key.iter_mut().zip(line.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(key)
}

/// Loads the fleet's CA, creating it (and the key file) if this is the first control plane to
/// start, and sealing a key stored in the clear by an older version. Concurrent first starts race
/// on the insert; the loser reads the winner's CA. Returns the sealing key it used too (the
/// fleet hash secret is derived from it).
pub async fn load_or_create(
    pool: &PgPool,
    key_file: &Path,
    ca_validity: std::time::Duration,
) -> Result<(NodeCa, SealingKey), LoadError> {
    type Row = (String, String, String);
    let load =
        || sqlx::query_as::<_, Row>("SELECT name, cert_pem, key_pem FROM node_ca WHERE id = 1");
    if load().fetch_optional(pool).await?.is_none() {
        let sealing = SealingKey::read_or_create(key_file)?;
        let name = format!(
            "kvfleet node CA {}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let (ca, key_pem) = NodeCa::generate(&name, chrono::Utc::now(), ca_validity)?;
        sqlx::query(
            "INSERT INTO node_ca (id, name, cert_pem, key_pem) VALUES (1, $1, $2, $3)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&name)
        .bind(ca.cert_pem())
        .bind(sealing.seal(&key_pem, ca.cert_pem()))
        .execute(pool)
        .await?;
    }
    // Read back: another replica may have won the race.
    let (name, cert, stored) = load().fetch_one(pool).await?;
    if stored.starts_with(CLEAR_PREFIX) {
        let sealing = SealingKey::read_or_create(key_file)?;
        // Only the clear value is replaced: a replica that sealed it first wins.
        sqlx::query("UPDATE node_ca SET key_pem = $1 WHERE id = 1 AND key_pem = $2")
            .bind(sealing.seal(&stored, &cert))
            .bind(&stored)
            .execute(pool)
            .await?;
        tracing::warn!(
            path = %key_file.display(),
            "the node CA key was stored in the clear; it is sealed now with ca.key_file (old \
             database backups still hold it in the clear: treat them as secret)"
        );
        return Ok((NodeCa::from_stored(&name, &cert, &stored)?, sealing));
    }
    let sealing =
        SealingKey::read(key_file)?.ok_or_else(|| SealError::KeyFileMissing(key_file.into()))?;
    let key_pem = sealing.open(&stored, &cert)?;
    Ok((NodeCa::from_stored(&name, &cert, &key_pem)?, sealing))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(what: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "kvfleet-ca-key-test-{}-{what}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ))
    }

    #[test]
    fn sealed_keys_open_only_with_their_key_and_certificate() {
        let path = scratch("a");
        let key = SealingKey::read_or_create(&path).unwrap();
        let sealed = key.seal("-----BEGIN PRIVATE KEY-----\nabc\n", "cert one");
        assert!(sealed.starts_with(SEALED_PREFIX));
        assert!(!sealed.contains("PRIVATE KEY"));
        assert_eq!(
            key.open(&sealed, "cert one").unwrap(),
            "-----BEGIN PRIVATE KEY-----\nabc\n"
        );
        assert!(matches!(
            key.open(&sealed, "cert two"),
            Err(SealError::WrongKey(_))
        ));
        let other = SealingKey::read_or_create(&scratch("b")).unwrap();
        assert!(matches!(
            other.open(&sealed, "cert one"),
            Err(SealError::WrongKey(_))
        ));
        assert!(matches!(
            key.open("garbage", "cert one"),
            Err(SealError::UnknownFormat)
        ));
        // Read back from its file, the key opens what it sealed.
        let again = SealingKey::read(&path).unwrap().unwrap();
        assert!(again.open(&sealed, "cert one").is_ok());
    }

    #[test]
    fn the_fleet_hash_secret_is_derived_from_the_key_file() {
        let path = scratch("fleet-hash");
        let key = SealingKey::read_or_create(&path).unwrap();
        let secret = key.fleet_hash_secret();
        // Every replica reading the same file derives the same secret; another file another.
        assert_eq!(fleet_hash_secret(&path).unwrap(), secret);
        let other = SealingKey::read_or_create(&scratch("fleet-hash-b")).unwrap();
        assert_ne!(other.fleet_hash_secret(), secret);
        // Domain-separated: not the sealing key itself, and long enough to key the hasher.
        let file = std::fs::read_to_string(&path).unwrap();
        assert!(!file.contains(&secret.0));
        assert!(secret.key().is_some());
        assert!(!format!("{key:?} {secret:?}").contains(&secret.0));
        // Pinned (Python: sha256(b"kvfleet fleet hash secret v1\0" + bytes(32))): a change
        // would silently re-key every fleet on upgrade.
        assert_eq!(
            derive_fleet_hash_secret(&[0; KEY_LEN]).0,
            "1e659b4ef6d9dca2476be56bd1cffe0cc95236bbf3f4ed4cd5ce5fa5adab18f1"
        );
        assert!(matches!(
            fleet_hash_secret(&scratch("absent")),
            Err(SealError::KeyFileMissing(_))
        ));
    }

    #[test]
    fn the_key_file_is_owner_only_and_checked() {
        use std::os::unix::fs::PermissionsExt as _;
        let path = scratch("mode");
        SealingKey::read_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SealingKey::read(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");

        let bad = scratch("bad");
        std::fs::write(&bad, "# comment\nnot hex\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            SealingKey::read(&bad),
            Err(SealError::KeyFileFormat(_))
        ));
        assert!(SealingKey::read(&scratch("absent")).unwrap().is_none());
    }
}
