"""The fused nf4 kernel against dequantise-then-matmul at Llama-70B width, on a GPU.

Per projection of one configs/llama70b.py layer (q, k, v, o: d_model 8192, 64 heads, 8 KV
heads; gate, up, down: d_ff 28672) and for the whole layer forward (model.scan_blocks over
one nf4 block, as the frozen trunk runs it), fused vs plain: XLA's compiled buffers
(arguments + outputs + temporaries: the plain path's temporaries hold the dense bf16
kernel, the fused path's do not) and the best wall time of --reps runs, on --tokens tokens
in bfloat16. The nf4 weights are random codes and absmaxes (the kernel's speed does not
depend on their values). Prints a table and writes --out (JSON) with the device and date.

    python scripts/bench_nf4_kernel.py --out=docs/nf4_kernel_benchmark.json

Without a GPU the benchmark refuses; two checks run on any machine instead:
  --check   the kernel in Pallas interpret mode against the plain path on tiny shapes;
  --lower   lowers every 70B-width projection (forward and transposed) for CUDA through
            Pallas' Triton lowering and verifies the Triton IR; with the `triton` extra
            installed it also compiles that IR to PTX and a cubin for --arch and prints
            ptxas' registers, spills and the shared memory.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackwise_jax import model, quant
from stackwise_jax import nf4_matmul as nm
from stackwise_jax.checkpoint import atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama70b_model():
    spec = importlib.util.spec_from_file_location(
        "llama70b", os.path.join(ROOT, "configs", "llama70b.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().model


def projections(m) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one GQA layer."""
    D, F, E = m.d_model, m.d_ff, m.d_model // m.n_heads
    return {"q_proj": (D, m.n_heads * E), "k_proj": (D, m.n_kv_heads * E),
            "v_proj": (D, m.n_kv_heads * E), "o_proj": (m.n_heads * E, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def random_nf4(key, lead: tuple[int, ...], d_in: int, d_out: int) -> quant.QTensor:
    """Random codes and bf16 absmaxes in quant's nf4 layout (d_in * d_out % 64 == 0)."""
    n = d_in * d_out
    k1, k2 = jax.random.split(key)
    data = jax.random.randint(k1, lead + (n // 2,), 0, 256, jnp.int32).astype(jnp.uint8)
    absmax = jax.random.uniform(k2, lead + (n // quant.NF4_BLOCK,), minval=0.01, maxval=0.05)
    return quant.QTensor(data, quant._as_bits(absmax.astype(jnp.bfloat16)), "nf4", (d_in, d_out))


def measure(fn, args, reps: int) -> dict:
    """XLA's buffers of the compiled fn and its best wall time over reps runs."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {"xla_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                             + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
            "xla_temp_bytes": int(mem.temp_size_in_bytes), "compile_s": round(compile_s, 2),
            "best_s": min(times)}


def layer_forward(m, tokens: int):
    """fn(trunk, x) running one nf4 block of width m over (1, tokens, d_model), and its args."""
    block = nnx.eval_shape(lambda: model.Block(m, nnx.Rngs(0)))
    graphdef = nnx.graphdef(block)
    shapes = nnx.to_pure_dict(nnx.state(block))
    keys = iter(jax.random.split(jax.random.key(0), 64))

    def leaf(path, s):
        if path[-1].key == "kernel":
            return random_nf4(next(keys), (1,), *s.shape)
        return jnp.ones((1,) + s.shape, s.dtype)  # the norms' weights

    trunk = jax.tree_util.tree_map_with_path(leaf, shapes)
    cos, sin = model.rope_tables(m, tokens)
    x = jax.random.normal(jax.random.key(1), (1, tokens, m.d_model), jnp.bfloat16)
    return (lambda t, x: model.scan_blocks(graphdef, t, x, cos, sin, False)), (trunk, x)


def bench(args) -> list[dict]:
    m = llama70b_model()
    rows = []
    x_key = jax.random.key(2)
    tiles = dict(block_m=args.block_m, block_o=args.block_o, block_k=args.block_k)
    for i, (name, (d_in, d_out)) in enumerate(projections(m).items()):
        q = random_nf4(jax.random.key(10 + i), (), d_in, d_out)
        x = jax.random.normal(x_key, (args.tokens, d_in), jnp.bfloat16)
        for path in ("plain", "fused"):
            with nm.kernel_mode(path):
                r = measure(lambda x, q: nm.nf4_matmul(x, q, **tiles), (x, q), args.reps)
            rows.append({"what": name, "in": d_in, "out": d_out, "path": path, **r})
            print(row_line(rows[-1]), flush=True)
    m.attention_chunk_size = min(m.attention_chunk_size, args.tokens)
    fn, fn_args = layer_forward(m, args.tokens)
    for path in ("plain", "fused"):
        with nm.kernel_mode(path):
            r = measure(lambda t, x: fn(t, x), fn_args, args.reps)
        rows.append({"what": "layer forward", "in": m.d_model, "out": m.d_model, "path": path,
                     **r})
        print(row_line(rows[-1]), flush=True)
    return rows


def row_line(r: dict) -> str:
    return (f"| {r['what']} | {r['in']}x{r['out']} | {r['path']} | {r['best_s'] * 1e3:.3f} | "
            f"{r['xla_bytes'] / 2**20:.0f} | {r['xla_temp_bytes'] / 2**20:.0f} |")


TABLE_HEAD = ("| what | in x out | path | best ms | XLA buffers MiB | of which temporaries MiB |\n"
              "|---|---|---|---|---|---|")


def check() -> None:
    """Tiny shapes in interpret mode: the largest |fused - plain| in units of the bound
    tests/test_nf4_kernel.py derives (<= 1 passes)."""
    for (m_rows, d_in, d_out), dtype in [((37, 128, 192), jnp.bfloat16),
                                         ((10, 96, 128), jnp.float32)]:
        q = random_nf4(jax.random.key(d_in), (), d_in, d_out)
        x = jax.random.normal(jax.random.key(0), (m_rows, d_in)).astype(dtype)
        f = np.asarray(nm.nf4_matmul(x, q, fused=True, interpret=True, block_m=16), np.float64)
        p = np.asarray(nm.nf4_matmul_plain(x, q), np.float64)
        w = np.asarray(quant.dequantize(q, dtype).astype(jnp.float32), np.float64)
        s = np.abs(np.asarray(x.astype(jnp.float32), np.float64)) @ np.abs(w)
        u_d = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-24
        g = d_in * 2.0**-24 / (1 - d_in * 2.0**-24)
        bound = 2 * g * s + u_d * (np.abs(f) + np.abs(p)) / (1 - u_d)
        ratio = float(np.max(np.abs(f - p) / bound))
        print(f"x {m_rows}x{d_in} @ nf4 {d_in}x{d_out} {jnp.dtype(dtype).name}: "
              f"max |fused - plain| / bound = {ratio:.3f} ({'ok' if ratio <= 1 else 'FAIL'})")
        if ratio > 1:
            sys.exit(1)


def lower(args) -> None:
    """Triton IR of every projection's kernels (forward and transposed), verified; compiled
    to PTX for --arch when the `triton` package is installed."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    modules = []
    lower_module = registration.lowering.lower_jaxpr_to_triton_module

    def keep(*a, **k):  # the lowering's own result, kept to be verified and compiled
        result = lower_module(*a, **k)
        modules.append(result.module)
        return result

    registration.lowering.lower_jaxpr_to_triton_module = keep
    tiles = dict(block_m=args.block_m, block_o=args.block_o, block_k=args.block_k)
    try:
        for name, (d_in, d_out) in projections(llama70b_model()).items():
            q = jax.ShapeDtypeStruct((d_in * d_out // 2,), jnp.uint8)
            s = jax.ShapeDtypeStruct((d_in * d_out // quant.NF4_BLOCK,), jnp.uint16)
            x = jax.ShapeDtypeStruct((args.tokens, d_in), jnp.bfloat16)

            def loss(x, data, scale):
                qt = quant.QTensor(data, scale, "nf4", (d_in, d_out))
                return nm.nf4_matmul(x, qt, fused=True, **tiles).astype(jnp.float32).sum()

            n = len(modules)
            jax.jit(jax.grad(loss)).trace(x, q, s).lower(lowering_platforms=("cuda",))
            for kind, module in zip(("forward", "transposed"), modules[n:]):
                ok = module.operation.verify()
                print(f"{name} {d_in}x{d_out} {kind}: Triton IR verified: {ok}"
                      + compile_report(module, args.arch), flush=True)
                if not ok:
                    sys.exit(1)
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower_module


def compile_report(module, arch: int) -> str:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        return " (PTX not compiled: install the `triton` extra)"
    import glob
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ttir")
        with open(path, "w") as f:
            f.write(module.operation.get_asm())
        k = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": 4, "num_stages": 3})
        ptx = os.path.join(d, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        ptxas = glob.glob(os.path.join(os.path.dirname(triton.__file__),
                                       "backends", "nvidia", "bin", "ptxas"))
        info = ""
        if ptxas:
            gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
            r = subprocess.run([ptxas[0], "-v", "--gpu-name", gpu, ptx, "-o",
                                os.path.join(d, "kernel.cubin")], capture_output=True, text=True)
            info = "; ".join(line.split(":", 1)[-1].strip() for line in r.stderr.splitlines()
                             if "registers" in line or "spill" in line)
    return (f"; triton {triton.__version__} PTX for sm_{arch}: shared {k.metadata.shared} B, "
            f"{k.asm['ptx'].count('wgmma.mma_async')} wgmma, ptxas: {info}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--block_m", type=int, default=64)
    p.add_argument("--block_o", type=int, default=128)
    p.add_argument("--block_k", type=int, default=64)
    p.add_argument("--out", default=None, help="JSON file for the GPU benchmark's rows")
    p.add_argument("--check", action="store_true", help="tiny interpret-mode check (any machine)")
    p.add_argument("--lower", action="store_true",
                   help="lower (and, with triton installed, compile) the 70B-width kernels")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --lower")
    args = p.parse_args()
    if args.check or args.lower:
        if args.check:
            check()
        if args.lower:
            lower(args)
        return
    if jax.default_backend() != "gpu":
        sys.exit(f"bench_nf4_kernel: the benchmark needs a GPU (JAX's backend here is "
                 f"{jax.default_backend()!r}); on this machine run --check or --lower")
    print(TABLE_HEAD)
    rows = bench(args)
    if args.out:
        record = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
                  "host": platform.node(), "jax": jax.__version__, "tokens": args.tokens,
                  "tiles": [args.block_m, args.block_o, args.block_k], "rows": rows}
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
