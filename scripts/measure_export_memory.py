"""Peak host memory of a streaming export, on a run with >= 1 GB of weights.

    python scripts/measure_export_memory.py [--scratch=/tmp/swmem] [--d_model=1024] ...

Builds a finished run of the given shape as training leaves it (random fp32 weights in
per-group parameter stores, RUN_DIR/params/<group>/v<N>, written one group at a time with
stackwise_jax.store; a checkpoint holding only meta), then measures, each in a fresh
subprocess:
  import    RSS once the exporter and its libraries are imported (the floor),
  export    peak RSS of `export.hf.export_run` (streaming, one stored array at a time),
  load_run  peak RSS of `stackwise_jax.run.load_run` (the whole Rack in memory), for
            comparison.
Prints a table and writes JSON (--json_out). Not part of the test suite: it writes GBs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

SHAPE_KEYS = ("vocab_size", "d_model", "d_ff", "n_heads", "n_kv_heads", "n_stacks",
              "blocks_per_stack")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    # VmHWM, the high-water mark of this process's RSS. (getrusage's ru_maxrss would do, but
    # a child inherits its parent's figure across fork+exec.)
    return _status_mb("VmHWM")


def _config(args):
    from stackwise_jax import config

    cfg = config.defaults()
    m = cfg.model
    m.vocab_size, m.d_model, m.d_ff = args.vocab_size, args.d_model, args.d_ff
    m.n_heads, m.n_kv_heads = args.n_heads, args.n_kv_heads
    m.architecture.n_stacks, m.architecture.blocks_per_stack = args.n_stacks, args.blocks_per_stack
    config.validate(cfg)
    return cfg


def make_run(args, run_dir: str) -> dict:
    """A finished run of this shape with random weights, written group by group as the
    trainer's stages store them (stack k at version k + 1, top groups by the last stage);
    returns sizes."""
    import jax
    import numpy as np

    from stackwise_jax import checkpoint, config, data, phases, store
    from stackwise_jax.run import abstract_params

    cfg = _config(args)
    abstract = abstract_params(cfg.model)
    rng = np.random.default_rng(0)
    all_phases = phases.all_phases(cfg)
    versions = {g: p.index + 1 for p in all_phases for g in p.stores}
    checkpoint.claim_workdir(run_dir, cfg)
    for group, version in sorted(versions.items()):
        like = abstract["stacks"][int(group[6:])] if group.startswith("stack_") else abstract[group]
        tree = jax.tree.map(lambda x: 0.02 * rng.standard_normal(x.shape, dtype=np.float32), like)
        store.write(run_dir, group, version, tree, "fp32")
        del tree
    ckpt = checkpoint.Checkpointer(run_dir, 1)
    meta = {"stage": len(all_phases), "step": 0, "global_step": 1, "done": True, "stages": [],
            "stage_wall_s": 0.0, "stage_tokens": 0, "stage_nonfinite": 0}
    ckpt.save(1, meta, data_state={})
    ckpt.close()
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read() or "a small text for a small tokenizer\n" * 50
    text += open(os.path.join(ROOT, "stackwise_jax", "model.py")).read()
    data.build_tokenizer(config.defaults().data, [text], cfg.model.vocab_size).save(
        os.path.join(run_dir, "tokenizer"))
    n = sum(x.size for x in jax.tree.leaves(abstract))
    per_layer = sum(x.size for x in jax.tree.leaves(abstract["stacks"][0])) // args.blocks_per_stack
    largest = max(x.size for x in jax.tree.leaves(abstract))
    return {"params": n, "fp32_bytes": 4 * n, "layer_fp32_bytes": 4 * per_layer,
            "embed_fp32_bytes": 4 * args.vocab_size * args.d_model,
            "largest_array_fp32_bytes": 4 * largest,
            "n_layers": args.n_stacks * args.blocks_per_stack}


def child(mode: str, run_dir: str, out_dir: str, dtype: str) -> None:
    """Runs in a fresh process; prints one JSON line."""
    # Everything the exporter imports, up front: the floor is what a process pays before it
    # touches a weight (LlamaConfig pulls in torch: ~270 MiB of the floor).
    import export.hf  # noqa: F401
    from stackwise_jax import run as run_lib  # noqa: F401
    from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast  # noqa: F401

    result = {"mode": mode, "rss_after_import_mb": _rss_mb(), "peak_after_import_mb": _peak_mb()}
    t = time.perf_counter()
    if mode == "export":
        export.hf.export_run(run_dir, out_dir, dtype=dtype, overwrite=True, progress=False)
    elif mode == "load_run":
        run_lib.load_run(run_dir, require_finished=True)
    result.update(peak_mb=_peak_mb(), seconds=round(time.perf_counter() - t, 1))
    print(json.dumps(result))


def _spawn(mode: str, run_dir: str, out_dir: str, dtype: str, args=None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--_child={mode}", f"--_run={run_dir}",
           f"--_out={out_dir}", f"--dtype={dtype}"]
    if args is not None:
        cmd += [f"--{k}={getattr(args, k)}" for k in SHAPE_KEYS]
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scratch", default="/tmp/stackwise_export_memory",
                   help="directory for the run and the export (deleted at the end)")
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--d_model", type=int, default=1024)
    p.add_argument("--d_ff", type=int, default=4096)
    p.add_argument("--n_heads", type=int, default=16)
    p.add_argument("--n_kv_heads", type=int, default=8)
    p.add_argument("--n_stacks", type=int, default=8)
    p.add_argument("--blocks_per_stack", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--json_out", help="also write the results here")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_run", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child == "make":
        print(json.dumps(make_run(args, args._run)))
        return
    if args._child:
        child(args._child, args._run, args._out, args.dtype)
        return

    run_dir, out_dir = os.path.join(args.scratch, "run"), os.path.join(args.scratch, "hf")
    shutil.rmtree(args.scratch, ignore_errors=True)
    os.makedirs(args.scratch)
    try:
        print(f"building a finished run in {run_dir} ...", flush=True)
        sizes = _spawn("make", run_dir, out_dir, args.dtype, args)
        results = {m: _spawn(m, run_dir, out_dir, args.dtype)
                   for m in ("import", "export", "load_run")}
        out_bytes = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir)
                        if f.endswith(".safetensors"))
    finally:
        if not args.keep:
            shutil.rmtree(args.scratch, ignore_errors=True)
    floor = results["import"]["rss_after_import_mb"]
    gb, mb = 1e9, 2**20
    report = {"shape": {k: getattr(args, k) for k in SHAPE_KEYS},
              "dtype": args.dtype, **sizes, "safetensors_bytes": out_bytes, "results": results,
              "export_above_imports_mb": results["export"]["peak_mb"] - floor,
              "largest_array_mb": sizes["largest_array_fp32_bytes"] / mb}
    print(f"\nmodel: {sizes['params'] / 1e6:.0f}M params, {sizes['fp32_bytes'] / gb:.2f} GB fp32, "
          f"{sizes['n_layers']} layers of {sizes['layer_fp32_bytes'] / mb:.0f} MiB, embedding "
          f"{sizes['embed_fp32_bytes'] / mb:.0f} MiB; export {out_bytes / gb:.2f} GB {args.dtype}")
    print(f"{'process':<10}{'RSS after imports':>20}{'peak RSS':>12}{'above imports':>16}{'s':>7}")
    for mode, r in results.items():
        print(f"{mode:<10}{r['rss_after_import_mb']:>17.0f} MiB{r['peak_mb']:>8.0f} MiB"
              f"{r['peak_mb'] - r['rss_after_import_mb']:>12.0f} MiB{r['seconds']:>7}")
    ratio = report["export_above_imports_mb"] / report["largest_array_mb"]
    print(f"largest stored array (fp32): {report['largest_array_mb']:.0f} MiB; the export's peak "
          f"above imports is {ratio:.2f}x it")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
