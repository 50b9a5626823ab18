"""The fused nf4 kernel (Pallas, interpret mode on this CPU) against the unfused path.

Tolerance. Both paths multiply the same weights: the kernel's in-register dequantisation is
checked to equal quant.dequantize bit for bit (test_weight_tile_is_dequantize). Both then
sum I products in float32 and round the sum once to the compute dtype; they differ only in
the order of the float32 additions (the kernel adds block_k-long partial dots tile by
tile). For any order, |fl(sum) - sum| <= gamma_I * S with gamma_I = I u / (1 - I u),
u = 2^-24 and S = sum_i |x_i| |w_i| (bf16 products are exact in float32; float32 products
round once, which gamma_I with I terms covers). Rounding to the compute dtype (unit
roundoff u_d: 2^-8 bf16, 2^-24 float32) moves each result by at most u_d times its size.
So each path lies within gamma_I S + u_d (|s| + gamma_I S) of the exact s (checked against
a float64 product), and the two paths within 2 gamma_I S + u_d (|y_fused| + |y_plain|) / (1 - u_d)
of each other: "exact to the compute dtype's rounding".
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stackwise_jax import config, model, quant
from stackwise_jax import nf4_matmul as nm

UNIT_ROUNDOFF = {jnp.bfloat16: 2.0**-8, jnp.float32: 2.0**-24}


def gamma(n: int) -> float:
    u = 2.0**-24
    return n * u / (1 - n * u)


def random_nf4(rng, lead, d_in, d_out):
    """An nf4 QTensor in quant's layout with uniformly random codes (every code and byte
    value occurs) and bf16 absmaxes in [0.01, 0.1): no quantize call, nothing to compile."""
    n = d_in * d_out
    data = rng.integers(0, 256, lead + (n // 2,), dtype=np.uint8)
    absmax = rng.uniform(0.01, 0.1, lead + (n // quant.NF4_BLOCK,)).astype(jnp.bfloat16)
    return quant.QTensor(jnp.asarray(data), jnp.asarray(absmax.view(np.uint16)), "nf4",
                         (d_in, d_out))


def make_case(m_shape, d_in, d_out, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = random_nf4(rng, (), d_in, d_out)
    x = jnp.asarray(rng.standard_normal(tuple(m_shape) + (d_in,)), jnp.float32).astype(dtype)
    return x, q


def check_close(y_fused, y_plain, x, w, dtype):
    """The bounds of the module docstring, elementwise, for y = x @ w (w: the dense weight
    in the compute dtype)."""
    d_in = w.shape[0]
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    w64 = np.asarray(w.astype(jnp.float32), np.float64)
    exact = x64 @ w64
    s = np.abs(x64) @ np.abs(w64)
    u_d, g = UNIT_ROUNDOFF[dtype], gamma(d_in)
    f = np.asarray(y_fused.astype(jnp.float32), np.float64)
    p = np.asarray(y_plain.astype(jnp.float32), np.float64)
    assert y_fused.dtype == y_plain.dtype == dtype and f.shape == p.shape == exact.shape
    for y in (f, p):
        assert np.all(np.abs(y - exact) <= g * s + u_d * (np.abs(exact) + g * s))
    assert np.all(np.abs(f - p) <= 2 * g * s + u_d * (np.abs(f) + np.abs(p)) / (1 - u_d))


# (leading shape of x, in, out, tiles (block_m, block_o, block_k), dtype): several row,
# column and reduction tiles, padded rows (37 = 2 x 16 + 5), out = 192 (three 64-column
# tiles, 128 does not divide it), in = 96 (three 32-row steps), leading batch dims.
CASES = [
    ((37,), 128, 192, (16, 128, 64), jnp.bfloat16),
    ((2, 5), 96, 128, (16, 64, 64), jnp.float32),
    ((3, 7), 256, 64, (16, 128, 64), jnp.bfloat16),
]


@pytest.mark.parametrize("m_shape,d_in,d_out,tiles,dtype", CASES)
def test_fused_matches_unfused(m_shape, d_in, d_out, tiles, dtype):
    x, q = make_case(m_shape, d_in, d_out, dtype)
    block_m, block_o, block_k = tiles
    y = jax.jit(lambda x, q: nm.nf4_matmul(x, q, fused=True, interpret=True, block_m=block_m,
                                           block_o=block_o, block_k=block_k))(x, q)
    assert y.shape == tuple(m_shape) + (d_out,)
    x2 = x.reshape(-1, d_in)
    check_close(y.reshape(-1, d_out), nm.nf4_matmul_plain(x2, q), x2,
                quant.dequantize(q, dtype), dtype)


def test_long_inputs_go_in_row_chunks(monkeypatch):
    """Inputs past the kernel's int32 addressing run as several calls (here: a limit of 16
    rows of 192, so 37 rows make 3 calls) with the same result."""
    monkeypatch.setattr(nm, "_MAX_ELEMENTS", 16 * 192)
    x, q = make_case((37,), 64, 192, jnp.bfloat16)
    fused = jax.jit(lambda x, q: nm.nf4_matmul(x, q, fused=True, interpret=True, block_m=16))
    assert str(fused.trace(x, q).jaxpr).count("pallas_call") == 3
    check_close(fused(x, q), nm.nf4_matmul_plain(x, q), x, quant.dequantize(q, jnp.bfloat16),
                jnp.bfloat16)


def test_tile_sizes_are_checked():
    x, q = make_case((4,), 64, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="block_o=96: a power of two >= 64"):
        nm.nf4_matmul(x, q, block_o=96)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fused_gradient_matches_unfused(dtype):
    """dx = g @ W^T through the transposed kernel: the same bound with the roles of in
    and out swapped (the reduction runs over out)."""
    x, q = make_case((21,), 64, 192, dtype, seed=1)
    g = jax.random.normal(jax.random.key(2), (21, 192)).astype(dtype)

    def vjp(f):
        return jax.jit(lambda x, g: jax.vjp(f, x)[1](g)[0])(x, g)

    dx = vjp(lambda x: nm.nf4_matmul(x, q, fused=True, interpret=True, block_m=16,
                                     block_o=64, block_k=32))
    dx_plain = vjp(lambda x: nm.nf4_matmul_plain(x, q))
    check_close(dx, dx_plain, g, quant.dequantize(q, dtype).T, dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_weight_tile_is_dequantize(dtype):
    """The kernel's nibble unpacking, select-tree code lookup and absmax scaling give
    quant.dequantize's values exactly, on every byte value and random bf16 absmaxes."""
    d_in, d_out = 32, 128
    q = random_nf4(np.random.default_rng(3), (), d_in, d_out)
    q = q.replace(data=q.data.at[:256].set(jnp.arange(256, dtype=jnp.uint8)))
    data_IxO2, scale_IxG = nm._views(q)
    tile = nm._weight_tile(data_IxO2, scale_IxG, dtype)
    assert tile.dtype == dtype
    assert jnp.array_equal(tile, quant.dequantize(q, dtype))


def test_unsupported_shapes_and_formats_take_the_plain_path():
    # out = 80 is not a multiple of 64: nf4 blocks straddle rows, no regular tiles.
    x, q = make_case((4,), 64, 80, jnp.bfloat16)
    assert not nm.fused_supported(q)
    fused = jax.make_jaxpr(lambda x: nm.nf4_matmul(x, q, fused=True, interpret=True))(x)
    assert "pallas_call" not in str(fused)
    assert jnp.array_equal(nm.nf4_matmul(x, q, fused=True, interpret=True),
                           nm.nf4_matmul_plain(x, q))
    fp8 = quant.QTensor(jnp.zeros((64, 64), jnp.uint8), jnp.ones((1, 64)), "fp8", (64, 64))
    assert not nm.fused_supported(fp8)
    stacked = random_nf4(np.random.default_rng(0), (2,), 64, 64)  # a stack of kernels
    assert not nm.fused_supported(stacked)
    x, q = make_case((4,), 64, 64, jnp.bfloat16)
    assert nm.fused_supported(q)
    assert "pallas_call" in str(jax.make_jaxpr(
        lambda x: nm.nf4_matmul(x, q, fused=True, interpret=True))(x))


def test_selection():
    """Plain on this CPU unless forced; the mode is checked."""
    assert jax.default_backend() == "cpu" and not nm.fused_selected()
    with nm.kernel_mode("fused", interpret=True):
        assert nm.fused_selected()
        with nm.kernel_mode("plain"):
            assert not nm.fused_selected()
        assert nm.fused_selected()
    assert not nm.fused_selected()
    with pytest.raises(ValueError, match="'triton'.*auto, fused, plain"):
        with nm.kernel_mode("triton"):
            pass


def test_trunk_fused_equals_plain():
    """An nf4 trunk of 2 blocks (GQA, every kernel 64-column aligned), forward and the
    gradient w.r.t. its input (as block fusion's frozen upper stacks pass it back, each
    block rematerialised): with the fused path forced, every projection is a pallas_call
    on the packed kernel (7 forward, 7 recomputed, 7 transposed), and both results equal
    the plain path's. Float32 compute: each matmul differs from the plain one by at most
    2 gamma_I S (I <= 128: 1.5e-5 of S = sum |x||w|), and the rest is the same XLA ops on
    the same values. The weights (|w| <= 0.1) keep each block close to the identity plus a
    small update, so the two blocks pass those differences on without multiplying them by
    more than a small factor: 1e-4 of each result's scale bounds the difference with room
    to spare (measured: 2.4e-7 on scales of 3.2, forward and gradient)."""
    m = config.defaults().model
    m.d_model, m.n_heads, m.n_kv_heads, m.d_ff = 64, 4, 4, 128
    # Rack.run_trunk's scan over 2 blocks, from an abstract Block (nothing to initialise).
    block = nnx.eval_shape(lambda: model.Block(m, nnx.Rngs(0)))
    rng = np.random.default_rng(5)
    trunk = jax.tree_util.tree_map_with_path(
        lambda path, s: random_nf4(rng, (2,), *s.shape) if path[-1].key == "kernel"
        else jnp.asarray(rng.uniform(0.5, 1.5, (2,) + s.shape), s.dtype),
        nnx.to_pure_dict(nnx.state(block)))
    graphdef, (cos, sin) = nnx.graphdef(block), model.rope_tables(m, 8)
    x = jnp.asarray(rng.standard_normal((2, 8, m.d_model)), jnp.float32)

    def out_and_dx(x, t):  # a new function per trace: the kernel mode is read when tracing
        out, vjp = jax.vjp(lambda x: model.scan_blocks(graphdef, t, x, cos, sin, True, "full"), x)
        return out, vjp(out)[0]

    traced_plain = jax.jit(out_and_dx).trace(x, trunk)
    with nm.kernel_mode("fused", interpret=True):
        traced_fused = jax.jit(lambda x, t: out_and_dx(x, t)).trace(x, trunk)
    assert "pallas_call" not in str(traced_plain.jaxpr)
    jaxpr = str(traced_fused.jaxpr)
    assert jaxpr.count("pallas_call") == 21 and jaxpr.count("name=nf4_matmul_transposed") == 7
    plain = traced_plain.lower().compile()(x, trunk)
    fused = traced_fused.lower().compile()(x, trunk)
    for f, p in zip(fused, plain):
        assert float(jnp.max(jnp.abs(f - p))) <= 1e-4 * float(jnp.max(jnp.abs(p)))
