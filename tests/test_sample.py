"""The sample CLI on a trained run: both methods print a continuation; bad input is one
`error:` line naming the flag, exit code 2."""

import os
import subprocess
import sys

import pytest

from stackwise_jax import sample
from stackwise_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The king finds"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "stackwise_jax.sample", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def test_cli_prints_an_ar_continuation(trained_small_run):
    """Greedy decoding is deterministic: the CLI prints what sample_text returns."""
    out = run_cli(f"--workdir={trained_small_run}", f"--prompt={PROMPT}", "--max_new_tokens=8")
    assert out.returncode == 0, out.stderr
    expected = sample.sample_text(trained_small_run, PROMPT, "ar", 8)
    assert out.stdout == expected + "\n" and expected.strip(), (out.stdout, expected)


def test_diffusion_continuation(trained_small_run):
    """8 tokens in blocks of 4, 4 steps: a non-empty text with no [MASK] left, the same for
    a seed at temperature 1."""
    texts = [sample.sample_text(trained_small_run, PROMPT, "diffusion", 8, steps=4,
                                block_length=4, temperature=1.0, seed=3) for _ in range(2)]
    assert texts[0] == texts[1] and texts[0].strip() and "[MASK]" not in texts[0]


@pytest.mark.parametrize("args, message", [
    (dict(prompt=""), "--prompt is empty"),
    (dict(prompt="the king " * 40), "--prompt is"),  # > 32 tokens (data.seq_len)
    (dict(max_new_tokens=40), "--max_new_tokens=40: with the prompt's"),
    (dict(max_new_tokens=0), "--max_new_tokens=0 must be >= 1"),
    (dict(method="diffusion", steps=0), "--steps=0 must be >= 1"),
    (dict(method="beam"), "--method='beam': choose one of ar, diffusion"),
    (dict(steps=4), "--steps and --block_length apply to --method=diffusion only"),
    (dict(temperature=-1.0), "--temperature=-1.0 must be >= 0"),
    (dict(method="diffusion", top_p=0.5), "--top_p applies to --method=ar only"),
], ids=["empty", "long-prompt", "too-many-new", "no-new", "steps", "method", "steps-ar",
        "temperature", "top_p-diffusion"])
def test_bad_input_names_the_flag(trained_small_run, args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        sample.sample_text(trained_small_run, **{"prompt": PROMPT, **args})


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
    out = run_cli(f"--workdir={tmp_path}", "--prompt=hi", "--method=diffusion", "--steps=0")
    assert out.returncode == 2 and out.stderr.startswith("error: --steps=0"), out.stderr
    assert "Traceback" not in out.stderr
    with pytest.raises(UserError, match="is not a StackWise run directory"):
        sample.sample_text(str(tmp_path), "hi")
