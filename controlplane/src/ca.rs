//! The node CA: the control plane signs the certificates agents present to each other for
//! QUIC mTLS.
//!
//! One CA per fleet, created by the first control plane that starts and stored in the
//! `node_ca` table, its private key sealed under `ca.key_file` (by `ca_key`, which loads it). A certificate names its node (`CN = <node id>`, SANs
//! `<node id>.node.kvfleet`, the hostname and the node's IP addresses) and is valid for
//! `ca.cert_validity`; agents renew before expiry. Removing a node revokes its certificates;
//! the revoked serials are published at `GET /api/v1/ca` for peers to refuse.
//!
//! Signing is pure (time is passed in); `ca_key::load_or_create` does the IO.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use rand::Rng as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SignatureAlgorithm,
};
use uuid::Uuid;

use kvfleet_proto::api::{AgentPublicKey, KeyAlgorithm};

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the public key is not valid base64")]
    KeyEncoding,
    #[error("the public key has the wrong length for {0}")]
    KeyLength(KeyAlgorithm),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("a time is out of range")]
    Time,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The CA's name, key and certificate.
pub struct NodeCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl fmt::Debug for NodeCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCa").finish_non_exhaustive()
    }
}

/// A signed certificate and its metadata.
#[derive(Debug, Clone)]
pub struct Issued {
    pub serial: String,
    pub cert_pem: String,
    pub private_key_pem: Option<String>,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

/// What a node certificate says about its node.
#[derive(Debug, Clone)]
pub struct Subject<'a> {
    pub node_id: Uuid,
    pub hostname: &'a str,
    pub addresses: &'a [String],
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "kvfleet");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn to_offset(time: DateTime<Utc>) -> Result<time::OffsetDateTime, CaError> {
    time::OffsetDateTime::from_unix_timestamp(time.timestamp()).map_err(|_| CaError::Time)
}

fn add(now: DateTime<Utc>, duration: Duration) -> Result<DateTime<Utc>, CaError> {
    let delta = chrono::Duration::from_std(duration).map_err(|_| CaError::Time)?;
    now.checked_add_signed(delta).ok_or(CaError::Time)
}

/// A fresh 128-bit serial with the top bit clear (serials are positive integers).
fn new_serial() -> [u8; 16] {
    let mut serial: [u8; 16] = rand::rng().random();
    serial[0] &= 0x7f;
    serial[0] |= 0x01; // never a leading zero byte: keeps the DER integer 16 bytes long
    serial
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An agent's public key as rcgen needs it.
struct RawPublicKey {
    bytes: Vec<u8>,
    algorithm: &'static SignatureAlgorithm,
}

impl rcgen::PublicKeyData for RawPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

fn decode_public_key(key: &AgentPublicKey) -> Result<RawPublicKey, CaError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key.public_key.trim())
        .map_err(|_| CaError::KeyEncoding)?;
    let (len_ok, algorithm) = match key.algorithm {
        // An uncompressed P-256 point: 0x04 ‖ X ‖ Y.
        KeyAlgorithm::EcdsaP256 => (
            bytes.len() == 65 && bytes[0] == 4,
            &rcgen::PKCS_ECDSA_P256_SHA256,
        ),
        KeyAlgorithm::Ed25519 => (bytes.len() == 32, &rcgen::PKCS_ED25519),
    };
    if !len_ok {
        return Err(CaError::KeyLength(key.algorithm));
    }
    Ok(RawPublicKey { bytes, algorithm })
}

impl NodeCa {
    /// A new CA valid from `now` for `validity`.
    pub fn generate(
        name: &str,
        now: DateTime<Utc>,
        validity: Duration,
    ) -> Result<(Self, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(name);
        params.not_before = to_offset(now - chrono::Duration::minutes(5))?;
        params.not_after = to_offset(add(now, validity)?)?;
        params.serial_number = Some(SerialNumber::from_slice(&new_serial()));
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let ca = NodeCa {
            issuer: Issuer::new(ca_params(name), key),
            cert_pem: cert.pem(),
        };
        Ok((ca, key_pem))
    }

    /// Rebuilds the CA from its stored parts. rcgen signs with the issuer's name, key usages
    /// and key identifier method, which `ca_params` reproduces exactly from the name.
    pub fn from_stored(name: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(NodeCa {
            issuer: Issuer::new(ca_params(name), key),
            cert_pem: cert_pem.to_owned(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate's SHA-256 fingerprint: what agents pin (`control_plane.ca_fingerprint`).
    pub fn fingerprint(&self) -> kvfleet_proto::CaFingerprint {
        // The PEM is the one this CA wrote or loaded; were it unreadable, its bytes'
        // fingerprint matches no certificate a client sees (a loud failure, not silent trust).
        kvfleet_proto::CaFingerprint::of_pem(&self.cert_pem)
            .unwrap_or_else(|| kvfleet_proto::CaFingerprint::of_der(self.cert_pem.as_bytes()))
    }

    /// Signs a node certificate for `public_key`, or for a key generated here (returned).
    pub fn issue(
        &self,
        subject: &Subject<'_>,
        public_key: Option<&AgentPublicKey>,
        now: DateTime<Utc>,
        validity: Duration,
    ) -> Result<Issued, CaError> {
        let mut sans = vec![SanType::DnsName(
            format!("{}.node.kvfleet", subject.node_id).try_into()?,
        )];
        if let Ok(name) = subject.hostname.to_owned().try_into() {
            sans.push(SanType::DnsName(name));
        }
        for address in subject.addresses {
            // "10.0.0.5" or "10.0.0.5:7500": both name the IP.
            let ip = address
                .parse::<IpAddr>()
                .ok()
                .or_else(|| address.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()));
            if let Some(ip) = ip
                && !sans.contains(&SanType::IpAddress(ip))
            {
                sans.push(SanType::IpAddress(ip));
            }
        }
        // Peers are both clients and servers of each other.
        let usages = [
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let public_key = public_key.map(decode_public_key).transpose()?;
        self.sign(
            &subject.node_id.to_string(),
            sans,
            &usages,
            public_key.as_ref(),
            now,
            validity,
        )
    }

    /// Signs the control plane's own HTTPS certificate for `names` (DNS names or IP
    /// addresses), with a key generated here (returned): what `[tls] mode = "fleet-ca"` serves,
    /// so agents and the CLI that pin the fleet CA trust it.
    pub fn issue_server(
        &self,
        names: &[String],
        now: DateTime<Utc>,
        validity: Duration,
    ) -> Result<Issued, CaError> {
        let mut sans = Vec::new();
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into()?),
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        let common_name = names
            .first()
            .map_or("kvfleet control plane", String::as_str);
        self.sign(
            common_name,
            sans,
            &[ExtendedKeyUsagePurpose::ServerAuth],
            None,
            now,
            validity,
        )
    }

    fn sign(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usages: &[ExtendedKeyUsagePurpose],
        public_key: Option<&RawPublicKey>,
        now: DateTime<Utc>,
        validity: Duration,
    ) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "kvfleet");
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages.to_vec();
        params.use_authority_key_identifier_extension = true;
        let serial = new_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        // A little back-dating tolerates clock skew between the control plane and peers.
        let not_before = now - chrono::Duration::minutes(5);
        let not_after = add(now, validity)?;
        params.not_before = to_offset(not_before)?;
        params.not_after = to_offset(not_after)?;
        let (cert, private_key_pem) = match public_key {
            Some(key) => (params.signed_by(key, &self.issuer)?, None),
            None => {
                let key = KeyPair::generate()?;
                (
                    params.signed_by(&key, &self.issuer)?,
                    Some(key.serialize_pem()),
                )
            }
        };
        Ok(Issued {
            serial: hex(&serial),
            cert_pem: cert.pem(),
            private_key_pem,
            not_before: DateTime::from_timestamp(not_before.timestamp(), 0).ok_or(CaError::Time)?,
            not_after: DateTime::from_timestamp(not_after.timestamp(), 0).ok_or(CaError::Time)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> (Uuid, Vec<String>) {
        (
            Uuid::new_v4(),
            vec![
                "10.0.0.5".into(),
                "10.0.0.5:7500".into(),
                "fe80::1".into(),
                "not an ip".into(),
            ],
        )
    }

    #[test]
    fn issues_for_a_given_public_key_without_returning_a_private_key() {
        let now = Utc::now();
        let (ca, _) = NodeCa::generate("test CA", now, Duration::from_secs(86_400 * 365)).unwrap();
        let agent_key = KeyPair::generate().unwrap();
        let public = AgentPublicKey {
            algorithm: KeyAlgorithm::EcdsaP256,
            public_key: base64::engine::general_purpose::STANDARD
                .encode(agent_key.public_key_raw()),
        };
        let (node, addresses) = subject();
        let issued = ca
            .issue(
                &Subject {
                    node_id: node,
                    hostname: "gpu-01",
                    addresses: &addresses,
                },
                Some(&public),
                now,
                Duration::from_secs(86_400),
            )
            .unwrap();
        assert!(issued.private_key_pem.is_none());
        assert!(issued.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(issued.serial.len(), 32);
        assert_eq!(issued.not_after.timestamp() - now.timestamp(), 86_400);
        // The certificate embeds the agent's public key bytes.
        let der = pem_body(&issued.cert_pem);
        assert!(contains(&der, agent_key.public_key_raw()));
        assert!(contains(&der, node.to_string().as_bytes()));
        assert!(contains(&der, &[10, 0, 0, 5]));
    }

    #[test]
    fn generates_a_key_when_none_is_sent_and_serials_differ() {
        let now = Utc::now();
        let (ca, _) = NodeCa::generate("test CA", now, Duration::from_secs(86_400 * 365)).unwrap();
        let (node, addresses) = subject();
        let s = Subject {
            node_id: node,
            hostname: "gpu-01",
            addresses: &addresses,
        };
        let a = ca.issue(&s, None, now, Duration::from_secs(3600)).unwrap();
        let b = ca.issue(&s, None, now, Duration::from_secs(3600)).unwrap();
        assert!(
            a.private_key_pem
                .as_deref()
                .is_some_and(|k| k.contains("PRIVATE KEY"))
        );
        assert_ne!(a.serial, b.serial);
    }

    #[test]
    fn a_stored_ca_signs_like_the_original() {
        let now = Utc::now();
        let (ca, key_pem) =
            NodeCa::generate("stored CA", now, Duration::from_secs(86_400)).unwrap();
        let again = NodeCa::from_stored("stored CA", ca.cert_pem(), &key_pem).unwrap();
        let (node, addresses) = subject();
        let s = Subject {
            node_id: node,
            hostname: "h",
            addresses: &addresses,
        };
        let issued = again
            .issue(&s, None, now, Duration::from_secs(3600))
            .unwrap();
        // The issuer name in the new certificate is the CA's subject name.
        assert!(contains(&pem_body(&issued.cert_pem), b"stored CA"));
    }

    #[test]
    fn bad_public_keys_are_refused() {
        let (ca, _) = NodeCa::generate("t", Utc::now(), Duration::from_secs(86_400)).unwrap();
        let (node, addresses) = subject();
        let s = Subject {
            node_id: node,
            hostname: "h",
            addresses: &addresses,
        };
        for (algorithm, key) in [
            (KeyAlgorithm::EcdsaP256, "!!!"),
            (KeyAlgorithm::EcdsaP256, "AAAA"),
            (KeyAlgorithm::Ed25519, "AAAA"),
        ] {
            let key = AgentPublicKey {
                algorithm,
                public_key: key.into(),
            };
            assert!(
                ca.issue(&s, Some(&key), Utc::now(), Duration::from_secs(3600))
                    .is_err()
            );
        }
    }

    fn pem_body(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }
}
