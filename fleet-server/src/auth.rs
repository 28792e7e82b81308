//! REST API tokens: `dgt_{id}_{secret}`, stored as the SHA-256 of the secret, each with a role.
//!
//! The secret is 32 random bytes, so a plain SHA-256 is enough to store it (a slow password
//! hash protects guessable secrets; these are not). The id lets the server find the row
//! without scanning, and appears in logs where the secret never does.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{now_ms, Store, StoreError, TokenRecord};

/// What a token may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads everything.
    Viewer,
    /// Also pushes and deletes models, assigns them, and enrolls devices.
    Operator,
    /// Also revokes devices and creates tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}; one of viewer, operator, admin"
            )),
        }
    }
}

/// Why a presented token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("unknown or revoked token")]
    Unknown,
    /// Only said to a caller who holds the whole token: the secret is checked first.
    #[error("token expired {ago_secs} s ago")]
    Expired { ago_secs: i64 },
}

/// A token just created: the only time its secret is seen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewToken {
    pub id: String,
    pub role: Role,
    pub name: String,
    pub token: String,
    /// When it stops working (`None`: never).
    pub expires_at_ms: Option<i64>,
}

const PREFIX: &str = "dgt_";

/// Creates and stores a token.
/// The longest lifetime a token may be given: ten years.
pub const MAX_TOKEN_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(10 * 365 * 24 * 3600);

/// A token that never expires.
pub async fn create_token(store: &Store, role: Role, name: &str) -> Result<NewToken, StoreError> {
    create_token_expiring(store, role, name, None).await
}

/// Whether `lifetime` may be given to a token: from 1 s to [`MAX_TOKEN_LIFETIME`] (longer
/// ones are refused rather than silently shortened).
pub fn check_lifetime(lifetime: std::time::Duration) -> Result<(), String> {
    if lifetime.as_secs() == 0 || lifetime > MAX_TOKEN_LIFETIME {
        return Err(format!(
            "a token's lifetime must be from 1 s to {} days",
            MAX_TOKEN_LIFETIME.as_secs() / 86_400
        ));
    }
    Ok(())
}

/// Parses a lifetime as an operator writes it: a number and a unit, `s`, `m`, `h` or `d`
/// (`90d`, `12h`), checked with [`check_lifetime`].
pub fn parse_lifetime(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit: write it as 30m, 12h or 90d"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number of units"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: one of s, m, h, d"
            ))
        }
    };
    let lifetime = std::time::Duration::from_secs(number.saturating_mul(unit_secs));
    check_lifetime(lifetime)?;
    Ok(lifetime)
}

/// A token refused once `lifetime` has passed (`None`: never); see [`check_lifetime`].
pub async fn create_token_expiring(
    store: &Store,
    role: Role,
    name: &str,
    lifetime: Option<std::time::Duration>,
) -> Result<NewToken, StoreError> {
    if let Some(Err(why)) = lifetime.map(check_lifetime) {
        return Err(StoreError::Conflict(why));
    }
    let mut id = [0u8; 6];
    let mut secret = [0u8; 32];
    // The OS random source failing is not something to continue past.
    getrandom::fill(&mut id).map_err(|e| StoreError::Conflict(format!("random: {e}")))?;
    getrandom::fill(&mut secret).map_err(|e| StoreError::Conflict(format!("random: {e}")))?;
    let (id, secret) = (hex::encode(id), hex::encode(secret));
    let created_at_ms = now_ms();
    let expires_at_ms = lifetime.map(|l| created_at_ms.saturating_add(l.as_millis() as i64));
    store
        .insert_token(&TokenRecord {
            id: id.clone(),
            hash: hash_secret(&secret),
            role: role.as_str().to_string(),
            name: name.to_string(),
            created_at_ms,
            revoked_at_ms: None,
            expires_at_ms,
        })
        .await?;
    Ok(NewToken {
        token: format!("{PREFIX}{id}_{secret}"),
        id,
        role,
        name: name.to_string(),
        expires_at_ms,
    })
}

/// Who presented a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: String,
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// How the audit log names this caller: the token's name and id.
    pub fn actor(&self) -> String {
        if self.name.is_empty() {
            format!("token {}", self.token_id)
        } else {
            format!("{} ({})", self.name, self.token_id)
        }
    }
}

/// Checks a presented token; returns who holds it.
pub async fn authenticate(store: &Store, presented: &str) -> Result<Caller, AuthError> {
    let rest = presented.strip_prefix(PREFIX).ok_or(AuthError::Malformed)?;
    let (id, secret) = rest.split_once('_').ok_or(AuthError::Malformed)?;
    if id.len() != 12 || secret.len() != 64 {
        return Err(AuthError::Malformed);
    }
    let record = store
        .token(id)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "token lookup failed");
            AuthError::Unknown
        })?
        .ok_or(AuthError::Unknown)?;
    if record.revoked_at_ms.is_some()
        || !constant_time_eq(record.hash.as_bytes(), hash_secret(secret).as_bytes())
    {
        return Err(AuthError::Unknown);
    }
    if let Some(expires_at_ms) = record.expires_at_ms {
        if now_ms() >= expires_at_ms {
            return Err(AuthError::Expired {
                ago_secs: (now_ms() - expires_at_ms) / 1000,
            });
        }
    }
    let role = record.role.parse().map_err(|_| AuthError::Unknown)?;
    Ok(Caller {
        token_id: record.id,
        name: record.name,
        role,
    })
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares secrets without an early exit on the first differing byte.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_authenticates_with_its_role_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::open(&url).await.unwrap();
        let t = create_token(&store, Role::Operator, "ci").await.unwrap();
        assert_eq!(
            authenticate(&store, &t.token).await.unwrap(),
            Caller {
                token_id: t.id.clone(),
                name: "ci".into(),
                role: Role::Operator
            }
        );
        let mut wrong = t.token.clone();
        wrong.pop();
        wrong.push(if t.token.ends_with('0') { '1' } else { '0' });
        assert_eq!(authenticate(&store, &wrong).await, Err(AuthError::Unknown));
        assert_eq!(
            authenticate(&store, "nope").await,
            Err(AuthError::Malformed)
        );
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
    }

    #[tokio::test]
    async fn an_expired_token_is_refused_and_says_so_only_to_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::open(&url).await.unwrap();
        let t = create_token_expiring(
            &store,
            Role::Admin,
            "temp",
            Some(std::time::Duration::from_secs(1)),
        )
        .await
        .unwrap();
        assert!(authenticate(&store, &t.token).await.is_ok());
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        assert!(matches!(
            authenticate(&store, &t.token).await,
            Err(AuthError::Expired { .. })
        ));
        // Without the secret, an expired token is just unknown.
        let mut wrong = t.token.clone();
        wrong.pop();
        wrong.push(if t.token.ends_with('0') { '1' } else { '0' });
        assert_eq!(authenticate(&store, &wrong).await, Err(AuthError::Unknown));
    }

    #[test]
    fn lifetimes_parse_with_their_unit_and_stay_within_bounds() {
        use std::time::Duration;
        assert_eq!(parse_lifetime("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_lifetime("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_lifetime("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_lifetime("45s"), Ok(Duration::from_secs(45)));
        for bad in ["", "d", "12", "0h", "5y", "-1d", "99999d"] {
            assert!(parse_lifetime(bad).is_err(), "{bad:?} accepted");
        }
    }
}
