"""QLoRA adapters: low-rank updates trained on top of frozen (quantised) stacks.

For a targeted kernel W (b, in, out) the adapter is A (b, in, r), B (b, r, out) and the
layer uses W + (alpha / r) * A @ B (Hu et al. 2021). A starts Gaussian with std 1/sqrt(in)
and B at zero, so the adapted model starts exactly equal to the base; alpha / r keeps the
update's size roughly independent of the rank.

Adapters are a nested dict mirroring the parameter tree, holding only the targeted
projections ({"blocks": {"attn": {"q_proj": {"lora_a": A, "lora_b": B}}}}); they work on a
stack's tree or on any tree that contains stacks (a whole Rack's pure dict).

In the fusion step, take gradients w.r.t. the adapters only: the base goes in as a
separate, non-differentiated argument (a tree of quant.QTensor, dequantised inside jit),
so it needs no gradient buffers and no optimizer state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stackwise_jax.errors import UserError

# GQA and linear attention: q, k, v, o; MLA (attention.py): q (or q_a, q_b), kv_a, kv_b, o.
# A target the model's attention lacks is skipped (config.validate wants one that exists).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


def _check(targets, rank: int) -> tuple[str, ...]:
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise UserError(f"LoRA targets are empty: choose some of {', '.join(PROJECTIONS)}")
    for t in targets:
        if t not in PROJECTIONS:
            raise UserError(f"LoRA target {t!r} is not a projection: choose from "
                            f"{', '.join(PROJECTIONS)}")
    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    return targets


def _find(tree: dict, targets, path=()):
    """Paths of the dicts {'kernel': ...} named after a target, in tree order."""
    for k, v in tree.items():
        if not isinstance(v, dict):
            continue
        if k in targets and "kernel" in v:
            yield path + (k,), v["kernel"]
        else:
            yield from _find(v, targets, path + (k,))


def _set(tree: dict, path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def init_adapters(stack_params: dict, rank: int, alpha: float, targets, key) -> dict:
    """Adapters (float32) for every kernel of `stack_params` named in `targets`.

    Kernels may be dense arrays or quant.QTensor (only their shapes are read). `alpha` is
    not needed to initialise, but is validated here so a bad config fails before training.
    """
    targets = _check(targets, rank)
    if not alpha > 0:
        raise UserError(f"LoRA alpha must be > 0, got {alpha!r}")
    found = [(path, kernel.shape) for path, kernel in _find(stack_params, targets)]
    if not found:
        raise ValueError(f"no kernel of {targets} in this parameter tree")

    def make(key):  # one compiled function rather than an eager random call per kernel
        adapters: dict = {}
        for (path, shape), k in zip(found, jax.random.split(key, len(found))):
            *lead, d_in, d_out = shape
            a_BxIxR = jax.random.normal(k, (*lead, d_in, rank), jnp.float32) / jnp.sqrt(d_in)
            b_BxRxO = jnp.zeros((*lead, rank, d_out), jnp.float32)
            _set(adapters, path, {"lora_a": a_BxIxR, "lora_b": b_BxRxO})
        return adapters

    return jax.jit(make)(key)


def _adapted(kernel, adapter, alpha, rank):
    a_BxIxR, b_BxRxO = adapter["lora_a"], adapter["lora_b"]
    if a_BxIxR.shape[-1] != rank:
        raise ValueError(f"adapter rank {a_BxIxR.shape[-1]} != rank {rank}")
    # The update is formed in float32; the sum is cast back to the base's compute dtype.
    # With a bf16 base, an update below half a bf16 ulp of W is invisible in the forward
    # (gradients still reach A and B); dequantise to float32 where that matters.
    delta_BxIxO = (alpha / rank) * jnp.matmul(a_BxIxR, b_BxRxO)
    return (kernel.astype(jnp.float32) + delta_BxIxO).astype(kernel.dtype)


def apply_adapters(base_params_dense: dict, adapters: dict, alpha: float, rank: int) -> dict:
    """Params with each targeted kernel replaced by W + (alpha / rank) * A @ B.

    Jit-safe; subtrees without adapters are returned as the same objects.
    """
    out = dict(base_params_dense)
    for k, sub in adapters.items():
        if "lora_a" in sub:
            out[k] = {**base_params_dense[k],
                      "kernel": _adapted(base_params_dense[k]["kernel"], sub, alpha, rank)}
        else:
            out[k] = apply_adapters(base_params_dense[k], sub, alpha, rank)
    return out


def merge(base_params_dense: dict, adapters: dict, alpha: float, rank: int) -> dict:
    """Adapters folded into the weights, for export: the same maths as apply_adapters."""
    return apply_adapters(base_params_dense, adapters, alpha, rank)
