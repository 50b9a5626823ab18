"""What a whole run holds, measured, next to what the planner says it holds.

Runs `python -m stackwise_jax.train` in a child process (unless --skip_train: the run in
--workdir is read as it is), then prints per phase:
- measured: peak_live_bytes (largest total of live JAX arrays) and peak_rss_bytes (the
  process's resident-memory high-water mark in that phase) from summary.json;
- planned: plan.analyze's non-temporary bytes (what the process holds outside the compiled
  step) and total (with the step's XLA temporaries) for that very phase;
- disk: the run directory's bytes (stores, checkpoints, cache) at the end, and the
  planner's disk_plan.
The whole process's peak RSS is summary.json's (the largest high-water mark over its phases,
the data preparation before them and the final evaluation after them).

    python scripts/measure_run.py --config=configs/llama70b_width.py --workdir=/tmp/w70 \
        [--json=docs/run_llama70b_width.json] [--config.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stackwise_jax import config as config_lib, phases, plan  # noqa: E402
from stackwise_jax.checkpoint import disk_usage  # noqa: E402

GIB = 2**30


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = config_lib.split_overrides(argv)
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--skip_train", action="store_true", help="read an existing finished run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(rest)
    cfg = config_lib.load(args.config, overrides)
    out = {"config": args.config, "overrides": overrides}
    if not args.skip_train:
        cmd = [sys.executable, "-m", "stackwise_jax.train", f"--config={args.config}",
               f"--workdir={args.workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        out["wall_s"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(args.workdir, "summary.json")) as f:
        summary = json.load(f)
    out["process_peak_rss_bytes"] = summary["peak_rss_bytes"]
    rows = []
    for record, phase in zip(summary["stages"], phases.all_phases(cfg)):
        planned = plan.analyze(cfg, "phase", 10**15, planned=(cfg, phase))
        rows.append({"phase": phase.name, "peak_live_bytes": record["peak_live_bytes"],
                     "peak_rss_bytes": record["peak_rss_bytes"],
                     "planned_non_temporary_bytes": planned["non_temporary_bytes"],
                     "planned_holds": planned["holds"],
                     "planned_total_bytes": planned["total_bytes"], "wall_s": record["wall_s"]})
    out["phases"] = rows
    out["disk_bytes"] = {d: disk_usage(os.path.join(args.workdir, d))
                         for d in ("params", "checkpoints", "cache")}
    out["disk_bytes"]["run"] = disk_usage(args.workdir)
    n_rows = None  # the planner's cache term needs the corpus; the run dir tells it
    out["planned_disk"] = plan.disk_plan(cfg, n_rows)
    print("| phase | peak live (measured) | non-temporary (planned) | live/planned | peak RSS "
          "(measured) | total incl. XLA temp (planned) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['peak_live_bytes'] / GIB:.3f} GiB | "
              f"{r['planned_non_temporary_bytes'] / GIB:.3f} GiB | "
              f"{r['peak_live_bytes'] / r['planned_non_temporary_bytes']:.3f} | "
              f"{r['peak_rss_bytes'] / GIB:.2f} GiB | {r['planned_total_bytes'] / GIB:.2f} GiB |")
    d = out["disk_bytes"]
    print(f"disk: run dir {d['run'] / 1e9:.2f} GB (stores {d['params'] / 1e9:.2f} GB, checkpoints "
          f"{d['checkpoints'] / 1e9:.3f} GB, cache {d['cache'] / 1e9:.2f} GB); planner's bound "
          f"{out['planned_disk']['total'] / 1e9:.2f} GB")
    print(f"whole process: peak RSS {out['process_peak_rss_bytes'] / GIB:.2f} GiB"
          + (f", wall {out['wall_s']} s" if "wall_s" in out else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
