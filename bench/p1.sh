#!/usr/bin/env bash
# Benchmark P1: one training step (fwd + MSE + bwd + clip + AdamW) of the same model, same initial
# weights, same batch, same threads, in PyTorch eager and in skytrain, in one run, alternating
# (skytrain, PyTorch, skytrain, PyTorch) since this kind of machine has bursts of outside load.
# Prints per-run medians, the loss agreement and the ratio (PyTorch time / skytrain time; > 1 means
# skytrain is faster).
#
# usage: bench/p1.sh [threads=2] [steps=10] [device=cpu]     (GPU: bench/p1.sh 0 20 cuda --bf16)
#        MODELS="dit-tiny:16" bench/p1.sh 2 20 cpu --bf16   (other "model:batch" pairs; the demo's step)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
STEPS=${2:-10}
DEVICE=${3:-cpu}
EXTRA=${4:-}
# PyTorch in Python needs the full wheel with its NVIDIA dependencies: a separate venv.
SKYTRAIN_VENV=.bench-venv SKYTRAIN_TORCH_FULL=1 scripts/setup.sh >/dev/null
scripts/setup.sh >/dev/null
cargo build --release --locked ${SKYTRAIN_FEATURES:+--features $SKYTRAIN_FEATURES} >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for spec in ${MODELS:-dit-bench:8 tld-at1:8}; do
  model=${spec%:*} batch=${spec#*:}
  for round in 1 2; do
    target/release/skytrain bench-step --model "$model" --batch "$batch" --steps "$STEPS" --threads "$THREADS" \
      --device "$DEVICE" $EXTRA --dump "$tmp/$model" > "$tmp/$model.rs.$round.json"
    (cd bench && ../.bench-venv/bin/python p1_train_step.py --dir "$tmp/$model" --steps "$STEPS" \
      --threads "$THREADS" --device "$DEVICE" $EXTRA) > "$tmp/$model.py.$round.json"
  done
  python3 - "$tmp" "$model" <<'PY'
import json, sys
tmp, model = sys.argv[1:3]
rs = [json.load(open(f"{tmp}/{model}.rs.{r}.json")) for r in (1, 2)]
py = [json.load(open(f"{tmp}/{model}.py.{r}.json")) for r in (1, 2)]
dl = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(rs[0]["losses"], py[0]["losses"]))
rs_ms = [r["ms_per_step_median"] for r in rs]
py_ms = [p["ms_per_step_median"] for p in py]
ratio = sum(py_ms) / sum(rs_ms)
print(f"{model}: {rs[0]['parameters']:,} params, batch {rs[0]['batch']}, threads {rs[0]['threads']}, device {rs[0]['device']}")
print(f"  skytrain (tch)  ms/step median: {rs_ms[0]:.1f} / {rs_ms[1]:.1f}")
print(f"  {py[0]['engine']:15} ms/step median: {py_ms[0]:.1f} / {py_ms[1]:.1f}")
print(f"  max relative loss difference over {len(py[0]['losses'])} steps: {dl:.2e}")
fl = rs[0]["flops_per_step"]
print(f"  model TFLOP/s: skytrain {fl / (min(rs_ms) / 1e3) / 1e12:.2f}, pytorch {fl / (min(py_ms) / 1e3) / 1e12:.2f}")
print(f"  ratio (pytorch time / skytrain time): {ratio:.3f}x")
PY
done
