"""The model: parameter counts, attention modes, scan vs unrolled, GQA and RoPE vs plain jnp."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stackwise_jax import config, model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    config.validate(cfg)
    return cfg


def expected_count(m):
    """Parameters of a Llama-style rack, written out by hand."""
    E = m.d_model // m.n_heads
    layer = (m.d_model * m.n_heads * E * 2  # q, o
             + 2 * m.d_model * m.n_kv_heads * E  # k, v
             + 3 * m.d_model * m.d_ff  # gate, up, down
             + 2 * m.d_model)  # two norms
    layers = m.architecture.n_stacks * m.architecture.blocks_per_stack
    embed_and_head = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    return embed_and_head + layers * layer + m.d_model


@pytest.mark.parametrize("name,published", [
    ("llama70b", 70_553_706_496),  # Llama-3-70B
    ("llama1b", 1_235_814_400),  # Llama-3.2-1B
    ("gpt2_small", None), ("bert_base", None), ("tiny", None)])
def test_param_counts(name, published):
    m = load_config(name).model
    counts = model.param_counts(m)  # eval_shape: nothing allocated
    assert counts["total"] == expected_count(m)
    if published:
        assert counts["total"] == published
    n = m.architecture.n_stacks
    assert sum(counts[f"stack_{k}"] for k in range(n)) + counts["embed"] + counts["final_norm"] \
        + counts.get("head", 0) == counts["total"]


def small_model(**kw):
    m = config.defaults().model
    m.vocab_size, m.d_model, m.n_heads, m.n_kv_heads, m.d_ff = 64, 32, 4, 2, 48
    m.architecture.n_stacks, m.architecture.blocks_per_stack = 2, 3
    for k, v in kw.items():
        m[k] = v
    return m


def test_bidirectional_sees_the_future_causal_does_not():
    rack = model.Rack(small_model(), nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    j = 7
    changed = ids.at[:, j].set((ids[:, j] + 1) % 64)
    for mode, future_visible in (("bidirectional", True), ("causal", False)):
        diff_LxV = jnp.abs(rack(ids, mode) - rack(changed, mode)).max(axis=(0, 2))
        assert bool((diff_LxV[:j] > 1e-6).all()) == future_visible, mode
        assert bool((diff_LxV[j:] > 1e-6).all()), mode  # positions >= j always see token j


def test_bad_mode_is_rejected():
    rack = model.Rack(small_model(), nnx.Rngs(0))
    with pytest.raises(ValueError, match="bidirectional"):
        rack(jnp.zeros((1, 4), jnp.int32), "left_to_right")


def reference_attention(x, w, n_heads, n_kv_heads, causal, theta):
    """Plain jnp attention with HF-style repeat_kv and rotate-half RoPE."""
    B, L, D = x.shape
    E = D // n_heads
    q = (x @ w["q_proj"]).reshape(B, L, n_heads, E).transpose(0, 2, 1, 3)
    k = (x @ w["k_proj"]).reshape(B, L, n_kv_heads, E).transpose(0, 2, 1, 3)
    v = (x @ w["v_proj"]).reshape(B, L, n_kv_heads, E).transpose(0, 2, 1, 3)
    inv = 1.0 / theta ** (np.arange(0, E, 2) / E)
    ang = np.arange(L)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rot(t):
        return t * cos + np.concatenate([-t[..., E // 2:], t[..., :E // 2]], -1) * sin

    q, k = rot(q), rot(k)
    rep = n_heads // n_kv_heads
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(E)
    if causal:
        s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(B, L, D) @ w["o_proj"]


@pytest.mark.parametrize("causal", [False, True])
def test_gqa_attention_matches_plain_reference(causal):
    m = small_model(rope_theta=500.0)
    attn = model.Attention(m, nnx.Rngs(3))
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 10, 32)), np.float64)
    cos, sin = model.rope_cos_sin(10, 8, 500.0)
    got = attn(jnp.asarray(x, jnp.float32), cos, sin, causal)
    w = {n: np.asarray(getattr(attn, n).kernel[...], np.float64)
         for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    np.testing.assert_allclose(got, reference_attention(x, w, 4, 2, causal, 500.0), atol=2e-5)


def test_rope_scores_depend_on_relative_position_only():
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 16))
    L = 20
    cos, sin = model.rope_cos_sin(L, 16, 10000.0)
    qs = model.apply_rope(jnp.broadcast_to(q, (1, L, 1, 16)), cos, sin)[0, :, 0]
    ks = model.apply_rope(jnp.broadcast_to(k, (1, L, 1, 16)), cos, sin)[0, :, 0]
    scores = qs @ ks.T
    for offset in (0, 3, 7):
        diag = jnp.diagonal(scores, offset)
        np.testing.assert_allclose(diag, diag[0], rtol=1e-4, atol=1e-4)


def test_scanned_stack_equals_blocks_applied_one_by_one():
    m = small_model()
    stack = model.Stack(m, nnx.Rngs(5))
    x = jax.random.normal(jax.random.key(1), (2, 9, 32))
    cos, sin = model.rope_cos_sin(9, 8, m.rope_theta)
    graphdef, state = nnx.split(stack.blocks)
    expected = x
    for i in range(m.architecture.blocks_per_stack):
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
        expected = block(expected, cos, sin, False)
    np.testing.assert_allclose(stack(x, cos, sin, False), expected, atol=1e-5)


def test_tied_head_uses_the_embedding():
    rack = model.Rack(small_model(tie_embeddings=True), nnx.Rngs(0))
    assert rack.head is None
    x = jax.random.normal(jax.random.key(2), (1, 3, 32))
    np.testing.assert_allclose(rack.logits(x), rack.final_norm(x) @ rack.embed.embedding[...].T,
                               atol=1e-5)
