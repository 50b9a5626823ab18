"""Fusion: the joint phase after all stages, training QLoRA adapters on the whole Rack.

Greedy stage-wise training leaves every stack fitted to the frozen stacks below it as they
were, never adapted together. Fusion trains all layers jointly at the cost of adapters
only: every stack is stored in `training.fusion.base_precision` (nf4 by default, QLoRA)
and frozen, and low-rank adapters on the targeted projections of every block train
through the whole network, with the masked-diffusion objective or causal next-token loss
(which adapts the bidirectionally trained Rack to causal inference). Embedding, final norm
and head stay frozen.

At the end the adapters are merged into the weights the forward pass used, the
dequantised base: W <- deq(Q(W)) + (alpha / r) A @ B, one stack at a time, so the saved
Rack computes exactly what fusion trained and exports like any other run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stackwise_jax import config as config_lib
from stackwise_jax import lora, objective, quant, stages
from stackwise_jax.model import Rack


def enabled(cfg) -> bool:
    return cfg.training.fusion.steps > 0


def is_fusion(cfg, stage: int) -> bool:
    """Fusion runs as the phase after the last stage."""
    return enabled(cfg) and stage == config_lib.n_stages(cfg)


def fusion_plan(cfg) -> stages.StagePlan:
    """Every stack runs, nothing of the Rack's own parameters trains (the adapters do)."""
    n = cfg.model.architecture.n_stacks
    return stages.StagePlan(stage=config_lib.n_stages(cfg), n_stages=config_lib.n_stages(cfg),
                            first_trainable_stack=n, n_stacks_run=n, train_embedding=False,
                            train_final_norm=False, train_head=False)


def partition(template: Rack, cfg) -> stages.Partition:
    return stages.Partition(template, fusion_plan(cfg))


def store_base(partition_: stages.Partition, params: dict, cfg) -> dict:
    """All frozen parameters as fusion keeps them: every stack in one trunk in the base format."""
    _, frozen = partition_.split(params)
    return stages.store_frozen(frozen, cfg.training.fusion.base_precision,
                               stages.compute_dtype(cfg))


def init_adapters(cfg, trunk) -> dict:
    f = cfg.training.fusion
    key = jax.random.fold_in(jax.random.key(cfg.training.seed), config_lib.n_stages(cfg))
    return lora.init_adapters(trunk, f.lora_rank, f.lora_alpha, f.lora_targets, key)


def make_loss_fn(cfg, partition_: stages.Partition, mask_id: int):
    """loss(adapters, frozen, ids_BxL, key): the whole Rack with adapted kernels."""
    t_cfg, f = cfg.training, cfg.training.fusion

    def loss_fn(adapters, frozen, ids_BxL, key):
        rack = partition_.rack({}, frozen)
        chunk = t_cfg.loss_chunk_size

        def hidden(ids, mode):
            x_BxLxD = rack.embed(ids)  # stored in the compute dtype (store_base)
            return rack.run_trunk(frozen["trunk"], x_BxLxD, mode, adapters, f.lora_alpha, f.remat)

        if f.objective == "causal":
            return objective.causal_loss_from_hidden(hidden(ids_BxL, "causal"), rack.logits,
                                                     ids_BxL, chunk)
        inputs_BxL, masked_BxL, t_B = objective.sample_mask(
            key, ids_BxL, t_cfg.min_mask_fraction, t_cfg.max_mask_fraction, mask_id)
        return objective.masked_diffusion_loss_from_hidden(
            hidden(inputs_BxL, "bidirectional"), rack.logits, ids_BxL, masked_BxL, t_B,
            t_cfg.loss_weighting, chunk)

    return loss_fn


def merge(params: dict, frozen: dict, adapters: dict, cfg) -> dict:
    """params with every stack replaced by its dequantised base plus the merged adapters."""
    f, bps = cfg.training.fusion, cfg.model.architecture.blocks_per_stack
    merge_one = jax.jit(lambda base, ad: lora.merge(quant.dequantize_tree(base, jnp.float32),
                                                    ad, f.lora_alpha, f.lora_rank))
    stacks = {}
    for k in range(cfg.model.architecture.n_stacks):
        take = lambda tree: jax.tree.map(lambda x: x[k * bps:(k + 1) * bps], tree)  # noqa: E731
        stacks[k] = {"blocks": merge_one(take(frozen["trunk"]), take(adapters))}
    return {**params, "stacks": stacks}


def adapters_like(cfg, template: Rack) -> dict:
    """Abstract adapters (shapes only), to restore a checkpoint taken during fusion."""
    params = nnx.to_pure_dict(nnx.state(template, nnx.Param))
    part = partition(template, cfg)
    return jax.eval_shape(lambda p: init_adapters(cfg, store_base(part, p, cfg)["trunk"]),
                          jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params))
