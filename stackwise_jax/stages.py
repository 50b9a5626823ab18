"""What trains in stage k, in one place.

Stage k of a progressive run runs the embedding, stacks 0..k, the final norm and head.
Stacks below the first trainable one form the frozen trunk: they get no gradients and no
optimizer state (they are not in the trainable partition at all), so weight decay never
touches them, and their output passes through stop_gradient when nothing below it trains.
An end-to-end run has one stage in which everything trains.

Parameters travel as plain nested dicts (nnx.to_pure_dict), which optax and Orbax take
as they are; `Partition` merges them back into a Rack inside the jitted step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from stackwise_jax import config as config_lib
from stackwise_jax import quant
from stackwise_jax.model import Rack


COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def compute_dtype(cfg):
    """The dtype the trained stack computes in; its master weights stay float32."""
    return COMPUTE_DTYPES[cfg.training.progressive.new_stack_precision]


def store_frozen(frozen: dict, fmt: str, dtype) -> dict:
    """Frozen parameters as a stage keeps them on the device.

    The frozen stacks become one trunk: their blocks concatenated on the leading (block)
    axis, kernels in their storage format (quant.py; fp32 keeps them as they are). The trunk
    runs as a single scan over every frozen layer, converting one layer at a time to the
    compute dtype. Frozen embedding, norms and head are stored in the compute dtype, which
    is exact: the forward pass would cast them to it anyway."""
    rest = cast_floats({k: v for k, v in frozen.items() if k != "stacks"}, dtype)
    if "stacks" not in frozen:
        return rest
    stored = [frozen["stacks"][k]["blocks"] for k in sorted(frozen["stacks"])]
    if fmt != "fp32":
        stored = [quant.quantize_tree(blocks, fmt) for blocks in stored]
    trunk = stored[0] if len(stored) == 1 else jax.tree.map(
        lambda *xs: jnp.concatenate(xs, axis=0), *stored)
    return {**rest, "trunk": trunk}


def frozen_for_forward(frozen: dict, dtype) -> dict:
    """Frozen embedding, norm and head cast to the compute dtype. Frozen stacks and the
    trunk stay as stored: model.scan_blocks converts each block inside its scan iteration."""
    out = cast_floats({k: v for k, v in frozen.items() if k not in ("stacks", "trunk")}, dtype)
    out.update({k: frozen[k] for k in ("stacks", "trunk") if k in frozen})
    return out


def cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        tree)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    stage: int
    n_stages: int
    first_trainable_stack: int  # stacks below it are the frozen trunk
    n_stacks_run: int  # stacks 0..n_stacks_run-1 run in this stage
    train_embedding: bool
    train_final_norm: bool
    train_head: bool

    @property
    def trunk_is_frozen(self) -> bool:
        """True when nothing below the first trainable stack trains: stop_gradient is exact."""
        return not self.train_embedding

    def trains(self, path: tuple) -> bool:
        """Whether the parameter at `path` (a pure-dict path) trains in this stage."""
        head = path[0]
        if head == "stacks":
            return self.first_trainable_stack <= path[1] < self.n_stacks_run
        if head == "embed":
            return self.train_embedding
        if head == "final_norm":
            return self.train_final_norm
        if head == "head":
            return self.train_head
        raise KeyError(f"unknown parameter group {path}")

    def runs(self, path: tuple) -> bool:
        """Whether the parameter at `path` takes part in this stage's forward pass."""
        return path[0] != "stacks" or path[1] < self.n_stacks_run


def _policy(value: str, stage: int) -> bool:
    return value == "every_stage" or (value == "first_stage" and stage == 0)


def plan_stage(cfg, stage: int) -> StagePlan:
    n_stacks = cfg.model.architecture.n_stacks
    t = cfg.training
    if not t.progressive.enabled:
        first, run = 0, n_stacks
    else:
        first = 0 if t.progressive.trunk_strategy == "trainable" else stage
        run = stage + 1
    return StagePlan(stage=stage, n_stages=config_lib.n_stages(cfg), first_trainable_stack=first,
                     n_stacks_run=run, train_embedding=_policy(t.train_embedding, stage),
                     train_final_norm=_policy(t.train_final_norm, stage),
                     train_head=_policy(t.train_head, stage))


def _split_tree(tree: dict, keep, path=()):
    """Splits a nested dict into (leaves where keep(path), the rest); empty dicts dropped."""
    yes, no = {}, {}
    for k, v in tree.items():
        p = path + (k,)
        if isinstance(v, dict):
            a, b = _split_tree(v, keep, p)
            if a:
                yes[k] = a
            if b:
                no[k] = b
        elif keep(p):
            yes[k] = v
        else:
            no[k] = v
    return yes, no


def merge_trees(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if k in out and isinstance(v, dict) else v
    return out


class Partition:
    """The Rack's structure, and the split of its parameters into trainable and frozen."""

    def __init__(self, rack: Rack, plan: StagePlan):
        self.graphdef, state = nnx.split(rack)
        self.abstract_state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state)
        self.plan = plan

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trainable, frozen) parameters of this stage; stacks that do not run are in neither."""
        used, _ = _split_tree(params, self.plan.runs)
        return _split_tree(used, self.plan.trains)

    def rack(self, trainable: dict, frozen: dict) -> Rack:
        """A Rack of these parameters; those given in neither stay abstract (never run).
        A stored trunk (store_frozen) is not part of the Rack: pass it to stage_hidden."""
        frozen = {k: v for k, v in frozen.items() if k != "trunk"}
        state = nnx.State(jax.tree.map(lambda x: x, self.abstract_state))
        nnx.replace_by_pure_dict(state, merge_trees(trainable, frozen))
        return nnx.merge(self.graphdef, state)


def stage_hidden(rack: Rack, ids_BxL, plan: StagePlan, mode: str, trunk=None):
    """Hidden states leaving the last stack that runs in this stage. The frozen stacks run
    from `trunk` (store_frozen's layout) when given, else from the Rack's own stacks."""
    x_BxLxD = rack.embed(ids_BxL)
    if trunk is not None:
        x_BxLxD = rack.run_trunk(trunk, x_BxLxD, mode)
    else:
        x_BxLxD = rack.run_stacks(x_BxLxD, 0, plan.first_trainable_stack, mode)
    if plan.first_trainable_stack > 0 and plan.trunk_is_frozen:
        x_BxLxD = jax.lax.stop_gradient(x_BxLxD)
    return rack.run_stacks(x_BxLxD, plan.first_trainable_stack, plan.n_stacks_run, mode)
