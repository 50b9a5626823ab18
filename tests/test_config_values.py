"""Every config key against bad values, generated from config.defaults(): a key added later
is covered without touching this file. Each bad value must stop validation with a
UserError that names the key; one goes through the real CLI for exit code 2."""

import math
import os
import subprocess
import sys

from stackwise_jax import config
from stackwise_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Where 0 or "" means something (documented next to the key in config.defaults()).
ZERO_ALLOWED = {"model.attention_chunk_size", "training.loss_chunk_size", "training.fusion.steps",
                "eval.batches", "training.warmup_steps", "data.seed", "training.seed",
                "training.weight_decay", "training.grad_clip_norm",
                "model.mla.q_lora_rank"}  # 0: a full query projection
EMPTY_ALLOWED = {"data.files", "data.heldout_files"}
MINUS_ONE_ALLOWED = set(config.MESH_KEYS)  # -1: the devices the other mesh axes leave


def bad_values(key, like):
    """(label, value) pairs that no key of this kind may take."""
    if isinstance(like, bool):
        return [("string", "yes"), ("int", 1), ("none", None)]
    if isinstance(like, int):
        negative = -2 if key in MINUS_ONE_ALLOWED else -1
        out = [("string", "8"), ("float", 2.5), ("bool", True), ("negative", negative),
               ("none", None)]
        return out + ([] if key in ZERO_ALLOWED else [("zero", 0)])
    if isinstance(like, float):
        out = [("string", "0.1"), ("bool", True), ("nan", math.nan), ("inf", math.inf),
               ("-inf", -math.inf), ("negative", -1.0), ("none", None)]
        return out + ([] if key in ZERO_ALLOWED else [("zero", 0.0)])
    if isinstance(like, str):
        out = [("int", 3), ("none", None), ("tuple", ("a",))]
        return out + ([] if key in EMPTY_ALLOWED else [("empty", "")])
    if isinstance(like, tuple):
        wrong = 3 if isinstance(like[0], str) else "x"
        out = [("empty", ()), ("string", "abc"), ("wrong element", (wrong,)), ("none", None)]
        if not isinstance(like[0], str):
            out += [("nan element", (math.nan,)), ("negative element", (-0.5,))]
        return out
    raise AssertionError(f"{key}: no bad values for a {type(like).__name__}; add them here")


CASES = [(key, label, value) for key, like in config._flat(config.defaults()).items()
         for label, value in bad_values(key, like)]


def with_value(key, value):
    c = config.defaults()
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    with node.unlocked():  # a ConfigDict keeps each key's type; a user's file may not
        node.__dict__["_fields"][leaf] = value
    return c


def test_defaults_are_valid():
    config.validate(config.defaults())


def test_every_key_refuses_every_bad_value():
    failures = []
    for key, label, value in CASES:
        try:
            config.validate(with_value(key, value))
        except UserError as e:
            if key not in str(e):
                failures.append(f"{key} ({label}={value!r}): message does not name it: {e}")
        except Exception as e:  # noqa: BLE001 - the point is that nothing else escapes
            failures.append(f"{key} ({label}={value!r}): {type(e).__name__}: {e}")
        else:
            failures.append(f"{key} ({label}={value!r}): accepted")
    assert not failures, "\n".join(failures)
    assert len(CASES) > 200  # every key, several values each


def test_cli_stops_a_bad_value_with_exit_code_2(tmp_path):
    wd = tmp_path / "wd"
    r = subprocess.run([sys.executable, "-m", "stackwise_jax.train", "--config=configs/tiny.py",
                        f"--workdir={wd}", "--config.training.learning_rate=nan"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: training.learning_rate=nan must be a finite number")
    assert "Traceback" not in r.stderr
    assert not wd.exists()
