"""Faults a long run meets: damaged checkpoints and stores, Ctrl-C and SIGTERM, a full disk.
Each drives the real trainer (in-process, or as a real process for signals and exit
codes) and compares the finished run with one that never met the fault, bit for bit."""

import glob
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import small_config
from stackwise_jax import checkpoint, faults, store, train
from test_train import leaves, params_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6  # per stage, 2 stages; periodic checkpoints every 4 global steps (conftest)


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory):
    """The run that met no fault: its final parameters and metrics."""
    cfg = small_config(corpus_dir)
    wd = str(tmp_path_factory.mktemp("reference") / "run")
    summary = train.run(cfg, wd, progress=False)
    return {"params": leaves(params_of(wd)), "metrics": _metrics(wd), "summary": summary,
            "workdir": wd}


@pytest.fixture(scope="module")
def at_step5(corpus_dir, tmp_path_factory):
    """A run stopped after global step 5 of 12: checkpoints 4 (periodic) and 5."""
    wd = str(tmp_path_factory.mktemp("step5") / "run")
    assert train.run(small_config(corpus_dir), wd, max_steps=5, progress=False) == {}
    assert _steps(wd) == [4, 5]
    return wd


def _cached_config(corpus_dir):
    """small_config with stage 1 trained from the activation cache."""
    return small_config(corpus_dir, **{"training.progressive.cache_activations": True,
                                       "training.progressive.cache_dtype": "fp32"})


@pytest.fixture(scope="module")
def stage0_cached(corpus_dir, tmp_path_factory):
    """A run of _cached_config at the end of stage 0: stored, stage 1's cache not yet built."""
    wd = str(tmp_path_factory.mktemp("stage0_cached") / "run")
    assert train.run(_cached_config(corpus_dir), wd, max_steps=STEPS, progress=False) == {}
    assert _steps(wd)[-1] == STEPS and not os.path.exists(os.path.join(wd, "cache", "stage_1"))
    return wd


def _metrics(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _steps(wd):
    return sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit())


def _tree(wd):
    """Every file under wd with its bytes: to see that nothing changed."""
    out = {}
    for dirpath, _, names in os.walk(wd):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, wd)] = f.read()
    return out


def _assert_same_as_reference(wd, reference):
    final = leaves(params_of(wd))
    assert final.keys() == reference["params"].keys()
    for path, value in reference["params"].items():
        assert np.array_equal(final[path], value), path
    losses = [(m["global_step"], m["loss"]) for m in _metrics(wd)]
    assert losses == [(m["global_step"], m["loss"]) for m in reference["metrics"]]


def _saved_state(wd, step):
    """Every array and the data position a checkpoint holds, by path."""
    import orbax.checkpoint as ocp

    ckpt = checkpoint.Checkpointer(wd, 3, create=False)
    args = ocp.args.Composite(trainable=ocp.args.StandardRestore(),
                              opt_state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
    restored = ckpt.manager.restore(step, args=args)
    ckpt.close()
    out = {("data",): json.dumps(restored.data, sort_keys=True)}
    out.update(leaves({"trainable": restored.trainable, "opt_state": restored.opt_state}))
    return out


def _largest_file(directory):
    files = [os.path.join(d, n) for d, _, ns in os.walk(directory) for n in ns]
    return max(files, key=os.path.getsize)


def _truncate_params(step_dir):
    path = _largest_file(os.path.join(step_dir, "trainable"))
    open(path, "w").close()  # 0 bytes
    return "trainable", path


def _delete_item(step_dir):
    shutil.rmtree(os.path.join(step_dir, "opt_state"))
    return "opt_state", os.path.join(step_dir, "opt_state")


def _garble_meta(step_dir):
    path = os.path.join(step_dir, "meta", "metadata")
    with open(path, "r+") as f:
        f.write("{garbled")
    return "meta", path


def _truncate_without_checksums(step_dir):
    """A checkpoint from before checksums (or a save stopped right before them): the
    restore itself must find the damage."""
    os.remove(os.path.join(step_dir, checkpoint.CHECKSUMS))
    return _truncate_params(step_dir)


# A garbled meta file is found by the same checksum check (and named the same way) in
# test_no_intact_checkpoint_stops_with_one_message_and_changes_nothing.
@pytest.mark.parametrize("damage", [_truncate_params, _delete_item,
                                    _truncate_without_checksums])
def test_damaged_latest_checkpoint_is_named_set_aside_and_the_previous_one_used(
        damage, corpus_dir, at_step5, tmp_path, capsys):
    wd = str(tmp_path / "run")
    shutil.copytree(at_step5, wd)
    item, path = damage(os.path.join(wd, "checkpoints", "5"))
    capsys.readouterr()
    assert train.run(small_config(corpus_dir), wd, max_steps=1, progress=False) == {}
    # Step 5 again, from checkpoint 4: the same state as the checkpoint that was damaged.
    checkpoint.Checkpointer(wd, 3, create=False).check(5)  # the new one is intact
    redone, original = _saved_state(wd, 5), _saved_state(at_step5, 5)
    assert redone.keys() == original.keys()
    for key, value in original.items():
        assert np.array_equal(redone[key], value), key
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "damaged" in line]
    assert len(said) == 1, err
    assert f"checkpoint 5 is damaged ({item}: " in said[0], said
    if damage is _truncate_without_checksums:  # Orbax's restore names the file's array
        assert "trainable is unreadable (ValueError: OUT_OF_RANGE: Error reading" in said[0]
    else:
        assert ("is missing" if item == "opt_state" else path) in said[0], said
    assert "Resuming from the newest intact checkpoint, 4, at stage 1/2, step 4" in said[0]
    assert os.path.isdir(os.path.join(wd, "checkpoints.damaged", "5"))  # kept, not deleted


def test_no_intact_checkpoint_stops_with_one_message_and_changes_nothing(
        corpus_dir, at_step5, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(at_step5, wd)
    _truncate_params(os.path.join(wd, "checkpoints", "5"))
    _, meta_path = _garble_meta(os.path.join(wd, "checkpoints", "4"))
    before = _tree(wd)
    with pytest.raises(train.UserError) as e:
        train.run(small_config(corpus_dir), wd, progress=False)
    msg = str(e.value)
    assert "no intact checkpoint" in msg and "Nothing was changed or deleted" in msg, msg
    assert "checkpoint 5 is damaged (trainable:" in msg, msg
    assert f"checkpoint 4 is damaged (meta: {meta_path} is corrupted" in msg, msg
    assert _tree(wd) == before


def test_damaged_stores_are_named_together_and_nothing_is_deleted(corpus_dir, stage0_cached,
                                                                  tmp_path):
    cfg = _cached_config(corpus_dir)  # the stores are checked before any cache is opened
    wd = str(tmp_path / "run")
    shutil.copytree(stage0_cached, wd)  # stage 0 stored (v1)
    stack = store.open_store(wd, store.stack_group(0), 1)
    leaf = os.path.join(stack.path, sorted(stack.leaves)[0] + ".npy")
    open(leaf, "w").close()
    with open(os.path.join(store.open_store(wd, "head", 1).path, store.MANIFEST), "w") as f:
        f.write("{")
    before = _tree(wd)
    with pytest.raises(train.UserError) as e:
        train.run(cfg, wd, progress=False)
    msg = str(e.value)
    assert "2 stored parameter file(s) are damaged" in msg, msg
    assert f"stack 0: {leaf} is truncated: 0 bytes" in msg and "the head:" in msg, msg
    assert _tree(wd) == before


# ----------------------------------------------------------------- signals and the disk

def _config_file(corpus_dir, directory):
    """A config file holding conftest.small_config: the CLI runs the same run as
    `reference`."""
    path = os.path.join(directory, "small.py")
    with open(path, "w") as f:
        f.write(f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                "from conftest import small_config\n\n\n"
                f"def get_config():\n    return small_config({corpus_dir!r})\n")
    return path


def _stderr_after(proc, marker: str) -> str:
    """Reads the process's stderr until `marker` appears; returns what it read."""
    seen = ""
    while marker not in seen:
        char = proc.stderr.read(1)
        assert char, f"the process ended before printing {marker!r}: {seen}"
        seen += char
    return seen


def _wait_for_step(wd, global_step, proc=None, timeout=300):
    """Polls metrics.jsonl until it logs `global_step`."""
    path = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None):
        if os.path.exists(path):
            with open(path) as f:
                done = [json.loads(line)["global_step"] for line in f if line.endswith("\n")]
            if done and max(done) >= global_step:
                return
        time.sleep(0.01)
    raise AssertionError(f"step {global_step} never logged")


def _interrupt_in_save(wd, after_step, done, seen):
    """Polls for the temporary directory of the first checkpoint saved after `after_step`
    (Orbax writes step N into N.orbax-checkpoint-tmp-* and renames it when complete) and
    sends SIGINT the moment it appears: the signal lands inside that save."""
    pattern = os.path.join(wd, "checkpoints", "*" + checkpoint._ORBAX_TMP + "*")
    while not done.is_set():
        steps = [int(os.path.basename(p).split(".")[0]) for p in glob.glob(pattern)]
        steps = [s for s in steps if s > after_step]
        if steps:
            seen.append(min(steps))
            os.kill(os.getpid(), signal.SIGINT)
            return
        time.sleep(0.0005)


def test_sigterm_and_ctrl_c_save_and_the_rerun_is_bit_identical(corpus_dir, reference,
                                                                 tmp_path, capsys):
    wd = str(tmp_path / "run")
    # 1. A real process gets SIGTERM mid-stage (a scheduler, Colab, a spot instance).
    proc = subprocess.Popen([sys.executable, "-m", "stackwise_jax.train",
                             f"--config={_config_file(corpus_dir, tmp_path)}",
                             f"--workdir={wd}"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": ROOT})
    # The progress bar is up; half a second later the first step is compiling, which takes
    # seconds (3 s idle, 14 s loaded on 2 cores here): the signal lands inside step 1.
    err = _stderr_after(proc, "stage 1/2")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, rest = proc.communicate(timeout=120)
    err += rest
    assert proc.returncode == 143, err
    assert "SIGTERM received: saving a checkpoint" in err, err
    assert "interrupted (SIGTERM); rerun the same command" in err, err
    assert "Traceback" not in err, err
    stopped = _steps(wd)[-1]  # saved at the step it stopped after: nothing lost
    assert 1 <= stopped < STEPS, stopped  # mid stage 0
    checkpoint.Checkpointer(wd, 3, create=False).check(stopped)
    cfg = small_config(corpus_dir)

    # 2. Ctrl-C (a real SIGINT to this process) while a checkpoint is being written: the
    # periodic one of step 4 (the first save after step 1). The save completes, then the
    # run stops at that step without a second save.
    done, seen = threading.Event(), []
    sender = threading.Thread(target=_interrupt_in_save, args=(wd, stopped, done, seen),
                              daemon=True)
    sender.start()
    capsys.readouterr()
    try:
        with pytest.raises(KeyboardInterrupt):
            train.run(cfg, wd, progress=False)
    finally:
        done.set()
        sender.join()
    assert seen, "no checkpoint save was seen"
    assert _steps(wd)[-1] == seen[0], (seen, _steps(wd))
    checkpoint.Checkpointer(wd, 3, create=False).check(seen[0])  # complete, checksummed
    assert capsys.readouterr().err.count("SIGINT received: saving a checkpoint") == 1
    assert not [n for n in os.listdir(os.path.join(wd, "checkpoints")) if "tmp" in n]

    # 3. Ctrl-C as stage 0 ends: the checkpoint is then the phase boundary's, or a step of
    # stage 1 it stopped after.
    def interrupt_at_stage_end():
        _wait_for_step(wd, STEPS)
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=interrupt_at_stage_end, daemon=True)
    sender.start()
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, wd, progress=False)
    sender.join()
    stopped = _steps(wd)[-1]
    assert STEPS <= stopped < 2 * STEPS
    assert not [n for n in os.listdir(os.path.join(wd, "checkpoints")) if "tmp" in n]

    # 4. The rerun finishes the same run, bit for bit.
    train.run(cfg, wd, progress=False)
    _assert_same_as_reference(wd, reference)


class _FileSizeLimit:
    """A real limit on the bytes any file may grow to (ulimit -f): writes past it fail
    with EFBIG, as they would with ENOSPC on a full disk. SIGXFSZ, which would kill the
    process, is ignored so that the write itself reports the error."""

    def __init__(self, nbytes):
        self.nbytes = nbytes

    def __enter__(self):
        self.old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.nbytes, self.old_limit[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old_limit)
        signal.signal(signal.SIGXFSZ, self.old_handler)


def test_a_full_disk_stops_with_path_and_bytes_and_the_last_checkpoint_stays_usable(
        corpus_dir, at_step5, reference, tmp_path):
    cfg = small_config(corpus_dir)
    wd = str(tmp_path / "run")
    shutil.copytree(at_step5, wd)
    # Small files (metrics, checksums) fit under 6 KB; a stack's arrays and a
    # checkpoint's data files do not.
    limit = _FileSizeLimit(6000)
    with limit, pytest.raises(faults.DiskFull) as e:
        train.run(cfg, wd, progress=False)  # step 6 ends stage 0: its stores do not fit
    msg = str(e.value)
    assert "no space left writing the stored parameters of" in msg, msg
    assert os.path.join(wd, "params") in msg and "it needed " in msg, msg
    assert _steps(wd)[-1] == 5
    checkpoint.Checkpointer(wd, 3, create=False).check(5)  # intact
    params = os.path.join(wd, "params")  # what was written is .partial: never read
    assert all(store.versions(wd, g) == [] for g in os.listdir(params)), os.listdir(params)

    assert train.run(cfg, wd, max_steps=1, progress=False) == {}  # no limit: stage 0 ends
    assert _steps(wd)[-1] == STEPS
    with limit, pytest.raises(faults.DiskFull) as e:
        train.run(cfg, wd, progress=False)  # the periodic checkpoint of step 8 does not fit
    msg = str(e.value)
    assert f"no space left writing checkpoint 8 at {os.path.join(wd, 'checkpoints', '8')}" in msg
    assert _steps(wd)[-1] == STEPS

    train.run(cfg, wd, progress=False)  # no limit: resumes from step 6 and finishes
    assert not [n for n in os.listdir(os.path.join(wd, "checkpoints")) if "tmp" in n]
    _assert_same_as_reference(wd, reference)


def test_a_full_disk_while_caching_activations_names_the_shard_and_keeps_no_partial_cache(
        corpus_dir, stage0_cached, tmp_path):
    from stackwise_jax import cache, cache_store

    cfg = _cached_config(corpus_dir)
    wd = str(tmp_path / "run")
    shutil.copytree(stage0_cached, wd)
    # The cache is one shard of ~4.4 KB per row, hundreds of rows: past 1 MB, which the
    # files written before it (metrics, the lock, XLA's compilation cache) stay under.
    with _FileSizeLimit(1_000_000), pytest.raises(faults.DiskFull) as e:
        train.run(cfg, wd, progress=False)  # stage 1 opens: its cache does not fit
    msg = str(e.value)
    shard = os.path.join(wd, "cache", "stage_1", "shard-00000.npy")
    assert f"no space left writing activation cache shard 1 of 1 at {shard}: it needed " in msg
    assert "The partial cache (" in msg and "was deleted" in msg, msg
    needed = int(re.search(r"it needed ([\d,]+) bytes", msg).group(1).replace(",", ""))
    assert needed > 1_000_000, msg
    assert os.listdir(os.path.join(wd, "cache")) == []  # no partial shard to be read later
    assert _steps(wd)[-1] == STEPS
    checkpoint.Checkpointer(wd, 3, create=False).check(STEPS)

    # No limit: the rerun builds the whole cache (every shard checked against its manifest's
    # size and sha256) and trains on from the last checkpoint.
    train.run(cfg, wd, max_steps=1, progress=False)
    reader = cache_store.open_cache(cache.cache_dir(wd, 1), verify=True)
    assert os.path.getsize(shard) == needed and reader.spec.shards() == 1
    assert _steps(wd)[-1] == STEPS + 1
    checkpoint.Checkpointer(wd, 3, create=False).check(STEPS + 1)


def test_a_full_disk_during_export_names_the_file_and_leaves_no_partial_export(
        reference, tmp_path):
    from safetensors.numpy import load_file

    from export import hf, mapping

    out = str(tmp_path / "hf")
    # The tokenizer and config files fit in 40 KB; the float32 weights (~56k parameters,
    # about 220 KB) do not.
    with _FileSizeLimit(40_000), pytest.raises(faults.DiskFull) as e:
        hf.export_run(reference["workdir"], out, progress=False)
    msg = str(e.value)
    weights = os.path.join(out, "model.safetensors")
    assert f"no space left writing model.safetensors at {weights}: it needed " in msg, msg
    assert "The partial export was deleted" in msg, msg
    needed = int(re.search(r"it needed ([\d,]+) bytes", msg).group(1).replace(",", ""))
    assert os.listdir(tmp_path) == []  # neither the target nor the temporary directory

    hf.export_run(reference["workdir"], out, progress=False)  # no limit
    assert os.path.getsize(weights) == needed
    cfg = checkpoint.read_config(reference["workdir"])
    tensors = load_file(weights)
    assert sorted(tensors) == sorted(t.hf_name for t in mapping.all_tensors(cfg.model))
    embed = [v for k, v in reference["params"].items() if "embed" in str(k)]
    assert len(embed) == 1 and np.array_equal(tensors["model.embed_tokens.weight"], embed[0])
