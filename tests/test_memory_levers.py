"""Remat policies and chunked cross-entropy: same numbers, less memory (XLA's own accounting)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stackwise_jax import config, model, objective


def small_model(**kw):
    m = config.defaults().model
    m.vocab_size, m.d_model, m.n_heads, m.n_kv_heads, m.d_ff = 512, 64, 4, 2, 128
    m.architecture.n_stacks, m.architecture.blocks_per_stack = 1, 4
    for k, v in kw.items():
        m[k] = v
    return m


def loss_and_grad_fn(m, chunk=0, weighting="mean"):
    rack = model.Rack(m, nnx.Rngs(0))
    graphdef, params = nnx.split(rack)

    def loss(params, ids, masked, t):
        r = nnx.merge(graphdef, params)
        hidden = r.run_stacks(r.embed(ids), 0, 1, "bidirectional")
        batch = {"targets": ids, "valid": masked, "t": t}
        return (objective.loss_numerator(hidden, r.logits, batch, weighting, chunk)
                / objective.loss_denominator(batch, weighting))

    return jax.value_and_grad(loss), params


def batch(B=2, L=64, V=512):
    ids = jax.random.randint(jax.random.key(0), (B, L), 0, V)
    masked = jax.random.uniform(jax.random.key(1), (B, L)) < 0.5
    return ids, masked, jnp.array([0.3, 0.7])[:B]


@pytest.mark.parametrize("weighting", ["mean", "inv_t"])
def test_chunked_loss_equals_whole_sequence_loss(weighting):
    m = small_model()
    plain, params = loss_and_grad_fn(m, 0, weighting)
    chunked, _ = loss_and_grad_fn(m, 16, weighting)
    (l0, g0), (l1, g1) = plain(params, *batch()), chunked(params, *batch())
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


def test_chunked_causal_loss_equals_plain():
    logits_fn = lambda h: h @ jnp.ones((8, 11)) * jnp.arange(11)  # noqa: E731
    h = jax.random.normal(jax.random.key(0), (2, 12, 8))
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 11)
    expected = objective.causal_loss(logits_fn(h), ids)
    for chunk in (0, 4):
        batch = objective.prepare_tokens(None, ids, "causal", (0.0, 0.0), 0)
        got = (objective.loss_numerator(h, logits_fn, batch, "mean", chunk)
               / objective.loss_denominator(batch, "mean"))
        np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_changes_nothing_numerically(policy):
    plain, params = loss_and_grad_fn(small_model())
    remat, _ = loss_and_grad_fn(small_model(remat=policy))
    (l0, g0), (l1, g1) = plain(params, *batch()), remat(params, *batch())
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


def temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_memory_levers_lower_compiled_temporaries():
    B, L, V = 4, 256, 8192
    ids, masked, t = batch(B, L, V)
    t = jnp.full((B,), 0.5)
    m = small_model(vocab_size=V)
    plain, params = loss_and_grad_fn(m)
    chunked, _ = loss_and_grad_fn(m, chunk=32)
    full_logits = B * L * V * 4
    plain_b, chunked_b = temp_bytes(plain, params, ids, masked, t), temp_bytes(chunked, params, ids, masked, t)
    assert plain_b > full_logits  # the whole (B, L, V) logits exist at once
    assert chunked_b < plain_b - full_logits // 2, (plain_b, chunked_b)

    small_vocab = small_model(vocab_size=512, d_ff=512)
    ids, masked, t = batch(B, L, 512)
    none, params = loss_and_grad_fn(small_vocab)
    full, _ = loss_and_grad_fn(small_model(vocab_size=512, d_ff=512, remat="full"))
    assert temp_bytes(full, params, ids, masked, t) < temp_bytes(none, params, ids, masked, t)


def causal_loss_and_grad_fn(m):
    rack = model.Rack(m, nnx.Rngs(0))
    graphdef, params = nnx.split(rack)

    def loss(params, ids):
        r = nnx.merge(graphdef, params)
        return objective.causal_loss(r(ids, "causal"), ids)

    return jax.value_and_grad(loss), params


def test_chunked_attention_changes_nothing_numerically():
    ids, masked, t = batch()
    for make, args in ((loss_and_grad_fn, (ids, masked, t)), (causal_loss_and_grad_fn, (ids,))):
        plain, params = make(small_model())
        chunked, _ = make(small_model(attention_chunk_size=16))
        (l0, g0), (l1, g1) = plain(params, *args), chunked(params, *args)
        np.testing.assert_allclose(l1, l0, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


def test_chunked_attention_never_holds_whole_score_matrix():
    B, L, H = 2, 512, 4
    ids, masked, t = batch(B, L)
    plain_m, chunked_m = small_model(d_ff=64), small_model(d_ff=64, attention_chunk_size=64)
    plain_m.architecture.blocks_per_stack = chunked_m.architecture.blocks_per_stack = 1
    plain, params = loss_and_grad_fn(plain_m)
    chunked, _ = loss_and_grad_fn(chunked_m)
    scores = B * H * L * L * 4  # one float32 (B, H, L, L) score matrix
    plain_b = temp_bytes(plain, params, ids, masked, t)
    chunked_b = temp_bytes(chunked, params, ids, masked, t)
    assert plain_b > scores
    assert chunked_b < plain_b - scores, (plain_b, chunked_b)
