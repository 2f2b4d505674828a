//! The fleet CA's fingerprint, `sha256:<64 hex digits>` of the CA certificate's DER: what an
//! agent (and the CLI) pins to trust the control plane's HTTPS certificate before it has ever
//! talked to it, as `kubeadm join --discovery-token-ca-cert-hash` does.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A SHA-256 fingerprint of a CA certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaFingerprint(pub [u8; 32]);

/// Text that is not `sha256:` followed by 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a CA fingerprint: expected sha256: followed by 64 hex digits \
     (the control plane logs it at start, and `kvfleet tokens create --role join` prints it)"
)]
pub struct BadFingerprint(pub String);

impl CaFingerprint {
    /// The fingerprint of a certificate given as DER bytes.
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// The fingerprint of the first certificate in `pem` (`-----BEGIN CERTIFICATE-----` …);
    /// `None` when it holds none that decodes.
    pub fn of_pem(pem: &str) -> Option<Self> {
        use base64::Engine as _;
        let body = pem
            .split("-----BEGIN CERTIFICATE-----")
            .nth(1)?
            .split("-----END CERTIFICATE-----")
            .next()?;
        let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        Some(Self::of_der(&der))
    }
}

impl fmt::Display for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for CaFingerprint {
    type Err = BadFingerprint;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadFingerprint(text.to_owned());
        let hex = text.trim().strip_prefix("sha256:").ok_or_else(bad)?;
        // Separators as some tools print them (`AB:CD:…`) are accepted.
        let digits: Vec<u8> = hex.bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_a_fingerprint() {
        let fp = CaFingerprint::of_der(b"not really a certificate");
        let text = fp.to_string();
        assert!(
            text.starts_with("sha256:") && text.len() == 7 + 64,
            "{text}"
        );
        assert_eq!(text.parse::<CaFingerprint>().unwrap(), fp);
        assert_eq!(
            text.to_uppercase()
                .replace("SHA256", "sha256")
                .parse::<CaFingerprint>()
                .unwrap(),
            fp
        );
        for bad in [
            "",
            "sha256:",
            "md5:00",
            &text[..70],
            &format!("{text}0"),
            &text.replace('a', "g"),
        ] {
            assert!(bad.parse::<CaFingerprint>().is_err(), "{bad:?} parsed");
        }
        // PEM is base64 of the DER, wrapped: the same fingerprint; text without a certificate
        // has none.
        let pem = "-----BEGIN CERTIFICATE-----\nbm90IHJlYWxseSBhIGNl\ncnRpZmljYXRl\n-----END CERTIFICATE-----\n";
        assert_eq!(CaFingerprint::of_pem(pem), Some(fp));
        assert_eq!(CaFingerprint::of_pem("no certificate here"), None);
        assert_eq!(
            CaFingerprint::of_pem("-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----"),
            None
        );
        // The empty input's SHA-256, a known answer.
        assert_eq!(
            CaFingerprint::of_der(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
