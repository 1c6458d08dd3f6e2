//! Text -> latents: Euler over σ with classifier-free guidance, and AT-1's own sampler for `tld`.
//! Deterministic for a seed: the initial noise is the only randomness.

use tch::{Device, Kind, Tensor};

use crate::model::{Model, TextCond};

/// Initial noise for `n` samples at the model's own (square) latent size, drawn on the CPU from
/// `seed` so every device gets the same.
pub fn initial_noise(model: &Model, n: i64, seed: u64) -> Tensor {
    let [_, s, _] = model.config.latent_shape();
    initial_noise_at(model, n, seed, (s, s))
}

/// Initial noise for `n` latents of `(height, width)`.
pub fn initial_noise_at(model: &Model, n: i64, seed: u64, (h, w): (i64, i64)) -> Tensor {
    let [c, _, _] = model.config.latent_shape();
    tch::manual_seed(seed as i64);
    Tensor::randn([n, c, h, w], (Kind::Float, Device::Cpu)).to_device(model.device)
}

/// Settings of the Euler sampler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Euler {
    pub steps: usize,
    /// Classifier-free guidance g: v = v_uncond + g·(v_cond − v_uncond).
    pub guidance: f64,
    /// SD3's time shift s of the σ grid (1: uniform); s > 1 spends more steps at high noise, where
    /// the layout of the image is decided.
    pub shift: f64,
}

/// The defaults of `skytrain sample`, `fidelity` and `demo`. The uniform grid: SD3's shift 3 did
/// not change the demo models' prompt fidelity beyond its noise (BENCHMARKS.md, "Demo").
pub const DEFAULT_EULER: Euler = Euler { steps: 30, guidance: 3.0, shift: 1.0 };

impl Euler {
    /// For model cards and logs: "Euler, 30 steps, guidance 3, shift 1".
    pub fn describe(&self) -> String {
        format!("Euler, {} steps, guidance {}, shift {}", self.steps, self.guidance, self.shift)
    }

    /// The i-th of `steps + 1` noise levels, from 1 down to 0: t = 1 − i/steps, σ = s·t / (1 + (s−1)·t).
    pub fn sigma(&self, i: usize) -> f64 {
        let t = 1.0 - i as f64 / self.steps as f64;
        self.shift * t / (1.0 + (self.shift - 1.0) * t)
    }
}

/// Euler integration of dx/dσ = v from σ = 1 to 0 over the levels of `sampler`, with guidance.
pub fn euler(model: &Model, text: &TextCond, null: &TextCond, sampler: Euler, seed: u64) -> Tensor {
    let [_, s, _] = model.config.latent_shape();
    euler_at(model, text, null, sampler, seed, (s, s))
}

/// [`euler`] for latents of `(height, width)` (a `dit` model takes any multiple of its patch).
pub fn euler_at(model: &Model, text: &TextCond, null: &TextCond, sampler: Euler, seed: u64, hw: (i64, i64)) -> Tensor {
    let n = text.pooled.size()[0];
    let mut x = initial_noise_at(model, n, seed, hw);
    let null = TextCond { tokens: null.tokens.expand_as(&text.tokens), pooled: null.pooled.expand_as(&text.pooled) };
    let both = TextCond::cat(text, &null);
    tch::no_grad(|| {
        for i in 0..sampler.steps {
            let (s0, s1) = (sampler.sigma(i), sampler.sigma(i + 1));
            let sigma = Tensor::full([2 * n], s0, (Kind::Float, model.device));
            let v = model.velocity(&Tensor::cat(&[&x, &x], 0), &sigma, &both);
            let vc = v.narrow(0, 0, n);
            let vu = v.narrow(0, n, n);
            let v = &vu + (vc - &vu) * sampler.guidance;
            x = &x + v * (s1 - s0);
        }
    });
    x
}

/// AT-1's sampler (at1-model.md): levels σ_i = 1 − i/n; at each (σ, σ') the guided x0 estimate
/// `x0̂ = g·D(x,σ,c) + (1−g)·D(x,σ,∅)` and `x ← ((σ−σ')·x0̂ + σ'·x)/σ`; returns the last x0̂.
pub fn at1(model: &Model, text: &TextCond, null: &TextCond, n_iter: usize, guidance: f64, seed: u64) -> Tensor {
    let n = text.pooled.size()[0];
    let mut x = initial_noise(model, n, seed);
    let null = TextCond { tokens: null.tokens.expand_as(&text.tokens), pooled: null.pooled.expand_as(&text.pooled) };
    let both = TextCond::cat(text, &null);
    let levels: Vec<f64> = (0..n_iter).map(|i| 1.0 - i as f64 / n_iter as f64).collect();
    let mut x0 = x.shallow_clone();
    tch::no_grad(|| {
        for w in levels.windows(2) {
            let (s, s_next) = (w[0], w[1]);
            let sigma = Tensor::full([2 * n], s, (Kind::Float, model.device));
            let d = model.forward(&Tensor::cat(&[&x, &x], 0), &sigma, &both);
            x0 = d.narrow(0, 0, n) * guidance + d.narrow(0, n, n) * (1.0 - guidance);
            x = (&x0 * (s - s_next) + &x * s_next) / s;
        }
    });
    x0
}

/// Prompts → images `[B, 3, H, W]` in [0, 1]: the prompts and the empty caption through the
/// data's text encoder, the model's sampler (`at1` for `tld`, Euler otherwise), then the decoder.
/// `latent_hw` samples a `dit` model at another latent size (`tld` is fixed-size: callers refuse
/// it, see [`latent_size_for`]).
pub fn prompts_to_images(
    model: &Model,
    encoders: &crate::data::encode::frozen::FrozenEncoders,
    prompts: &[String],
    sampler: Euler,
    seed: u64,
    latent_hw: Option<(i64, i64)>,
) -> Result<Tensor, crate::data::encode::EncodeError> {
    let text = encoders.text(prompts)?.to_device(model.device);
    let null = encoders.text(&[String::new()])?.to_device(model.device);
    let [_, s, _] = model.config.latent_shape();
    let latents = match model.config {
        crate::config::ModelConfig::Tld(_) => at1(model, &text, &null, sampler.steps, sampler.guidance, seed),
        crate::config::ModelConfig::Dit(_) => euler_at(model, &text, &null, sampler, seed, latent_hw.unwrap_or((s, s))),
    };
    Ok(encoders.decode(&latents))
}

/// The latent `(height, width)` for an image of `width` × `height` pixels: the decoder's scale
/// (measured by decoding the model's own latent size once) and the model's patch must divide them.
/// Err says why, with the nearest sizes that work.
pub fn latent_size_for(
    model: &Model,
    encoders: &crate::data::encode::frozen::FrozenEncoders,
    width: i64,
    height: i64,
) -> Result<(i64, i64), String> {
    let [c, s, _] = model.config.latent_shape();
    let (patch, fixed) = match &model.config {
        crate::config::ModelConfig::Dit(d) => (d.patch_size, false),
        crate::config::ModelConfig::Tld(_) => (1, true),
    };
    let probe = tch::no_grad(|| encoders.decode(&Tensor::zeros([1, c, s, s], (Kind::Float, model.device))));
    let scale = probe.size()[2] / s;
    let step = scale * patch;
    if fixed && (width, height) != (s * scale, s * scale) {
        return Err(format!(
            "this model (tld, AT-1's architecture) is fixed-size: it samples {0}×{0} px only",
            s * scale
        ));
    }
    for (name, v) in [("width", width), ("height", height)] {
        if v <= 0 || v % step != 0 {
            let lower = (v / step).max(1) * step;
            return Err(format!("--{name} {v}: must be a multiple of {step} px (decoder scale {scale} × patch {patch}), e.g. {lower} or {}", lower + step));
        }
    }
    Ok((height / scale, width / scale))
}

/// Tiles `[B, 3, H, W]` images in [0, 1] into one RGB8 grid with `cols` columns and a 2 px gap.
pub fn grid_png(images: &Tensor, cols: i64) -> Result<Vec<u8>, image::ImageError> {
    let (b, _, h, w) = images.size4().expect("[B, 3, H, W] images");
    let cols = cols.clamp(1, b.max(1));
    let rows = (b + cols - 1) / cols;
    let gap = 2;
    let (gw, gh) = (cols * (w + gap) + gap, rows * (h + gap) + gap);
    let pixels = (images.clamp(0.0, 1.0) * 255.0).round().to_kind(Kind::Uint8).permute([0, 2, 3, 1]).contiguous();
    let n = pixels.numel();
    let mut data = vec![0u8; n];
    pixels.to_device(Device::Cpu).copy_data(&mut data, n);
    let mut img = image::RgbImage::from_pixel(gw as u32, gh as u32, image::Rgb([255, 255, 255]));
    for i in 0..b {
        let (ox, oy) = (gap + (i % cols) * (w + gap), gap + (i / cols) * (h + gap));
        for y in 0..h {
            for x in 0..w {
                let o = (((i * h + y) * w + x) * 3) as usize;
                img.put_pixel((ox + x) as u32, (oy + y) as u32, image::Rgb([data[o], data[o + 1], data[o + 2]]));
            }
        }
    }
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifted_grid_runs_from_one_to_zero_and_leans_to_high_noise() {
        let uniform = Euler { steps: 4, guidance: 1.0, shift: 1.0 };
        assert_eq!((0..=4).map(|i| uniform.sigma(i)).collect::<Vec<_>>(), [1.0, 0.75, 0.5, 0.25, 0.0]);
        let shifted = Euler { shift: 3.0, ..uniform };
        assert_eq!((shifted.sigma(0), shifted.sigma(2), shifted.sigma(4)), (1.0, 0.75, 0.0));
        assert!((0..4).all(|i| shifted.sigma(i + 1) < shifted.sigma(i)));
    }
}
