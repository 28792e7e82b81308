//! The binary chunk reply (`chunk` topic): `decode_chunk` over arbitrary bytes must never
//! panic, and whatever it accepts must be exactly what `encode_chunk` writes for the decoded
//! header and data (the format has no slack: reserved bytes zero, length exact).
#![no_main]

use fleet_protocol::chunk::{decode_chunk, encode_chunk, ChunkStatus, CHUNK_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((header, body)) = decode_chunk(data) else {
        return;
    };
    assert_eq!(body.len() + CHUNK_HEADER_LEN, data.len());
    assert!(header.status == ChunkStatus::Ok || body.is_empty());
    assert!(
        encode_chunk(&header, body) == data,
        "encode_chunk(decode_chunk(x)) != x for {header:?}"
    );
});
