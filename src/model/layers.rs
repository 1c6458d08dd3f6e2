//! Small building blocks shared by the model families, with optional bf16 compute.
//!
//! Mixed precision is explicit rather than through `tch::autocast`: tch's autocast cannot pick
//! bf16 (it exposes no dtype setter, and CUDA's default autocast dtype is f16). Parameters stay f32
//! (the optimizer's master copy); matmuls and attention run in the [`Compute`] kind, on copies of
//! the weights the model converts once per forward; the residual stream and normalisations stay f32.

use std::collections::HashMap;

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// The kind matmuls run in, and the parameters already converted to it.
#[derive(Clone, Copy)]
pub struct Compute<'a> {
    pub kind: Kind,
    /// Copies in `kind` of f32 parameters, by the f32 parameter's data address (see
    /// `Model::set_compute`).
    copies: Option<&'a HashMap<usize, Tensor>>,
}

impl<'a> Compute<'a> {
    /// Everything in `kind`, converting each parameter where it is used.
    pub fn plain(kind: Kind) -> Compute<'static> {
        Compute { kind, copies: None }
    }

    pub fn with_copies(kind: Kind, copies: &'a HashMap<usize, Tensor>) -> Compute<'a> {
        Compute { kind, copies: Some(copies) }
    }

    pub fn is_float(&self) -> bool {
        self.kind == Kind::Float
    }

    /// `param` in the compute kind: its converted copy when the model keeps one (gradients then
    /// flow to the copy), a conversion in the graph otherwise.
    pub fn param(&self, param: &Tensor) -> Tensor {
        if param.kind() == self.kind {
            return param.shallow_clone();
        }
        match self.copies.and_then(|c| c.get(&(param.data_ptr() as usize))) {
            Some(copy) => copy.shallow_clone(),
            None => param.to_kind(self.kind),
        }
    }
}

/// Linear layer `[.., in] -> [.., out]`, PyTorch names `weight` [out, in] and `bias` [out].
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// Xavier-uniform bound for a `[fan_out, fan_in]` matrix (DiT's init for every linear layer).
pub fn xavier(fan_in: i64, fan_out: i64) -> Init {
    let a = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform { lo: -a, up: a }
}

impl Linear {
    pub fn new(p: nn::Path, fan_in: i64, fan_out: i64, init: Init, bias: bool) -> Linear {
        let weight = p.var("weight", &[fan_out, fan_in], init);
        let bias = bias.then(|| p.var("bias", &[fan_out], Init::Const(0.0)));
        Linear { weight, bias }
    }

    /// PyTorch's own nn.Linear default init (kaiming-uniform a=√5, i.e. U(±1/√fan_in)).
    pub fn torch_default(p: nn::Path, fan_in: i64, fan_out: i64, bias: bool) -> Linear {
        let b = 1.0 / (fan_in as f64).sqrt();
        let weight = p.var("weight", &[fan_out, fan_in], Init::Uniform { lo: -b, up: b });
        let bias = bias.then(|| p.var("bias", &[fan_out], Init::Uniform { lo: -b, up: b }));
        Linear { weight, bias }
    }

    pub fn forward(&self, x: &Tensor, cx: Compute) -> Tensor {
        if cx.is_float() && x.kind() == Kind::Float {
            return x.linear(&self.weight, self.bias.as_ref());
        }
        let b = self.bias.as_ref().map(|b| cx.param(b));
        x.to_kind(cx.kind).linear(&cx.param(&self.weight), b.as_ref())
    }
}

/// LayerNorm over the last dimension, optionally without affine parameters (adaLN supplies them).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub dim: i64,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64, affine: bool) -> LayerNorm {
        let (weight, bias) = if affine {
            (Some(p.var("weight", &[dim], Init::Const(1.0))), Some(p.var("bias", &[dim], Init::Const(0.0))))
        } else {
            (None, None)
        };
        LayerNorm { weight, bias, dim, eps }
    }

    /// Normalises in f32 whatever the input kind.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        float(x).layer_norm([self.dim], self.weight.as_ref(), self.bias.as_ref(), self.eps, true)
    }
}

/// `x` as f32, without a conversion call when it already is.
pub fn float(x: &Tensor) -> Tensor {
    if x.kind() == Kind::Float {
        x.shallow_clone()
    } else {
        x.to_kind(Kind::Float)
    }
}

/// Multi-head attention on `[B, H, N, dh]` tensors: libtorch's fused kernel on GPUs; on the CPU
/// the plain softmax(q·kᵀ/√dh)·v, whose bf16 backward is much cheaper than the CPU flash kernel's
/// (BENCHMARKS.md, "P1"); libtorch's math backend computes the same.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    if q.device().is_cuda() {
        return Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, false, None, false);
    }
    let dh = *q.size().last().expect("[B, H, N, dh] tensor");
    let scale = (dh as f64).powf(-0.25); // on q and k each, as libtorch's math backend does
    let scores = (q * scale).matmul(&(k * scale).transpose(-2, -1));
    scores.softmax(-1, scores.kind()).matmul(v)
}

/// `[B, N, H·dh]` with head-major features (`'(h d)'`) -> `[B, H, N, dh]`.
pub fn split_heads(x: &Tensor, heads: i64) -> Tensor {
    let (b, n, d) = x.size3().expect("[B, N, D] tensor");
    x.view([b, n, heads, d / heads]).transpose(1, 2)
}

/// Inverse of [`split_heads`].
pub fn merge_heads(x: &Tensor) -> Tensor {
    let (b, h, n, dh) = x.size4().expect("[B, H, N, dh] tensor");
    x.transpose(1, 2).contiguous().view([b, n, h * dh])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU path must compute what libtorch's fused kernel computes, for self- and
    /// cross-attention shapes, in f32 and in bf16 (the demo's precision).
    #[test]
    fn cpu_attention_matches_the_fused_kernel() {
        tch::manual_seed(3);
        let opts = (Kind::Float, tch::Device::Cpu);
        for (nq, nk) in [(64, 64), (64, 12)] {
            let q = Tensor::randn([2, 3, nq, 16], opts);
            let k = Tensor::randn([2, 3, nk, 16], opts);
            let v = Tensor::randn([2, 3, nk, 16], opts);
            for (kind, tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 3e-2)] {
                let (q, k, v) = (q.to_kind(kind), k.to_kind(kind), v.to_kind(kind));
                let fused = Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, false, None, false);
                let ours = attention(&q, &k, &v);
                assert_eq!(ours.size(), fused.size());
                assert_eq!(ours.kind(), kind);
                let diff = (ours.to_kind(Kind::Float) - fused.to_kind(Kind::Float)).abs().max().double_value(&[]);
                assert!(diff < tol, "{kind:?} {nq}x{nk}: max difference {diff}");
            }
        }
    }
}
