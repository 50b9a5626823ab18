"""Classification with a run's model: probe, fine-tune and baseline on a separable toy task;
JSONL errors that name the file and line."""

import json
import os
import random
import subprocess
import sys

import pytest

from stackwise_jax import classify
from stackwise_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two disjoint sets of words from the training corpus (conftest.generated_text).
PEOPLE = ("king sailor sister captain miller stranger queen friend clerk finds loses carries "
          "remembers sells paints hides follows greets mends").split()
THINGS = ("lantern silver key apple letter boat green door loaf bread map wooden chair bell "
          "river market dawn mill bridge supper garden hill").split()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def toy_split(n_per_class: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n_per_class):
        for label, words in (("people", PEOPLE), ("things", THINGS)):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(6, 10)))
            rows.append({"text": text.capitalize() + ".", "label": label})
    return rows


@pytest.fixture(scope="module")
def run_dir(trained_small_run):
    return trained_small_run


def test_probe_separates_texts_made_of_disjoint_words(run_dir, tmp_path):
    """The classes share no word. With a 300-id BPE most words are several byte-level
    tokens, so what separates the classes is which pieces a text is made of; a text's mean
    final state keeps much of the mean of its tokens' embeddings (the residual stream starts
    from them) even in a model trained for 12 steps, so a linear probe on the 32 pooled
    features should make few mistakes. Texts of 6-10 words (cut at 32 tokens) give it enough
    pieces to average: over 8 draws of this toy data the probe scored 0.9-1.0 (mostly
    0.975-1.0); 0.9 on 40 test texts allows 4 mistakes."""
    train_path = write_jsonl(tmp_path / "train.jsonl", toy_split(40, seed=0))
    test_path = write_jsonl(tmp_path / "test.jsonl", toy_split(20, seed=1))
    report = classify.classify_run(run_dir, train_path, test_path, finetune_steps=8,
                                   progress=False)
    assert report["labels"] == ["people", "things"]
    assert report["linear_probe"]["accuracy"] >= 0.9, report["linear_probe"]
    assert 0.0 <= report["finetune"]["accuracy"] <= 1.0 and report["finetune"]["steps"] == 8
    assert report["majority"]["accuracy"] == 0.5  # balanced test set
    assert report["features"]["padded_length"] == 32 and report["run"]["finished"]
    with open(os.path.join(run_dir, "classify.json")) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    assert "linear probe" in classify.format_report(report)


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "B.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n')
    with pytest.raises(UserError, match=r"--test: .*B\.jsonl:3: not JSON"):
        classify.read_examples(str(bad), "--test")
    no_label = tmp_path / "A.jsonl"
    no_label.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(UserError, match=r"A\.jsonl:2: needs a JSON object with \"text\" and "
                                        r"\"label\""):
        classify.read_examples(str(no_label), "--train")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(UserError, match="holds no examples"):
        classify.read_examples(str(tmp_path / "empty.jsonl"), "--train")
    with pytest.raises(UserError, match="cannot read"):
        classify.read_examples(str(tmp_path / "missing.jsonl"), "--train")
    one = [("a", "x"), ("b", "x")]
    with pytest.raises(UserError, match="at least 2"):
        classify.label_ids(one, one, "A.jsonl", "B.jsonl")
    with pytest.raises(UserError, match="labels that --train lacks: 'z'"):
        classify.label_ids([("a", "x"), ("b", "y")], [("c", "z")], "A.jsonl", "B.jsonl")
    ok = classify.read_examples(str(write_jsonl(tmp_path / "ok.jsonl", [
        {"text": "a", "label": 3}, {"text": "b", "label": "3"}])), "--train")
    assert ok == [("a", "3"), ("b", "3")]  # integer labels read as their strings


def test_cli_reports_a_bad_line_without_traceback(tmp_path):
    good = write_jsonl(tmp_path / "A.jsonl", toy_split(2, seed=0))
    bad = tmp_path / "B.jsonl"
    bad.write_text('{"text": "a", "label": "people"}\n{"text": "b", "label": "things"}\nnope\n')
    r = subprocess.run([sys.executable, "-m", "stackwise_jax.classify",
                        f"--workdir={tmp_path}", f"--train={good}", f"--test={bad}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: --test: ") and "B.jsonl:3: not JSON" in r.stderr
