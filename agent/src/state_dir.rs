//! What the agent keeps on disk between runs, in the `[control_plane] state_dir`:
//!
//! | file | what | mode |
//! | --- | --- | --- |
//! | `node.json` | the node id and its agent credential (a bearer token) | 0600 |
//! | `node.key` | the peer private key (PEM, PKCS#8; generated here, never sent) | 0600 |
//! | `node.crt`, `ca.crt` | the peer certificate and the node CA (PEM) | 0600 |
//! | `certificate.json` | the certificate's serial and validity, for renewal | 0600 |
//! | `control-plane-ca.fingerprint` | the fleet CA fingerprint a `kvfj1.…` join token carried, pinned from then on when the config names none | 0600 |
//! | `desired-state.json` | the last desired state received, to start from when the control plane is unreachable at boot | 0600 |
//!
//! Every write goes to a temporary file created 0600 and is renamed over the old one, so a
//! crash leaves the old or the new file, never half of one. The directory is created 0700.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use kvfleet_proto::api::{DesiredState, IssuedCertificate};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where [`StateDir::save_ca_pin`] keeps the pin.
const CA_PIN_FILE: &str = "control-plane-ca.fingerprint";

/// The node's identity at the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The node id the control plane assigned.
    pub node_id: Uuid,
    /// The agent credential (bearer token).
    pub credential: String,
}

/// What renewal needs to know about the current certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateInfo {
    /// Lowercase hex serial.
    pub serial: String,
    /// Valid from.
    pub not_before: DateTime<Utc>,
    /// Valid until.
    pub not_after: DateTime<Utc>,
}

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct StateError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// The agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating, 0700) the directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| StateError {
                what: "creating the state directory",
                path: dir.clone(),
                source,
            })?;
        Ok(Self { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The peer certificate (PEM), for the QUIC endpoint.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("node.crt")
    }

    /// The peer private key (PEM).
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("node.key")
    }

    /// The node CA certificate (PEM).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The stored identity, if the node registered before.
    pub fn identity(&self) -> Result<Option<Identity>, StateError> {
        self.read_json("node.json")
    }

    /// Stores the identity.
    pub fn save_identity(&self, identity: &Identity) -> Result<(), StateError> {
        self.write_json("node.json", identity)
    }

    /// Forgets the identity (the control plane refused the credential: the node was removed).
    pub fn forget_identity(&self) -> Result<(), StateError> {
        let path = self.dir.join("node.json");
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError {
                what: "removing",
                path,
                source,
            }),
        }
    }

    /// The stored private key (PEM).
    pub fn key_pem(&self) -> Result<Option<String>, StateError> {
        self.read_text("node.key")
    }

    /// Stores the private key.
    pub fn save_key_pem(&self, pem: &str) -> Result<(), StateError> {
        self.write("node.key", pem.as_bytes())
    }

    /// What renewal needs about the current certificate.
    pub fn certificate(&self) -> Result<Option<CertificateInfo>, StateError> {
        self.read_json("certificate.json")
    }

    /// Stores an issued certificate (and the private key, when the control plane generated it).
    pub fn save_certificate(&self, cert: &IssuedCertificate) -> Result<(), StateError> {
        if let Some(key) = &cert.private_key_pem {
            self.save_key_pem(key)?;
        }
        self.write("node.crt", cert.cert_pem.as_bytes())?;
        self.write("ca.crt", cert.ca_cert_pem.as_bytes())?;
        self.write_json(
            "certificate.json",
            &CertificateInfo {
                serial: cert.serial.clone(),
                not_before: cert.not_before,
                not_after: cert.not_after,
            },
        )
    }

    /// The control plane's CA fingerprint saved at a join with a token that carried it, read
    /// without opening (creating) the directory: `None` when absent or unreadable.
    pub fn saved_ca_pin(dir: &Path) -> Option<kvfleet_proto::CaFingerprint> {
        fs::read_to_string(dir.join(CA_PIN_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Saves the CA fingerprint the join token carried (see [`Self::saved_ca_pin`]).
    pub fn save_ca_pin(&self, pin: &kvfleet_proto::CaFingerprint) -> Result<(), StateError> {
        self.write(CA_PIN_FILE, format!("{pin}\n").as_bytes())
    }

    /// The last desired state received.
    pub fn desired(&self) -> Result<Option<DesiredState>, StateError> {
        self.read_json("desired-state.json")
    }

    /// Stores the desired state.
    pub fn save_desired(&self, desired: &DesiredState) -> Result<(), StateError> {
        self.write_json("desired-state.json", desired)
    }

    fn read_text(&self, name: &str) -> Result<Option<String>, StateError> {
        let path = self.dir.join(name);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError {
                what: "reading",
                path,
                source,
            }),
        }
    }

    /// A file that does not parse is treated as absent (with a warning): state written by
    /// another version must not keep the agent from starting.
    fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, StateError> {
        let Some(text) = self.read_text(name)? else {
            return Ok(None);
        };
        match serde_json::from_str(&text) {
            Ok(value) => Ok(Some(value)),
            Err(e) => {
                tracing::warn!(file = %self.dir.join(name).display(), error = %e,
                    "ignoring a state file that does not parse");
                Ok(None)
            }
        }
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| StateError {
            what: "encoding",
            path: self.dir.join(name),
            source: io::Error::other(e),
        })?;
        self.write(name, &bytes)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let result = (|| {
            let _ = fs::remove_file(&tmp);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        result.map_err(|source| StateError {
            what: "writing",
            path,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn temp() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::env::temp_dir().join(format!("kvfleet-state-test-{}-{n}", std::process::id()))
    }

    #[test]
    fn round_trips_with_private_modes() {
        let dir = temp();
        let state = StateDir::open(dir.join("a/b")).unwrap();
        assert_eq!(state.identity().unwrap(), None);
        let identity = Identity {
            node_id: Uuid::from_u128(1),
            credential: "kvf_secret".into(),
        };
        state.save_identity(&identity).unwrap();
        assert_eq!(state.identity().unwrap(), Some(identity));
        let cert = IssuedCertificate {
            serial: "ab".into(),
            cert_pem: "CERT".into(),
            ca_cert_pem: "CA".into(),
            private_key_pem: Some("KEY".into()),
            not_before: DateTime::<Utc>::from_timestamp(0, 0).unwrap(),
            not_after: DateTime::<Utc>::from_timestamp(100, 0).unwrap(),
        };
        state.save_certificate(&cert).unwrap();
        assert_eq!(state.key_pem().unwrap().as_deref(), Some("KEY"));
        assert_eq!(state.certificate().unwrap().unwrap().serial, "ab");
        for name in [
            "node.json",
            "node.key",
            "node.crt",
            "ca.crt",
            "certificate.json",
        ] {
            let mode = fs::metadata(state.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        let mode = fs::metadata(state.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        state.forget_identity().unwrap();
        state.forget_identity().unwrap();
        assert_eq!(state.identity().unwrap(), None);
        // A corrupt file reads as absent.
        fs::write(state.path().join("desired-state.json"), "{not json").unwrap();
        assert!(state.desired().unwrap().is_none());
        let _ = fs::remove_dir_all(dir);
    }
}
