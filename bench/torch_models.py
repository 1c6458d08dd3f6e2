"""PyTorch eager versions of skytrain's `dit` and `tld` models, with the same parameter names, so
the benchmark loads skytrain's initial weights and runs the very same training step."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_features(t, dim):
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def sincos_2d(dim, grid):
    quarter = dim // 4
    omega = torch.exp(torch.arange(quarter, dtype=torch.float64) / quarter * -math.log(10000.0))

    def axis(c):
        out = c.double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    idx = torch.arange(grid * grid)
    return torch.cat([axis(idx % grid), axis(idx // grid)], dim=1).float()


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)


class CrossAttn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)


class Mlp(nn.Module):
    def __init__(self, d, hidden, approximate):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.approximate = approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


# skytrain's `mlp_activation` -> F.gelu's `approximate`.
GELU_APPROXIMATION = {"gelu-tanh": "tanh", "gelu": "none"}


def heads(x, h):
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def merge(x):
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


class DitBlock(nn.Module):
    def __init__(self, d, h, mlp_hidden, approximate):
        super().__init__()
        self.h = h
        self.norm1 = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)
        self.attn = Attn(d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.cross_attn = CrossAttn(d)
        self.norm3 = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(d, mlp_hidden, approximate)
        self.adaln = nn.Linear(d, 6 * d)

    def forward(self, x, c, ctx):
        s1, sc1, g1, s3, sc3, g3 = self.adaln(c).chunk(6, dim=1)
        q, k, v = self.attn.qkv(modulate(self.norm1(x), s1, sc1)).chunk(3, dim=2)
        a = F.scaled_dot_product_attention(heads(q, self.h), heads(k, self.h), heads(v, self.h))
        x = x + g1[:, None] * self.attn.proj(merge(a))
        q = self.cross_attn.q(self.norm2(x))
        k, v = self.cross_attn.kv(ctx).chunk(2, dim=2)
        a = F.scaled_dot_product_attention(heads(q, self.h), heads(k, self.h), heads(v, self.h))
        x = x + self.cross_attn.proj(merge(a))
        y = self.mlp(modulate(self.norm3(x), s3, sc3))
        return x + g3[:, None] * y


class TextBlock(nn.Module):
    """skytrain's text refiner block: pre-norm self-attention and MLP over the text tokens."""

    def __init__(self, d, h, mlp_hidden, approximate):
        super().__init__()
        self.h = h
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attn(d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, mlp_hidden, approximate)

    def forward(self, x):
        q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, dim=2)
        a = F.scaled_dot_product_attention(heads(q, self.h), heads(k, self.h), heads(v, self.h))
        x = x + self.attn.proj(merge(a))
        return x + self.mlp(self.norm2(x))


class TEmbed(nn.Module):
    def __init__(self, f, d):
        super().__init__()
        self.fc1 = nn.Linear(f, d)
        self.fc2 = nn.Linear(d, d)


class Final(nn.Module):
    def __init__(self, d, out):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)
        self.adaln = nn.Linear(d, 2 * d)
        self.linear = nn.Linear(d, out)


class Dit(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, c, p = cfg["hidden"], cfg["latent_channels"], cfg["patch_size"]
        self.x_embed = nn.Conv2d(c, d, p, stride=p)
        self.register_buffer("pos", sincos_2d(d, cfg["latent_size"] // p), persistent=False)
        self.t_embed = TEmbed(cfg["freq_dim"], d)
        self.text_proj = nn.Linear(cfg["text_dim"], d)
        self.pooled_proj = nn.Linear(cfg["text_dim"], d)
        mlp_hidden = int(d * cfg["mlp_ratio"])
        act = GELU_APPROXIMATION[cfg.get("mlp_activation", "gelu-tanh")]
        self.text_refiner = nn.ModuleList(
            [TextBlock(d, cfg["heads"], mlp_hidden, act) for _ in range(cfg.get("text_refiner", 0))]
        )
        self.blocks = nn.ModuleList([DitBlock(d, cfg["heads"], mlp_hidden, act) for _ in range(cfg["depth"])])
        self.final = Final(d, p * p * c)

    def forward(self, x, sigma, tokens, pooled):
        b, c, s, _ = x.shape
        p = self.cfg["patch_size"]
        g = s // p
        h = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos[None]
        t = timestep_features(sigma * 1000.0, self.cfg["freq_dim"])
        cond = F.silu(self.t_embed.fc2(F.silu(self.t_embed.fc1(t))) + self.pooled_proj(pooled))
        ctx = self.text_proj(tokens)
        for blk in self.text_refiner:
            ctx = blk(ctx)
        for blk in self.blocks:
            h = blk(h, cond, ctx)
        shift, scale = self.final.adaln(cond).chunk(2, dim=1)
        out = self.final.linear(modulate(self.final.norm(h), shift, scale))
        return out.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, s, s)


def heads_dh(x, h):
    b, n, d = x.shape
    return x.view(b, n, d // h, h).permute(0, 3, 1, 2)


def merge_dh(x):
    b, h, n, dh = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, n, dh * h)


class TldBlock(nn.Module):
    def __init__(self, d, m):
        super().__init__()
        self.self_attention = nn.Module()
        self.self_attention.qkv_linear = nn.Linear(d, 3 * d, bias=False)
        self.cross_attention = nn.Module()
        self.cross_attention.q_linear = nn.Linear(d, d, bias=False)
        self.cross_attention.kv_linear = nn.Linear(d, 2 * d, bias=False)
        self.mlp = nn.Module()
        self.mlp.mlp = nn.Sequential(nn.Conv2d(d, m * d, 1), nn.Conv2d(m * d, m * d, 3, padding=1, groups=m * d), nn.GELU(), nn.Conv2d(m * d, d, 1))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.d = d

    def forward(self, x, y, g):
        h = self.d // 64
        q, k, v = self.self_attention.qkv_linear(x).chunk(3, dim=2)
        x = self.norm1(merge_dh(F.scaled_dot_product_attention(heads_dh(q, h), heads_dh(k, h), heads_dh(v, h))) + x)
        q = self.cross_attention.q_linear(x)
        k, v = self.cross_attention.kv_linear(y).chunk(2, dim=2)
        x = self.norm2(merge_dh(F.scaled_dot_product_attention(heads_dh(q, 4), heads_dh(k, 4), heads_dh(v, 4))) + x)
        b, n, d = x.shape
        z = self.mlp.mlp(x.transpose(1, 2).reshape(b, d, g, g))
        return self.norm3(z.flatten(2).transpose(1, 2) + x)


class Tld(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, f, c, p = cfg["embed_dim"], cfg["noise_embed_dims"], cfg["latent_channels"], cfg["patch_size"]
        pp = c * p * p
        n = (cfg["latent_size"] // p) ** 2
        self.register_buffer("w", torch.exp(torch.linspace(0.0, math.log(1000.0), f // 2)) * 2 * math.pi, persistent=False)
        self.fourier_feats = nn.Sequential(nn.Identity(), nn.Linear(f, d), nn.GELU(), nn.Linear(d, d))
        self.label_proj = nn.Linear(cfg["text_emb_size"], d)
        self.norm = nn.LayerNorm(d)
        t = nn.Module()
        t.patchify_and_embed = nn.Sequential(nn.Conv2d(c, pp, p, stride=p), nn.Identity(), nn.LayerNorm(pp), nn.Linear(pp, d), nn.LayerNorm(d))
        t.pos_embed = nn.Embedding(n, d)
        t.out_proj = nn.Sequential(nn.Linear(d, pp))
        t.decoder_blocks = nn.ModuleList([TldBlock(d, cfg["mlp_multiplier"]) for _ in range(cfg["n_layers"])])
        self.denoiser_trans_block = t

    def forward(self, x, sigma, tokens, pooled):
        b, c, s, _ = x.shape
        p = self.cfg["patch_size"]
        g = s // p
        ws = sigma[:, None] * self.w[None]
        e = torch.cat([ws.sin(), ws.cos()], dim=1)
        y = self.norm(torch.stack([self.fourier_feats(e), self.label_proj(pooled)], dim=1))
        t = self.denoiser_trans_block
        pe = t.patchify_and_embed
        h = pe[0](x).flatten(2).transpose(1, 2)
        h = pe[4](pe[3](pe[2](h))) + t.pos_embed.weight[None]
        for blk in t.decoder_blocks:
            h = blk(h, y, g)
        out = t.out_proj(h)
        return out.view(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, s, s)


def build(cfg):
    return Dit(cfg) if cfg["family"] == "dit" else Tld(cfg)
