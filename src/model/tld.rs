//! The AT-1 denoiser ("transformer_latent_diffusion", January 2024 layout), tensor for tensor as
//! ../shared/reference/at1-model.md specifies, so AT-1's published weights load and run.
//!
//! Init: PyTorch's module defaults (linear and conv U(±1/√fan_in), LayerNorm 1/0, positional
//! embedding N(0, 1)), as upstream.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::layers::{attention, float, Compute, LayerNorm, Linear};
use super::TextCond;
use crate::config::TldConfig;

/// Names of buffers AT-1 state dicts carry; their values follow from the config.
pub const BUFFERS: &[&str] = &["fourier_feats.0.angular_speeds", "denoiser_trans_block.precomputed_pos_enc"];

#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    padding: i64,
    stride: i64,
}

impl Conv {
    fn new(p: nn::Path, c_in: i64, c_out: i64, k: i64, groups: i64, stride: i64, padding: i64) -> Conv {
        let fan_in = c_in / groups * k * k;
        let b = 1.0 / (fan_in as f64).sqrt();
        let weight = p.var("weight", &[c_out, c_in / groups, k, k], Init::Uniform { lo: -b, up: b });
        let bias = p.var("bias", &[c_out], Init::Uniform { lo: -b, up: b });
        Conv { weight, bias, groups, padding, stride }
    }

    fn forward(&self, x: &Tensor, cx: Compute) -> Tensor {
        let (s, p) = ([self.stride, self.stride], [self.padding, self.padding]);
        if cx.is_float() && x.kind() == Kind::Float {
            return x.conv2d(&self.weight, Some(&self.bias), s, p, [1, 1], self.groups);
        }
        x.to_kind(cx.kind).conv2d(&cx.param(&self.weight), Some(&cx.param(&self.bias)), s, p, [1, 1], self.groups)
    }
}

#[derive(Debug)]
struct Block {
    qkv: Linear,
    cross_q: Linear,
    cross_kv: Linear,
    mlp_in: Conv,
    mlp_dw: Conv,
    mlp_out: Conv,
    norm1: LayerNorm,
    norm2: LayerNorm,
    norm3: LayerNorm,
}

#[derive(Debug)]
pub struct Tld {
    cfg: TldConfig,
    angular_speeds: Tensor,
    fourier1: Linear,
    fourier3: Linear,
    label_proj: Linear,
    cond_norm: LayerNorm,
    patch_conv: Conv,
    patch_norm1: LayerNorm,
    patch_linear: Linear,
    patch_norm2: LayerNorm,
    pos_embed: Tensor,
    out_proj: Linear,
    blocks: Vec<Block>,
}

/// `'(d h)'` head packing: feature j belongs to head j mod h, position j div h.
fn heads_dh(x: &Tensor, heads: i64) -> Tensor {
    let (b, n, d) = x.size3().expect("[B, N, D]");
    x.view([b, n, d / heads, heads]).permute([0, 3, 1, 2])
}

fn merge_dh(x: &Tensor) -> Tensor {
    let (b, h, n, dh) = x.size4().expect("[B, H, N, dh]");
    x.permute([0, 2, 3, 1]).contiguous().view([b, n, dh * h])
}

impl Tld {
    pub fn new(p: &nn::Path, cfg: &TldConfig) -> Tld {
        let d = cfg.embed_dim;
        let f = cfg.noise_embed_dims;
        let pp = cfg.latent_channels * cfg.patch_size * cfg.patch_size;
        let n = (cfg.latent_size / cfg.patch_size).pow(2);
        // f = exp(linspace(ln 1, ln 1000, F/2)), w = 2π f.
        let angular_speeds = (Tensor::linspace(0.0, 1000f64.ln(), f / 2, (Kind::Float, p.device())).exp()
            * (2.0 * std::f64::consts::PI))
            .detach();
        let t = p / "denoiser_trans_block";
        let pe = &t / "patchify_and_embed";
        let blocks = (0..cfg.n_layers)
            .map(|i| {
                let b = &t / "decoder_blocks" / i;
                let md = cfg.mlp_multiplier * d;
                Block {
                    qkv: Linear::torch_default(&b / "self_attention" / "qkv_linear", d, 3 * d, false),
                    cross_q: Linear::torch_default(&b / "cross_attention" / "q_linear", d, d, false),
                    cross_kv: Linear::torch_default(&b / "cross_attention" / "kv_linear", d, 2 * d, false),
                    mlp_in: Conv::new(&b / "mlp" / "mlp" / 0, d, md, 1, 1, 1, 0),
                    mlp_dw: Conv::new(&b / "mlp" / "mlp" / 1, md, md, 3, md, 1, 1),
                    mlp_out: Conv::new(&b / "mlp" / "mlp" / 3, md, d, 1, 1, 1, 0),
                    norm1: LayerNorm::new(&b / "norm1", d, 1e-5, true),
                    norm2: LayerNorm::new(&b / "norm2", d, 1e-5, true),
                    norm3: LayerNorm::new(&b / "norm3", d, 1e-5, true),
                }
            })
            .collect();
        Tld {
            cfg: cfg.clone(),
            angular_speeds,
            fourier1: Linear::torch_default(p / "fourier_feats" / 1, f, d, true),
            fourier3: Linear::torch_default(p / "fourier_feats" / 3, d, d, true),
            label_proj: Linear::torch_default(p / "label_proj", cfg.text_emb_size, d, true),
            cond_norm: LayerNorm::new(p / "norm", d, 1e-5, true),
            patch_conv: Conv::new(&pe / 0, cfg.latent_channels, pp, cfg.patch_size, 1, cfg.patch_size, 0),
            patch_norm1: LayerNorm::new(&pe / 2, pp, 1e-5, true),
            patch_linear: Linear::torch_default(&pe / 3, pp, d, true),
            patch_norm2: LayerNorm::new(&pe / 4, d, 1e-5, true),
            pos_embed: (&t / "pos_embed").var("weight", &[n, d], Init::Randn { mean: 0.0, stdev: 1.0 }),
            out_proj: Linear::torch_default(&t / "out_proj" / 0, d, pp, true),
            blocks,
        }
    }

    /// AT-1's `denoise(x, noise_level, label)`: `x` [B, C, S, S], `sigma` [B], label = pooled text.
    pub fn forward(&self, x: &Tensor, sigma: &Tensor, text: &TextCond, cx: Compute) -> Tensor {
        let (b, c, s, _) = x.size4().expect("[B, C, S, S] latents");
        let d = self.cfg.embed_dim;
        let ps = self.cfg.patch_size;
        let grid = s / ps;
        // Conditioning tokens: noise level and text.
        let wsig = float(sigma).view([b, 1]) * self.angular_speeds.unsqueeze(0);
        let e = Tensor::cat(&[wsig.sin(), wsig.cos()], 1);
        let noise_tok = self.fourier3.forward(&self.fourier1.forward(&e, cx).gelu("none"), cx);
        let text_tok = self.label_proj.forward(&text.pooled, cx);
        let y = self.cond_norm.forward(&Tensor::stack(&[float(&noise_tok), float(&text_tok)], 1));
        // Patchify and embed.
        let h = self.patch_conv.forward(x, cx).flatten(2, 3).transpose(1, 2);
        let h = self.patch_norm1.forward(&h);
        let h = self.patch_norm2.forward(&self.patch_linear.forward(&h, cx));
        let mut h = h + self.pos_embed.unsqueeze(0);
        let self_heads = d / 64;
        for blk in &self.blocks {
            let qkv = blk.qkv.forward(&h, cx).chunk(3, 2);
            let a = attention(
                &heads_dh(&qkv[0], self_heads),
                &heads_dh(&qkv[1], self_heads),
                &heads_dh(&qkv[2], self_heads),
            );
            h = blk.norm1.forward(&(float(&merge_dh(&a)) + &h));
            let q = blk.cross_q.forward(&h, cx);
            let kv = blk.cross_kv.forward(&y, cx).chunk(2, 2);
            let a = attention(&heads_dh(&q, 4), &heads_dh(&kv[0], 4), &heads_dh(&kv[1], 4));
            h = blk.norm2.forward(&(float(&merge_dh(&a)) + &h));
            let img = h.transpose(1, 2).reshape([b, d, grid, grid]);
            let m = blk.mlp_out.forward(&blk.mlp_dw.forward(&blk.mlp_in.forward(&img, cx), cx).gelu("none"), cx);
            let m = float(&m.flatten(2, 3).transpose(1, 2));
            h = blk.norm3.forward(&(m + &h));
        }
        let out = float(&self.out_proj.forward(&h, cx)); // [B, N, (c p1 p2)]
        out.view([b, grid, grid, c, ps, ps]).permute([0, 3, 1, 4, 2, 5]).reshape([b, c, s, s])
    }
}
