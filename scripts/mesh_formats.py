"""Exactness of a mesh with the other paths a phase can take: a quantised frozen trunk, the
activation cache, gradient accumulation, LoRA fusion or block fusion.

tests/mesh_exactness.py covers the plain progressive run; this trains the same small config
with 3 stacks and the chosen variant on one device, on (data 2, fsdp 2, tensor 2) and on
(fsdp 8), and prints the held-out losses and the largest parameter difference from the
one-device run as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/mesh_formats.py \\
        [--variant=nf4_cache_lora|fp8_block] [--workdir=/tmp/mesh_formats] [--json=out.json]

nf4_cache_lora: frozen trunk in nf4, stages 2 and 3 from the activation cache, two
micro-batches per step, then 2 steps of LoRA fusion over an nf4 base. fp8_block: frozen
trunk in fp8, then block fusion (one 1-step turn per stack, over an fp8 base).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402

import mesh_exactness as mx  # noqa: E402
from conftest import small_config  # noqa: E402
from stackwise_jax import train  # noqa: E402

VARIANTS = {
    "nf4_cache_lora": {"training.progressive.frozen_precision": "nf4",
                       "training.progressive.cache_activations": True,
                       "training.grad_accum_steps": 2, "training.fusion.steps": 2,
                       "training.fusion.base_precision": "nf4"},
    "fp8_block": {"training.progressive.frozen_precision": "fp8", "training.fusion.mode": "block",
                  "training.fusion.steps": 3, "training.fusion.base_precision": "fp8"},
}
MESHES = {"one_device": (1, 1, 1), "data2_fsdp2_tensor2": (2, 2, 2), "fsdp8": (1, 8, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="nf4_cache_lora", choices=sorted(VARIANTS))
    ap.add_argument("--workdir", default="/tmp/mesh_formats")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    if jax.device_count() < 8:
        sys.exit("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    root = os.path.join(args.workdir, args.variant)
    shutil.rmtree(root, ignore_errors=True)
    mx.write_corpus(os.path.join(root, "corpus"))
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla_cache"))
    result = {"variant": args.variant, "losses": {}}
    for name, (d, f, t) in MESHES.items():
        cfg = small_config(os.path.join(root, "corpus"), **{
            "data.batch_size": 8, "training.steps_per_stage": mx.STEPS,
            "eval.mask_ratios": (0.5,), "model.architecture.n_stacks": 3,
            **VARIANTS[args.variant], "mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t})
        devices = jax.devices()[:d * f * t]
        summary = train.run(cfg, os.path.join(root, name), progress=False, devices=devices)
        result["losses"][name] = {"heldout_loss": summary["heldout_loss"]["0.5"],
                                  "heldout_causal_loss": summary["heldout_causal_loss"],
                                  "phase_losses": [s.get("heldout_loss_t0.5")
                                                   for s in summary["stages"]]}
    ref = result["losses"]["one_device"]
    flat = lambda r: [r["heldout_loss"], r["heldout_causal_loss"], *r["phase_losses"]]  # noqa: E731
    result["loss_max_abs_diff"] = {n: max(abs(a - b) for a, b in zip(flat(r), flat(ref)))
                                   for n, r in result["losses"].items() if n != "one_device"}
    last = 10**6  # the newest stored version of every group
    reference = mx.final_params(os.path.join(root, "one_device"), last)
    result["param_max_abs_diff"] = {
        n: mx.max_diff(reference, mx.final_params(os.path.join(root, n), last))
        for n in MESHES if n != "one_device"}
    result["param_max_abs"] = max(float(abs(v).max()) for v in reference.values())
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
