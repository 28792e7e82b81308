//! What a signature costs: the server signs every directive it issues, and a device checks two
//! signatures per directive (the directive's and its manifest's). A rollout to 10,000 devices
//! is 10,000 of each, so this is the fleet's per-device cost of trust.
//!
//! ```text
//! cargo bench -p fleet-protocol --bench signatures
//! ```
//!
//! It runs with the release profile's optimisation levels (see `Cargo.toml`), which are what
//! the agent and the server ship with.

use std::time::Instant;

use ed25519_dalek::SigningKey;
use fleet_protocol::envelope::Envelope;
use fleet_protocol::keys::KeyRing;

/// The median of `runs` timings of `f`, in microseconds.
fn median_us(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut samples: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let mut ring = KeyRing::new();
    ring.insert(key.verifying_key());
    println!("Ed25519 envelopes, median of 2,000 runs each (µs):");
    println!("{:>14} {:>10} {:>10}", "payload", "sign", "open");
    // A directive with one model carries its signed manifest, self-test case included: about
    // 12 KiB for the sample models.
    for size in [256usize, 4 << 10, 16 << 10, 64 << 10] {
        let payload = vec![b'x'; size];
        let sign = median_us(2_000, || {
            std::hint::black_box(Envelope::sign("directive", payload.clone(), &key));
        });
        let envelope = Envelope::sign("directive", payload.clone(), &key);
        let open = median_us(2_000, || {
            std::hint::black_box(envelope.open(&ring, "directive").expect("a valid envelope"));
        });
        println!("{:>10} B {:>10.1} {:>10.1}", size, sign, open);
    }
}
