"""Fusion: the joint phase after all stages, training QLoRA adapters on the whole Rack.

Greedy stage-wise training leaves every stack fitted to the frozen stacks below it as they
were, never adapted together. Fusion trains all layers jointly at the cost of adapters
only: every stack is held in `training.fusion.base_precision` (nf4 by default, QLoRA) and
frozen, and low-rank adapters on the targeted projections of every block train through
the whole network, with the masked-diffusion objective or causal next-token loss (which
adapts the bidirectionally trained Rack to causal inference). Embedding, final norm and
head stay frozen. phases.fusion describes the phase; step.make_loss_sum runs it.

At the end the adapters are merged into the weights the forward pass used, the
dequantised base: W <- deq(Q(W)) + (alpha / r) A @ B, one stack at a time, each written
as a new version of its store, so the stored Rack computes exactly what fusion trained
and exports like any other run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stackwise_jax import lora, memory, quant, store


def merge_fn(cfg):
    """merged(base, adapters) -> float32 blocks: one stack's slices of the resident base and
    of the adapters merged (the planner compiles it to see what it leaves on each device)."""
    f = cfg.training.fusion
    return jax.jit(lambda base, ad: lora.merge(quant.dequantize_tree(base, jnp.float32),
                                               ad, f.lora_alpha, f.lora_rank))


def merge_stack(cfg, trunk: dict, adapters: dict, k: int) -> dict:
    """Stack k's merged weights (float32): its slice of the resident base, plus adapters."""
    bps = cfg.model.architecture.blocks_per_stack

    def take(tree):
        return jax.tree.map(lambda x: x[k * bps:(k + 1) * bps], tree)

    return {"blocks": merge_fn(cfg)(take(trunk), take(adapters))}


def store_merged(cfg, run_dir: str, trunk: dict, adapters: dict, version: int) -> None:
    """Writes every stack, merged, as `version` of its store; one stack is dense at a time."""
    dtype = cfg.training.progressive.stack_storage_dtype
    for k in range(cfg.model.architecture.n_stacks):
        stack = merge_stack(cfg, trunk, adapters, k)
        memory.sample()
        store.write(run_dir, store.stack_group(k), version, stack, dtype)
        del stack
