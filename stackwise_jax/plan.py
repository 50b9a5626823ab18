"""Memory planner: does each phase of a run fit on the device, before anything is allocated?

    python -m stackwise_jax.plan --config=configs/llama70b.py [--device_memory=141GiB]
        [--json=plan.json] [--config.KEY=VALUE ...]

Each phase's real train step is lowered and compiled on abstract shapes (ShapeDtypeStruct;
nothing is allocated), and XLA's memory_analysis gives its arguments, outputs and
temporaries. Phases: the last stage training from cached inputs, and the last stage with
the frozen trunk resident in each storage dtype. The CPU compiler's buffer assignment is
not a GPU's (it keeps full attention score matrices, for one): read totals as estimates.

`preflight(cfg, budget)` checks only the phase the run will execute (phases_for_run) and
raises UserError with the overrides that would make it fit; `device_memory_bytes()` gives
the accelerator's limit for it (None on CPU, where the check is skipped).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from stackwise_jax import cache, fusion, objective, stages
from stackwise_jax.optim import make_optimizer
from stackwise_jax.step import make_loss_fn, make_train_step
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


def _stack_forward_flops(cfg) -> float:
    """Matmul FLOPs per token of one stack's forward: weights, plus attention's QK and PV."""
    from stackwise_jax.model import param_counts

    m = cfg.model
    return (2 * param_counts(m)["stack_0"]
            + 4 * cfg.data.seq_len * m.d_model * m.architecture.blocks_per_stack)


def model_flops_per_token(cfg, plan: stages.StagePlan, trunk_runs: bool) -> float:
    """Matmul FLOPs per token of one step: a trained part costs 3 forwards (forward, input
    and weight gradients), the frozen trunk 1, a frozen head 2 (its input gradient). Remat's
    recomputation is not counted (model FLOPs, as MFU defines them). XLA:CPU's own
    cost_analysis counts a scan body once, so it cannot be used for scanned code."""
    m = cfg.model
    stack_fwd = _stack_forward_flops(cfg)
    trained = plan.n_stacks_run - plan.first_trainable_stack
    frozen = plan.first_trainable_stack if trunk_runs else 0
    head_fwd = 2 * m.vocab_size * m.d_model
    return 3 * trained * stack_fwd + frozen * stack_fwd + (3 if plan.train_head else 2) * head_fwd


def fusion_flops_per_token(cfg) -> float:
    """Fusion merges each adapter into its kernel inside the block, so the backward pass
    forms full weight gradients: 3 forwards per stack (the adapters' own matmuls are
    negligible at rank << d_model), 2 for the frozen head (its input gradient)."""
    m = cfg.model
    return 3 * m.architecture.n_stacks * _stack_forward_flops(cfg) + 2 * 2 * m.vocab_size * m.d_model


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


CACHED = "cached"  # phase key of the last stage trained from the activation cache
FIRST = "stage0"  # the first stage: it may train the embedding as well as stack 0 and head
FUSION = "fusion"  # adapters on every stack over the base in fusion.base_precision


def _cache_possible(cfg) -> bool:
    p = cfg.training.progressive
    return p.enabled and p.trunk_strategy == "frozen" and config_lib.n_stages(cfg) > 1


def all_phases(cfg) -> list[str]:
    """Phase keys the planner table shows: the first stage (when there are several), the
    last stage from the cache (when a frozen trunk makes it possible), the last stage with
    the trunk resident in each storage format of config_lib.FROZEN_PRECISIONS, and fusion."""
    first = [FIRST] if config_lib.n_stages(cfg) > 1 else []
    cached = [CACHED] if _cache_possible(cfg) else []
    return first + cached + list(config_lib.FROZEN_PRECISIONS) + [FUSION]


def phases_for_run(cfg) -> list[str]:
    """Phase keys as this config will run them: the first stage, the last stage (the
    largest trunk) from the activation cache when training.progressive.cache_activations
    is on and there is a trunk to cache, otherwise with the trunk resident in its
    configured frozen_precision, and fusion when training.fusion.steps > 0."""
    p = cfg.training.progressive
    last = [CACHED] if p.cache_activations and _cache_possible(cfg) else [p.frozen_precision]
    first = [FIRST] if config_lib.n_stages(cfg) > 1 else []
    return first + last + ([FUSION] if cfg.training.fusion.steps > 0 else [])


def plan(cfg, budget: int, phases: list[str] | None = None) -> dict:
    """Rows for the phases of the last stage (the largest), against `budget` bytes.

    `phases`: keys from all_phases(cfg) (CACHED or a frozen storage format), in the order
    wanted; None: all of them (the CLI's table)."""
    phases = all_phases(cfg) if phases is None else list(phases)
    unknown = [k for k in phases if k not in all_phases(cfg)]
    if unknown:
        raise ValueError(f"phases {unknown} not among {all_phases(cfg)} for this config")
    B, L, D = cfg.data.batch_size, cfg.data.seq_len, cfg.model.d_model
    stage = config_lib.n_stages(cfg) - 1
    tx = make_optimizer(cfg.training, config_lib.steps_in_stage(cfg))
    stage_plan = stages.plan_stage(cfg, stage)
    rows = {}

    if CACHED in phases:
        part = cache.cached_partition(cfg.model, stage_plan)
        trainable, frozen = part.split(_abstract(_params_like(cache.one_stack_config(cfg.model))))
        batch = {"hidden": jax.ShapeDtypeStruct((B, L, D), jnp.float32),
                 "targets": jax.ShapeDtypeStruct((B, L), jnp.int32),
                 "masked": jax.ShapeDtypeStruct((B, L), jnp.bool_),
                 "t": jax.ShapeDtypeStruct((B,), jnp.float32)}
        step = make_train_step(cache.make_cached_loss_fn(cfg, part), tx)
        rows[CACHED] = _analyze(f"stage {stage}, inputs from the activation cache", step,
                                trainable, _abstract(frozen, jnp.bfloat16),
                                jax.eval_shape(tx.init, trainable), batch,
                                model_flops_per_token(cfg, stage_plan, False), budget)

    template = nnx.eval_shape(lambda: Rack(cfg.model, nnx.Rngs(0)))
    ids = jax.ShapeDtypeStruct((B, L), jnp.int32)
    if FIRST in phases:
        first_plan = stages.plan_stage(cfg, 0)
        part = stages.Partition(template, first_plan)
        trainable, frozen = part.split(_abstract(_params_like(cfg.model)))
        mask_range = objective.stage_mask_range(cfg.training, 0, cfg.model.architecture.n_stacks)
        step = make_train_step(make_loss_fn(cfg, part, mask_range, 0), tx)
        stored = jax.eval_shape(lambda f: stages.store_frozen(f, "fp32", stages.compute_dtype(cfg)),
                                _abstract(frozen))
        rows[FIRST] = _analyze("stage 0, embedding and head train with stack 0"
                               if first_plan.train_embedding else "stage 0", step, trainable,
                               stored, jax.eval_shape(tx.init, trainable), ids,
                               model_flops_per_token(cfg, first_plan, True), budget)

    if FUSION in phases:
        f = cfg.training.fusion
        part = fusion.partition(template, cfg)
        frozen = jax.eval_shape(lambda p: fusion.store_base(part, p, cfg),
                                _abstract(_params_like(cfg.model)))
        adapters = jax.eval_shape(lambda tr: fusion.init_adapters(cfg, tr), frozen["trunk"])
        fusion_tx = make_optimizer(cfg.training, max(f.steps, 1), f.learning_rate)
        step = make_train_step(fusion.make_loss_fn(cfg, part, 0), fusion_tx)
        rows[FUSION] = _analyze(f"fusion, LoRA rank {f.lora_rank} on all "
                                f"{cfg.model.architecture.n_stacks} stacks over a "
                                f"{f.base_precision} base", step, adapters, frozen,
                                jax.eval_shape(fusion_tx.init, adapters), ids,
                                fusion_flops_per_token(cfg), budget)

    storages = [k for k in phases if k in config_lib.FROZEN_PRECISIONS]
    if storages:
        part = stages.Partition(template, stage_plan)
        trainable, frozen = part.split(_abstract(_params_like(cfg.model)))
        mask_range = objective.stage_mask_range(cfg.training, stage,
                                                cfg.model.architecture.n_stacks)
        step = make_train_step(make_loss_fn(cfg, part, mask_range, 0), tx)
        batch = jax.ShapeDtypeStruct((B, L), jnp.int32)
        for storage in storages:
            stored = jax.eval_shape(
                lambda f: stages.store_frozen(f, storage, stages.compute_dtype(cfg)),
                _abstract(frozen))
            rows[storage] = _analyze(f"stage {stage}, frozen trunk resident in {storage}", step,
                                     trainable, stored, jax.eval_shape(tx.init, trainable),
                                     batch, model_flops_per_token(cfg, stage_plan, True), budget)

    return {"device_memory_bytes": budget, "batch_size": B, "seq_len": L,
            "phases": [rows[k] for k in phases], "cache": cache.bytes_and_flops_per_token(cfg)}


# ------------------------------------------------------------------------------ preflight


def device_memory_bytes(device=None) -> int | None:
    """The accelerator's memory limit in bytes (memory_stats()["bytes_limit"]), or None
    where the backend does not report one (CPU), so the preflight check is skipped there."""
    try:
        device = jax.devices()[0] if device is None else device
        stats = device.memory_stats()
    except Exception:  # a backend without memory stats; never a reason to stop a run
        return None
    limit = stats.get("bytes_limit") if isinstance(stats, dict) else None
    return int(limit) if isinstance(limit, (int, float)) and limit > 0 else None


def _gib(n: int) -> str:
    """GiB as budgets are given; MiB or KiB for the small parts of small models."""
    if n == 0:
        return "0"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size / 10:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _size_arg(n: int) -> str:
    """`n` bytes as a --device_memory value that parse_bytes reads back."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if n % _UNITS[unit.upper()] == 0:
            return f"{n // _UNITS[unit.upper()]}{unit}"
    return f"{n}B"


def _chunk_for(seq_len: int) -> int | None:
    """A power-of-two chunk of at most a quarter of seq_len that divides it."""
    return next((c for c in (1024, 512, 256, 128, 64, 32, 16, 8)
                 if c <= seq_len // 4 and seq_len % c == 0), None)


def _valid_with(cfg, key: str, value) -> bool:
    """Whether the config still validates with key=value (a value another setting forbids
    is not advised)."""
    trial = copy.deepcopy(cfg)
    try:
        config_lib.set_override(trial, key, str(value))
        config_lib.validate(trial)
    except UserError:
        return False
    return True


def _advice(cfg, row: dict, phase: str) -> list[str]:
    """Ready-to-paste overrides that shrink `row` (phase key `phase`), the largest part of
    it first; knobs already at their saving value are left out."""
    m, d, t, p, f = cfg.model, cfg.data, cfg.training, cfg.training.progressive, cfg.training.fusion
    temps, frozen, opt = [], [], []
    if d.batch_size > 1:
        temps.append(("data.batch_size", d.batch_size // 2, d.batch_size,
                      "activations scale with it"))
    if d.seq_len > 1:
        temps.append(("data.seq_len", d.seq_len // 2, d.seq_len, "activations scale with it"))
    # Fusion backpropagates through every layer with its own remat setting.
    remat_key, remat = ("training.fusion.remat", f.remat) if phase == FUSION else ("model.remat", m.remat)
    if remat != "full":
        temps.append((remat_key, "full", remat, "recompute each block in backward"))
    chunk = _chunk_for(d.seq_len)
    if chunk and m.attention_chunk_size == 0:
        temps.append(("model.attention_chunk_size", chunk, 0,
                      "no full attention score matrices"))
    if chunk and t.loss_chunk_size == 0:
        temps.append(("training.loss_chunk_size", chunk, 0, "no full logits"))
    if p.new_stack_precision == "fp32":
        temps.append(("training.progressive.new_stack_precision", "bf16", "fp32",
                      "compute in bf16; master weights stay fp32"))
    if row["frozen_params_bytes"] >= 0.05 * row["total_bytes"]:  # it matters
        if phase == FUSION and f.base_precision != "nf4":
            frozen.append(("training.fusion.base_precision", "nf4", f.base_precision,
                           "4-bit frozen base"))
        if phase in config_lib.FROZEN_PRECISIONS and p.frozen_precision != "nf4":
            frozen.append(("training.progressive.frozen_precision", "nf4", p.frozen_precision,
                           "4-bit frozen trunk"))
        if phase in config_lib.FROZEN_PRECISIONS and not p.cache_activations \
                and _cache_possible(cfg):
            frozen.append(("training.progressive.cache_activations", True, False,
                           "train from cached trunk outputs; no trunk on the device"))
    if t.optimizer_state_dtype == "fp32":
        opt.append(("training.optimizer_state_dtype", "bf16", "fp32", "half the Adam moments"))
    groups = sorted([(row["xla_temp_bytes"], temps), (row["frozen_params_bytes"], frozen),
                     (row["optimizer_bytes"], opt)], key=lambda g: -g[0])
    out = []
    for _, knobs in groups:
        for key, value, now, why in knobs:
            if _valid_with(cfg, key, value):
                out.append(f"--config.{key}={value} (now {now}): {why}")
    return out


def preflight(cfg, budget_bytes: int) -> list[dict]:
    """Compiles the phase(s) this config will run (phases_for_run) on abstract shapes and
    checks them against `budget_bytes`. Returns the rows when all fit; otherwise raises
    UserError naming the phase, its breakdown and the config knobs that would shrink it."""
    phases = phases_for_run(cfg)
    rows = plan(cfg, budget_bytes, phases)["phases"]
    bad = [(phase, r) for phase, r in zip(phases, rows) if not r["fits"]]
    if not bad:
        return rows
    phase, r = max(bad, key=lambda pr: pr[1]["total_bytes"])
    lines = [f"memory preflight: '{r['phase']}' does not fit: it needs {_gib(r['total_bytes'])}"
             f" of a {_gib(budget_bytes)} budget (trainable parameters "
             f"{_gib(r['trainable_params_bytes'])}, frozen parameters "
             f"{_gib(r['frozen_params_bytes'])}, optimizer state {_gib(r['optimizer_bytes'])}, "
             f"XLA temporaries incl. gradients {_gib(r['xla_temp_bytes'])}, batch "
             f"{_gib(r['batch_bytes'])})."]
    advice = _advice(cfg, r, phase)
    if advice:
        lines.append("To make it fit, change one or more of (largest part first):")
        lines += [f"  {a}" for a in advice]
    else:
        lines.append("No memory knob is left to turn in this config: use a smaller model "
                     "(model.d_model, model.architecture.blocks_per_stack) or a larger device.")
    lines.append(f"See every phase: python -m stackwise_jax.plan "
                 f"--device_memory={_size_arg(budget_bytes)} --config=...")
    raise UserError("\n".join(lines))


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
