"""Kernel (linear) attention against softmax GQA: forward+backward time and memory of one
layer as the sequence grows.

One Block (attention + SwiGLU MLP, d_model 256, 4 heads, 2 KV heads, batch 1) in float32;
the step is value_and_grad of sum(out^2) w.r.t. the layer's weights and its input. Per
length and attention: XLA's compiled buffers (arguments + outputs + temporaries, the
executable's own peak), compile time, and the best wall time of `--reps` runs. Softmax
GQA runs unchunked (all L x L scores) and chunked (model.attention_chunk_size queries at
a time, rematerialised: exact, (C, L) scores per head at once); a variant whose buffers
exceed --max_gib is compiled but not run.

    python scripts/bench_attention.py --out=docs/attention_benchmark.json

--cache_table prints instead, from the shapes alone (nothing runs), the bytes per token of
a generation cache for configs/llama70b.py with GQA and with MLA (--mla=q_lora,kv_lora,
qk_nope,qk_rope,v), and each attention's parameters per layer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

from stackwise_jax import config, model
from stackwise_jax.checkpoint import atomic_write_text

VARIANTS = {  # name: (model.attention, attention_chunk_size, mode)
    "gqa": ("gqa", 0, "bidirectional"),
    "gqa_chunked": ("gqa", 512, "bidirectional"),
    "linear": ("linear", 0, "bidirectional"),
    "linear_causal": ("linear", 0, "causal"),
    "gqa_causal": ("gqa", 512, "causal"),
}


def layer_step(variant: str, L: int, d_model: int, chunk: int):
    attention, chunk_size, mode = VARIANTS[variant]
    m = config.defaults().model
    m.attention, m.d_model, m.n_heads, m.n_kv_heads, m.d_ff = attention, d_model, 4, 2, 3 * d_model
    m.attention_chunk_size = chunk_size if chunk_size < L else 0
    m.linear.chunk_size = chunk
    block = model.Block(m, nnx.Rngs(0))
    graphdef, params = nnx.split(block)
    cos, sin = model.rope_tables(m, L)

    def loss(params, x):
        out = nnx.merge(graphdef, params)(x, cos, sin, mode == "causal")
        return jnp.sum(out.astype(jnp.float32) ** 2)

    x = jax.random.normal(jax.random.key(0), (1, L, d_model), jnp.float32)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params, x


def measure(variant: str, L: int, args) -> dict:
    step, params, x = layer_step(variant, L, args.d_model, args.linear_chunk)
    t0 = time.perf_counter()
    compiled = step.lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    row = {"variant": variant, "L": L, "xla_peak_bytes": int(peak),
           "xla_temp_bytes": int(mem.temp_size_in_bytes), "compile_s": round(compile_s, 2)}
    if peak > args.max_gib * 2**30:
        row["fwd_bwd_s"] = None  # does not fit the budget this shared machine allows
        return row
    times = []
    for _ in range(args.reps if L < 8192 else 1):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - t0)
    row["fwd_bwd_s"] = round(min(times), 4)
    return row


def table(rows: list[dict], variants: list[str]) -> str:
    by = {(r["variant"], r["L"]): r for r in rows}
    lengths = sorted({r["L"] for r in rows})
    head = "| L | " + " | ".join(f"{v} s | {v} MiB" for v in variants) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(variants))]
    for L in lengths:
        cells = []
        for v in variants:
            r = by.get((v, L))
            if r is None:
                cells += ["", ""]
                continue
            t = "not run" if r["fwd_bwd_s"] is None else f"{r['fwd_bwd_s']:.3f}"
            cells += [t, f"{r['xla_peak_bytes'] / 2**20:.0f}"]
        lines.append(f"| {L} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cache_table(mla: str, dtype_bytes: int = 2) -> str:
    """GQA vs MLA cache bytes per token (all layers) and attention parameters per layer."""
    import importlib.util

    from stackwise_jax import attention

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("llama70b", os.path.join(root, "configs",
                                                                           "llama70b.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    m = cfg.model
    layers = m.architecture.n_stacks * m.architecture.blocks_per_stack
    lines = ["| attention | numbers / token / layer | bytes / token (80 layers, bf16) | "
             "attention params / layer |", "|---|---|---|---|"]
    for kind in ("gqa", "mla"):
        m.attention = kind
        if kind == "mla":
            for key, v in zip(attention.MLA_KEYS, mla.split(",")):
                m.mla[key] = int(v)
        config.validate(cfg)
        abstract = nnx.eval_shape(lambda: model.Block(m, nnx.Rngs(0)))
        attn = sum(x.size for x in jax.tree.leaves(nnx.state(abstract.attn, nnx.Param)))
        n = attention.cache_numbers_per_token(m)
        what = (f"mla {mla}" if kind == "mla" else
                f"gqa {m.n_kv_heads} KV heads x {m.d_model // m.n_heads}")
        lines.append(f"| {what} | {n:,} | {n * layers * dtype_bytes:,} | {attn:,} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--variants", default="gqa,gqa_chunked,linear,linear_causal")
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--linear_chunk", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max_gib", type=float, default=6.0,
                   help="compile but do not run a variant whose XLA buffers exceed this")
    p.add_argument("--out", default="")
    p.add_argument("--cache_table", action="store_true")
    p.add_argument("--mla", default="1536,512,128,64,128",
                   help="q_lora_rank,kv_lora_rank,qk_nope_head_dim,qk_rope_head_dim,v_head_dim")
    args = p.parse_args()
    if args.cache_table:
        print(cache_table(args.mla))
        return
    variants = args.variants.split(",")
    rows = []
    for L in [int(s) for s in args.lengths.split(",")]:
        for v in variants:
            rows.append(measure(v, L, args))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows, variants))
    if args.out:
        result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": "python scripts/bench_attention.py " + " ".join(
                      f"--{k}={v}" for k, v in vars(args).items()
                      if k not in ("out", "cache_table", "mla")),
                  "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                              "jax": jax.__version__, "device": str(jax.devices()[0])},
                  "setup": {"batch": 1, "layers": 1, "d_model": args.d_model, "n_heads": 4,
                            "n_kv_heads": 2, "dtype": "float32"},
                  "rows": rows}
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
