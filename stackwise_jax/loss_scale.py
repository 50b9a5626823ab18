"""Dynamic loss scaling for float16 training.

float16 has 5 exponent bits: its smallest subnormal is ~6e-8, and anything below ~3e-8
rounds to zero. Gradients of a mean-reduced loss are routinely that small, so a float16
backward pass silently turns them into zeros. The fix is to multiply the loss by a large
scale S before differentiating, so every cotangent in the backward pass is S times larger
and stays representable, then to divide the gradients by S in float32, where they no longer
underflow.

A scale that is too large overflows instead (float16 max is 65504): some gradient becomes
inf or nan. That step is skipped (parameters and optimizer state keep their old values,
`select_if_finite`) and the scale is divided by `factor`. Since the right scale drifts
during training, after `period` consecutive finite steps the scale is multiplied by
`factor` again, probing for the largest scale that does not overflow.

Functional and jit-compatible: the state is a pytree of two arrays, updated with jnp.where.

    loss, grads, grads_finite = loss_scale.scaled_value_and_grad(loss_fn, ls)(params, batch)
    new_params, new_opt_state = ...optimizer step with grads...
    params, opt_state = loss_scale.select_if_finite(
        grads_finite, (new_params, new_opt_state), (params, opt_state))
    ls = loss_scale.update(ls, grads_finite)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

# Growth stops here. Without a cap, a run whose gradients never overflow (e.g. a float32
# loss) would double the scale every `period` steps until it reaches inf in float32, and
# grads / inf is zero.
MAX_SCALE = 2.0**24


@struct.dataclass
class LossScale:
    """Dynamic loss-scale state; a pytree of two scalar arrays (checkpointable as is)."""
    scale: jax.Array       # float32 scalar: the loss is multiplied by this before grad
    good_steps: jax.Array  # int32 scalar: consecutive finite steps since the last change


def init(initial_scale: float = 2.0**15) -> LossScale:
    """A fresh state.

    2**15 is the largest power of two below float16's max (65504); a float16 loss's
    cotangent is the scale cast to float16, so any larger scale is inf at the first step.
    """
    return LossScale(scale=jnp.asarray(initial_scale, jnp.float32),
                     good_steps=jnp.zeros((), jnp.int32))


def all_finite(tree) -> jax.Array:
    """Bool scalar: every element of every leaf of `tree` is finite."""
    leaf_finite = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
    return functools.reduce(jnp.logical_and, leaf_finite, jnp.asarray(True))


def scaled_value_and_grad(loss_fn, state: LossScale):
    """Like jax.value_and_grad(loss_fn), but the backward pass runs on loss * state.scale.

    Returns f(*args) -> (loss, grads, grads_finite): loss unscaled in float32, grads with
    respect to the first argument, unscaled and in float32, grads_finite a bool scalar.
    """

    def scaled_loss_fn(*args):
        loss = loss_fn(*args)
        # Multiply in float32 so the scaled loss itself cannot overflow; its cotangent
        # (the scale, cast to the loss dtype) is what enters the float16 backward pass.
        # The unscaled loss rides along as aux: dividing the scaled one back would lose it
        # whenever the scale overflowed.
        loss_f32 = loss.astype(jnp.float32)
        return loss_f32 * state.scale, loss_f32

    grad_fn = jax.grad(scaled_loss_fn, has_aux=True)

    def value_and_unscaled_grad(*args):
        scaled_grads, loss = grad_fn(*args)
        # Unscale in float32: dividing in float16 would underflow exactly the values the
        # scale was protecting.
        inv_scale = 1.0 / state.scale
        grads = jax.tree.map(lambda g: g.astype(jnp.float32) * inv_scale, scaled_grads)
        return loss, grads, all_finite(grads)

    return value_and_unscaled_grad


def update(state: LossScale, grads_finite, period: int = 2000, factor: float = 2.0,
           min_scale: float = 1.0) -> LossScale:
    """The state after one step whose gradients were (grads_finite) or were not finite."""
    grads_finite = jnp.asarray(grads_finite, jnp.bool_)
    good_steps = state.good_steps + 1
    grow = good_steps >= period
    grown_scale = jnp.minimum(state.scale * factor, MAX_SCALE)
    # The floor keeps a long run of overflows (e.g. a genuinely nan loss) from driving
    # the scale to zero, from where it could never recover.
    shrunk_scale = jnp.maximum(state.scale / factor, min_scale)
    scale = jnp.where(grads_finite, jnp.where(grow, grown_scale, state.scale), shrunk_scale)
    good_steps = jnp.where(grads_finite & ~grow, good_steps, 0)
    return LossScale(scale=scale.astype(jnp.float32), good_steps=good_steps.astype(jnp.int32))


def select_if_finite(grads_finite, new_tree, old_tree):
    """new_tree where grads_finite, else old_tree, leaf by leaf (dtypes kept).

    Used to skip an optimizer step whose gradients overflowed: pass (params, opt_state)
    after and before the update. Both branches are computed; only the result is selected,
    which is what keeps it free of Python control flow under jit.
    """
    grads_finite = jnp.asarray(grads_finite, jnp.bool_)

    def select(new, old):
        old = jnp.asarray(old)
        return jnp.where(grads_finite, new, old).astype(old.dtype)

    return jax.tree.map(select, new_tree, old_tree)
