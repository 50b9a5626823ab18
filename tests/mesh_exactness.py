"""A progressive run of the small test config on one device and on three 8-device meshes,
and a resume onto a different mesh; prints one JSON line of what tests/test_mesh.py checks.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_exactness.py WORKDIR [RUN ...]

(needs 8 devices: on a CPU, that flag simulates them). RUN: some of one_device,
data2_fsdp2_tensor2, fsdp8, data8, resumed (default: all, then the parameter differences).
Every run trains the same config (only mesh.* differs) in WORKDIR/RUN; the corpus is
generated in WORKDIR. XLA's persistent cache in WORKDIR/xla_cache lets a resumed run, or a
second process, reuse the programs a mesh compiled before.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import generated_text, small_config  # noqa: E402
from stackwise_jax import store, train  # noqa: E402

MESHES = {"data2_fsdp2_tensor2": (2, 2, 2), "fsdp8": (1, 8, 1), "data8": (8, 1, 1)}
STEPS = 4  # per stage; the resume stops in stage 2 after RESUME_AT of them


def config(corpus: str, shape=(1, 1, 1)):
    return small_config(corpus, **{
        "data.batch_size": 8,  # rows split over data x fsdp = 8 devices
        "training.steps_per_stage": STEPS, "checkpoint.every_steps": 100,
        "eval.mask_ratios": (0.5,),
        "mesh.data": shape[0], "mesh.fsdp": shape[1], "mesh.tensor": shape[2]})


def final_params(workdir: str, version: int) -> dict:
    """Every stored array of the finished run, by group and name."""
    out = {}
    for group in sorted(os.listdir(store.root(workdir))):
        tree = store.require(workdir, group, version, "the comparison").tree()
        out.update({f"{group}.{k}": v for k, v in store.flatten(tree).items()})
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def layouts_seen():
    """Wraps Trainer.open to record the PartitionSpecs of what each phase holds."""
    seen = []
    original = train.Trainer.open

    def open_(self, phase, *args):
        run = original(self, phase, *args)
        q = run.trainable["stacks"][0]["blocks"]["attn"]["q_proj"]["kernel"]
        record = {"phase": phase.index, "mesh": dict(self.layout.mesh.shape),
                  "q_proj": str(q.sharding.spec),
                  "q_proj_shard": list(q.addressable_shards[0].data.shape),
                  "down_proj": str(run.trainable["stacks"][0]["blocks"]["mlp"]["down_proj"]
                                   ["kernel"].sharding.spec)}
        if "trunk" in run.frozen:
            record["trunk_q_proj"] = str(run.frozen["trunk"]["attn"]["q_proj"]["kernel"]
                                         .sharding.spec)
        seen.append(record)
        return run

    train.Trainer.open = open_
    return seen


def write_corpus(corpus: str) -> None:
    os.makedirs(corpus, exist_ok=True)
    texts = {f"book{i}.txt": generated_text(400, seed=i) for i in range(3)}
    texts["heldout.txt"] = generated_text(150, seed=99)
    for name, text in texts.items():
        tmp = os.path.join(corpus, f".{name}.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(corpus, name))  # two processes may write it at once


def param_diffs(root: str, names) -> dict:
    """Largest |difference| of every run's final parameters from the one-device run's."""
    reference = final_params(os.path.join(root, "one_device"), 2)
    return {name: max_diff(reference, final_params(os.path.join(root, name), 2))
            for name in names}


RUNS = ("one_device",) + tuple(MESHES) + ("resumed",)


def main(root: str, names=RUNS):
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    corpus = os.path.join(root, "corpus")
    write_corpus(corpus)
    seen = layouts_seen()
    result = {"devices": jax.device_count(), "runs": {}, "wall_s": {}, "cpu_s": {}}

    def cpu_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def run(name, shape, devices=None, **kw):
        start, cpu = time.perf_counter(), cpu_s()
        summary = train.run(config(corpus, shape), os.path.join(root, name), progress=False,
                            devices=devices, **kw)
        result["wall_s"][name] = round(result["wall_s"].get(name, 0) + time.perf_counter()
                                       - start, 2)
        result["cpu_s"][name] = round(result["cpu_s"].get(name, 0) + cpu_s() - cpu, 2)
        return summary

    def record(name, summary):
        result["runs"][name] = {
            "heldout_loss": summary["heldout_loss"]["0.5"],
            "heldout_causal_loss": summary["heldout_causal_loss"],
            "stage_losses": [s["heldout_loss_t0.5"] for s in summary["stages"]]}

    for name in names:
        if name == "one_device":
            record(name, run(name, (1, 1, 1), devices=jax.devices()[:1]))
        elif name == "resumed":
            # Stopped in stage 2 on data 2 x fsdp 2 x tensor 2 (a checkpoint of state split
            # over all three axes), resumed on data 8 (the same state, replicated).
            run("resumed", MESHES["data2_fsdp2_tensor2"], max_steps=STEPS + 2)
            record(name, run(name, MESHES["data8"]))
        else:
            record(name, run(name, MESHES[name]))
    result["layouts"] = seen
    if tuple(names) == RUNS:
        result["param_max_abs_diff"] = param_diffs(root, RUNS[1:])
        shutil.rmtree(os.path.join(root, "xla_cache"), ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], tuple(sys.argv[2:]) or RUNS)
