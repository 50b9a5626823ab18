"""Activation cache: stage k >= 1 trains from stored hidden states, not by running the trunk.

After stage k-1 ends, every training sequence (in `cache_views` mask samples) is written to
RUN_DIR/cache/stage_k with the hidden states entering stack k and what its loss needs
(inputs, targets, mask, t); cache_store.py owns the on-disk format and its integrity.

Masks are fixed per (sequence, view) by a key derived from their indices. With a uniform
mask ratio they are the same in every stage, so stage k+1's cache is stage k's pushed
through stack k alone (incremental). With a depth-as-time schedule the ratio changes per
stage, so each cache is rebuilt through embedding and trunk with that stage's ratio.

The cache is built through the same resident format the uncached path runs
(training.progressive.frozen_precision, computing in the trained stack's dtype): stage
k+1 reads what stage k+1 would have computed from tokens, up to the cache dtype's rounding
of the hidden states (docs/cache.md measures how that grows over depth). The trunk is
never resident for training: an incremental build holds one stack, a rebuild the trunk
only while it builds.
"""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from stackwise_jax import cache_store, distributed, memory, objective, resident, sharding
from stackwise_jax.errors import UserError
from stackwise_jax.resident import Template, compute_dtype

SHARD_BYTES = 256 * 2**20  # about this much per shard file
BUILD_BATCH = 32  # training sequences pushed through the trunk at a time while building
CACHE_MASK_SEED = 7919  # mixed into the mask keys so cached masks differ from step masks


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


def _encode(hidden_BxLxD, dtype: str) -> dict:
    hidden_BxLxD = sharding.to_host(hidden_BxLxD).astype(np.float32, copy=False)
    if dtype == "fp8":
        q, scale = cache_store.quantize_fp8(hidden_BxLxD)
        return {"hidden": q, "hidden_scale": scale}
    return {"hidden": hidden_BxLxD}


def _forwards(cfg):
    """(through_trunk(embed, trunk, inputs), through_blocks(blocks, hidden)), jitted: the
    uncached step's own trunk forward, in the compute dtype."""
    template, dtype = Template(cfg.model, 0), compute_dtype(cfg)

    def through_blocks(blocks, hidden_BxLxD):
        return template.rack({}, {}).run_trunk(blocks, hidden_BxLxD.astype(dtype), "bidirectional")

    def through_trunk(embed, trunk, inputs_BxL):
        x_BxLxD = template.rack({}, {"embed": embed}).embed(inputs_BxL).astype(dtype)
        return through_blocks(trunk, x_BxLxD)

    return jax.jit(through_trunk), jax.jit(through_blocks)


def build(cfg, workdir: str, stage: int, train_rows, mask_id: int,
          batch_size: int = BUILD_BATCH, layout=None) -> cache_store.CacheReader:
    """Writes the cache that stage `stage` trains from; returns a reader over it. The
    embedding and stacks < stage are read from the run's stores. layout: the mesh they and
    the rows are placed on (sharding.Layout); the hidden states are gathered to the host
    for writing, one build batch at a time.

    With several processes every one runs the build (each reads and places only its own
    rows of a build batch, and takes part in the gathers) and process 0 alone writes."""
    p = cfg.training.progressive
    spec = spec_for(cfg, len(train_rows))
    target = cache_dir(workdir, stage)
    previous = cache_dir(workdir, stage - 1)
    t_range = objective.stage_mask_range(cfg.training, stage, cfg.model.architecture.n_stacks)
    incremental = (cfg.training.mask_schedule_type == "uniform" and stage >= 2
                   and _is_complete(previous, spec))
    how = f"from stage {stage - 1}'s cache through stack {stage - 1}" if incremental else \
        f"through the embedding and stacks 0..{stage - 1}"
    primary = distributed.is_primary()
    if primary:
        print(f"building the activation cache of stage {stage} {how} "
              f"({spec.n_rows} rows, {p.cache_dtype}, trunk in {p.frozen_precision})")
    meta = {"stage": stage, "t_range": list(t_range), "views": p.cache_views,
            "trunk_format": p.frozen_precision}
    through_trunk, through_blocks = _forwards(cfg)
    why = f"the activation cache of stage {stage}"
    host = sharding.to_host  # a gather that every process joins
    writer = cache_store.CacheWriter(target, spec, meta=meta) if primary else None
    with writer or contextlib.nullcontext():
        if incremental:
            reader = cache_store.open_cache(previous, verify=False)
            blocks = resident.stack_resident(cfg, workdir, stage - 1, p.frozen_precision,
                                             stage, why, layout)
            for start in range(0, len(reader), batch_size):
                n, part = _part(layout, start, min(start + batch_size, len(reader)))
                # Process 0 reads every row: it writes them all.
                rows = reader.batch(np.arange(start, start + n) if writer is not None else
                                    np.arange(start + part.start, start + part.stop))
                local = rows["hidden"][part] if writer is not None else rows["hidden"]
                hidden = through_blocks(blocks, _put(layout, local, n))
                memory.sample()
                encoded = _encode(hidden, p.cache_dtype)
                if writer is not None:
                    writer.write({**{k: rows[k] for k in ("inputs", "targets", "masked", "t")},
                                  **encoded})
        else:
            embed = resident.load_group(workdir, "embed", stage, compute_dtype(cfg), why, layout)
            trunk = resident.assemble_trunk(cfg, workdir, tuple(range(stage)),
                                            p.frozen_precision, stage, why, layout)
            for start in range(0, len(train_rows), batch_size):
                n, part = _part(layout, start, min(start + batch_size, len(train_rows)))
                local = np.asarray(train_rows[start + part.start:start + part.stop])
                ids = _put(layout, local, n)
                inputs, masked, t = fixed_masks(cfg.training.seed, start, ids, p.cache_views,
                                                t_range, mask_id)
                hidden = through_trunk(embed, trunk, inputs)
                memory.sample()
                batch = {"inputs": host(inputs), "masked": host(masked),
                         "t": host(t).astype(np.float32, copy=False),
                         "targets": np.repeat(host(ids), p.cache_views, axis=0),
                         **_encode(hidden, p.cache_dtype)}
                if writer is not None:
                    writer.write(batch)
    distributed.barrier(f"stackwise: activation cache of stage {stage} written")
    if primary and not p.keep_previous_cache and os.path.isdir(previous):
        cache_store.delete_cache(previous)
    return cache_store.open_cache(target, verify=True, expect=spec)


def _part(layout, start: int, stop: int) -> tuple[int, slice]:
    """(rows in the build batch [start, stop), the slice of them this process places)."""
    n = stop - start
    return n, (slice(0, n) if layout is None else layout.local_rows(n))


def _put(layout, local_rows, n_rows: int):
    return jnp.asarray(local_rows) if layout is None else layout.put_local_batch(local_rows, n_rows)


def _is_complete(directory: str, spec) -> bool:
    try:
        cache_store.open_cache(directory, verify=False, expect=spec)
        return True
    except (UserError, ValueError):
        return False


def open_or_build(cfg, workdir: str, stage: int, train_rows, mask_id: int,
                  rebuild: bool, layout=None) -> cache_store.CacheReader:
    """The stage's cache: reused when complete and intact, else (or with rebuild) built."""
    target = cache_dir(workdir, stage)
    spec = spec_for(cfg, len(train_rows))
    if rebuild and distributed.is_primary():
        cache_store.delete_cache(target)
    distributed.barrier(f"stackwise: activation cache of stage {stage} checked")
    if os.path.isdir(target):  # every process verifies: they reach the same verdict
        return cache_store.open_cache(target, verify=True, expect=spec)  # names a bad shard
    return build(cfg, workdir, stage, train_rows, mask_id, layout=layout)
