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
    assert phases == ["stage 0, embedding and head train with stack 0",
                      "stage 2, inputs from the activation cache"] + [
        f"stage 2, frozen trunk resident in {f}" for f in ("fp32", "bf16", "fp8", "nf4")] + [
        "fusion, LoRA rank 8 on all 3 stacks over a nf4 base"]
    first, cached, fp32, bf16, fp8, nf4, fusion = big["phases"]
    assert first["trainable_params_bytes"] > fp32["trainable_params_bytes"]  # + the embedding
    # Fusion trains adapters only; every stack is frozen in nf4.
    assert fusion["trainable_params_bytes"] < fp32["trainable_params_bytes"]
    assert fusion["frozen_params_bytes"] > nf4["frozen_params_bytes"]
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
    assert [r["fits"] for r in small["phases"]][1:4] == [True, False, True]


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
    assert len(json.loads(out.read_text())["phases"]) == 7
    bad = subprocess.run([sys.executable, "-m", "stackwise_jax.plan", "--config=configs/tiny.py",
                          "--config.model.n_heads=3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "model.n_heads" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------ preflight

SAVING = {"model.remat": "full", "model.attention_chunk_size": 8, "training.loss_chunk_size": 8,
          "training.optimizer_state_dtype": "bf16", "training.progressive.frozen_precision": "nf4",
          "training.progressive.new_stack_precision": "bf16"}


def test_phases_for_run_picks_the_phase_the_run_executes(corpus_dir):
    first = plan.FIRST
    assert plan.phases_for_run(small_config(corpus_dir)) == [first, "fp32"]
    nf4 = small_config(corpus_dir, **{"training.progressive.frozen_precision": "nf4"})
    assert plan.phases_for_run(nf4) == [first, "nf4"]
    cached = small_config(corpus_dir, **{"training.progressive.cache_activations": True,
                                         "training.fusion.steps": 3})
    assert plan.phases_for_run(cached) == [first, plan.CACHED, plan.FUSION]
    assert plan.all_phases(cached) == [first, plan.CACHED, "fp32", "bf16", "fp8", "nf4",
                                       plan.FUSION]
    one_stack = small_config(corpus_dir, **{"training.progressive.cache_activations": True,
                                            "model.architecture.n_stacks": 1})
    assert plan.phases_for_run(one_stack) == ["fp32"]  # one stage, no trunk to cache
    e2e = small_config(corpus_dir, **{"training.progressive.enabled": False,
                                      "training.progressive.frozen_precision": "bf16"})
    assert plan.phases_for_run(e2e) == ["bf16"] and plan.CACHED not in plan.all_phases(e2e)
    with pytest.raises(ValueError):
        plan.plan(e2e, 10**12, [plan.CACHED])


def test_preflight_with_room_returns_only_the_configured_row(corpus_dir):
    nf4 = small_config(corpus_dir, **{"training.progressive.frozen_precision": "nf4"})
    rows = plan.preflight(nf4, 10**12)
    stage0 = "stage 0, embedding and head train with stack 0"
    assert [r["phase"] for r in rows] == [stage0, "stage 1, frozen trunk resident in nf4"]
    assert rows[1]["fits"] and 0 < rows[1]["frozen_params_bytes"] < rows[1]["total_bytes"]
    cached = small_config(corpus_dir, **{"training.progressive.cache_activations": True,
                                         "training.fusion.steps": 3})
    rows = plan.preflight(cached, 10**12)
    assert [r["phase"] for r in rows] == [stage0, "stage 1, inputs from the activation cache",
                                          "fusion, LoRA rank 8 on all 2 stacks over a nf4 base"]


def test_preflight_that_does_not_fit_names_the_phase_budget_and_knobs(corpus_dir):
    cfg = small_config(corpus_dir)
    with pytest.raises(UserError) as info:
        plan.preflight(cfg, 2**20)
    msg = str(info.value)
    # Stage 0 (embedding, stack 0 and head train) is this model's largest phase.
    assert "'stage 0, embedding and head train with stack 0' does not fit" in msg
    assert "of a 1.00 MiB budget" in msg and "XLA temporaries" in msg and "optimizer state" in msg
    knobs = ["--config.data.batch_size=2 (now 4)", "--config.model.remat=full (now none)",
             "--config.model.attention_chunk_size=8 (now 0)",
             "--config.training.loss_chunk_size=8 (now 0)",
             "--config.training.optimizer_state_dtype=bf16 (now fp32)"]
    for knob in knobs:
        assert knob in msg, knob
    # temporaries dominate this tiny model: activation knobs come before the optimizer's
    assert msg.index("data.batch_size") < msg.index("optimizer_state_dtype")
    assert msg.endswith("python -m stackwise_jax.plan --device_memory=1MiB --config=...")
    assert "Traceback" not in msg


def test_preflight_leaves_out_knobs_already_at_their_saving_value(corpus_dir):
    cfg = small_config(corpus_dir, **SAVING)
    with pytest.raises(UserError) as info:
        plan.preflight(cfg, 2**16)
    msg = str(info.value)
    assert "does not fit" in msg and "--config.data.batch_size=2 (now 4)" in msg
    for key in SAVING:
        assert f"--config.{key}=" not in msg, key


def test_advice_follows_the_part_that_dominates(corpus_dir):
    cfg = small_config(corpus_dir)
    row = {"phase": "stage 1, frozen trunk resident in fp32", "trainable_params_bytes": 10,
           "gradient_bytes": 10, "batch_bytes": 1}

    def advice(temp, frozen, opt):
        r = dict(row, xla_temp_bytes=temp, frozen_params_bytes=frozen, optimizer_bytes=opt,
                 total_bytes=temp + frozen + opt + 20)
        return [a.split("=")[0] for a in plan._advice(cfg, r, "fp32")]

    frozen_first = advice(temp=100, frozen=1000, opt=10)
    assert frozen_first[:2] == ["--config.training.progressive.frozen_precision",
                                "--config.training.progressive.cache_activations"]
    opt_first = advice(temp=100, frozen=10, opt=1000)
    assert opt_first[0] == "--config.training.optimizer_state_dtype"
    assert "--config.training.progressive.frozen_precision" not in opt_first  # 10 B: no matter
    temp_first = advice(temp=1000, frozen=100, opt=10)
    assert temp_first[0] == "--config.data.batch_size"
    assert temp_first.index("--config.model.remat") < temp_first.index(
        "--config.training.progressive.frozen_precision")
    # the cache needs the embedding to stop training after stage 0: not advised otherwise
    every = small_config(corpus_dir, **{"training.train_embedding": "every_stage"})
    r = dict(row, xla_temp_bytes=1, frozen_params_bytes=1000, optimizer_bytes=1, total_bytes=1022)
    assert not any("cache_activations" in a for a in plan._advice(every, r, "fp32"))
    # Fusion has its own remat and base format; the stages' trunk knobs do not apply to it.
    fusion = small_config(corpus_dir, **{"training.fusion.steps": 3,
                                         "training.fusion.base_precision": "fp8",
                                         "training.fusion.remat": "none"})
    knobs = [a.split("=")[0] for a in plan._advice(fusion, r, plan.FUSION)]
    assert knobs[0] == "--config.training.fusion.base_precision"
    assert "--config.training.fusion.remat" in knobs and "--config.model.remat" not in knobs
    assert not any("progressive.frozen_precision" in k or "cache_activations" in k for k in knobs)


class _Device:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


def test_device_memory_bytes_is_none_on_cpu_and_reads_the_limit_elsewhere():
    assert plan.device_memory_bytes() is None  # this CPU: the preflight is skipped
    assert plan.device_memory_bytes(_Device({"bytes_limit": 80 * 2**30, "bytes_in_use": 5})) \
        == 80 * 2**30
    assert plan.device_memory_bytes(_Device(None)) is None
    assert plan.device_memory_bytes(_Device({"bytes_in_use": 5})) is None
    assert plan.device_memory_bytes(_Device(NotImplementedError("no stats"))) is None
