"""Levers of stack-wise quality: block fusion, copy initialisation, the budget split."""

import numpy as np
import pytest

from conftest import small_config
from stackwise_jax import phases, plan, resident, store, train
from stackwise_jax.errors import UserError

BLOCK = {"training.fusion.mode": "block", "training.fusion.steps": 4,
         "training.fusion.base_precision": "fp32"}


def _stack(run_dir, k, version):
    s = store.open_store(run_dir, store.stack_group(k), version)
    return {name: np.array(s.read(name)) for name in s.leaves}


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


def test_block_fusion_trains_one_stack_per_turn_and_resumes_exactly(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, **BLOCK)  # 2 stages of 6 steps, then turns of 2 steps
    ph = phases.all_phases(cfg)
    assert [p.kind for p in ph] == ["stage", "stage", "block", "block"]
    assert [(p.trunk_stacks, p.trained_stacks, p.upper_stacks) for p in ph[2:]] == [
        ((), (0,), (1,)), ((0,), (1,), ())]
    assert all("embed" not in p.train_top for p in ph[2:])
    run = str(tmp_path / "run")
    train.run(cfg, run, max_steps=12, progress=False)  # the stages only
    after_stages = {k: _stack(run, k, k + 1) for k in range(2)}
    train.run(cfg, run, max_steps=2, progress=False)  # stack 0's turn
    # Stack 1's turn has not come: its stored weights are the ones its stage wrote.
    assert store.newest(run, store.stack_group(1), 10) == 2
    assert _same(_stack(run, 1, 2), after_stages[1])
    turned0 = _stack(run, 0, 3)
    assert not _same(turned0, after_stages[0])
    summary = train.run(cfg, run, progress=False)
    assert _same(_stack(run, 0, 3), turned0)  # frozen during stack 1's turn
    assert not _same(_stack(run, 1, 4), after_stages[1])
    assert [s.get("phase") for s in summary["stages"]] == [None, None, "block", "block"]
    # An uninterrupted run gives the same weights: turns restart nothing on resume.
    whole = str(tmp_path / "whole")
    train.run(cfg, whole, progress=False)
    for k, version in ((0, 3), (1, 4)):
        assert _same(_stack(whole, k, version), _stack(run, k, version))


def test_block_fusion_holds_no_more_than_a_stage(corpus_dir):
    """By the planner: a turn holds the trained stack and head with their Adam state
    (what a stage trains) and every other stack frozen (what the last stage holds)."""
    cfg = small_config(corpus_dir, **{**BLOCK, "training.fusion.remat": "full"})
    rows = {key: plan.analyze(cfg, key, 10**12) for key in (plan.FIRST, "fp32", plan.BLOCK)}
    stage_peak = max(rows[plan.FIRST]["non_temporary_bytes"], rows["fp32"]["non_temporary_bytes"])
    assert rows[plan.BLOCK]["non_temporary_bytes"] <= stage_peak
    assert rows[plan.BLOCK]["trainable_params_bytes"] <= rows[plan.FIRST]["trainable_params_bytes"]


def test_copy_starts_a_new_stack_from_the_one_below(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, **{"training.progressive.new_stack_init": "copy"})
    run = str(tmp_path / "run")
    train.run(cfg, run, max_steps=6, progress=False)  # stage 0 done, stack 0 stored
    start = resident.trainable_at_start(cfg, run, phases.stage(cfg, 1))["stacks"][0]
    stored = resident.load_group(run, store.stack_group(0), 1)
    assert all(np.array_equal(a, b) for a, b in zip(*map(
        lambda t: [np.asarray(x) for x in __import__("jax").tree.leaves(t)], (start, stored))))


@pytest.mark.parametrize("split,steps", [("equal", [6, 6, 6]), ("increasing", [3, 6, 9]),
                                         ("decreasing", [9, 6, 3])])
def test_step_split_keeps_the_total(corpus_dir, split, steps):
    cfg = small_config(corpus_dir, **{"model.architecture.n_stacks": 3,
                                      "training.progressive.step_split": split})
    assert [p.n_steps for p in phases.all_phases(cfg)] == steps
    odd = small_config(corpus_dir, **{"model.architecture.n_stacks": 3,
                                      "training.steps_per_stage": 5,
                                      "training.progressive.step_split": split})
    assert sum(p.n_steps for p in phases.all_phases(odd)) == 15


@pytest.mark.parametrize("overrides,named", [
    ({**BLOCK, "training.fusion.steps": 5}, "training.fusion.steps"),
    ({**BLOCK, "training.progressive.stack_storage_dtype": "bf16"}, "stack_storage_dtype"),
    ({"training.fusion.mode": "blocks"}, "training.fusion.mode"),
    ({"training.progressive.step_split": "even"}, "training.progressive.step_split"),
])
def test_bad_lever_settings_are_named(corpus_dir, overrides, named):
    with pytest.raises(UserError, match=named):
        small_config(corpus_dir, **overrides)
