//! The MQTT topic layout: the only place that knows how `{root}/d/{device}/{kind}` is spelled.
//!
//! The agent subscribes to its own directive, ack and chunk topics and publishes on the others;
//! the server subscribes to every device's uplink topics with single-level wildcards. Both
//! sides build and parse topics here so that a device id can never smuggle in a `/`, `+` or `#`.

use std::fmt;

use crate::ids::{DeviceId, IdentError};

/// The default topic root.
pub const DEFAULT_ROOT: &str = "driftgate";

/// Longest topic root accepted, in bytes (the MQTT limit for a whole topic is 65,535).
pub const MAX_ROOT_LEN: usize = 256;

/// One of the per-device topics of the wire contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// server → agent, retained: the signed Directive.
    Directive,
    /// agent → server, retained: the reported State.
    State,
    /// agent → server, retained, also the last will: online / offline.
    Status,
    /// agent → server: an outbox Batch.
    Up,
    /// server → agent: the highest outbox id stored.
    Ack,
    /// agent → server: a chunk request.
    Fetch,
    /// server → agent: chunk bytes behind a binary header.
    Chunk,
}

impl TopicKind {
    pub const ALL: [TopicKind; 7] = [
        TopicKind::Directive,
        TopicKind::State,
        TopicKind::Status,
        TopicKind::Up,
        TopicKind::Ack,
        TopicKind::Fetch,
        TopicKind::Chunk,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TopicKind::Directive => "directive",
            TopicKind::State => "state",
            TopicKind::Status => "status",
            TopicKind::Up => "up",
            TopicKind::Ack => "ack",
            TopicKind::Fetch => "fetch",
            TopicKind::Chunk => "chunk",
        }
    }

    /// Whether the agent publishes on this topic (otherwise the server does).
    pub fn is_uplink(self) -> bool {
        matches!(
            self,
            TopicKind::State | TopicKind::Status | TopicKind::Up | TopicKind::Fetch
        )
    }

    /// Whether messages on this topic are published retained.
    pub fn is_retained(self) -> bool {
        matches!(
            self,
            TopicKind::Directive | TopicKind::State | TopicKind::Status
        )
    }

    fn parse(segment: &str) -> Option<TopicKind> {
        TopicKind::ALL.into_iter().find(|k| k.as_str() == segment)
    }
}

impl fmt::Display for TopicKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a topic or a topic root was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic root {root:?} is invalid: {why}")]
    BadRoot { root: String, why: &'static str },
    #[error("topic {topic:?} is not under {root:?}/d/")]
    NotOurs { topic: String, root: String },
    #[error("topic {topic:?} does not have the form {{root}}/d/{{device}}/{{kind}}")]
    BadShape { topic: String },
    #[error("topic {topic:?} names an invalid device: {cause}")]
    BadDevice { topic: String, cause: IdentError },
    #[error("topic {topic:?} ends in unknown kind {kind:?}")]
    UnknownKind { topic: String, kind: String },
}

/// A validated topic root, for example `driftgate` or `acme/driftgate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    root: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            root: DEFAULT_ROOT.to_string(),
        }
    }
}

impl Topics {
    /// Checks a root: non-empty, no wildcards, no NUL, no empty levels, does not start with `$`
    /// (reserved for broker topics such as `$SYS` and `$share`).
    pub fn new(root: impl Into<String>) -> Result<Self, TopicError> {
        let root = root.into();
        let why = if root.is_empty() {
            Some("it is empty")
        } else if root.len() > MAX_ROOT_LEN {
            Some("it is longer than 256 bytes")
        } else if root.contains(['+', '#', '\0']) {
            Some("it contains '+', '#' or NUL")
        } else if root.starts_with('$') {
            Some("it starts with '$', which brokers reserve")
        } else if root.split('/').any(str::is_empty) {
            Some("it has an empty level (a leading, trailing or double '/')")
        } else {
            None
        };
        match why {
            Some(why) => Err(TopicError::BadRoot { root, why }),
            None => Ok(Topics { root }),
        }
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    /// `{root}/d/{device}/{kind}`.
    pub fn topic(&self, device: &DeviceId, kind: TopicKind) -> String {
        format!("{}/d/{}/{}", self.root, device, kind.as_str())
    }

    /// The filter matching `kind` for every device: `{root}/d/+/{kind}`.
    pub fn all_devices(&self, kind: TopicKind) -> String {
        format!("{}/d/+/{}", self.root, kind.as_str())
    }

    /// The filter matching every topic of one device: `{root}/d/{device}/#` (used for ACLs).
    pub fn device_subtree(&self, device: &DeviceId) -> String {
        format!("{}/d/{}/#", self.root, device)
    }

    /// Splits a concrete topic into its device and kind.
    pub fn parse(&self, topic: &str) -> Result<(DeviceId, TopicKind), TopicError> {
        let rest = topic
            .strip_prefix(self.root.as_str())
            .and_then(|rest| rest.strip_prefix("/d/"))
            .ok_or_else(|| TopicError::NotOurs {
                topic: topic.to_string(),
                root: self.root.clone(),
            })?;
        let (device, kind) = rest.split_once('/').ok_or_else(|| TopicError::BadShape {
            topic: topic.to_string(),
        })?;
        let device = DeviceId::new(device).map_err(|cause| TopicError::BadDevice {
            topic: topic.to_string(),
            cause,
        })?;
        let kind = TopicKind::parse(kind).ok_or_else(|| {
            if kind.contains('/') {
                TopicError::BadShape {
                    topic: topic.to_string(),
                }
            } else {
                TopicError::UnknownKind {
                    topic: topic.to_string(),
                    kind: kind.to_string(),
                }
            }
        })?;
        Ok((device, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_documented_layout() {
        let topics = Topics::default();
        let dev = DeviceId::new("dev-17").unwrap();
        assert_eq!(
            topics.topic(&dev, TopicKind::Directive),
            "driftgate/d/dev-17/directive"
        );
        assert_eq!(topics.all_devices(TopicKind::Up), "driftgate/d/+/up");
        assert_eq!(topics.device_subtree(&dev), "driftgate/d/dev-17/#");
    }

    #[test]
    fn parses_with_a_nested_root() {
        let topics = Topics::new("acme/fleet").unwrap();
        let (dev, kind) = topics.parse("acme/fleet/d/pi.4/chunk").unwrap();
        assert_eq!((dev.as_str(), kind), ("pi.4", TopicKind::Chunk));
    }

    #[test]
    fn refuses_foreign_and_malformed_topics() {
        let topics = Topics::default();
        for bad in [
            "other/d/x/state",
            "driftgate/x/state",
            "driftgate/d/x",
            "driftgate/d/x/state/extra",
            "driftgate/d/x/unknown",
            "driftgate/d//state",
            "driftgate/d/+/state",
            "driftgatex/d/a/state",
        ] {
            assert!(topics.parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_bad_roots() {
        for bad in ["", "a/+", "#", "$SYS", "a//b", "/a", "a/", "a\0"] {
            assert!(Topics::new(bad).is_err(), "{bad:?}");
        }
    }
}
