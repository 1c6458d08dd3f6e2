//! Inner training steps on one machine: batches from cached latents, the rectified-flow loss,
//! AdamW with warm-up/cosine, clipping, accumulation and EMA, deterministic for a seed.
//!
//! Randomness is counter-based: before each micro-batch the torch generator is re-seeded from
//! (run seed, step, micro-batch), and the data order depends only on (seed, epoch). A checkpoint's
//! "RNG state" is therefore its step and data position, and a resumed run draws exactly the numbers
//! an uninterrupted one would.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::{Precision, RunSpec};
use crate::data::stream::{BatchArray, ShardStream, StreamError};
use crate::data::wds::Dtype;
use crate::data::{mix_seed, DataPosition, Order};
use crate::model::{weights, Model, TextCond, WeightsError};
use crate::train::objective;
use crate::train::optim::{clip_grad_norm, lr_at, AdamW, Ema};

/// Encoded training set: latents `[N, C, S, S]`, text `tokens [N, L, T]` and `pooled [N, T]`,
/// plus the empty caption's encoding used for caption dropout and guidance.
pub struct LatentSet {
    pub latents: Tensor,
    pub text: TextCond,
    pub null_text: TextCond,
    pub captions: Vec<String>,
}

impl LatentSet {
    pub fn len(&self) -> usize {
        self.latents.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn to_safetensors(&self) -> Vec<u8> {
        let tensors = vec![
            ("latents".to_string(), self.latents.shallow_clone()),
            ("text.tokens".to_string(), self.text.tokens.shallow_clone()),
            ("text.pooled".to_string(), self.text.pooled.shallow_clone()),
            ("null.tokens".to_string(), self.null_text.tokens.shallow_clone()),
            ("null.pooled".to_string(), self.null_text.pooled.shallow_clone()),
        ];
        let meta = HashMap::from([("captions".to_string(), serde_json::to_string(&self.captions).unwrap())]);
        weights::to_safetensors(&tensors, Some(meta))
    }

    pub fn from_safetensors(bytes: &[u8], file: &str) -> Result<LatentSet, WeightsError> {
        let mut t = weights::from_safetensors(bytes, file)?;
        let mut take =
            |name: &str| t.remove(name).ok_or_else(|| WeightsError::Missing { file: file.into(), name: name.into() });
        let latents = take("latents")?;
        let text = TextCond { tokens: take("text.tokens")?, pooled: take("text.pooled")? };
        let null_text = TextCond { tokens: take("null.tokens")?, pooled: take("null.pooled")? };
        let meta = weights::metadata(bytes, file)?;
        let captions = meta
            .get("captions")
            .and_then(|c| serde_json::from_str(c).ok())
            .ok_or_else(|| WeightsError::Missing { file: file.into(), name: "metadata.captions".into() })?;
        Ok(LatentSet { latents, text, null_text, captions })
    }

    pub fn to_device(&self, device: Device) -> LatentSet {
        LatentSet {
            latents: self.latents.to_device(device),
            text: self.text.to_device(device),
            null_text: self.null_text.to_device(device),
            captions: self.captions.clone(),
        }
    }
}

/// Where training samples come from: the whole set in memory (the embedded demo), or encoded
/// shards streamed from an object store. Both map an absolute position to one sample.
pub enum TrainData {
    Memory { set: LatentSet, order: Order },
    Stream { stream: Box<ShardStream>, null_text: TextCond },
}

/// (epoch, cursor) of position `g` over a set of `len` samples.
fn set_position(len: usize, g: u64) -> DataPosition {
    let n = len as u64;
    DataPosition { epoch: g / n, cursor: g % n }
}

impl TrainData {
    /// Samples per epoch.
    pub fn len(&self) -> usize {
        match self {
            TrainData::Memory { set, .. } => set.len(),
            TrainData::Stream { stream, .. } => stream.len() as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (epoch, cursor) of absolute position `g`, as checkpoints record it.
    pub fn position(&self, g: u64) -> DataPosition {
        match self {
            TrainData::Memory { set, .. } => set_position(set.len(), g),
            TrainData::Stream { stream, .. } => stream.position(g),
        }
    }

    pub fn null_text(&self) -> &TextCond {
        match self {
            TrainData::Memory { set, .. } => &set.null_text,
            TrainData::Stream { null_text, .. } => null_text,
        }
    }

    /// Latents `[B, C, H, W]` (one bucket's shape) and text of the samples at `positions`, on `device`.
    pub fn batch(&mut self, positions: &[u64], device: Device) -> Result<(Tensor, TextCond), StreamError> {
        match self {
            TrainData::Memory { set, order } => {
                let idx: Vec<i64> = positions.iter().map(|&g| order.at(g)).collect();
                let idx = Tensor::from_slice(&idx).to_device(device);
                Ok((set.latents.index_select(0, &idx), set.text.select(&idx)))
            }
            TrainData::Stream { stream, .. } => {
                let b = positions.len() as i64;
                let batch = stream.batch(positions)?;
                let enc = stream.encoding();
                // Stored dtype to the device (half the bytes for f16), converted to f32 there.
                let tensor = |a: &BatchArray, dims: &[usize]| {
                    let shape: Vec<i64> = [b].into_iter().chain(dims.iter().map(|&d| d as i64)).collect();
                    let kind = match a.dtype {
                        Dtype::F16 => Kind::Half,
                        Dtype::F32 => Kind::Float,
                    };
                    Tensor::from_data_size(&a.data, &shape, kind).to_device(device).to_kind(Kind::Float)
                };
                let latents = tensor(&batch.latents, &batch.latent_shape);
                let tokens = tensor(&batch.text, &enc.text_shape);
                let pooled = tensor(&batch.pooled, &[enc.pooled_dim]);
                Ok((latents, TextCond { tokens, pooled }))
            }
        }
    }

    /// Whether batches come from aspect-ratio buckets (each batch one of several latent shapes).
    pub fn is_bucketed(&self) -> bool {
        matches!(self, TrainData::Stream { stream, .. } if stream.is_bucketed())
    }

    /// The latent shapes `[C, H, W]` samples have (one per bucket) and the text shapes
    /// `([L, T], [P])` per sample.
    fn shapes(&self) -> (Vec<Vec<i64>>, Vec<i64>, i64) {
        match self {
            TrainData::Memory { set, .. } => (
                vec![set.latents.size()[1..].to_vec()],
                set.text.tokens.size()[1..].to_vec(),
                set.text.pooled.size()[1],
            ),
            TrainData::Stream { stream, .. } => {
                let e = stream.encoding();
                let v = |d: &[usize]| d.iter().map(|&x| x as i64).collect::<Vec<_>>();
                (stream.latent_shapes().iter().map(|s| v(s)).collect(), v(&e.text_shape), e.pooled_dim as i64)
            }
        }
    }
}

/// What one optimizer step reports.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct StepStats {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

/// Everything a run's training holds in memory; checkpoints save and restore all of it.
pub struct Trainer {
    pub spec: RunSpec,
    /// The weights being trained (and replica 0 of `train.replicas`).
    pub model: Model,
    /// Replicas 1.. of data parallelism inside this process: their weights are copied from
    /// `model` before each step, their gradients summed into it after; not part of checkpoints.
    replicas: Vec<Model>,
    /// libtorch CPU threads each replica's thread uses when there are several.
    threads_per_replica: i32,
    pub ema: Ema,
    pub opt: AdamW,
    /// Optimizer steps completed.
    pub step: u64,
    pub data: TrainData,
}

/// libtorch's device for the spec's.
pub fn tch_device(device: crate::config::Device) -> Device {
    match device {
        crate::config::Device::Cpu => Device::Cpu,
        crate::config::Device::Cuda(i) => Device::Cuda(i),
    }
}

/// The run's initial weights (θ_0) as safetensors bytes: the same init a fresh `Trainer` makes.
pub fn initial_weights(spec: &RunSpec) -> Result<Vec<u8>, String> {
    tch::manual_seed(mix_seed(spec.train.seed, 0) as i64);
    let model = tch::no_grad(|| Model::new(&spec.model, Device::Cpu))?;
    Ok(model.to_safetensors(None))
}

/// Refuses a CUDA device libtorch cannot see, with the likely cause, instead of a libtorch panic.
pub fn check_device(device: Device) -> Result<(), String> {
    if device.is_cuda() && !tch::Cuda::is_available() {
        return Err("device cuda requested but libtorch sees no CUDA device (no GPU/driver here, or a build \
                    without `--features cuda`)"
            .into());
    }
    Ok(())
}

impl Trainer {
    /// A fresh run: the model initialised from the run seed.
    pub fn new(spec: RunSpec, data: LatentSet) -> Result<Trainer, String> {
        let order = Order::new(spec.train.seed, data.len().max(1));
        let device = tch_device(spec.train.device);
        Trainer::with_data(spec, TrainData::Memory { set: data.to_device(device), order })
    }

    /// A fresh run over any data source.
    pub fn with_data(spec: RunSpec, data: TrainData) -> Result<Trainer, String> {
        let device = tch_device(spec.train.device);
        check_device(device)?;
        if spec.train.threads > 0 {
            tch::set_num_threads(spec.train.threads);
        }
        let (l, t) = spec.model.text_shape();
        let (latents, tokens, pooled) = data.shapes();
        for latent in &latents {
            spec.model.check_latent(latent, data.is_bucketed())?;
        }
        if pooled != t || (l > 1 && tokens != [l, t]) {
            return Err(format!(
                "text embeddings have shape {tokens:?} (pooled {pooled}), the model expects [{l}, {t}] (pooled {t})"
            ));
        }
        if data.is_empty() {
            return Err("training set is empty".into());
        }
        tch::manual_seed(mix_seed(spec.train.seed, 0) as i64);
        let mut model = Model::new(&spec.model, device)?;
        let bf16 = match spec.train.precision {
            Precision::Auto => device.is_cuda(),
            Precision::Bf16 => true,
            Precision::F32 => false,
        };
        if bf16 {
            model.set_compute(Kind::BFloat16);
        }
        let mut replicas = Vec::new();
        for i in 1..spec.train.replicas {
            let mut replica = Model::new(&spec.model, replica_device(device, i)?)?;
            replica.set_compute(model.compute());
            replicas.push(replica);
        }
        let threads = if spec.train.threads > 0 { spec.train.threads } else { tch::get_num_threads() };
        let threads_per_replica = (threads / spec.train.replicas as i32).max(1);
        let ema = Ema::new(&model, spec.train.ema_decay);
        let opt = AdamW::new(&model, &spec.train);
        Ok(Trainer { spec, model, replicas, threads_per_replica, ema, opt, step: 0, data })
    }

    /// One optimizer step of a single-process run: the samples at positions `step·B ..`,
    /// randomness keyed by the step, the learning rate of the schedule.
    pub fn train_step(&mut self) -> Result<StepStats, StreamError> {
        let cfg = &self.spec.train;
        let lr = lr_at(cfg, self.step, cfg.steps);
        let first = self.step * cfg.batch_size as u64;
        let positions: Vec<u64> = (first..first + cfg.batch_size as u64).collect();
        self.step_on(&positions, self.step, lr)
    }

    /// One optimizer step on the samples at absolute data `positions` (B of them), the torch
    /// generator re-seeded from `(seed, counter)`. DiLoCo workers call this with their planned
    /// positions. The batch is cut into `grad_accum × replicas` micro-batches, replica r taking
    /// the r-th run of `grad_accum` of them; all inputs and noise are drawn here, in micro-batch
    /// order, so the step depends only on (seed, counter, positions, replicas).
    pub fn step_on(&mut self, positions: &[u64], counter: u64, lr: f64) -> Result<StepStats, StreamError> {
        let cfg = &self.spec.train;
        let (accum, replicas, seed, grad_clip) = (cfg.grad_accum, cfg.replicas, cfg.seed, cfg.grad_clip);
        let (sigma_dist, caption_dropout) = (cfg.sigma, cfg.caption_dropout);
        let micros = accum * replicas;
        let micro = cfg.batch_size / micros;
        let mut work: Vec<Vec<MicroBatch>> = Vec::with_capacity(replicas as usize);
        for j in 0..micros {
            let device =
                if j / accum == 0 { self.model.device } else { self.replicas[(j / accum - 1) as usize].device };
            // Counter-based randomness: see the module docs.
            tch::manual_seed(mix_seed(seed, 1 + counter * micros as u64 + j as u64) as i64);
            let chunk = &positions[(j * micro) as usize..((j + 1) * micro) as usize];
            let (x0, text) = self.data.batch(chunk, device)?;
            let sigma = objective::sample_sigma(sigma_dist, micro, Device::Cpu).to_device(device);
            let eps = Tensor::randn(x0.size(), (Kind::Float, Device::Cpu)).to_device(device);
            let drop = Tensor::rand([micro], (Kind::Float, Device::Cpu)).lt(caption_dropout).to_device(device);
            if j % accum == 0 {
                work.push(Vec::new());
            }
            work.last_mut().expect("pushed").push(MicroBatch { x0, text, sigma, eps, drop });
        }
        let scale = 1.0 / micros as f64;
        let losses: Vec<Tensor> = if self.replicas.is_empty() {
            let null = self.data.null_text();
            backward_all(&mut self.model, &work.pop().expect("one replica"), null, scale)
        } else {
            self.sync_replicas();
            let threads = self.threads_per_replica;
            let null = self.data.null_text();
            let models = std::iter::once(&mut self.model).chain(self.replicas.iter_mut());
            let per_replica: Vec<Vec<Tensor>> = std::thread::scope(|s| {
                let handles: Vec<_> = models
                    .zip(work)
                    .map(|(model, batches)| {
                        let null = null.to_device(model.device);
                        s.spawn(move || {
                            if !model.device.is_cuda() {
                                tch::set_num_threads(threads);
                            }
                            backward_all(model, &batches, &null, scale)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("a replica's thread panicked")).collect()
            });
            // Fixed summation order (replica 1, 2, … into replica 0): deterministic.
            for replica in &self.replicas {
                self.model.add_grad(&replica.grad().to_device(self.model.device));
            }
            per_replica.into_iter().flatten().collect()
        };
        let grad_norm = clip_grad_norm(&self.model, grad_clip);
        self.opt.step(&self.model, lr);
        self.step += 1;
        self.ema.update(&self.model, self.step);
        // Read back only now, so the device is not waited on between kernels of the step.
        let loss_sum: f64 = losses.iter().map(|l| l.double_value(&[])).sum();
        let grad_norm = grad_norm.double_value(&[]);
        Ok(StepStats { step: self.step, loss: loss_sum / micros as f64, lr, grad_norm })
    }

    /// Copies the trained weights into every replica (before each step, so weights loaded from a
    /// checkpoint or a DiLoCo round reach them too).
    fn sync_replicas(&mut self) {
        tch::no_grad(|| {
            for replica in &mut self.replicas {
                replica.flat().shallow_clone().copy_(self.model.flat());
            }
        });
    }

    /// Replaces the model's weights (not the optimizer state) from safetensors bytes.
    pub fn load_weights(&mut self, bytes: &[u8], file: &str) -> Result<(), WeightsError> {
        self.model.load_safetensors(bytes, file)
    }

    /// Each sample's objective under the current weights at `positions` (one batch shape), in
    /// one pass: sample i at the fixed noise level σ = (2·(i mod 8) + 1)/16, noise drawn from
    /// `seed`, no caption dropout. What update scoring compares before and after an update.
    pub fn losses_at(&mut self, positions: &[u64], seed: u64) -> Result<Vec<f64>, StreamError> {
        let device = self.model.device;
        let (x0, text) = self.data.batch(positions, device)?;
        let null = self.data.null_text().to_device(device);
        let n = positions.len() as i64;
        let levels: Vec<f32> = (0..n).map(|i| (2 * (i % 8) + 1) as f32 / 16.0).collect();
        tch::manual_seed(seed as i64);
        let eps = Tensor::randn(x0.size(), (Kind::Float, Device::Cpu)).to_device(device);
        let sigma = Tensor::from_slice(&levels).to_device(device);
        let keep = Tensor::zeros([n], (Kind::Bool, device));
        let losses = tch::no_grad(|| {
            let error = objective::squared_error(&self.model, &x0, &text, &null, &keep, &sigma, &eps);
            error.flatten(1, -1).mean_dim(1, false, Kind::Float)
        });
        Ok(Vec::<f64>::try_from(losses.to_kind(Kind::Double).to_device(Device::Cpu)).expect("a [B] tensor"))
    }

    /// Optimizer state as named tensors (`m.<param>`, `v.<param>`).
    pub fn optimizer_tensors(&self) -> Vec<(String, Tensor)> {
        let m = self.model.flat_views(&self.opt.m).into_iter().map(|(n, t)| (format!("m.{n}"), t));
        let v = self.model.flat_views(&self.opt.v).into_iter().map(|(n, t)| (format!("v.{n}"), t));
        m.chain(v).collect()
    }

    /// Restores optimizer moments saved by [`Trainer::optimizer_tensors`].
    pub fn load_optimizer(
        &mut self,
        loaded: &BTreeMap<String, Tensor>,
        file: &str,
        t: u64,
    ) -> Result<(), WeightsError> {
        let targets = self.optimizer_tensors();
        weights::load_into(&targets, loaded, file, &[])?;
        self.opt.t = t;
        Ok(())
    }
}

/// One micro-batch's inputs, drawn before the replicas run.
struct MicroBatch {
    x0: Tensor,
    text: TextCond,
    sigma: Tensor,
    eps: Tensor,
    drop: Tensor,
}

/// Forward and backward of `batches` on `model`, gradients (× `scale`) accumulated from zero;
/// returns the unscaled losses.
fn backward_all(model: &mut Model, batches: &[MicroBatch], null: &TextCond, scale: f64) -> Vec<Tensor> {
    model.zero_grad();
    batches
        .iter()
        .map(|b| {
            let loss =
                objective::squared_error(model, &b.x0, &b.text, null, &b.drop, &b.sigma, &b.eps).mean(Kind::Float);
            model.backward(&(&loss * scale));
            loss.detach()
        })
        .collect()
}

/// Replica `i`'s device: the same CPU, or the i-th GPU after the run's.
fn replica_device(device: Device, i: i64) -> Result<Device, String> {
    match device {
        Device::Cuda(first) => {
            let index = first + i as usize;
            let available = tch::Cuda::device_count() as usize;
            if index >= available {
                return Err(format!("train.replicas asks for GPU cuda:{index} but libtorch sees {available} GPU(s)"));
            }
            Ok(Device::Cuda(index))
        }
        other => Ok(other),
    }
}

impl Trainer {
    /// A model holding the EMA weights, for sampling and export.
    pub fn ema_model(&self) -> Model {
        let model = Model::new(&self.spec.model, self.model.device).expect("spec validated at start");
        weights::load_into(
            model.params(),
            &self.ema.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
            "ema",
            &[],
        )
        .expect("same architecture");
        let mut model = model;
        model.set_compute(self.model.compute());
        model
    }
}

/// Validation loss: the objective on `set`'s first `n` samples at 8 fixed noise levels
/// (σ = 1/16, 3/16, …, 15/16) with noise drawn from `seed`, no caption dropout. Deterministic, so
/// runs compare on exactly the same problem.
pub fn validation_loss(model: &Model, set: &LatentSet, n: i64, seed: u64) -> f64 {
    let n = n.min(set.len() as i64);
    let device = model.device;
    let mut total = 0.0;
    let null = set.null_text.to_device(device);
    for chunk_start in (0..n).step_by(64) {
        let len = 64.min(n - chunk_start);
        let idx = Tensor::arange_start(chunk_start, chunk_start + len, (Kind::Int64, Device::Cpu));
        let x0 = set.latents.index_select(0, &idx).to_device(device);
        let text = set.text.select(&idx).to_device(device);
        total += fixed_noise_loss(model, &x0, &text, &null, mix_seed(seed, chunk_start as u64)) * len as f64;
    }
    total / n as f64
}

/// The objective on a batch at 8 fixed noise levels (σ = 1/16, 3/16, …, 15/16), noise drawn from
/// `seed`, no caption dropout: the same problem for any weights, so losses compare exactly.
fn fixed_noise_loss(model: &Model, x0: &Tensor, text: &TextCond, null: &TextCond, seed: u64) -> f64 {
    let (len, device, levels) = (x0.size()[0], model.device, 8);
    let keep = Tensor::zeros([len], (Kind::Bool, device));
    let mut total = 0.0;
    tch::no_grad(|| {
        for l in 0..levels {
            tch::manual_seed(mix_seed(seed, l as u64) as i64);
            let eps = Tensor::randn(x0.size(), (Kind::Float, Device::Cpu)).to_device(device);
            let sigma = Tensor::full([len], (2 * l + 1) as f64 / (2 * levels) as f64, (Kind::Float, device));
            total += objective::squared_error(model, x0, text, null, &keep, &sigma, &eps)
                .mean(Kind::Float)
                .double_value(&[]);
        }
    });
    total / levels as f64
}
