//! diffusers `AutoencoderKL` (SD 1.x/2.x, SDXL, and SD3/Flux-style with `shift_factor`), frozen:
//! image `[B, 3, H, W]` in [-1, 1] ↔ scaled latent `[B, C, H/f, W/f]`. Names and structure follow
//! diffusers' `Encoder`/`Decoder` so its `diffusion_pytorch_model.safetensors` loads as is.

use std::path::Path;

use tch::Tensor;

use super::hf::{read_config, Config, HfWeights, Linear};
use super::EncodeError;

struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv {
    fn load(
        w: &HfWeights,
        prefix: &str,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        padding: i64,
    ) -> Result<Conv, EncodeError> {
        Ok(Conv {
            weight: w.get(&format!("{prefix}.weight"), &[cout, cin, k, k])?,
            bias: w.get(&format!("{prefix}.bias"), &[cout])?,
            stride,
            padding,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, Some(&self.bias), [self.stride], [self.padding], [1], 1)
    }
}

struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
}

impl GroupNorm {
    fn load(w: &HfWeights, prefix: &str, c: i64, groups: i64) -> Result<GroupNorm, EncodeError> {
        let (weight, bias) = w.norm(prefix, c)?;
        Ok(GroupNorm { weight, bias, groups })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), 1e-6, false)
    }
}

struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    fn load(w: &HfWeights, p: &str, cin: i64, cout: i64, groups: i64) -> Result<Resnet, EncodeError> {
        Ok(Resnet {
            norm1: GroupNorm::load(w, &format!("{p}.norm1"), cin, groups)?,
            conv1: Conv::load(w, &format!("{p}.conv1"), cin, cout, 3, 1, 1)?,
            norm2: GroupNorm::load(w, &format!("{p}.norm2"), cout, groups)?,
            conv2: Conv::load(w, &format!("{p}.conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout {
                Some(Conv::load(w, &format!("{p}.conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.shortcut {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

/// The mid-block's single-head spatial self-attention.
struct Attention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl Attention {
    fn load(w: &HfWeights, p: &str, c: i64, groups: i64) -> Result<Attention, EncodeError> {
        // diffusers ≥ 0.14 names (`to_q`, `to_out.0`); older checkpoints use `query` … `proj_attn`.
        let lin = |new: &str, old: &str| -> Result<Linear, EncodeError> {
            let names = |s: &str| [format!("{p}.{new}.{s}"), format!("{p}.{old}.{s}")];
            let weight = w.get_any(&names("weight"), &[c, c]).or_else(|_| {
                // Some old checkpoints store these as 1×1 convolutions.
                w.get_any(&names("weight"), &[c, c, 1, 1]).map(|t| t.view([c, c]))
            })?;
            Ok(Linear { weight, bias: w.get_any(&names("bias"), &[c])? })
        };
        Ok(Attention {
            norm: GroupNorm::load(w, &format!("{p}.group_norm"), c, groups)?,
            q: lin("to_q", "query")?,
            k: lin("to_k", "key")?,
            v: lin("to_v", "value")?,
            out: lin("to_out.0", "proj_attn")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("[B, C, H, W]");
        let t = self.norm.forward(x).view([b, c, h * w]).transpose(1, 2);
        let (q, k, v) = (self.q.forward(&t), self.k.forward(&t), self.v.forward(&t));
        let a = Tensor::scaled_dot_product_attention::<Tensor>(
            &q.unsqueeze(1),
            &k.unsqueeze(1),
            &v.unsqueeze(1),
            None,
            0.0,
            false,
            None,
            false,
        )
        .squeeze_dim(1);
        let o = self.out.forward(&a).transpose(1, 2).reshape([b, c, h, w]);
        x + o
    }
}

struct MidBlock {
    res0: Resnet,
    attn: Option<Attention>,
    res1: Resnet,
}

impl MidBlock {
    fn load(w: &HfWeights, p: &str, c: i64, groups: i64, attention: bool) -> Result<MidBlock, EncodeError> {
        Ok(MidBlock {
            res0: Resnet::load(w, &format!("{p}.resnets.0"), c, c, groups)?,
            attn: if attention { Some(Attention::load(w, &format!("{p}.attentions.0"), c, groups)?) } else { None },
            res1: Resnet::load(w, &format!("{p}.resnets.1"), c, c, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.res0.forward(x);
        let h = match &self.attn {
            Some(a) => a.forward(&h),
            None => h,
        };
        self.res1.forward(&h)
    }
}

struct Level {
    resnets: Vec<Resnet>,
    /// Downsampler (encoder) or upsampler (decoder) conv.
    sample: Option<Conv>,
}

/// A frozen diffusers AutoencoderKL.
pub struct Vae {
    pub latent_channels: i64,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    /// Spatial downsampling factor (2^(levels − 1)).
    pub factor: i64,
    pub name: String,
    enc_in: Conv,
    enc_levels: Vec<Level>,
    enc_mid: MidBlock,
    enc_norm: GroupNorm,
    enc_out: Conv,
    quant: Option<Conv>,
    post_quant: Option<Conv>,
    dec_in: Conv,
    dec_mid: MidBlock,
    dec_levels: Vec<Level>,
    dec_norm: GroupNorm,
    dec_out: Conv,
}

impl Vae {
    /// Loads `config.json` + `diffusion_pytorch_model.safetensors` from a diffusers folder (or its
    /// `vae/` subfolder).
    pub fn load(dir: &Path) -> Result<Vae, EncodeError> {
        let dir = if dir.join("vae/config.json").exists() { dir.join("vae") } else { dir.to_path_buf() };
        let (cfg_path, v) = read_config(&dir)?;
        let cfg = Config { file: cfg_path.display().to_string(), v: &v };
        let class = cfg.str_or("_class_name", "AutoencoderKL")?;
        if class != "AutoencoderKL" {
            return Err(cfg.bad("_class_name", "AutoencoderKL"));
        }
        let weights_path = ["diffusion_pytorch_model.safetensors", "model.safetensors"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .ok_or_else(|| EncodeError::Io {
                file: dir.join("diffusion_pytorch_model.safetensors").display().to_string(),
                reason: "not found".into(),
            })?;
        let w = HfWeights::load(&weights_path)?;
        let ch = cfg.ints("block_out_channels")?;
        let layers = cfg.int("layers_per_block")?;
        let groups = cfg.int_or("norm_num_groups", 32)?;
        let latent = cfg.int("latent_channels")?;
        let cin = cfg.int_or("in_channels", 3)?;
        let cout = cfg.int_or("out_channels", 3)?;
        let mid_attn = cfg.v.get("mid_block_add_attention").and_then(|x| x.as_bool()).unwrap_or(true);
        let use_quant = cfg.v.get("use_quant_conv").and_then(|x| x.as_bool()).unwrap_or(true);
        let use_post_quant = cfg.v.get("use_post_quant_conv").and_then(|x| x.as_bool()).unwrap_or(true);
        if ch.is_empty() {
            return Err(cfg.bad("block_out_channels", "a non-empty list"));
        }
        if let Some(&c) = ch.iter().find(|&&c| c % groups != 0) {
            return Err(cfg.bad("norm_num_groups", &format!("a divisor of every block width (not of {c})")));
        }
        let last = *ch.last().unwrap();
        let mut enc_levels = Vec::new();
        let mut prev = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            let resnets = (0..layers)
                .map(|j| Resnet::load(&w, &format!("{p}.resnets.{j}"), if j == 0 { prev } else { c }, c, groups))
                .collect::<Result<_, _>>()?;
            let sample = if i + 1 < ch.len() {
                Some(Conv::load(&w, &format!("{p}.downsamplers.0.conv"), c, c, 3, 2, 0)?)
            } else {
                None
            };
            enc_levels.push(Level { resnets, sample });
            prev = c;
        }
        let mut dec_levels = Vec::new();
        let mut prev = last;
        for (i, &c) in ch.iter().rev().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let resnets = (0..layers + 1)
                .map(|j| Resnet::load(&w, &format!("{p}.resnets.{j}"), if j == 0 { prev } else { c }, c, groups))
                .collect::<Result<_, _>>()?;
            let sample = if i + 1 < ch.len() {
                Some(Conv::load(&w, &format!("{p}.upsamplers.0.conv"), c, c, 3, 1, 1)?)
            } else {
                None
            };
            dec_levels.push(Level { resnets, sample });
            prev = c;
        }
        Ok(Vae {
            latent_channels: latent,
            scaling_factor: cfg.float_or("scaling_factor", 0.18215)?,
            shift_factor: cfg.float_or("shift_factor", 0.0)?,
            factor: 1 << (ch.len() - 1),
            name: format!("AutoencoderKL {} ({})", dir.display(), weights_path.file_name().unwrap().to_string_lossy()),
            enc_in: Conv::load(&w, "encoder.conv_in", cin, ch[0], 3, 1, 1)?,
            enc_levels,
            enc_mid: MidBlock::load(&w, "encoder.mid_block", last, groups, mid_attn)?,
            enc_norm: GroupNorm::load(&w, "encoder.conv_norm_out", last, groups)?,
            enc_out: Conv::load(&w, "encoder.conv_out", last, 2 * latent, 3, 1, 1)?,
            quant: if use_quant { Some(Conv::load(&w, "quant_conv", 2 * latent, 2 * latent, 1, 1, 0)?) } else { None },
            post_quant: if use_post_quant {
                Some(Conv::load(&w, "post_quant_conv", latent, latent, 1, 1, 0)?)
            } else {
                None
            },
            dec_in: Conv::load(&w, "decoder.conv_in", latent, last, 3, 1, 1)?,
            dec_mid: MidBlock::load(&w, "decoder.mid_block", last, groups, mid_attn)?,
            dec_levels,
            dec_norm: GroupNorm::load(&w, "decoder.conv_norm_out", ch[0], groups)?,
            dec_out: Conv::load(&w, "decoder.conv_out", ch[0], cout, 3, 1, 1)?,
        })
    }

    /// Posterior mean and log-variance of images in [-1, 1] (unscaled latent space).
    pub fn moments(&self, x: &Tensor) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let mut h = self.enc_in.forward(x);
            for level in &self.enc_levels {
                for r in &level.resnets {
                    h = r.forward(&h);
                }
                if let Some(down) = &level.sample {
                    // diffusers pads (0, 1, 0, 1) before its stride-2, padding-0 conv.
                    h = down.forward(&h.constant_pad_nd([0, 1, 0, 1]));
                }
            }
            h = self.enc_mid.forward(&h);
            h = self.enc_out.forward(&self.enc_norm.forward(&h).silu());
            if let Some(q) = &self.quant {
                h = q.forward(&h);
            }
            let parts = h.chunk(2, 1);
            (parts[0].shallow_clone(), parts[1].clamp(-30.0, 20.0))
        })
    }

    /// Scaled latents: the posterior mean, or a sample from it with noise `eps` (same shape).
    pub fn encode(&self, x: &Tensor, eps: Option<&Tensor>) -> Tensor {
        let (mean, logvar) = self.moments(x);
        let z = match eps {
            Some(e) => mean + (logvar * 0.5).exp() * e,
            None => mean,
        };
        (z - self.shift_factor) * self.scaling_factor
    }

    /// Images in about [-1, 1] from scaled latents.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let mut h = z / self.scaling_factor + self.shift_factor;
            if let Some(pq) = &self.post_quant {
                h = pq.forward(&h);
            }
            h = self.dec_mid.forward(&self.dec_in.forward(&h));
            for level in &self.dec_levels {
                for r in &level.resnets {
                    h = r.forward(&h);
                }
                if let Some(up) = &level.sample {
                    h = up.forward(&h.upsample_nearest2d([h.size()[2] * 2, h.size()[3] * 2], None, None));
                }
            }
            self.dec_out.forward(&self.dec_norm.forward(&h).silu())
        })
    }
}
