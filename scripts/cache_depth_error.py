"""How the activation cache's rounding grows with depth.

An incremental cache build reads stage k's stored hidden states (rounded to the cache
dtype), pushes them through stack k and rounds them again for stage k+1: the rounding of
every earlier stage is carried along. This script trains a progressive run of `--stacks`
stacks (tiny width, Shakespeare) and then, for each setting of (cache dtype, trunk format,
compute dtype), builds the caches of stages 1..stacks-1 with the trainer's own
cache.build, and compares each stage's cached hidden states with the same rows computed
through the resident trunk without any cache (what an uncached stage computes):

    relative error at depth k = ||h_cache - h_exact||_F / ||h_exact||_F   (over all rows)

plus the masked-diffusion loss of the last depth through the trained head, cached vs exact.

    python scripts/cache_depth_error.py [--stacks=17] [--steps=60] [--rows=256]
        [--workdir=/tmp/cache_depth] [--json=docs/cache_depth_error.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time


import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stackwise_jax import cache, config, data, objective, resident, train  # noqa: E402

SETTINGS = [  # (cache dtype, trunk format, compute dtype)
    ("bf16", "fp32", "fp32"), ("fp8", "fp32", "fp32"), ("bf16", "nf4", "fp32"),
    ("fp8", "nf4", "fp32"), ("bf16", "nf4", "bf16"), ("fp8", "nf4", "bf16")]


def tiny_config(stacks: int, steps: int):
    cfg = config.load(os.path.join(ROOT, "configs", "tiny.py"))
    cfg.model.architecture.n_stacks = stacks
    cfg.training.steps_per_stage = steps
    cfg.training.warmup_steps = min(cfg.training.warmup_steps, steps // 4)
    cfg.checkpoint.every_steps = 10 * steps
    cfg.eval.batches = 2
    config.validate(cfg)
    return cfg


def exact_hidden(cfg, workdir, depth, inputs):
    """Hidden states after stacks 0..depth-1, through the resident trunk, no cache."""
    through_trunk, _ = cache._forwards(cfg)
    dtype = resident.compute_dtype(cfg)
    embed = resident.load_group(workdir, "embed", depth, dtype)
    trunk = resident.assemble_trunk(cfg, workdir, tuple(range(depth)),
                                    cfg.training.progressive.frozen_precision, depth, "exact")
    out = [np.asarray(through_trunk(embed, trunk, jnp.asarray(inputs[i:i + 32])), np.float32)
           for i in range(0, len(inputs), 32)]
    return np.concatenate(out)


def masked_loss(cfg, workdir, version, hidden, rows):
    """Mean cross-entropy over masked positions through the stored final norm and head."""
    dtype = resident.compute_dtype(cfg)
    top = {g: resident.load_group(workdir, g, version, dtype) for g in ("final_norm", "head")}
    template = resident.Template(cfg.model, 0)
    batch = {"targets": jnp.asarray(rows["targets"]), "valid": jnp.asarray(rows["masked"]),
             "t": jnp.asarray(rows["t"])}
    rack = template.rack({}, top)
    num = objective.loss_numerator(jnp.asarray(hidden).astype(dtype), rack.logits, batch, "mean")
    return float(num / objective.loss_denominator(batch, "mean"))


def measure(base_cfg, run_dir, rows, setting, scratch):
    cache_dtype, fmt, compute = setting
    cfg = copy.deepcopy(base_cfg)
    p = cfg.training.progressive
    p.cache_activations, p.cache_dtype, p.frozen_precision = True, cache_dtype, fmt
    p.new_stack_precision, p.keep_previous_cache = compute, True
    config.validate(cfg)
    # The caches are written beside a copy of the run's stores (the run itself is untouched).
    work = os.path.join(scratch, "-".join(setting))
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(os.path.join(run_dir, "params"), os.path.join(work, "params"))
    errors, n = [], cfg.model.architecture.n_stacks
    for stage in range(1, n):
        reader = cache.build(cfg, work, stage, rows, mask_id=1)
        got = reader.batch(np.arange(len(reader)))
        want = exact_hidden(cfg, work, stage, got["inputs"])
        errors.append(float(np.linalg.norm(got["hidden"] - want) / np.linalg.norm(want)))
        print(f"  {setting}: depth {stage}: relative error {errors[-1]:.3e}", flush=True)
    loss_cached = masked_loss(cfg, work, n, got["hidden"], got)
    loss_exact = masked_loss(cfg, work, n, want, got)
    shutil.rmtree(work, ignore_errors=True)
    return {"cache_dtype": cache_dtype, "trunk_format": fmt, "compute": compute,
            "relative_error_by_depth": errors, "loss_cached": loss_cached,
            "loss_exact": loss_exact}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stacks", type=int, default=17, help="stacks of the trained run (>= 17 "
                    "gives caches at depths 1..16)")
    ap.add_argument("--steps", type=int, default=60, help="training steps per stage")
    ap.add_argument("--rows", type=int, default=256, help="training sequences compared")
    ap.add_argument("--workdir", default="/tmp/cache_depth")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cfg = tiny_config(args.stacks, args.steps)
    run_dir = os.path.join(args.workdir, "run")
    start = time.perf_counter()
    train.run(cfg, run_dir, progress=False)
    print(f"trained {args.stacks} stacks in {time.perf_counter() - start:.0f} s", flush=True)
    prepared = data.prepare(cfg, run_dir)
    rows = np.asarray(prepared.train_rows[:args.rows])
    results = [measure(cfg, run_dir, rows, s, os.path.join(args.workdir, "scratch"))
               for s in SETTINGS]
    depths = list(range(1, args.stacks))
    shown = [d for d in depths if d in (1, 2, 4, 8, 12, 16) or d == depths[-1]]
    print("| cache | trunk | compute | " + " | ".join(f"depth {d}" for d in shown)
          + " | last-depth loss, cached vs exact |")
    print("|---|---|---|" + "---|" * len(shown) + "---|")
    for r in results:
        errs = r["relative_error_by_depth"]
        print(f"| {r['cache_dtype']} | {r['trunk_format']} | {r['compute']} | "
              + " | ".join(f"{errs[d - 1]:.2e}" for d in shown)
              + f" | {r['loss_cached']:.4f} vs {r['loss_exact']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stacks": args.stacks, "steps_per_stage": args.steps, "rows": args.rows,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
