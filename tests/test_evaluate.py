"""Held-out scoring over the whole split, and the evaluate CLI: its numbers, the NLL bound,
unfinished runs, --files, and bad input."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import generated_text, small_config
from stackwise_jax import checkpoint, data, evaluate, objective, train
from stackwise_jax.errors import UserError
from stackwise_jax.run import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(corpus_dir, tmp_path_factory):
    """A 2-stage run of the small config, trained in slices and evaluated on the way:
    {"dir", "before_any_store": the UserError mid stage 1, "unfinished": the report after
    stage 1, "stage0": stage 1's record in the checkpoint}. Resuming changes nothing."""
    cfg = small_config(corpus_dir)
    wd = str(tmp_path_factory.mktemp("eval") / "run")
    out = {"dir": wd}
    train.run(cfg, wd, max_steps=3, progress=False)  # mid stage 1 of 2: nothing stored
    with pytest.raises(UserError) as e:
        evaluate.evaluate_run(wd, progress=False)
    out["before_any_store"] = str(e.value)
    train.run(cfg, wd, max_steps=3, progress=False)  # stage 1 ends and stores
    out["unfinished"] = evaluate.evaluate_run(wd, bound_points=1, progress=False)
    ckpt = checkpoint.Checkpointer(wd, cfg.checkpoint.max_to_keep, create=False)
    out["stage0"] = ckpt.meta(ckpt.latest_step())["stages"][0]
    ckpt.close()
    train.run(cfg, wd, progress=False)
    return out


@pytest.fixture(scope="module")
def run_dir(trained):
    return trained["dir"]


def summary_of(wd):
    with open(os.path.join(wd, "summary.json")) as f:
        return json.load(f)

# ------------------------------------------------------------------ held-out batches


def test_heldout_batches_come_from_every_heldout_file(tmp_path, monkeypatch):
    monkeypatch.setenv("STACKWISE_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        (corpus / f"book{i}.txt").write_text(generated_text(300, seed=i))
    sizes = {"h_a.txt": 300, "h_b.txt": 80, "h_c.txt": 80}  # the first file is the largest
    for i, (name, n) in enumerate(sizes.items()):
        (corpus / name).write_text(generated_text(n, seed=100 + i))
    cfg = small_config(str(corpus), **{"data.heldout_files": "h_*.txt"})
    prepared = data.prepare(cfg, str(tmp_path / "run"))
    assert [os.path.basename(p) for p in prepared.heldout_files] == list(sizes)
    rows = prepared.heldout_rows
    L, B = cfg.data.seq_len, cfg.data.batch_size

    # Each file's tokens, eos included, in order: its region of the concatenated rows.
    ends = np.cumsum([len(prepared.tokenizer.encode((corpus / n).read_text())) + 1
                      for n in sizes])
    starts = np.concatenate([[0], ends[:-1]])
    n_batches = 6
    batches = data.heldout_batches(rows, B, n_batches)
    assert len(batches) == n_batches and all(b.shape == (B, L) for b in batches)
    # The same selection on row numbers says which rows were picked.
    numbered = data.heldout_batches(np.arange(len(rows))[:, None], B, n_batches)
    picked = [int(r) for b in numbered for r in b[:, 0]]
    np.testing.assert_array_equal(np.concatenate(batches), np.asarray(rows)[picked])
    assert picked == sorted(set(picked))
    for name, lo, hi in zip(sizes, starts, ends):
        inside = [r for r in picked if lo <= r * L and (r + 1) * L <= hi]
        assert inside, f"no scored row lies in {name} (tokens {lo}..{hi})"
    # The first n_batches * B rows (the old choice) lie in the first file alone.
    assert n_batches * B * L <= ends[0]

    every = data.heldout_batches(rows, B, 0)  # 0: every row once, in order
    np.testing.assert_array_equal(np.concatenate(every), rows)
    assert len(every) == -(-len(rows) // B)


def test_eval_batches_zero_means_every_row_and_negative_is_refused(corpus_dir):
    assert small_config(corpus_dir, **{"eval.batches": 0}).eval.batches == 0
    with pytest.raises(UserError, match=r"eval.batches=-1 must be an integer >= 0"):
        small_config(corpus_dir, **{"eval.batches": -1})


def test_every_row_is_scored_in_bounded_groups_that_the_planner_counts(
        corpus_dir, run_dir, monkeypatch):
    """eval.batches=0 scores every held-out row, a few batches per pass over the stacks:
    the same numbers as holding them all, and the planner counts one group, not none."""
    from stackwise_jax import phases, plan

    cfg = small_config(corpus_dir, **{"eval.batches": 0})
    prepared = data.prepare(cfg, run_dir)
    batches = data.heldout_batches(prepared.heldout_rows, cfg.data.batch_size, 0)
    assert len(batches) > 2
    run = evaluate.stored_run(run_dir)
    ev = evaluate.Evaluator(cfg, run_dir, batches, prepared.tokenizer.mask_id)
    streams = [("0.5", 0.5), ("causal", None)]
    at_once = ev.sums(run.n_stacks, run.version, streams)
    monkeypatch.setattr(evaluate, "EVAL_GROUP_BATCHES", 2)
    assert ev._groups(len(streams), None, evaluate.batches_held(cfg)) == [
        range(i, min(i + 2, len(batches))) for i in range(0, len(batches), 2)]
    grouped = ev.sums(run.n_stacks, run.version, streams,
                      group_batches=evaluate.batches_held(cfg))
    assert grouped == at_once  # per-batch sums, added in the same order
    monkeypatch.undo()
    phase = phases.stage(cfg, 0)
    groups_of = small_config(corpus_dir, **{"eval.batches": evaluate.EVAL_GROUP_BATCHES})
    assert plan._eval_hold(cfg, phase) == plan._eval_hold(groups_of, phase)
    assert plan._eval_hold(cfg, phase) > plan._eval_hold(
        small_config(corpus_dir, **{"eval.batches": 1}), phase)


def test_summary_records_scored_and_total_heldout_tokens(corpus_dir, run_dir):
    summary = summary_of(run_dir)
    cfg = small_config(corpus_dir)
    rows = data.prepare(cfg, run_dir).heldout_rows
    scored = cfg.eval.batches * cfg.data.batch_size * cfg.data.seq_len
    assert summary["heldout_tokens_scored"] == scored
    assert summary["heldout_tokens_total"] == rows.size > summary["heldout_tokens_scored"]
    assert "heldout_tokens" not in summary

# ----------------------------------------------------------------------- the CLI's numbers


def test_eval_matches_the_training_summary_and_writes_eval_json(run_dir):
    report = evaluate.evaluate_run(run_dir, bound_points=2, progress=False)
    summary = summary_of(run_dir)
    assert report["run"]["finished"] and report["run"]["n_stacks"] == 2
    for r, loss in summary["heldout_loss"].items():  # same batches, same masks
        assert report["masked_diffusion_loss"][r] == pytest.approx(loss, rel=1e-6)
    assert report["causal_loss"] == pytest.approx(summary["heldout_causal_loss"], rel=1e-6)
    assert report["unigram_loss"] == pytest.approx(summary["unigram_loss"], rel=1e-9)
    assert report["text"]["tokens_scored"] == summary["heldout_tokens_scored"]
    assert report["text"]["tokens_total"] == summary["heldout_tokens_total"]
    with open(os.path.join(run_dir, "eval.json")) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    assert not [p for p in os.listdir(run_dir) if p.startswith(".tmp")]


def test_bound_equals_the_quadrature_computed_with_the_whole_model(run_dir):
    report = evaluate.evaluate_run(run_dir, batches=2, bound_points=2, progress=False)
    rack, tokenizer, cfg = load_run(run_dir)
    rows = data.prepare(cfg, run_dir).heldout_rows
    batches = data.heldout_batches(rows, cfg.data.batch_size, 2)
    # 2-point Gauss-Legendre on (0, 1): nodes 1/2 -+ 1/(2 sqrt 3), weights 1/2.
    nodes = [0.5 - 0.5 / np.sqrt(3), 0.5 + 0.5 / np.sqrt(3)]
    by_hand = 0.0
    for t in nodes:
        per_sequence = []
        for i, ids in enumerate(batches):
            key = jax.random.fold_in(jax.random.key(evaluate.EVAL_SEED), i)
            b = objective.prepare_tokens(key, jnp.asarray(ids), "masked_diffusion",
                                         (jnp.float32(t), jnp.float32(t)), tokenizer.mask_id)
            ce = objective.token_cross_entropy(rack(b["inputs"], "bidirectional"), b["targets"])
            L = ids.shape[1]
            per_sequence += list(np.asarray(jnp.where(b["valid"], ce, 0.0).sum(1)) / (t * L))
        by_hand += 0.5 * np.mean(per_sequence)
    bound = report["nll_bound"]
    assert bound["nats_per_token"] == pytest.approx(by_hand, rel=1e-4)
    assert [p["t"] for p in bound["points"]] == pytest.approx(nodes)
    assert [p["weight"] for p in bound["points"]] == pytest.approx([0.5, 0.5])


def test_bound_is_the_integral_of_the_masked_token_loss(run_dir, monkeypatch):
    """With E[masked CE sum | t] = t L c(t) for a known c, the bound is the integral of c over
    (0, 1], exactly so for Gauss-Legendre with 2 points when c is a cubic."""
    def c(t):
        return 1.0 + 2.0 * t + 3.0 * t ** 2 + 4.0 * t ** 3  # integral over (0, 1]: 4

    def fake_sums(self, n_stacks, max_version, streams, hidden_bytes=None, progress=False):
        seqs = sum(len(b) for b in self.batches)
        L = self.batches[0].shape[1]
        out = {}
        for name, t in streams:
            t = 1.0 if t is None else t
            out[name] = {"ce": c(t) * t * L * seqs, "tokens": t * L * seqs,
                         "inv_t": c(t) * seqs, "seqs": seqs}
        return out

    monkeypatch.setattr(evaluate.Evaluator, "sums", fake_sums)
    for k in (2, 3):
        report = evaluate.evaluate_run(run_dir, bound_points=k, progress=False)
        assert report["nll_bound"]["nats_per_token"] == pytest.approx(4.0, rel=1e-12)
        assert report["nll_bound"]["nats_per_token_self_normalized"] == pytest.approx(4.0)
    for r, loss in report["masked_diffusion_loss"].items():
        assert loss == pytest.approx(c(float(r)))


def test_files_flag_scores_the_given_text(corpus_dir, run_dir):
    held = evaluate.evaluate_run(run_dir, batches=0, bound_points=1, progress=False)
    # The run's held-out split is heldout.txt; as --files it is every row by default.
    same = evaluate.evaluate_run(run_dir, files=os.path.join(corpus_dir, "heldout.txt"),
                                 bound_points=1, progress=False)
    assert same["text"]["source"] == "files" and same["text"]["files"][0].endswith("heldout.txt")
    assert (same["text"]["rows_scored"] == same["text"]["rows_total"]
            == held["text"]["rows_total"])
    assert same["masked_diffusion_loss"] == pytest.approx(held["masked_diffusion_loss"])
    assert same["causal_loss"] == pytest.approx(held["causal_loss"])
    books = evaluate.evaluate_run(run_dir, files=os.path.join(corpus_dir, "book*.txt"),
                                  batches=1, bound_points=1, progress=False)
    assert [os.path.basename(p) for p in books["text"]["files"]] == [
        "book0.txt", "book1.txt", "book2.txt"]
    assert books["text"]["rows_scored"] == 4 < books["text"]["rows_total"]


def test_unfinished_run_is_scored_from_its_latest_stored_phase(trained):
    assert "no phase has finished" in trained["before_any_store"]
    report = trained["unfinished"]
    assert not report["run"]["finished"]
    assert report["run"]["phases_done"] == 1 and report["run"]["n_stacks"] == 1
    assert report["masked_diffusion_loss"]["0.5"] == pytest.approx(
        trained["stage0"]["heldout_loss_t0.5"], rel=1e-6)  # what training scored then
    assert "UNFINISHED" in evaluate.format_report(report)


# ------------------------------------------------------------------------------ bad input


def test_bad_input_is_a_user_error(run_dir, tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        evaluate.evaluate_run(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a StackWise run"):
        evaluate.evaluate_run(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="--files='.*zzz.*' matches no file"):
        evaluate.evaluate_run(run_dir, files=str(tmp_path / "zzz*.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt' is not UTF-8 text"):
        evaluate.evaluate_run(run_dir, files=str(tmp_path / "latin1.txt"))
    with pytest.raises(UserError, match="--bound_points"):
        evaluate.evaluate_run(run_dir, bound_points=0)
    with pytest.raises(UserError, match="--batches"):
        evaluate.evaluate_run(run_dir, batches=-1)


def test_cli_prints_a_table_and_errors_without_traceback(run_dir, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "stackwise_jax.evaluate", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)

    r = cli(f"--workdir={tmp_path / 'nope'}")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = cli(f"--workdir={run_dir}", "--batches=1", "--bound_points=2")
    assert r.returncode == 0, r.stderr
    for needle in ("finished", "masked diffusion, t = 0.5", "NLL bound (2-point Gauss-Legendre",
                   "causal", "unigram", "eval.json"):
        assert needle in r.stdout, r.stdout
