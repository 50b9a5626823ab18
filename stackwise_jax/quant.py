"""Storage formats for frozen stacks, dequantised on the fly inside the jitted forward.

A frozen stack never receives gradients, so it can live in a compact format and be
expanded to the compute dtype only when it runs:

- bf16: plain cast, 2 bytes/param.
- fp8:  float8_e4m3fn with one float32 scale per output channel (max|w| over `in` / 448),
        1 byte/param + 4/in.
- nf4:  4-bit NormalFloat (QLoRA, Dettmers et al. 2023): blocks of 64 consecutive weights,
        one absmax per block, each weight rounded to the nearest of 16 code values placed at
        normal quantiles; two codes per uint8. The absmax is stored in bfloat16 (relative
        error <= 2^-8, small beside the codes' own error), 0.53125 bytes/param instead of
        0.5625 with float32: 2.1 GB less for a 70B trunk. QLoRA's double quantisation
        (8-bit scales, 0.516 bytes/param) is not implemented.

A `QTensor` is a pytree (its arrays are leaves, format and matrix shape are static), so a
tree of them passes through jax.jit, lax.scan and optax untouched. Every array in it keeps
the kernel's leading axes (the stack's block axis), and nf4 blocks never straddle two
matrices, so slicing a QTensor along the block axis (as lax.scan does) gives the QTensor
of one block: the forward can dequantise one block at a time (`scan_dequantized`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

from stackwise_jax.errors import UserError

FORMATS = ("bf16", "fp8", "nf4")

FP8_MAX = 448.0  # largest finite float8_e4m3fn
NF4_BLOCK = 64
# The published NF4 table (bitsandbytes / QLoRA appendix): quantiles of N(0, 1) rescaled to
# [-1, 1], asymmetric so that 0 is exact and there are 8 positive levels.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


@struct.dataclass
class QTensor:
    """A quantised kernel (..., in, out): `data` in the storage dtype, `scale` per format.

    bf16: data (..., in, out) uint16 (bfloat16 bit patterns), scale None.
    fp8:  data (..., in, out) uint8 (float8_e4m3fn bit patterns), scale (..., 1, out) float32.
    nf4:  data (..., n_padded // 2) uint8 (high nibble first), scale (..., n_padded // 64)
          absmax (bfloat16 bit patterns in uint16), where n_padded is in*out rounded up to a multiple of 64.
    """
    data: jax.Array
    scale: jax.Array | None
    fmt: str = struct.field(pytree_node=False)
    matrix_shape: tuple[int, int] = struct.field(pytree_node=False)  # (in, out)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape of the kernel, leading (block) axes included."""
        lead = self.data.shape[:-1] if self.fmt == "nf4" else self.data.shape[:-2]
        return tuple(lead) + tuple(self.matrix_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"quantisation format {fmt!r}: choose one of {', '.join(FORMATS)}")


def quantize(w, fmt: str) -> QTensor:
    """Quantises a kernel (..., in, out); leading axes are kept as they are."""
    _check_format(fmt)
    w = jnp.asarray(w, jnp.float32)
    if w.ndim < 2:
        raise ValueError(f"quantize wants a kernel (..., in, out), got shape {w.shape}")
    matrix_shape = tuple(int(s) for s in w.shape[-2:])
    if fmt == "bf16":
        return QTensor(_as_bits(w.astype(jnp.bfloat16)), None, fmt, matrix_shape)
    if fmt == "fp8":
        data, scale = _fp8_quantize(w)
        return QTensor(_as_bits(data), scale, fmt, matrix_shape)
    return QTensor(*_nf4_quantize(w), fmt, matrix_shape)


@functools.partial(jax.jit, static_argnums=1)
def dequantize(q: QTensor, dtype=jnp.bfloat16):
    """The dense kernel in `dtype` (jnp only: runs inside jit, per block inside a scan)."""
    if q.fmt == "bf16":
        return _from_bits(q.data, jnp.bfloat16).astype(dtype)
    if q.fmt == "fp8":
        return (_from_bits(q.data, jnp.float8_e4m3fn).astype(jnp.float32) * q.scale).astype(dtype)
    return _nf4_dequantize(q).astype(dtype)


# Floating codes are stored as their bit patterns (unsigned integers of the same width) and
# reinterpreted inside the forward (a free bitcast). A compiler may change the element type
# of float arrays that feed a loop (XLA:CPU widens bf16 to f32 before the trunk's scan,
# making every layer dense at once); integer storage pins the stored bytes on any backend.
_BITS = {2: jnp.uint16, 1: jnp.uint8}


def _as_bits(x):
    return jax.lax.bitcast_convert_type(x, _BITS[jnp.dtype(x.dtype).itemsize])


def _from_bits(bits, dtype):
    return jax.lax.bitcast_convert_type(bits, dtype)


# --------------------------------------------------------------------------- fp8


@jax.jit
def _fp8_quantize(w_IxO):
    """Per output channel: the largest |w| of each column maps to 448."""
    absmax_1xO = jnp.max(jnp.abs(w_IxO), axis=-2, keepdims=True)
    scale_1xO = jnp.where(absmax_1xO > 0, absmax_1xO / FP8_MAX, 1.0)  # all-zero column: any scale
    # Clip: w / scale may round just above 448, which e4m3fn (no inf) would turn into NaN.
    scaled = jnp.clip(w_IxO / scale_1xO, -FP8_MAX, FP8_MAX)
    return scaled.astype(jnp.float8_e4m3fn), scale_1xO


# --------------------------------------------------------------------------- nf4


def _nf4_blocks(w):
    """(..., in, out) -> (..., n_blocks, 64): each matrix flattened in C order, zero-padded."""
    lead, n = w.shape[:-2], w.shape[-2] * w.shape[-1]
    n_padded = -(-n // NF4_BLOCK) * NF4_BLOCK
    flat = w.reshape(lead + (n,))
    flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, n_padded - n)])
    return flat.reshape(lead + (n_padded // NF4_BLOCK, NF4_BLOCK))


@jax.jit
def _nf4_quantize(w):
    blocks_NxK = _nf4_blocks(w)
    # Normalised by the stored (bf16-rounded) absmax, so the rounding below sees the scale
    # the forward will use; a value just above 1 then takes the code 1.0.
    absmax_Nx1 = jnp.max(jnp.abs(blocks_NxK), axis=-1, keepdims=True).astype(jnp.bfloat16)
    absmax32_Nx1 = absmax_Nx1.astype(jnp.float32)
    normed_NxK = blocks_NxK / jnp.where(absmax32_Nx1 > 0, absmax32_Nx1, 1.0)
    # Nearest code value: the code table is sorted, so the index is the number of midpoints
    # below the value (searchsorted, no 16x temporary as an argmin would need).
    code = jnp.asarray(NF4_CODE, jnp.float32)
    midpoints = (code[1:] + code[:-1]) / 2
    idx = jnp.searchsorted(midpoints, normed_NxK).astype(jnp.uint8)
    return pack_nibbles(idx.reshape(idx.shape[:-2] + (-1,))), _as_bits(absmax_Nx1[..., 0])


def _nf4_dequantize(q: QTensor):
    idx = unpack_nibbles(q.data)
    lead = idx.shape[:-1]
    blocks_NxK = idx.reshape(lead + (-1, NF4_BLOCK))
    absmax_Nx1 = _from_bits(q.scale, jnp.bfloat16)[..., None].astype(jnp.float32)
    values_NxK = jnp.asarray(NF4_CODE, jnp.float32)[blocks_NxK] * absmax_Nx1
    n = math.prod(q.matrix_shape)
    return values_NxK.reshape(lead + (-1,))[..., :n].reshape(lead + q.matrix_shape)


def pack_nibbles(idx):
    """(..., 2n) uint8 values < 16 -> (..., n) uint8, element 2i in the high nibble."""
    pairs = idx.reshape(idx.shape[:-1] + (-1, 2))
    return (pairs[..., 0] << 4) | pairs[..., 1]


def unpack_nibbles(packed):
    """Inverse of pack_nibbles."""
    pairs = jnp.stack([packed >> 4, packed & 0x0F], axis=-1)
    return pairs.reshape(packed.shape[:-1] + (-1,))


# --------------------------------------------------------------------------- trees


def _is_kernel(path, leaf) -> bool:
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return name == "kernel" and getattr(leaf, "ndim", 0) >= 2


def quantize_tree(params, fmt: str):
    """Every leaf named 'kernel' with ndim >= 2 becomes a QTensor; norms etc. stay as they are."""
    _check_format(fmt)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: quantize(x, fmt) if _is_kernel(p, x) else x, params)


def _is_qtensor(x) -> bool:
    return isinstance(x, QTensor)


def dequantize_tree(qparams, dtype=jnp.bfloat16):
    """Inverse of quantize_tree: QTensors to dense `dtype`, other leaves untouched."""
    return jax.tree.map(lambda x: dequantize(x, dtype) if _is_qtensor(x) else x, qparams,
                        is_leaf=_is_qtensor)


def bytes_of(tree) -> int:
    """Bytes stored by a tree of arrays and QTensors (codes, scales and nf4 padding included)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def scan_dequantized(step, x, qblocks, dtype=jnp.bfloat16):
    """lax.scan of step(x, dense_block) -> x over the leading block axis of `qblocks`.

    Only one block's dense weights exist at a time: the dequantisation runs inside the
    scan body, on the slice of each QTensor that belongs to the current block.
    """
    def body(carry, qblock):
        return step(carry, dequantize_tree(qblock, dtype)), None

    return jax.lax.scan(body, x, qblocks)[0]
