#!/usr/bin/env bash
# GPU measurements (P1 on CUDA, and the demo on a GPU) on a machine that has PyTorch but no Rust
# toolchain, such as the H100/H200 machines lent for measurements: runs a skytrain binary built
# elsewhere with `cargo build --release --features cuda` against that machine's own libtorch (same
# torch 2.11.0 that tch 0.24.0 is built for), and PyTorch eager on the same GPU for the ratio.
#
# usage: bench/gpu.sh BINARY OUTDIR [demo steps=20000, 0 skips the demo]
# Prints one line per configuration: ms/step for both, ratio (PyTorch time / skytrain time),
# model TFLOP/s and MFU against the dense bf16 peak (989 TFLOP/s, H100/H200 SXM datasheet).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "$1")
OUT=$(realpath "$2")
DEMO_STEPS=${3:-20000}
DEVICE=${DEVICE:-cuda} # DEVICE=cpu CONFIGS="dit-bench 2 f32" for a dry run of this script
CONFIGS=${CONFIGS:-"dit-bench 8 f32,dit-bench 8 bf16,tld-at1 8 f32,tld-at1 256 bf16,dit-bench 256 bf16,dit-b 256 bf16,dit-xl 64 bf16"}
mkdir -p "$OUT"
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
ldd "$BIN" | grep -E 'libtorch|not found' || true
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

IFS=, read -ra specs <<<"$CONFIGS"
for spec in "${specs[@]}"; do
  set -- $spec
  model=$1 batch=$2 prec=$3
  flag=""
  [ "$prec" = bf16 ] && flag="--bf16"
  tag="$model-$batch-$prec"
  timeout 90 "$BIN" bench-step --model "$model" --batch "$batch" --warmup 5 --steps 20 --device "$DEVICE" $flag \
    --dump "$tmp/$tag" >"$OUT/$tag.rs.json" 2>"$OUT/$tag.rs.err" || { echo "$tag: skytrain failed"; tail -5 "$OUT/$tag.rs.err"; }
  (cd bench && timeout 90 python3 p1_train_step.py --dir "$tmp/$tag" --warmup 5 --steps 20 --device "$DEVICE" $flag) \
    >"$OUT/$tag.py.json" 2>"$OUT/$tag.py.err" || { echo "$tag: pytorch failed"; tail -5 "$OUT/$tag.py.err"; }
  rm -rf "$tmp/$tag"
  python3 - "$OUT" "$tag" <<'PY'
import json, sys
out, tag = sys.argv[1:3]
try:
    rs = json.load(open(f"{out}/{tag}.rs.json")); py = json.load(open(f"{out}/{tag}.py.json"))
except Exception as e:
    print(f"{tag}: no result ({e})"); sys.exit(0)
fl = rs["flops_per_step"]
tf = lambda ms: fl / (ms / 1e3) / 1e12
dl = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(rs["losses"], py["losses"]))
g = rs["gpus"][0] if rs["gpus"] else {}
print(f"{tag}: {rs['parameters']:,} params | skytrain {rs['ms_per_step_median']:.2f} ms ({rs['samples_per_s']:.0f} samples/s, "
      f"{tf(rs['ms_per_step_median']):.1f} TFLOP/s, MFU {tf(rs['ms_per_step_median']) / 989 * 100:.1f}%) | "
      f"{py['engine']} {py['ms_per_step_median']:.2f} ms ({tf(py['ms_per_step_median']):.1f} TFLOP/s) | "
      f"ratio {py['ms_per_step_median'] / rs['ms_per_step_median']:.3f}x | max rel loss diff {dl:.1e} | "
      f"NVML: {g.get('name', '-')} {g.get('power_w', 0):.0f} W util {g.get('utilization_pct', '-')}% "
      f"mem {g.get('memory_used_mib', '-')} MiB temp {g.get('temperature_c', '-')} C")
PY
done | tee "$OUT/p1_gpu.txt"

# The demo on the GPU, one process: does prompt fidelity keep rising with more steps? (0: skip)
[ "$DEMO_STEPS" -gt 0 ] || exit 0
start=$(date +%s)
timeout 240 "$BIN" demo --device "$DEVICE" --workers 0 --steps "$DEMO_STEPS" --store "$tmp/demo-run" --out "$tmp/demo-out" \
  >"$OUT/demo.log" 2>&1
echo "demo rc $? in $(( $(date +%s) - start )) s"
tail -4 "$OUT/demo.log"
cp "$tmp/demo-out/samples.png" "$OUT/demo-samples.png" 2>/dev/null || true
