//! The sampler: keeps some inferences' inputs and outputs for the server (to label, to retrain,
//! to look at when drift is flagged), in the compact `dgt1` binary form, through the outbox at
//! the lowest priority (the first thing evicted when the disk quota is reached).
//!
//! Per model, as configured (see `[sampler]` in the config): off (privacy), a fixed rate, or a
//! reservoir of `per_window` inferences chosen uniformly per window (Vitter's algorithm R: the
//! n-th inference replaces a random slot with probability k/n, so every inference of the window
//! is kept with the same probability whatever the traffic). The decision comes before the
//! encoding, so an inference that is not kept costs one random number.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fleet_protocol::outbox::{ItemBody, Sample};
use fleet_protocol::{sample, ModelName, Tensor};

use crate::config::{SampleMode, SamplePolicy, SamplerConfig};
use crate::metrics::Metrics;
use crate::outbox::OutboxHandle;
use crate::serve::{InferenceObserver, ServingModel};

/// Outcome label: the sample went into the outbox.
pub const KEPT: &str = "kept";
/// Outcome label: the sample was chosen but its encoding is above `max_bytes`.
pub const TOO_LARGE: &str = "too_large";
/// Outcome label: the outbox refused it (the agent is stopping).
pub const REFUSED: &str = "refused";

/// One model's reservoir for the current window.
struct Reservoir {
    started: Instant,
    seen: u64,
    /// (recorded at, release, encoded sample)
    kept: Vec<(i64, u64, Vec<u8>)>,
}

pub struct Sampler {
    config: SamplerConfig,
    outbox: OutboxHandle,
    metrics: Arc<Metrics>,
    reservoirs: Mutex<HashMap<ModelName, Reservoir>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Sampler {
    pub fn new(config: SamplerConfig, outbox: OutboxHandle, metrics: Arc<Metrics>) -> Self {
        Sampler {
            config,
            outbox,
            metrics,
            reservoirs: Mutex::new(HashMap::new()),
        }
    }

    /// Encodes a chosen inference, or counts why it cannot be kept.
    fn encode(
        &self,
        model: &ModelName,
        policy: &SamplePolicy,
        inputs: &[Tensor],
        outputs: &[Tensor],
    ) -> Option<Vec<u8>> {
        let data = sample::encode(inputs, outputs);
        if data.len() > policy.max_bytes {
            self.metrics.record_sample(model, TOO_LARGE);
            return None;
        }
        Some(data)
    }

    fn push(&self, model: &ModelName, release: u64, at_ms: i64, data: Vec<u8>) {
        let body = ItemBody::Sample(Sample {
            model: model.clone(),
            release,
            format: sample::FORMAT.to_string(),
            data,
        });
        let outcome = if self.outbox.push(at_ms, &body) {
            KEPT
        } else {
            REFUSED
        };
        self.metrics.record_sample(model, outcome);
    }

    /// Offers one served inference.
    pub fn offer(&self, model: &ServingModel, inputs: &[Tensor], outputs: &[Tensor]) {
        let policy = self.config.policy(model.name.as_str());
        if !policy.enabled {
            return;
        }
        match policy.mode {
            SampleMode::Rate => {
                if policy.rate <= 0.0 || fastrand::f64() >= policy.rate {
                    return;
                }
                if let Some(data) = self.encode(&model.name, &policy, inputs, outputs) {
                    self.push(&model.name, model.release, now_ms(), data);
                }
            }
            SampleMode::Reservoir => self.offer_to_reservoir(model, &policy, inputs, outputs),
        }
    }

    fn offer_to_reservoir(
        &self,
        model: &ServingModel,
        policy: &SamplePolicy,
        inputs: &[Tensor],
        outputs: &[Tensor],
    ) {
        let window = Duration::from_secs(policy.window_secs);
        let now = Instant::now();
        let closed = {
            let mut reservoirs = self
                .reservoirs
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let reservoir = reservoirs
                .entry(model.name.clone())
                .or_insert_with(|| Reservoir {
                    started: now,
                    seen: 0,
                    kept: Vec::new(),
                });
            let closed = if now.duration_since(reservoir.started) >= window {
                let closed = std::mem::take(&mut reservoir.kept);
                reservoir.started = now;
                reservoir.seen = 0;
                closed
            } else {
                Vec::new()
            };
            reservoir.seen += 1;
            let k = policy.per_window;
            let slot = if reservoir.kept.len() < k {
                Some(None)
            } else {
                let j = fastrand::u64(0..reservoir.seen) as usize;
                (j < k).then_some(Some(j))
            };
            if let Some(slot) = slot {
                // Encoding under the lock keeps the reservoir consistent; it happens for at
                // most k·ln(n/k) of the n inferences of a window.
                if let Some(data) = self.encode(&model.name, policy, inputs, outputs) {
                    let entry = (now_ms(), model.release, data);
                    match slot {
                        None => reservoir.kept.push(entry),
                        Some(j) => reservoir.kept[j] = entry,
                    }
                }
            }
            closed
        };
        for (at_ms, release, data) in closed {
            self.push(&model.name, release, at_ms, data);
        }
    }

    /// Sends the reservoirs whose window has ended (call periodically, so a model that stops
    /// serving still delivers its last window), or all of them when `all` (at shutdown).
    pub fn flush(&self, all: bool) {
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut reservoirs = self
                .reservoirs
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (name, reservoir) in reservoirs.iter_mut() {
                let window = Duration::from_secs(self.config.policy(name.as_str()).window_secs);
                if all || now.duration_since(reservoir.started) >= window {
                    due.push((name.clone(), std::mem::take(&mut reservoir.kept)));
                    reservoir.started = now;
                    reservoir.seen = 0;
                }
            }
        }
        for (name, kept) in due {
            for (at_ms, release, data) in kept {
                self.push(&name, release, at_ms, data);
            }
        }
    }
}

impl InferenceObserver for Sampler {
    fn observe(&self, model: &ServingModel, inputs: &[Tensor], outputs: &[Tensor]) {
        self.offer(model, inputs, outputs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{self, Outbox, OutboxLimits};
    use fleet_protocol::outbox::Item;
    use fleet_protocol::{ModelVersion, TensorData};

    fn model(name: &str) -> ServingModel {
        let onnx = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../models/cancer-logreg/v1.onnx"),
        )
        .unwrap();
        let signature = crate::runtime::inspect(&onnx).unwrap();
        let plan = crate::runtime::Plan::load(&onnx, &signature.inputs).unwrap();
        ServingModel::new(
            ModelName::new(name).unwrap(),
            ModelVersion::new("v1").unwrap(),
            7,
            plan,
        )
    }

    fn tensors(i: usize) -> (Vec<Tensor>, Vec<Tensor>) {
        let x = Tensor::new("input", vec![1, 2], TensorData::F32(vec![i as f32, 0.5])).unwrap();
        let y = Tensor::new("label", vec![1], TensorData::I64(vec![i as i64])).unwrap();
        (vec![x], vec![y])
    }

    async fn samples(handle: &OutboxHandle) -> Vec<Item> {
        // Pushes are queued to the outbox thread; wait until they are committed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        handle
            .next_batch(0, 4096, 1 << 20)
            .await
            .unwrap()
            .into_iter()
            .filter(|item| matches!(item.body, ItemBody::Sample(_)))
            .collect()
    }

    fn sampler(config_toml: &str) -> (Sampler, OutboxHandle, tempfile::TempDir, Arc<Metrics>) {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("o.db"), OutboxLimits::default()).unwrap();
        let (handle, _thread) = outbox::spawn(outbox);
        let config: SamplerConfig = toml::from_str(config_toml).unwrap();
        let metrics = Arc::new(Metrics::new());
        (
            Sampler::new(config, handle.clone(), metrics.clone()),
            handle,
            dir,
            metrics,
        )
    }

    #[tokio::test]
    async fn rate_mode_keeps_about_the_rate_and_decodes_back() {
        let (sampler, handle, _dir, metrics) = sampler("rate = 0.25");
        let m = model("m");
        for i in 0..2000 {
            let (x, y) = tensors(i);
            sampler.offer(&m, &x, &y);
        }
        let kept = samples(&handle).await;
        // Binomial(2000, 0.25): mean 500, σ ≈ 19.4; ±5σ.
        assert!((403..=597).contains(&kept.len()), "{}", kept.len());
        assert_eq!(
            metrics.samples()[&(m.name.clone(), KEPT)],
            kept.len() as u64
        );
        let ItemBody::Sample(s) = &kept[0].body else {
            unreachable!()
        };
        assert_eq!((s.format.as_str(), s.release), ("dgt1", 7));
        let (inputs, outputs) = sample::decode(&s.data).unwrap();
        let TensorData::F32(v) = &inputs[0].data else {
            panic!()
        };
        let TensorData::I64(l) = &outputs[0].data else {
            panic!()
        };
        assert_eq!(
            v[0] as i64, l[0],
            "inputs and outputs of the same inference"
        );
    }

    #[tokio::test]
    async fn a_model_switched_off_keeps_nothing_and_big_samples_are_skipped() {
        let (sampler, handle, _dir, metrics) = sampler(
            "rate = 1.0\nmax_bytes = 64\n[models.private]\nenabled = false\n[models.big]\nmax_bytes = 4096",
        );
        let (private, small, big) = (model("private"), model("small"), model("big"));
        for i in 0..10 {
            let (x, y) = tensors(i);
            sampler.offer(&private, &x, &y);
            sampler.offer(&big, &x, &y);
            // 6 + (2+5+2+16+8) + (2+5+2+8+8) = 64: fits exactly; a longer name does not.
            sampler.offer(&small, &x, &y);
            let mut longer = x.clone();
            longer[0].name = "input2".into();
            sampler.offer(&small, &longer, &y);
        }
        let kept = samples(&handle).await;
        let by_model = |name: &str| {
            kept.iter()
                .filter(|i| matches!(&i.body, ItemBody::Sample(s) if s.model.as_str() == name))
                .count()
        };
        assert_eq!(
            (by_model("private"), by_model("big"), by_model("small")),
            (0, 10, 10)
        );
        assert_eq!(metrics.samples()[&(small.name.clone(), TOO_LARGE)], 10);
    }

    #[tokio::test]
    async fn reservoir_keeps_k_per_window_uniformly() {
        // Many windows of 1000 inferences each, k = 10: every position of the window must be
        // kept about equally often (the first ones are not favoured).
        let (sampler, handle, _dir, _) =
            sampler("mode = \"reservoir\"\nper_window = 10\nwindow_secs = 3600");
        let m = model("m");
        let mut first_half = 0;
        let mut total = 0;
        for _window in 0..40 {
            for i in 0..1000 {
                let (x, y) = tensors(i);
                sampler.offer(&m, &x, &y);
            }
            sampler.flush(true);
            let kept = samples(&handle).await;
            let last = kept.last().map(|i| i.id).unwrap_or(0);
            assert_eq!(kept.len(), 10, "k per window");
            for item in &kept {
                let ItemBody::Sample(s) = &item.body else {
                    unreachable!()
                };
                let (inputs, _) = sample::decode(&s.data).unwrap();
                let TensorData::F32(v) = &inputs[0].data else {
                    panic!()
                };
                total += 1;
                if v[0] < 500.0 {
                    first_half += 1;
                }
            }
            handle.acknowledge(last).await.unwrap();
        }
        // 400 kept, each in the first half with probability 1/2: mean 200, σ = 10; ±5σ.
        assert_eq!(total, 400);
        assert!(
            (150..=250).contains(&first_half),
            "{first_half} of 400 from the first half"
        );
    }
}
