//! Validated identifiers: device ids, model names and model versions.
//!
//! These strings end up in MQTT topics and in file-system paths on both sides, so they are
//! checked once, when they enter the program, and carried as types afterwards. The rule is
//! the same for all three: 1 to 128 bytes of `[A-Za-z0-9._-]`, and never `.` or `..` (which
//! would walk out of a directory). Anything else, including `/`, MQTT wildcards `+` and `#`,
//! NUL and non-ASCII characters, is refused.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest identifier accepted, in bytes.
pub const MAX_IDENT_LEN: usize = 128;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} bytes long; at most {MAX_IDENT_LEN} are allowed")]
    TooLong { kind: &'static str, len: usize },
    #[error(
        "{kind} {value:?} contains {found:?}; only letters, digits, '.', '_' and '-' are allowed"
    )]
    BadChar {
        kind: &'static str,
        value: String,
        found: char,
    },
    #[error("{kind} may not be {value:?}")]
    Reserved { kind: &'static str, value: String },
}

fn validate(kind: &'static str, value: &str) -> Result<(), IdentError> {
    if value.is_empty() {
        return Err(IdentError::Empty { kind });
    }
    if value.len() > MAX_IDENT_LEN {
        return Err(IdentError::TooLong {
            kind,
            len: value.len(),
        });
    }
    if let Some(found) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(IdentError::BadChar {
            kind,
            value: value.to_string(),
            found,
        });
    }
    if value == "." || value == ".." {
        return Err(IdentError::Reserved {
            kind,
            value: value.to_string(),
        });
    }
    Ok(())
}

macro_rules! ident_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, IdentError> {
                let value = value.into();
                validate($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdentError;
            fn try_from(value: String) -> Result<Self, IdentError> {
                Self::new(value)
            }
        }

        impl FromStr for $name {
            type Err = IdentError;
            fn from_str(value: &str) -> Result<Self, IdentError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

ident_type!(
    /// A device's identity: the CN of its client certificate and a segment of its topics.
    DeviceId,
    "device id"
);
ident_type!(
    /// A model's name, for example `digits-mlp`; a directory name in the agent's store.
    ModelName,
    "model name"
);
ident_type!(
    /// A model's display version, for example `v2` or `2024.06.1`. Ordering between versions
    /// is decided by the manifest's release counter, never by this string.
    ModelVersion,
    "model version"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["dev-17", "a", "A.b_c-9", &"x".repeat(128), "..a", "a.."] {
            assert!(DeviceId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_else_with_a_reason() {
        assert_eq!(
            DeviceId::new(""),
            Err(IdentError::Empty { kind: "device id" })
        );
        assert!(matches!(
            DeviceId::new("x".repeat(129)),
            Err(IdentError::TooLong { len: 129, .. })
        ));
        for (bad, found) in [
            ("a/b", '/'),
            ("a+", '+'),
            ("#", '#'),
            ("a\0", '\0'),
            ("é", 'é'),
        ] {
            match ModelName::new(bad) {
                Err(IdentError::BadChar { found: f, .. }) => assert_eq!(f, found),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        assert!(matches!(
            ModelName::new(".."),
            Err(IdentError::Reserved { .. })
        ));
        let err = ModelName::new("../etc").unwrap_err().to_string();
        assert!(err.contains("model name") && err.contains('/'), "{err}");
    }

    #[test]
    fn serde_refuses_invalid_ids() {
        let err = serde_json::from_str::<DeviceId>("\"a/b\"").unwrap_err();
        assert!(err.to_string().contains("device id"), "{err}");
        let ok: DeviceId = serde_json::from_str("\"dev-1\"").unwrap();
        assert_eq!(ok.as_str(), "dev-1");
    }
}
