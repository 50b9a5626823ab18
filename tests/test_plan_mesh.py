"""The planner per device of a mesh: against the shard bytes a run on 8 simulated devices
holds, the smallest-mesh search, and the flags' bad values."""

import json
import os
import subprocess
import sys

import pytest

from stackwise_jax import plan

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# Runs in its own process: the pytest process has one CPU device, and JAX's device count is
# fixed when it starts. One stack: stage 0 (embedding, stack, head train) and fusion (LoRA
# adapters over the stack held in nf4, then merged).
ON_8_DEVICES = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
from conftest import small_config
from stackwise_jax import plan, plan_mesh, train

corpus, workdir = sys.argv[1], sys.argv[2]
cfg = small_config(corpus, **{"model.d_model": 64, "model.d_ff": 192, "mesh.data": 1,
                              "mesh.fsdp": 4, "mesh.tensor": 2, "training.steps_per_stage": 2,
                              "training.warmup_steps": 1, "eval.batches": 1,
                              "model.architecture.n_stacks": 1, "training.fusion.steps": 2})
summary = train.run(cfg, workdir, progress=False)
result = plan.plan(cfg, 10**12, plan.phases_for_run(cfg), plan_mesh.layout_for(cfg, 8))
print(json.dumps({"stages": summary["stages"], "plan": result}))
"""


@pytest.fixture(scope="module")
def on_8_devices(corpus_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mesh") / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS])}
    r = subprocess.run([sys.executable, "-c", ON_8_DEVICES, corpus_dir, str(workdir)],
                       capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_per_device_plan_counts_the_shards_a_mesh_run_holds(on_8_devices):
    """Stage 0 and fusion trained on data=1 x fsdp=4 x tensor=2: the planner's per-device
    non-temporary bytes against the most live-array bytes one device held in that phase
    (memory.peak_device_bytes: each array's shard on each device it is placed on). Both
    count the same arrays' shards from the same shapes; the run also holds scalars (keys,
    losses, step counters: under 200 bytes). 0.5% of these ~200 KB is about 1 KiB, below the
    smallest kernel shard that could be miscounted (k_proj of 2 blocks, 64 x 32 float32
    over 8 devices: 2 KiB), so a missing or wrongly split parameter fails."""
    stages, result = on_8_devices["stages"], on_8_devices["plan"]
    assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    rows = result["phases"]
    assert [r["phase"] for r in rows] == ["stage 0, no frozen trunk",
                                          "fusion, LoRA rank 8 on all 1 stacks over a nf4 base"]
    assert len(stages) == 2 and "merge" in rows[1]["holds"]
    for stage, row in zip(stages, rows):
        measured, planned = stage["peak_device_bytes"], row["non_temporary_bytes"]
        assert abs(planned - measured) <= 0.005 * measured, (row["phase"], planned, measured)
        # peak_live_bytes counts each array once: replicated, a device would hold all of it
        assert measured < 0.5 * stage["peak_live_bytes"], stage


# ------------------------------------------------------------------------------ the search


def test_smallest_mesh_takes_the_fewest_devices_then_the_first_mesh(corpus_dir, monkeypatch):
    """The search's order on a stand-in planner whose per-device total is known: total =
    1200 / fsdp + 400 / tensor bytes. Budget 900: 1 device (1600), fsdp=2 (1000), tensor=2
    (1400), fsdp=4 (700, but data.batch_size=2 does not split 4 ways: refused before
    anything is compiled), fsdp=2 x tensor=2 (800): the smallest mesh is 4 devices, 2 x 2.
    A phase that needs 400 fits on one device and is not tried again."""
    from conftest import small_config
    from stackwise_jax import plan_mesh

    cfg = small_config(corpus_dir, **{"data.batch_size": 2})
    compiled = []

    def fake_plan(trial, budget, keys, layout):
        (key,) = keys
        mesh = {a: trial.mesh[a] for a in ("data", "fsdp", "tensor")}
        compiled.append((key, mesh))
        total = 1200 // mesh["fsdp"] + 400 // mesh["tensor"] if key == plan.FIRST else 400
        row = dict.fromkeys(("trainable_params_bytes", "frozen_params_bytes", "optimizer_bytes",
                             "xla_temp_bytes", "non_temporary_bytes"), 0)
        return {"phases": [{**row, "phase": key, "total_bytes": total, "fits": total <= budget}]}

    monkeypatch.setattr(plan, "plan", fake_plan)
    monkeypatch.setattr(plan_mesh, "layout_for", lambda cfg, n, flag: None)
    result = plan_mesh.smallest_mesh(cfg, 900, [plan.FIRST, "fp32"], 8)
    first, fp32 = result["phases"]
    assert first["n_devices"] == 4 and first["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert fp32["n_devices"] == 1 and fp32["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert first["phase"] == "stage 0, embedding and head train with stack 0"
    assert [(t["mesh"]["fsdp"], t["mesh"]["tensor"]) for t in first["tried"]] == [
        (1, 1), (2, 1), (1, 2), (4, 1), (2, 2)]
    refused = first["tried"][3]["refused"]
    assert refused.startswith("data.batch_size=2 is not divisible by mesh.data x mesh.fsdp")
    assert [m["fsdp"] for k, m in compiled if k == plan.FIRST] == [1, 2, 1, 2]  # no fsdp=4
    assert [k for k, _ in compiled].count("fp32") == 1  # placed on one device, not tried again
    text = plan_mesh.format_search(result)
    assert "| 4 | data=1 x fsdp=2 x tensor=2 |" in text
    assert "skipped data=1 x fsdp=4 x tensor=1: data.batch_size=2" in text


# ------------------------------------------------------------------------------ bad input


def _main(capsys, *args):
    rc = plan.main(["--config=configs/tiny.py", *args])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("args,names", [
    (["--devices=0"], "--devices=0 must be a positive integer"),
    (["--smallest_mesh", "--max_devices=-2"], "--max_devices=-2 must be a positive integer"),
    (["--smallest_mesh", "--devices=8"], "--devices=8 and --smallest_mesh: choose one"),
    (["--devices=6", "--config.mesh.fsdp=4"],
     "--devices=6: mesh.data=-1 x mesh.fsdp=4 x mesh.tensor=1: the fixed axes (4 devices) "
     "do not divide the 6 devices"),
    (["--devices=4", "--config.mesh.data=1", "--config.mesh.fsdp=8"],
     "--devices=4: mesh.data=1 x mesh.fsdp=8 x mesh.tensor=1 = 8 devices, but there are 4"),
    (["--devices=6", "--config.mesh.tensor=2"],  # data=-1 takes 3: 16 rows do not split
     "--devices=6: data.batch_size=16 is not divisible by mesh.data x mesh.fsdp = 3 x 1"),
    (["--devices=8", "--config.mesh.tensor=8"],  # refused by the config's own check
     "model.n_kv_heads=2 is not divisible by mesh.tensor=8"),
])
def test_bad_mesh_flags_stop_with_one_message(capsys, args, names):
    """Each refused before JAX starts a device (so nothing here changes this process's)."""
    rc, out = _main(capsys, *args)
    assert rc == 2 and names in out.err, out.err
    assert "Traceback" not in out.err and out.out == ""


def test_search_that_finds_no_mesh_names_the_flag(capsys):
    rc, out = _main(capsys, "--smallest_mesh", "--max_devices=1", "--device_memory=1MiB",
                    "--phases=run", "--config.model.architecture.n_stacks=1")  # one phase
    assert rc == 1, out.err
    assert "| none of at most 1 |" in out.out
    assert "no mesh of at most --max_devices=1 devices fits" in out.out
