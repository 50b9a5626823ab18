"""Measured speed and memory of the stack step: the last stage's jitted train step.

Runs the step the trainer runs (step.build over phases.stage(cfg, last stage)): by default
one stack trained from cached inputs (training.progressive.cache_activations=True), or with
--trunk=FMT the same stage trained from tokens with the frozen trunk (every stack below it)
resident in FMT. Parameters are real arrays, born as the trainer births them
(resident.init_top / init_stack, on the host, then put on the device) and checked against
the shapes the trainer and planner use (resident.abstract_trainable / abstract_frozen); the
optimizer state is optim.init_state's. It reports compile time, median step time, tokens/s,
model TFLOP/s, MFU, the measured peak memory and the planner's estimate for the same step.

    python scripts/bench_stack.py                       # 70b on a GPU, small on a CPU
    python scripts/bench_stack.py --shape=tiny,small --steps=3 --out=bench.json
    python scripts/bench_stack.py --shape=70b --remat=full --loss_chunk_size=512
    python scripts/bench_stack.py --shape=70b --trunk=nf4   # 79 frozen layers resident in nf4

Shapes (--shape, comma-separated; flags such as --d_model override every preset):
  70b     d_model 8192, d_ff 28672, 64 heads, 8 KV, vocab 128256, seq 4096 (Llama-3-70B)
  medium  d_model 2048, d_ff 7168, 16 heads, 2 KV, vocab 32000, seq 2048 (70B proportions)
  small   d_model 1024, d_ff 3584, 16 heads, 2 KV, vocab 32000, seq 1024
  tiny    d_model 256,  d_ff 896,  4 heads,  1 KV, vocab 4096,  seq 256
All have batch 1, one micro-batch per step (--accum=1; configs/llama70b.py accumulates 64:
--accum=64 times a whole update) and one block per stack, as configs/llama70b.py, whose 80
stacks make the stage timed the 80th (--stacks changes that, and the trunk's depth).

Batches: from the cache, hidden states float32 normal, random targets, half the positions
masked, t = 0.5 (the rows the cache reader hands the step); from tokens, random ids (the
step draws the masks). With --trunk, the trunk's stacks are copies of one initialised stack
in the trunk's resident layout (quant.quantize_tree of its blocks, tiled on the block
axis): time and memory do not depend on the values, and a 79-layer 70B trunk is built in
seconds.

Each shape runs in its own subprocess, so its peak memory is its own: on a GPU the
allocator's peak_bytes_in_use, on a CPU the process's peak resident set (VmHWM: host RSS,
which includes the compiler and Python). The step is compiled ahead of time once
(lower + compile, reported as compile s), warmed up for 2 steps, then --steps steps are
timed, each waiting for all its outputs (jax.block_until_ready).

Model FLOPs are plan.flops_per_token (trained stack and head 3 forwards each, a frozen
trunk 1; remat recomputation not counted). MFU is against --peak_tflops; by default the
dense peak of the device for the compute dtype (H100/H200: 989 bf16, 495 TF32), and on a
CPU the best of a few 2048x2048 matmuls in the compute dtype, measured here (so CPU MFU is
relative to what XLA:CPU's own matmul reaches on this machine, not to a datasheet).

"planner estimate" is what `python -m stackwise_jax.plan` computes for this phase
(plan.analyze, the CPU compiler on abstract shapes): its step total (arguments +
temporaries + outputs - aliased); the JSON also has the planner row's total, which counts
the phase's other holds (cache build, evaluation). "XLA est. here" (on a GPU) is the GPU
compiler's own memory_analysis of the step being run.

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
SHAPE_KEYS = ("d_model", "d_ff", "n_heads", "n_kv_heads", "vocab", "seq_len", "batch", "accum",
              "blocks", "stacks")
CONFIG_KEYS = {"d_model": "model.d_model", "d_ff": "model.d_ff", "n_heads": "model.n_heads",
               "n_kv_heads": "model.n_kv_heads", "vocab": "model.vocab_size",
               "seq_len": "data.seq_len", "batch": "data.batch_size",
               "accum": "training.grad_accum_steps",
               "blocks": "model.architecture.blocks_per_stack",
               "stacks": "model.architecture.n_stacks"}
TRUNKS = ("cache", "fp32", "bf16", "fp8", "nf4")

# Dense peak TFLOP/s by (device kind substring, compute dtype); fp32 matmuls on these GPUs
# run as TF32 under JAX's default precision.
GPU_PEAKS = [("H200", {"bf16": 989.0, "fp32": 495.0}),
             ("H100", {"bf16": 989.0, "fp32": 495.0}),
             ("A100", {"bf16": 312.0, "fp32": 156.0})]


def shape_of(name: str, args) -> dict:
    if name not in PRESETS:
        raise SystemExit(f"--shape: unknown shape {name!r}; choose from {', '.join(PRESETS)}")
    s = dict(PRESETS[name], batch=1, accum=1, blocks=1)
    for k in SHAPE_KEYS:
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    return s


# ------------------------------------------------------------------- device probe


def _measure_matmul_tflops(dtype_name: str, n: int = 2048, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    from stackwise_jax.resident import COMPUTE_DTYPES

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


def _planner_estimate(cfg, key: str, phase) -> dict:
    """plan.py's row for this phase: the same step built by step.build and compiled by the
    CPU compiler on abstract shapes (forced onto the CPU on a GPU host, as the planner runs
    before renting one)."""
    import jax

    from stackwise_jax import plan

    planned_cfg, planned = plan.planned_phase(cfg, key)
    if planned != phase:  # the planner and this benchmark must time the same phase
        raise AssertionError(f"planner key {key!r} plans {planned}, the benchmark runs {phase}")
    t0 = time.perf_counter()
    with jax.default_device(jax.devices("cpu")[0]):
        row = plan.analyze(planned_cfg, key, budget=0, planned=(planned_cfg, planned))
    return {"total_bytes": row["step_total_bytes"], "row_total_bytes": row["total_bytes"],
            "xla_temp_bytes": row["xla_temp_bytes"], "holds": row["holds"],
            "compile_s": time.perf_counter() - t0}


def _same_shapes(what: str, real, abstract) -> None:
    """real must have abstract's tree structure, shapes and dtypes (what the trainer holds)."""
    import jax

    def sig(tree):
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, [(tuple(x.shape), str(x.dtype)) for x in leaves]

    if sig(real) != sig(abstract):
        raise AssertionError(f"{what}: the benchmark's arrays differ from the trainer's shapes\n"
                             f"  here:    {sig(real)}\n  trainer: {sig(abstract)}")


def _tiled_trunk(cfg, phase):
    """The frozen trunk in its resident layout (resident.assemble_trunk's: the stacks'
    blocks concatenated on the block axis, kernels quantised to trunk_format): one
    initialised stack, converted with quant.quantize_tree, tiled len(trunk_stacks) times."""
    import jax
    import jax.numpy as jnp

    from stackwise_jax import quant, resident

    blocks = resident.init_stack(cfg, phase.trunk_stacks[0])["blocks"]
    blocks = jax.tree.map(lambda x: x.astype(jnp.float32), blocks)
    piece = blocks if phase.trunk_format == "fp32" else quant.quantize_tree(blocks,
                                                                             phase.trunk_format)
    del blocks
    n = len(phase.trunk_stacks)
    return jax.tree.map(lambda x: jnp.concatenate([x] * n, axis=0) if n > 1 else x, piece)


def real_state(cfg, phase):
    """(trainable, frozen) of `phase` as real arrays on the default device. Born as the
    trainer births a group no phase has stored yet (resident.init_top / init_stack: the
    run's seed, float32 master weights; frozen top groups in the compute dtype), on the
    host, so the device holds only what the phase holds."""
    import jax

    from stackwise_jax import resident

    device, host = jax.devices()[0], jax.devices("cpu")[0]
    with jax.default_device(host):
        top = resident.init_top(cfg) if phase.train_top or phase.frozen_top else {}
        trainable = {g: top[g] for g in sorted(phase.train_top)}
        if phase.trained_stacks:
            trainable["stacks"] = {i: resident.init_stack(cfg, k)
                                   for i, k in enumerate(phase.trained_stacks)}
        dtype = resident.compute_dtype(cfg)
        frozen = {g: resident.cast_floats(top[g], dtype) for g in sorted(phase.frozen_top)
                  if g != "embed" or phase.needs_embedding}
        del top
    trainable = jax.device_put(trainable, device)
    frozen = jax.device_put(frozen, device)
    if phase.trunk_stacks:  # built on the device: a 70B trunk need not fit the host twice
        frozen["trunk"] = _tiled_trunk(cfg, phase)
    _same_shapes("trainable", trainable, resident.abstract_trainable(cfg, phase))
    _same_shapes("frozen", frozen, resident.abstract_frozen(cfg, phase))
    return trainable, frozen


def _batch(cfg, phase, mask_id: int):
    """What the trainer hands the step: token ids, or cache rows with hidden as float32."""
    import jax
    import jax.numpy as jnp

    R = cfg.data.batch_size * cfg.training.grad_accum_steps
    L, D = cfg.data.seq_len, cfg.model.d_model
    kh, kt, km, ki = jax.random.split(jax.random.key(1), 4)
    if phase.inputs == "tokens":
        return jax.random.randint(ki, (R, L), 0, mask_id, jnp.int32)
    masked = jax.random.bernoulli(km, 0.5, (R, L))
    targets = jax.random.randint(kt, (R, L), 0, mask_id, jnp.int32)
    return {"hidden": jax.random.normal(kh, (R, L, D), jnp.float32),
            "inputs": jnp.where(masked, mask_id, targets), "targets": targets,
            "masked": masked, "t": jnp.full((R,), 0.5, jnp.float32)}


def run_shape(name: str, shape: dict, args, peak_tflops) -> dict:
    import jax
    import numpy as np

    from stackwise_jax import config, optim, phases, plan, step as step_lib

    jax.devices()  # backend up: what the process holds before the step exists
    rss_start = _host_rss_bytes("VmRSS") if jax.default_backend() == "cpu" else None
    overrides = {CONFIG_KEYS[k]: str(v) for k, v in shape.items()}
    cached = args.trunk == "cache"
    # No text is read: 'bpe' lifts the llama3 tokenizer's floor of 128256 ids off the
    # smaller vocabularies.
    overrides.update({"data.tokenizer": "bpe",
                      "training.progressive.cache_activations": str(cached),
                      "training.progressive.new_stack_precision": args.precision,
                      "model.remat": args.remat})
    if not cached:
        overrides["training.progressive.frozen_precision"] = args.trunk
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
    phase = phases.stage(cfg, config.n_stages(cfg) - 1)
    planner_key = (plan.CACHED if phase.inputs == "cache"
                   else cfg.training.progressive.frozen_precision)
    mask_id = cfg.model.vocab_size - 1  # any id: the step only writes it where it masks

    tx = optim.make_optimizer(cfg.training, config.steps_in_stage(cfg))
    step, _ = step_lib.build(cfg, phase, tx, mask_id)
    trainable, frozen = real_state(cfg, phase)
    opt_state = optim.init_state(tx, trainable, cfg.training)
    batch = _batch(cfg, phase, mask_id)
    key = jax.random.key(2)
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))

    t0 = time.perf_counter()
    compiled = step.lower(trainable, frozen, opt_state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    here = _memory_total(compiled)
    backend = jax.default_backend()
    if backend != "cpu" and args.no_planner_estimate:
        planner = None
    else:
        try:
            planner = _planner_estimate(cfg, planner_key, phase)
        except Exception as e:  # noqa: BLE001  (report, keep the measurement)
            planner = {"error": f"{type(e).__name__}: {e}"}

    losses, finite, times = [], [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        trainable, opt_state, loss, ok = compiled(trainable, frozen, opt_state, batch,
                                                  jax.random.fold_in(key, i))
        jax.block_until_ready((trainable, opt_state, loss, ok))
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        finite.append(bool(ok))
        if i >= args.warmup:
            times.append(dt)

    step_s = statistics.median(times)
    tokens = cfg.data.batch_size * cfg.training.grad_accum_steps * cfg.data.seq_len
    flops_per_token = plan.flops_per_token(cfg, phase)
    tflops = flops_per_token * tokens / step_s / 1e12
    dev = jax.devices()[0]
    if backend == "cpu":
        peak_mem, mem_kind = _host_rss_bytes("VmHWM"), "host RSS (VmHWM)"
    else:
        stats = dev.memory_stats() or {}
        peak_mem, mem_kind = stats.get("peak_bytes_in_use"), "device peak_bytes_in_use"
    return {
        "shape": name, **shape, "precision": args.precision, "remat": args.remat,
        "phase": phase.describe(), "inputs": phase.inputs,
        "trunk": ({"stacks": len(phase.trunk_stacks), "format": phase.trunk_format}
                  if phase.trunk_stacks else None),
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
        "losses": losses, "steps_finite": finite,
        "loss_finite": all(np.isfinite(losses)) and all(finite),
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
        accum = f" x {r['accum']}" if r.get("accum", 1) != 1 else ""
        line = (f"| {r['shape']} | {r['d_model']} / {r['d_ff']} / {r['n_heads']} / {r['n_kv_heads']}"
                f" / {r['vocab']} | {r['batch']}{accum} x {r['seq_len']} | "
                f"{r['trainable_params'] / 1e6:.1f}M | "
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
    ok = [r for r in rows if "error" not in r]
    first = ok[0] if ok else {}
    notes = [f"device: {info['device_kind']} ({info['backend']}), jax {info['jax']}; "
             f"compute {args.precision}, remat {args.remat}, loss_chunk_size "
             f"{first.get('loss_chunk_size', 'n/a')}, attention_chunk_size "
             f"{first.get('attention_chunk_size', 'n/a')}, Adam moments "
             f"{first.get('optimizer_state_dtype', 'n/a')}",
             "step: " + ("; ".join(f"{r['shape']}: {r['phase']}" for r in ok) or "n/a"),
             f"MFU peak: {_fmt(info['peak_tflops'], '.3g')} TFLOP/s ({info['peak_source']})"]
    if "cpu_fp32_matmul_tflops" in info:
        notes.append(f"(fp32 2048^3 matmul on this CPU: {info['cpu_fp32_matmul_tflops']:.3g} TFLOP/s)")
    if cpu:
        notes.append("measured peak = the shape's process peak resident set (VmHWM), host RSS: "
                     "it includes Python, the JAX runtime, the XLA compiler and the parameters as "
                     "initialised; 'above start' subtracts the resident set once the backend was up")
    notes.append("planner estimate = plan.analyze's step total for this phase (CPU compiler)")
    return "\n".join(lines + [""] + notes)


def _worker_argv(args, name: str, result_path: str, peak) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), f"--shape={name}", f"--_result={result_path}",
            f"--steps={args.steps}", f"--warmup={args.warmup}", f"--precision={args.precision}",
            f"--remat={args.remat}", f"--trunk={args.trunk}"]
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
        ap.add_argument(f"--{k}", type=int, default=None,
                        help=f"override the preset's {k} ({CONFIG_KEYS[k]})")
    ap.add_argument("--trunk", default="cache", choices=TRUNKS,
                    help="cache: the last stage trains from the activation cache (no trunk); "
                         "fp32/bf16/fp8/nf4: from tokens, every stack below it frozen and "
                         "resident in that format (training.progressive.frozen_precision)")
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
                f"sys.path.insert(0, {REPO!r}); "
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
            print(f"--- {n}: {shape_of(n, args)}, trunk {args.trunk}", flush=True)
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
