"""The optimizer: AdamW with warmup and cosine decay, moments in fp32 or bf16; skipped steps.

Adam keeps two moments per trained parameter, twice the parameters' own bytes in fp32:
for one 70B block plus the untied head that is 14 GiB. `training.optimizer_state_dtype=
'bf16'` stores both moments in bfloat16 (computed in float32 each step, rounded when
stored), halving that. It is safe with this optimizer's betas: each step moves a moment
by (1 - beta) of the new value, 10% and 5% for b1=0.9 and b2=0.95, far above bf16's
relative resolution (2^-8). With b2=0.999 an increment of 0.1% would round away.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from stackwise_jax import loss_scale

B1, B2, EPS = 0.9, 0.95, 1e-8
STATE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


class AdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam(state_dtype) -> optax.GradientTransformation:
    """optax.scale_by_adam's maths with both moments stored in `state_dtype`."""
    if jnp.dtype(state_dtype) == jnp.float32:
        return optax.scale_by_adam(B1, B2, EPS)

    def init(params):
        # Two separate trees: the train step donates the state, and a buffer shared by mu
        # and nu would be donated twice.
        zeros = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, state_dtype), params)  # noqa: E731
        return AdamState(jnp.zeros([], jnp.int32), zeros(), zeros())

    def update(grads, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        # The moments are rounded to state_dtype before the update reads them, so no
        # float32 copy of a moment tree is ever materialised.
        mu = jax.tree.map(lambda m, g: (B1 * m.astype(jnp.float32) + (1 - B1) * g)
                          .astype(state_dtype), state.mu, grads)
        nu = jax.tree.map(lambda v, g: (B2 * v.astype(jnp.float32) + (1 - B2) * jnp.square(g))
                          .astype(state_dtype), state.nu, grads)
        mu_hat_scale, nu_hat_scale = 1 - B1 ** count, 1 - B2 ** count
        updates = jax.tree.map(
            lambda m, v: (m.astype(jnp.float32) / mu_hat_scale)
            / (jnp.sqrt(v.astype(jnp.float32) / nu_hat_scale) + EPS), mu, nu)
        return updates, AdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


# Leaves that are matrices: projections and head ("kernel"), the embedding, LoRA factors.
# RMSNorm gains are never decayed: a stack's norms are (blocks_per_stack, d_model), so a
# rule by ndim would decay them toward zero, shrinking every normalised activation.
DECAYED_LEAVES = ("kernel", "embedding", "lora_a", "lora_b")


def decay_mask(params):
    """True for the leaves weight decay applies to (by name, not by shape)."""
    def decayed(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return name in DECAYED_LEAVES
    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(t_cfg, n_steps: int, learning_rate: float | None = None,
                   offset: int = 0) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay over n_steps; weight decay on matrices only.
    learning_rate: peak rate, training.learning_rate unless given (fusion has its own).
    offset: the schedule starts at this step (a phase that continues a longer schedule
    with fresh moments: block fusion's turns)."""
    peak = t_cfg.learning_rate if learning_rate is None else learning_rate
    full = optax.warmup_cosine_decay_schedule(
        0.0, peak, t_cfg.warmup_steps, max(n_steps, t_cfg.warmup_steps + 1),
        end_value=0.1 * peak)
    schedule = full if offset == 0 else (lambda count: full(count + offset))
    adamw = optax.chain(
        scale_by_adam(STATE_DTYPES[t_cfg.optimizer_state_dtype]),
        optax.add_decayed_weights(t_cfg.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule))
    if t_cfg.grad_clip_norm > 0:
        adamw = optax.chain(optax.clip_by_global_norm(t_cfg.grad_clip_norm), adamw)
    return adamw


class LossScaledState(NamedTuple):
    """fp16 training: the optimizer's state and the dynamic loss scale (loss_scale.py)."""
    inner: optax.OptState
    loss_scale: loss_scale.LossScale


def init_state(tx, params, t_cfg):
    """The optimizer state for `params`; with fp16 compute it carries the loss scale."""
    if t_cfg.progressive.new_stack_precision == "fp16":
        return LossScaledState(tx.init(params), loss_scale.init())
    return tx.init(params)


def apply_if_finite(tx, grads, opt_state, params, finite):
    """One optimizer step, or none at all where `finite` is False (a step whose loss or
    gradients overflowed or are NaN, in any precision): parameters and optimizer state
    keep their values. An fp16 loss scale moves either way (loss_scale.update)."""
    scaled = isinstance(opt_state, LossScaledState)
    inner = opt_state.inner if scaled else opt_state
    updates, new_inner = tx.update(grads, inner, params)
    new_params = optax.apply_updates(params, updates)
    params, inner = loss_scale.select_if_finite(finite, (new_params, new_inner), (params, inner))
    if scaled:
        return params, LossScaledState(inner, loss_scale.update(opt_state.loss_scale, finite))
    return params, inner
