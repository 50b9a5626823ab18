"""Held-out evaluation: masked-diffusion loss at fixed ratios, causal loss, unigram baseline."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from stackwise_jax import objective
from stackwise_jax.model import Rack

EVAL_SEED = 1234  # fixed masks: every run and every stage is scored on the same positions


@functools.partial(jax.jit, static_argnames=("n_stacks", "t", "mask_id"))
def _masked_loss_sums(rack: Rack, ids_BxL, key, n_stacks: int, t: float, mask_id: int):
    inputs_BxL, masked_BxL, _ = objective.sample_mask(key, ids_BxL, t, t, mask_id)
    logits_BxLxV = rack(inputs_BxL, "bidirectional", n_stacks)
    ce_BxL = objective.token_cross_entropy(logits_BxLxV, ids_BxL)
    return jnp.where(masked_BxL, ce_BxL, 0.0).sum(), masked_BxL.sum()


@functools.partial(jax.jit, static_argnames=("n_stacks",))
def _causal_loss_sums(rack: Rack, ids_BxL, n_stacks: int):
    logits_BxLxV = rack(ids_BxL, "causal", n_stacks)
    ce = objective.token_cross_entropy(logits_BxLxV[:, :-1], ids_BxL[:, 1:])
    return ce.sum(), ce.size


def masked_diffusion_loss(rack: Rack, batches, t: float, mask_id: int, n_stacks: int | None = None):
    """Mean cross-entropy over masked tokens at mask ratio t, same masks on every call."""
    n_stacks = rack.n_stacks if n_stacks is None else n_stacks
    total, count = 0.0, 0
    for i, ids_BxL in enumerate(batches):
        key = jax.random.fold_in(jax.random.key(EVAL_SEED), i)
        s, n = _masked_loss_sums(rack, jnp.asarray(ids_BxL), key, n_stacks, float(t), mask_id)
        total, count = total + float(s), count + int(n)
    return total / max(count, 1)


def causal_loss(rack: Rack, batches, n_stacks: int | None = None):
    n_stacks = rack.n_stacks if n_stacks is None else n_stacks
    total, count = 0.0, 0
    for ids_BxL in batches:
        s, n = _causal_loss_sums(rack, jnp.asarray(ids_BxL), n_stacks)
        total, count = total + float(s), count + int(n)
    return total / max(count, 1)


def unigram_loss(train_rows, heldout_batches, vocab_size: int) -> float:
    """Cross-entropy of add-one unigram frequencies of the training tokens on held-out tokens.

    A model that ignores context can do no better than this at any mask ratio, since which
    positions are masked is independent of the tokens there.
    """
    counts = np.bincount(np.asarray(train_rows).ravel(), minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    held = np.concatenate([np.asarray(b).ravel() for b in heldout_batches])
    return float(-log_p[held].mean())
