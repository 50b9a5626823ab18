"""model.attention = mla | linear: kernel attention's O(L) forms against the O(L^2) formula,
causality, parameter counts, the MLA cache size, and bad shapes named by key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stackwise_jax import attention, config, model
from stackwise_jax.errors import UserError


def model_cfg(kind="linear", **keys):
    c = config.defaults()
    m = c.model
    m.attention, m.vocab_size, m.d_model, m.n_heads, m.n_kv_heads, m.d_ff = kind, 64, 32, 4, 2, 64
    m.architecture.n_stacks = 1
    for key, value in keys.items():
        node = m
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.validate(c)
    return m


@pytest.mark.parametrize("causal,L,chunk", [(False, 37, 8), (True, 37, 8), (True, 100, 16),
                                           (True, 5, 64)])
def test_linear_attention_equals_the_quadratic_formula(causal, L, chunk):
    """The O(L) forms (two global sums; chunked prefix sums with a masked block inside each
    chunk, at lengths that no chunk divides) against the explicit (L, L) formula with the
    same features. Both add the same float32 products in another order: by Higham's bound
    the difference is at most ~L * 2^-24 of the sums of |terms|, ~6e-6 relative at L=100;
    atol 2e-5 on outputs of size ~|v| ~ 1 leaves a margin and would catch any wrong term."""
    m = model_cfg(**{"linear.chunk_size": chunk})
    layer = attention.LinearAttention(m, nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (2, L, 32))
    cos, sin = model.rope_cos_sin(L, 8, m.rope_theta)
    feats = nnx.jit(lambda layer, x: layer.features(x, cos, sin))(layer, x * 20.0)
    # (x * 20: |q|, |k| ~ 1, where elu + 1 is far from linear)
    got = jax.jit(attention.linear_attention, static_argnums=(5, 6))(*feats, causal, chunk)
    want = jax.jit(attention.linear_attention_reference, static_argnums=5)(*feats, causal)
    assert got.shape == want.shape == (2, L, 4, 8)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_softmax_attention_is_exact(causal):
    """MLA's attention with model.attention_chunk_size: 37 queries in chunks of 8 (padded)
    equal all at once; the same float32 operations per query row, so 1e-6 is generous."""
    q, k = jax.random.normal(jax.random.key(0), (2, 2, 37, 4, 12))
    v = jax.random.normal(jax.random.key(1), (2, 37, 4, 5))
    run = jax.jit(attention.softmax_attention, static_argnums=(3, 4))
    np.testing.assert_allclose(run(q, k, v, causal, 8), run(q, k, v, causal, 0), atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "mla"])
def test_causal_mode_ignores_the_future_bidirectional_does_not(kind):
    """Positions before 9 ignore a change at 9 in causal mode only."""
    m = model_cfg(kind, **{"linear.chunk_size": 4, "mla.q_lora_rank": 8,
                           "attention_chunk_size": 4})  # 13 positions: padded chunks
    layer = attention.MODULES[kind](m, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 13, 32))
    both = jnp.concatenate([x, x.at[0, 9].set(1.0)])
    cos, sin = model.rope_tables(m, 13)
    for causal in (True, False):
        a, b = nnx.jit(lambda layer, x: layer(x, cos, sin, causal))(layer, both)
        assert bool(jnp.allclose(a[:9], b[:9], atol=1e-6)) == causal, causal
        assert not jnp.allclose(a[9:], b[9:], atol=1e-6)  # position 9 on sees the change


def test_mla_parameters_and_cache_numbers():
    """Shapes written out from DeepSeek-V2's definition, and the cached numbers per token."""
    m = model_cfg("mla", **{"mla.q_lora_rank": 8, "mla.kv_lora_rank": 16,
                            "mla.qk_nope_head_dim": 6, "mla.qk_rope_head_dim": 4,
                            "mla.v_head_dim": 5})
    D, H = 32, 4
    attn = (D * 8 + 8 + 8 * H * (6 + 4)  # q_a, its norm, q_b
            + D * (16 + 4) + 16 + 16 * H * (6 + 5)  # kv_a (latent and shared rope key), norm, kv_b
            + H * 5 * D)  # o
    mlp, norms = 3 * D * 64, 2 * D
    counts = model.param_counts(m)
    assert counts["stack_0"] == attn + mlp + norms
    assert attention.cache_numbers_per_token(m) == 16 + 4
    assert attention.cache_numbers_per_token(model_cfg("gqa")) == 2 * 2 * 8


@pytest.mark.parametrize("key,value,needle", [
    ("attention", "mha", "model.attention='mha' is not allowed; choose one of gqa, mla, linear"),
    ("mla.qk_rope_head_dim", 7, "model.mla.qk_rope_head_dim=7 must be even"),
    ("mla.kv_lora_rank", 0, "model.mla.kv_lora_rank=0 must be a positive integer"),
    ("mla.q_lora_rank", -1, "model.mla.q_lora_rank=-1 must be an integer >= 0"),
    ("mla.v_head_dim", 0, "model.mla.v_head_dim=0"),
    ("linear.feature_map", "relu", "model.linear.feature_map='relu' is not allowed"),
    ("linear.chunk_size", 0, "model.linear.chunk_size=0"),
])
def test_bad_attention_shapes_name_the_key(key, value, needle):
    with pytest.raises(UserError, match=None) as err:
        model_cfg("mla", **{key: value})
    assert needle in str(err.value), str(err.value)


def test_fusion_targets_the_attention_lacks_are_named():
    c = config.defaults()
    c.model.attention = "mla"
    c.training.fusion.steps = 4
    c.training.fusion.lora_targets = ("k_proj", "v_proj")  # GQA's; MLA has kv_a/kv_b instead
    with pytest.raises(UserError, match="model.attention='mla'; it has q_proj, kv_a_proj"):
        config.validate(c)
    c.training.fusion.lora_targets = ("kv_b_proj",)
    config.validate(c)


def test_planner_counts_mla_parameters(corpus_dir):
    """The planner's bytes of a stage that trains one stack (last stage, fp32: that stack,
    final norm and head) and of its frozen trunk equal the model's own parameter counts.
    (Linear attention has GQA's parameters: test_linear_attention_run_loads_and_plans.)"""
    from conftest import small_config
    from stackwise_jax import plan

    for kind in ("mla",):
        cfg = small_config(corpus_dir, **{"model.attention": kind, "model.mla.q_lora_rank": 8})
        counts = model.param_counts(cfg.model)
        row = plan.plan(cfg, 10**12, keys=["fp32"])["phases"][0]
        assert row["trainable_params_bytes"] == 4 * (counts["stack_1"] + counts["final_norm"]
                                                     + counts["head"]), kind
        assert row["frozen_params_bytes"] == 4 * (counts["stack_0"] + counts["embed"]), kind


def test_linear_attention_run_loads_and_plans(corpus_dir, tmp_path):
    """model.attention='linear' through the trainer, load_run and the planner. load_run's
    Rack computes the causal logits of a Rack built from the arrays the stages stored (each
    group's newest store, read here one by one), and bidirectionally the held-out loss the
    trainer measured at the end (its Evaluator: stack by stack from the stores). The
    planner plans the run's largest stage, counting linear attention's parameters."""
    from conftest import small_config
    from stackwise_jax import data, evaluate, objective, plan, store, train
    from stackwise_jax.run import RunParams, load_run, rack_from_params

    cfg = small_config(corpus_dir, **{"model.attention": "linear", "model.linear.chunk_size": 8,
                                      "model.architecture.blocks_per_stack": 1,
                                      "training.steps_per_stage": 2, "eval.batches": 1,
                                      "eval.mask_ratios": (0.5,), "checkpoint.every_steps": 100})
    wd = str(tmp_path / "run")
    summary = train.run(cfg, wd, progress=False)
    loaded = load_run(wd, require_finished=True)
    stored = {g: store.open_store(wd, g, store.versions(wd, g)[-1]).tree()
              for g in RunParams(wd).groups()}
    stored["stacks"] = {k: stored.pop(store.stack_group(k)) for k in range(2)}
    graphdef, state = nnx.split(loaded.rack)
    causal = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids, "causal"))
    ids = np.random.default_rng(0).integers(0, 300, (2, 20)).astype(np.int32)  # 20: 8 + 8 + 4
    np.testing.assert_array_equal(
        causal(state, ids), causal(nnx.state(rack_from_params(cfg.model, stored)), ids))
    # The trainer's held-out loss at ratio 0.5 (same batch, same masks), by the loaded Rack
    # in one program where the Evaluator ran one per stack: the same float32 operations in
    # other XLA programs, which may round differently. Each token's cross-entropy then
    # moves by a few float32 ulps (2^-24 = 6e-8 relative), and each side sums ~60 of them
    # in float32 (a tree of ~6 levels in XLA, ~6 ulps): 2e-6 relative is ~30 ulps.
    rows_L = data.prepare(cfg, wd).heldout_rows
    batch_BxL = data.heldout_batches(rows_L, cfg.data.batch_size, 1)[0]
    key = jax.random.fold_in(jax.random.key(evaluate.EVAL_SEED), 0)
    b = objective.prepare_tokens(key, jnp.asarray(batch_BxL), "masked_diffusion",
                                 (jnp.float32(0.5), jnp.float32(0.5)), loaded.tokenizer.mask_id)
    ce = objective.token_cross_entropy(loaded.rack(b["inputs"], "bidirectional"), b["targets"])
    loss = float(jnp.where(b["valid"], ce, 0.0).sum() / b["valid"].sum())
    assert loss == pytest.approx(summary["heldout_loss"]["0.5"], rel=2e-6)
    row, = plan.plan(cfg, 10**12, keys=["fp32"])["phases"]
    assert row["phase"] == "stage 1, frozen trunk resident in fp32" and row["fits"]
    counts = model.param_counts(cfg.model)
    assert row["trainable_params_bytes"] == 4 * (counts["stack_1"] + counts["final_norm"]
                                                 + counts["head"])
    assert row["frozen_params_bytes"] == 4 * (counts["stack_0"] + counts["embed"])
