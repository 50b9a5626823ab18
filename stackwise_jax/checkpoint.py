"""Run directory layout, atomic writes and Orbax checkpoints.

RUN_DIR/
  config.json       the full config of the run (a rerun must match it)
  tokenizer/        the tokenizer the run was trained with
  params/           what finished phases stored, one directory per stack (store.py)
  checkpoints/N/    Orbax, only what the current phase changes: trainable (its trained
                    stacks, top groups or adapters), opt_state (with fp16's loss scale),
                    data (grain iterator state), meta
  metrics.jsonl     one line per logged step
  summary.json      written last: its presence means the run finished

meta holds {stage, step, global_step, done, stages: [...], stage_wall_s, stage_tokens}:
`stage`/`step` name the next step to run (`stage` counts phases, fusion included), so a
checkpoint saved at the end of a phase points at step 0 of the next one and holds no
parameters at all: what the phase trained is in its stores by then.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import ml_collections
import orbax.checkpoint as ocp

from stackwise_jax import config as config_lib
from stackwise_jax.errors import UserError
from stackwise_jax.workdir_lock import LOCK_NAME


def atomic_write_text(path: str, text: str) -> None:
    """Writes to a temp file in the same directory, then renames over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, _new_file_mode())  # mkstemp's 0600 would hide the file from the group
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(path: str) -> None:
    """Makes a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_usage(path: str) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def config_from_json(text: str) -> ml_collections.ConfigDict:
    raw = json.loads(text)
    cfg = config_lib.defaults()
    flat_defaults = config_lib._flat(cfg)

    def fill(node, values, prefix=""):
        for k, v in values.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                fill(node[k], v, key + ".")
            elif key in flat_defaults:
                node[k] = tuple(v) if isinstance(flat_defaults[key], tuple) else v
            else:
                raise UserError(f"config.json has unknown key '{key}'")

    fill(cfg, raw)
    return cfg


# Files that do not make a directory a run: the run lock, which a killed start may leave.
_NOT_A_RUN = (LOCK_NAME,)


def check_workdir(workdir: str, cfg) -> bool:
    """True when `workdir` holds a run of this exact config, False when it is new or empty.

    Raises UserError, writing nothing, when it holds a different config or other files.
    """
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = config_lib._flat(config_from_json(f.read()))
        new = config_lib._flat(cfg)
        changed = sorted(k for k in new if list(_aslist(old.get(k))) != list(_aslist(new[k])))
        if changed:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed[:4])
            raise UserError(f"--workdir={workdir} holds a run with a different config: "
                            f"{len(changed)} keys differ ({', '.join(changed)}); {details}. "
                            "Use a new --workdir, or rerun with the config the run started with.")
        return True
    if os.path.isdir(workdir) and [n for n in os.listdir(workdir) if n not in _NOT_A_RUN]:
        raise UserError(f"--workdir={workdir} exists, is not empty and holds no StackWise run "
                        "(no config.json); choose an empty or new directory")
    return False


def claim_workdir(workdir: str, cfg) -> bool:
    """check_workdir, then records the config of a new run. True for a resume."""
    if check_workdir(workdir, cfg):
        return True
    atomic_write_text(os.path.join(workdir, "config.json"), config_lib.to_json(cfg))
    return False


def _aslist(v):
    return v if isinstance(v, (list, tuple)) else [v]


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"'{workdir}' is not a StackWise run directory (no config.json)")
    with open(path) as f:
        return config_from_json(f.read())


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int, create: bool = True):
        """create=False for readers: a run without checkpoints/ is left as it is."""
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, global_step: int, meta: dict, data_state: dict, trainable=None,
             opt_state=None):
        """trainable and opt_state: the current phase's, mid-phase; None at a phase boundary."""
        items = dict(meta=ocp.args.JsonSave(meta), data=ocp.args.JsonSave(data_state))
        if trainable is not None:
            items["trainable"] = ocp.args.StandardSave(trainable)
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(global_step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()  # a checkpoint counts only once complete

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, trainable_like=None, opt_state_like=None):
        """Returns (data_state, trainable or None, opt_state or None) saved at `step`."""
        items = dict(data=ocp.args.JsonRestore())
        if trainable_like is not None:
            items["trainable"] = ocp.args.StandardRestore(_abstract(trainable_like))
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        trainable = restored.trainable if trainable_like is not None else None
        opt = restored.opt_state if opt_state_like is not None else None
        return restored.data, trainable, opt

    def close(self):
        self.manager.close()
