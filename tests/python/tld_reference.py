"""Independent numpy implementation of the AT-1 "TLD" denoiser, written from
../shared/reference/at1-model.md, to check skytrain's `tld` model tensor for tensor.

usage: tld_reference.py WEIGHTS.safetensors INPUTS.safetensors OUT.safetensors CONFIG.json
INPUTS holds x [B,C,S,S], sigma [B,1], label [B,T]; OUT gets the x0 prediction `out`.
"""
import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file, save_file


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def attention(q, k, v, heads):
    """Head layout '(d h)': feature j belongs to head j % h, dimension j // h."""
    B, N, D = q.shape
    M = k.shape[1]
    dh = D // heads
    out = np.zeros((B, N, D), dtype=np.float64)
    for h in range(heads):
        idx = [d * heads + h for d in range(dh)]  # j with j % heads == h, ordered by j // heads
        qh, kh, vh = q[:, :, idx], k[:, :, idx], v[:, :, idx]
        att = softmax(qh @ kh.transpose(0, 2, 1) / math.sqrt(dh))
        out[:, :, idx] = att @ vh
    return out


def conv2d(x, w, b, stride=1, padding=0, groups=1):
    B, Cin, H, W = x.shape
    Cout, cpg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    Ho = (H + 2 * padding - kh) // stride + 1
    Wo = (W + 2 * padding - kw) // stride + 1
    out = np.zeros((B, Cout, Ho, Wo))
    opg = Cout // groups
    for o in range(Cout):
        g = o // opg
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cpg:(g + 1) * cpg, i:i + stride * Ho:stride, j:j + stride * Wo:stride]
                out[:, o] += np.einsum("bchw,c->bhw", patch, w[o, :, i, j])
        out[:, o] += b[o]
    return out


def main():
    wpath, ipath, opath, cpath = sys.argv[1:5]
    W = {k: v.astype(np.float64) for k, v in load_file(wpath).items()}
    I = {k: v.astype(np.float64) for k, v in load_file(ipath).items()}
    cfg = json.load(open(cpath))
    D, L, C, S, p, F = (cfg[k] for k in ("embed_dim", "n_layers", "latent_channels", "latent_size", "patch_size", "noise_embed_dims"))
    m = cfg["mlp_multiplier"]
    x, sigma, label = I["x"], I["sigma"], I["label"]
    B = x.shape[0]
    g = S // p
    P = C * p * p

    f = np.exp(np.linspace(math.log(1.0), math.log(1000.0), F // 2))
    w = 2 * math.pi * f
    e = np.concatenate([np.sin(w[None] * sigma), np.cos(w[None] * sigma)], axis=1)
    n_tok = linear(gelu(linear(e, W["fourier_feats.1.weight"], W["fourier_feats.1.bias"])), W["fourier_feats.3.weight"], W["fourier_feats.3.bias"])
    t_tok = linear(label, W["label_proj.weight"], W["label_proj.bias"])
    y = layer_norm(np.stack([n_tok, t_tok], axis=1), W["norm.weight"], W["norm.bias"])

    pre = "denoiser_trans_block."
    h = conv2d(x, W[pre + "patchify_and_embed.0.weight"], W[pre + "patchify_and_embed.0.bias"], stride=p)
    h = h.reshape(B, P, g * g).transpose(0, 2, 1)  # tokens row-major (h, w)
    h = layer_norm(h, W[pre + "patchify_and_embed.2.weight"], W[pre + "patchify_and_embed.2.bias"])
    h = linear(h, W[pre + "patchify_and_embed.3.weight"], W[pre + "patchify_and_embed.3.bias"])
    h = layer_norm(h, W[pre + "patchify_and_embed.4.weight"], W[pre + "patchify_and_embed.4.bias"])
    h = h + W[pre + "pos_embed.weight"][None, : g * g]

    for i in range(L):
        b = f"{pre}decoder_blocks.{i}."
        q, k, v = np.split(linear(h, W[b + "self_attention.qkv_linear.weight"]), 3, axis=-1)
        h = layer_norm(attention(q, k, v, D // 64) + h, W[b + "norm1.weight"], W[b + "norm1.bias"])
        q = linear(h, W[b + "cross_attention.q_linear.weight"])
        k, v = np.split(linear(y, W[b + "cross_attention.kv_linear.weight"]), 2, axis=-1)
        h = layer_norm(attention(q, k, v, 4) + h, W[b + "norm2.weight"], W[b + "norm2.bias"])
        img = h.transpose(0, 2, 1).reshape(B, D, g, g)
        z = conv2d(img, W[b + "mlp.mlp.0.weight"], W[b + "mlp.mlp.0.bias"])
        z = conv2d(z, W[b + "mlp.mlp.1.weight"], W[b + "mlp.mlp.1.bias"], padding=1, groups=m * D)
        z = conv2d(gelu(z), W[b + "mlp.mlp.3.weight"], W[b + "mlp.mlp.3.bias"])
        h = layer_norm(z.reshape(B, D, g * g).transpose(0, 2, 1) + h, W[b + "norm3.weight"], W[b + "norm3.bias"])

    o = linear(h, W[pre + "out_proj.0.weight"], W[pre + "out_proj.0.bias"])  # [B, N, (c p1 p2)]
    out = np.zeros((B, C, S, S))
    for hh in range(g):
        for ww in range(g):
            tok = o[:, hh * g + ww].reshape(B, C, p, p)
            out[:, :, hh * p:(hh + 1) * p, ww * p:(ww + 1) * p] = tok
    save_file({"out": out.astype(np.float32)}, opath)


if __name__ == "__main__":
    main()
