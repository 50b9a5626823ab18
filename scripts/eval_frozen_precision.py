"""Held-out loss of a trained run with its frozen trunk stored in fp32, bf16, fp8 or nf4.

The trunk is every stack but the last (what the last stage keeps frozen); each of its
stacks is read from the run's stores (run.RunParams), quantised with the functions
training stores it with (quant.quantize_tree) and dequantised to float32
(quant.dequantize_tree). The run is then scored as its own evaluation scores it
(evaluate.Evaluator: stack by stack, in the run's compute dtype, on the run's held-out text
with the same fixed masks as summary.json), through a copy of its stores in a temporary
directory in which only the trunk stacks are replaced: the other groups are links to the
run's own, so nothing of the run is written. The fp32 row is therefore the run's stored
weights, and matches summary.json's heldout_loss when the run's evaluation format
(phases.eval_format: its training.progressive.frozen_precision) is fp32.

    python scripts/eval_frozen_precision.py --workdir=runs/tiny_progressive
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from absl import logging


def _copy_of_stores(workdir: str, tmp: str, params, trunk_groups: set, fmt: str) -> None:
    """tmp/params: the run's stores, the groups in trunk_groups through `fmt` and back."""
    import jax
    import jax.numpy as jnp

    from stackwise_jax import quant, store

    os.makedirs(store.root(tmp), exist_ok=True)
    for group in params.groups():
        version = store.newest(workdir, group, params.bound)
        if version is None:  # the run holds it nowhere: RunParams says why
            store.require(workdir, group, params.bound, "this evaluation")
        if fmt == "fp32" or group not in trunk_groups:
            os.symlink(os.path.abspath(os.path.join(store.root(workdir), group)),
                       os.path.join(store.root(tmp), group))
            continue
        tree = jax.tree.map(jnp.asarray, params.tree(group))  # float32, one stack
        tree = quant.dequantize_tree(quant.quantize_tree(tree, fmt), jnp.float32)
        store.write(tmp, group, version, tree, "fp32")
        del tree


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a finished run directory")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    logging.set_verbosity(logging.WARNING)

    from stackwise_jax import data, evaluate, phases, store
    from stackwise_jax.config import FROZEN_PRECISIONS
    from stackwise_jax.errors import UserError
    from stackwise_jax.run import RunParams

    try:
        params = RunParams(args.workdir)
        if not params.finished:
            raise UserError(f"'{args.workdir}' has not finished training (latest checkpoint: "
                            f"phase {params.meta['stage']}, step {params.meta['step']}); rerun "
                            "the train command to finish it")
        cfg = params.cfg
        prepared = data.prepare(cfg, args.workdir)  # reuses the run's tokenizer
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    heldout = data.heldout_batches(prepared.heldout_rows, cfg.data.batch_size, cfg.eval.batches)
    mask_id = prepared.tokenizer.mask_id
    n = cfg.model.architecture.n_stacks
    trunk_groups = {store.stack_group(k) for k in range(n - 1)}
    # Stacks as stored (this script applies the trunk's format itself): evaluation format fp32.
    eval_cfg = cfg.copy_and_resolve_references()
    eval_cfg.training.progressive.frozen_precision = "fp32"
    assert phases.eval_format(eval_cfg) == "fp32"

    results = {}
    for fmt in FROZEN_PRECISIONS:
        with tempfile.TemporaryDirectory(prefix=f"eval_{fmt}_") as tmp:
            _copy_of_stores(args.workdir, tmp, params, trunk_groups, fmt)
            losses = evaluate.Evaluator(eval_cfg, tmp, heldout, mask_id).losses(
                n, params.bound, ratios=cfg.eval.mask_ratios)
        results[fmt] = {str(t): losses[str(t)] for t in cfg.eval.mask_ratios}
    ratios = list(results["fp32"])
    print(f"trunk = stacks 0..{n - 2} of {n}; held-out masked-diffusion loss (nats/token)")
    print("| trunk storage | " + " | ".join(f"t = {t}" for t in ratios) + " | vs bf16 |")
    print("|---|" + "---|" * (len(ratios) + 1))
    for fmt, losses in results.items():
        diff = ", ".join(f"{losses[t] - results['bf16'][t]:+.4f}" for t in ratios)
        print(f"| {fmt} | " + " | ".join(f"{losses[t]:.4f}" for t in ratios) + f" | {diff} |")
    summary_path = os.path.join(args.workdir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        stored = summary.get("heldout_loss", {})
        common = [t for t in ratios if t in stored]
        if common:
            gap = max(abs(results["fp32"][t] - stored[t]) for t in common)
            print(f"fp32 row vs summary.json heldout_loss (evaluated in "
                  f"{summary.get('eval_format', 'fp32')}): max |difference| {gap:.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
