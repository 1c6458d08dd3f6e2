"""Benchmark P3, reference side: Python webdataset + numpy reading skytrain's encoded shards into
batches (numpy arrays, f32 like skytrain's tensors), shard shuffle and a 1000-sample shuffle buffer.

usage: p3_loader.py DIR --batch 64 --samples 20000
"""
import argparse
import glob
import io
import json
import sys
import time

import numpy as np
import webdataset as wds


def npy(b):
    return np.load(io.BytesIO(b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=20000)
    a = ap.parse_args()
    urls = sorted(glob.glob(f"{a.dir}/*.tar"))
    ds = (
        wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
        .repeat()
        .shuffle(1000)
        .map(lambda s: (npy(s["latent.npy"]).astype(np.float32), npy(s["text.npy"]).astype(np.float32),
                        npy(s["pooled.npy"]).astype(np.float32)))
        .batched(a.batch, collation_fn=lambda rows: tuple(np.stack(c) for c in zip(*rows)))
    )
    t0 = time.perf_counter()
    n = 0
    checksum = 0.0
    for lat, txt, pooled in ds:
        checksum += float(lat[0, 0, 0, 0]) + float(pooled[0, 0])
        n += lat.shape[0]
        if n >= a.samples:
            break
    secs = time.perf_counter() - t0
    print(json.dumps({"samples": n, "seconds": secs, "samples_per_s": n / secs, "checksum": checksum}))


if __name__ == "__main__":
    main()
