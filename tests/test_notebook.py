"""notebooks/ablation.ipynb runs top to bottom in a kernel of this interpreter, at a tiny size."""

import json
import os

import jax
import nbformat
from nbclient import NotebookClient

from conftest import small_config
from stackwise_jax import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "ablation.ipynb")


def tiny_overrides(corpus_dir) -> dict[str, str]:
    """small_config as overrides of configs/tiny.py: the shapes the other tests compile."""
    small = config._flat(small_config(corpus_dir))
    tiny = config._flat(config.load(os.path.join(ROOT, "configs", "tiny.py")))
    return {k: str(v) for k, v in small.items()
            if v != tiny[k] and k not in ("training.steps_per_stage", "eval.batches")}


def test_ablation_notebook_runs_top_to_bottom(corpus_dir, tmp_path, monkeypatch):
    workdir = tmp_path / "ablation"
    params = {"STEPS_PER_STAGE": 6, "SEEDS": 1, "EVAL_BATCHES": 1, "WORKDIR": str(workdir),
              "OVERRIDES": tiny_overrides(corpus_dir)}
    monkeypatch.setenv("STACKWISE_NOTEBOOK_PARAMS", json.dumps(params))  # the kernel inherits it
    cache = jax.config.jax_compilation_cache_dir  # conftest's: programs other tests compiled
    if cache:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
    # Raises CellExecutionError, naming the cell, if any cell fails.
    NotebookClient(nb, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "all 2 runs finished" in text
    shown = [o.data for o in outputs if o.output_type == "display_data"]
    assert any("| recipe | n |" in d.get("text/markdown", "") for d in shown)
    assert sum("image/png" in d for d in shown) == 3
    assert sorted(os.listdir(workdir)) == [
        "final_loss.png", "loss_vs_tokens.png", "recipe=e2e,seed=0", "recipe=progressive,seed=0",
        "results.csv", "results.md", "training_loss.png"]
