"""The memory planner: abstract shapes only, XLA's accounting, FITS against a budget."""

import json
import subprocess
import sys

import pytest

from conftest import small_config
from stackwise_jax import plan
from stackwise_jax.errors import UserError


def test_plan_rows_add_up_and_respect_the_budget(corpus_dir):
    cfg = small_config(corpus_dir, **{"model.architecture.n_stacks": 3})
    big = plan.plan(cfg, 10**12)
    phases = [r["phase"] for r in big["phases"]]
    assert phases == ["stage 2, inputs from the activation cache"] + [
        f"stage 2, frozen trunk resident in {f}" for f in ("fp32", "bf16", "fp8", "nf4")]
    cached, fp32, bf16, fp8, nf4 = big["phases"]
    assert all(r["fits"] for r in big["phases"])
    assert cached["frozen_params_bytes"] == 0  # untied head: the trunk is not there at all
    embed = 300 * 32 * 4  # the frozen embedding stays float32; stacks shrink
    stacks_fp32 = fp32["frozen_params_bytes"] - embed
    assert bf16["frozen_params_bytes"] - embed < 0.55 * stacks_fp32
    assert fp8["frozen_params_bytes"] - embed < 0.35 * stacks_fp32
    assert nf4["frozen_params_bytes"] - embed < 0.2 * stacks_fp32
    assert 0 <= fp32["optimizer_bytes"] - 2 * fp32["trainable_params_bytes"] <= 64  # mu, nu, counts
    for r in big["phases"]:
        assert r["total_bytes"] >= r["trainable_params_bytes"] + r["optimizer_bytes"] + r["xla_temp_bytes"]
        assert r["flops_per_token"] > 0
    small = plan.plan(cfg, fp32["total_bytes"] - 1)
    assert [r["fits"] for r in small["phases"]][:3] == [True, False, True]


def test_parse_bytes():
    assert plan.parse_bytes("141GiB") == 141 * 2**30
    assert plan.parse_bytes("80GB") == 80 * 10**9
    with pytest.raises(UserError, match="device_memory"):
        plan.parse_bytes("lots")


def test_cli_writes_json_and_exits_nonzero_when_a_phase_does_not_fit(tmp_path):
    out = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, "-m", "stackwise_jax.plan", "--config=configs/tiny.py",
                        "--device_memory=1MiB", f"--json={out}"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout, r.stderr
    assert len(json.loads(out.read_text())["phases"]) == 5
    bad = subprocess.run([sys.executable, "-m", "stackwise_jax.plan", "--config=configs/tiny.py",
                          "--config.model.n_heads=3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "model.n_heads" in bad.stderr and "Traceback" not in bad.stderr
