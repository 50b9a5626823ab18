"""Measured speed and memory of the stack step: one stack trained from cached inputs.

Runs the real jitted train step the trainer uses in cache mode (train.make_train_step over
cache.make_cached_loss_fn, one-stack Rack, partition of the last stage) on random real
parameters and batches, and reports compile time, median step time, tokens/s, model
TFLOP/s, MFU, the measured peak memory and the planner's estimate for the same shape.

    python scripts/bench_stack.py                       # 70b on a GPU, small on a CPU
    python scripts/bench_stack.py --shape=tiny,small --steps=3 --out=bench.json
    python scripts/bench_stack.py --shape=70b --remat=full --loss_chunk_size=512

Shapes (--shape, comma-separated; flags such as --d_model override every preset):
  70b     d_model 8192, d_ff 28672, 64 heads, 8 KV, vocab 128256, seq 4096 (Llama-3-70B)
  medium  d_model 2048, d_ff 7168, 16 heads, 2 KV, vocab 32000, seq 2048 (70B proportions)
  small   d_model 1024, d_ff 3584, 16 heads, 2 KV, vocab 32000, seq 1024
  tiny    d_model 256,  d_ff 896,  4 heads,  1 KV, vocab 4096,  seq 256
All have batch 1 and one block per stack, as configs/llama70b.py.

Each shape runs in its own subprocess, so its peak memory is its own: on a GPU the
allocator's peak_bytes_in_use, on a CPU the process's peak resident set (VmHWM: host RSS,
which includes the compiler and Python). The step is compiled ahead of time once
(lower + compile, reported as compile s), warmed up for 2 steps, then --steps steps are
timed, each waiting for all its outputs (jax.block_until_ready).

Model FLOPs are plan.model_flops_per_token (trained stack and head, 3 forwards each; remat
recomputation not counted). MFU is against --peak_tflops; by default the dense peak of the
device for the compute dtype (H100/H200: 989 bf16, 495 TF32), and on a CPU the best of a
few 2048x2048 matmuls in the compute dtype, measured here (so CPU MFU is relative to what
XLA:CPU's own matmul reaches on this machine, not to a datasheet).

"planner estimate" is what `python -m stackwise_jax.plan` reports for this step: XLA's
memory_analysis of the step compiled by the CPU compiler on these shapes (arguments +
temporaries + outputs - aliased). On a GPU the GPU compiler's own memory_analysis of the
step being run is reported next to it ("XLA est. here").

Any config key can be overridden as for the trainer: --config.training.learning_rate=1e-4.
The base config is configs/llama70b.py with training.progressive.cache_activations=True.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

GIB = 2**30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    "70b": dict(d_model=8192, d_ff=28672, n_heads=64, n_kv_heads=8, vocab=128256, seq_len=4096),
    "medium": dict(d_model=2048, d_ff=7168, n_heads=16, n_kv_heads=2, vocab=32000, seq_len=2048),
    "small": dict(d_model=1024, d_ff=3584, n_heads=16, n_kv_heads=2, vocab=32000, seq_len=1024),
    "tiny": dict(d_model=256, d_ff=896, n_heads=4, n_kv_heads=1, vocab=4096, seq_len=256),
}
SHAPE_KEYS = ("d_model", "d_ff", "n_heads", "n_kv_heads", "vocab", "seq_len", "batch", "blocks")
CONFIG_KEYS = {"d_model": "model.d_model", "d_ff": "model.d_ff", "n_heads": "model.n_heads",
               "n_kv_heads": "model.n_kv_heads", "vocab": "model.vocab_size",
               "seq_len": "data.seq_len", "batch": "data.batch_size",
               "blocks": "model.architecture.blocks_per_stack"}

# Dense peak TFLOP/s by (device kind substring, compute dtype); fp32 matmuls on these GPUs
# run as TF32 under JAX's default precision.
GPU_PEAKS = [("H200", {"bf16": 989.0, "fp32": 495.0}),
             ("H100", {"bf16": 989.0, "fp32": 495.0}),
             ("A100", {"bf16": 312.0, "fp32": 156.0})]


def shape_of(name: str, args) -> dict:
    if name not in PRESETS:
        raise SystemExit(f"--shape: unknown shape {name!r}; choose from {', '.join(PRESETS)}")
    s = dict(PRESETS[name], batch=1, blocks=1)
    for k in SHAPE_KEYS:
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    return s


# ------------------------------------------------------------------- device probe


def _measure_matmul_tflops(dtype_name: str, n: int = 2048, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    from stackwise_jax.stages import COMPUTE_DTYPES

    dtype = COMPUTE_DTYPES[dtype_name]
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def probe(precision: str) -> dict:
    """Backend, device kind and the peak TFLOP/s to measure MFU against."""
    import jax

    dev = jax.devices()[0]
    out = {"backend": jax.default_backend(), "device_kind": dev.device_kind,
           "n_devices": jax.device_count(), "jax": jax.__version__}
    if out["backend"] == "cpu":
        out["peak_tflops"] = _measure_matmul_tflops(precision)
        out["peak_source"] = (f"measured: best 2048^3 {precision} matmul on this CPU "
                              f"({os.cpu_count()} cores)")
        if precision != "fp32":
            out["cpu_fp32_matmul_tflops"] = _measure_matmul_tflops("fp32")
        return out
    for key, peaks in GPU_PEAKS:
        if key in dev.device_kind:
            out["peak_tflops"] = peaks[precision]
            out["peak_source"] = f"{key} dense {precision} datasheet peak"
            return out
    out["peak_tflops"], out["peak_source"] = None, f"unknown device {dev.device_kind!r}: pass --peak_tflops"
    return out


# ------------------------------------------------------------------- one shape


def _host_rss_bytes(field: str = "VmHWM") -> int | None:
    """VmHWM: peak resident set of this process so far; VmRSS: the current one."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _memory_total(compiled) -> dict:
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
             + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    return {"total_bytes": int(total), "argument_bytes": int(mem.argument_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes)}


def _cpu_planner_estimate(step, trainable, frozen, opt_state, batch) -> dict:
    """plan.py's number for this step: compiled by the CPU compiler on abstract shapes."""
    import jax

    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])

    def abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), tree)

    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=cpu)
    t0 = time.perf_counter()
    compiled = step.lower(abstract(trainable), abstract(frozen), abstract(opt_state),
                          abstract(batch), key).compile()
    return {**_memory_total(compiled), "compile_s": time.perf_counter() - t0}


def run_shape(name: str, shape: dict, args, peak_tflops) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from stackwise_jax import cache, config, plan, stages, train
    from stackwise_jax.model import Rack

    jax.devices()  # backend up: what the process holds before the step exists
    rss_start = _host_rss_bytes("VmRSS") if jax.default_backend() == "cpu" else None
    overrides = {CONFIG_KEYS[k]: str(v) for k, v in shape.items()}
    overrides.update({"training.progressive.cache_activations": "True",
                      "training.progressive.new_stack_precision": args.precision,
                      "model.remat": args.remat})
    # Chunk sizes: as given, else configs/llama70b.py's where they divide this seq_len.
    base = config.load(os.path.join(REPO, "configs", "llama70b.py"))
    seq_len = shape.get("seq_len", base.data.seq_len)
    for key, given, default in (
            ("training.loss_chunk_size", args.loss_chunk_size, base.training.loss_chunk_size),
            ("model.attention_chunk_size", args.attention_chunk_size,
             base.model.attention_chunk_size)):
        chunk = given if given is not None else (default if seq_len % default == 0 else 0)
        overrides[key] = str(chunk)
    overrides.update(args.config_overrides)
    cfg = config.load(os.path.join(REPO, "configs", "llama70b.py"), overrides)
    B, L, D = cfg.data.batch_size, cfg.data.seq_len, cfg.model.d_model
    stage_plan = stages.plan_stage(cfg, config.n_stages(cfg) - 1)
    partition = cache.cached_partition(cfg.model, stage_plan)

    rack = Rack(cache.one_stack_config(cfg.model), nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(rack, nnx.Param))
    del rack
    trainable, frozen = partition.split(params)
    del params
    tx = train.make_optimizer(cfg.training, 1000)
    opt_state = tx.init(trainable)
    step = train.make_train_step(cache.make_cached_loss_fn(cfg, partition), tx)

    kh, kt, km = jax.random.split(jax.random.key(1), 3)
    batch = {"hidden": jax.random.normal(kh, (B, L, D), jnp.float32),
             "targets": jax.random.randint(kt, (B, L), 0, cfg.model.vocab_size, jnp.int32),
             "masked": jax.random.bernoulli(km, 0.5, (B, L)),
             "t": jnp.full((B,), 0.5, jnp.float32)}
    key = jax.random.key(2)
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))

    t0 = time.perf_counter()
    compiled = step.lower(trainable, frozen, opt_state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    here = _memory_total(compiled)
    backend = jax.default_backend()
    if backend == "cpu":
        planner = dict(here, compile_s=0.0, note="same compile as the measured step")
    elif args.no_planner_estimate:
        planner = None
    else:
        try:
            planner = _cpu_planner_estimate(step, trainable, frozen, opt_state, batch)
        except Exception as e:  # report, keep the measurement
            planner = {"error": f"{type(e).__name__}: {e}"}

    losses, times = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        trainable, opt_state, loss = compiled(trainable, frozen, opt_state, batch,
                                              jax.random.fold_in(key, i))
        jax.block_until_ready((trainable, opt_state, loss))
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(dt)

    step_s = statistics.median(times)
    tokens = B * L
    flops_per_token = plan.model_flops_per_token(cfg, stage_plan, trunk_runs=False)
    tflops = flops_per_token * tokens / step_s / 1e12
    dev = jax.devices()[0]
    if backend == "cpu":
        peak_mem, mem_kind = _host_rss_bytes("VmHWM"), "host RSS (VmHWM)"
    else:
        stats = dev.memory_stats() or {}
        peak_mem, mem_kind = stats.get("peak_bytes_in_use"), "device peak_bytes_in_use"
    return {
        "shape": name, **shape, "precision": args.precision, "remat": args.remat,
        "loss_chunk_size": cfg.training.loss_chunk_size,
        "attention_chunk_size": cfg.model.attention_chunk_size,
        "optimizer_state_dtype": cfg.training.optimizer_state_dtype, "config_overrides": overrides,
        "backend": backend, "device_kind": dev.device_kind,
        "trainable_params": n_trainable, "tokens_per_step": tokens,
        "compile_s": compile_s, "step_times_s": times, "median_step_s": step_s,
        "tokens_per_s": tokens / step_s, "model_flops_per_token": flops_per_token,
        "model_tflops_per_s": tflops, "peak_tflops": peak_tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "peak_memory_bytes": peak_mem, "peak_memory_kind": mem_kind,
        "host_rss_at_start_bytes": rss_start,
        "xla_estimate_here": here, "planner_estimate": planner,
        "losses": losses, "loss_finite": all(np.isfinite(losses)),
    }


# ------------------------------------------------------------------- driver


def _fmt(x, spec, none="n/a"):
    return none if x is None else format(x, spec)


def table(rows: list[dict], info: dict, args) -> str:
    cpu = info["backend"] == "cpu"
    extra = " host RSS above start GiB |" if cpu else " XLA est. here GiB |"
    lines = [
        f"| shape | D / F / H / KV / V | B x L | trainable params | compile s | median step s | "
        f"tokens/s | model TFLOP/s | MFU | measured peak GiB ({'host RSS' if cpu else 'device'}) |"
        f"{extra} planner estimate GiB |", "|---" * 12 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | failed: {r['error']} |")
            continue
        pl = r["planner_estimate"] or {}
        line = (f"| {r['shape']} | {r['d_model']} / {r['d_ff']} / {r['n_heads']} / {r['n_kv_heads']}"
                f" / {r['vocab']} | {r['batch']} x {r['seq_len']} | {r['trainable_params'] / 1e6:.1f}M | "
                f"{r['compile_s']:.1f} | {r['median_step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                f"{r['model_tflops_per_s']:.3g} | "
                f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
                f"{_fmt(r['peak_memory_bytes'] and r['peak_memory_bytes'] / GIB, '.2f')} | ")
        if cpu:
            start, peak = r.get("host_rss_at_start_bytes"), r["peak_memory_bytes"]
            line += f"{_fmt(start and peak and (peak - start) / GIB, '.2f')} | "
        else:
            line += f"{r['xla_estimate_here']['total_bytes'] / GIB:.2f} | "
        line += f"{_fmt(pl.get('total_bytes') and pl['total_bytes'] / GIB, '.2f')} |"
        lines.append(line)
    notes = [f"device: {info['device_kind']} ({info['backend']}), jax {info['jax']}; "
             f"compute {args.precision}, remat {args.remat}, loss_chunk_size "
             f"{rows[0].get('loss_chunk_size', 'n/a')}, attention_chunk_size "
             f"{rows[0].get('attention_chunk_size', 'n/a')}, Adam moments "
             f"{rows[0].get('optimizer_state_dtype', 'n/a')}",
             f"MFU peak: {_fmt(info['peak_tflops'], '.3g')} TFLOP/s ({info['peak_source']})"]
    if "cpu_fp32_matmul_tflops" in info:
        notes.append(f"(fp32 2048^3 matmul on this CPU: {info['cpu_fp32_matmul_tflops']:.3g} TFLOP/s)")
    if cpu:
        notes.append("measured peak = the shape's process peak resident set (VmHWM), host RSS: "
                     "it includes Python, the JAX runtime, the XLA compiler and the parameters as "
                     "initialised; 'above start' subtracts the resident set once the backend was up")
    return "\n".join(lines + [""] + notes)


def _worker_argv(args, name: str, result_path: str, peak) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), f"--shape={name}", f"--_result={result_path}",
            f"--steps={args.steps}", f"--warmup={args.warmup}", f"--precision={args.precision}",
            f"--remat={args.remat}"]
    for flag in ("loss_chunk_size", "attention_chunk_size"):
        if getattr(args, flag) is not None:
            argv.append(f"--{flag}={getattr(args, flag)}")
    if peak is not None:
        argv.append(f"--peak_tflops={peak}")
    if args.no_planner_estimate:
        argv.append("--no_planner_estimate")
    for k in SHAPE_KEYS:
        if getattr(args, k) is not None:
            argv.append(f"--{k}={getattr(args, k)}")
    argv += [f"--config.{k}={v}" for k, v in args.config_overrides.items()]
    return argv


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, REPO)
    from stackwise_jax import config as config_lib
    from stackwise_jax.errors import UserError

    try:
        rest, config_overrides = config_lib.split_overrides(argv)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=None,
                    help="comma-separated presets: 70b, medium, small, tiny "
                         "(default: 70b on a GPU, small on a CPU)")
    for k in SHAPE_KEYS:
        ap.add_argument(f"--{k}", type=int, default=None, help=f"override the preset's {k}")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"),
                    help="training.progressive.new_stack_precision (compute dtype)")
    ap.add_argument("--remat", default="none", choices=("none", "full", "save_dots"))
    ap.add_argument("--loss_chunk_size", type=int, default=None,
                    help="training.loss_chunk_size (0: whole sequence; default: "
                         "configs/llama70b.py's where it divides the shape's seq_len, else 0)")
    ap.add_argument("--attention_chunk_size", type=int, default=None,
                    help="model.attention_chunk_size (0: all queries at once; default as above)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 GPU, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    ap.add_argument("--peak_tflops", type=float, default=None,
                    help="peak for MFU (default: H100/H200 989 bf16, 495 fp32; CPU: measured)")
    ap.add_argument("--no_planner_estimate", action="store_true",
                    help="on a GPU, skip the extra CPU-compiler compile for the planner column")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--_result", default=None, help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args(rest)
    args.config_overrides = config_overrides

    if args._result:  # one shape, in this process
        if args.steps is None:
            import jax
            args.steps = 3 if jax.default_backend() == "cpu" else 10
        try:
            row = run_shape(args.shape, shape_of(args.shape, args), args, args.peak_tflops)
        except Exception as e:  # noqa: BLE001  (reported in the parent's table)
            import traceback
            traceback.print_exc()
            row = {"shape": args.shape, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        with open(args._result, "w") as f:
            json.dump(row, f)
        return 0

    for n in args.shape.split(",") if args.shape else ():
        shape_of(n, args)  # unknown names fail before anything runs
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the 70B step needs most of an H100
    with tempfile.TemporaryDirectory(prefix="bench_stack_") as tmp:
        # Probe in a subprocess too: a GPU client in this process would hold device memory.
        probe_path = os.path.join(tmp, "probe.json")
        code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                f"import bench_stack as b; json.dump(b.probe({args.precision!r}), "
                f"open({probe_path!r}, 'w'))")
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        with open(probe_path) as f:
            info = json.load(f)
        if args.peak_tflops is not None:
            info["peak_tflops"], info["peak_source"] = args.peak_tflops, "--peak_tflops"
        if args.steps is None:
            args.steps = 3 if info["backend"] == "cpu" else 10
        names = (args.shape or ("small" if info["backend"] == "cpu" else "70b")).split(",")
        rows = []
        for n in names:
            path = os.path.join(tmp, f"{n}.json")
            print(f"--- {n}: {shape_of(n, args)}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(_worker_argv(args, n, path, info["peak_tflops"]), env=env)
            if os.path.exists(path):
                with open(path) as f:
                    row = json.load(f)
            else:
                row = {"shape": n, "error": f"worker exited with {proc.returncode} "
                                            "(killed for memory?)"}
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print(f"    {n}: {row.get('median_step_s', float('nan')):.3f} s/step "
                  f"({row['wall_s']:.0f} s wall)" if "error" not in row else f"    {n}: {row['error']}",
                  flush=True)

    text = table(rows, info, args)
    print(text)
    if args.out:
        out = {"date": time.strftime("%Y-%m-%d"), "command": " ".join([sys.argv[0]] + argv),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "device": info,
               "xla_python_client_mem_fraction": env.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
               "rows": rows, "table": text}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
