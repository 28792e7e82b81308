//! Helpers shared by the fuzz targets and the seed generator (`examples/gen_seeds.rs`).

/// The structured input of the `verify_directive` target (layout documented there).
pub mod verify_input {
    use std::sync::LazyLock;

    use fleet_protocol::{DeviceId, KeyRing, SigningKey};

    /// Length of the header before the payload.
    pub const HEADER_LEN: usize = 17;

    /// `now_ms` of the seeds: 2025-10-09T08:53:20Z.
    pub const SEED_NOW_MS: i64 = 1_760_000_000_000;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Mode {
        /// The payload is an Envelope in JSON.
        Json,
        /// The payload is signed as a directive with the trusted key.
        SignedDirective,
        /// The payload is signed as a manifest with the trusted key.
        SignedManifest,
        /// The payload is signed as a directive with a key that is not in the ring.
        UntrustedDirective,
    }

    impl Mode {
        fn bits(self) -> u8 {
            match self {
                Mode::Json => 0,
                Mode::SignedDirective => 1,
                Mode::SignedManifest => 2,
                Mode::UntrustedDirective => 3,
            }
        }
    }

    #[derive(Debug)]
    pub struct Input<'a> {
        pub mode: Mode,
        pub last_accepted_seq: Option<u64>,
        pub now_ms: i64,
        pub payload: &'a [u8],
    }

    pub fn parse(data: &[u8]) -> Option<Input<'_>> {
        if data.len() < HEADER_LEN {
            return None;
        }
        let mode = match data[0] & 3 {
            0 => Mode::Json,
            1 => Mode::SignedDirective,
            2 => Mode::SignedManifest,
            _ => Mode::UntrustedDirective,
        };
        let seq = u64::from_be_bytes(data[1..9].try_into().ok()?);
        let now_ms = i64::from_be_bytes(data[9..17].try_into().ok()?);
        Some(Input {
            mode,
            last_accepted_seq: (data[0] & 4 != 0).then_some(seq),
            now_ms,
            payload: &data[HEADER_LEN..],
        })
    }

    /// The inverse of [`parse`], for seeds.
    pub fn build(
        mode: Mode,
        last_accepted_seq: Option<u64>,
        now_ms: i64,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.push(mode.bits() | if last_accepted_seq.is_some() { 4 } else { 0 });
        out.extend_from_slice(&last_accepted_seq.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// The fixed keys: `trusted` (from `[7; 32]`) is the only key of `ring`, which serves as
    /// both the fleet and the release key ring; `untrusted` (from `[8; 32]`) is in no ring.
    pub struct Keys {
        pub trusted: SigningKey,
        pub untrusted: SigningKey,
        pub ring: KeyRing,
    }

    static KEYS: LazyLock<Keys> = LazyLock::new(|| {
        let trusted = SigningKey::from_bytes(&[7; 32]);
        let untrusted = SigningKey::from_bytes(&[8; 32]);
        let ring = [trusted.verifying_key()].into_iter().collect();
        Keys {
            trusted,
            untrusted,
            ring,
        }
    });

    /// The fixed keys, made once per process.
    pub fn keys() -> &'static Keys {
        &KEYS
    }

    /// The device the directives must name.
    pub fn device() -> DeviceId {
        DeviceId::new("dev-1").expect("valid device id")
    }
}
