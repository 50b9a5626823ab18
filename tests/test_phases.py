"""Memory bounded by one stage: stacks born per stage, stored once, assembled stack by stack;
the planner against measured live bytes; gradient accumulation; non-finite steps."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import small_config
from stackwise_jax import checkpoint, memory, phases, plan, quant, resident, step, store, train
from stackwise_jax.errors import UserError
from stackwise_jax.run import load_run


def leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def nbytes(tree):
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------- 1. born per stage


def test_stack_init_depends_on_seed_and_index_only(corpus_dir):
    cfg = small_config(corpus_dir, **{"model.architecture.n_stacks": 3})
    forward = [leaves(resident.init_stack(cfg, k)) for k in range(3)]
    backward = [leaves(resident.init_stack(cfg, k)) for k in (2, 1, 0)][::-1]
    for a, b in zip(forward, backward):
        assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)
    assert not np.array_equal(*[f["['blocks']['attn']['q_proj']['kernel']"] for f in forward[:2]])
    other_seed = small_config(corpus_dir, **{"model.architecture.n_stacks": 3, "training.seed": 1})
    assert not np.array_equal(leaves(resident.init_stack(other_seed, 0))[
        "['blocks']['attn']['q_proj']['kernel']"], forward[0]["['blocks']['attn']['q_proj']['kernel']"])


def test_progressive_and_end_to_end_start_from_the_same_weights(corpus_dir, tmp_path):
    """Stack k is born from (seed, k) in every mode: stage k of a progressive run starts
    from what end-to-end's single stage starts from."""
    prog = small_config(corpus_dir)
    e2e = small_config(corpus_dir, **{"training.progressive.enabled": False})
    e2e_start = resident.trainable_at_start(e2e, str(tmp_path), phases.stage(e2e, 0))
    for g, tree in resident.init_top(prog).items():  # what stage 0 stores for stage 1
        store.write(str(tmp_path), g, 1, tree)
    for k in range(2):
        start = resident.trainable_at_start(prog, str(tmp_path), phases.stage(prog, k))
        a, b = leaves(start["stacks"][0]), leaves(e2e_start["stacks"][k])
        assert all(np.array_equal(a[p], b[p]) for p in a)
    stage0 = resident.trainable_at_start(prog, str(tmp_path), phases.stage(prog, 0))
    for g in ("embed", "head", "final_norm"):
        a, b = leaves(stage0[g]), leaves(e2e_start[g])
        assert all(np.array_equal(a[p], b[p]) for p in a)


def test_a_checkpoint_inside_stage_k_holds_no_other_stack(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, **{"model.architecture.n_stacks": 3})
    wd = str(tmp_path / "run")
    steps = cfg.training.steps_per_stage
    train.run(cfg, wd, max_steps=2 * steps + 3, progress=False)  # mid stage 2
    ckpt = checkpoint.Checkpointer(wd, 3, create=False)
    latest = ckpt.latest_step()
    meta = ckpt.meta(latest)
    phase = phases.stage(cfg, 2)
    like = resident.abstract_trainable(cfg, phase)
    _, trainable, _ = ckpt.restore(latest, like)
    ckpt.close()
    assert meta["stage"] == 2 and meta["step"] == 3
    assert sorted(trainable) == ["final_norm", "head", "stacks"]
    assert list(trainable["stacks"]) == ["0"] or list(trainable["stacks"]) == [0]
    # Stage 2's stack is the one in the checkpoint: it is not stack 0 or 1 as stored.
    q = np.asarray(trainable["stacks"][next(iter(trainable["stacks"]))]["blocks"]["attn"]["q_proj"]["kernel"])
    for k in (0, 1):
        stored = store.open_store(wd, store.stack_group(k), k + 1).read("blocks.attn.q_proj.kernel")
        assert not np.array_equal(q, stored)
    # Its size is one stage's: trainable + optimizer state, not the model.
    item = os.path.join(wd, "checkpoints", str(latest))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(item) for f in fs)
    stage_state = 3 * nbytes(like)  # parameters, Adam's mu and nu
    model = sum(nbytes(resident.abstract_stack(cfg)) for _ in range(3)) + nbytes(resident.abstract_top(cfg))
    assert size < stage_state + 64 * 1024 and stage_state < 3 * model
    # Finished stacks are stored once each, in their own directory.
    assert store.versions(wd, "stack_00000") == [1] and store.versions(wd, "stack_00001") == [2]
    assert store.versions(wd, "stack_00002") == []


# ------------------------------------------------------------- 3. stack-by-stack trunk


def _write_stacks(cfg, wd, n):
    stacks = [resident.init_stack(cfg, k) for k in range(n)]
    for k, s in enumerate(stacks):
        store.write(wd, store.stack_group(k), k + 1, s)
    return stacks


@pytest.mark.parametrize("fmt", ["nf4", "bf16", "fp32"])
def test_trunk_assembly_never_holds_the_float32_trunk(corpus_dir, tmp_path, fmt):
    cfg = small_config(corpus_dir, **{"model.d_model": 64, "model.d_ff": 256,
                                      "model.architecture.n_stacks": 8,
                                      "model.architecture.blocks_per_stack": 1})
    wd = str(tmp_path)
    stacks = _write_stacks(cfg, wd, 8)
    fp32_trunk = nbytes(stacks)
    largest_leaf = max(x.nbytes for x in jax.tree.leaves(stacks[0]))
    del stacks
    resident_trunk = nbytes(resident.abstract_trunk(cfg, 8, fmt))
    memory.start_phase()
    baseline = memory.live_bytes()
    trunk = resident.assemble_trunk(cfg, wd, tuple(range(8)), fmt, 8, "test")
    peak = memory.phase_record()["peak_live_bytes"] - baseline
    # The trunk in its format plus one stored array on its way in, never the fp32 trunk.
    assert nbytes(trunk) == resident_trunk
    assert peak <= resident_trunk + largest_leaf, (peak, resident_trunk, largest_leaf)
    if fmt != "fp32":
        assert peak < 0.6 * fp32_trunk
    # Bit-identical to quantising the concatenated float32 stacks at once.
    dense = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[resident.init_stack(cfg, k)["blocks"]
                                                            for k in range(8)])
    expected = dense if fmt == "fp32" else quant.quantize_tree(dense, fmt)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(trunk)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_or_truncated_stack_store_names_the_stack(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, **{"model.architecture.n_stacks": 3})
    wd = str(tmp_path / "run")
    train.run(cfg, wd, max_steps=2 * cfg.training.steps_per_stage, progress=False)
    q = os.path.join(store.root(wd), "stack_00001", "v00002", "blocks.attn.q_proj.kernel.npy")
    with open(q, "r+b") as f:
        f.truncate(os.path.getsize(q) // 2)
    with pytest.raises(UserError, match=r"stack 1\b.*truncated"):
        train.run(cfg, wd, progress=False)
    os.rename(os.path.join(store.root(wd), "stack_00001", "v00002"),
              os.path.join(store.root(wd), "stack_00001", "v00002.partial"))  # an interrupted write
    with pytest.raises(UserError, match=r"stack 1 are missing"):
        train.run(cfg, wd, progress=False)
    assert not os.path.exists(os.path.join(store.root(wd), "stack_00002"))  # nothing retrained


def test_interrupted_store_write_is_never_taken_as_complete(tmp_path, monkeypatch):
    tree = {"blocks": {"a": np.ones((2, 3), np.float32), "b": np.zeros((2, 4), np.float32)}}
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        raise OSError("disk full")

    monkeypatch.setattr(store, "atomic_write_text", failing)  # dies before the manifest
    with pytest.raises(OSError):
        store.write(str(tmp_path), "stack_00000", 1, tree)
    assert calls and store.versions(str(tmp_path), "stack_00000") == []
    assert store.newest(str(tmp_path), "stack_00000", 5) is None
    monkeypatch.undo()
    store.write(str(tmp_path), "stack_00000", 1, tree)  # a rerun replaces the leftover
    assert sorted(os.listdir(os.path.join(store.root(str(tmp_path)), "stack_00000"))) == ["v00001"]


# ------------------------------------------------------- 4. planner vs measured memory


@pytest.mark.parametrize("overrides,keys", [
    ({"training.progressive.frozen_precision": "nf4", "training.fusion.steps": 2},
     [plan.FIRST, "nf4", plan.FUSION]),
    ({"training.progressive.cache_activations": True}, [plan.FIRST, plan.CACHED]),
])
def test_planner_counts_what_the_run_holds(corpus_dir, tmp_path, overrides, keys):
    """The planner's non-temporary bytes of each phase against the measured peak of live
    JAX arrays in that phase. Both count the same arrays from the same shapes; only scalars
    (keys, losses) and the measurement's granularity differ, so 10% is a wide margin."""
    cfg = small_config(corpus_dir, **{"model.d_model": 64, "model.d_ff": 192, **overrides})
    summary = train.run(cfg, str(tmp_path / "run"), progress=False)
    records = {plan.FIRST: summary["stages"][0], keys[1]: summary["stages"][1]}
    if plan.FUSION in keys:
        records[plan.FUSION] = summary["stages"][2]
    for key in keys:
        planned = plan.analyze(cfg, key, 10**12)["non_temporary_bytes"]
        measured = records[key]["peak_live_bytes"]
        assert abs(planned - measured) <= 0.1 * measured, (key, planned, measured)
        assert records[key]["peak_rss_bytes"] > measured


# --------------------------------------------------------------- 5. accumulation


def test_gradient_accumulation_equals_the_big_batch(corpus_dir):
    cfg = small_config(corpus_dir)
    phase = phases.stage(cfg, 1)
    big = small_config(corpus_dir, **{"data.batch_size": 8})
    acc = small_config(corpus_dir, **{"data.batch_size": 2, "training.grad_accum_steps": 4})
    ids = jax.random.randint(jax.random.key(0), (8, cfg.data.seq_len), 2, 300)
    frozen = {"embed": resident.init_top(cfg)["embed"],
              "trunk": jax.tree.map(jnp.asarray, resident.init_stack(cfg, 0)["blocks"])}
    trainable = {"stacks": {0: resident.init_stack(cfg, 1)}, "final_norm": resident.init_top(cfg)["final_norm"],
                 "head": resident.init_top(cfg)["head"]}
    tx = optax.sgd(1.0)  # new params = params - gradient: compares gradients directly
    out = {}
    for name, c in (("big", big), ("acc", acc)):
        template = resident.Template(c.model, 1)
        fn = step.make_train_step(step.make_loss_sum(c, phase, template), step.make_prepare(phase, 1),
                                  tx, "mean", c.training.grad_accum_steps)
        new, _, loss, finite = fn(jax.tree.map(jnp.copy, trainable), frozen, tx.init(trainable),
                                  ids, jax.random.key(1))
        out[name] = (leaves(new), float(loss))
        assert bool(finite)
    np.testing.assert_allclose(out["acc"][1], out["big"][1], rtol=2**-20)
    start = leaves(trainable)
    for path in start:
        g_big = start[path] - out["big"][0][path]
        g_acc = start[path] - out["acc"][0][path]
        # Only float32 summation order differs. An entry of a projection's gradient sums
        # n = B * L * L terms (every sequence and position, and through attention every
        # other position), and reordering a float32 sum of n terms moves it by at most
        # n * 2^-24 times the sum of their magnitudes, taken here as max|g|.
        n = 8 * cfg.data.seq_len ** 2
        tol = n * 2**-24 * np.abs(g_big).max() + 1e-12
        np.testing.assert_allclose(g_acc, g_big, atol=tol, rtol=0, err_msg=path)


def test_accumulating_run_counts_every_micro_batch(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, **{"training.grad_accum_steps": 2})
    summary = train.run(cfg, str(tmp_path / "run"), progress=False)
    assert summary["tokens_seen"] == 2 * 6 * 2 * cfg.data.batch_size * cfg.data.seq_len


# ------------------------------------------------------------------ non-finite steps


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(corpus_dir, tmp_path):
    # A huge learning rate makes the first update overflow every later forward pass.
    cfg = small_config(corpus_dir, **{"training.learning_rate": 1e30, "training.warmup_steps": 0,
                                      "training.max_nonfinite_steps": 3,
                                      "checkpoint.every_steps": 2})
    wd = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"stage 1/2 \(phase 0\), step 4: 3 steps in a row"):
        train.run(cfg, wd, progress=False)
    lines = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    skipped = [line["step"] for line in lines if line.get("nonfinite")]
    assert skipped == [2, 3, 4]
    assert [line["nonfinite_steps"] for line in lines if "nonfinite_steps" in line] == [1]
    ckpt = checkpoint.Checkpointer(wd, 3, create=False)
    assert ckpt.latest_step() is None or ckpt.latest_step() < 2  # none saved during the streak
    ckpt.close()


def test_a_nonfinite_step_changes_nothing(corpus_dir):
    cfg = small_config(corpus_dir)
    phase = phases.stage(cfg, 0)
    template = resident.Template(cfg.model, 1)
    loss_sum = step.make_loss_sum(cfg, phase, template)
    poisoned = lambda tr, fr, b: loss_sum(tr, fr, b) * jnp.nan  # noqa: E731
    tx = train.optim.make_optimizer(cfg.training, 10)
    fn = step.make_train_step(poisoned, step.make_prepare(phase, 1), tx, "mean", 1)
    trainable = {"stacks": {0: resident.init_stack(cfg, 0)}, **resident.init_top(cfg)}
    before = leaves(trainable)
    opt = tx.init(trainable)
    new, new_opt, loss, finite = fn(jax.tree.map(jnp.copy, trainable), {}, opt,
                                    jnp.ones((4, cfg.data.seq_len), jnp.int32), jax.random.key(0))
    assert not bool(finite) and np.isnan(float(loss))
    after = leaves(new)
    assert all(np.array_equal(before[p], after[p]) for p in before)
    assert int(new_opt[1][0].count) == 0  # Adam never saw it


# ---------------------------------------------------------------------------- disk


def test_a_run_the_disk_cannot_hold_stops_at_start_naming_the_bytes(corpus_dir, tmp_path,
                                                                    monkeypatch):
    cfg = small_config(corpus_dir)
    monkeypatch.setattr(plan, "_free_bytes", lambda path: 1000)
    wd = str(tmp_path / "run")
    need = plan.disk_plan(cfg)["total"]
    with pytest.raises(UserError, match=rf"needs {need} bytes .*stored stacks"):
        train.run(cfg, wd, progress=False)
    assert not os.path.exists(os.path.join(wd, "params"))
    assert not os.path.exists(os.path.join(wd, "checkpoints"))


def test_bf16_stack_storage_halves_the_stores_and_loads(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, **{"training.progressive.stack_storage_dtype": "bf16"})
    wd = str(tmp_path / "run")
    train.run(cfg, wd, progress=False)
    for k in range(2):
        s = store.open_store(wd, store.stack_group(k), k + 1)
        fp32_bytes = nbytes(resident.abstract_stack(cfg))
        assert s.dtype == "bf16" and s.nbytes() <= fp32_bytes // 2 + 128 * len(s.leaves)  # + headers
    assert store.open_store(wd, "head", 2).dtype == "fp32"  # trains again: float32 masters
    rack = load_run(wd).rack
    assert rack(np.ones((1, 8), np.int32), "causal").shape == (1, 8, 300)
    with pytest.raises(UserError, match="stack_storage_dtype"):
        small_config(corpus_dir, **{"training.progressive.stack_storage_dtype": "bf16",
                                    "training.progressive.trunk_strategy": "trainable"})
