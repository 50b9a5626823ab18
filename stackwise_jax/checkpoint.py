"""Run directory layout, atomic writes and Orbax checkpoints.

RUN_DIR/
  config.json       the full config of the run (a rerun must match it)
  tokenizer/        the tokenizer the run was trained with
  checkpoints/N/    Orbax: params (nested dict), opt_state, data (grain iterator state), meta
  metrics.jsonl     one line per logged step
  summary.json      written last: its presence means the run finished

meta holds {stage, step, global_step, done, stages: [...], stage_wall_s, stage_tokens}:
`stage`/`step` name the next step to run, so a checkpoint saved at the end of a stage
points at step 0 of the next one and carries no optimizer state.
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


def atomic_write_text(path: str, text: str) -> None:
    """Writes to a temp file in the same directory, then renames over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    if os.path.isdir(workdir) and os.listdir(workdir):
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

    def save(self, global_step: int, params, meta: dict, data_state: dict, opt_state=None,
             adapters=None):
        """adapters: the LoRA adapters while fusion runs (params hold the unmerged Rack)."""
        items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta),
                     data=ocp.args.JsonSave(data_state))
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if adapters is not None:
            items["adapters"] = ocp.args.StandardSave(adapters)
        self.manager.save(global_step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()  # a checkpoint counts only once complete

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, params_like, opt_state_like=None, adapters_like=None):
        """Returns (params, data_state, opt_state or None, adapters or None) saved at `step`."""
        items = dict(params=ocp.args.StandardRestore(_abstract(params_like)),
                     data=ocp.args.JsonRestore())
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
        if adapters_like is not None:
            items["adapters"] = ocp.args.StandardRestore(_abstract(adapters_like))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        opt = restored.opt_state if opt_state_like is not None else None
        adapters = restored.adapters if adapters_like is not None else None
        return restored.params, restored.data, opt, adapters

    def close(self):
        self.manager.close()
