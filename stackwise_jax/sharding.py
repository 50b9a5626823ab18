"""Where every array of a phase lives on the device mesh (SPMD over jax.sharding).

The mesh has three axes, sized by the config keys mesh.data, mesh.fsdp, mesh.tensor (their
product is the number of devices; one of them may be -1: what the others leave):

- data:   batch rows. Parameters are replicated over it.
- fsdp:   batch rows too, and the d_model side of every parameter matrix (ZeRO-3 / FSDP:
          each device holds 1/fsdp of each matrix; the train step gathers a layer's
          matrices where its matmuls read them, see "inside the step").
- tensor: Megatron's layout: q/k/v/gate/up kernels split by output columns (whole heads,
          whole d_ff slices), o/down kernels by input rows, embedding and head by
          vocabulary. The matmul pairs then need one reduction each, which the compiler
          inserts.

One rules table (KERNEL_AXES) maps a parameter's name to the logical axes of its matrix;
MESH_AXIS maps logical axes to mesh axes. The model's maths carries no annotations: the
trainer places its inputs with NamedSharding and jit's SPMD partitioner propagates them;
on a mesh with fsdp > 1 the train step adds the few constraints of the FSDP program
through hooks in this module that do nothing elsewhere ("inside the step" below).
The same rules give optimizer state (a leaf of Adam's mu has its parameter's name and
shape), LoRA adapters, the frozen trunk in every resident format (quant.QTensor), and
abstract shapes (ShapeDtypeStruct) for Orbax restores and the planner.

Divisibility. The dimensions a layout must split (d_model over fsdp; KV heads, MLA's query
heads, d_ff and the vocabulary over tensor; batch rows over data x fsdp) are checked at
start (check_divisible) and a config that does not divide is refused, naming the
dimension. Any other dimension that an axis does not divide (MLA's low ranks over fsdp, a
short last batch of an evaluation or cache build, nf4's packed codes) is replicated over
that axis: correct, only less memory-efficient.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from stackwise_jax.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batch rows are split over both

# Kernel (..., in, out) named after its module -> logical axes of (in, out).
# embed: d_model; heads: attention heads (whole heads per shard); mlp: d_ff; vocab: the
# vocabulary; rank: MLA's low-rank latents; None: never split.
KERNEL_AXES = {
    "q_proj": ("embed", "heads"), "k_proj": ("embed", "heads"), "v_proj": ("embed", "heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed"),
    "q_a_proj": ("embed", None), "kv_a_proj_with_mqa": ("embed", None),  # MLA down-projections
    "q_b_proj": ("rank", "heads"), "kv_b_proj": ("rank", "heads"),  # MLA up-projections
    "head": ("embed", "vocab"),
}
EMBEDDING_AXES = ("vocab", "embed")  # nnx.Embed's table (V, D)
MESH_AXIS = {"embed": "fsdp", "rank": "fsdp", "heads": "tensor", "mlp": "tensor",
             "vocab": "tensor"}


# ------------------------------------------------------------------------ the mesh shape


def mesh_shape(cfg, n_devices: int) -> dict[str, int]:
    """{data, fsdp, tensor} of the mesh over n_devices: -1 resolved, every size checked."""
    sizes = {a: cfg.mesh[a] for a in AXES}
    check_sizes(sizes)
    free = [a for a in AXES if sizes[a] == -1]
    fixed = math.prod(s for s in sizes.values() if s != -1)
    given = " x ".join(f"mesh.{a}={sizes[a]}" for a in AXES)
    if free:
        if n_devices % fixed:
            raise UserError(f"{given}: the fixed axes ({fixed} devices) do not divide the "
                            f"{n_devices} devices, so mesh.{free[0]}=-1 has no size that fits")
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise UserError(f"{given} = {fixed} devices, but there are {n_devices}: the product of "
                        "the mesh axes must be the device count (set one axis to -1 to take "
                        "what the others leave)")
    try:
        check_divisible(cfg, sizes)
    except UserError as e:
        if not free:
            raise
        raise UserError(f"{e} (mesh.{free[0]}=-1 took the {sizes[free[0]]} devices the other "
                        f"axes leave of {n_devices})") from None
    return sizes


def check_sizes(sizes: dict) -> None:
    """Each axis a positive integer or -1, at most one -1 (no device count needed)."""
    for a in AXES:
        v = sizes[a]
        if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
            raise UserError(f"mesh.{a}={v!r} must be a positive integer, or -1 for the devices "
                            "the other axes leave")
    free = [a for a in AXES if sizes[a] == -1]
    if len(free) > 1:
        raise UserError(f"{' and '.join(f'mesh.{a}=-1' for a in free)}: at most one mesh axis "
                        "may be -1 (it takes the devices the others leave)")


def check_divisible(cfg, sizes: dict) -> None:
    """The dimensions the layout splits must divide by their axes; sizes of -1 (unknown
    before the device count) are skipped."""
    m, d = cfg.model, cfg.data
    data, fsdp, tensor = (sizes[a] for a in AXES)
    if data > 0 and fsdp > 0 and d.batch_size % (data * fsdp):
        raise UserError(f"data.batch_size={d.batch_size} is not divisible by mesh.data x "
                        f"mesh.fsdp = {data} x {fsdp} = {data * fsdp}: each device of those "
                        "axes takes whole rows of every (micro-)batch")
    if fsdp > 1 and m.d_model % fsdp:
        raise UserError(f"model.d_model={m.d_model} is not divisible by mesh.fsdp={fsdp}: "
                        "fsdp splits the d_model side of every parameter matrix")
    if tensor > 1:
        heads = ("n_heads", m.n_heads) if m.attention == "mla" else ("n_kv_heads", m.n_kv_heads)
        for key, value, what in (
                (heads[0], heads[1], "tensor parallelism splits attention by whole heads"),
                ("d_ff", m.d_ff, "tensor parallelism splits the MLP by d_ff"),
                ("vocab_size", m.vocab_size, "tensor parallelism splits the embedding and "
                 "head by vocabulary; a larger model.vocab_size is allowed (ids the tokenizer "
                 "never produces)")):
            if value % tensor:
                raise UserError(f"model.{key}={value} is not divisible by mesh.tensor={tensor}: "
                                f"{what}")


# ------------------------------------------------------------------------ the rules


def _name(key) -> str | None:
    for attr in ("key", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return None


def _names(path) -> list:
    """The names along `path` (names or a key path); an nnx Variable's array, reached by
    GetAttrKey('value'), is named by the Variable's own key."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return [n if isinstance(n, str) else _name(n) for n in path]


def logical_axes(path, ndim: int) -> tuple:
    """The logical axis of each dimension of the leaf at `path` (a key path or names);
    leading axes (a stack's block axis: scan slices it) are never split."""
    names = _names(path)
    leaf = names[-1] if names else None
    parent = names[-2] if len(names) > 1 else None
    lead = (None,) * max(ndim - 2, 0)
    if ndim < 2:
        return (None,) * ndim
    if leaf == "kernel" and parent in KERNEL_AXES:
        return lead + KERNEL_AXES[parent]
    if leaf == "embedding":
        return lead + EMBEDDING_AXES
    if leaf in ("lora_a", "lora_b") and parent in KERNEL_AXES:  # A (in, r), B (r, out)
        d_in, d_out = KERNEL_AXES[parent]
        return lead + ((d_in, None) if leaf == "lora_a" else (None, d_out))
    return (None,) * ndim  # norms and anything unnamed: replicated


def _spec(axes_per_dim, shape, sizes: dict) -> PartitionSpec:
    """Logical axes -> PartitionSpec; an axis of size 1 or one that does not divide its
    dimension is left out (replicated)."""
    out = []
    for logical, dim in zip(axes_per_dim, shape):
        mesh_axis = MESH_AXIS.get(logical) if logical else None
        ok = mesh_axis is not None and sizes[mesh_axis] > 1 and dim % sizes[mesh_axis] == 0
        out.append(mesh_axis if ok else None)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def _is_qtensor(x) -> bool:
    from stackwise_jax.quant import QTensor  # quant imports nothing of ours but errors
    return isinstance(x, QTensor)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the rules: shardings for parameter trees, optimizer state, batches.
    The mesh may be abstract (abstract_layout): shardings and shard shapes without devices.
    gathered: parameters whole over fsdp (tensor splits kept): one layer's weights as the
    step's computation reads them (see gathered_weights)."""

    mesh: Mesh | AbstractMesh
    gathered: bool = False

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    @property
    def rule_sizes(self) -> dict[str, int]:
        """The axis sizes the parameter rules split by (fsdp as 1 when gathered)."""
        return {**self.sizes, "fsdp": 1} if self.gathered else self.sizes

    @property
    def fsdp_split(self) -> bool:
        """Parameters split over fsdp, so the step gathers them layer by layer."""
        return self.sizes["fsdp"] > 1

    @property
    def n_devices(self) -> int:
        return self.mesh.size

    def named(self, spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def replicated(self) -> NamedSharding:
        return self.named(PartitionSpec())

    # ---- parameters (any tree of arrays, ShapeDtypeStructs or quant.QTensor)

    def spec(self, path, shape) -> PartitionSpec:
        """The PartitionSpec of a dense leaf named by `path` (names or a key path)."""
        return _spec(logical_axes(path, len(shape)), shape, self.rule_sizes)

    def leaf_sharding(self, path, leaf):
        """NamedSharding of one leaf; for a QTensor, a QTensor of NamedShardings."""
        if _is_qtensor(leaf):
            return self._qtensor_sharding(path, leaf)
        return self.named(self.spec(path, getattr(leaf, "shape", ())))

    def _qtensor_sharding(self, path, q):
        """bf16 and fp8 codes keep the kernel's (in, out) layout: split like the dense
        kernel (fp8's per-column scales like its columns). nf4 codes and absmax are one
        flat array per matrix (C-order blocks of 64): split over fsdp x tensor where both
        divide, i.e. each device keeps a contiguous run of the matrix's rows."""
        kernel = self.spec(path, q.shape)
        kernel = tuple(kernel) + (None,) * (len(q.shape) - len(kernel))
        lead = kernel[:-2]
        if q.fmt == "nf4":
            sizes = self.rule_sizes
            axes = tuple(a for a in ("fsdp", "tensor") if sizes[a] > 1)
            n = math.prod(sizes[a] for a in axes)
            flat = axes if axes and q.scale.shape[-1] % n == 0 else None
            spec = self.named(PartitionSpec(*lead, flat))
            return dataclasses.replace(q, data=spec, scale=spec)
        scale = None if q.scale is None else self.named(PartitionSpec(*lead, None, kernel[-1]))
        return dataclasses.replace(q, data=self.named(PartitionSpec(*kernel)), scale=scale)

    def shardings(self, tree):
        """The NamedSharding of every leaf of `tree`, same structure (QTensors kept)."""
        return jax.tree_util.tree_map_with_path(self.leaf_sharding, tree, is_leaf=_is_qtensor)

    def put(self, tree):
        """`tree` placed on the mesh by the rules (a leaf already there is not copied)."""
        return jax.tree.map(place, tree, self.shardings(tree))

    def shard_bytes(self, tree) -> int:
        """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs, QTensors
        included), the largest shard where shards differ."""
        leaves = jax.tree.leaves(tree)
        shardings = jax.tree.leaves(self.shardings(tree))
        return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x, s in zip(leaves, shardings))

    def abstract(self, tree):
        """ShapeDtypeStructs of `tree` carrying their target shardings: what Orbax restores
        onto (any mesh shape: each device reads its own part) and what a planner sizes."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            tree, self.shardings(tree))

    # ---- batches

    def batch_sharding(self, n_rows: int, ndim: int) -> NamedSharding:
        """Rows over data x fsdp; a batch whose rows do not divide (the last, short batch of
        an evaluation or cache build) is replicated."""
        axes = tuple(a for a in BATCH_AXES if self.sizes[a] > 1)
        n = math.prod(self.sizes[a] for a in axes)
        if not axes or n_rows % n or ndim == 0:
            return self.replicated()
        return self.named(PartitionSpec(axes))

    def local_rows(self, n_rows: int) -> slice:
        """The rows of an n_rows batch that this process's devices hold: what it reads
        (data.train_batches(part=...)) and passes to put_local_batch. All of them with
        one process, or where the batch is replicated (rows that do not divide)."""
        sharding = self.batch_sharding(n_rows, 1)
        if jax.process_count() == 1 or not n_rows:
            return slice(0, n_rows)
        rows = [ix[0] for ix in sharding.addressable_devices_indices_map((n_rows,)).values()]
        runs = sorted({(r.start or 0, n_rows if r.stop is None else r.stop) for r in rows})
        if any(b[0] != a[1] for a, b in zip(runs, runs[1:])):  # make_mesh never orders them so
            raise ValueError(f"this process's devices hold rows {runs} of the batch: not one run")
        return slice(runs[0][0], runs[-1][1])

    def put_local_batch(self, tree, n_rows: int):
        """This process's rows (local_rows(n_rows)) of a global batch of n_rows rows ->
        global arrays split by rows (jax.make_array_from_process_local_data). The global
        batch is the union of every process's rows, so every process count sees the same
        batches in the same order while each process reads only its own rows."""
        def put(x):
            x = np.asarray(x)
            shape = (n_rows,) + x.shape[1:] if x.ndim else ()
            sharding = self.batch_sharding(n_rows if x.ndim else 0, x.ndim)
            return jax.make_array_from_process_local_data(sharding, x, shape)

        return jax.tree.map(put, tree)

    def put_batch(self, tree):
        """A whole global batch (numpy rows, the same on every process) -> global arrays
        split by rows; each process passes on only its own rows (put_local_batch)."""
        def put(x):
            x = np.asarray(x)
            if not x.ndim:
                return self.put_local_batch(x, 0)
            return self.put_local_batch(x[self.local_rows(x.shape[0])], x.shape[0])

        return jax.tree.map(put, tree)


# ------------------------------------------------------------------------ inside the step
#
# Given only its arguments' shardings, XLA's SPMD partitioner keeps each fsdp-split weight
# in place and moves the activations instead (batch rows gathered on every device, partial
# products all-reduced over fsdp), so a device's temporaries hardly shrink (docs/plan.md).
# While a step on a mesh with fsdp > 1 traces (inside `step_layout`), these hooks ask for
# the FSDP (ZeRO-3) program instead: activations split by rows over data x fsdp everywhere
# (`rows`), and each weight matrix gathered over fsdp (tensor splits kept) where a matmul
# reads it, inside its layer's scan iteration (`gathered_weights`, `gathered_call`). The
# backward pass gathers it again instead of keeping every layer's whole weights, and
# reduces the weight's gradient straight back to its shard. Outside a step, or on any
# other mesh, every hook returns its input: a single device compiles exactly the program
# it compiled without them.

_STEP = contextvars.ContextVar("stackwise_step_layout", default=None)


@contextlib.contextmanager
def step_layout(layout: Layout | None):
    """The hooks below act while this is entered with a layout whose mesh splits
    parameters over fsdp (a step's trace); otherwise they do nothing."""
    token = _STEP.set(layout if layout is not None and layout.fsdp_split else None)
    try:
        yield
    finally:
        _STEP.reset(token)


def active_layout() -> Layout | None:
    """The layout of the step tracing with the hooks on (fsdp > 1), else None."""
    return _STEP.get()


def rows(x):
    """Activations (B, ...) split by rows over data x fsdp, whole over tensor, as batches
    are (batch_sharding); rows that do not divide are left to the partitioner."""
    layout = _STEP.get()
    if layout is None:
        return x
    sharding = layout.batch_sharding(x.shape[0] if x.ndim else 0, x.ndim)
    if sharding.spec == PartitionSpec():  # rows that do not divide: not constrained
        return x
    return jax.lax.with_sharding_constraint(x, sharding)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["shard"],
                   meta_fields=["split", "whole"])
@dataclasses.dataclass(frozen=True)
class Gathered:
    """A matmul kernel (an array or a quant.QTensor) held as its shard (`split`, the
    rules' layout), to be gathered (`whole`: fsdp removed) by the matmul that reads it:
    model.Linear passes it to gathered_call."""

    shard: object
    split: object
    whole: object


def gathered_weights(tree):
    """Parameters named as the rules name them (arrays, QTensors, nnx Variables), as one
    layer's computation reads them on an fsdp mesh: each kernel a Gathered, any other
    array (embedding table, norms) constrained whole over fsdp."""
    layout = _STEP.get()
    if layout is None:
        return tree
    whole = dataclasses.replace(layout, gathered=True)

    def one(path, leaf):
        split, full = layout.leaf_sharding(path, leaf), whole.leaf_sharding(path, leaf)
        names = _names(path)
        if names and names[-1] == "kernel":
            return Gathered(leaf, split, full)
        return jax.lax.with_sharding_constraint(leaf, full)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_qtensor)


def gathered_call(op, x, kernel: Gathered):
    """op(x, the whole kernel), differentiable in x and (a float kernel) in its shard. The
    backward pass gathers the kernel again rather than keeping it, and the kernel's
    gradient leaves as its shard (summed over the rows of every device)."""
    return _gathered_call(op, kernel.split, kernel.whole, x, kernel.shard)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gathered_call(op, split, whole, x, shard):
    return op(x, jax.lax.with_sharding_constraint(shard, whole))


def _gathered_fwd(op, split, whole, x, shard):
    return _gathered_call(op, split, whole, x, shard), (x, shard)


def _gathered_bwd(op, split, whole, saved, ct):
    x, shard = saved
    full = jax.lax.with_sharding_constraint(shard, whole)
    if _is_qtensor(shard):  # frozen codes: a gradient for x only
        _, vjp = jax.vjp(lambda x_: op(x_, full), x)
        zeros = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), shard)
        return vjp(ct)[0], zeros
    _, vjp = jax.vjp(op, x, full)
    dx, d_full = vjp(ct)
    return dx, jax.lax.with_sharding_constraint(d_full, split)


_gathered_call.defvjp(_gathered_fwd, _gathered_bwd)


def place(x, sharding):
    """jax.device_put(x, sharding), also where the sharding spans other processes' devices
    (which device_put refuses for host data): a host array, or an array held whole by this
    process, the same on every process (the same store, seed or batch), gives each local
    device its part."""
    if sharding is None or getattr(sharding, "is_fully_addressable", True):
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # global already: JAX moves it
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@functools.lru_cache(maxsize=8)
def _mesh(shape: tuple, devices: tuple) -> Mesh:
    # Auto axes: jit's partitioner propagates shardings from the placed inputs (make_mesh
    # defaults to Explicit axes, where every op's output sharding is part of its type).
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=list(devices))


def abstract_layout(sizes: dict) -> Layout:
    """A Layout over an abstract mesh {data, fsdp, tensor}: the shardings and per-device
    bytes of a mesh this process does not have (a planner sizing a larger machine)."""
    return Layout(AbstractMesh(tuple(sizes[a] for a in AXES), AXES,
                               axis_types=(AxisType.Auto,) * len(AXES)))


def from_config(cfg, devices=None) -> Layout:
    """The Layout of cfg.mesh over `devices` (default: every device of every process)."""
    devices = tuple(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    return Layout(_mesh(tuple(sizes[a] for a in AXES), devices))


def to_host(x) -> np.ndarray:
    """A (possibly sharded) array as one numpy array on this host. A single process
    addresses every shard; with several, the shards held elsewhere are gathered first."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
