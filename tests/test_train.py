"""Training: freezing, resume, load_run, the mode plans, and every bad input from the CLI."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import small_config
from stackwise_jax import checkpoint, config, objective, phases, resident, step, store, train
from stackwise_jax.run import load_run
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def params_of(workdir):
    return nnx.to_pure_dict(nnx.state(load_run(workdir).rack, nnx.Param))


def leaves(tree):
    return dict(jax.tree_util.tree_flatten_with_path(tree)[0])


def test_frozen_stacks_are_bit_identical_after_a_stage_with_weight_decay(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, **{"training.weight_decay": 0.5})
    wd = str(tmp_path / "run")
    train.run(cfg, wd, max_steps=cfg.training.steps_per_stage, progress=False)  # stage 0 only
    after_stage0 = params_of(wd)
    summary = train.run(cfg, wd, progress=False)  # stage 1
    final = params_of(wd)
    for name in ("embed",):  # train_embedding='first_stage'
        np.testing.assert_array_equal(final[name]["embedding"], after_stage0[name]["embedding"])
    for path, value in leaves(after_stage0["stacks"][0]).items():
        assert np.array_equal(leaves(final["stacks"][0])[path], value), path
    # The stack and head that did train in stage 1 moved.
    q0 = after_stage0["stacks"][1]["blocks"]["attn"]["q_proj"]["kernel"]
    assert not np.array_equal(final["stacks"][1]["blocks"]["attn"]["q_proj"]["kernel"], q0)
    assert not np.array_equal(final["head"]["kernel"], after_stage0["head"]["kernel"])
    assert [s["stage"] for s in summary["stages"]] == [0, 1]
    assert summary["stages"][1]["trainable_params"] < summary["stages"][0]["trainable_params"]


def test_stage_partition_has_no_optimizer_state_for_the_trunk(corpus_dir):
    cfg = small_config(corpus_dir, **{"model.architecture.n_stacks": 3})
    phase = phases.stage(cfg, 1)
    assert phase.trained_stacks == (1,) and phase.trunk_stacks == (0,)  # stack 2 does not run
    assert phase.train_top == {"final_norm", "head"} and phase.frozen_top == {"embed"}
    trainable = resident.abstract_trainable(cfg, phase)
    assert set(trainable) == {"stacks", "final_norm", "head"} and set(trainable["stacks"]) == {0}
    opt_state = jax.eval_shape(train.optim.make_optimizer(cfg.training, 10).init, trainable)
    n_opt = sum(x.size for x in jax.tree.leaves(opt_state))
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    assert n_opt <= 2 * n_trainable + 10  # Adam's mu and nu for the trainable leaves only


def test_stop_gradient_trunk_gets_no_gradient(corpus_dir):
    cfg = small_config(corpus_dir)
    phase = phases.stage(cfg, 1)
    top = resident.init_top(cfg)
    trainable = {"stacks": {0: resident.init_stack(cfg, 1)}, "final_norm": top["final_norm"],
                 "head": top["head"]}
    frozen = {"embed": top["embed"], "trunk": resident.init_stack(cfg, 0)["blocks"]}
    loss_sum = step.make_loss_sum(cfg, phase, resident.Template(cfg.model, 1))
    ids = jax.random.randint(jax.random.key(0), (2, 16), 2, 300)
    batch = objective.prepare_tokens(jax.random.key(1), ids, "masked_diffusion", (0.5, 0.5), 1)
    g_trunk = jax.grad(loss_sum, argnums=1)(trainable, frozen, batch)
    assert all(float(abs(x).max()) == 0.0 for x in jax.tree.leaves(g_trunk))
    g_train = jax.grad(loss_sum)(trainable, frozen, batch)
    assert all(float(abs(x).max()) > 0.0 for x in jax.tree.leaves(g_train))


@pytest.mark.parametrize("enabled,trunk,expected", [
    (True, "frozen", [((0,), ()), ((1,), (0,)), ((2,), (0, 1))]),
    (True, "trainable", [((0,), ()), ((0, 1), ()), ((0, 1, 2), ())]),
    (False, "frozen", [((0, 1, 2), ())]),
])
def test_modes_plan_what_trains(corpus_dir, enabled, trunk, expected):
    cfg = small_config(corpus_dir, **{"model.architecture.n_stacks": 3,
                                      "training.progressive.enabled": enabled,
                                      "training.progressive.trunk_strategy": trunk})
    plans = phases.all_phases(cfg)
    assert [(p.trained_stacks, p.trunk_stacks) for p in plans] == expected
    assert ["embed" in p.train_top for p in plans] == [True] + [False] * (len(plans) - 1)
    assert all({"head", "final_norm"} <= p.train_top for p in plans)


def test_resume_after_interruption_matches_uninterrupted_run(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir)
    full = str(tmp_path / "full")
    summary_full = train.run(cfg, full, progress=False)

    cut = str(tmp_path / "cut")
    assert train.run(cfg, cut, max_steps=5, progress=False) == {}  # mid stage 0 (6 steps/stage)
    train.run(cfg, cut, max_steps=4, progress=False)  # into stage 1
    summary_cut = train.run(cfg, cut, progress=False)
    for path, value in leaves(params_of(full)).items():
        assert np.array_equal(leaves(params_of(cut))[path], value), path
    assert summary_cut["heldout_loss"] == summary_full["heldout_loss"]
    steps = [json.loads(l)["global_step"] for l in open(os.path.join(cut, "metrics.jsonl"))]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8, 10, 12]
    for k in range(2):  # each stack stored once, by its stage, with the same bytes
        group = store.stack_group(k)
        assert store.versions(cut, group) == [k + 1]
        assert (store.open_store(cut, group, k + 1).leaves
                == store.open_store(full, group, k + 1).leaves)  # sha256 per array
    assert store.versions(cut, "head") == [2]  # the older head was dropped


def test_resume_after_crash_uses_last_periodic_checkpoint(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir)
    full = str(tmp_path / "full")
    train.run(cfg, full, progress=False)
    crashed = str(tmp_path / "crashed")
    train.run(cfg, crashed, max_steps=5, progress=False)
    # A crash after step 5 leaves only the periodic checkpoint of step 4.
    shutil.rmtree(os.path.join(crashed, "checkpoints", "5"))
    train.run(cfg, crashed, progress=False)
    for path, value in leaves(params_of(full)).items():
        assert np.array_equal(leaves(params_of(crashed))[path], value), path


def test_load_run_returns_a_rack_that_runs_in_both_modes(corpus_dir, tmp_path):
    # With MLA (model.attention='mla'): the trainer's progressive stages and load_run with
    # latent attention; GQA runs are loaded by many other tests (test_export, test_fusion).
    cfg = small_config(corpus_dir, **{"model.attention": "mla"})
    wd = str(tmp_path / "run")
    summary = train.run(cfg, wd, progress=False)
    rack, tokenizer, loaded_cfg = load_run(wd)
    ids = np.array([tokenizer.encode("The king finds the map by the river.")[:16]])
    for mode in ("causal", "bidirectional"):
        assert rack(ids, mode).shape == (1, ids.shape[1], cfg.model.vocab_size)
    assert loaded_cfg.model.d_model == cfg.model.d_model
    assert set(summary["heldout_loss"]) == {"0.15", "0.5", "0.9"}
    assert summary["tokens_seen"] == 2 * 6 * cfg.data.batch_size * cfg.data.seq_len
    # What the run did with its data, recorded at start (data.describe).
    stats = summary["data"]
    assert stats["budget_tokens"] == summary["tokens_seen"] and stats["warnings"] == []
    assert stats["heldout_tokens"] == summary["heldout_tokens_total"]
    assert summary["train_files"] == ["book0.txt", "book1.txt", "book2.txt"]
    assert summary["skipped_files"] == [] and summary["decode_replacements"] == {}
    lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert {"stage", "step", "loss", "tokens_per_s"} <= set(lines[0])
    assert all(l["tokens_per_s"] > 0 for l in lines)


def test_end_to_end_gets_the_same_token_budget(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, **{"training.progressive.enabled": False})
    summary = train.run(cfg, str(tmp_path / "e2e"), progress=False)
    assert summary["mode"] == "end_to_end" and len(summary["stages"]) == 1
    assert summary["tokens_seen"] == 2 * 6 * cfg.data.batch_size * cfg.data.seq_len


# ------------------------------------------------------------------------ bad input, CLI


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "stackwise_jax.train", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("override,needle", [
    ("--config.model.n_kv_heads=3", "model.n_kv_heads"),
    ("--config.model.n_heads=3", "model.n_heads"),
    ("--config.training.min_mask_fraction=0", "training.min_mask_fraction"),
    ("--config.training.max_mask_fraction=1.2", "training.max_mask_fraction"),
    ("--config.training.min_mask_fraction=0.8", "training.max_mask_fraction"),  # min > max (0.9 default)
    ("--config.model.d_modle=64", "model.d_modle"),
    ("--config.training.mask_schedule_type=exponential", "linear, cosine"),
    ("--config.data.files=/nonexistent/*.txt", "data.files"),
    ("--config.training.progressive.cache_dtype=int4", "training.progressive.cache_dtype"),
])
def test_bad_input_stops_with_a_message_naming_the_key(tmp_path, override, needle):
    if "min_mask_fraction=0.8" in override:
        override = [override, "--config.training.max_mask_fraction=0.5"]
    else:
        override = [override]
    wd = tmp_path / "wd"
    r = cli("--config=configs/tiny.py", f"--workdir={wd}", *override)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().startswith("error:")
    assert not wd.exists()  # nothing written for a run that cannot start


def test_preflight_refuses_a_run_that_does_not_fit_and_names_the_knobs(tmp_path):
    wd = tmp_path / "wd"
    r = cli("--config=configs/tiny.py", f"--workdir={wd}", "--device_memory=1MiB")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: memory preflight:"), r.stderr
    assert "--config.data.batch_size=8 (now 16)" in r.stderr, r.stderr
    assert not wd.exists()  # refused before anything is written
    r = cli("--config=configs/tiny.py", f"--workdir={wd}", "--device_memory=lots")
    assert r.returncode == 2 and "--device_memory='lots'" in r.stderr, r.stderr


def test_workdir_of_another_config_is_refused_and_left_untouched(corpus_dir, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    other = small_config(corpus_dir)
    (wd / "config.json").write_text(config.to_json(other))
    before = {p: p.read_bytes() for p in wd.iterdir()}
    r = cli("--config=configs/tiny.py", f"--workdir={wd}")
    assert r.returncode == 2 and "different config" in r.stderr and "Traceback" not in r.stderr
    assert "model.d_model" in r.stderr
    assert {p: p.read_bytes() for p in wd.iterdir()} == before


def test_dry_run_of_70b_reports_parameters_without_allocating():
    # VmHWM is this address space's peak RSS (ru_maxrss would include the forking parent's).
    code = ("import runpy, sys; sys.argv = ['train', '--config=configs/llama70b.py', "
            "'--dry_run']\ntry:\n  runpy.run_module('stackwise_jax.train', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
            "print('maxrss_kb', hwm.split()[1])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "70,553,706,496" in r.stdout
    maxrss_gb = int(r.stdout.split("maxrss_kb")[1]) / 2**20
    assert maxrss_gb < 3, maxrss_gb  # 70B float32 weights would be 282 GB


def test_quantised_frozen_trunk_is_used_and_masters_stay_intact(corpus_dir, tmp_path):
    losses = {}
    for fmt in ("fp32", "nf4"):
        cfg = small_config(corpus_dir, **{"training.progressive.frozen_precision": fmt})
        wd = str(tmp_path / fmt)
        train.run(cfg, wd, max_steps=cfg.training.steps_per_stage, progress=False)
        after_stage0 = params_of(wd)
        train.run(cfg, wd, progress=False)
        final = params_of(wd)
        for path, value in leaves(after_stage0["stacks"][0]).items():
            assert np.array_equal(leaves(final["stacks"][0])[path], value), path  # fp32 masters
        lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
        losses[fmt] = [l["loss"] for l in lines if l["stage"] == 1]
    # Stage 1 runs stack 0 from nf4 storage: different numbers, same ballpark.
    assert losses["fp32"] != losses["nf4"]
    np.testing.assert_allclose(losses["nf4"], losses["fp32"], rtol=0.1)


def test_ctrl_c_saves_a_checkpoint_after_the_current_step(corpus_dir, tmp_path):
    import signal
    import time

    wd = tmp_path / "run"
    args = ["--config=configs/tiny.py", f"--workdir={wd}",
            f"--config.data.files={os.path.join(corpus_dir, '*.txt')}",
            "--config.data.heldout_files=heldout.txt", "--config.model.vocab_size=300",
            "--config.model.d_model=32", "--config.model.n_heads=4", "--config.model.n_kv_heads=2",
            "--config.model.d_ff=64", "--config.data.seq_len=32", "--config.data.batch_size=4",
            "--config.training.steps_per_stage=100000", "--config.training.log_every=1"]
    proc = subprocess.Popen([sys.executable, "-m", "stackwise_jax.train", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = wd / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    steps = [json.loads(line)["global_step"] for line in metrics.read_text().splitlines()]
    latest = max(int(p) for p in os.listdir(wd / "checkpoints") if p.isdigit())
    assert latest == steps[-1] >= 3  # saved at the step it stopped after, nothing lost
    assert not [p for p in os.listdir(wd / "checkpoints") if "tmp" in p]


def test_atomic_writes_give_files_the_mode_open_would(tmp_path):
    """mkstemp creates files 0600; a run's json files are as readable as any new file."""
    old = os.umask(0o022)
    try:
        checkpoint.atomic_write_text(str(tmp_path / "a.json"), "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_recipe_flag_runs_a_named_recipe_and_names_a_bad_one():
    """--recipe=progressive turns configs/tiny.py's recipe (copied stacks, a decreasing
    split) back into plain progressive training: one flag."""
    from stackwise_jax import recipes

    cfg = recipes.apply(config.load(os.path.join(ROOT, "configs/tiny.py")), "progressive")
    assert cfg.training.progressive.step_split == "equal"
    assert cfg.training.progressive.new_stack_init == "random"
    ok = cli("--config=configs/tiny.py", "--dry_run", "--recipe=progressive")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("; 400 steps") == 4  # 1,600 steps in equal stages
    bad = cli("--config=configs/tiny.py", "--dry_run", "--recipe=progresive")
    assert bad.returncode == 2 and "recipe 'progresive' is unknown" in bad.stderr
    assert "Traceback" not in bad.stderr
