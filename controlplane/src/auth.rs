//! Bearer tokens, roles and the authorization matrix.
//!
//! A token reads `kvf_<12 lowercase alphanumerics>_<43 base64url characters>`. The part up to
//! the second underscore is the public *prefix*: stored in the clear (unique) to find the row,
//! shown in listings and audit. The whole token is hashed with SHA-256 and only the hash is
//! stored; the secret carries 256 random bits, so a fast hash is enough (no password
//! stretching needed) and the plain token is shown exactly once, when it is created.
//!
//! Roles and what they may do (every route names one [`Permission`]; `require` checks it):
//!
//! | permission | admin | operator | viewer | agent | join |
//! | --- | --- | --- | --- | --- | --- |
//! | `Read` (GET fleet resources, metrics) | yes | yes | yes | no | no |
//! | `Operate` (cordon/uncordon/drain, models, deployments) | yes | yes | no | no | no |
//! | `Admin` (remove nodes, tokens, audit log) | yes | no | no | no | no |
//! | `Agent` (heartbeat, watch, certificate renewal) | no | no | no | yes | no |
//! | `Register` (agent registration) | no | no | no | yes | yes |
//!
//! Join tokens also carry a use count (single-use unless made with more; see
//! [`take_join_use`]); a used-up join token is refused like a revoked one.
//!
//! No token, a malformed, unknown, expired, revoked or used-up token → 401; a valid token whose role
//! lacks the permission → 403.

use base64::Engine as _;
use rand::Rng as _;
use sha2::{Digest as _, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

pub use kvfleet_proto::api::{Permission, Role};

/// Who is calling: the token row that authenticated the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token_id: Uuid,
    /// `name (prefix)`: what the audit log records as the actor.
    pub actor: String,
    pub role: Role,
    /// Set for agent credentials.
    pub node_id: Option<Uuid>,
    /// The request's id (set by the API layer), carried into audit rows.
    pub request_id: Option<String>,
}

/// A token split into its public prefix; the full text is what gets hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToken<'a> {
    pub prefix: &'a str,
    pub full: &'a str,
}

/// Why a bearer token was not accepted (all become 401; the detail helps the operator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token (send `Authorization: Bearer kvf_...`)")]
    Missing,
    #[error("the bearer token is malformed")]
    Malformed,
    #[error("the bearer token is not known")]
    Unknown,
    #[error("the bearer token has been revoked")]
    Revoked,
    #[error("the bearer token has expired")]
    Expired,
    /// A join token that has made all the registrations it was created for.
    #[error(
        "the join token has been used up (join tokens are single-use unless created with more uses)"
    )]
    UsedUp,
}

const PREFIX_ID_LEN: usize = 12;
const SECRET_LEN: usize = 43; // 32 bytes, base64url without padding

/// Splits and checks the shape of a token. A join token that carries the fleet CA's fingerprint
/// (`kvfj1.<hex>.kvf_…`, what `POST /tokens` returns as `join_token`) is accepted too: only its
/// bearer part is looked up and hashed.
pub fn parse_token(text: &str) -> Result<ParsedToken<'_>, AuthError> {
    let text = if text.starts_with(kvfleet_proto::fingerprint::JOIN_TOKEN_PREFIX) {
        kvfleet_proto::JoinTokenText::parse(text)
            .map_err(|_| AuthError::Malformed)?
            .bearer
    } else {
        text
    };
    let rest = text.strip_prefix("kvf_").ok_or(AuthError::Malformed)?;
    let (id, secret) = rest.split_once('_').ok_or(AuthError::Malformed)?;
    let id_ok = id.len() == PREFIX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let secret_ok = secret.len() == SECRET_LEN
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !(id_ok && secret_ok) {
        return Err(AuthError::Malformed);
    }
    Ok(ParsedToken {
        prefix: &text[..4 + PREFIX_ID_LEN],
        full: text,
    })
}

/// A fresh random token.
pub fn generate_token() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let id: String = (0..PREFIX_ID_LEN)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    let secret: [u8; 32] = rng.random();
    format!(
        "kvf_{id}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    )
}

/// SHA-256 of the whole token text.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares digests without an early exit, so timing says nothing about how much matched.
fn digests_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token from an `Authorization` header, checked for shape only: a missing or malformed
/// credential is refused here, before anything asks the database.
pub fn parse_bearer(header: Option<&str>) -> Result<ParsedToken<'_>, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or(AuthError::Malformed)?
        .trim();
    parse_token(token)
}

/// Looks a token up and checks it is live.
pub async fn authenticate(
    conn: &mut PgConnection,
    header: Option<&str>,
) -> Result<Principal, AuthFailure> {
    let parsed = parse_bearer(header).map_err(AuthFailure::Denied)?;
    lookup(conn, &parsed).await.map(|(principal, _)| principal)
}

/// Looks a well-formed token up and checks it is live; returns the caller and when the token
/// expires (for the cache, which must not outlive it).
pub async fn lookup(
    conn: &mut PgConnection,
    parsed: &ParsedToken<'_>,
) -> Result<(Principal, Option<chrono::DateTime<chrono::Utc>>), AuthFailure> {
    type Row = (
        Uuid,
        String,
        String,
        Vec<u8>,
        Option<Uuid>,
        bool,
        bool,
        bool,
        Option<i32>,
        Option<chrono::DateTime<chrono::Utc>>,
    );
    // last_used_at is written at most once a minute: a heartbeat per second per agent must not
    // turn every authentication into a row update.
    let row: Option<Row> = sqlx::query_as(
        "SELECT id, name, role, secret_hash, node_id,
                revoked_at IS NOT NULL,
                expires_at IS NOT NULL AND expires_at <= now(),
                last_used_at IS NULL OR last_used_at < now() - interval '1 minute',
                uses_left, expires_at
         FROM api_tokens WHERE prefix = $1",
    )
    .bind(parsed.prefix)
    .fetch_optional(&mut *conn)
    .await
    .map_err(AuthFailure::Database)?;
    let (id, name, role, secret_hash, node_id, revoked, expired, stale, uses_left, expires_at) =
        row.ok_or(AuthFailure::Denied(AuthError::Unknown))?;
    if !digests_equal(&secret_hash, &hash_token(parsed.full)) {
        return Err(AuthFailure::Denied(AuthError::Unknown));
    }
    if revoked {
        return Err(AuthFailure::Denied(AuthError::Revoked));
    }
    if expired {
        return Err(AuthFailure::Denied(AuthError::Expired));
    }
    if uses_left == Some(0) {
        return Err(AuthFailure::Denied(AuthError::UsedUp));
    }
    if stale {
        sqlx::query("UPDATE api_tokens SET last_used_at = now() WHERE id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(AuthFailure::Database)?;
    }
    let role = Role::parse(&role).ok_or(AuthFailure::Denied(AuthError::Unknown))?;
    Ok((
        Principal {
            token_id: id,
            actor: format!("{name} ({})", parsed.prefix),
            role,
            node_id,
            request_id: None,
        },
        expires_at,
    ))
}

/// Authentication failed because of the token, or because the database could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum AuthFailure {
    #[error(transparent)]
    Denied(AuthError),
    #[error(transparent)]
    Database(sqlx::Error),
}

/// A token row to insert; the caller writes the audit entry in the same transaction.
#[derive(Debug, Clone)]
pub struct NewToken<'a> {
    pub name: &'a str,
    pub role: Role,
    pub node_id: Option<Uuid>,
    pub created_by: Option<Uuid>,
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Registrations a join token may make; `None`: unlimited.
    pub uses: Option<i32>,
}

/// Takes one use of the join token `id` inside the registration's transaction. The row lock
/// serializes concurrent registrations with the same token, so a single-use token makes one
/// node even when two agents present it at once; the loser gets [`AuthError::UsedUp`].
pub async fn take_join_use(conn: &mut PgConnection, id: Uuid) -> Result<(), AuthFailure> {
    let left: Option<Option<i32>> =
        sqlx::query_scalar("SELECT uses_left FROM api_tokens WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(AuthFailure::Database)?;
    match left {
        None => Err(AuthFailure::Denied(AuthError::Unknown)),
        Some(None) => Ok(()),
        Some(Some(0)) => Err(AuthFailure::Denied(AuthError::UsedUp)),
        Some(Some(_)) => {
            sqlx::query("UPDATE api_tokens SET uses_left = uses_left - 1 WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await
                .map_err(AuthFailure::Database)?;
            Ok(())
        }
    }
}

/// Inserts a token and returns `(id, plain token)`; the plain text is never stored.
pub async fn insert_token(
    conn: &mut PgConnection,
    new: &NewToken<'_>,
    token: Option<&str>,
) -> Result<(Uuid, String), sqlx::Error> {
    let token = token.map_or_else(generate_token, str::to_owned);
    let prefix = parse_token(&token)
        .map(|p| p.prefix.to_owned())
        .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO api_tokens (id, name, role, prefix, secret_hash, node_id, created_by, expires_at,
             uses_left)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(new.name)
    .bind(new.role.as_str())
    .bind(&prefix)
    .bind(hash_token(&token).to_vec())
    .bind(new.node_id)
    .bind(new.created_by)
    .bind(new.expires_at)
    .bind(new.uses)
    .execute(conn)
    .await?;
    Ok((id, token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_differ() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(a, b);
        let parsed = parse_token(&a).unwrap();
        assert_eq!(parsed.prefix.len(), 16);
        assert!(a.starts_with(parsed.prefix));
        assert_eq!(a.len(), 4 + 12 + 1 + 43);
    }

    #[test]
    fn a_join_token_carrying_the_ca_fingerprint_parses_to_its_bearer_part() {
        let bearer = generate_token();
        let fp = kvfleet_proto::CaFingerprint::of_der(b"ca");
        let text = kvfleet_proto::JoinTokenText::compose(&fp, &bearer);
        let parsed = parse_token(&text).unwrap();
        assert_eq!(parsed.full, bearer, "only the bearer part is hashed");
        assert_eq!(parsed, parse_token(&bearer).unwrap());
        let header = format!("Bearer {text}");
        assert_eq!(parse_bearer(Some(&header)).unwrap().full, bearer);
        for bad in [
            format!("kvfj1.{}.{bearer}", "0".repeat(63)),
            format!("kvfj1.{}.kvf_abc_def", "0".repeat(64)),
            format!("kvfj1.{}", "0".repeat(64)),
        ] {
            assert_eq!(parse_token(&bad), Err(AuthError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let good = generate_token();
        for bad in [
            "",
            "kvf_",
            "Bearer",
            "kvf_abc_def",
            &good[..good.len() - 1],
            &format!("{good}x"),
            &good.replace("kvf_", "kvx_"),
            &format!("kvf_ABCDEFGHIJKL_{}", &good[17..]),
            &format!("{}!{}", &good[..20], &good[21..]),
        ] {
            assert_eq!(parse_token(bad), Err(AuthError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn hash_is_sha256_of_the_whole_token() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(hash_token("abc")[..4], [0xba, 0x78, 0x16, 0xbf],);
        assert!(digests_equal(&hash_token("x"), &hash_token("x")));
        assert!(!digests_equal(&hash_token("x"), &hash_token("y")));
        assert!(!digests_equal(&[1, 2], &[1, 2, 3]));
    }

    /// The matrix in the module docs, row by row.
    #[test]
    fn authorization_matrix() {
        use Permission as P;
        let table: [(Role, [bool; 5]); 5] = [
            //                Read   Operate Admin  Agent  Register
            (Role::Admin, [true, true, true, false, false]),
            (Role::Operator, [true, true, false, false, false]),
            (Role::Viewer, [true, false, false, false, false]),
            (Role::Agent, [false, false, false, true, true]),
            (Role::Join, [false, false, false, false, true]),
        ];
        for (role, row) in table {
            for (permission, want) in [P::Read, P::Operate, P::Admin, P::Agent, P::Register]
                .into_iter()
                .zip(row)
            {
                assert_eq!(role.allows(permission), want, "{role} {permission:?}");
            }
        }
    }

    #[test]
    fn roles_round_trip_through_text() {
        for &role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
    }
}
