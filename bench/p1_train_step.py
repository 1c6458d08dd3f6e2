"""PyTorch eager side of benchmark P1: loads the initial weights and batch skytrain dumped, runs
the same training step (fwd + MSE + bwd + clip + AdamW), prints JSON like `skytrain bench-step`."""
import argparse
import json
import time

import torch
from safetensors.torch import load_file

from torch_models import build

ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--threads", type=int, default=0)
ap.add_argument("--device", default="cpu")
ap.add_argument("--bf16", action="store_true")
args = ap.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
dev = torch.device(args.device)
cfg = json.load(open(f"{args.dir}/config.json"))
model = build(cfg)
missing, unexpected = model.load_state_dict(load_file(f"{args.dir}/init.safetensors"), strict=True)
model.to(dev)
batch = {k: v.to(dev) for k, v in load_file(f"{args.dir}/batch.safetensors").items()}
x0, eps, sigma = batch["x0"], batch["eps"], batch["sigma"]
tokens, pooled = batch["tokens"], batch["pooled"]
x_t = None
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
target = (eps - x0) if cfg["family"] == "dit" and cfg.get("prediction", "velocity") == "velocity" else x0
losses, times = [], []
for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    s = sigma.view(-1, 1, 1, 1)
    x_t = x0 * (1 - s) + eps * s
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
        pred = model(x_t, sigma, tokens, pooled)
    loss = (pred.float() - target).square().mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=False)
    lv = loss.item()
    if i >= args.warmup:
        times.append((time.perf_counter() - t0) * 1e3)
    losses.append(lv)
times.sort()
print(json.dumps({
    "engine": f"pytorch {torch.__version__} eager",
    "threads": torch.get_num_threads(),
    "ms_per_step_median": times[len(times) // 2],
    "ms_per_step_min": times[0],
    "samples_per_s": x0.shape[0] / (times[len(times) // 2] / 1e3),
    "losses": losses,
}))
