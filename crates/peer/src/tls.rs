//! Mutual TLS for the peer transport, with the control plane's node CA as the only trust root.
//!
//! The node CA (`controlplane/src/ca.rs`) issues each node a certificate with `CN = <node id>`
//! and the SAN `<node id>.node.kvfleet`, for both server and client authentication. Here:
//! - the server side requires a client certificate and verifies it against the CA: a peer with
//!   no certificate, or one from another CA, fails the handshake;
//! - the client side verifies the server against the same CA and the name
//!   [`node_server_name`] of the node it meant to reach, so traffic cannot be steered to another
//!   node of the fleet either;
//! - TLS 1.3 only (QUIC requires it), ring as the crypto provider, ALPN `kvfleet-peer/1`.
//!
//! After the handshake, [`PeerInfo`] says which node is at the other end (from the verified
//! leaf certificate), and its serial, which the endpoint checks against the revoked serials the
//! control plane publishes.

use std::net::SocketAddr;
use std::sync::Arc;

use kvfleet_proto::NodeId;
use kvfleet_proto::peer::PEER_ALPN;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};

use crate::error::PeerError;

/// What a node needs to speak to its peers: the fleet's CA certificate and its own certificate
/// and private key, all PEM, as `POST /api/v1/agents/register` (or renewal) hands them out.
#[derive(Clone)]
pub struct PeerIdentity {
    /// The node CA's certificate.
    pub ca_pem: String,
    /// This node's certificate (optionally followed by intermediates).
    pub cert_pem: String,
    /// This node's private key (PKCS#8, SEC1 or PKCS#1).
    pub key_pem: String,
}

impl std::fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("PeerIdentity")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .finish_non_exhaustive()
    }
}

/// The node at the other end of a connection, read from its verified certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The node id (the certificate's common name).
    pub node_id: NodeId,
    /// The certificate's serial number, lowercase hex (as the control plane lists revocations).
    pub serial: String,
    /// The peer's UDP address.
    pub addr: SocketAddr,
}

/// The TLS server name of a node's certificate: `<node id>.node.kvfleet`.
pub fn node_server_name(node: NodeId) -> String {
    format!("{node}.node.kvfleet")
}

/// The parsed identity, ready for both configurations.
pub(crate) struct Credentials {
    pub(crate) server: ServerConfig,
    pub(crate) client: ClientConfig,
    pub(crate) node_id: NodeId,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, PeerError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PeerError::Identity(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(PeerError::Identity(format!(
            "{what}: no certificate in the PEM"
        )));
    }
    Ok(certs)
}

impl PeerIdentity {
    /// When this node's certificate (the chain's first) stops being valid, in Unix seconds.
    pub fn not_after(&self) -> Result<i64, PeerError> {
        let chain = certificates(&self.cert_pem, "node certificate")?;
        let (_, cert) = x509_parser::parse_x509_certificate(&chain[0])
            .map_err(|e| PeerError::Identity(format!("node certificate: {e}")))?;
        Ok(cert.validity().not_after.timestamp())
    }

    /// Parses the PEM and builds both TLS configurations.
    pub(crate) fn credentials(&self) -> Result<Credentials, PeerError> {
        let ca = certificates(&self.ca_pem, "CA certificate")?;
        let chain = certificates(&self.cert_pem, "node certificate")?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| PeerError::Identity(format!("node private key: {e}")))?;
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots
                .add(cert)
                .map_err(|e| PeerError::Identity(format!("CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let (node_id, _) = leaf_identity(&chain[0])
            .map_err(|e| PeerError::Identity(format!("node certificate: {e}")))?;

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| PeerError::Identity(format!("client verifier: {e}")))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![PEER_ALPN.to_vec()];

        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        client.alpn_protocols = vec![PEER_ALPN.to_vec()];
        Ok(Credentials {
            server,
            client,
            node_id,
        })
    }
}

/// The node id and serial of a DER certificate.
pub(crate) fn leaf_identity(der: &[u8]) -> Result<(NodeId, String), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or("the certificate has no common name")?;
    let node_id = common_name
        .parse::<NodeId>()
        .map_err(|_| format!("common name {common_name:?} is not a node id"))?;
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((node_id, serial))
}

/// Who is at the other end of an established connection.
pub(crate) fn peer_info(connection: &quinn::Connection) -> Result<PeerInfo, String> {
    let identity = connection
        .peer_identity()
        .ok_or("the peer presented no certificate")?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity type".to_owned())?;
    let leaf = chain
        .first()
        .ok_or("the peer's certificate chain is empty")?;
    let (node_id, serial) = leaf_identity(leaf)?;
    Ok(PeerInfo {
        node_id,
        serial,
        addr: connection.remote_address(),
    })
}

/// True when a handshake failure is TLS refusing a certificate (QUIC carries TLS alerts as
/// transport error codes 0x100–0x1ff), as opposed to a timeout or a lost packet.
pub(crate) fn is_tls_refusal(error: &quinn::ConnectionError) -> bool {
    let code = match error {
        quinn::ConnectionError::TransportError(e) => u64::from(e.code),
        quinn::ConnectionError::ConnectionClosed(close) => u64::from(close.error_code),
        _ => return false,
    };
    (0x100..0x200).contains(&code)
}
