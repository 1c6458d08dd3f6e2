//! The training-step benchmark (P1) and worker self-check: forward + MSE + backward + clipping +
//! AdamW on a fixed batch, timed per step. The initial weights and the batch can be dumped as
//! safetensors so a PyTorch reference (bench/p1_train_step.py) runs the very same computation.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::config::{ModelConfig, TrainConfig};
use crate::model::{weights, Model, TextCond};
use crate::train::objective;
use crate::train::optim::{clip_grad_norm, AdamW};

#[derive(Debug, Serialize)]
pub struct StepBench {
    pub model: String,
    pub parameters: i64,
    pub batch: i64,
    pub threads: i32,
    pub device: String,
    pub ms_per_step_median: f64,
    pub ms_per_step_min: f64,
    pub samples_per_s: f64,
    /// Model FLOPs per step (6 · per-token matmul params · tokens, plus attention) for MFU.
    pub flops_per_step: f64,
    pub losses: Vec<f64>,
    /// Who allocated the CPU tensors: "mimalloc" (src/allocator.rs) or "system".
    pub tensor_allocator: &'static str,
    /// NVML readings taken right after the timed steps (CUDA only): power, utilisation, memory.
    pub gpus: Vec<crate::observe::telemetry::GpuReading>,
}

/// What to time.
pub struct StepBenchOptions<'a> {
    pub batch: i64,
    pub warmup: usize,
    pub steps: usize,
    pub device: Device,
    pub bf16: bool,
    /// Where to dump the initial weights, batch and config for the PyTorch side.
    pub dump: Option<&'a Path>,
}

/// Runs `warmup + steps` training steps of `name` on one fixed batch.
pub fn train_step(name: &str, cfg: &ModelConfig, opts: &StepBenchOptions) -> std::io::Result<StepBench> {
    let StepBenchOptions { batch, warmup, steps, device, bf16, dump } = *opts;
    tch::manual_seed(0);
    let mut model = Model::new(cfg, device).map_err(std::io::Error::other)?;
    if bf16 {
        model.set_compute(Kind::BFloat16);
    }
    let [c, s, _] = cfg.latent_shape();
    let (l, t) = cfg.text_shape();
    let cpu = (Kind::Float, Device::Cpu);
    let x0 = Tensor::randn([batch, c, s, s], cpu);
    let eps = Tensor::randn([batch, c, s, s], cpu);
    let sigma = Tensor::rand([batch], cpu);
    let tokens = Tensor::randn([batch, l, t], cpu);
    let pooled = Tensor::randn([batch, t], cpu);
    if let Some(dir) = dump {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("init.safetensors"), model.to_safetensors(None))?;
        let batch_tensors: Vec<(String, Tensor)> =
            [("x0", &x0), ("eps", &eps), ("sigma", &sigma), ("tokens", &tokens), ("pooled", &pooled)]
                .iter()
                .map(|(n, t)| (n.to_string(), t.shallow_clone()))
                .collect();
        std::fs::write(dir.join("batch.safetensors"), weights::to_safetensors(&batch_tensors, None))?;
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(cfg)?)?;
    }
    let (x0, eps, sigma) = (x0.to_device(device), eps.to_device(device), sigma.to_device(device));
    let text = TextCond { tokens: tokens.to_device(device), pooled: pooled.to_device(device) };
    let no_drop = Tensor::zeros([batch], (Kind::Bool, device));
    let tc = TrainConfig { weight_decay: 0.0, ..TrainConfig::default() };
    let mut opt = AdamW::new(&model, &tc);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let loss = objective::squared_error(&model, &x0, &text, &text, &no_drop, &sigma, &eps).mean(Kind::Float);
        model.zero_grad();
        model.backward(&loss);
        let _ = clip_grad_norm(&model, 1.0);
        opt.step(&model, 1e-4);
        let lv = loss.double_value(&[]); // synchronises the device
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        losses.push(lv);
    }
    let gpus = if device.is_cuda() { crate::observe::telemetry::Telemetry::start().read() } else { Vec::new() };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    Ok(StepBench {
        model: name.into(),
        parameters: model.num_params(),
        batch,
        threads: tch::get_num_threads(),
        device: format!("{device:?}"),
        ms_per_step_median: median,
        ms_per_step_min: sorted[0],
        samples_per_s: batch as f64 / (median / 1e3),
        flops_per_step: flops_per_step(cfg, batch),
        losses,
        tensor_allocator: cpu_tensor_allocator(),
        gpus,
    })
}

/// Who serves libtorch's CPU tensors (a fresh 256 KiB one, the size of a small model's activations).
pub fn cpu_tensor_allocator() -> &'static str {
    let probe = Tensor::empty([1 << 16], (Kind::Float, Device::Cpu));
    crate::allocator::owner_of(probe.data_ptr() as usize)
}

/// Training FLOPs per step: 6·N·tokens for the per-token matmuls plus 6·2·tokens²·D per attention
/// (QKᵀ and AV, forward + backward), the usual MFU accounting.
pub fn flops_per_step(cfg: &ModelConfig, batch: i64) -> f64 {
    let (tokens, d, depth, per_token, ctx) = match cfg {
        ModelConfig::Dit(c) => {
            let d = c.hidden as f64;
            let n = ((c.latent_size / c.patch_size).pow(2)) as f64;
            let mlp = c.mlp_ratio * d * d * 2.0;
            // qkv + proj, cross q + proj, mlp (per image token); cross kv runs on text tokens.
            let per_block = 4.0 * d * d + 2.0 * d * d + mlp;
            (n, d, c.depth as f64, per_block * c.depth as f64, c.text_len as f64)
        }
        ModelConfig::Tld(c) => {
            let d = c.embed_dim as f64;
            let n = ((c.latent_size / c.patch_size).pow(2)) as f64;
            let m = c.mlp_multiplier as f64;
            let per_block = 3.0 * d * d + d * d + 2.0 * m * d * d + 9.0 * m * d;
            (n, d, c.n_layers as f64, per_block * c.n_layers as f64, 2.0)
        }
    };
    let b = batch as f64;
    6.0 * per_token * tokens * b + 6.0 * 2.0 * (tokens * tokens + tokens * ctx) * d * depth * b
}

#[cfg(test)]
mod tests {
    /// libtorch calls malloc itself; only the executable's exported override reaches it.
    #[test]
    fn libtorch_tensors_come_from_mimalloc() {
        assert_eq!(super::cpu_tensor_allocator(), "mimalloc");
    }
}
