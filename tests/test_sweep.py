"""Sweeps and reports: results files, resuming a stopped sweep, bad input refused up front."""

import csv
import os
import subprocess
import sys

import pytest

from conftest import small_config
from stackwise_jax import recipes, report, sweep, train
from stackwise_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"eval.batches": 1}  # steps_per_stage stays 6: the compiled steps of test_train.py
# Swept in the tests because it changes no compiled program (a learning rate is a constant
# in the step, so each value would compile anew): the XLA cache keeps the tests fast.
DATA_SEEDS = {"data.seed": ["5", "6"]}


def fast_config(corpus_dir):
    return small_config(corpus_dir, **FAST)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished(corpus_dir, tmp_path_factory):
    """A 2x1 grid (two data seeds x one recipe) with 2 seeds: 4 runs."""
    workdir = str(tmp_path_factory.mktemp("sweep") / "grid")
    grid = {**DATA_SEEDS, "recipe": ["progressive"]}
    rows = sweep.run(fast_config(corpus_dir), workdir, grid, seeds=2, progress=False)
    return workdir, rows


def test_grid_with_seeds_writes_csv_markdown_and_plots(finished):
    workdir, rows = finished
    table = read_csv(os.path.join(workdir, "results.csv"))
    assert len(table) == 4 and all(r["status"] == "finished" for r in table)
    assert list(table[0]) == [
        "data.seed", "recipe", "seed", "status", "heldout_loss_t0.15",
        "heldout_loss_t0.5", "heldout_loss_t0.9", "heldout_causal_loss", "unigram_loss",
        "heldout_tokens_scored", "tokens_seen", "wall_s", "peak_live_bytes", "peak_rss_bytes",
        "trainable_params", "mode", "workdir"]
    # Seed-major order; --seeds sets training.seed only, data.seed is the grid's.
    assert [(r["data.seed"], r["seed"]) for r in table] == [
        ("5", "0"), ("6", "0"), ("5", "1"), ("6", "1")]
    slugs = sorted(os.path.basename(r["workdir"]) for r in table)
    assert "data.seed=6,recipe=progressive,seed=1" in slugs
    cfgs = [train.checkpoint.read_config(r["workdir"]) for r in table]
    assert [(c.data.seed, c.training.seed) for c in cfgs] == [(5, 0), (6, 0), (5, 1), (6, 1)]
    for r in table:
        assert float(r["heldout_loss_t0.5"]) > 0 and int(r["tokens_seen"]) > 0
        assert int(r["peak_live_bytes"]) > 0 and int(r["trainable_params"]) > 0
        assert r["mode"] == "progressive-stackwise"

    md = open(os.path.join(workdir, "results.md")).read()
    setting_rows = [ln for ln in md.splitlines() if ln.startswith(("| 5 |", "| 6 |"))]
    assert len(setting_rows) == 2 and all(" ± " in ln and "| 2 |" in ln for ln in setting_rows)
    for name in ("loss_vs_tokens.png", "final_loss.png", "training_loss.png"):
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(workdir) if f.startswith(".tmp-")]  # atomic writes


def test_rerun_of_a_stopped_sweep_trains_only_the_missing_run(corpus_dir, tmp_path, monkeypatch):
    workdir = str(tmp_path / "stopped")
    cfg = fast_config(corpus_dir)
    real_run, calls = train.run, []

    def stopped_in_second_run(cfg, wd, **kw):
        calls.append(os.path.basename(wd))
        if len(calls) == 2:  # like Ctrl-C after stage 0: a checkpoint, then KeyboardInterrupt
            real_run(cfg, wd, max_steps=cfg.training.steps_per_stage, **kw)
            raise KeyboardInterrupt
        return real_run(cfg, wd, **kw)

    monkeypatch.setattr(train, "run", stopped_in_second_run)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(cfg, workdir, DATA_SEEDS, progress=False)
    first, second = [os.path.join(workdir, s) for s in calls]
    assert os.path.exists(os.path.join(first, "summary.json"))
    assert not os.path.exists(os.path.join(second, "summary.json"))
    mtime = os.stat(os.path.join(first, "summary.json")).st_mtime_ns

    trained = []

    def counting(cfg, wd, **kw):
        if not os.path.exists(os.path.join(wd, "summary.json")):
            trained.append(os.path.basename(wd))
        return real_run(cfg, wd, **kw)

    monkeypatch.setattr(train, "run", counting)
    rows = sweep.run(cfg, workdir, DATA_SEEDS, progress=False)
    assert trained == [os.path.basename(second)]
    assert os.stat(os.path.join(first, "summary.json")).st_mtime_ns == mtime
    assert [r["status"] for r in rows] == ["finished", "finished"]
    steps = [line for line in open(os.path.join(second, "metrics.jsonl"))]
    assert len(steps) == len(set(steps))  # resumed at its checkpoint, no step logged twice


def test_a_failing_run_is_reported_and_the_sweep_goes_on(corpus_dir, tmp_path, monkeypatch,
                                                         capsys):
    real_run = train.run

    def failing_first(cfg, wd, **kw):
        if cfg.data.seed == 5:
            raise UserError("data.files='x' matches no file")
        return real_run(cfg, wd, **kw)

    monkeypatch.setattr(train, "run", failing_first)
    rows = sweep.run(fast_config(corpus_dir), str(tmp_path / "s"), DATA_SEEDS, progress=False)
    assert [r["status"] for r in rows] == ["failed", "finished"]
    assert rows[0]["heldout_loss_t0.5"] == "" and rows[1]["heldout_loss_t0.5"] != ""
    err = capsys.readouterr().err
    assert "1 of 2 runs failed" in err and "matches no file" in err


@pytest.mark.parametrize("grid, message", [
    ({"training.learning_rat": ["0.1"]}, "Did you mean 'training.learning_rate'"),
    ({"recipes": ["e2e"]}, "Did you mean 'recipe'"),
    ({"model.remat": ["none", "fast"]}, "model.remat='fast' is not allowed"),
    ({"training.learning_rate": ["0.1", "abc"]}, "training.learning_rate='abc': expected a float"),
    ({"recipe": ["e2e", "nope"]}, "unknown recipe 'nope'; known recipes: .*progressive"),
])
def test_bad_grid_stops_before_any_run(corpus_dir, tmp_path, grid, message):
    workdir = tmp_path / "bad"
    with pytest.raises(UserError, match=message):
        sweep.run(fast_config(corpus_dir), str(workdir), grid, progress=False)
    assert not workdir.exists()


def test_recipe_sees_flags_and_grid_and_its_keys_win(corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(recipes.RECIPES, "half", lambda cfg: {
        "training.steps_per_stage": str(cfg.training.steps_per_stage // 2)})
    runs = sweep.plan(fast_config(corpus_dir), str(tmp_path / "s"),
                      {"recipe": ["half", "e2e"], "training.progressive.enabled": ["True"]},
                      overrides={"training.steps_per_stage": "8"})
    assert [r.slug for r in runs] == ["recipe=half,training.progressive.enabled=True,seed=0",
                                      "recipe=e2e,training.progressive.enabled=True,seed=0"]
    assert runs[0].cfg.training.steps_per_stage == 4  # computed from the flag's 8
    assert runs[1].cfg.training.progressive.enabled is False  # e2e wins over the grid value
    out = capsys.readouterr().out
    assert "recipe 'e2e' sets training.progressive.enabled=False, replacing --grid=" in out
    assert not (tmp_path / "s").exists()


def test_parse_grid():
    assert sweep.parse_grid(["eval.mask_ratios=(0.15,0.5),(0.9,)", "recipe=e2e,bert"]) == {
        "eval.mask_ratios": ["(0.15,0.5)", "(0.9,)"], "recipe": ["e2e", "bert"]}
    for bad in ["training.learning_rate", "=1,2", "training.learning_rate="]:
        with pytest.raises(UserError, match="expected KEY=V1,V2"):
            sweep.parse_grid([bad])


def test_cli_bad_value_is_one_error_line_exit_2(corpus_dir, tmp_path):
    config_py = tmp_path / "small.py"
    config_py.write_text(
        f"import sys\nsys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
        "from conftest import small_config\n\n"
        f"def get_config():\n    return small_config({corpus_dir!r})\n")
    workdir = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "stackwise_jax.sweep", f"--config={config_py}",
         f"--workdir={workdir}", "--grid=training.learning_rate=0.01,-1",
         "--config.training.steps_per_stage=4"],
        capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: run training.learning_rate=-1,seed=0: training.learning_rate=-1.0 must be > 0"]
    assert not workdir.exists()


def test_report_on_finished_and_unfinished_runs(finished, corpus_dir, tmp_path, capsys):
    workdir, rows = finished
    partial = str(tmp_path / "partial")
    train.run(fast_config(corpus_dir), partial, max_steps=7, progress=False)  # stage 0, 1 step
    assert len(report.stage_points(partial)) == 1  # from its checkpoint
    assert len(report.stage_points(rows[0]["workdir"])) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")

    out = tmp_path / "plots"
    runs = [rows[0]["workdir"], rows[1]["workdir"], partial, str(empty)]
    written = report.write_plots(report.group_runs(runs), str(out))
    assert sorted(os.path.basename(p) for p in written) == [
        "final_loss.png", "loss_vs_tokens.png", "training_loss.png"]
    assert f"{empty}: no metrics.jsonl lines yet" in capsys.readouterr().err

    # The command line: a sweep directory stands for its runs; --out defaults to their parent.
    proc = subprocess.run([sys.executable, "-m", "stackwise_jax.report", workdir],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("wrote ") == 3 and os.path.join(workdir, "final_loss.png") in proc.stdout
