"""Masked-diffusion sampling, the way the model was trained: `diffusion_generate(rack,
prompt_ids, max_new_tokens, mask_id, steps)`.

LLaDA's sampler (Nie et al. 2025, Algorithm "low-confidence remasking", semi-autoregressive
when block_length < max_new_tokens): every generated position starts as [MASK]; the
generated span is cut into blocks of block_length, filled left to right, and the steps are
shared among the blocks. At each step the model reads the whole sequence bidirectionally;
every still-masked position of the current block gets a prediction (argmax, or a Gumbel-max
draw at temperature > 0) and its confidence, the model's probability of that prediction;
the k most confident predictions are kept and every other position stays [MASK] (is
"remasked"). k follows LLaDA's schedule: a block's masked count split evenly over its
steps, the remainder going to the first steps, so the block is full after its last step.
[MASK] itself is never predicted, so none is left at the end; prompt positions are never
masked, so never changed.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackwise_jax.errors import UserError
from stackwise_jax.generate import prompt_rows


def transfer_schedule(n_masked: int, steps: int) -> list[int]:
    """Positions to unmask at each of `steps` steps: LLaDA's even split of n_masked, the
    remainder one each to the first steps."""
    base, extra = divmod(n_masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def block_plan(max_new_tokens: int, steps: int, block_length: int) -> list[tuple[int, int, int]]:
    """[(start, stop, steps)] per block, offsets into the generated span: blocks of
    block_length (the last may be shorter); the steps shared evenly, the remainder to the
    first blocks. Every block needs a step, so steps >= the number of blocks."""
    starts = list(range(0, max_new_tokens, block_length))
    if steps < len(starts):
        raise UserError(f"--steps={steps} is fewer than the {len(starts)} blocks of "
                        f"--block_length={block_length} in --max_new_tokens={max_new_tokens}; "
                        "every block needs at least one step")
    per_block = transfer_schedule(steps, len(starts))
    return [(s, min(s + block_length, max_new_tokens), n) for s, n in zip(starts, per_block)]


def _unmask_step(graphdef, state, ids_BxL, start, stop, k, mask_id, temperature, key):
    """One step: fills the k most confident masked positions in [start, stop)."""
    rack = nnx.merge(graphdef, state)
    logits_BxLxV = rack(ids_BxL, mode="bidirectional").astype(jnp.float32)
    logits_BxLxV = logits_BxLxV.at[..., mask_id].set(-jnp.inf)  # never predict [MASK]
    # Gumbel-max: argmax(logits + T g) is a draw from softmax(logits / T). The noise (a
    # random number per logit, slow on a CPU) is drawn only when T > 0.
    pred_BxL = jax.lax.cond(
        temperature > 0,
        lambda: jnp.argmax(logits_BxLxV + temperature
                           * jax.random.gumbel(key, logits_BxLxV.shape), axis=-1),
        lambda: jnp.argmax(logits_BxLxV, axis=-1)).astype(ids_BxL.dtype)
    probs_BxLxV = jax.nn.softmax(logits_BxLxV, axis=-1)
    confidence_BxL = jnp.take_along_axis(probs_BxLxV, pred_BxL[..., None], axis=-1)[..., 0]
    pos_L = jnp.arange(ids_BxL.shape[1])
    candidate_BxL = (ids_BxL == mask_id) & (pos_L >= start) & (pos_L < stop)
    confidence_BxL = jnp.where(candidate_BxL, confidence_BxL, -jnp.inf)
    # rank of each position by confidence (0: most confident; ties: the leftmost first)
    order_BxL = jnp.argsort(-confidence_BxL, axis=-1, stable=True)
    rank_BxL = jnp.argsort(order_BxL, axis=-1)
    chosen_BxL = candidate_BxL & (rank_BxL < k)
    return jnp.where(chosen_BxL, pred_BxL, ids_BxL)


_PROGRAMS: dict = {}


def _program(graphdef, m):
    """One jitted step per model config (the GraphDef holds an unhashable ConfigDict)."""
    key = json.dumps(m.to_dict(), sort_keys=True, default=list)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = jax.jit(functools.partial(_unmask_step, graphdef))
    return _PROGRAMS[key]


def diffusion_generate(rack, prompt_ids, max_new_tokens: int, mask_id: int, steps: int,
                       block_length: int = 0, temperature: float = 0.0,
                       seed: int = 0) -> np.ndarray:
    """The prompt followed by max_new_tokens tokens sampled by masked diffusion.

    prompt_ids: (P,) or (B, P) ints. steps: model calls in all. block_length: tokens per
    semi-autoregressive block (0: one block, the whole span). temperature 0: argmax
    predictions (deterministic); > 0: Gumbel-max draws from softmax(logits / temperature),
    seeded by `seed` and the step. Returns (B, P + n) (or (P + n,)) int32.
    """
    ids_BxP, one_row = prompt_rows(prompt_ids)
    for name, value in (("max_new_tokens", max_new_tokens), ("steps", steps)):
        if not (isinstance(value, (int, np.integer)) and value >= 1):
            raise UserError(f"--{name}={value!r} must be an integer >= 1")
    if not (isinstance(block_length, (int, np.integer)) and block_length >= 0):
        raise UserError(f"--block_length={block_length!r} must be an integer >= 0 (0: one block)")
    if not temperature >= 0:
        raise UserError(f"--temperature={temperature} must be >= 0")
    B, P = ids_BxP.shape
    plan = block_plan(max_new_tokens, steps, block_length or max_new_tokens)
    ids_BxL = np.full((B, P + max_new_tokens), mask_id, np.int32)
    ids_BxL[:, :P] = ids_BxP
    ids_BxL = jnp.asarray(ids_BxL)
    graphdef, state = nnx.split(rack)
    step = _program(graphdef, rack.config)
    key = jax.random.key(seed)
    n_step = 0
    for start, stop, block_steps in plan:
        for k in transfer_schedule(stop - start, block_steps):
            if k:  # a block with more steps than tokens: LLaDA's empty steps call nothing
                ids_BxL = step(state, ids_BxL, P + start, P + stop, k, mask_id,
                               jnp.float32(temperature), jax.random.fold_in(key, n_step))
            n_step += 1
    out = np.asarray(ids_BxL)
    return out[0] if one_row else out
