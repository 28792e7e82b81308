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
}

/// A token just created: the only time its secret is seen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewToken {
    pub id: String,
    pub role: Role,
    pub name: String,
    pub token: String,
}

const PREFIX: &str = "dgt_";

/// Creates and stores a token.
pub async fn create_token(store: &Store, role: Role, name: &str) -> Result<NewToken, StoreError> {
    let mut id = [0u8; 6];
    let mut secret = [0u8; 32];
    // The OS random source failing is not something to continue past.
    getrandom::fill(&mut id).map_err(|e| StoreError::Conflict(format!("random: {e}")))?;
    getrandom::fill(&mut secret).map_err(|e| StoreError::Conflict(format!("random: {e}")))?;
    let (id, secret) = (hex::encode(id), hex::encode(secret));
    store
        .insert_token(&TokenRecord {
            id: id.clone(),
            hash: hash_secret(&secret),
            role: role.as_str().to_string(),
            name: name.to_string(),
            created_at_ms: now_ms(),
            revoked_at_ms: None,
        })
        .await?;
    Ok(NewToken {
        token: format!("{PREFIX}{id}_{secret}"),
        id,
        role,
        name: name.to_string(),
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
}
