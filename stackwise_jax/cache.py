"""Activation cache: stage k >= 1 trains from stored hidden states, not by running the trunk.

After stage k-1 ends, every training sequence (in `cache_views` mask samples) is written to
RUN_DIR/cache/stage_k with the hidden states entering stack k and what its loss needs
(inputs, targets, mask, t); cache_store.py owns the on-disk format and its integrity.

Masks are fixed per (sequence, view) by a key derived from their indices. With a uniform
mask ratio they are the same in every stage, so stage k+1's cache is stage k's pushed
through stack k alone (incremental). With a depth-as-time schedule the ratio changes per
stage, so each cache is rebuilt through embedding and trunk with that stage's ratio.

Training from the cache, stack k is presented as stack 0 of a one-stack Rack: every
stage then has the same parameter structure and shapes, and the step compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackwise_jax import cache_store, objective, stages
from stackwise_jax.errors import UserError
from stackwise_jax.model import Rack

SHARD_BYTES = 256 * 2**20  # about this much per shard file
CACHE_MASK_SEED = 7919  # mixed into the mask keys so cached masks differ from step masks


def validate(cfg) -> None:
    """Requirements of training.progressive.cache_activations=True."""
    t, p = cfg.training, cfg.training.progressive
    need = "training.progressive.cache_activations=True needs"
    if not p.enabled or p.trunk_strategy != "frozen":
        raise UserError(f"{need} progressive training with a frozen trunk "
                        "(training.progressive.enabled=True, trunk_strategy='frozen')")
    if t.train_embedding == "every_stage":
        raise UserError(f"{need} an embedding that stops training after stage 0 "
                        "(training.train_embedding='first_stage' or 'never'): cached activations "
                        "were computed with it")
    if t.objective != "masked_diffusion":
        raise UserError(f"{need} training.objective='masked_diffusion'")


def cache_dir(workdir: str, stage: int) -> str:
    return os.path.join(workdir, "cache", f"stage_{stage}")


def spec_for(cfg, n_sequences: int) -> cache_store.CacheSpec:
    p, m = cfg.training.progressive, cfg.model
    probe = cache_store.CacheSpec(1, cfg.data.seq_len, m.d_model, p.cache_dtype, 1)
    rows_per_shard = max(1, SHARD_BYTES // probe.bytes_per_row())
    return cache_store.CacheSpec(n_sequences * p.cache_views, cfg.data.seq_len, m.d_model,
                                 p.cache_dtype, rows_per_shard)


def bytes_and_flops_per_token(cfg) -> dict:
    """What a cache costs per training token and view (see docs/cache.md).

    An incremental build runs one stack forward per token (stack_forward_flops_per_token);
    a rebuild at the start of stage k runs k of them (the embedding is a lookup).
    """
    from stackwise_jax.model import param_counts

    m, L = cfg.model, cfg.data.seq_len
    attention = 4 * L * m.d_model * m.architecture.blocks_per_stack  # QK^T and PV
    return {"bytes_per_token": spec_for(cfg, 1).bytes_per_row() / L,
            "stack_forward_flops_per_token": 2 * param_counts(m)["stack_0"] + attention}


# ------------------------------------------------------------------- one-stack layout


def one_stack_config(model_cfg):
    m = model_cfg.copy_and_resolve_references()
    m.architecture.n_stacks = 1
    return m


def to_one_stack(params: dict, k: int) -> dict:
    """The parameters stage k needs from the cache, with stack k renamed stack 0."""
    out = {name: v for name, v in params.items() if name != "stacks"}
    out["stacks"] = {0: params["stacks"][k]}
    return out


def from_one_stack(params: dict, one: dict, k: int) -> dict:
    """Writes a one-stack tree back into the full parameter tree as stack k."""
    out = stages.merge_trees(params, {n: v for n, v in one.items() if n != "stacks"})
    if "stacks" in one:
        out["stacks"] = dict(out["stacks"])
        out["stacks"][k] = one["stacks"][0]
    return out


@dataclasses.dataclass(frozen=True)
class CachedPlan(stages.StagePlan):
    """Stack 0 of the one-stack Rack trains; the embedding runs only as a tied head."""

    tied: bool = False

    def runs(self, path: tuple) -> bool:
        return path[0] != "embed" or self.tied


def cached_partition(model_cfg, plan: stages.StagePlan) -> stages.Partition:
    rack = nnx.eval_shape(lambda: Rack(one_stack_config(model_cfg), nnx.Rngs(0)))
    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(stages.StagePlan)}
    fields.update(first_trainable_stack=0, n_stacks_run=1)
    return stages.Partition(rack, CachedPlan(**fields, tied=model_cfg.tie_embeddings))


def make_cached_loss_fn(cfg, partition: stages.Partition):
    """loss(trainable, frozen, batch, key) on a cached batch; `key` is unused (masks are stored)."""
    weighting, dtype = cfg.training.loss_weighting, stages.compute_dtype(cfg)

    def loss_fn(trainable, frozen, batch, key):
        del key
        rack = partition.rack(stages.cast_floats(trainable, dtype),
                              stages.frozen_for_forward(frozen, dtype))
        hidden_BxLxD = rack.run_stacks(batch["hidden"].astype(dtype), 0, 1, "bidirectional")
        return objective.masked_diffusion_loss_from_hidden(
            hidden_BxLxD, rack.logits, batch["targets"], batch["masked"], batch["t"], weighting,
            cfg.training.loss_chunk_size)

    return loss_fn


# ------------------------------------------------------------------------ building


def fixed_masks(seed: int, first_row: int, ids_BxL, views: int, t_range, mask_id: int):
    """The stored masks of sequences first_row.. (all views): depend only on row, view, range."""
    base = jax.random.fold_in(jax.random.key(seed), CACHE_MASK_SEED)
    rows = jnp.arange(first_row, first_row + ids_BxL.shape[0])

    def one(row, ids_L, view):
        key = jax.random.fold_in(jax.random.fold_in(base, row), view)
        inputs, masked, t = objective.sample_mask(key, ids_L[None], *t_range, mask_id)
        return inputs[0], masked[0], t[0]

    out = [jax.vmap(one, in_axes=(0, 0, None))(rows, ids_BxL, v) for v in range(views)]
    # Row order: sequence-major, view-minor.
    return tuple(jnp.stack([o[i] for o in out], axis=1).reshape((-1,) + out[0][i].shape[1:])
                 for i in range(3))


@functools.partial(jax.jit, static_argnames=("n_stacks",))
def _trunk_hidden(rack: Rack, inputs_BxL, n_stacks: int):
    return rack.run_stacks(rack.embed(inputs_BxL), 0, n_stacks, "bidirectional")


@jax.jit
def _one_stack_hidden(rack: Rack, hidden_BxLxD):
    return rack.run_stacks(hidden_BxLxD, 0, 1, "bidirectional")


def _encode(hidden_BxLxD, dtype: str) -> dict:
    if dtype == "fp8":
        q, scale = cache_store.quantize_fp8(np.asarray(hidden_BxLxD, np.float32))
        return {"hidden": q, "hidden_scale": scale}
    return {"hidden": np.asarray(hidden_BxLxD, np.float32)}


def build(cfg, workdir: str, stage: int, rack: Rack, train_rows, mask_id: int,
          batch_size: int = 32) -> cache_store.CacheReader:
    """Writes the cache that stage `stage` trains from; returns a reader over it."""
    p = cfg.training.progressive
    spec = spec_for(cfg, len(train_rows))
    target = cache_dir(workdir, stage)
    previous = cache_dir(workdir, stage - 1)
    t_range = objective.stage_mask_range(cfg.training, stage, cfg.model.architecture.n_stacks)
    incremental = (cfg.training.mask_schedule_type == "uniform" and stage >= 2
                   and _is_complete(previous, spec))
    how = f"from stage {stage - 1}'s cache through stack {stage - 1}" if incremental else \
        f"through the embedding and stacks 0..{stage - 1}"
    print(f"building the activation cache of stage {stage} {how} "
          f"({spec.n_rows} rows, {p.cache_dtype})")
    meta = {"stage": stage, "t_range": list(t_range), "views": p.cache_views}
    with cache_store.CacheWriter(target, spec, meta=meta) as writer:
        if incremental:
            reader = cache_store.open_cache(previous, verify=False)
            one = _one_stack_view(cfg, rack, stage - 1)
            for start in range(0, len(reader), batch_size):
                rows = reader.batch(np.arange(start, min(start + batch_size, len(reader))))
                hidden = _one_stack_hidden(one, jnp.asarray(rows["hidden"]))
                writer.write({**{k: rows[k] for k in ("inputs", "targets", "masked", "t")},
                              **_encode(hidden, p.cache_dtype)})
        else:
            for start in range(0, len(train_rows), batch_size):
                ids = jnp.asarray(train_rows[start:start + batch_size])
                inputs, masked, t = fixed_masks(cfg.training.seed, start, ids, p.cache_views,
                                                t_range, mask_id)
                hidden = _trunk_hidden(rack, inputs, stage)
                writer.write({"inputs": np.asarray(inputs), "masked": np.asarray(masked),
                              "t": np.asarray(t, np.float32),
                              "targets": np.repeat(np.asarray(ids), p.cache_views, axis=0),
                              **_encode(hidden, p.cache_dtype)})
    if not p.keep_previous_cache and os.path.isdir(previous):
        cache_store.delete_cache(previous)
    return cache_store.open_cache(target, verify=True, expect=spec)


def _is_complete(directory: str, spec) -> bool:
    try:
        cache_store.open_cache(directory, verify=False, expect=spec)
        return True
    except (UserError, ValueError):
        return False


def _one_stack_view(cfg, rack: Rack, k: int) -> Rack:
    """A one-stack Rack sharing stack k's parameters (for the incremental build)."""
    from stackwise_jax.run import rack_from_params

    params = nnx.to_pure_dict(nnx.state(rack, nnx.Param))
    return rack_from_params(one_stack_config(cfg.model), to_one_stack(params, k))


def open_or_build(cfg, workdir: str, stage: int, rack: Rack, train_rows, mask_id: int,
                  rebuild: bool) -> cache_store.CacheReader:
    """The stage's cache: reused when complete and intact, else (or with rebuild) built."""
    target = cache_dir(workdir, stage)
    spec = spec_for(cfg, len(train_rows))
    if rebuild:
        cache_store.delete_cache(target)
    elif os.path.isdir(target):
        return cache_store.open_cache(target, verify=True, expect=spec)  # names a bad shard
    return build(cfg, workdir, stage, rack, train_rows, mask_id)
