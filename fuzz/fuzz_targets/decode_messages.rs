//! Every JSON wire message: `codec::decode::<T>` over arbitrary bytes must never panic, and
//! whatever it accepts must survive a round trip: `decode(encode(m))` succeeds, gives back `m`,
//! and re-encodes to the very same bytes (encode is deterministic: structs in field order,
//! maps are BTreeMaps).
//!
//! The input bytes themselves are not expected back: decoding normalises (whitespace, escapes,
//! `1.0` vs `1`, unknown fields dropped, duplicate sparse histogram buckets merged, duplicate
//! map keys collapsed), so the invariant starts from the first re-encoding.
#![no_main]

use std::fmt::Debug;

use fleet_protocol::codec::{decode, encode, WireMessage};
use fleet_protocol::{
    Ack, Batch, ChunkRequest, Directive, Envelope, Manifest, ReferenceProfile, State, Status,
};
use libfuzzer_sys::fuzz_target;

fn round_trip<M: WireMessage + PartialEq + Debug>(data: &[u8]) {
    let Ok(message) = decode::<M>(data) else {
        return;
    };
    let first = encode(&message);
    // Re-encoding may legitimately grow (a float written `0` or `-0` encodes as `0.0`/`-0.0`),
    // so a message accepted just under the size bound can encode just over it. Not a bug of
    // the decoder; skip. (Inputs are capped by -max_len far below the 1 MiB bounds anyway.)
    if first.len() > M::MAX_BYTES {
        return;
    }
    let again = decode::<M>(&first).unwrap_or_else(|e| {
        panic!(
            "{}: accepted input, but its own encoding is refused: {e}\nencoding: {}",
            M::KIND,
            String::from_utf8_lossy(&first)
        )
    });
    assert_eq!(
        again,
        message,
        "{}: decode(encode(m)) != m\nencoding: {}",
        M::KIND,
        String::from_utf8_lossy(&first)
    );
    let second = encode(&again);
    assert!(
        first == second,
        "{}: encoding is not stable\nfirst:  {}\nsecond: {}",
        M::KIND,
        String::from_utf8_lossy(&first),
        String::from_utf8_lossy(&second)
    );
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Directive>(data);
    round_trip::<Manifest>(data);
    round_trip::<Envelope>(data);
    round_trip::<State>(data);
    round_trip::<Status>(data);
    round_trip::<Batch>(data);
    round_trip::<Ack>(data);
    round_trip::<ChunkRequest>(data);
    round_trip::<ReferenceProfile>(data);
});
