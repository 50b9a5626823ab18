"""The jitted train step and the loss of a stage: shared by training and the planner."""

from __future__ import annotations

import functools

import jax
import optax

from stackwise_jax import loss_scale, objective, stages
from stackwise_jax.optim import LossScaledState


def make_loss_fn(cfg, partition: stages.Partition, mask_range, mask_id: int):
    """loss(trainable, frozen, ids_BxL, key) for this stage's plan and objective."""
    t_cfg, plan = cfg.training, partition.plan
    dtype = stages.compute_dtype(cfg)

    def loss_fn(trainable, frozen, ids_BxL, key):
        # Master weights stay float32; the forward pass runs in the compute dtype.
        frozen = stages.frozen_for_forward(frozen, dtype)
        rack = partition.rack(stages.cast_floats(trainable, dtype), frozen)
        trunk, chunk = frozen.get("trunk"), t_cfg.loss_chunk_size
        if t_cfg.objective == "causal":
            hidden_BxLxD = stages.stage_hidden(rack, ids_BxL, plan, "causal", trunk)
            return objective.causal_loss_from_hidden(hidden_BxLxD, rack.logits, ids_BxL, chunk)
        inputs_BxL, masked_BxL, t_B = objective.sample_mask(key, ids_BxL, *mask_range, mask_id)
        hidden_BxLxD = stages.stage_hidden(rack, inputs_BxL, plan, "bidirectional", trunk)
        return objective.masked_diffusion_loss_from_hidden(
            hidden_BxLxD, rack.logits, ids_BxL, masked_BxL, t_B, t_cfg.loss_weighting, chunk)

    return loss_fn


def make_train_step(loss_fn, tx):
    @functools.partial(jax.jit, donate_argnums=(0, 2))
    def train_step(trainable, frozen, opt_state, ids_BxL, key):
        if isinstance(opt_state, LossScaledState):  # fp16: scale the loss up first
            loss, grads, _ = loss_scale.scaled_value_and_grad(loss_fn, opt_state.loss_scale)(
                trainable, frozen, ids_BxL, key)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids_BxL, key)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return train_step


def step_key(seed: int, stage: int, step: int):
    """Mask randomness depends only on (seed, stage, step), so a resumed run redraws it exactly."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stage), step)
