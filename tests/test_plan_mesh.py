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
# fixed when it starts.
ON_8_DEVICES = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
from conftest import small_config
from stackwise_jax import plan, plan_mesh, sharding, train

corpus, workdir = sys.argv[1], sys.argv[2]
cfg = small_config(corpus, **{"model.d_model": 64, "model.d_ff": 192, "mesh.data": 1,
                              "mesh.fsdp": 4, "mesh.tensor": 2, "training.steps_per_stage": 2,
                              "training.warmup_steps": 1, "eval.batches": 1,
                              "training.progressive.frozen_precision": "nf4",
                              "training.fusion.steps": 2})
summary = train.run(cfg, workdir, progress=False)
layout = sharding.from_config(cfg)
keys = [plan.FIRST, "nf4", plan.FUSION]
rows = [plan.analyze(cfg, k, 10**12, layout=layout) for k in keys]
# The search: a budget that the step of stage 0 meets on fsdp=2 and not on one device.
small = small_config(corpus, **{"model.d_model": 64, "model.d_ff": 192})
fsdp2 = plan_mesh.with_mesh(small, {"data": 1, "fsdp": 2, "tensor": 1})
budget = plan.analyze(fsdp2, plan.FIRST, 10**12,
                      layout=plan_mesh.layout_for(fsdp2, 2))["total_bytes"]
search = plan_mesh.smallest_mesh(small, budget, [plan.FIRST], 8)
print(json.dumps({"stages": summary["stages"], "rows": rows, "budget": budget,
                  "search": search}))
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
    """Stage 0, stage 1 over an nf4 trunk and fusion, trained on data=1 x fsdp=4 x tensor=2:
    the planner's per-device non-temporary bytes against the most live-array bytes one
    device held in that phase (memory.peak_device_bytes: each array's shard on each device).
    Both count the same arrays' shards from the same shapes; the run also holds scalars
    (keys, losses, step counters: under 200 bytes). 0.5% of these ~200 KB is about 1 KiB,
    below the smallest kernel shard that could be miscounted (k_proj of 2 blocks, 64 x 32
    float32 over 8 devices: 2 KiB), so a missing or wrongly split parameter fails."""
    stages, rows = on_8_devices["stages"], on_8_devices["rows"]
    assert len(stages) == 3
    for stage, row in zip(stages, rows):
        measured, planned = stage["peak_device_bytes"], row["non_temporary_bytes"]
        assert abs(planned - measured) <= 0.005 * measured, (row["phase"], planned, measured)
        # the mesh splits what one device holds: well under the whole run's live arrays
        assert measured < 0.25 * stage["peak_live_bytes"], stage


def test_smallest_mesh_is_the_first_that_fits(on_8_devices):
    budget, search = on_8_devices["budget"], on_8_devices["search"]
    (found,) = search["phases"]
    assert found["n_devices"] == 2 and found["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
    assert found["row"]["total_bytes"] == budget and found["row"]["fits"]
    one_device, fsdp2 = found["tried"]  # one device first, then the fit; nothing after
    assert one_device["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert one_device["total_bytes"] > budget and not one_device["fits"]


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
