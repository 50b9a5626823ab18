"""Why the activation cache is .npy shards: write and random-batch read speed vs TensorStore.

Writes the same bf16 hidden states (rows of seq_len x d_model) once through
stackwise_jax.cache_store (memory-mapped .npy record shards with sha256) and once as a
TensorStore zarr array chunked one row per chunk (the storage Orbax writes through), then
reads random batches of rows from each, as training does.

    python scripts/bench_cache_format.py --rows=4000 --seq_len=128 --d_model=256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import ml_dtypes
import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=300)
    args = ap.parse_args()

    import tensorstore as ts

    from stackwise_jax import cache_store

    rng = np.random.default_rng(0)
    N, L, D = args.rows, args.seq_len, args.d_model
    hidden = rng.standard_normal((N, L, D), dtype=np.float32)
    small = {"inputs": np.zeros((N, L), np.int32), "targets": np.zeros((N, L), np.int32),
             "masked": np.zeros((N, L), bool), "t": np.zeros((N,), np.float32)}
    base = tempfile.mkdtemp(prefix="cache_format_")
    order = [rng.integers(0, N, args.batch) for _ in range(args.batches)]
    mb = N * L * D * 2 / 2**20
    results = {"rows": N, "seq_len": L, "d_model": D, "hidden_MiB_bf16": round(mb, 1)}

    # .npy record shards (what the cache uses)
    spec = cache_store.CacheSpec(N, L, D, "bf16", rows_per_shard=max(1, (256 * 2**20) // (L * D * 2)))
    t = time.perf_counter()
    with cache_store.CacheWriter(os.path.join(base, "npy"), spec) as w:
        for s in range(0, N, 256):
            w.write({"hidden": hidden[s:s + 256], **{k: v[s:s + 256] for k, v in small.items()}})
    results["npy_write_MiB_s"] = mb / (time.perf_counter() - t)
    reader = cache_store.open_cache(os.path.join(base, "npy"))
    t = time.perf_counter()
    for idx in order:
        reader.batch(idx)
    results["npy_read_rows_s"] = args.batch * args.batches / (time.perf_counter() - t)

    # TensorStore zarr, one row per chunk, bf16 (hidden only: it is the bulk of the bytes)
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(base, "ts")},
                     "metadata": {"shape": [N, L, D], "chunks": [1, L, D], "dtype": "<u2"}},
                    create=True, delete_existing=True).result()
    t = time.perf_counter()
    for s in range(0, N, 256):
        store[s:min(s + 256, N)].write(hidden[s:s + 256].astype(ml_dtypes.bfloat16).view(np.uint16)).result()
    results["tensorstore_write_MiB_s"] = mb / (time.perf_counter() - t)
    t = time.perf_counter()
    for idx in order:
        rows = store[np.sort(idx)].read().result()
        rows.view(ml_dtypes.bfloat16).astype(np.float32)
    results["tensorstore_read_rows_s"] = args.batch * args.batches / (time.perf_counter() - t)

    shutil.rmtree(base)
    for k, v in results.items():
        print(f"{k:>26}: {v:,.1f}" if isinstance(v, float) else f"{k:>26}: {v}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
