//! AdamW, its learning-rate schedule, gradient clipping and the EMA of weights.
//!
//! Written here rather than taken from `tch::nn::Optimizer` because that one keeps its moments
//! inside libtorch where they cannot be checkpointed, and exact resume needs them.

use tch::Tensor;

use crate::config::TrainConfig;
use crate::model::Model;

/// Linear warm-up to `lr`, then cosine decay to `min_lr` at `total` steps.
pub fn lr_at(cfg: &TrainConfig, step: u64, total: u64) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let progress = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
    cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Elements per chunk of the AdamW update on CPU (1 MiB per array): chunks that stay in cache beat
/// both smaller chunks and one pass over the whole buffer (BENCHMARKS.md, "P1").
const CPU_CHUNK: i64 = 1 << 18;

/// AdamW (Loshchilov & Hutter) with decoupled weight decay on matrices only (not biases/norms),
/// over the model's flat parameter buffer (see [`Model`]): one update is a few kernels in all.
///
/// To spare temporaries on the hot path, the second moment is kept divided by (1 − β2):
/// `v_s ← β2·v_s + g²` is one fused in-place op, and `v = (1 − β2)·v_s`. Checkpoints store `v_s`.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken (bias correction).
    pub t: u64,
    /// First and (scaled) second moments, laid out like [`Model::flat`].
    pub m: Tensor,
    pub v: Tensor,
}

impl AdamW {
    pub fn new(model: &Model, cfg: &TrainConfig) -> AdamW {
        AdamW {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            t: 0,
            m: model.flat().zeros_like(),
            v: model.flat().zeros_like(),
        }
    }

    /// One update of the model's parameters from its accumulated [`Model::grad`].
    pub fn step(&mut self, model: &Model, lr: f64) {
        let grad = model.grad();
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        // p ← p − lr/bc1 · m / (sqrt(v/bc2) + eps), with v = (1−β2)·v_s.
        let v_scale = ((1.0 - self.beta2) / bc2).sqrt();
        let step_size = lr / bc1;
        let flat = model.flat();
        let total = flat.numel() as i64;
        let decayed = if self.weight_decay > 0.0 { model.decayed_len() } else { 0 };
        // On CPU the update runs chunk by chunk so that its passes over p, g, m and v hit the
        // cache (one pass per op over the whole buffer streams it from memory eight times); on a
        // GPU one pass over the whole buffer is what keeps the kernel count low.
        let chunk = if flat.device().is_cuda() { total.max(1) } else { CPU_CHUNK };
        tch::no_grad(|| {
            for start in (0..total).step_by(chunk as usize) {
                let len = chunk.min(total - start);
                let mut p = flat.narrow(0, start, len);
                let g = grad.narrow(0, start, len);
                let mut m = self.m.narrow(0, start, len);
                let mut v = self.v.narrow(0, start, len);
                if decayed > start {
                    let _ = p.narrow(0, 0, len.min(decayed - start)).g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = m.lerp_(&g, 1.0 - self.beta1);
                let _ = v.g_mul_scalar_(self.beta2).addcmul_(&g, &g);
                // denom' = −(sqrt(v)·… + eps)/step_size so that p + m/denom' is the update.
                let denom = v.sqrt().g_mul_scalar_(v_scale).g_add_scalar_(self.eps).g_mul_scalar_(-1.0 / step_size);
                let _ = p.addcdiv_(&m, &denom);
            }
        });
    }
}

/// Scales the model's gradient in place so its L2 norm is at most `max_norm` (0: no clipping);
/// returns the norm before, as a device scalar so that the step does not wait for the device.
pub fn clip_grad_norm(model: &Model, max_norm: f64) -> Tensor {
    let mut grad = model.grad().shallow_clone();
    let total = grad.norm();
    if max_norm > 0.0 {
        let scale = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        // On the CPU the value is already there: skip the pass over the gradient when it would
        // multiply by exactly 1 (most steps). A GPU would have to wait for it, so it always scales.
        if grad.device().is_cuda() || scale.double_value(&[]) < 1.0 {
            let _ = grad.g_mul_(&scale);
        }
    }
    total
}

/// Exponential moving average of the weights, the ones sampled from and exported.
pub struct Ema {
    pub decay: f64,
    /// Laid out like [`Model::flat`].
    flat: Tensor,
    /// Every parameter by name: views into `flat`, and copies of untrainable ones.
    pub params: Vec<(String, Tensor)>,
}

impl Ema {
    pub fn new(model: &Model, decay: f64) -> Ema {
        let flat = model.flat().detach().copy();
        let mut views = model.flat_views(&flat).into_iter().peekable();
        let mut params = Vec::new();
        for (name, p) in model.params() {
            match views.peek() {
                Some((n, _)) if n == name => params.push(views.next().expect("peeked")),
                _ => params.push((name.clone(), p.detach().copy())),
            }
        }
        Ema { decay, flat, params }
    }

    /// Decay warms up as (1+n)/(10+n) so early weights do not dominate short runs.
    pub fn update(&mut self, model: &Model, step: u64) {
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        tch::no_grad(|| {
            let _ = self.flat.lerp_(model.flat(), 1.0 - d);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn clipping_scales_only_gradients_above_the_limit() {
        let mut model = Model::new(&ModelConfig::named("dit-tiny").unwrap(), tch::Device::Cpu).unwrap();
        model.zero_grad();
        let g = Tensor::full([model.flat().numel() as i64], 0.01, (tch::Kind::Float, tch::Device::Cpu));
        model.add_grad(&g);
        // libtorch's f32 norm of 1.9M equal terms is 0.1% off the exact 0.01·√n; compare with its own.
        let norm = g.norm().double_value(&[]);
        assert_eq!(clip_grad_norm(&model, 2.0 * norm).double_value(&[]), norm);
        assert!(model.grad().equal(&g), "a gradient under the limit changed");
        assert_eq!(clip_grad_norm(&model, 1.0).double_value(&[]), norm);
        let expected = &g * (1.0 / (norm + 1e-6));
        let diff = (model.grad() - expected).abs().max().double_value(&[]);
        assert!(diff < 1e-9, "clipped gradient off by {diff}");
    }
}
