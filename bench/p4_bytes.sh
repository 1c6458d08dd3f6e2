#!/usr/bin/env bash
# Benchmark P4: bytes a DiLoCo worker uploads per 1,000 inner steps, against what data-parallel
# ring all-reduce would send for the same steps (2·(N−1)/N · 4 bytes · parameters per step, f32
# gradients). Runs a short real DiLoCo run (dit-tiny, 4 workers, the codec given) through a
# local store and reads the measured update sizes from the commit records.
#
# usage: bench/p4_bytes.sh [codec=int8|f16|f32|sparse] [block=256] [topk_chunk=4096] [topk=56]
set -euo pipefail
cd "$(dirname "$0")/.."
CODEC=${1:-int8}
BLOCK=${2:-256}
TOPK_CHUNK=${3:-4096}
TOPK=${4:-56}
scripts/setup.sh >/dev/null
cargo build --release --locked >/dev/null
bin=target/release/skytrain
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
$bin demo-data --store "$tmp/store" --images 512 >/dev/null 2>&1
cat > "$tmp/run.toml" <<TOML
name = "p4"
model = "dit-tiny"
[train]
batch_size = 8
steps = 6
threads = 1
[sync]
rounds = 3
inner_steps = 2
codec = "$CODEC"
block_size = $BLOCK
topk_chunk = $TOPK_CHUNK
topk = $TOPK
poll_ms = 50
heartbeat_timeout_s = 5.0
min_members = 4
TOML
for w in 0 1 2 3; do $bin key new --out "$tmp/w$w.key" --admit "$tmp/run.toml" >/dev/null 2>&1; done
$bin run init "$tmp/run.toml" --store "$tmp/store" >/dev/null
for w in 0 1 2 3; do RUST_LOG=warn $bin work --store "$tmp/store" --name "w$w" --key "$tmp/w$w.key" & done
$bin coordinate --store "$tmp/store" >/dev/null 2>&1
wait
python3 - "$tmp/store" <<'PY'
import json, glob, sys, struct
store = sys.argv[1]
commits = [json.load(open(p)) for p in sorted(glob.glob(f"{store}/rounds/*/commit.json"))][1:]
sizes = [a["bytes"] for c in commits for a in c["accepted"]]
per_round = sum(sizes) / len(sizes)
m = sorted(glob.glob(f"{store}/state/0000000000/model-*.safetensors"))[0]
raw = open(m, "rb").read()
hlen = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + hlen])
params = sum(eval("*".join(map(str, v["shape"])) or "1") for k, v in header.items() if k != "__metadata__")
n = 4
allreduce_per_step = 2 * (n - 1) / n * 4 * params
print(f"dit-tiny: {params:,} parameters; {len(sizes)} updates measured, {per_round:,.0f} bytes each ({per_round / params:.3f} B/param)")
print(f"data-parallel ring all-reduce, {n} workers, f32: {allreduce_per_step * 1000 / 1e6:,.1f} MB per worker per 1,000 steps")
for h in (1, 10, 50, 100, 250, 500):
    diloco = per_round * 1000 / h
    print(f"  H = {h:>3}: DiLoCo uploads {diloco / 1e6:8.2f} MB per 1,000 inner steps -> {allreduce_per_step * 1000 / diloco:8.1f}x less")
PY
