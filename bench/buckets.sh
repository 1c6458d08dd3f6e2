#!/usr/bin/env bash
# Aspect-ratio buckets: the share of each image's area kept (square centre crop vs buckets) on the
# emoji set and on the wide/tall set of skytrain::demo::rows, and training throughput on buckets
# vs square at (about) equal pixels per sample, measured in one run, alternating the kinds three
# times. A control isolates the cost of switching shapes between batches: one bucket (48x24) vs
# both orientations (48x24 and 24x48), equal tokens per sample.
#
# Data: rows set (N images, aspect 1:3 to 3:1) curated at 32 px (buckets: auto, step 8, aspect ≤ 2:
# 24x48, 24x40, 32x32, 40x24, 48x24), encoded with the fitted encoders (`encode --fit`, 6×16×16
# latents for 32 px); model: dit-tiny's shape (hidden 128, depth 4, patch 2) at latent size 16.
#
# usage: bench/buckets.sh [n=2000] [steps=80] [batch=32]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
STEPS=${2:-80}
BATCH=${3:-32}
scripts/setup.sh >/dev/null
cargo build --release --locked >/dev/null
cargo build --release --locked --example rows_set >/dev/null 2>&1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bin=target/release/skytrain
allow=cc0,pdm,cc-by,cc-by-sa,apache-2.0
area() { # dataset → "mean p10" of the area kept
  python3 -c 'import json,sys; k=json.load(open(sys.argv[1]))["curation"]["area_kept"]; print("%.1f%% (worst tenth <= %.1f%%)" % (100*k["mean"], 100*k["p10"]))' "$1/manifest.json"
}
emoji=$(scripts/emoji_dataset.sh)
rows=$(target/release/examples/rows_set "$tmp/set" "$N")
for set in emoji rows; do
  table=$emoji; [ $set = rows ] && table=$rows
  $bin curate "$table" --out "$tmp/$set-square" --resolution 32 --shard-size 256 --allow $allow >/dev/null 2>&1
  $bin curate "$table" --out "$tmp/$set-buckets" --resolution 32 --shard-size 256 --allow $allow \
    --buckets auto --bucket-step 8 >/dev/null 2>&1
  echo "$set: area kept, square crop $(area "$tmp/$set-square"); buckets $(area "$tmp/$set-buckets")"
done
$bin curate "$rows" --out "$tmp/rows-wide" --resolution 32 --shard-size 256 --allow $allow --buckets 48x24 >/dev/null 2>&1
$bin curate "$rows" --out "$tmp/rows-both" --resolution 32 --shard-size 256 --allow $allow --buckets 48x24,24x48 >/dev/null 2>&1
kinds="square buckets wide both"
for kind in $kinds; do
  $bin encode "$tmp/rows-$kind" --out "$tmp/enc-$kind" --fit >/dev/null 2>&1
  len=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["encoding"]["text_shape"][0])' "$tmp/enc-$kind/manifest.json")
  cat > "$tmp/$kind.toml" <<TOML
name = "bench-$kind"
[model]
family = "dit"
latent_channels = 6
latent_size = 16
patch_size = 2
hidden = 128
depth = 4
heads = 2
text_dim = 64
text_len = $len
freq_dim = 64
[train]
seed = 1
steps = $STEPS
batch_size = $BATCH
checkpoint_every = $STEPS
[data]
shards = "$tmp/enc-$kind"
TOML
done
for round in 1 2 3; do
  for kind in $kinds; do
    rm -rf "$tmp/run-$kind"
    $bin run init "$tmp/$kind.toml" --store "$tmp/run-$kind" >/dev/null
    $bin train --store "$tmp/run-$kind" >/dev/null 2>&1
    cat "$tmp"/run-$kind/metrics/train/*.jsonl > "$tmp/$kind.$round.jsonl"
  done
done
python3 - "$tmp" "$BATCH" <<'PY'
import json, statistics, sys
d, batch = sys.argv[1], int(sys.argv[2])
def rate(kind, r):
    steps = [json.loads(l) for l in open(f"{d}/{kind}.{r}.jsonl")]
    return statistics.median(s["samples_per_s"] for s in steps[5:])
def pixels(kind):  # mean pixels per sample in the encoded set
    m = json.load(open(f"{d}/enc-{kind}/manifest.json"))
    counts = {}
    for s in m["shards"]:
        for b, n in (s.get("buckets") or {"32x32": s["samples"]}).items():
            counts[b] = counts.get(b, 0) + n
    area = lambda b: int(b.split("x")[0]) * int(b.split("x")[1])
    return sum(area(b) * n for b, n in counts.items()) / sum(counts.values())
r = {k: [rate(k, i) for i in (1, 2, 3)] for k in ("square", "buckets", "wide", "both")}
show = lambda k: ", ".join(f"{x:,.0f}" for x in r[k])
print(f"train, square 32x32: {show('square')} samples/s")
print(f"train, buckets: {show('buckets')} samples/s ({pixels('buckets'):.0f} px per sample on average, square {pixels('square'):.0f})")
ratio = statistics.median(r["buckets"]) / statistics.median(r["square"])
print(f"ratio (buckets / square, medians): samples/s {ratio:.3f}x, pixels/s {ratio * pixels('buckets') / pixels('square'):.3f}x")
print(f"control, one bucket 48x24: {show('wide')}; 48x24 + 24x48: {show('both')} samples/s")
print(f"ratio (switching shapes / one shape, medians): {statistics.median(r['both']) / statistics.median(r['wide']):.3f}x")
PY
