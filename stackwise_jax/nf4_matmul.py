"""Fused nf4 dequantise-and-matmul: x @ W for an nf4 quant.QTensor W, tile by tile.

The plain path (`nf4_matmul_plain`) dequantises the whole kernel to the compute dtype and
calls jnp.dot: the dense (in, out) weight exists for the duration of the matmul. The fused
path is a Pallas kernel (on GPU it lowers through Triton, which ships inside jaxlib): each
program owns a (block_m, block_o) tile of y and walks over `in` in steps of block_k; each
step loads the packed codes and absmaxes of one (block_k, block_o) weight tile, expands
them to the compute dtype in registers and accumulates x_tile @ w_tile in float32. No
dense weight is written to memory. The backward pass (gradients crossing a frozen nf4
layer, as in block fusion) runs the same kernel transposed: dx = g @ W^T, also tiled.

Why the tiles are regular: nf4 blocks are 64 consecutive elements of the kernel flattened
in C order. When out % 64 == 0 every block lies inside one row, so with data viewed as
(in, out // 2) (two codes a byte) and scale as (in, out // 64), the weight tile
[i0:i1) x [o0:o1) (o0, o1 multiples of 64) is the slice [i0:i1) x [o0/2:o1/2) of data and
[i0:i1) x [o0/64:o1/64) of scale.

Shapes the kernel takes: out a multiple of 64 (the column tile is the largest power of two
from 64 to block_o dividing it), in a multiple of 16 (Triton's smallest dot; the reduction
tile is the largest power of two from 16 to block_k dividing it), any number of rows M
(padded with zero rows up to the row tile; the padded rows are dropped). Anything else (and every non-nf4 format) runs
the plain path: `fused_supported` says which.

Selection (`fused_selected`): fused on a GPU backend, plain elsewhere; `kernel_mode`
forces either (tests, benchmarks). It is read when a function is traced, so a jitted
function keeps the path it was traced with.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from stackwise_jax import quant

MODES = ("auto", "fused", "plain")
_setting = {"mode": "auto", "interpret": False}


@contextlib.contextmanager
def kernel_mode(mode: str, interpret: bool = False):
    """Within the block, nf4 matmuls take `mode` ('fused', 'plain' or 'auto': fused on a
    GPU). interpret=True runs the Pallas kernel in interpret mode (any backend, slow)."""
    if mode not in MODES:
        raise ValueError(f"nf4 kernel mode {mode!r}: choose one of {', '.join(MODES)}")
    saved = dict(_setting)
    _setting.update(mode=mode, interpret=interpret)
    try:
        yield
    finally:
        _setting.update(saved)


def fused_selected() -> bool:
    """Whether nf4 matmuls traced now take the fused kernel."""
    mode = _setting["mode"]
    return mode == "fused" or (mode == "auto" and jax.default_backend() == "gpu")


def fused_supported(q) -> bool:
    """Whether the fused kernel takes this kernel (see the module docstring)."""
    if not isinstance(q, quant.QTensor) or q.fmt != "nf4" or q.data.ndim != 1:
        return False
    d_in, d_out = q.matrix_shape
    return _tile_o(d_out) is not None and _tile_k(d_in) is not None


def _tile_o(d_out: int, largest: int = 128):
    """The largest power-of-two column tile (64..largest) dividing d_out, or None."""
    t = largest
    while t >= quant.NF4_BLOCK:
        if d_out % t == 0:
            return t
        t //= 2
    return None


def _tile_k(d_in: int, largest: int = 64):
    """The largest power-of-two reduction tile (16..largest) dividing d_in, or None."""
    t = largest
    while t >= 16:
        if d_in % t == 0:
            return t
        t //= 2
    return None


def nf4_matmul_plain(x, q):
    """The reference: the dense kernel in x's dtype, then the same dot nnx.Linear does."""
    return jnp.dot(x, quant.dequantize(q, x.dtype))


def nf4_matmul(x, q, *, fused: bool | None = None, interpret: bool | None = None,
               block_m: int = 64, block_o: int = 128, block_k: int = 64):
    """x (..., in) @ W (in, out) -> (..., out) in x's dtype, for an nf4 QTensor W of one
    matrix. fused=None follows `fused_selected`; kernels the fused path does not take
    run the plain path."""
    for name, tile, least in (("block_m", block_m, 16), ("block_o", block_o, quant.NF4_BLOCK),
                              ("block_k", block_k, 16)):
        if tile < least or tile & (tile - 1):
            raise ValueError(f"nf4_matmul {name}={tile}: a power of two >= {least}")
    use_fused = fused_selected() if fused is None else fused
    if not (use_fused and fused_supported(q)) or x.size == 0:
        return nf4_matmul_plain(x, q)
    interpret = _setting["interpret"] if interpret is None else interpret
    d_in, d_out = q.matrix_shape
    tiles = (block_m, _tile_o(d_out, block_o), _tile_k(d_in, block_k))
    lead = x.shape[:-1]
    x_MxI = x.reshape(-1, d_in)
    # The Triton kernel addresses its operands with int32 offsets: at most 2^31 elements
    # in x, y (and the transposed kernel's g, dx), so long inputs go in row chunks.
    rows = max(block_m, (_MAX_ELEMENTS // max(d_in, d_out)) // block_m * block_m)
    chunks = [_fused(x_MxI[r:r + rows], q, tiles, interpret)
              for r in range(0, x_MxI.shape[0], rows)]
    y_MxO = chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks)
    return y_MxO.reshape(lead + (d_out,))


_MAX_ELEMENTS = 2**31 - 2**20  # below int32's range, with room for the last row tile's padding


# --------------------------------------------------------------------------- the kernel


def _nf4_values(idx):
    """NF4_CODE[idx] for int32 codes 0..15, as a tree of selects on the code's bits
    (no gather: a Triton kernel has none); exactly the table's float32 values."""
    level = [jnp.float32(c) for c in quant.NF4_CODE]
    for bit in range(4):  # pair neighbours by bit 0, then bit 1, ...: 16 -> 8 -> 4 -> 2 -> 1
        on = ((idx >> bit) & 1) == 1
        level = [jnp.where(on, hi, lo) for lo, hi in zip(level[0::2], level[1::2])]
    return level[0]


def _weight_tile(packed_KxO2, absmax_KxG, dtype):
    """One (K, O) weight tile from its packed codes (K, O/2) and absmaxes (K, O/64), as
    quant._nf4_dequantize computes it: code value * absmax in float32, then `dtype`."""
    K, O2 = packed_KxO2.shape
    G = absmax_KxG.shape[1]
    packed = packed_KxO2.astype(jnp.int32)
    # Element 2i sits in the high nibble: interleave (high, low) along the columns.
    idx_KxO = jnp.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(K, 2 * O2)
    absmax = jax.lax.bitcast_convert_type(absmax_KxG, jnp.bfloat16).astype(jnp.float32)
    scale_KxO = jnp.broadcast_to(absmax[:, :, None], (K, G, quant.NF4_BLOCK)).reshape(K, 2 * O2)
    return (_nf4_values(idx_KxO) * scale_KxO).astype(dtype)


def _forward_kernel(x_ref, data_ref, scale_ref, y_ref, *, block_k: int, n_k: int):
    """y tile (bm, bo) = sum over k of x[:, k-tile] @ W[k-tile, o-tile], in float32."""
    from jax.experimental import pallas as pl

    def step(k, acc_MxO):
        rows = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        x_MxK = x_ref[:, rows]
        w_KxO = _weight_tile(data_ref[rows, :], scale_ref[rows, :], x_MxK.dtype)
        return acc_MxO + jnp.dot(x_MxK, w_KxO, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, n_k, step, jnp.zeros(y_ref.shape, jnp.float32))
    y_ref[...] = acc.astype(y_ref.dtype)


def _backward_kernel(g_ref, data_ref, scale_ref, dx_ref, *, block_o: int, n_o: int):
    """dx tile (bm, bk) = sum over o of g[:, o-tile] @ W[k-tile, o-tile]^T, in float32."""
    from jax.experimental import pallas as pl

    def step(o, acc_MxK):
        o0 = pl.multiple_of(o * block_o, block_o)
        g_MxO = g_ref[:, pl.ds(o0, block_o)]
        packed = data_ref[:, pl.ds(pl.multiple_of(o * (block_o // 2), block_o // 2),
                                   block_o // 2)]
        absmax = scale_ref[:, pl.ds(o * (block_o // quant.NF4_BLOCK),
                                    block_o // quant.NF4_BLOCK)]
        w_KxO = _weight_tile(packed, absmax, g_MxO.dtype)
        return acc_MxK + jax.lax.dot_general(g_MxO, w_KxO, (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, n_o, step, jnp.zeros(dx_ref.shape, jnp.float32))
    dx_ref[...] = acc.astype(dx_ref.dtype)


def _views(q):
    """data as (in, out/2) bytes, scale as (in, out/64) bf16 bits (free reshapes; no
    padding when out % 64 == 0, since in*out is then a multiple of 64)."""
    d_in, d_out = q.matrix_shape
    return (q.data.reshape(d_in, d_out // 2),
            q.scale.reshape(d_in, d_out // quant.NF4_BLOCK))


def _row_tile(m: int, block_m: int) -> int:
    """Rows per program: block_m, or fewer (a power of two >= 16) for a short x."""
    return max(16, min(block_m, 1 << max(0, math.ceil(math.log2(max(m, 1))))))


def _pad_rows(a, bm: int):
    pad = -a.shape[0] % bm
    return jnp.pad(a, ((0, pad), (0, 0))) if pad else a


def _compiler_params(interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=3)


def _forward_call(x_MxI, q, tiles, interpret):
    from jax.experimental import pallas as pl

    (d_in, d_out), (block_m, bo, bk) = q.matrix_shape, tiles
    m = x_MxI.shape[0]
    bm = _row_tile(m, block_m)
    data_IxO2, scale_IxG = _views(q)
    x_padded = _pad_rows(x_MxI, bm)
    kernel = functools.partial(_forward_kernel, block_k=bk, n_k=d_in // bk)
    y = pl.pallas_call(
        kernel,
        grid=(x_padded.shape[0] // bm, d_out // bo),
        in_specs=[pl.BlockSpec((bm, d_in), lambda i, j: (i, 0)),
                  pl.BlockSpec((d_in, bo // 2), lambda i, j: (0, j)),
                  pl.BlockSpec((d_in, bo // quant.NF4_BLOCK), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bo), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((x_padded.shape[0], d_out), x_MxI.dtype),
        interpret=interpret, compiler_params=_compiler_params(interpret),
        name="nf4_matmul",
    )(x_padded, data_IxO2, scale_IxG)
    return y[:m]


def _backward_call(g_MxO, q, tiles, interpret):
    from jax.experimental import pallas as pl

    (d_in, d_out), (block_m, bo, bk) = q.matrix_shape, tiles
    m = g_MxO.shape[0]
    bm = _row_tile(m, block_m)
    data_IxO2, scale_IxG = _views(q)
    g_padded = _pad_rows(g_MxO, bm)
    kernel = functools.partial(_backward_kernel, block_o=bo, n_o=d_out // bo)
    dx = pl.pallas_call(
        kernel,
        grid=(g_padded.shape[0] // bm, d_in // bk),
        in_specs=[pl.BlockSpec((bm, d_out), lambda i, j: (i, 0)),
                  pl.BlockSpec((bk, d_out // 2), lambda i, j: (j, 0)),
                  pl.BlockSpec((bk, d_out // quant.NF4_BLOCK), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((bm, bk), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((g_padded.shape[0], d_in), g_MxO.dtype),
        interpret=interpret, compiler_params=_compiler_params(interpret),
        name="nf4_matmul_transposed",
    )(g_padded, data_IxO2, scale_IxG)
    return dx[:m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fused(x_MxI, q, tiles, interpret):
    return _forward_call(x_MxI, q, tiles, interpret)


def _fused_fwd(x_MxI, q, tiles, interpret):
    return _forward_call(x_MxI, q, tiles, interpret), q


def _fused_bwd(tiles, interpret, q, g_MxO):
    # The codes and scales are integers: their cotangents are float0 zeros.
    zero_q = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), q)
    return _backward_call(g_MxO, q, tiles, interpret), zero_q


_fused.defvjp(_fused_fwd, _fused_bwd)
