//! HTTPS for the REST API and the web UI (`[tls]`).
//!
//! - [`ServerTls::new`]: the rustls server config, from the operator's PEM files or from a
//!   certificate the fleet CA issues for this host. An issued certificate is reissued at two
//!   thirds of its life by [`ServerTls::renew`], so a control plane that runs for months never
//!   serves an expired one. The chain sent carries the CA certificate, which lets an agent that
//!   pins the CA by fingerprint verify the very first contact.
//! - [`TlsListener`]: accepts TCP connections and completes their handshakes concurrently, each
//!   within [`HANDSHAKE_TIMEOUT`] and at most [`MAX_PENDING_HANDSHAKES`] at once, so a slow or
//!   silent client cannot hold the accept loop.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::ca::NodeCa;
use crate::config::TlsConfig;

/// A client that has not finished its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at most; accepting pauses beyond it.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Why HTTPS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what} (expected a `-----BEGIN {what}` block)")]
    Pem { path: String, what: &'static str },
    #[error("the private key is not usable for TLS: {0}")]
    Key(rustls::Error),
    #[error("issuing the control plane's certificate from the fleet CA: {0}")]
    Issue(#[from] crate::ca::CaError),
    #[error("building the TLS configuration: {0}")]
    Config(rustls::Error),
}

/// The certificate served now; swapped on renewal.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A poisoned lock still holds a valid certificate.
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The control plane's HTTPS identity.
#[derive(Debug, Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    current: Arc<CurrentCert>,
    /// `Some` for a certificate issued from the fleet CA (renewed here); `None` for the
    /// operator's files.
    issued: Option<Arc<Reissue>>,
}

/// What renewing an issued certificate needs.
#[derive(Debug)]
struct Reissue {
    names: Vec<String>,
    /// When the served certificate should be replaced.
    renew_at: RwLock<DateTime<Utc>>,
}

impl ServerTls {
    /// The HTTPS identity `config` asks for; `None` for plain HTTP.
    pub fn new(
        config: &TlsConfig,
        ca: &NodeCa,
        validity: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<Self>, TlsError> {
        let (key, issued) = match config {
            TlsConfig::Off => return Ok(None),
            TlsConfig::Files {
                cert_file,
                key_file,
            } => (load_files(cert_file, key_file)?, None),
            TlsConfig::FleetCa { names } => {
                let names = if names.is_empty() {
                    default_names()
                } else {
                    names.clone()
                };
                let (key, renew_at) = issue(ca, &names, validity, now)?;
                let renew_at = RwLock::new(renew_at);
                (key, Some(Arc::new(Reissue { names, renew_at })))
            }
        };
        let current = Arc::new(CurrentCert(RwLock::new(Arc::new(key))));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Self {
            config: Arc::new(server),
            current,
            issued,
        }))
    }

    /// Reissues a fleet-CA certificate that is past two thirds of its life; a no-op for the
    /// operator's files (renewing those is the operator's; a restart reloads them).
    pub fn renew(
        &self,
        ca: &NodeCa,
        validity: Duration,
        now: DateTime<Utc>,
    ) -> Result<bool, TlsError> {
        let Some(issued) = &self.issued else {
            return Ok(false);
        };
        if now < *issued.renew_at.read().unwrap_or_else(|e| e.into_inner()) {
            return Ok(false);
        }
        let (key, renew_at) = issue(ca, &issued.names, validity, now)?;
        *self.current.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        *issued.renew_at.write().unwrap_or_else(|e| e.into_inner()) = renew_at;
        Ok(true)
    }

    /// Wraps `tcp` so each connection is served over TLS.
    pub fn listener(&self, tcp: TcpListener) -> TlsListener {
        TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(self.config.clone()),
            handshakes: JoinSet::new(),
        }
    }
}

/// The host's name, `localhost`, and the loopback addresses.
fn default_names() -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_owned());
        }
    }
    names.extend(["localhost", "127.0.0.1", "::1"].map(str::to_owned));
    names
}

fn issue(
    ca: &NodeCa,
    names: &[String],
    validity: Duration,
    now: DateTime<Utc>,
) -> Result<(CertifiedKey, DateTime<Utc>), TlsError> {
    let issued = ca.issue_server(names, now, validity)?;
    let key_pem = issued.private_key_pem.unwrap_or_default();
    let chain_pem = format!("{}{}", issued.cert_pem, ca.cert_pem());
    let key = certified_key(
        (chain_pem.as_bytes(), "the issued certificate"),
        (key_pem.as_bytes(), "the issued key"),
    )?;
    let life = (issued.not_after - issued.not_before).num_seconds().max(0);
    let renew_at = issued.not_before + chrono::Duration::seconds(life * 2 / 3);
    Ok((key, renew_at))
}

fn load_files(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })
    };
    let chain = read(cert_file)?;
    let key = read(key_file)?;
    certified_key(
        (&chain, &cert_file.display().to_string()),
        (&key, &key_file.display().to_string()),
    )
}

/// A chain and its key, each given with where it came from (for the error).
fn certified_key(
    (chain_pem, chain_source): (&[u8], &str),
    (key_pem, key_source): (&[u8], &str),
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: chain_source.to_owned(),
            what: "CERTIFICATE",
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::Pem {
        path: key_source.to_owned(),
        what: "PRIVATE KEY",
    })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(TlsError::Key)?;
    Ok(CertifiedKey::new(chain, signer))
}

/// A TCP listener whose connections are TLS streams (see the module docs).
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("tcp", &self.tcp)
            .field("pending_handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept(), if self.handshakes.len() < MAX_PENDING_HANDSHAKES => {
                    match accepted {
                        Ok((stream, addr)) => {
                            let acceptor = self.acceptor.clone();
                            self.handshakes.spawn(async move {
                                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                    Ok(Ok(tls)) => Some((tls, addr)),
                                    Ok(Err(error)) => {
                                        tracing::debug!(%addr, %error, "TLS handshake failed");
                                        None
                                    }
                                    Err(_) => {
                                        tracing::debug!(%addr, "TLS handshake timed out");
                                        None
                                    }
                                }
                            });
                        }
                        Err(error) => {
                            // Out of file descriptors and the like: back off instead of spinning.
                            tracing::warn!(%error, "accepting a connection failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_issued_certificate_is_renewed_at_two_thirds_of_its_life_and_files_never() {
        let now = Utc::now();
        let day = Duration::from_secs(86_400);
        let (ca, _) = NodeCa::generate("test", now, day * 365).unwrap();
        let config = TlsConfig::FleetCa {
            names: vec!["cp.example".into(), "10.0.0.2".into()],
        };
        let tls = ServerTls::new(&config, &ca, day * 6, now).unwrap().unwrap();
        let served = |tls: &ServerTls| tls.current.0.read().unwrap().cert[0].clone();
        let first = served(&tls);
        assert!(
            !tls.renew(&ca, day * 6, now + chrono::Duration::days(3))
                .unwrap()
        );
        assert_eq!(served(&tls), first);
        assert!(
            tls.renew(&ca, day * 6, now + chrono::Duration::days(4))
                .unwrap()
        );
        assert_ne!(served(&tls), first, "a new certificate is served");
        // The chain carries the CA, so a client pinning the CA's fingerprint finds it.
        let chain = &tls.current.0.read().unwrap().cert;
        assert_eq!(chain.len(), 2);
        assert_eq!(
            kvfleet_proto::CaFingerprint::of_der(&chain[1]),
            ca.fingerprint()
        );
        assert!(
            ServerTls::new(&TlsConfig::Off, &ca, day, now)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn missing_and_wrong_files_are_named() {
        let now = Utc::now();
        let (ca, _) = NodeCa::generate("test", now, Duration::from_secs(3600)).unwrap();
        let dir = std::env::temp_dir().join(format!("kvfleet-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem").unwrap();
        let missing = dir.join("missing.pem");
        let files = |cert: &Path, key: &Path| TlsConfig::Files {
            cert_file: cert.to_owned(),
            key_file: key.to_owned(),
        };
        let error = ServerTls::new(&files(&missing, &empty), &ca, Duration::from_secs(60), now)
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing.pem"), "{error}");
        let error = ServerTls::new(&files(&empty, &empty), &ca, Duration::from_secs(60), now)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("empty.pem") && error.contains("CERTIFICATE"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
