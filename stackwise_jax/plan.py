"""Memory planner: does each phase of a run fit on the device, before anything is allocated?

    python -m stackwise_jax.plan --config=configs/llama70b.py [--device_memory=141GiB]
        [--json=plan.json] [--config.KEY=VALUE ...]

Each phase's real train step is lowered and compiled on abstract shapes (ShapeDtypeStruct;
nothing is allocated), and XLA's memory_analysis gives its arguments, outputs and
temporaries. Phases: the last stage training from cached inputs, and the last stage with
the frozen trunk resident in each storage dtype. The CPU compiler's buffer assignment is
not a GPU's (it keeps full attention score matrices, for one): read totals as estimates.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from stackwise_jax import cache, objective, stages
from stackwise_jax import config as config_lib
from stackwise_jax.errors import UserError
from stackwise_jax.model import Rack

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise UserError(f"--device_memory={text!r}: expected a size like 141GiB or 80GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _abstract(tree, dtype=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), tree)


def _params_like(model_cfg) -> dict:
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Rack(model_cfg, nnx.Rngs(0))),
                                      nnx.Param))


def model_flops_per_token(cfg, plan: stages.StagePlan, trunk_runs: bool) -> float:
    """Matmul FLOPs per token of one step: a trained part costs 3 forwards (forward, input
    and weight gradients), the frozen trunk 1, a frozen head 2 (its input gradient). Remat's
    recomputation is not counted (model FLOPs, as MFU defines them). XLA:CPU's own
    cost_analysis counts a scan body once, so it cannot be used for scanned code."""
    from stackwise_jax.model import param_counts

    m, L = cfg.model, cfg.data.seq_len
    stack_fwd = 2 * param_counts(m)["stack_0"] + 4 * L * m.d_model * m.architecture.blocks_per_stack
    trained = plan.n_stacks_run - plan.first_trainable_stack
    frozen = plan.first_trainable_stack if trunk_runs else 0
    head_fwd = 2 * m.vocab_size * m.d_model
    return 3 * trained * stack_fwd + frozen * stack_fwd + (3 if plan.train_head else 2) * head_fwd


def _analyze(name, step, trainable, frozen, opt_state, batch, flops, budget) -> dict:
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    compiled = step.lower(trainable, frozen, opt_state, batch, key).compile()
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
             + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    return {"phase": name, "trainable_params_bytes": _nbytes(trainable),
            "frozen_params_bytes": _nbytes(frozen), "optimizer_bytes": _nbytes(opt_state),
            "gradient_bytes": _nbytes(trainable), "batch_bytes": _nbytes(batch),
            "xla_temp_bytes": int(mem.temp_size_in_bytes), "total_bytes": int(total),
            "fits": total <= budget, "flops_per_token": flops}


def plan(cfg, budget: int) -> dict:
    """Rows for each phase of the last stage (the largest), against `budget` bytes."""
    from stackwise_jax import train  # the step builders

    B, L, D = cfg.data.batch_size, cfg.data.seq_len, cfg.model.d_model
    stage = config_lib.n_stages(cfg) - 1
    tx = train.make_optimizer(cfg.training, config_lib.steps_in_stage(cfg))
    rows = []

    stage_plan = stages.plan_stage(cfg, stage)
    if cfg.training.progressive.enabled and cfg.training.progressive.trunk_strategy == "frozen" \
            and stage >= 1:
        part = cache.cached_partition(cfg.model, stage_plan)
        trainable, frozen = part.split(_abstract(_params_like(cache.one_stack_config(cfg.model))))
        batch = {"hidden": jax.ShapeDtypeStruct((B, L, D), jnp.float32),
                 "targets": jax.ShapeDtypeStruct((B, L), jnp.int32),
                 "masked": jax.ShapeDtypeStruct((B, L), jnp.bool_),
                 "t": jax.ShapeDtypeStruct((B,), jnp.float32)}
        step = train.make_train_step(cache.make_cached_loss_fn(cfg, part), tx)
        rows.append(_analyze(f"stage {stage}, inputs from the activation cache", step, trainable,
                             _abstract(frozen, jnp.bfloat16), jax.eval_shape(tx.init, trainable),
                             batch, model_flops_per_token(cfg, stage_plan, False), budget))

    template = nnx.eval_shape(lambda: Rack(cfg.model, nnx.Rngs(0)))
    part = stages.Partition(template, stage_plan)
    trainable, frozen = part.split(_abstract(_params_like(cfg.model)))
    mask_range = objective.stage_mask_range(cfg.training, stage, cfg.model.architecture.n_stacks)
    step = train.make_train_step(train.make_loss_fn(cfg, part, mask_range, 0), tx)
    batch = jax.ShapeDtypeStruct((B, L), jnp.int32)
    for storage in config_lib.FROZEN_PRECISIONS:
        stored = jax.eval_shape(lambda f: stages.store_frozen(f, storage), _abstract(frozen))
        rows.append(_analyze(f"stage {stage}, frozen trunk resident in {storage}", step,
                             trainable, stored, jax.eval_shape(tx.init, trainable),
                             batch, model_flops_per_token(cfg, stage_plan, True), budget))

    return {"device_memory_bytes": budget, "batch_size": B, "seq_len": L, "phases": rows,
            "cache": cache.bytes_and_flops_per_token(cfg)}


def format_table(result: dict) -> str:
    gib = 2**30
    lines = [f"device memory budget: {result['device_memory_bytes'] / gib:.1f} GiB; "
             f"batch {result['batch_size']} x {result['seq_len']} tokens",
             "| phase | trainable | frozen | optimizer | gradients* | XLA temp | total | "
             "fits | model FLOPs/token |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["phases"]:
        lines.append(
            f"| {r['phase']} | {r['trainable_params_bytes'] / gib:.2f} | "
            f"{r['frozen_params_bytes'] / gib:.2f} | {r['optimizer_bytes'] / gib:.2f} | "
            f"{r['gradient_bytes'] / gib:.2f} | {r['xla_temp_bytes'] / gib:.2f} | "
            f"{r['total_bytes'] / gib:.2f} | {'FITS' if r['fits'] else 'DOES NOT FIT'} | "
            f"{r['flops_per_token']:.3g} |")
    c = result["cache"]
    lines.append(f"(GiB; *gradients live inside XLA temp) activation cache: "
                 f"{c['bytes_per_token']:.0f} bytes/token, one stack forward "
                 f"{c['stack_forward_flops_per_token']:.3g} FLOPs/token")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, overrides = config_lib.split_overrides(argv)
        ap = argparse.ArgumentParser(prog="python -m stackwise_jax.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--config", required=True)
        ap.add_argument("--device_memory", default="141GiB")
        ap.add_argument("--json", default=None, help="also write the table as JSON here")
        args = ap.parse_args(rest)
        cfg = config_lib.load(args.config, overrides)
        result = plan(cfg, parse_bytes(args.device_memory))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        from stackwise_jax.checkpoint import atomic_write_text
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0 if all(r["fits"] for r in result["phases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
