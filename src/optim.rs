//! AdamW, its learning-rate schedule, gradient clipping and the EMA of weights.
//!
//! Written here rather than taken from `tch::nn::Optimizer` because that one keeps its moments
//! inside libtorch where they cannot be checkpointed, and exact resume needs them.

use tch::Tensor;

use crate::config::TrainConfig;

/// Linear warm-up to `lr`, then cosine decay to `min_lr` at `total` steps.
pub fn lr_at(cfg: &TrainConfig, step: u64, total: u64) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let progress = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
    cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// AdamW (Loshchilov & Hutter) with decoupled weight decay on matrices only (not biases/norms).
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
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: &[(String, Tensor)], cfg: &TrainConfig) -> AdamW {
        let zeros = || params.iter().map(|(_, p)| p.zeros_like().detach()).collect::<Vec<_>>();
        AdamW {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            t: 0,
            m: zeros(),
            v: zeros(),
        }
    }

    /// One update of every parameter from its `.grad()`; grads are left for the caller to zero.
    pub fn step(&mut self, params: &[(String, Tensor)], lr: f64) {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        // p ← p − lr/bc1 · m / (sqrt(v/bc2) + eps), with v = (1−β2)·v_s.
        let v_scale = ((1.0 - self.beta2) / bc2).sqrt();
        let step_size = lr / bc1;
        tch::no_grad(|| {
            for (i, (_, p)) in params.iter().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                if self.weight_decay > 0.0 && p.dim() >= 2 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = self.m[i].lerp_(&g, 1.0 - self.beta1);
                let _ = self.v[i].g_mul_scalar_(self.beta2).addcmul_(&g, &g);
                // denom' = −(sqrt(v)·… + eps)/step_size so that p + m/denom' is the update.
                let denom =
                    self.v[i].sqrt().g_mul_scalar_(v_scale).g_add_scalar_(self.eps).g_mul_scalar_(-1.0 / step_size);
                let _ = p.addcdiv_(&self.m[i], &denom);
            }
        });
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> f64 {
    let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
    if grads.is_empty() {
        return 0.0;
    }
    let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
    let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
    if max_norm > 0.0 && total > max_norm {
        let scale = max_norm / (total + 1e-6);
        tch::no_grad(|| {
            for mut g in grads {
                let _ = g.g_mul_scalar_(scale);
            }
        });
    }
    total
}

/// Exponential moving average of the weights, the ones sampled from and exported.
pub struct Ema {
    pub decay: f64,
    pub params: Vec<(String, Tensor)>,
}

impl Ema {
    pub fn new(params: &[(String, Tensor)], decay: f64) -> Ema {
        Ema { decay, params: params.iter().map(|(n, p)| (n.clone(), p.detach().copy())).collect() }
    }

    /// Decay warms up as (1+n)/(10+n) so early weights do not dominate short runs.
    pub fn update(&mut self, params: &[(String, Tensor)], step: u64) {
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        tch::no_grad(|| {
            for ((_, e), (_, p)) in self.params.iter_mut().zip(params) {
                let _ = e.lerp_(p, 1.0 - d);
            }
        });
    }
}
