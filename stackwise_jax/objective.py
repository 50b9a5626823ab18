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
