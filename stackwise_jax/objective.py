"""Training objectives: token-level masked diffusion, and causal next-token prediction.

Masked diffusion: each sequence b gets a ratio t_b; each position is masked with
probability t_b and its input replaced by the real [MASK] id; the loss is cross-entropy
on masked positions only, either a plain mean over masked tokens ('mean') or the
MDLM/LLaDA bound ('inv_t'): (1/B) sum_b 1/(t_b L) sum_{masked i} CE_bi.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def stage_mask_range(t_cfg, stage: int, n_stacks: int) -> tuple[float, float]:
    """The range t is drawn from while `stage` trains.

    uniform: [min, max]. linear / cosine (depth-as-time): one ratio per stack, moving from
    min to max across the stacks ('increasing') or from max to min ('decreasing').
    """
    lo, hi = t_cfg.min_mask_fraction, t_cfg.max_mask_fraction
    if t_cfg.mask_schedule_type == "uniform":
        return lo, hi
    x = stage / (n_stacks - 1) if n_stacks > 1 else 0.0
    if t_cfg.mask_schedule_direction == "decreasing":
        x = 1.0 - x
    if t_cfg.mask_schedule_type == "cosine":
        x = (1.0 - math.cos(math.pi * x)) / 2.0
    t = lo + (hi - lo) * x
    return t, t


def sample_mask(key, ids_BxL, t_lo: float, t_hi: float, mask_id: int):
    """Returns (inputs_BxL with [MASK] at masked positions, masked_BxL bool, t_B)."""
    key_t, key_m = jax.random.split(key)
    B, L = ids_BxL.shape
    t_B = jax.random.uniform(key_t, (B,), minval=t_lo, maxval=t_hi)
    masked_BxL = jax.random.uniform(key_m, (B, L)) < t_B[:, None]
    inputs_BxL = jnp.where(masked_BxL, mask_id, ids_BxL)
    return inputs_BxL, masked_BxL, t_B


def token_cross_entropy(logits_BxLxV, targets_BxL):
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return log_z_BxL - target_logit_BxL


def masked_diffusion_loss(logits_BxLxV, targets_BxL, masked_BxL, t_B, weighting: str):
    ce_BxL = jnp.where(masked_BxL, token_cross_entropy(logits_BxLxV, targets_BxL), 0.0)
    if weighting == "mean":
        return ce_BxL.sum() / jnp.maximum(masked_BxL.sum(), 1)
    if weighting == "inv_t":
        L = targets_BxL.shape[1]
        return jnp.mean(ce_BxL.sum(axis=1) / (t_B * L))
    raise ValueError(f"loss weighting {weighting!r}: choose 'mean' or 'inv_t'")


def causal_loss(logits_BxLxV, ids_BxL):
    """Next-token cross-entropy: position i predicts token i+1."""
    return token_cross_entropy(logits_BxLxV[:, :-1], ids_BxL[:, 1:]).mean()


# ---------------------------------------------------------------- losses from hidden states


def ce_sums(hidden_BxLxD, logits_fn, targets_BxL, valid_BxL, chunk: int):
    """Per-sequence sums of cross-entropy over valid positions, (B,).

    chunk=0 computes logits_fn on the whole sequence. chunk=C scans over L/C chunks of C
    positions and recomputes each chunk's logits in the backward pass (jax.checkpoint), so
    the largest logits tensor ever live is (B, C, V), not (B, L, V): with a 128k vocabulary
    that is the difference between megabytes and gigabytes.
    """
    def chunk_sums(h_BxCxD, targets_BxC, valid_BxC):
        ce_BxC = token_cross_entropy(logits_fn(h_BxCxD), targets_BxC)
        return jnp.where(valid_BxC, ce_BxC, 0.0).sum(axis=1)

    if chunk == 0:
        return chunk_sums(hidden_BxLxD, targets_BxL, valid_BxL)
    B, L, D = hidden_BxLxD.shape
    n = L // chunk

    def by_chunk(x):  # (B, L, ...) -> (n, B, chunk, ...)
        return jnp.moveaxis(x.reshape((B, n, chunk) + x.shape[2:]), 1, 0)

    checkpointed = jax.checkpoint(chunk_sums)

    def body(sums_B, xs):
        return sums_B + checkpointed(*xs), None

    sums_B, _ = jax.lax.scan(body, jnp.zeros((B,), jnp.float32),
                             (by_chunk(hidden_BxLxD), by_chunk(targets_BxL), by_chunk(valid_BxL)))
    return sums_B


# ------------------------------------------------------------- prepared batches, one loss
#
# A step's batch is first "prepared": inputs (what the model reads), targets, valid (the
# positions that count) and t, for the whole batch at once. Its loss is then a numerator
# that sums over sequences, divided by a denominator that depends only on the prepared
# batch: so a batch split into micro-batches (gradient accumulation) gives exactly the
# gradient of the whole batch, each micro-batch's numerator divided by the whole batch's
# denominator.


def prepare_tokens(key, ids_BxL, objective: str, mask_range, mask_id: int) -> dict:
    """Masked diffusion: masks drawn with `key` over the whole batch. Causal: position i
    predicts token i + 1; the last position predicts nothing."""
    B, L = ids_BxL.shape
    if objective == "causal":
        return {"inputs": ids_BxL, "targets": jnp.roll(ids_BxL, -1, axis=1),
                "valid": jnp.broadcast_to(jnp.arange(L) < L - 1, (B, L)),
                "t": jnp.ones((B,), jnp.float32)}
    inputs_BxL, masked_BxL, t_B = sample_mask(key, ids_BxL, *mask_range, mask_id)
    return {"inputs": inputs_BxL, "targets": ids_BxL, "valid": masked_BxL, "t": t_B}


def prepare_cached(rows: dict) -> dict:
    """An activation-cache batch (cache_store rows): masks and targets were stored."""
    return {"hidden": rows["hidden"], "targets": rows["targets"], "valid": rows["masked"],
            "t": rows["t"]}


def loss_numerator(hidden_BxLxD, logits_fn, batch: dict, weighting: str, chunk: int = 0):
    """Sum over the batch's sequences of what `weighting` averages (see loss_denominator)."""
    sums_B = ce_sums(hidden_BxLxD, logits_fn, batch["targets"], batch["valid"], chunk)
    if weighting == "mean":
        return sums_B.sum()
    if weighting == "inv_t":
        return (sums_B / (batch["t"] * batch["targets"].shape[1])).sum()
    raise ValueError(f"loss weighting {weighting!r}: choose 'mean' or 'inv_t'")


def loss_denominator(batch: dict, weighting: str):
    """mean: the number of valid positions; inv_t (the MDLM/LLaDA bound): sequences."""
    if weighting == "inv_t":
        return jnp.float32(batch["t"].shape[0])
    return jnp.maximum(batch["valid"].sum(), 1).astype(jnp.float32)
