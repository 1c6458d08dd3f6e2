//! A worker's start-up self-check: its training throughput on the run's model and its bandwidth
//! to the store, published in its heartbeat so forecasts and the dashboard use measured numbers.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::RunSpec;
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelfCheck {
    /// Training samples per second (fwd + bwd + AdamW) on the run's model and batch size.
    pub train_samples_per_s: f64,
    pub store_up_mb_s: f64,
    pub store_down_mb_s: f64,
    /// Size of one update upload at this model size (int8 + scales), for sync-time estimates.
    pub probe_mb: f64,
}

/// Measures throughput with `steps` timed steps on a throwaway copy of the model (the worker's own
/// trainer and its data order are untouched) and store bandwidth with one probe object.
pub fn run(spec: &RunSpec, store: &Store, name: &str, steps: usize) -> Result<SelfCheck, StoreError> {
    let device = crate::train::tch_device(spec.train.device);
    let opts = crate::bench::StepBenchOptions {
        batch: spec.train.batch_size,
        warmup: 1,
        steps: steps.max(1),
        device,
        bf16: matches!(spec.train.precision, crate::config::Precision::Bf16),
        dump: None,
    };
    let train_samples_per_s = match crate::bench::train_step("selfcheck", &spec.model, &opts) {
        Ok(b) => b.samples_per_s,
        Err(e) => {
            tracing::warn!("self-check: training throughput not measured: {e}");
            0.0
        }
    };
    // One object the size of a compressed update (1 byte per parameter), at least 1 MB.
    let params = crate::model::Model::new(&spec.model, tch::Device::Cpu).map(|m| m.num_params()).unwrap_or(1 << 20);
    let size = (params as usize).max(1 << 20);
    let payload: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let key = format!("workers/{name}.probe");
    let t0 = Instant::now();
    store.put(&key, payload)?;
    let up = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let back = store.get(&key)?;
    let down = t0.elapsed().as_secs_f64();
    store.delete(&key)?;
    let mb = back.len() as f64 / 1e6;
    Ok(SelfCheck {
        train_samples_per_s,
        store_up_mb_s: mb / up.max(1e-9),
        store_down_mb_s: mb / down.max(1e-9),
        probe_mb: mb,
    })
}
