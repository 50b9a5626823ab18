"""Mixed precision of the trained stack: bf16 Adam moments and fp16 with loss scaling."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import small_config
from stackwise_jax import loss_scale, optim, phases, resident, step, train
from stackwise_jax.run import load_run


def stage1_step(cfg):
    """Stage 1's jitted step over stack 0 (fp32 trunk) and a fresh stack 1."""
    phase = phases.stage(cfg, 1)
    top = resident.init_top(cfg)
    trainable = {"stacks": {0: resident.init_stack(cfg, 1)}, "final_norm": top["final_norm"],
                 "head": top["head"]}
    frozen = {"embed": resident.cast_floats(top["embed"], resident.compute_dtype(cfg)),
              "trunk": resident.init_stack(cfg, 0)["blocks"]}
    tx = optim.make_optimizer(cfg.training, 10)
    step_fn, _ = step.build(cfg, phase, tx, 1)
    ids = jax.random.randint(jax.random.key(0), (2, cfg.data.seq_len), 2, 300)
    return step_fn, trainable, frozen, tx, ids


def test_fp16_overflow_skips_the_step_and_halves_the_scale(corpus_dir):
    cfg = small_config(corpus_dir, **{"training.progressive.new_stack_precision": "fp16"})
    step, trainable, frozen, tx, ids = stage1_step(cfg)
    state = optim.init_state(tx, trainable, cfg.training)
    assert isinstance(state, optim.LossScaledState)
    before = jax.tree.map(np.asarray, trainable)
    # 2^24 times the loss overflows float16 (max 65504) in the backward pass.
    huge = state._replace(loss_scale=loss_scale.init(2.0 ** 24))
    after, new_state, loss, finite = step(jax.tree.map(jnp.copy, trainable), frozen, huge, ids,
                                          jax.random.key(1))
    assert np.isfinite(float(loss)) and not bool(finite)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        assert np.array_equal(a, b)
    assert float(new_state.loss_scale.scale) == 2.0 ** 23
    assert int(new_state.inner[1][0].count) == 0  # Adam (after the clip) never saw them
    # The default scale trains: Adam counts the step (warmup: the first step's rate is 0).
    _, ok_state, _, ok = step(jax.tree.map(jnp.copy, trainable), frozen,
                              optim.init_state(tx, trainable, cfg.training), ids, jax.random.key(1))
    assert bool(ok)
    assert int(ok_state.inner[1][0].count) == 1 and int(ok_state.loss_scale.good_steps) == 1


def test_fp16_run_trains_and_resumes_bit_identically(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, **{"training.progressive.new_stack_precision": "fp16"})
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    summary = train.run(cfg, full, progress=False)
    train.run(cfg, cut, max_steps=3, progress=False)  # loss scale and Adam state checkpointed
    train.run(cfg, cut, progress=False)
    a = jax.tree.leaves(nnx.state(load_run(full).rack, nnx.Param))
    b = jax.tree.leaves(nnx.state(load_run(cut).rack, nnx.Param))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    losses = [json.loads(l)["loss"] for l in open(os.path.join(full, "metrics.jsonl"))]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(np.isfinite(v) for v in summary["heldout_loss"].values())


def test_bf16_moments_halve_optimizer_bytes_and_track_fp32(corpus_dir):
    updates = {}
    for dtype in ("fp32", "bf16"):
        cfg = small_config(corpus_dir, **{"training.optimizer_state_dtype": dtype})
        step, trainable, frozen, tx, ids = stage1_step(cfg)
        state = tx.init(trainable)
        new, trainable = trainable, jax.tree.map(np.array, trainable)  # the step donates
        for i in range(3):
            new, state, _, _ = step(new, frozen, state, ids, jax.random.key(i))
        updates[dtype] = jax.tree.map(lambda n, o: np.asarray(n) - np.asarray(o), new, trainable)
        adam = state[1][0]  # chain(clip, adamw) -> adamw's first part: the moments
        updates[dtype + "_bytes"] = sum(x.nbytes for x in jax.tree.leaves((adam.mu, adam.nu)))
        if dtype == "bf16":
            assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((adam.mu, adam.nu)))
    assert updates["bf16_bytes"] * 2 == updates["fp32_bytes"]
    for a, b in zip(jax.tree.leaves(updates["fp32"]), jax.tree.leaves(updates["bf16"])):
        scale = np.abs(a).max()
        assert np.abs(a - b).max() <= 0.05 * scale + 1e-7
