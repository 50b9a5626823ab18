"""Per-stage cost with and without the activation cache, on the Shakespeare corpus.

Trains the same >= 8-stack model twice (trunk recomputed every step, then trained from
the cache) and prints a table of per-stage wall time and steady-state tokens/s, cache
build time and cache bytes per token; writes the numbers as JSON.

    python scripts/bench_cache.py --out=docs/cache_benchmark.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

from absl import logging


def stage_table(workdir: str, summary: dict) -> list[dict]:
    """Per stage: wall s, tokens/s over the whole stage, and steady tokens/s (first log
    interval, which holds the compile, left out)."""
    by_stage: dict[int, list[float]] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            by_stage.setdefault(rec["stage"], []).append(rec["tokens_per_s"])
    rows = []
    for s in summary["stages"]:
        steady = by_stage[s["stage"]][1:] or by_stage[s["stage"]]
        rows.append({"stage": s["stage"], "wall_s": s["wall_s"],
                     "tokens_per_s": s["tokens"] / s["wall_s"],
                     "steady_tokens_per_s": statistics.median(steady),
                     "cache_s": s.get("cache_s", 0.0)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_stacks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100, help="steps per stage")
    ap.add_argument("--cache_dtype", default="bf16", choices=("fp32", "bf16", "fp8"))
    ap.add_argument("--out", default="docs/cache_benchmark.json")
    ap.add_argument("--workdir", default=None, help="where the two runs go (default: a temp dir)")
    args = ap.parse_args()
    logging.set_verbosity(logging.WARNING)

    from stackwise_jax import cache, config, train

    base = tempfile.mkdtemp(prefix="bench_cache_") if args.workdir is None else args.workdir
    results = {}
    for name, cached in (("recompute", False), ("cache", True)):
        cfg = config.load("configs/tiny.py", {
            "model.architecture.n_stacks": str(args.n_stacks),
            "training.steps_per_stage": str(args.steps),
            "training.log_every": "10",
            "training.progressive.cache_activations": str(cached),
            "training.progressive.cache_dtype": args.cache_dtype,
            "checkpoint.every_steps": str(10**9)})
        wd = os.path.join(base, name)
        shutil.rmtree(wd, ignore_errors=True)
        start = time.perf_counter()
        summary = train.run(cfg, wd, progress=False)
        results[name] = {"stages": stage_table(wd, summary), "total_s": time.perf_counter() - start,
                         "heldout_loss": summary["heldout_loss"]}
        if cached:
            results[name]["cache_cost"] = cache.bytes_and_flops_per_token(cfg)
            results[name]["cached_step_compilations"] = summary["cached_step_compilations"]

    rec, cac = results["recompute"]["stages"], results["cache"]["stages"]
    print("| stage | recompute wall s | recompute steady tok/s | cache wall s | "
          "cache steady tok/s | cache build s |")
    print("|---|---|---|---|---|---|")
    for a, b in zip(rec, cac):
        print(f"| {a['stage']} | {a['wall_s']:.1f} | {a['steady_tokens_per_s']:,.0f} | "
              f"{b['wall_s']:.1f} | {b['steady_tokens_per_s']:,.0f} | {b['cache_s']:.1f} |")
    ratios = {
        "recompute_last_over_first_steady": rec[0]["steady_tokens_per_s"] / rec[-1]["steady_tokens_per_s"],
        "cache_last_over_first_steady": cac[0]["steady_tokens_per_s"] / cac[-1]["steady_tokens_per_s"],
        "cache_last_over_first_cached_steady": cac[1]["steady_tokens_per_s"] / cac[-1]["steady_tokens_per_s"],
        "mean_build_over_stage_train": statistics.mean(
            b["cache_s"] / b["wall_s"] for b in cac[1:]),
    }
    print(json.dumps({**ratios, **results["cache"]["cache_cost"],
                      "heldout_loss_recompute": results["recompute"]["heldout_loss"],
                      "heldout_loss_cache": results["cache"]["heldout_loss"]}, indent=2))
    out = {"args": vars(args), "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d"), "results": results, "ratios": ratios}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
