//! DiT (Peebles & Xie 2023) with adaLN-Zero noise-level modulation and cross-attention to text
//! tokens (as in PixArt-α), predicting velocity or x0 on latents.
//!
//! Init, as in the DiT reference: xavier-uniform linear layers with zero biases; patch embedding
//! xavier over its flattened kernel; noise-level MLP N(0, 0.02); every adaLN modulation layer and
//! the output layer zero, so each block starts as the identity; fixed 2-D sin-cos positions.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::layers::{attention, float, merge_heads, split_heads, xavier, Compute, LayerNorm, Linear};
use super::TextCond;
use crate::config::{Activation, DitConfig};

/// Multi-head self-attention (`attn.qkv`, `attn.proj`), shared by the DiT and text-refiner blocks.
#[derive(Debug)]
struct SelfAttention {
    qkv: Linear,
    proj: Linear,
    heads: i64,
}

impl SelfAttention {
    fn new(b: &nn::Path, d: i64, heads: i64) -> SelfAttention {
        SelfAttention {
            qkv: Linear::new(b / "attn" / "qkv", d, 3 * d, xavier(d, 3 * d), true),
            proj: Linear::new(b / "attn" / "proj", d, d, xavier(d, d), true),
            heads,
        }
    }

    /// `x` [B, N, D] (already normed) -> [B, N, D] in f32.
    fn forward(&self, x: &Tensor, cx: Compute) -> Tensor {
        let qkv = self.qkv.forward(x, cx).chunk(3, 2);
        let a = attention(
            &split_heads(&qkv[0], self.heads),
            &split_heads(&qkv[1], self.heads),
            &split_heads(&qkv[2], self.heads),
        );
        float(&self.proj.forward(&merge_heads(&a), cx))
    }
}

/// Two-layer GELU MLP (`mlp.fc1`, `mlp.fc2`).
#[derive(Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    /// `gelu`'s `approximate` argument ("tanh" as in DiT, or "none").
    approximate: &'static str,
}

impl Mlp {
    fn new(b: &nn::Path, d: i64, hidden: i64, activation: Activation) -> Mlp {
        Mlp {
            fc1: Linear::new(b / "mlp" / "fc1", d, hidden, xavier(d, hidden), true),
            fc2: Linear::new(b / "mlp" / "fc2", hidden, d, xavier(hidden, d), true),
            approximate: activation.gelu_approximation(),
        }
    }

    /// `x` [B, N, D] -> [B, N, D] in f32.
    fn forward(&self, x: &Tensor, cx: Compute) -> Tensor {
        float(&self.fc2.forward(&self.fc1.forward(x, cx).gelu(self.approximate), cx))
    }
}

/// A DiT block: adaLN-Zero-modulated self-attention and MLP, with cross-attention to the text between.
#[derive(Debug)]
struct Block {
    norm1: LayerNorm,
    attn: SelfAttention,
    norm2: LayerNorm,
    cross_q: Linear,
    cross_kv: Linear,
    cross_proj: Linear,
    norm3: LayerNorm,
    mlp: Mlp,
    modulation: Linear,
    heads: i64,
}

impl Block {
    fn new(b: nn::Path, d: i64, hidden_mlp: i64, heads: i64, activation: Activation) -> Block {
        Block {
            norm1: LayerNorm::new(&b / "norm1", d, 1e-6, false),
            attn: SelfAttention::new(&b, d, heads),
            norm2: LayerNorm::new(&b / "norm2", d, 1e-6, true),
            cross_q: Linear::new(&b / "cross_attn" / "q", d, d, xavier(d, d), true),
            cross_kv: Linear::new(&b / "cross_attn" / "kv", d, 2 * d, xavier(d, 2 * d), true),
            cross_proj: Linear::new(&b / "cross_attn" / "proj", d, d, xavier(d, d), true),
            norm3: LayerNorm::new(&b / "norm3", d, 1e-6, false),
            mlp: Mlp::new(&b, d, hidden_mlp, activation),
            modulation: Linear::new(&b / "adaln", d, 6 * d, Init::Const(0.0), true),
            heads,
        }
    }

    /// `h` [B, N, D] f32 tokens, `cond` [B, D] conditioning vector, `ctx` [B, L, D] text tokens.
    fn forward(&self, h: &Tensor, cond: &Tensor, ctx: &Tensor, cx: Compute) -> Tensor {
        let m = self.modulation.forward(cond, cx).to_kind(Kind::Float).chunk(6, 1);
        let (shift1, scale1, gate1, shift3, scale3, gate3) = (&m[0], &m[1], &m[2], &m[3], &m[4], &m[5]);
        let a = self.attn.forward(&modulate(&self.norm1.forward(h), shift1, scale1), cx);
        let h = h + gate1.unsqueeze(1) * a;
        // Cross-attention to the text tokens.
        let q = self.cross_q.forward(&self.norm2.forward(&h), cx);
        let kv = self.cross_kv.forward(ctx, cx).chunk(2, 2);
        let a =
            attention(&split_heads(&q, self.heads), &split_heads(&kv[0], self.heads), &split_heads(&kv[1], self.heads));
        let h = h + float(&self.cross_proj.forward(&merge_heads(&a), cx));
        let y = self.mlp.forward(&modulate(&self.norm3.forward(&h), shift3, scale3), cx);
        h + gate3.unsqueeze(1) * y
    }
}

/// A pre-norm transformer block over the text tokens (self-attention and MLP, no conditioning).
#[derive(Debug)]
struct TextBlock {
    norm1: LayerNorm,
    attn: SelfAttention,
    norm2: LayerNorm,
    mlp: Mlp,
}

impl TextBlock {
    fn new(b: nn::Path, d: i64, hidden_mlp: i64, heads: i64, activation: Activation) -> TextBlock {
        TextBlock {
            norm1: LayerNorm::new(&b / "norm1", d, 1e-6, true),
            attn: SelfAttention::new(&b, d, heads),
            norm2: LayerNorm::new(&b / "norm2", d, 1e-6, true),
            mlp: Mlp::new(&b, d, hidden_mlp, activation),
        }
    }

    fn forward(&self, x: &Tensor, cx: Compute) -> Tensor {
        let x = x + self.attn.forward(&self.norm1.forward(x), cx);
        &x + self.mlp.forward(&self.norm2.forward(&x), cx)
    }
}

#[derive(Debug)]
pub struct Dit {
    cfg: DitConfig,
    patch_weight: Tensor,
    patch_bias: Tensor,
    pos_embed: Tensor,
    t_fc1: Linear,
    t_fc2: Linear,
    text_proj: Linear,
    text_refiner: Vec<TextBlock>,
    pooled_proj: Linear,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    final_modulation: Linear,
    final_linear: Linear,
}

fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// Sinusoidal features of `t` [B] (`dim` even): `[cos(t·f), sin(t·f)]`, f geometric from 1 to 1/10⁴.
pub fn timestep_features(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let freqs = (Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln()) / half as f64)).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    Tensor::cat(&[args.cos(), args.sin()], 1)
}

/// Fixed 2-D sin-cos position table `[gh·gw, dim]` for a grid of `gh` rows and `gw` columns, tokens
/// row-major (DiT/MAE layout: the column coordinate's features first, then the row's). A square grid
/// gives DiT's table; any other grid (aspect-ratio buckets) the same features at its coordinates.
fn sincos_2d(dim: i64, gh: i64, gw: i64) -> Tensor {
    let axis = |coords: &Tensor| {
        let quarter = dim / 4;
        let omega =
            (Tensor::arange(quarter, (Kind::Double, tch::Device::Cpu)) / quarter as f64 * -(10000f64.ln())).exp();
        let out = coords.to_kind(Kind::Double).unsqueeze(1) * omega.unsqueeze(0);
        Tensor::cat(&[out.sin(), out.cos()], 1)
    };
    let idx = Tensor::arange(gh * gw, (Kind::Int64, tch::Device::Cpu));
    let rows = idx.divide_scalar_mode(gw, "floor");
    let cols = idx.remainder(gw);
    // MAE's get_2d_sincos_pos_embed puts the w coordinate first.
    Tensor::cat(&[axis(&cols), axis(&rows)], 1).to_kind(Kind::Float)
}

impl Dit {
    pub fn new(p: &nn::Path, cfg: &DitConfig) -> Dit {
        let d = cfg.hidden;
        let c = cfg.latent_channels;
        let ps = cfg.patch_size;
        let zero = Init::Const(0.0);
        let patch_in = c * ps * ps;
        let patch_weight = (p / "x_embed").var("weight", &[d, c, ps, ps], xavier(patch_in, d));
        let patch_bias = (p / "x_embed").var("bias", &[d], zero);
        let grid = cfg.latent_size / ps;
        let pos_embed = sincos_2d(d, grid, grid).to_device(p.device());
        let std = Init::Randn { mean: 0.0, stdev: 0.02 };
        let t_fc1 = Linear::new(p / "t_embed" / "fc1", cfg.freq_dim, d, std, true);
        let t_fc2 = Linear::new(p / "t_embed" / "fc2", d, d, std, true);
        let text_proj = Linear::new(p / "text_proj", cfg.text_dim, d, xavier(cfg.text_dim, d), true);
        let pooled_proj = Linear::new(p / "pooled_proj", cfg.text_dim, d, xavier(cfg.text_dim, d), true);
        let hidden_mlp = (d as f64 * cfg.mlp_ratio) as i64;
        let act = cfg.mlp_activation;
        let text_refiner = (0..cfg.text_refiner)
            .map(|i| TextBlock::new(p / "text_refiner" / i, d, hidden_mlp, cfg.heads, act))
            .collect();
        let blocks = (0..cfg.depth).map(|i| Block::new(p / "blocks" / i, d, hidden_mlp, cfg.heads, act)).collect();
        let f = p / "final";
        Dit {
            cfg: cfg.clone(),
            patch_weight,
            patch_bias,
            pos_embed,
            t_fc1,
            t_fc2,
            text_proj,
            text_refiner,
            pooled_proj,
            blocks,
            final_norm: LayerNorm::new(&f / "norm", d, 1e-6, false),
            final_modulation: Linear::new(&f / "adaln", d, 2 * d, zero, true),
            final_linear: Linear::new(&f / "linear", d, ps * ps * c, zero, true),
        }
    }

    /// `x` [B, C, H, W] at noise level `sigma` [B] -> prediction [B, C, H, W]. Any H and W that are
    /// multiples of the patch size: the position table is the config's square one, or made for the
    /// input's grid.
    pub fn forward(&self, x: &Tensor, sigma: &Tensor, text: &TextCond, cx: Compute) -> Tensor {
        let (b, c, sh, sw) = x.size4().expect("[B, C, H, W] latents");
        let ps = self.cfg.patch_size;
        let (gh, gw) = (sh / ps, sw / ps);
        let square = self.cfg.latent_size / ps;
        let pos_embed = if (gh, gw) == (square, square) {
            self.pos_embed.shallow_clone()
        } else {
            sincos_2d(self.cfg.hidden, gh, gw).to_device(x.device())
        };
        // Patchify: conv with stride p, tokens in row-major (h, w) order.
        let mut h = x
            .to_kind(cx.kind)
            .conv2d(&cx.param(&self.patch_weight), Some(&cx.param(&self.patch_bias)), [ps, ps], [0, 0], [1, 1], 1)
            .flatten(2, 3)
            .transpose(1, 2)
            .to_kind(Kind::Float)
            + pos_embed.unsqueeze(0);
        // Conditioning vector: noise level (as t = 1000σ) plus pooled text.
        let t = timestep_features(&(sigma * 1000.0), self.cfg.freq_dim);
        let temb = self.t_fc2.forward(&self.t_fc1.forward(&t, cx).silu(), cx);
        let cond = (temb + self.pooled_proj.forward(&text.pooled, cx)).to_kind(Kind::Float).silu();
        let mut ctx = self.text_proj.forward(&text.tokens, cx);
        if !self.text_refiner.is_empty() {
            ctx = ctx.to_kind(Kind::Float);
            for blk in &self.text_refiner {
                ctx = blk.forward(&ctx, cx);
            }
        }
        for blk in &self.blocks {
            h = blk.forward(&h, &cond, &ctx, cx);
        }
        let m = self.final_modulation.forward(&cond, cx).to_kind(Kind::Float).chunk(2, 1);
        let h = modulate(&self.final_norm.forward(&h), &m[0], &m[1]);
        let out = self.final_linear.forward(&h, cx).to_kind(Kind::Float); // [B, N, p·p·C]
                                                                          // Un-patchify: features ordered (p1, p2, c) as in DiT.
        out.view([b, gh, gw, ps, ps, c]).permute([0, 5, 1, 3, 2, 4]).reshape([b, c, sh, sw])
    }
}
