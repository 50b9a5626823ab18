"""Per-device temporaries and collectives of a phase's train step on a device mesh.

Compiles the train step of a small model shaped like configs/llama70b.py (its layout and
memory levers, scaled down: d_model 512, 8 one-layer stacks, 8 x 64 tokens), by default
the end-to-end recipe's one phase, on one device and on each mesh given, as the planner
compiles it (plan.step_and_args: abstract arguments placed by the sharding rules), and
prints, per mesh: XLA's temporary bytes per device (memory_analysis of the partitioned
program), and every all-gather / all-reduce / reduce-scatter / all-to-all /
collective-permute of the compiled HLO with its result shape.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/fsdp_memory.py \\
        [--meshes 1,1,1 1,8,1 2,2,2] [--recipe=e2e] [--phase=KEY] [--json=out.json] \\
        [--hlo_dir=DIR] [--config.KEY=VALUE ...]

A mesh is data,fsdp,tensor (1,1,1: one device, no mesh). --config.KEY=VALUE overrides apply
on top of the small model (e.g. --config.model.remat=full). A collective inside a loop body
(the scan over layers) is listed once: it runs once per layer.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from stackwise_jax import config as config_lib, plan, plan_mesh, recipes, sharding  # noqa: E402
from stackwise_jax.errors import UserError  # noqa: E402

SMALL = {"model.vocab_size": "4096", "data.tokenizer": "bpe", "model.d_model": "512",
         "model.n_heads": "8", "model.n_kv_heads": "8", "model.d_ff": "2048",
         "model.architecture.n_stacks": "8", "data.seq_len": "64", "data.batch_size": "8",
         "training.grad_accum_steps": "1", "training.loss_chunk_size": "32",
         "model.attention_chunk_size": "0"}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")
# `%name = f32[8,64,512]{...} all-gather(` or a tuple-shaped result `(f32[..], ..) all-reduce(`
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def small_config(extra: dict[str, str], recipe: str = "e2e"):
    cfg = config_lib.load(os.path.join(ROOT, "configs", "llama70b.py"), {**SMALL, **extra})
    return recipes.apply(cfg, recipe)


def _shape(text: str) -> str:
    """A result shape without layouts or comments; a tuple's repeated elements counted."""
    text = re.sub(r"/\*.*?\*/|\{[^}]*\}", "", text).replace(" ", "")
    if not text.startswith("("):
        return text
    parts = re.findall(r"[a-z0-9]+\[[^\]]*\]", text)
    counted = collections.Counter(parts)
    return "(" + ", ".join(p if n == 1 else f"{n} x {p}" for p, n in counted.items()) + ")"


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{op: {result shape: count}} of the compiled (partitioned) HLO."""
    out: dict[str, collections.Counter] = {op: collections.Counter() for op in COLLECTIVES}
    for line in hlo.splitlines():
        m = _OP.search(line)
        if m:
            out[m.group(2)][_shape(m.group(1))] += 1
    return {op: dict(c) for op, c in out.items() if c}


def compile_step(cfg, sizes: dict | None, key: str | None = None):
    """The compiled step of planner phase `key` (default: the run's last phase), on one
    device (sizes None) or on the mesh {data, fsdp, tensor}, as the planner compiles it."""
    layout = None
    if sizes is not None:
        cfg = plan_mesh.with_mesh(cfg, sizes)
        layout = sharding.from_config(cfg, jax.devices()[:math.prod(sizes.values())])
    cfg, phase = plan.planned_phase(cfg, key or plan.phases_for_run(cfg)[-1])
    step, args = plan.step_and_args(cfg, phase, layout)
    return step.lower(*args).compile()


def mesh_sizes(text: str) -> dict | None:
    """'data,fsdp,tensor' -> sizes; '1,1,1' -> None (one device, no mesh)."""
    try:
        d, f, t = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected data,fsdp,tensor, e.g. 1,8,1")
    if min(d, f, t) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every axis must be a positive integer")
    return None if d * f * t == 1 else {"data": d, "fsdp": f, "tensor": t}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meshes", nargs="*", default=["1,1,1", "1,8,1"], type=str,
                    help="data,fsdp,tensor of each mesh; 1,1,1 is the plain one-device step")
    ap.add_argument("--recipe", default="e2e", help="recipes.py name applied to the model")
    ap.add_argument("--phase", default=None,
                    help="planner phase key (python -m stackwise_jax.plan names them; "
                         "default: the run's last phase)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--hlo_dir", default=None, help="write each compiled HLO here")
    args, rest = ap.parse_known_args()
    for text in args.meshes:
        try:
            mesh_sizes(text)
        except argparse.ArgumentTypeError as e:
            ap.error(f"--meshes: {e}")
    _, overrides = config_lib.split_overrides(rest)
    try:
        cfg = small_config(overrides, args.recipe)
    except UserError as e:
        sys.exit(str(e))
    result = {"config": {**SMALL, **overrides}, "recipe": args.recipe, "phase": args.phase,
              "meshes": {}}
    for name, sizes in zip(args.meshes, map(mesh_sizes, args.meshes)):
        n = 1 if sizes is None else math.prod(sizes.values())
        if n > jax.device_count():
            sys.exit(f"mesh {name} needs {n} devices: "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
        try:
            compiled = compile_step(cfg, sizes, args.phase)
        except UserError as e:
            sys.exit(f"mesh {name}: {e}")
        mem = compiled.memory_analysis()
        hlo = compiled.as_text()
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            with open(os.path.join(args.hlo_dir, f"mesh_{name.replace(',', '_')}.hlo"),
                      "w") as fh:
                fh.write(hlo)
        row = {"temp_bytes": int(mem.temp_size_in_bytes),
               "argument_bytes": int(mem.argument_size_in_bytes),
               "output_bytes": int(mem.output_size_in_bytes),
               "collectives": collectives(hlo)}
        result["meshes"][name] = row
        print(f"mesh data,fsdp,tensor = {name}: temp {row['temp_bytes'] / 2**20:.2f} MiB, "
              f"arguments {row['argument_bytes'] / 2**20:.2f} MiB", flush=True)
        for op, shapes in row["collectives"].items():
            print(f"  {op}: " + ", ".join(f"{n} x {s}" for s, n in sorted(shapes.items())))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
