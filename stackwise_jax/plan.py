"""Planner: memory, disk and time of each phase of a run, before anything is allocated.

    python -m stackwise_jax.plan --config=configs/llama70b.py [--device_memory=141GiB]
        [--device=h100 --mfu=0.4] [--corpus_tokens=N] [--json=plan.json] [--phases=all|run]
        [--devices=N | --smallest_mesh --max_devices=N] [--config.KEY=VALUE ...]

Each planned phase is a phases.Phase, the same description the trainer runs. Its train
step is built by step.build and compiled on abstract shapes (ShapeDtypeStruct; nothing is
allocated); XLA's memory_analysis gives arguments, outputs and temporaries. Around the
step, the process holds other things at other moments, counted from the same shapes the
trainer allocates (resident.abstract_*):

- step: trainable parameters, optimizer state, frozen top groups, the trunk in its
  resident format, the batch;
- trunk assembly: the trunk (preallocated) plus one stored array on its way in;
- cache build (a stage from the cache): the stack (incremental) or the trunk (rebuild)
  the cache is built through, and a build batch;
- evaluation: the top groups, one stack in resident format, the held-out hidden states;
- fusion's merge: all of the step's, plus one merged stack in float32.

Block fusion (training.fusion.mode='block') is planned by its turn of stack 0, whose
gradients cross every other stack.

`non_temporary_bytes` is the largest of these (what measured `peak_live_bytes` in
summary.json checks, tests/test_plan.py); `total_bytes` adds the step's XLA temporaries.
The CPU compiler's buffer assignment is not a GPU's: read totals as estimates.

On a device mesh (--devices with the config's mesh.*, or the --smallest_mesh search;
plan_mesh.py), every byte is one device's: the step is compiled SPMD with the trainer's
shardings and each hold counts its arrays' shards.

`preflight(cfg, budget)` checks the phases the run will execute and raises UserError with
the overrides that would make it fit; `check_disk` refuses a run whose stores,
checkpoints and activation cache the disk cannot hold.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp

from stackwise_jax import cache, evaluate, fusion, phases as phases_lib, resident
from stackwise_jax import plan_mesh, step as step_lib
from stackwise_jax import config as config_lib
from stackwise_jax.checkpoint import disk_usage
from stackwise_jax.errors import UserError
from stackwise_jax.optim import init_state

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# Peak dense bf16 matmul throughput (FLOP/s) from the vendors' data sheets.
DEVICES = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12,
           "tpu-v4": 275e12, "tpu-v5e": 197e12, "tpu-v5p": 459e12, "tpu-v6e": 918e12}
CACHED = "cached"  # phase key of the last stage trained from the activation cache
FIRST = "stage0"  # the first stage: it may train the embedding as well as stack 0 and head
FUSION = "fusion"  # adapters on every stack over the base in fusion.base_precision
BLOCK = "block"  # block fusion's turn of stack 0: every other stack frozen above it
ALLOCATOR_FRACTION = "0.95"


def use_whole_accelerator() -> None:
    """JAX's GPU allocator preallocates 75% of the card by default (an 80 GB card offers
    about 60 GB); ask for 95% unless the user chose. Must run before a backend starts.
    The preflight budget is then the allocator's own bytes_limit."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", ALLOCATOR_FRACTION)


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise UserError(f"--device_memory={text!r}: expected a size like 141GiB or 80GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class _PerDevice:
    """Bytes one device holds of a tree: all of them without a mesh; on one (a
    sharding.Layout), each leaf's shard: parameters, optimizer state and trunks by the
    layout's rules, batches split by rows, as the trainer places them."""

    def __init__(self, layout=None):
        self.layout = layout

    def _shards(self, tree, shardings) -> list[int]:
        def one(x, s):
            return math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize

        return jax.tree.leaves(jax.tree.map(one, tree, shardings))

    def params(self, tree) -> int:
        if self.layout is None:
            return _nbytes(tree)
        return sum(self._shards(tree, self.layout.shardings(tree)))

    def largest_param(self, tree) -> int:
        """The largest leaf's bytes on one device."""
        if self.layout is None:
            return max(_nbytes(x) for x in jax.tree.leaves(tree))
        return max(self._shards(tree, self.layout.shardings(tree)))

    def rows(self, tree) -> int:
        if self.layout is None:
            return _nbytes(tree)
        return sum(self._shards(tree, self.row_shardings(tree)))

    def row_shardings(self, tree):
        return jax.tree.map(lambda x: self.layout.batch_sharding(x.shape[0] if x.ndim else 0,
                                                                 x.ndim), tree)

    def rows_of(self, n_rows: int) -> int:
        """Rows of an n_rows batch one device holds."""
        if self.layout is None:
            return n_rows
        return math.prod(self.layout.batch_sharding(n_rows, 1).shard_shape((n_rows,)))


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


# ------------------------------------------------------------------------------ FLOPs


def _stack_forward_flops(cfg) -> float:
    """Matmul FLOPs per token of one stack's forward: weights, plus attention's scores and
    weighted sums (QK and PV for softmax attention, the state for linear attention)."""
    from stackwise_jax.attention import score_flops_per_token

    m = cfg.model
    stack_params = sum(x.size for x in jax.tree.leaves(resident.abstract_stack(cfg)))
    return 2 * stack_params + (score_flops_per_token(m, cfg.data.seq_len)
                               * m.architecture.blocks_per_stack)


def flops_per_token(cfg, phase: phases_lib.Phase, stack_fwd: float | None = None) -> float:
    """Model FLOPs per trained token of one step of `phase`: what trains costs 3 forwards
    (forward, input and weight gradients), the frozen trunk 1 (3 when gradients cross it:
    a trained embedding below it, or fusion's adapters, whose merged kernels get full
    weight gradients), a frozen head 2 (its input gradient). Remat's recomputation is not
    counted (model FLOPs, as MFU defines them). XLA:CPU's cost_analysis counts a scan body
    once, so it cannot be used for scanned code."""
    m = cfg.model
    stack_fwd = _stack_forward_flops(cfg) if stack_fwd is None else stack_fwd
    trunk = len(phase.trunk_stacks) * stack_fwd * (1 if phase.stop_gradient else 3)
    trunk += len(phase.upper_stacks) * stack_fwd * 2  # forward and input gradients
    head_fwd = 2 * m.vocab_size * m.d_model
    head = (3 if "head" in phase.train_top or (m.tie_embeddings and "embed" in phase.train_top)
            else 2) * head_fwd
    return 3 * phase.n_local_stacks * stack_fwd + trunk + head


def tokens_per_step(cfg) -> int:
    return cfg.data.batch_size * cfg.training.grad_accum_steps * cfg.data.seq_len


def time_plan(cfg, device: str, mfu: float, corpus_tokens: int | None = None,
              n_devices: int = 1) -> dict:
    """Hours of every phase at `mfu` of `device`'s peak (on each of n_devices devices that
    share the work), and the run's total.

    Cache builds are counted too: per cached stage one stack forward per cached token
    (incremental) or k of them (a rebuild at stage k), over corpus_tokens x cache_views
    (corpus_tokens: the training split's tokens; default one stage's tokens)."""
    if device not in DEVICES:
        raise UserError(f"--device={device!r}: choose one of {', '.join(DEVICES)}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu={mfu}: a fraction of the device's peak in (0, 1]")
    rate = DEVICES[device] * mfu * n_devices
    p = cfg.training.progressive
    stack_fwd = _stack_forward_flops(cfg)
    corpus = corpus_tokens or config_lib.steps_in_stage(cfg) * tokens_per_step(cfg)
    rows = []
    for ph in phases_lib.all_phases(cfg):
        tokens = ph.n_steps * tokens_per_step(cfg)
        per_token = flops_per_token(cfg, ph, stack_fwd)
        flops = per_token * tokens
        if ph.inputs == "cache":
            incremental = cfg.training.mask_schedule_type == "uniform" and ph.index >= 2
            depth = 1 if incremental else ph.index
            flops += depth * stack_fwd * corpus * p.cache_views
        rows.append({"phase": ph.name, "flops_per_token": per_token, "tokens": tokens,
                     "hours": flops / rate / 3600})
    total = sum(r["hours"] for r in rows)
    return {"device": device, "peak_flops": DEVICES[device], "mfu": mfu, "phases": rows,
            "n_devices": n_devices, "total_hours": total, "total_days": total / 24}


# ------------------------------------------------------------------------- the phases


def _cache_possible(cfg) -> bool:
    p = cfg.training.progressive
    return p.enabled and p.trunk_strategy == "frozen" and config_lib.n_stages(cfg) > 1


def all_phases(cfg) -> list[str]:
    """Phase keys the planner table shows: the first stage (when there are several), the
    last stage from the cache (when a frozen trunk makes it possible), the last stage with
    the trunk resident in each storage format of config_lib.FROZEN_PRECISIONS, and fusion
    in the configured training.fusion.mode."""
    first = [FIRST] if config_lib.n_stages(cfg) > 1 else []
    cached = [CACHED] if _cache_possible(cfg) else []
    return first + cached + list(config_lib.FROZEN_PRECISIONS) + [_fusion_key(cfg)]


def _fusion_key(cfg) -> str:
    return BLOCK if cfg.training.fusion.mode == "block" else FUSION


def phases_for_run(cfg) -> list[str]:
    """Phase keys as this config will run them: the first stage, the last stage (the
    largest trunk) from the activation cache when training.progressive.cache_activations
    is on and there is a trunk to cache, otherwise with the trunk resident in its
    configured frozen_precision, and fusion when training.fusion.steps > 0."""
    p = cfg.training.progressive
    last = [CACHED] if p.cache_activations and _cache_possible(cfg) else [p.frozen_precision]
    first = [FIRST] if config_lib.n_stages(cfg) > 1 else []
    return first + last + ([_fusion_key(cfg)] if cfg.training.fusion.steps > 0 else [])


def _variant(cfg, **progressive):
    out = copy.deepcopy(cfg)
    for key, value in progressive.items():
        out.training.progressive[key] = value
    return out


def planned_phase(cfg, key: str):
    """(config, Phase) that a planner key stands for."""
    last = config_lib.n_stages(cfg) - 1
    if key == FIRST:
        return cfg, phases_lib.stage(cfg, 0)
    if key == CACHED:
        c = _variant(cfg, cache_activations=True)
        return c, phases_lib.stage(c, last)
    if key == FUSION:
        return cfg, phases_lib.fusion(_variant(cfg, cache_activations=False))
    if key == BLOCK:
        c = _variant(cfg, cache_activations=False)
        with c.training.fusion.unlocked():
            c.training.fusion.steps = max(c.training.fusion.steps,
                                          c.training.fusion.block_cycles
                                          * c.model.architecture.n_stacks)
        return c, phases_lib.block_turns(c)[0]
    c = _variant(cfg, cache_activations=False, frozen_precision=key)
    return c, phases_lib.stage(c, last)


def _batch_like(cfg, phase) -> object:
    R = cfg.data.batch_size * cfg.training.grad_accum_steps
    L, D = cfg.data.seq_len, cfg.model.d_model
    if phase.inputs == "tokens":
        return _sds((R, L), jnp.int32)
    # cache_store rows as the trainer puts them on the device: hidden decoded to float32
    return {"hidden": _sds((R, L, D), jnp.float32), "inputs": _sds((R, L), jnp.int32),
            "targets": _sds((R, L), jnp.int32), "masked": _sds((R, L), jnp.bool_),
            "t": _sds((R,), jnp.float32)}


def _largest_stored_leaf(cfg, count: _PerDevice) -> int:
    """A stored array on its way into the trunk, in the dense layout of its kernel."""
    item = 2 if cfg.training.progressive.stack_storage_dtype == "bf16" else 4
    return count.largest_param(resident.abstract_stack(cfg)["blocks"]) // 4 * item


def _eval_hold(cfg, phase, count: _PerDevice | None = None) -> int:
    """Top groups in the compute dtype, one stack in eval format, the held-out streams."""
    count = count or _PerDevice()
    dtype = jnp.dtype(resident.compute_dtype(cfg))
    top = count.params(resident.abstract_top(cfg)) // 4 * dtype.itemsize
    one_stack = count.params(resident.abstract_trunk(cfg, 1, phases_lib.eval_format(cfg)))
    B, L, D = count.rows_of(cfg.data.batch_size), cfg.data.seq_len, cfg.model.d_model
    per_stream = B * L * D * dtype.itemsize + B * L * (4 + 4 + 1) + B * 4
    streams = evaluate.batches_held(cfg) * (1 + (1 if phase.adapters else 0))
    return top + one_stack + streams * per_stream


def _cache_build_hold(cfg, phase, frozen_bytes: int, count: _PerDevice) -> int:
    p, dtype = cfg.training.progressive, jnp.dtype(resident.compute_dtype(cfg))
    L, D, V = cfg.data.seq_len, cfg.model.d_model, p.cache_views
    build_rows = count.rows_of(cache.BUILD_BATCH)
    incremental = cfg.training.mask_schedule_type == "uniform" and phase.index >= 2
    if incremental:
        through = count.params(resident.abstract_trunk(cfg, 1, p.frozen_precision))
        batch = build_rows * (L * D * 4 + L * (4 + 4 + 1) + 4 + L * 4)
        out = build_rows * L * D * dtype.itemsize
    else:
        embed = count.params(resident.abstract_top(cfg)["embed"]) // 4 * dtype.itemsize
        through = embed + count.params(resident.abstract_trunk(cfg, phase.index,
                                                               p.frozen_precision))
        batch = build_rows * L * 4 + build_rows * V * (L * (4 + 1) + 4)
        out = build_rows * V * L * D * dtype.itemsize
    return frozen_bytes + through + batch + out


def _merged_stack_bytes(cfg, args, layout) -> int:
    """One merged stack (float32) on one device. On a mesh its layout is the compiler's
    choice (propagated from the base's and the adapters' shardings): compiled to read it."""
    if layout is None:
        return _nbytes(resident.abstract_stack(cfg))
    bps = cfg.model.architecture.blocks_per_stack
    trainable, frozen = args[0], args[1]

    def take(tree):  # one stack's slice; the block axis is never split
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((bps,) + x.shape[1:], x.dtype,
                                                           sharding=x.sharding), tree)

    out = fusion.merge_fn(cfg).lower(take(frozen["trunk"]), take(trainable["adapters"]))
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(out.compile().out_info))


def _placed(layout, trainable, frozen, opt_state, batch, key_like):
    """The step's abstract arguments carrying the shardings the trainer gives them."""
    count = _PerDevice(layout)
    batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         batch, count.row_shardings(batch))
    key_like = jax.ShapeDtypeStruct(key_like.shape, key_like.dtype, sharding=layout.replicated())
    return (*layout.abstract((trainable, frozen, opt_state)), batch, key_like)


def step_and_args(cfg, phase, layout=None):
    """The jitted train step of `phase` and its abstract arguments (trainable, frozen,
    optimizer state, batch, key), on a mesh carrying the shardings the trainer gives them."""
    tx = step_lib.optimizer_for(cfg, phase)
    trainable = resident.abstract_trainable(cfg, phase)
    frozen = resident.abstract_frozen(cfg, phase)
    opt_state = jax.eval_shape(lambda tr: init_state(tx, tr, cfg.training), trainable)
    key_like = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    args = (trainable, frozen, opt_state, _batch_like(cfg, phase), key_like)
    state_shardings = None
    if layout is not None:
        args = _placed(layout, *args)
        state_shardings = layout.shardings((trainable, opt_state))
    step, _ = step_lib.build(cfg, phase, tx, 0, layout, state_shardings)
    return step, args


def analyze(cfg, key: str, budget: int, planned=None, layout=None) -> dict:
    """The row of planner key `key`: the phase's step compiled, and every hold counted.
    With a layout (sharding.Layout: a mesh and its rules), every byte is one device's: the
    step is compiled SPMD with the shardings the trainer places its arguments with
    (memory_analysis of a partitioned program is per device), and each hold counts its
    arrays' shards."""
    cfg, phase = planned or planned_phase(cfg, key)
    count = _PerDevice(layout)
    step, args = step_and_args(cfg, phase, layout)
    trainable, frozen, opt_state, batch, _ = args
    mem = step.lower(*args).compile().memory_analysis()
    step_total = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                  + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    trainable_b, frozen_b = count.params(trainable), count.params(frozen)
    opt_b, batch_b = count.params(opt_state), count.rows(batch)
    holds = {"step": trainable_b + opt_b + frozen_b + batch_b}
    if phase.adapters:  # at its end, each stack is merged (float32) while the rest is held
        holds["merge"] = holds["step"] + _merged_stack_bytes(cfg, args, layout)
    if phase.trunk_stacks or phase.upper_stacks:
        holds["trunk assembly"] = frozen_b + _largest_stored_leaf(cfg, count)
    if phase.inputs == "cache":
        holds["cache build"] = _cache_build_hold(cfg, phase, frozen_b, count)
    holds["evaluation"] = _eval_hold(cfg, phase, count)
    non_temporary = max(holds.values())
    total = max([step_total] + [v for k, v in holds.items() if k != "step"])
    return {"phase": _title(key, phase), "key": key,
            "trainable_params_bytes": trainable_b, "frozen_params_bytes": frozen_b,
            "optimizer_bytes": opt_b, "gradient_bytes": trainable_b,
            "batch_bytes": batch_b, "xla_temp_bytes": int(mem.temp_size_in_bytes),
            "step_total_bytes": int(step_total), "holds": holds,
            "non_temporary_bytes": int(non_temporary), "total_bytes": int(total),
            "fits": total <= budget, "flops_per_token": flops_per_token(cfg, phase)}


def _title(key: str, phase) -> str:
    if key == FIRST:
        return "stage 0, embedding and head train with stack 0" if "embed" in phase.train_top \
            else "stage 0"
    if key == CACHED:
        return f"stage {phase.index}, inputs from the activation cache"
    if key == FUSION:
        return (f"fusion, LoRA rank {{r}} on all {len(phase.trunk_stacks)} stacks over a "
                f"{phase.trunk_format} base")
    if key == BLOCK:
        return (f"block fusion, stack 0's turn: {len(phase.upper_stacks)} stacks above it "
                f"frozen in {phase.trunk_format}")
    if not phase.trunk_stacks:
        return f"stage {phase.index}, no frozen trunk"
    return f"stage {phase.index}, frozen trunk resident in {key}"


def phase_title(cfg, key: str) -> str:
    """The table's name of planner key `key`, without compiling anything."""
    title = _title(key, planned_phase(cfg, key)[1])
    return title.replace("{r}", str(cfg.training.fusion.lora_rank))


def plan(cfg, budget: int, keys: list[str] | None = None, layout=None) -> dict:
    """Rows for the planner keys `keys` (all_phases(cfg) when None), against `budget` bytes;
    with a layout (sharding.Layout), per device of its mesh (see analyze)."""
    keys = all_phases(cfg) if keys is None else list(keys)
    unknown = [k for k in keys if k not in all_phases(cfg)]
    if unknown:
        raise ValueError(f"phases {unknown} not among {all_phases(cfg)} for this config")
    rows = []
    for key in keys:
        row = analyze(cfg, key, budget, layout=layout)
        row["phase"] = row["phase"].replace("{r}", str(cfg.training.fusion.lora_rank))
        rows.append(row)
    return {"device_memory_bytes": budget, "batch_size": cfg.data.batch_size,
            "grad_accum_steps": cfg.training.grad_accum_steps, "seq_len": cfg.data.seq_len,
            "phases": rows, "cache": cache.bytes_and_flops_per_token(cfg),
            "mesh": None if layout is None else layout.sizes}


# ------------------------------------------------------------------------------ disk


def disk_plan(cfg, n_train_rows: int | None = None) -> dict:
    """Bytes a run needs on disk at its largest: every stack stored once (fusion stores
    them again before the older versions go), two versions of the top groups, max_to_keep
    + 1 checkpoints of the largest phase (Orbax deletes the oldest after the newest is
    complete), and the activation cache (two stages' while one is built, unless
    keep_previous_cache keeps them all). n_train_rows: training sequences (None: no cache)."""
    p, n = cfg.training.progressive, cfg.model.architecture.n_stacks
    item = 2 if p.stack_storage_dtype == "bf16" else 4
    stack = _nbytes(resident.abstract_stack(cfg)) // 4 * item
    top = _nbytes(resident.abstract_top(cfg))
    stores = n * stack * (2 if cfg.training.fusion.steps > 0 else 1) + 2 * top
    t, sizes = cfg.training, {}
    for ph in phases_lib.all_phases(cfg):
        what = (ph.adapters, ph.n_local_stacks, tuple(sorted(ph.train_top)))
        if what in sizes:  # phases that train the same things checkpoint the same bytes
            continue
        tx = step_lib.optimizer_for(cfg, ph)
        trainable = resident.abstract_trainable(cfg, ph)
        sizes[what] = _nbytes(trainable) + _nbytes(jax.eval_shape(
            lambda tr: init_state(tx, tr, t), trainable))
    ckpt = max(sizes.values())
    checkpoints = ckpt * (cfg.checkpoint.max_to_keep + 1)
    cache_bytes = 0
    if p.cache_activations and _cache_possible(cfg) and n_train_rows:
        one = cache.spec_for(cfg, n_train_rows).total_bytes()
        cache_bytes = one * ((n - 1) if p.keep_previous_cache else min(2, n - 1))
    return {"stores": stores, "checkpoints": checkpoints, "cache": cache_bytes,
            "total": stores + checkpoints + cache_bytes, "stack_bytes": stack}


def check_disk(cfg, workdir: str, n_train_rows: int) -> dict:
    """Raises UserError, naming the bytes, when the disk under workdir cannot hold the rest
    of the run (disk_plan minus what the run already wrote)."""
    need = disk_plan(cfg, n_train_rows)
    used = sum(disk_usage(os.path.join(workdir, d)) for d in ("params", "checkpoints", "cache"))
    free = _free_bytes(workdir)
    missing = need["total"] - used - free
    print(f"disk: the run needs {_gb(need['total'])} in {workdir} (stores {_gb(need['stores'])}"
          f", checkpoints {_gb(need['checkpoints'])}, activation cache {_gb(need['cache'])}); "
          f"{_gb(used)} written, {_gb(free)} free")
    if missing > 0:
        raise UserError(
            f"not enough disk space for this run in {workdir}: it needs {need['total']} bytes "
            f"({_gb(need['total'])}: stored stacks {_gb(need['stores'])}, checkpoints "
            f"{_gb(need['checkpoints'])} (checkpoint.max_to_keep={cfg.checkpoint.max_to_keep}),"
            f" activation cache {_gb(need['cache'])}); {_gb(used)} are written and "
            f"{_gb(free)} free. Free {_gb(missing)}, use another --workdir, or lower the need "
            "(training.progressive.stack_storage_dtype=bf16, checkpoint.max_to_keep, "
            "training.progressive.cache_dtype=fp8)")
    return need


def _free_bytes(path: str) -> int:
    """Free bytes on the filesystem holding `path` (tests monkeypatch this)."""
    while not os.path.exists(path):
        path = os.path.dirname(os.path.abspath(path))
    return shutil.disk_usage(path).free


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


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
    fusing = phase in (FUSION, BLOCK)
    remat_key, remat = ("training.fusion.remat", f.remat) if fusing else ("model.remat", m.remat)
    if remat != "full":
        temps.append((remat_key, "full", remat, "recompute each block in backward"))
    chunk = _chunk_for(d.seq_len)
    if chunk and m.attention_chunk_size == 0 and m.attention != "linear":  # linear: O(L) already
        temps.append(("model.attention_chunk_size", chunk, 0,
                      "no full attention score matrices"))
    if chunk and t.loss_chunk_size == 0:
        temps.append(("training.loss_chunk_size", chunk, 0, "no full logits"))
    if p.new_stack_precision == "fp32":
        temps.append(("training.progressive.new_stack_precision", "bf16", "fp32",
                      "compute in bf16; master weights stay fp32"))
    if row["frozen_params_bytes"] >= 0.05 * row["total_bytes"]:  # it matters
        if fusing and f.base_precision != "nf4":
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


def preflight(cfg, budget_bytes: int, layout=None) -> list[dict]:
    """Compiles the phase(s) this config will run (phases_for_run) on abstract shapes and
    checks them against `budget_bytes` (per device of the layout's mesh, when one is given).
    Returns the rows when all fit; otherwise raises UserError naming the phase, its
    breakdown and the config knobs that would shrink it."""
    phases = phases_for_run(cfg)
    rows = plan(cfg, budget_bytes, phases, layout)["phases"]
    bad = [(phase, r) for phase, r in zip(phases, rows) if not r["fits"]]
    if not bad:
        return rows
    phase, r = max(bad, key=lambda pr: pr[1]["total_bytes"])
    per = "" if layout is None else f" per device of {plan_mesh.mesh_name(layout.sizes)}"
    lines = [f"memory preflight: '{r['phase']}' does not fit: it needs {_gib(r['total_bytes'])}"
             f" of a {_gib(budget_bytes)} budget{per} (trainable parameters "
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
    devices = "" if layout is None else f" --devices={layout.n_devices} " + " ".join(
        f"--config.mesh.{a}={v}" for a, v in layout.sizes.items())
    lines.append(f"See every phase: python -m stackwise_jax.plan "
                 f"--device_memory={_size_arg(budget_bytes)}{devices} --config=...")
    raise UserError("\n".join(lines))


def format_table(result: dict) -> str:
    gib = 2**30
    accum = result.get("grad_accum_steps", 1)
    mesh = result.get("mesh")
    where = "" if not mesh else (f" per device of a mesh {plan_mesh.mesh_name(mesh)} ("
                                 f"{math.prod(mesh.values())} devices; every byte below is one "
                                 "device's)")
    lines = [f"device memory budget: {result['device_memory_bytes'] / gib:.1f} GiB{where}; batch "
             f"{result['batch_size']} x {result['seq_len']} tokens"
             + (f" x {accum} micro-batches per step" if accum > 1 else ""),
             "| phase | trainable | frozen | optimizer | gradients* | XLA temp | step total | "
             "non-temporary | total | fits | model FLOPs/token |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["phases"]:
        lines.append(
            f"| {r['phase']} | {r['trainable_params_bytes'] / gib:.2f} | "
            f"{r['frozen_params_bytes'] / gib:.2f} | {r['optimizer_bytes'] / gib:.2f} | "
            f"{r['gradient_bytes'] / gib:.2f} | {r['xla_temp_bytes'] / gib:.2f} | "
            f"{r['step_total_bytes'] / gib:.2f} | {r['non_temporary_bytes'] / gib:.2f} | "
            f"{r['total_bytes'] / gib:.2f} | {'FITS' if r['fits'] else 'DOES NOT FIT'} | "
            f"{r['flops_per_token']:.3g} |")
    c = result["cache"]
    lines.append(f"(GiB; *gradients live inside XLA temp; non-temporary: the largest of what "
                 f"the process holds at once: step, trunk assembly, cache build, evaluation, "
                 f"merge) "
                 f"activation cache: {c['bytes_per_token']:.0f} bytes/token, one stack forward "
                 f"{c['stack_forward_flops_per_token']:.3g} FLOPs/token")
    if "disk" in result:
        d = result["disk"]
        lines.append(f"disk: stored stacks and top groups {_gb(d['stores'])} "
                     f"({_gb(d['stack_bytes'])} per stack), checkpoints {_gb(d['checkpoints'])}"
                     f", activation cache {_gb(d['cache'])}"
                     + (f" ({d['cache_note']})" if d.get("cache_note") else "")
                     + f"; total {_gb(d['total'])}")
    if "time" in result:
        tm = result["time"]
        on = "" if tm.get("n_devices", 1) == 1 else f" on each of {tm['n_devices']} devices"
        lines.append(f"time at {tm['mfu']:.0%} of {tm['device']}'s {tm['peak_flops'] / 1e12:.0f} "
                     f"TFLOP/s (bf16 dense){on}:")
        lines.append("| phase | FLOPs/token | tokens | hours |")
        lines.append("|---|---|---|---|")
        for r in _grouped(tm["phases"]):
            lines.append(f"| {r['phase']} | {r['flops']} | {r['tokens']:,} | {r['hours']} |")
        lines.append(f"run total: {tm['total_hours']:.1f} hours = {tm['total_days']:.1f} days")
    return "\n".join(lines)


def _grouped(rows: list[dict]) -> list[dict]:
    """Phases shown for the time table; runs of consecutive stages (or block fusion turns)
    collapsed into one line
    (first..last, range of FLOPs/token and hours per stage, and their sum)."""
    out, run = [], []

    def flush():
        if not run:
            return
        if len(run) == 1:
            r = run[0]
            out.append({"phase": r["phase"], "flops": f"{r['flops_per_token']:.3g}",
                        "tokens": r["tokens"], "hours": f"{r['hours']:.3g}"})
        else:
            f = [r["flops_per_token"] for r in run]
            h = [r["hours"] for r in run]
            span = lambda lo, hi: f"{lo:.3g}" if lo == hi else f"{lo:.3g} to {hi:.3g}"  # noqa: E731
            last = run[-1]["phase"].split(" (")[0].split()[-1]  # "80/80"
            out.append({"phase": f"{run[0]['phase'].split(' (')[0]} to {last}",
                        "flops": span(min(f), max(f)), "tokens": run[0]["tokens"],
                        "hours": f"{span(min(h), max(h))} each, {sum(h):.3g} in all"})
        run.clear()

    def family(r):  # stages, or block fusion's turns
        return r["phase"].split()[0]

    for r in rows:
        groupable = r["phase"].startswith(("stage", "block fusion"))
        if groupable and (not run or (run[-1]["tokens"] == r["tokens"]
                                      and family(run[-1]) == family(r))):
            if len(run) == 1 and run[0]["phase"].startswith("stage 1/"):
                flush()  # stage 1 (it trains the embedding too) stays on a line of its own
            run.append(r)
        else:
            flush()
            if groupable:
                run.append(r)
            else:
                out.append({"phase": r["phase"], "flops": f"{r['flops_per_token']:.3g}",
                            "tokens": r["tokens"], "hours": f"{r['hours']:.3g}"})
    flush()
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    use_whole_accelerator()
    try:
        rest, overrides = config_lib.split_overrides(argv)
        ap = argparse.ArgumentParser(prog="python -m stackwise_jax.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--config", required=True)
        ap.add_argument("--device_memory", default="141GiB")
        ap.add_argument("--device", default="h100", help=f"one of {', '.join(DEVICES)}")
        ap.add_argument("--mfu", type=float, default=0.4,
                        help="fraction of the device's peak bf16 FLOP/s the run achieves")
        ap.add_argument("--corpus_tokens", type=int, default=None,
                        help="training tokens in the corpus, for the activation cache's disk "
                             "and build time (default: one stage's tokens)")
        ap.add_argument("--json", default=None, help="also write the table as JSON here")
        ap.add_argument("--phases", default="all", choices=("all", "run"),
                        help="all: every phase the table shows; run: the phases this config "
                             "runs (phases_for_run)")
        ap.add_argument("--devices", type=int, default=None,
                        help="plan per device of the config's mesh (--config.mesh.data/fsdp/"
                             "tensor) over this many devices; default: the product of the "
                             "mesh's fixed axes (1 unless set). Simulated CPU devices stand in "
                             "for devices the machine does not have")
        ap.add_argument("--smallest_mesh", action="store_true",
                        help="search meshes data=1 x fsdp x tensor (powers of two) for the "
                             "fewest devices on which each phase fits --device_memory per "
                             "device (the config's mesh is not used)")
        ap.add_argument("--max_devices", type=int, default=8,
                        help="the largest device count --smallest_mesh tries")
        args = ap.parse_args(rest)
        cfg = config_lib.load(args.config, overrides)
        budget = parse_bytes(args.device_memory)
        keys = phases_for_run(cfg) if args.phases == "run" else all_phases(cfg)
        if args.smallest_mesh:
            return _search(cfg, budget, keys, args)
        n = plan_mesh.default_devices(cfg) if args.devices is None else \
            plan_mesh.check_count("--devices", args.devices)
        plan_mesh.check_mesh(cfg, n)  # before JAX starts: a bad mesh costs no device set-up
        plan_mesh.provide_cpu_devices(n)
        result = plan(cfg, budget, keys, plan_mesh.layout_for(cfg, n))
        corpus = args.corpus_tokens or config_lib.steps_in_stage(cfg) * tokens_per_step(cfg)
        result["disk"] = disk_plan(cfg, max(1, corpus // cfg.data.seq_len))
        if not args.corpus_tokens:
            result["disk"]["cache_note"] = "for a corpus of one stage's tokens"
        result["time"] = time_plan(cfg, args.device, args.mfu, args.corpus_tokens, n)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    _write_json(args.json, result)
    return 0 if all(r["fits"] for r in result["phases"]) else 1


def _search(cfg, budget: int, keys: list[str], args) -> int:
    if args.devices is not None:
        raise UserError(f"--devices={args.devices} and --smallest_mesh: choose one (a plan on "
                        "the config's mesh over --devices, or the search up to --max_devices)")
    max_devices = plan_mesh.check_count("--max_devices", args.max_devices)
    plan_mesh.provide_cpu_devices(max_devices)
    result = plan_mesh.smallest_mesh(cfg, budget, keys, max_devices)
    print(plan_mesh.format_search(result))
    _write_json(args.json, result)
    return 0 if all(p["row"] is not None for p in result["phases"]) else 1


def _write_json(path: str | None, result: dict) -> None:
    if path:
        from stackwise_jax.checkpoint import atomic_write_text
        atomic_write_text(path, json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
