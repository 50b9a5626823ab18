"""What a phase holds on the device, and how each part comes to exist.

- Born: a group trained for the first time is initialised from a key derived from
  (training.seed, group) alone: stack k from (seed, k), the embedding, final norm and head
  together from (seed, 'top'). Order of creation and resume points change nothing.
- Loaded: a group some earlier phase stored is read from its store (store.py), one array
  at a time: trainable groups as float32 master weights, frozen top groups directly in
  the compute dtype (exact: the forward pass would cast them anyway).
- Assembled: the frozen trunk (phases.Phase.trunk_stacks) is preallocated in its resident
  format and filled stack by stack, array by array: each stored array is copied to the
  device, converted (quant.py) and written into its slot in place (a donated buffer), so
  the float32 trunk never exists and the trunk and its parts are never live together.

`Template` turns the trainable and frozen trees back into a Rack inside the jitted step.

Every function that puts arrays on devices takes an optional `layout` (sharding.Layout):
with one, each array goes straight to its shards on the mesh (a stored array is copied
from the host to its shards, a trunk slot is born sharded); without one, to the default
device as on a single device.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from stackwise_jax import fusion, lora, memory, quant, store
from stackwise_jax import sharding as sharding_lib
from stackwise_jax.model import Rack, Stack
from stackwise_jax.phases import Phase

COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
_TOP_SALT, _STACK_SALT, _ADAPTER_SALT = 0x70F, 0x57AC, 0xADA


def compute_dtype(cfg):
    """The dtype the trained stacks compute in; their master weights stay float32."""
    return COMPUTE_DTYPES[cfg.training.progressive.new_stack_precision]


def cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        tree)


def local_model(model_cfg, n_stacks: int):
    """The model config with n_stacks stacks: the Rack a phase's step builds."""
    m = model_cfg.copy_and_resolve_references()
    m.architecture.n_stacks = n_stacks
    return m


class Template:
    """The structure of a phase's Rack (its trained stacks as stacks 0..n-1), nothing allocated."""

    def __init__(self, model_cfg, n_stacks: int):
        rack = nnx.eval_shape(lambda: Rack(local_model(model_cfg, n_stacks), nnx.Rngs(0)))
        self.graphdef, state = nnx.split(rack)
        self.abstract_state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state)

    def rack(self, trainable: dict, frozen: dict) -> Rack:
        """A Rack of these parameters; groups given in neither stay abstract (never run).
        Adapters and the frozen stacks are not part of the Rack (see step.make_loss_sum)."""
        params = {k: v for k, v in {**frozen, **trainable}.items()
                  if k not in ("trunk", "upper", "adapters")}
        state = nnx.State(jax.tree.map(lambda x: x, self.abstract_state))
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)


# ----------------------------------------------------------------------------- born


def _seed_key(cfg, salt: int):
    return jax.random.fold_in(jax.random.key(cfg.training.seed), salt)


def init_top(cfg) -> dict:
    """{embed, final_norm, head} as born with stage 0 (head absent when tied)."""
    return _initializer(_model_json(cfg.model), "top")(_seed_key(cfg, _TOP_SALT))


def init_stack(cfg, k: int) -> dict:
    """{"blocks": ...} of stack k, a function of (training.seed, k) only."""
    key = jax.random.fold_in(_seed_key(cfg, _STACK_SALT), k)
    return _initializer(_model_json(cfg.model), "stack")(key)


def _model_json(model_cfg) -> str:
    return model_cfg.to_json(sort_keys=True)


@functools.lru_cache(maxsize=8)
def _initializer(model_json: str, what: str):
    """The jitted initialiser of a stack or of the top groups, compiled once per model."""
    import ml_collections

    m = ml_collections.ConfigDict(json.loads(model_json))
    if what == "top":
        m = local_model(m, 0)
        return jax.jit(lambda k: nnx.to_pure_dict(nnx.state(Rack(m, nnx.Rngs(k)), nnx.Param)))
    return jax.jit(lambda k: nnx.to_pure_dict(nnx.state(Stack(m, nnx.Rngs(k)), nnx.Param)))


def init_adapters(cfg, trunk) -> dict:
    f = cfg.training.fusion
    return lora.init_adapters(trunk, f.lora_rank, f.lora_alpha, f.lora_targets,
                              _seed_key(cfg, _ADAPTER_SALT))


def abstract_stack(cfg) -> dict:
    return jax.eval_shape(lambda: init_stack(cfg, 0))


def abstract_top(cfg) -> dict:
    return jax.eval_shape(lambda: init_top(cfg))


# ----------------------------------------------------------------------------- loaded


def _to_device(tree, dtype, shardings=None):
    def put(x, sharding=None):
        host = np.asarray(x)
        host = host.astype(ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else dtype, copy=False)
        out = sharding_lib.place(host, sharding)
        memory.sample()
        return out

    if shardings is None:
        return jax.tree.map(put, tree)
    return jax.tree.map(put, tree, shardings)


def load_group(run_dir: str, group: str, max_version: int, dtype=jnp.float32, why: str = "",
               layout=None):
    """The newest stored version <= max_version of `group`, on the device in `dtype`."""
    s = store.require(run_dir, group, max_version, why or "this phase")
    tree = s.tree()
    # The rules read a leaf's module name: the group's own name is its first key.
    shardings = None if layout is None else layout.shardings({group: tree})[group]
    return _to_device(tree, dtype, shardings)


def place(tree, layout):
    """`tree` on the mesh by the layout's rules; as it is without a layout."""
    return tree if layout is None else layout.put(tree)


def group_available(run_dir: str, group: str, max_version: int) -> bool:
    return store.newest(run_dir, group, max_version) is not None


def trainable_at_start(cfg, run_dir: str, phase: Phase, trunk=None, layout=None) -> dict:
    """What `phase` trains, as it is at its first step: loaded where an earlier phase (or
    an import) stored it, born otherwise. Fusion: fresh adapters over `trunk`."""
    if phase.adapters:
        return {"adapters": place(init_adapters(cfg, trunk), layout)}
    out: dict = {}
    top = None
    for g in sorted(phase.train_top):
        if group_available(run_dir, g, phase.index) or phase.index > 0:  # born with stage 0
            out[g] = load_group(run_dir, g, phase.index, why=phase.name, layout=layout)
        else:
            top = init_top(cfg) if top is None else top
            out[g] = top[g]
    stacks = {}
    copy = cfg.training.progressive.new_stack_init == "copy"
    for i, k in enumerate(phase.trained_stacks):
        group = store.stack_group(k)
        # Stored by an earlier phase (a growing trunk's older stacks, block fusion, an
        # import), else born: from its own key, or as a copy of the stack below it.
        if group_available(run_dir, group, phase.index):
            stacks[i] = load_group(run_dir, group, phase.index, layout=layout)
        elif phase.kind != "stage" or k < phase.index:
            store.require(run_dir, group, phase.index, phase.name)  # raises, naming the stack
        elif copy and k > 0:
            stacks[i] = load_group(run_dir, store.stack_group(k - 1), phase.index,
                                   why=f"{phase.name} (new_stack_init='copy')", layout=layout)
        else:
            stacks[i] = init_stack(cfg, k)
        stacks[i] = place(stacks[i], layout)  # one stack at a time
        memory.sample()
    if stacks:
        out["stacks"] = stacks
    del top
    return place(out, layout)  # born top groups; what is placed already stays


def frozen_top(cfg, run_dir: str, phase: Phase, layout=None) -> dict:
    """The frozen top groups the phase needs, in the compute dtype; born at stage 0."""
    dtype = compute_dtype(cfg)
    needed = [g for g in sorted(phase.frozen_top) if g != "embed" or phase.needs_embedding]
    out = {}
    for g in needed:
        if group_available(run_dir, g, phase.index):
            out[g] = load_group(run_dir, g, phase.index, dtype, phase.name, layout)
        elif phase.index == 0:
            out[g] = place({g: cast_floats(init_top(cfg)[g], dtype)}, layout)[g]
        else:
            store.require(run_dir, g, phase.index, phase.name)  # raises, naming the group
    return out


# ----------------------------------------------------------------------------- the trunk


def _resident_leaf(name: str, leaf, fmt: str):
    """One stored array in its resident format: kernels quantised, norms kept in float32."""
    x = jnp.asarray(leaf).astype(jnp.float32)
    if fmt == "fp32" or not name.endswith("kernel") or x.ndim < 3:
        return x
    return quant.quantize(x, fmt)


def _fill_leaf(trunk_leaf, stored_leaf, offset, name: str, fmt: str):
    piece = _resident_leaf(name, stored_leaf, fmt)
    return jax.tree.map(lambda t, p: jax.lax.dynamic_update_slice_in_dim(t, p, offset, axis=0),
                        trunk_leaf, piece)


_fill = jax.jit(_fill_leaf, static_argnames=("name", "fmt"), donate_argnums=(0,))


@functools.lru_cache(maxsize=64)
def _sharded_fill(name: str, fmt: str, out_sharding):
    """_fill whose result keeps the trunk slot's sharding (the donated buffer's)."""
    return jax.jit(functools.partial(_fill_leaf, name=name, fmt=fmt), donate_argnums=(0,),
                   out_shardings=out_sharding)


def abstract_trunk(cfg, n_stacks: int, fmt: str) -> dict:
    """Shapes of a trunk of n_stacks stacks in format `fmt` (what assemble_trunk returns)."""
    bps = cfg.model.architecture.blocks_per_stack
    blocks = store.flatten(abstract_stack(cfg)["blocks"])
    out = {}
    for name, leaf in blocks.items():
        shape = (n_stacks * bps,) + tuple(leaf.shape[1:])
        out[name] = jax.eval_shape(lambda x, n=name: _resident_leaf(n, x, fmt),
                                   jax.ShapeDtypeStruct(shape, jnp.float32))
    return store.unflatten(out)


def assemble_trunk(cfg, run_dir: str, stacks, fmt: str, max_version: int, why: str,
                   layout=None) -> dict:
    """The frozen stacks `stacks`, concatenated on the block axis, in resident format `fmt`.
    With a layout, each slot is born sharded and each stored array goes to the shards of
    its dense layout before it is converted: no device ever holds a whole trunk array."""
    bps = cfg.model.architecture.blocks_per_stack
    abstract = store.flatten(abstract_trunk(cfg, len(stacks), fmt))
    slots = dense = None
    if layout is not None:
        slots = layout.shardings(abstract_trunk(cfg, len(stacks), fmt))
        slots = store.flatten(slots)
        dense = store.flatten(layout.shardings(abstract_stack(cfg)["blocks"]))
    trunk = {name: jax.tree.map(
        lambda a, s=None: jnp.zeros(a.shape, a.dtype, device=s), leaf,
        *(() if slots is None else (slots[name],)))
        for name, leaf in abstract.items()}
    memory.sample()
    for j, k in enumerate(stacks):
        stored = store.require(run_dir, store.stack_group(k), max_version, why)
        for name in trunk:
            leaf = sharding_lib.place(stored.read("blocks." + name),
                                      None if dense is None else dense[name])
            memory.sample()
            if layout is None:
                trunk[name] = _fill(trunk[name], leaf, j * bps, name=name, fmt=fmt)
            else:
                trunk[name] = _sharded_fill(name, fmt, slots[name])(trunk[name], leaf, j * bps)
            del leaf
        memory.sample()
    return store.unflatten(trunk)


def frozen_state(cfg, run_dir: str, phase: Phase, layout=None) -> dict:
    """Everything frozen the phase holds: top groups and the frozen stacks below (trunk)
    and above (upper) the trained ones, where it has them."""
    out = frozen_top(cfg, run_dir, phase, layout)
    for name, stacks in (("trunk", phase.trunk_stacks), ("upper", phase.upper_stacks)):
        if stacks:
            out[name] = assemble_trunk(cfg, run_dir, stacks, phase.trunk_format, phase.index,
                                       phase.name, layout)
    return out


def stack_resident(cfg, run_dir: str, k: int, fmt: str, max_version: int, why: str,
                   layout=None) -> dict:
    """One stored stack in resident format (a trunk of one stack): for stack-by-stack
    evaluation and incremental cache builds."""
    return assemble_trunk(cfg, run_dir, (k,), fmt, max_version, why, layout)


# ----------------------------------------------------------------------------- stored


def write_stores(cfg, run_dir: str, phase: Phase, trainable: dict, frozen: dict) -> None:
    """What `phase` stores when it ends (Phase.stores), as version index + 1: its trained
    stacks in stack_storage_dtype, its top groups in float32 (stage 0 also the top groups
    it was born with and held frozen), or, for fusion, every stack merged."""
    version = phase.index + 1
    if phase.adapters:
        fusion.store_merged(cfg, run_dir, frozen["trunk"], trainable["adapters"], version)
        return
    for group in phase.stores:
        if group.startswith("stack_"):
            tree = trainable["stacks"][phase.trained_stacks.index(int(group[6:]))]
            dtype = cfg.training.progressive.stack_storage_dtype
        else:
            tree = trainable[group] if group in trainable else init_top(cfg)[group]
            dtype = "fp32"
        store.write(run_dir, group, version, tree, dtype)


# ----------------------------------------------------------------------------- shapes


def abstract_frozen(cfg, phase: Phase) -> dict:
    """Shapes of frozen_state(phase): what the planner counts and the step compiles for."""
    dtype = compute_dtype(cfg)
    top = abstract_top(cfg)
    out = {g: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), top[g])
           for g in sorted(phase.frozen_top) if g != "embed" or phase.needs_embedding}
    for name, stacks in (("trunk", phase.trunk_stacks), ("upper", phase.upper_stacks)):
        if stacks:
            out[name] = abstract_trunk(cfg, len(stacks), phase.trunk_format)
    return out


def abstract_trainable(cfg, phase: Phase) -> dict:
    """Shapes of trainable_at_start(phase), e.g. to restore a checkpoint into."""
    if phase.adapters:
        trunk = abstract_trunk(cfg, len(phase.trunk_stacks), phase.trunk_format)
        return {"adapters": jax.eval_shape(lambda t: init_adapters(cfg, t), trunk)}
    top = abstract_top(cfg)
    out = {g: top[g] for g in sorted(phase.train_top)}
    if phase.trained_stacks:
        one = abstract_stack(cfg)
        out["stacks"] = {i: one for i in range(phase.n_local_stacks)}
    return out
