"""Shared fixtures: a small config on a generated corpus, so training tests take seconds."""

import os
import random

# LLVM's optimisation of XLA:CPU kernels takes about half of this suite's CPU time (its
# programs are tiny and run a few steps each). Without it, results can differ from an
# optimised build in the last bits, which no test depends on: comparisons of two paths run
# both under the same flags, and comparisons with HF have float32 tolerances. Subprocesses
# inherit the flag. Set before JAX is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_backend_optimization_level=0").strip()

import pytest  # noqa: E402
from absl import logging

from stackwise_jax import config

logging.set_verbosity(logging.WARNING)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub


@pytest.fixture(scope="session", autouse=True)
def xla_compilation_cache(tmp_path_factory):
    """Many tests train runs of the same small shapes, each building its jitted steps
    afresh; XLA's persistent cache (fresh per session) compiles each program once."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    yield
    jax.config.update("jax_compilation_cache_dir", None)

SUBJECTS = ["the king", "a sailor", "my sister", "the old dog", "our captain", "the miller",
            "a stranger", "the queen", "his friend", "the young clerk"]
VERBS = ["finds", "loses", "carries", "remembers", "sells", "paints", "hides", "follows",
         "greets", "mends"]
OBJECTS = ["a lantern", "the silver key", "an apple", "the letter", "a small boat",
           "the green door", "a loaf of bread", "the map", "a wooden chair", "the bell"]
PLACES = ["by the river", "in the market", "at dawn", "near the mill", "under the bridge",
          "before supper", "in the garden", "on the hill"]


def generated_text(n_sentences: int, seed: int) -> str:
    """Grammatical, repetitive English: learnable structure, no third-party text."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
        lines.append(s[0].upper() + s[1:])
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (d / f"book{i}.txt").write_text(generated_text(400, seed=i))
    (d / "heldout.txt").write_text(generated_text(150, seed=99))
    return str(d)


def small_config(corpus_dir: str, **overrides):
    """A 2-stack, 2-blocks-per-stack model with tiny shapes; overrides as 'a.b': value."""
    c = config.defaults()
    c.model.vocab_size = 300
    c.model.d_model = 32
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.d_ff = 64
    c.model.architecture.n_stacks = 2
    c.model.architecture.blocks_per_stack = 2
    c.data.files = os.path.join(corpus_dir, "*.txt")
    c.data.heldout_files = "heldout.txt"
    c.data.seq_len = 32
    c.data.batch_size = 4
    c.training.steps_per_stage = 6
    c.training.warmup_steps = 2
    c.training.log_every = 2
    c.checkpoint.every_steps = 4
    c.checkpoint.max_to_keep = 3
    c.eval.batches = 2
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.validate(c)
    return c


@pytest.fixture(scope="session")
def trained_small_run(corpus_dir, tmp_path_factory):
    """The small config trained to the end (2 stages of 6 steps), shared by the tests that
    only read a finished run (classify, sample)."""
    from stackwise_jax import train

    wd = str(tmp_path_factory.mktemp("trained_small") / "run")
    train.run(small_config(corpus_dir), wd, progress=False)
    return wd
