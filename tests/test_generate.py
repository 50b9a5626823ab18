"""Attention at any length; causal generation with a KV cache against full recomputation;
masked-diffusion sampling (LLaDA low-confidence remasking)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stackwise_jax import config, diffusion_sample, model, run
from stackwise_jax import generate as generate_lib
from stackwise_jax.errors import UserError

EPS32 = float(np.finfo(np.float32).eps)
MASK_ID = 99


def small_model(**model_keys):
    """A 1-stack, 2-layer Rack, every weight random at a scale that gives O(1) logits with clear
    argmax margins (at the init scale, 0.02, the logits are near-uniform)."""
    c = config.defaults()
    m = c.model
    m.vocab_size, m.d_model, m.n_heads, m.n_kv_heads, m.d_ff = 100, 32, 4, 2, 64
    m.architecture.n_stacks, m.architecture.blocks_per_stack = 1, 2
    for key, value in model_keys.items():
        if isinstance(value, dict):  # a group of keys: model.mla, model.linear
            m[key].update(value)
        else:
            m[key] = value
    rng = np.random.default_rng(0)  # drawn in numpy: an eager Flax init compiles many ops
    params = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32),
                          run.abstract_params(m))
    return run.rack_from_params(m, params)


def reference_attention(q_BxLxKxGxE, k_BxLxKxE, v_BxLxKxE, causal):
    """The unchunked formula in float64: softmax(q k^T / sqrt(E)) v, GQA by head groups."""
    q, k, v = (np.asarray(a, np.float64) for a in (q_BxLxKxGxE, k_BxLxKxE, v_BxLxKxE))
    L, E = q.shape[1], q.shape[-1]
    scores = np.einsum("bqkge,blke->bkgql", q, k) / np.sqrt(E)
    if causal:
        scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bkgql,blke->bqkge", probs, v), np.abs(scores[np.isfinite(scores)]).max()


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_attention_takes_lengths_no_chunk_divides(causal):
    """L = 37 with chunks of 16 and of 5 (and unchunked): the padded, chunked attention equals the
    explicit formula. float32 error: a softmax row's weights carry a relative error of a few
    eps32 times |score| (exp of a rounded score), and the output is their average of v, so
    |error| <= c * eps32 * (1 + max|score|) * max|v|; c = 64 leaves room for the length-E
    and length-L sums (<= 37 terms, whose rounding grows like sqrt(n))."""
    rng = np.random.default_rng(0)
    B, L, K, G, E = 2, 37, 2, 2, 8
    q = rng.standard_normal((B, L, K, G, E)).astype(np.float32)
    k = rng.standard_normal((B, L, K, E)).astype(np.float32)
    v = rng.standard_normal((B, L, K, E)).astype(np.float32)
    want, max_score = reference_attention(q, k, v, causal)
    tol = 64 * EPS32 * (1 + max_score) * np.abs(v).max()
    for chunk in (16, 5, 0):
        got = model.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk, causal)
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=tol, err_msg=str(chunk))


def causal_forward(rack, mode="causal"):
    graphdef, state = nnx.split(rack)
    forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids, mode=mode))
    return lambda ids: np.asarray(forward(state, jnp.asarray(ids)))


def test_rack_forward_any_length_matches_unchunked():
    """The whole model at L = 37, chunks of 16 against no chunking (causal; both modes are
    checked against the formula above)."""
    ids = np.random.default_rng(1).integers(0, 100, (2, 37))
    chunked = causal_forward(small_model(attention_chunk_size=16))(ids)
    whole = causal_forward(small_model())(ids)
    # the same operations per query row, grouped differently: rounding-level apart (2
    # layers of O(1) activations; 1e3 eps32 of the logit scale is far above it)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e3 * EPS32 * np.abs(whole).max())


def test_chunk_size_need_not_divide_the_sequence_length():
    c = config.defaults()
    c.model.attention_chunk_size = 48  # data.seq_len 128: the third chunk is padded
    config.validate(c)
    c.model.attention_chunk_size = -1
    with pytest.raises(UserError, match="model.attention_chunk_size=-1 must be an integer >= 0"):
        config.validate(c)


def test_llama70b_causal_forward_of_1500_tokens_has_a_shape():
    """configs/llama70b.py scores 1024 queries at a time; 1,500 tokens used to fail in a
    reshape. Abstract evaluation only: nothing of the 70B model is allocated. Two of the 80
    identical one-layer stacks are traced (each stack runs the same attention code; all 80
    take 5x longer to trace and show nothing more)."""
    m = config.load("configs/llama70b.py").model
    with m.unlocked():
        m.architecture.n_stacks = 2
    abstract = nnx.eval_shape(lambda: model.Rack(m, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    out = jax.eval_shape(lambda s, ids: nnx.merge(graphdef, s)(ids, mode="causal"), state,
                         jax.ShapeDtypeStruct((1, 1500), jnp.int32))
    assert out.shape == (1, 1500, 128256)


def full_recompute_greedy(rack, prompt_BxP, n_new):
    """Greedy decoding by a full causal forward of the whole buffer at every step."""
    forward = causal_forward(rack)
    B, P = prompt_BxP.shape
    ids = np.zeros((B, P + n_new), np.int32)
    ids[:, :P] = prompt_BxP
    for t in range(P, P + n_new):
        ids[:, t] = forward(ids)[:, t - 1].argmax(-1)
    return ids


def test_greedy_generation_equals_full_recompute_one_compile_per_shape():
    """Chunks of 8 over a 21-token buffer: the prefill pads, each decoding step reads the
    cache. Prompts of 7 and 4 tokens with the same total length share one compilation
    (sampling too: temperature and top_p are traced values)."""
    rack = small_model(attention_chunk_size=8)
    prompt = np.random.default_rng(2).integers(0, 100, (2, 7)).astype(np.int32)
    before = generate_lib.TRACES["generate"]
    out = generate_lib.generate(rack, prompt, 14)
    np.testing.assert_array_equal(out, full_recompute_greedy(rack, prompt, 14))
    shorter = generate_lib.generate(rack, prompt[:, :4], 17)
    assert shorter.shape == (2, 21) and (shorter[:, :4] == prompt[:, :4]).all()
    assert generate_lib.TRACES["generate"] - before == 1
    a = generate_lib.generate(rack, prompt, 14, temperature=1.0, top_p=0.9, seed=5)
    b = generate_lib.generate(rack, prompt, 14, temperature=1.0, top_p=0.9, seed=5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :7], prompt)
    assert generate_lib.TRACES["generate"] - before == 1
    with pytest.raises(UserError, match="max_new_tokens"):
        generate_lib.generate(rack, prompt, 0)
    with pytest.raises(UserError, match="non-empty"):
        generate_lib.generate(rack, np.zeros((1, 0), np.int32), 3)


def test_top_p_keeps_the_nucleus():
    """At temperature 1, top_p below the top token's probability leaves only that token;
    top_p = 1 draws from everything (two tokens of equal logit both appear)."""
    logits = jnp.asarray([[3.0, 0.0, 0.0, 0.0], [1.0, 1.0, -30.0, -30.0]])
    keys = jax.random.split(jax.random.key(0), 64)
    draw = jax.jit(jax.vmap(generate_lib.sample_token, in_axes=(None, None, None, 0)))
    nucleus = np.asarray(draw(logits, 1.0, 0.3, keys))
    everything = np.asarray(draw(logits, 1.0, 1.0, keys))
    assert (nucleus == 0).all()
    assert set(everything[:, 1]) == {0, 1}
    assert (np.asarray(draw(logits, 0.0, 1.0, keys)) == 0).all()  # temperature 0: argmax


def test_cache_bytes_per_token_is_what_the_cache_allocates():
    rack = small_model()
    cache = generate_lib.empty_cache(rack, batch=1, max_len=10)
    allocated = sum(a.nbytes for layer in cache for a in layer.values())
    assert generate_lib.cache_bytes_per_token(rack.config, dtype_bytes=4)["gqa"] * 10 == allocated
    m70 = config.load("configs/llama70b.py").model
    # 80 layers x (k, v) x 8 KV heads x 128 dims x 2 bytes (bf16)
    assert generate_lib.cache_bytes_per_token(m70)["gqa"] == 80 * 2 * 8 * 128 * 2 == 327680


def test_mla_and_linear_greedy_generation_equal_full_recompute():
    """MLA decodes from its latent cache (kv_b_proj absorbed into query and output), linear
    attention from its recurrent state; each equals a full causal forward at every step.
    MLA with chunks of 8 over a 21-token buffer (the prefill pads); linear attention with
    prefix-sum chunks of 4, so the prefill's chunked form differs from the one-token
    recurrence. Each cache's allocation is what its bytes function says."""
    prompt = np.random.default_rng(4).integers(0, 100, (2, 7)).astype(np.int32)
    mla = small_model(attention="mla", attention_chunk_size=8, mla=dict(
        kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6))
    np.testing.assert_array_equal(generate_lib.generate(mla, prompt, 14),
                                  full_recompute_greedy(mla, prompt, 14))
    cache = generate_lib.empty_cache(mla, batch=1, max_len=10)
    assert sorted(cache[0]) == ["k_rope", "latent"]
    allocated = sum(a.nbytes for layer in cache for a in layer.values())
    assert generate_lib.cache_bytes_per_token(mla.config, dtype_bytes=4)["mla"] * 10 == allocated
    assert allocated == 10 * 2 * (24 + 4) * 4  # 2 layers x (latent + rope key) x fp32

    linear = small_model(attention="linear", linear=dict(chunk_size=4))
    np.testing.assert_array_equal(generate_lib.generate(linear, prompt, 14),
                                  full_recompute_greedy(linear, prompt, 14))
    state = generate_lib.empty_cache(linear, batch=3, max_len=10)
    assert sum(a.nbytes for layer in state for a in layer.values()) == \
        generate_lib.linear_state_bytes(linear.config, batch=3) == 3 * 2 * 2 * (8 * 8 + 8) * 4


def test_cache_bytes_for_the_70b_shape_with_mla():
    """DeepSeek-V3's MLA sizes on configs/llama70b.py: 80 layers x (512 + 64) x 2 bytes."""
    m = config.load("configs/llama70b.py").model
    with m.unlocked():
        m.attention = "mla"
        m.mla.update(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128)
    assert generate_lib.cache_bytes_per_token(m) == {"gqa": 327680, "mla": 92160}
    with m.unlocked():
        m.attention = "linear"
    assert generate_lib.linear_state_bytes(m) == 80 * 8 * (128 * 128 + 128) * 4


# ----------------------------------------------------------------- masked diffusion


def test_diffusion_one_token_per_step_fills_every_position_deterministically():
    """steps = generated tokens, one block per token: each step fixes one position, left to
    right; a seed decides the draws at temperature 1; the prompt is never changed."""
    rack = small_model()
    prompt = np.random.default_rng(3).integers(0, MASK_ID, (2, 6)).astype(np.int32)
    run = lambda seed: diffusion_sample.diffusion_generate(  # noqa: E731
        rack, prompt, 9, MASK_ID, steps=9, block_length=1, temperature=1.0, seed=seed)
    a, b, other = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert not (a == other).all()  # the seed matters (100-way draws at 9 x 2 positions)
    for out in (a, other):
        np.testing.assert_array_equal(out[:, :6], prompt)
        assert out.shape == (2, 15) and not (out == MASK_ID).any()


def test_diffusion_single_step_is_the_argmax_of_the_all_masked_sequence():
    """steps = 1, one block: every position is fixed at once, to the argmax (never [MASK])
    of the model's prediction for the prompt followed by masks only."""
    rack = small_model()
    prompt = np.asarray([5, 17, 42], np.int32)
    out = diffusion_sample.diffusion_generate(rack, prompt, 8, MASK_ID, steps=1)
    masked = np.concatenate([prompt, np.full(8, MASK_ID, np.int32)])[None]
    logits = causal_forward(rack, "bidirectional")(masked)[0].copy()
    logits[:, MASK_ID] = -np.inf
    np.testing.assert_array_equal(out, np.concatenate([prompt, logits[3:].argmax(-1)]))


def test_diffusion_blocks_and_schedule():
    """Semi-autoregressive blocks of 3 over 8 tokens with 5 steps: (3, 2), (3, 2), (2, 1)
    steps per block; LLaDA's transfer counts; too few steps for the blocks is refused."""
    assert diffusion_sample.transfer_schedule(5, 2) == [3, 2]
    assert diffusion_sample.transfer_schedule(2, 3) == [1, 1, 0]
    assert diffusion_sample.block_plan(8, 5, 3) == [(0, 3, 2), (3, 6, 2), (6, 8, 1)]
    with pytest.raises(UserError, match="--steps=2 is fewer than the 3 blocks"):
        diffusion_sample.block_plan(8, 2, 3)
    rack = small_model()
    out = diffusion_sample.diffusion_generate(rack, np.asarray([[1, 2, 3]]), 8, MASK_ID,
                                              steps=5, block_length=3)
    assert out.shape == (1, 11) and not (out == MASK_ID).any() and (out[0, :3] == [1, 2, 3]).all()
    with pytest.raises(UserError, match="--steps=0"):
        diffusion_sample.diffusion_generate(rack, np.asarray([1]), 4, MASK_ID, steps=0)
