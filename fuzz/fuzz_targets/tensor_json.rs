//! Tensors in Open Inference Protocol JSON (self-test vectors inside manifests, the agent's
//! local inference API): `serde_json::from_slice::<Tensor>` must never panic, and an accepted
//! tensor must be well formed (`check()` passes) and survive a JSON round trip unchanged.
#![no_main]

use fleet_protocol::Tensor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(tensor) = serde_json::from_slice::<Tensor>(data) else {
        return;
    };
    tensor
        .check()
        .unwrap_or_else(|e| panic!("decoded tensor fails its own check: {e}"));
    let json = serde_json::to_vec(&tensor).expect("a checked tensor serialises");
    let again: Tensor = serde_json::from_slice(&json).unwrap_or_else(|e| {
        panic!(
            "tensor's own JSON is refused: {e}\njson: {}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(again, tensor);
    assert_eq!(serde_json::to_vec(&again).unwrap(), json);
});
