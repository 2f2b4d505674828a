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

/// What starts a join token that carries the fleet CA's fingerprint (version 1 of the format).
pub const JOIN_TOKEN_PREFIX: &str = "kvfj1.";

/// A join token as an admin pastes it: the bearer token, and the fleet CA's fingerprint when the
/// token carries one (`kvfj1.<64 lowercase hex>.<kvf_…>`). A bare `kvf_…` token has none.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct JoinTokenText<'a> {
    /// The CA fingerprint the token carries.
    pub ca: Option<CaFingerprint>,
    /// The bearer token the control plane knows (`kvf_…`).
    pub bearer: &'a str,
}

// The bearer token is a secret: never in Debug output.
impl fmt::Debug for JoinTokenText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinTokenText")
            .field("ca", &self.ca)
            .field("bearer", &"<redacted>")
            .finish()
    }
}

impl<'a> JoinTokenText<'a> {
    /// Splits `text` (trimmed). Text without the `kvfj1.` prefix is a bare bearer token (its
    /// shape is the control plane's to judge); with it, the fingerprint must be 64 hex digits
    /// followed by `.` and a non-empty bearer token.
    pub fn parse(text: &'a str) -> Result<Self, BadFingerprint> {
        let text = text.trim();
        let Some(rest) = text.strip_prefix(JOIN_TOKEN_PREFIX) else {
            return Ok(Self {
                ca: None,
                bearer: text,
            });
        };
        // Never echo the secret: the error shows the fingerprint part only.
        let (hex, bearer) = rest.split_once('.').unwrap_or((rest, ""));
        let ca = if hex.len() == 64 {
            format!("sha256:{hex}").parse().ok()
        } else {
            None
        };
        match ca {
            Some(ca) if !bearer.is_empty() => Ok(Self {
                ca: Some(ca),
                bearer,
            }),
            _ => Err(BadFingerprint(format!(
                "{JOIN_TOKEN_PREFIX}{}",
                hex.chars().take(64).collect::<String>()
            ))),
        }
    }

    /// The composite text for `bearer` and `ca`.
    pub fn compose(ca: &CaFingerprint, bearer: &str) -> String {
        let hex: String = ca.0.iter().map(|b| format!("{b:02x}")).collect();
        format!("{JOIN_TOKEN_PREFIX}{hex}.{bearer}")
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

    #[test]
    fn join_tokens_carry_the_fingerprint_or_not() {
        let fp = CaFingerprint::of_der(b"ca");
        let bearer = "kvf_abcdefghijkl_secret-part_x";
        let text = JoinTokenText::compose(&fp, bearer);
        assert!(
            text.starts_with("kvfj1.") && text.ends_with(bearer),
            "{text}"
        );
        assert_eq!(text.len(), 6 + 64 + 1 + bearer.len());
        let padded = format!(" {text}\n");
        let parsed = JoinTokenText::parse(&padded).unwrap();
        assert_eq!(parsed.ca, Some(fp));
        assert_eq!(parsed.bearer, bearer);
        // A bare token: no fingerprint, the token as it is.
        let bare = JoinTokenText::parse(bearer).unwrap();
        assert_eq!((bare.ca, bare.bearer), (None, bearer));
        // A broken fingerprint part, or no token after it, is refused without echoing the secret.
        for bad in [
            format!("kvfj1.{}.{bearer}", &text[6..69]),
            format!("kvfj1.{}.{bearer}", "zz".repeat(32)),
            format!("kvfj1.{}.", &text[6..70]),
            format!("kvfj1.{}", &text[6..70]),
        ] {
            let e = JoinTokenText::parse(&bad).unwrap_err();
            assert!(!e.to_string().contains("secret"), "{e}");
        }
        assert!(!format!("{parsed:?}").contains("secret"));
    }
}
