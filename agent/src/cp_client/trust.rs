//! How the agent trusts an `https` control plane: the fleet CA pinned by its fingerprint
//! (`control_plane.ca_fingerprint`, or carried by the join token `kvfj1.<hex>.<token>`: the
//! `kubeadm --discovery-token-ca-cert-hash` way, the very first contact is verified with nothing
//! copied to the node but the token), or a CA certificate file (`control_plane.ca_file`). Never
//! the system's roots: a control plane is trusted for this fleet only through this fleet's CA.
//! A fingerprint that came with the join token is saved in the state directory at the join, so
//! the node keeps pinning it once the token is gone from its config.
//!
//! With a fingerprint, the control plane's chain must carry the CA certificate (the control
//! plane's `[tls] mode = "fleet-ca"` sends it); the certificate whose SHA-256 is the pin becomes
//! the only trust anchor, and the server's certificate is then verified against it as usual
//! (signature, validity, name).

use std::path::PathBuf;
use std::sync::Arc;

use kvfleet_proto::CaFingerprint;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// What an `https` control plane's certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaTrust {
    /// The fleet CA's fingerprint (the control plane logs it at start).
    Fingerprint(CaFingerprint),
    /// A PEM file holding the CA certificate(s) to trust.
    File(PathBuf),
    /// The fingerprint the join token carried (or the one saved at the join).
    JoinToken(CaFingerprint),
}

/// Why the TLS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("reading the control plane's CA file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} holds no PEM certificate (expected a `-----BEGIN CERTIFICATE` block)")]
    NoCertificate(String),
    #[error("building the TLS client: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A rustls client config trusting only what `trust` says.
pub fn client_config(trust: &CaTrust) -> Result<rustls::ClientConfig, TrustError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = match trust {
        CaTrust::Fingerprint(pin) | CaTrust::JoinToken(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCa {
                pin: *pin,
                by: match trust {
                    CaTrust::JoinToken(_) => "the join token (kvfj1.…)",
                    _ => "control_plane.ca_fingerprint",
                },
                provider,
            }))
            .with_no_client_auth(),
        CaTrust::File(path) => {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| TrustError::Read {
                path: shown.clone(),
                source,
            })?;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok) {
                roots.add(cert)?;
            }
            if roots.is_empty() {
                return Err(TrustError::NoCertificate(shown));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Trusts a server whose chain carries the pinned CA and whose certificate that CA signed.
#[derive(Debug)]
struct PinnedCa {
    pin: CaFingerprint,
    /// Where the pin came from, for the refusal's message.
    by: &'static str,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|cert| CaFingerprint::of_der(cert) == self.pin)
        else {
            return Err(rustls::Error::General(format!(
                "the control plane's certificate chain does not carry the fleet CA pinned by \
                 {} ({}): a different fleet, or a proxy in between",
                self.by, self.pin
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
