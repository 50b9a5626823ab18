"""The exported models under the lowest transformers that pyproject admits (hf extra:
transformers>=5.0): a Llama (gqa) and a DeepSeek-V3 (mla) run are exported and read back by
transformers 5.0.0 itself, in a child process whose sys.path puts 5.0.0 and the versions of
its dependencies that it requires ahead of the project's venv. The child must read the
config's RoPE theta (500000: no default gives it), compute the JAX Rack's logits and
tokenize as the run does (greedy tokens against the installed transformers are in
test_export and test_export_mla; here they would double the test's time). 4.x reads a top-level `rope_theta` and 5.x `rope_parameters`; the exporter
writes both (docs/export.md).

The packages come from PyPI once (`pip install --no-deps --target`, ~3 s) into
<cache root>/transformers-floor-<hash> (data.cache_root(): ~/.cache/stackwise_jax or
$STACKWISE_CACHE_DIR), built in a temporary directory and renamed into place, then reused.
Without PyPI the test fails and says so: it cannot be checked otherwise."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOOR = "5.0"  # pyproject's lower bound, checked against the file below
# What `pip install --dry-run transformers==5.0.0` adds to the project's venv: 5.0.0 wants
# tokenizers <= 0.23.0 and huggingface-hub < 2 (the venv has newer), and the hub 1.x wants
# httpx. Everything else transformers 5.0.0 requires the venv already satisfies (the child
# checks every requirement of these distributions against what it imports). torch is no
# requirement of transformers: the venv's is used, never downloaded.
FLOOR_PACKAGES = ("transformers==5.0.0", "tokenizers==0.22.2", "huggingface-hub==1.33.0",
                  "typer-slim==0.24.0", "httpx==0.29.0", "httpcore==1.0.9",
                  "certifi==2026.10.19.post1")
THETA = 500000.0  # Llama-3's; the 4.x fallback and the config default are 10000
PARITY_TOL = 1e-4  # as test_export's random-weight parity: same weights, float32 rounding


def floor_site() -> str:
    """The directory holding FLOOR_PACKAGES, installed once from PyPI."""
    from stackwise_jax import data

    def install(site: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
             "--only-binary=:all:", "--target", site, *FLOOR_PACKAGES],
            capture_output=True, text=True)
        if proc.returncode:
            why = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            pytest.fail(f"could not install {' '.join(FLOOR_PACKAGES)} from PyPI into "
                        f"{data.cache_root()}: {why}. This test runs the exported models under "
                        "the lowest transformers pyproject admits and needs PyPI (once) to get it.",
                        pytrace=False)

    tag = hashlib.sha256(" ".join(FLOOR_PACKAGES).encode()).hexdigest()[:10]
    return data.cached_dir(f"transformers-floor-{tag}", install)


def test_exported_models_under_the_lowest_transformers(tmp_path):
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pin = re.search(r'"transformers>=([0-9.]+)"', f.read()).group(1)
    assert pin == FLOOR, f"pyproject now pins transformers>={pin}: update FLOOR_PACKAGES"
    site = floor_site()
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, ROOT]), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), str(out)], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    print(out.read_text())
    assert got["versions"] == {p.split("==")[0]: p.split("==")[1] for p in FLOOR_PACKAGES}
    assert got["unmet_requirements"] == []
    for kind in ("llama", "deepseek_v3"):
        r = got[kind]
        assert r["model_type"] == kind
        # written where 5.x reads it and where 4.x (and other readers of config.json) do
        assert r["written_rope_parameters"] == {"rope_type": "default", "rope_theta": THETA}
        assert r["written_rope_theta"] == THETA, r
        assert r["config_theta"] == THETA, r  # what 5.0.0 parsed from config.json
        assert r["inv_freq_max_rel_err"] <= 1e-6, r  # its rotary embedding uses it
        assert r["max_abs_logit_diff"] <= PARITY_TOL, r
        assert r["tokenizer_equal"], r


# ------------------------------------------------------------------------------ the child
# Runs under whatever transformers comes first on sys.path, so the same check reads the
# export with another version: PYTHONPATH=SITE:. python tests/test_transformers_floor.py
# TMP_DIR OUT.json (docs/export.md: transformers 4.57.6).


def _unmet_requirements(root: str = "transformers") -> list[str]:
    """Requirements (no extras) in root's whole dependency tree that the distributions this
    process imports do not satisfy."""
    from importlib import metadata

    from packaging.requirements import Requirement

    out, seen, todo = [], set(), [root]
    while todo:
        name = todo.pop()
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                out.append(f"{name} needs {spec}: not installed")
                continue
            if not req.specifier.contains(have, prereleases=True):
                out.append(f"{name} needs {spec}: {have} found")
            elif req.name.lower() not in seen:
                seen.add(req.name.lower())
                todo.append(req.name)
    return out


def _check_export(cfg, tmp, bpe, rope_dim: int) -> dict:
    """Exports a random-weight run of cfg with this process's transformers and reads it
    back with it: the RoPE theta written and read, the frequencies, logits, tokenizer ids."""
    import transformers
    from test_export import causal_forward, hf_logits, load_hf, random_params, write_run

    from export import hf as export_hf
    from stackwise_jax.run import rack_from_params

    params = random_params(cfg)
    run = write_run(os.path.join(tmp, "run"), cfg, params, bpe)
    out = os.path.join(tmp, "hf")
    assert export_hf.main([f"--workdir={run}", f"--out={out}", "--quiet"]) == 0
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    model = load_hf(out)
    # 4.x builds RoPE from config.rope_theta (always set, 10000 by default); 5.x folds a
    # written rope_theta into rope_parameters and keeps no such attribute
    read = getattr(model.config, "rope_theta", None) or model.config.rope_parameters[
        "rope_theta"]
    inv_freq = model.model.rotary_emb.inv_freq.numpy().astype(np.float64)
    want = 1.0 / THETA ** (np.arange(0, rope_dim, 2) / rope_dim)
    forward = causal_forward(rack_from_params(cfg.model, params))
    ids = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (2, 40)).astype(np.int32)
    text = "The queen hides the map by the river."
    return {"model_type": model.config.model_type,
            "written_rope_theta": written.get("rope_theta"),
            "written_rope_parameters": written.get("rope_parameters"),
            "config_theta": float(read),
            "inv_freq_max_rel_err": float(np.abs(inv_freq / want - 1).max()),
            "max_abs_logit_diff": float(np.abs(forward(ids) - hf_logits(model, ids)).max()),
            "tokenizer_equal": transformers.AutoTokenizer.from_pretrained(out)(text)[
                "input_ids"] == bpe.encode(text)}


def _child(tmp: str, result_path: str) -> None:
    # The venv's `kernels` (an optional extra of its newer transformers) breaks 5.0.0's
    # import; 5.0.0 does not require it, and it is hidden as a plain install would lack it.
    sys.modules["kernels"] = None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # test_export, conftest
    from importlib import metadata

    import transformers
    from conftest import generated_text
    from test_export import tiny_cfg
    from test_export_mla import mla_cfg

    from stackwise_jax import config, data

    versions = {}
    for p in FLOOR_PACKAGES:
        try:
            versions[p.split("==")[0]] = metadata.version(p.split("==")[0])
        except metadata.PackageNotFoundError:
            versions[p.split("==")[0]] = None
    result = {"versions": versions, "unmet_requirements": _unmet_requirements(),
              "transformers_file": transformers.__file__}
    bpe = data.build_tokenizer(config.defaults().data, [generated_text(300, 0)], 300)
    llama = tiny_cfg(rope_theta=THETA)
    result["llama"] = _check_export(llama, os.path.join(tmp, "llama"), bpe,
                                    llama.model.d_model // llama.model.n_heads)
    mla = mla_cfg(24, tie_embeddings=False)
    mla.model.rope_theta = THETA
    config.validate(mla)
    result["deepseek_v3"] = _check_export(mla, os.path.join(tmp, "mla"), bpe,
                                          mla.model.mla.qk_rope_head_dim)
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    _child(*sys.argv[1:3])
