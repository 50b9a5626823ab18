"""Fusion: QLoRA adapters trained on the whole Rack over a quantised base, then merged."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from stackwise_jax import attention as attention_lib
from stackwise_jax import config, fusion, lora, objective, phases, resident, step, store, train
from stackwise_jax.errors import UserError
from stackwise_jax.run import load_run, rack_from_params


def masked_diffusion_loss(logits_BxLxV, targets_BxL, masked_BxL):
    """The objective's definition on logits: mean cross-entropy over masked positions."""
    ce = jax.nn.logsumexp(logits_BxLxV, -1) - jnp.take_along_axis(
        logits_BxLxV, targets_BxL[..., None], -1)[..., 0]
    return jnp.where(masked_BxL, ce, 0.0).sum() / masked_BxL.sum()


def params_of(workdir):
    return nnx.to_pure_dict(nnx.state(load_run(workdir).rack, nnx.Param))


def leaves(tree):
    return dict(jax.tree_util.tree_flatten_with_path(tree)[0])


def fusion_config(corpus_dir, **kw):
    return small_config(corpus_dir, **{"training.fusion.steps": 6,
                                       "training.fusion.lora_rank": 4, **kw})


# nf4 with GQA: test_fusion_trains_only_adapters_and_changes_every_stack (nf4 by default)
@pytest.mark.parametrize("base,attention", [("fp32", "gqa"), ("nf4", "mla")])
def test_merged_rack_computes_what_fusion_trained(corpus_dir, tmp_path, base, attention):
    cfg = fusion_config(corpus_dir, **{"training.fusion.base_precision": base,
                                       "model.attention": attention, "model.mla.q_lora_rank": 8,
                                       "training.fusion.lora_targets": lora.PROJECTIONS})
    wd = str(tmp_path)
    n = cfg.model.architecture.n_stacks
    for k in range(n):
        store.write(wd, store.stack_group(k), k + 1, resident.init_stack(cfg, k))
    top = resident.init_top(cfg)
    for g in ("embed", "final_norm", "head"):
        store.write(wd, g, n, top[g])
    phase = phases.fusion(cfg)
    frozen = resident.frozen_state(cfg, wd, phase)
    adapters = resident.trainable_at_start(cfg, wd, phase, frozen["trunk"])["adapters"]
    assert set(adapters["attn"]) == set(attention_lib.projections(cfg.model))
    # Trained adapters: B is no longer zero.
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                            adapters)
    ids = jax.random.randint(jax.random.key(2), (2, cfg.data.seq_len), 0, 299)
    batch = objective.prepare_tokens(jax.random.key(3), ids, "masked_diffusion",
                                     phase.mask_range, 299)
    loss_sum = step.make_loss_sum(cfg, phase, resident.Template(cfg.model, 0))
    den = objective.loss_denominator(batch, "mean")
    adapted = loss_sum({"adapters": adapters}, frozen, batch) / den

    fusion.store_merged(cfg, wd, frozen["trunk"], adapters, n + 1)
    merged = {g: top[g] for g in ("embed", "final_norm", "head")}
    merged["stacks"] = {k: store.open_store(wd, store.stack_group(k), n + 1).tree()
                        for k in range(n)}
    rack = rack_from_params(cfg.model, jax.tree.map(jnp.asarray, merged))
    plain = masked_diffusion_loss(rack(batch["inputs"], "bidirectional"), ids, batch["valid"])
    np.testing.assert_allclose(plain, adapted, rtol=1e-5)
    # The adapters moved the loss: merging them is not a no-op.
    base_loss = loss_sum({"adapters": jax.tree.map(jnp.zeros_like, adapters)}, frozen, batch) / den
    assert abs(float(base_loss) - float(adapted)) > 1e-3


def test_fusion_trains_only_adapters_and_changes_every_stack(corpus_dir, tmp_path):
    cfg = fusion_config(corpus_dir)
    wd = str(tmp_path / "run")
    stage_steps = cfg.training.steps_per_stage * cfg.model.architecture.n_stacks
    train.run(cfg, wd, max_steps=stage_steps, progress=False)
    before = params_of(wd)
    summary = train.run(cfg, wd, progress=False)
    after = params_of(wd)
    record = summary["stages"][-1]
    assert record["phase"] == "fusion" and record["steps"] == 6
    n_adapter = sum(x.size for x in jax.tree.leaves(
        resident.abstract_trainable(cfg, phases.fusion(cfg))))
    assert record["trainable_params"] == n_adapter
    for name in ("embed", "final_norm", "head"):
        for path, value in leaves(before[name]).items():
            assert np.array_equal(leaves(after[name])[path], value), (name, path)
    for k in range(cfg.model.architecture.n_stacks):
        q_before = before["stacks"][k]["blocks"]["attn"]["q_proj"]["kernel"]
        q_after = after["stacks"][k]["blocks"]["attn"]["q_proj"]["kernel"]
        assert not np.array_equal(q_before, q_after), k
    losses = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert [l["stage"] for l in losses][-3:] == [2, 2, 2]


def test_resume_during_fusion_matches_uninterrupted_run(corpus_dir, tmp_path):
    cfg = fusion_config(corpus_dir, **{"training.fusion.objective": "causal"})
    full = str(tmp_path / "full")
    train.run(cfg, full, progress=False)
    cut = str(tmp_path / "cut")
    stage_steps = cfg.training.steps_per_stage * cfg.model.architecture.n_stacks
    train.run(cfg, cut, max_steps=stage_steps + 3, progress=False)  # mid fusion
    train.run(cfg, cut, progress=False)
    for path, value in leaves(params_of(full)).items():
        assert np.array_equal(leaves(params_of(cut))[path], value), path


@pytest.mark.parametrize("key,value,needle", [
    ("training.fusion.lora_targets", ("q_proj", "qkv"), "training.fusion.lora_targets"),
    ("training.fusion.base_precision", "int4", "training.fusion.base_precision"),
    ("training.fusion.steps", -1, "training.fusion.steps"),
])
def test_bad_fusion_config_names_the_key(corpus_dir, key, value, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        small_config(corpus_dir, **{key: value})
    assert config.defaults().training.fusion.steps == 0  # off unless asked for
