//! Rectified flow (Liu et al. 2022; SD3): `x_t = (1−σ)·x0 + σ·ε`, the network predicting the
//! velocity `ε − x0` (default) or `x0` (AT-1).

use tch::{Kind, Tensor};

use crate::config::{Prediction, SigmaDist};
use crate::model::{Model, TextCond};

/// Draws σ ∈ (0, 1) for `n` samples from the global torch generator.
pub fn sample_sigma(dist: SigmaDist, n: i64, device: tch::Device) -> Tensor {
    let opts = (Kind::Float, device);
    match dist {
        SigmaDist::LogitNormal { mean, std } => (Tensor::randn([n], opts) * std + mean).sigmoid(),
        SigmaDist::Beta { a, b } => {
            // Beta(a, b) = X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b).
            let x = Tensor::full([n], a, opts).internal_standard_gamma();
            let y = Tensor::full([n], b, opts).internal_standard_gamma();
            (&x / (&x + &y)).clamp(1e-5, 1.0 - 1e-5)
        }
    }
}

/// `x_t` for clean latents `x0`, noise `eps` and per-sample `sigma` [B].
pub fn noised(x0: &Tensor, eps: &Tensor, sigma: &Tensor) -> Tensor {
    let s = sigma.view([-1, 1, 1, 1]);
    x0 * (1.0 - &s) + eps * s
}

/// The squared error of each element of one batch's prediction [B, C, H, W]: its mean is the
/// training loss, its per-sample means what update scoring compares. `drop` [B] bool marks
/// samples trained with the empty caption.
pub fn squared_error(
    model: &Model,
    x0: &Tensor,
    text: &TextCond,
    null_text: &TextCond,
    drop: &Tensor,
    sigma: &Tensor,
    eps: &Tensor,
) -> Tensor {
    let text = text.where_mask(drop, null_text);
    let x_t = noised(x0, eps, sigma);
    let pred = model.forward(&x_t, sigma, &text);
    let target = match model.prediction() {
        Prediction::Velocity => eps - x0,
        Prediction::X0 => x0.shallow_clone(),
    };
    (pred - target).square()
}
