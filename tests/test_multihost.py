"""Two processes, one run (jax.distributed over gloo on this CPU, one device each, mesh
data=2) through the launcher, against the same config trained by one process; and the
bad inputs of a multi-process start, each one message and exit 2."""

import json
import os
import subprocess
import sys

import pytest

from stackwise_jax import distributed, launch
from stackwise_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_file(corpus_dir, directory, mesh_data=-1):
    path = os.path.join(directory, "small.py")
    with open(path, "w") as f:
        f.write(f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                "from conftest import small_config\n\n\n"
                f"def get_config():\n    c = small_config({corpus_dir!r})\n"
                f"    c.mesh.data = {mesh_data}\n    return c\n")
    return path


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACKWISE_")}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **extra)  # XLA_FLAGS as conftest sets it
    return env


def _launch(args, timeout=240):
    return subprocess.run([sys.executable, "-m", "stackwise_jax.launch", *args], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def test_a_mesh_that_does_not_match_the_processes_devices_is_one_message(corpus_dir, tmp_path):
    proc = _launch(["--num_processes=2", "--",
                    f"--config={_config_file(corpus_dir, tmp_path, mesh_data=4)}",
                    f"--workdir={tmp_path / 'run'}"])
    assert proc.returncode == 2
    assert "mesh.data=4 x mesh.fsdp=1 x mesh.tensor=1 = 4 devices, but there are 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("args, message", [
    (["--num_processes=0", "--", "--config=x.py"], "--num_processes=0 must be at least 1"),
    (["--num_processes=two", "--", "--config=x.py"], "--num_processes='two' must be an integer"),
    (["--num_processes=2", "--config=x.py"], "no '--' before the training arguments"),
])
def test_bad_launcher_arguments(args, message):
    proc = _launch(args, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_the_launcher_refuses_variables_it_would_override():
    with pytest.raises(launch.LaunchError, match="STACKWISE_PROCESS_ID=1 is already set"):
        launch.check_environment(2, {"STACKWISE_PROCESS_ID": "1"})


def test_environment_that_disagrees_with_itself_is_named():
    base = {"STACKWISE_NUM_PROCESSES": "2", "STACKWISE_COORDINATOR": "127.0.0.1:1234"}
    assert distributed.settings({}) is None
    assert distributed.settings({**base, "STACKWISE_PROCESS_ID": "1"})["process_id"] == 1
    cases = [
        ({**base, "STACKWISE_PROCESS_ID": "2"}, r"STACKWISE_PROCESS_ID=2 does not fit "
                                                r"STACKWISE_NUM_PROCESSES=2: process ids are 0 to 1"),
        ({**base, "STACKWISE_NUM_PROCESSES": "0", "STACKWISE_PROCESS_ID": "0"},
         "STACKWISE_NUM_PROCESSES=0 must be at least 1"),
        ({"STACKWISE_PROCESS_ID": "0"}, "STACKWISE_NUM_PROCESSES, STACKWISE_COORDINATOR not"),
        ({**base, "STACKWISE_PROCESS_ID": "0", "STACKWISE_COORDINATOR": "nohost"},
         "expected host:port"),
        ({"STACKWISE_DISTRIBUTED": "yes"}, "the only value is 'auto'"),
    ]
    for env, message in cases:
        with pytest.raises(UserError, match=message):
            distributed.settings(env)


def test_train_refuses_a_process_id_outside_the_count(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stackwise_jax.train", "--config=x.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=_env(STACKWISE_NUM_PROCESSES="2", STACKWISE_PROCESS_ID="2",
                                   STACKWISE_COORDINATOR="127.0.0.1:1234"))
    assert proc.returncode == 2
    assert "error: STACKWISE_PROCESS_ID=2 does not fit STACKWISE_NUM_PROCESSES=2" in proc.stderr
    assert "Traceback" not in proc.stderr


def _files(root):
    """The run directory's files, without Orbax's per-process shard files inside each
    checkpoint (a two-process run has a second set)."""
    out = set()
    for d, _, names in os.walk(root):
        rel = os.path.relpath(d, root)
        if "ocdbt.process_" in rel or "array_metadatas" in rel or rel.split(os.sep)[-1] == "d":
            continue
        out |= {os.path.join(rel, n) for n in names}
    return out


def test_two_processes_reach_the_single_process_result_write_once_and_read_their_rows(
        corpus_dir, tmp_path):
    """Three stages, the last two from the activation cache (stage 1's built through the
    trunk, stage 2's incrementally from stage 1's), by two processes (one CPU device each,
    mesh data=2) against the same config trained by this one-device process. Process 0
    writes every file once (each cache included), both train from the cache, each reading
    only its half of every batch."""
    from conftest import small_config
    from stackwise_jax import train

    overrides = {"model.architecture.n_stacks": 3, "training.steps_per_stage": 4,
                 "training.progressive.cache_activations": True}
    single = str(tmp_path / "one")
    reference = train.run(small_config(corpus_dir, **overrides), single, progress=False)
    path = tmp_path / "cached.py"
    path.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                    "from conftest import small_config\n\n\n"
                    f"def get_config():\n    return small_config({corpus_dir!r}, **{overrides!r})\n")
    wd = str(tmp_path / "two")
    proc = _launch(["--num_processes=2", "--", f"--config={path}", f"--workdir={wd}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Batches of 4 rows over data=2: each process reads its own 2 rows of each.
    assert "[p0] data: process 0 of 2 reads rows 0:2 of each batch of 4" in proc.stdout
    assert "[p1] data: process 1 of 2 reads rows 2:4 of each batch of 4" in proc.stdout
    assert proc.stdout.count("building the activation cache of stage") == 2  # process 0's
    with open(os.path.join(wd, "summary.json")) as f:
        summary = json.load(f)
    # The same batches, masks, cached rows and initial parameters; only float32 reduction
    # order differs (the data-parallel gradient is a sum of two half-batch sums, then an
    # all-reduce): held-out losses of ~5 agree to well under the 1e-4 (measured:
    # 2.5e-7, causal 7.4e-7).
    for t, loss in reference["heldout_loss"].items():
        assert summary["heldout_loss"][t] == pytest.approx(loss, abs=1e-4)
    assert summary["heldout_causal_loss"] == pytest.approx(reference["heldout_causal_loss"],
                                                           abs=1e-4)
    # Written once: the same files as the single-process run (the last stage's cache,
    # which replaced the one before it, included), no lock left behind.
    assert _files(wd) == _files(single)
    assert sorted(os.listdir(os.path.join(wd, "cache"))) == ["stage_2"]
    assert not os.path.exists(os.path.join(wd, ".lock"))
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        steps = [json.loads(line)["global_step"] for line in f]
    assert steps == sorted(set(steps))  # one writer: no line twice
