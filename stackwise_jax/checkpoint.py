"""Run directory layout, atomic writes and Orbax checkpoints.

RUN_DIR/
  config.json       the full config of the run (a rerun must match it)
  tokenizer/        the tokenizer the run was trained with
  params/           what finished phases stored, one directory per stack (store.py)
  checkpoints/N/    Orbax, only what the current phase changes: trainable (its trained
                    stacks, top groups or adapters), opt_state (with fp16's loss scale),
                    data (grain iterator state), meta; and checksums.json, written once
                    Orbax has committed the step: size and sha256 of every file in it
  checkpoints.damaged/N/  checkpoints found damaged on resume, set aside (never deleted)
  metrics.jsonl     one line per logged step
  summary.json      written last: its presence means the run finished

meta holds {stage, step, global_step, done, stages: [...], stage_wall_s, stage_tokens}:
`stage`/`step` name the next step to run (`stage` counts phases, fusion included), so a
checkpoint saved at the end of a phase points at step 0 of the next one and holds no
parameters at all: what the phase trained is in its stores by then.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import jax
import ml_collections
import orbax.checkpoint as ocp

from stackwise_jax import config as config_lib
from stackwise_jax import faults
from stackwise_jax.errors import UserError
from stackwise_jax.workdir_lock import LOCK_NAME

CHECKSUMS = "checksums.json"
_ORBAX_TMP = ".orbax-checkpoint-tmp"  # Orbax writes step N into N.orbax-checkpoint-tmp-*


def atomic_write_text(path: str, text: str) -> None:
    """Writes to a temp file in the same directory, then renames over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, _new_file_mode())  # mkstemp's 0600 would hide the file from the group
        with faults.writing(path, len(text.encode()), os.path.basename(path)):
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
    The mesh keys may differ: a run resumes on another mesh shape (config.json keeps the
    mesh it started on).

    Raises UserError, writing nothing, when it holds a different config or other files.
    """
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = config_lib._flat(config_from_json(f.read()))
        new = config_lib._flat(cfg)
        changed = sorted(k for k in new if k not in config_lib.MESH_KEYS
                         and list(_aslist(old.get(k))) != list(_aslist(new[k])))
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


def _nbytes(tree) -> int:
    return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree))


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: str) -> list[str]:
    """Paths under step_dir, relative to it, the checksum file aside."""
    out = []
    for dirpath, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), step_dir)
            if rel != CHECKSUMS:
                out.append(rel)
    return sorted(out)


def first_line(e: BaseException) -> str:
    """The first line of the innermost exception `e` wraps: TensorStore's own words
    (which file, which byte range), not Orbax's dump of the array spec around them."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


class Damage(UserError):
    """A checkpoint that cannot be used: step, item and path, and why."""

    def __init__(self, step: int, item: str, path: str, why: str):
        self.step, self.item, self.path, self.why = step, item, path, why
        super().__init__(f"checkpoint {step}: {item} at {path} is {why}")


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int, create: bool = True,
                 clean: bool = True):
        """create=False for readers: a run without checkpoints/ is left as it is (and so
        are Orbax's leftovers, which only a writer cleans up). clean=False: a writer that
        leaves the cleaning to another process (process 0 of a multi-process run)."""
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if create and clean:
            self.remove_unfinished()
        self.manager = ocp.CheckpointManager(
            self.directory,
            # Synchronous: the save has finished writing when it returns, so nothing reads
            # the state while the next (donating) step runs, and its errors reach us here.
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                                 enable_async_checkpointing=False))

    def remove_unfinished(self) -> list[str]:
        """Deletes what an interrupted or failed save left (Orbax's temporary step
        directories): never complete, never read. Returns their names."""
        if not os.path.isdir(self.directory):
            return []
        stale = sorted(n for n in os.listdir(self.directory) if _ORBAX_TMP in n)
        for name in stale:
            shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        return stale

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, global_step: int, meta: dict, data_state: dict, trainable=None,
             opt_state=None):
        """trainable and opt_state: the current phase's, mid-phase; None at a phase boundary.

        The checkpoint counts once its checksums are on disk; a save that fails for lack of
        space raises faults.DiskFull and leaves the earlier checkpoints as they were."""
        items = dict(meta=ocp.args.JsonSave(meta), data=ocp.args.JsonSave(data_state))
        if trainable is not None:
            items["trainable"] = ocp.args.StandardSave(trainable)
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        needed = _nbytes(trainable) + _nbytes(opt_state) + len(json.dumps([meta, data_state]))
        target = self.step_dir(global_step)
        full = False
        with faults.quiet_orbax():
            try:
                self.manager.save(global_step, args=ocp.args.Composite(**items), force=True)
                self.manager.wait_until_finished()
            except Exception as e:
                if not faults.is_disk_full(e):
                    raise
                full = True  # raised below, once Orbax's failed tasks are gone
                self.manager.close()  # stops its helper threads while their errors are quiet
        if full:
            raise faults.disk_full(target, needed, f"checkpoint {global_step}")
        if jax.process_index() != 0:  # Orbax wrote it together; process 0 seals it
            return
        sums = {rel: {"bytes": os.path.getsize(os.path.join(target, rel)),
                      "sha256": _digest(os.path.join(target, rel))} for rel in _files(target)}
        atomic_write_text(os.path.join(target, CHECKSUMS), json.dumps(sums, indent=1))

    def check(self, step: int) -> None:
        """Raises Damage naming the first file of checkpoint `step` that is missing,
        truncated or altered since it was saved. A checkpoint saved before checksums
        existed (or whose save stopped right before them) is left to `restore`'s checks."""
        target = self.step_dir(step)
        path = os.path.join(target, CHECKSUMS)
        if not os.path.exists(path):
            return
        try:
            with open(path) as f:
                sums = json.load(f)
            assert isinstance(sums, dict) and sums
        except (OSError, ValueError, AssertionError):
            raise Damage(step, "checksums", path, "unreadable (not the JSON it was saved as)")
        for rel, want in sorted(sums.items()):
            file = os.path.join(target, rel)
            item = rel.split(os.sep)[0]
            if not os.path.isfile(file):
                raise Damage(step, item, file, "missing")
            size = os.path.getsize(file)
            if size != want["bytes"]:
                raise Damage(step, item, file, f"truncated or altered ({size} bytes, saved "
                             f"with {want['bytes']})")
            if _digest(file) != want["sha256"]:
                raise Damage(step, item, file, "corrupted (checksum mismatch)")

    def set_aside(self, steps: list[int]) -> str:
        """Moves damaged checkpoints out of Orbax's directory (a later save of the same
        step must not find them, nor a resume) into checkpoints.damaged/; deletes nothing."""
        aside = self.directory + ".damaged"
        for step in steps:
            os.makedirs(aside, exist_ok=True)
            dest, n = os.path.join(aside, str(step)), 1
            while os.path.exists(dest):
                dest, n = os.path.join(aside, f"{step}.{n}"), n + 1
            os.rename(self.step_dir(step), dest)
        if steps:
            self.manager.reload()
        return aside

    def meta(self, step: int) -> dict:
        with faults.quiet_orbax():
            args = ocp.args.Composite(meta=ocp.args.JsonRestore())
            return self.manager.restore(step, args=args).meta

    def restore(self, step: int, trainable_like=None, opt_state_like=None):
        """Returns (data_state, trainable or None, opt_state or None) saved at `step`.
        One item at a time, so an unreadable one is named: Damage(step, item, path)."""
        wanted = dict(data=ocp.args.JsonRestore())
        if trainable_like is not None:
            wanted["trainable"] = ocp.args.StandardRestore(_abstract(trainable_like))
        if opt_state_like is not None:
            wanted["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
        out = {}
        for item, args in wanted.items():
            path = os.path.join(self.step_dir(step), item)
            if not os.path.isdir(path):
                raise Damage(step, item, path, "missing")
            try:
                with faults.quiet_orbax():
                    out[item] = getattr(self.manager.restore(
                        step, args=ocp.args.Composite(**{item: args})), item)
            except Exception as e:  # noqa: BLE001 - whatever Orbax raises, the item is bad
                raise Damage(step, item, path, f"unreadable ({first_line(e)})") from None
        return out["data"], out.get("trainable"), out.get("opt_state")

    def close(self):
        self.manager.close()
