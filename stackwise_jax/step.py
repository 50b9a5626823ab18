"""A phase's loss and its jitted train step: shared by training, the planner and the tests.

The loss is one function for every phase (phases.Phase says which parts exist):

    tokens -> embedding ─┐
    cache rows ──────────┴> frozen trunk (one scan; LoRA adapters in fusion)
      -> stop_gradient (when nothing below trains) -> trained stacks
      -> frozen upper stacks (block fusion) -> final norm, head

The step prepares the whole batch (masks for every sequence at once), splits it into
`training.grad_accum_steps` micro-batches whose gradients are summed in float32 (a scan:
one micro-batch's activations live at a time), and applies the update only when the loss
and every gradient are finite (optim.apply_if_finite); it returns that flag too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from stackwise_jax import config as config_lib, loss_scale, objective, optim, sharding
from stackwise_jax.phases import Phase
from stackwise_jax.resident import Template, cast_floats, compute_dtype


def weighting_of(cfg, phase: Phase) -> str:
    """Causal loss is a plain mean over predicted positions."""
    return "mean" if phase.objective == "causal" else cfg.training.loss_weighting


def mode_of(phase: Phase) -> str:
    return "causal" if phase.objective == "causal" else "bidirectional"


def make_loss_sum(cfg, phase: Phase, template: Template):
    """loss_sum(trainable, frozen, prepared_batch): the loss numerator of `phase`."""
    dtype, mode = compute_dtype(cfg), mode_of(phase)
    weighting, chunk = weighting_of(cfg, phase), cfg.training.loss_chunk_size
    alpha = cfg.training.fusion.lora_alpha

    def loss_sum(trainable, frozen, batch):
        # Master weights stay float32; the forward pass runs in the compute dtype (frozen
        # top groups are held in it already, the trunk converts one layer at a time).
        own = cast_floats({k: v for k, v in trainable.items() if k != "adapters"}, dtype)
        # On an fsdp mesh the head is gathered by its matmul (the stacks' kernels one layer
        # at a time, in model.scan_blocks; sharding.py); the embedding, see gathered_top.
        own, top = gathered_top(own, cfg.model), gathered_top(frozen, cfg.model)
        rack = template.rack(own, top)
        if phase.inputs == "cache":
            x_BxLxD = batch["hidden"].astype(dtype)
        else:
            x_BxLxD = rack.embed(batch["inputs"]).astype(dtype)
        x_BxLxD = sharding.rows(x_BxLxD)
        if "trunk" in frozen:
            x_BxLxD = rack.run_trunk(frozen["trunk"], x_BxLxD, mode, trainable.get("adapters"),
                                     alpha, phase.remat)
        if phase.stop_gradient:
            x_BxLxD = jax.lax.stop_gradient(x_BxLxD)
        if sharding.active_layout() is not None and phase.n_local_stacks > 1:
            # On an fsdp mesh the trained stacks run as one scan over all their layers:
            # stacks of one layer each would be scans of length 1, which XLA unrolls and
            # then merges their weight gathers and gradient reductions across layers.
            blocks = jax.tree.map(lambda *b: jnp.concatenate(b),
                                  *[own["stacks"][i]["blocks"] for i in range(phase.n_local_stacks)])
            x_BxLxD = rack.run_trunk(blocks, x_BxLxD, mode, remat=cfg.model.remat)
        else:
            x_BxLxD = rack.run_stacks(x_BxLxD, 0, phase.n_local_stacks, mode)
        if "upper" in frozen:  # block fusion: frozen stacks above, gradients cross them
            x_BxLxD = rack.run_trunk(frozen["upper"], x_BxLxD, mode, remat=phase.remat)
        return objective.loss_numerator(sharding.rows(x_BxLxD), rack.logits, batch,
                                        weighting, chunk)

    return loss_sum


def gathered_top(params: dict, model_cfg) -> dict:
    """params with the final norm and head as the step reads them on an fsdp mesh
    (sharding.gathered_weights). The embedding table is gathered only where it is the head
    or tensor splits it too: split over fsdp alone, its lookup gathers the token ids (a few
    bytes a token) and its gradient stays a shard; split over both, XLA's partitioner
    rematerialises the looked-up rows of the whole batch on every device instead."""
    groups = ["final_norm", "head"]
    layout = sharding.active_layout()
    if model_cfg.tie_embeddings or (layout is not None and layout.sizes["tensor"] > 1):
        groups.append("embed")
    top = sharding.gathered_weights({k: v for k, v in params.items() if k in groups})
    return {**params, **top}


def optimizer_for(cfg, phase: Phase):
    """The optimizer of `phase`: a warmup + cosine schedule over its steps. Fusion's phases
    run at training.fusion.learning_rate; block fusion's turns share one schedule over all
    of fusion's steps, each turn starting fresh Adam moments where the last one stopped."""
    t = cfg.training
    if phase.kind == "stage":
        return optim.make_optimizer(t, max(phase.n_steps, 1))
    if phase.kind == "fusion":
        return optim.make_optimizer(t, max(phase.n_steps, 1), t.fusion.learning_rate)
    turn = phase.index - config_lib.n_stages(cfg)
    return optim.make_optimizer(t, t.fusion.steps, t.fusion.learning_rate,
                                offset=turn * phase.n_steps)


def make_prepare(phase: Phase, mask_id: int):
    """prepare(batch, key): token ids (B, L) or cache rows -> a prepared batch."""
    if phase.inputs == "cache":
        return lambda rows, key: objective.prepare_cached(rows)
    return lambda ids, key: objective.prepare_tokens(key, ids, phase.objective,
                                                     phase.mask_range, mask_id)


def make_train_step(loss_sum, prepare, tx, weighting: str, accum: int, layout=None,
                    state_shardings=None):
    """step(trainable, frozen, opt_state, batch, key) -> (trainable, opt_state, loss, finite).
    trainable and opt_state are donated: updated in place.

    On a mesh (layout, a sharding.Layout), state_shardings = (trainable's, opt_state's)
    pins the updated state to the layout its inputs came in, so every step sees the same
    shardings (one compilation) and the donated buffers are reused; everything in between
    is left to jit's SPMD partitioner."""
    out_shardings = None
    if state_shardings is not None:
        scalar = layout.replicated()
        out_shardings = (*state_shardings, scalar, scalar)

    @functools.partial(jax.jit, donate_argnums=(0, 2), out_shardings=out_shardings)
    def train_step(trainable, frozen, opt_state, batch, key):
        with sharding.step_layout(layout):  # the FSDP program on an fsdp mesh
            return traced_step(trainable, frozen, opt_state, batch, key)

    def traced_step(trainable, frozen, opt_state, batch, key):
        batch = prepare(batch, key)
        denominator = objective.loss_denominator(batch, weighting)

        def loss_fn(tr, micro):
            return loss_sum(tr, frozen, micro).astype(jnp.float32) / denominator

        if isinstance(opt_state, optim.LossScaledState):  # fp16: backward on loss * scale
            grad_fn = loss_scale.scaled_value_and_grad(loss_fn, opt_state.loss_scale)
        else:
            plain = jax.value_and_grad(loss_fn)

            def grad_fn(tr, micro):
                loss, grads = plain(tr, micro)
                return loss, grads, loss_scale.all_finite(grads)

        if accum == 1:
            loss, grads, finite = grad_fn(trainable, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape((accum, -1) + x.shape[1:]), batch)
            if layout is not None:  # each micro-batch split by rows, as the whole batch is
                micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
                    x, _micro_sharding(layout, x)), micro)

            def body(carry, one):
                loss, grads, finite = carry
                l, g, f = grad_fn(trainable, one)
                return (loss + l, jax.tree.map(jnp.add, grads, g), finite & f), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
            (loss, grads, finite), _ = jax.lax.scan(
                body, (jnp.float32(0), zeros, jnp.asarray(True)), micro)
        finite = finite & jnp.isfinite(loss)
        trainable, opt_state = optim.apply_if_finite(tx, grads, opt_state, trainable, finite)
        return trainable, opt_state, loss, finite

    return train_step


def _micro_sharding(layout, x_AxBx):
    """Micro-batches (accum, B, ...): rows B over the batch axes, accum whole per device."""
    rows = layout.batch_sharding(x_AxBx.shape[1], x_AxBx.ndim - 1).spec
    return layout.named(jax.sharding.PartitionSpec(None, *rows))


def build(cfg, phase: Phase, tx, mask_id: int, layout=None, state_shardings=None):
    """The jitted train step of `phase`, and its Template (layout, state_shardings: see
    make_train_step)."""
    template = Template(cfg.model, phase.n_local_stacks)
    step = make_train_step(make_loss_sum(cfg, phase, template), make_prepare(phase, mask_id), tx,
                           weighting_of(cfg, phase), cfg.training.grad_accum_steps, layout,
                           state_shardings)
    return step, template


def step_key(seed: int, stage: int, step: int):
    """Mask randomness depends only on (seed, stage, step), so a resumed run redraws it exactly."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stage), step)
