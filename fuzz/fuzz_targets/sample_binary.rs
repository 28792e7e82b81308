//! The binary form of sampled inferences (`dgt1`, inside `sample` items on the `up` topic):
//! `sample::decode` over arbitrary bytes must never panic nor allocate beyond what the bytes
//! hold, and whatever it accepts must be stable: encoding the decoded tensors and decoding
//! again gives the same encoding (compared as bytes, since NaN != NaN).
#![no_main]

use fleet_protocol::sample::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((inputs, outputs)) = decode(data) else {
        return;
    };
    let first = encode(&inputs, &outputs);
    let (again_in, again_out) = decode(&first)
        .unwrap_or_else(|e| panic!("accepted input, but its own encoding is refused: {e}"));
    assert!(
        encode(&again_in, &again_out) == first,
        "encoding is not stable"
    );
});
