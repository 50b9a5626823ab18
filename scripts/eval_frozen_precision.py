"""Held-out loss of a trained run with its frozen trunk stored in fp32, bf16, fp8 or nf4.

The trunk is every stack but the last (what the last stage keeps frozen); it is quantised
with the functions training stores it with (stackwise_jax.quant), dequantised, and the whole Rack
is scored on the run's held-out text at fixed mask ratios.

    python scripts/eval_frozen_precision.py --workdir=runs/tiny_progressive
"""

from __future__ import annotations

import argparse
import json

from absl import logging
from flax import nnx


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a finished run directory")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    logging.set_verbosity(logging.WARNING)

    import jax.numpy as jnp

    from stackwise_jax import data, evaluate, quant, stages
    from stackwise_jax.config import FROZEN_PRECISIONS
    from stackwise_jax.run import load_run, rack_from_params

    loaded = load_run(args.workdir, require_finished=True)
    cfg = loaded.config
    prepared = data.prepare(cfg, args.workdir)  # reuses the run's tokenizer
    heldout = data.heldout_batches(prepared.heldout_rows, cfg.data.batch_size, cfg.eval.batches)
    params = nnx.to_pure_dict(nnx.state(loaded.rack, nnx.Param))
    n = cfg.model.architecture.n_stacks

    def stored(fmt):  # what the frozen forward computes with: each kernel through its format
        if fmt == "fp32":
            return params
        trunk = {k: quant.dequantize_tree(quant.quantize_tree(params["stacks"][k], fmt),
                                          jnp.float32) for k in range(n - 1)}
        return stages.merge_trees(params, {"stacks": trunk})

    results = {}
    for fmt in FROZEN_PRECISIONS:
        rack = rack_from_params(cfg.model, stored(fmt))
        results[fmt] = {str(t): evaluate.masked_diffusion_loss(rack, heldout, t, loaded.tokenizer.mask_id)
                        for t in cfg.eval.mask_ratios}
    ratios = list(results["fp32"])
    print(f"trunk = stacks 0..{n - 2} of {n}; held-out masked-diffusion loss (nats/token)")
    print("| trunk storage | " + " | ".join(f"t = {t}" for t in ratios) + " | vs bf16 |")
    print("|---|" + "---|" * (len(ratios) + 1))
    for fmt, losses in results.items():
        diff = ", ".join(f"{losses[t] - results['bf16'][t]:+.4f}" for t in ratios)
        print(f"| {fmt} | " + " | ".join(f"{losses[t]:.4f}" for t in ratios) + f" | {diff} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
