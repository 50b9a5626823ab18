"""Parameter stores: what a finished phase leaves behind, one directory per parameter group.

    RUN_DIR/params/<group>/v<NNNNN>/    group: embed, final_norm, head, stack_00003, ...
        <leaf>.npy       one file per array (its path in the group's tree, joined by '.'):
                         float32, or bfloat16 stored as its uint16 bit pattern
        manifest.json    written last: group, version, dtype, per leaf shape, bytes, sha256

A store is written into `v<N>.partial/` and renamed to `v<N>/` only once its manifest is
on disk, so a directory without `.partial` always holds a complete store; a `.partial` is
never read and is deleted by the next write or `collect_garbage`.

Version v counts the phases that had finished when the store was written: stage k writes
v = k + 1, an HF import writes v = 0. Phase p reads, for each group, the newest version
v <= p. Its own writes (v = p + 1) are invisible to it, so a phase that reruns after a
crash between writing its stores and its end-of-phase checkpoint reads the same inputs
again. In a progressive run a stack is written exactly once, by the stage that trained it;
the head and final norm, which train in every stage, get a new version per stage and the
older one is deleted once a later checkpoint no longer needs it.

Reads are per leaf (`Store.read`): a 70B trunk is assembled, evaluated or exported one
array at a time, never as a whole tree. Each read checks the leaf's size and sha256
against the manifest, so a truncated or corrupted store names itself and stops the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil

import ml_dtypes
import numpy as np

from stackwise_jax import distributed, faults, sharding
from stackwise_jax.checkpoint import atomic_write_text, disk_usage, fsync_dir
from stackwise_jax.errors import UserError

FORMAT = "stackwise-param-store"
MANIFEST = "manifest.json"
DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}
_BITS = {"fp32": np.dtype(np.float32), "bf16": np.dtype(np.uint16)}  # what the .npy holds
TOP_GROUPS = ("embed", "final_norm", "head")
_VERSION = re.compile(r"^v(\d{5})$")
_NO_WAY_ON = ("Nothing reads this run until they are back (they are never replaced by random "
              "weights): restore the directory from a backup, or start the run again in a new "
              "--workdir")


def stack_group(k: int) -> str:
    return f"stack_{k:05d}"


def describe(group: str) -> str:
    """'stack 3' / 'the embedding' etc., for messages."""
    if group.startswith("stack_"):
        return f"stack {int(group[6:])}"
    return {"embed": "the embedding", "final_norm": "the final norm", "head": "the head"}[group]


def root(run_dir: str) -> str:
    return os.path.join(run_dir, "params")


def _dir(run_dir: str, group: str, version: int) -> str:
    return os.path.join(root(run_dir), group, f"v{version:05d}")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'blocks.attn.q_proj.kernel': leaf, ...}: the names a store's files carry."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def unflatten(flat: dict) -> dict:
    """Inverse of flatten (numeric keys, such as stack indices, become ints)."""
    tree: dict = {}
    for name, v in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(leaf) if leaf.isdigit() else leaf] = v
    return tree


# ------------------------------------------------------------------------------ writing


def write(run_dir: str, group: str, version: int, tree: dict, dtype: str = "fp32") -> str:
    """Writes `tree` (nested dict of jax or numpy arrays) as the store group@version.

    Leaves are copied to the host one at a time, so a tree on an accelerator never needs
    a host copy of more than one array. An existing complete store of the same version
    (a phase rerun after a crash) is replaced.

    Several processes: each gathers every leaf (a collective all of them must join), process
    0 alone writes, and all return once the store is complete on disk."""
    if dtype not in DTYPES:
        raise ValueError(f"store dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    target = _dir(run_dir, group, version)
    if not distributed.is_primary():
        for value in flatten(tree).values():
            sharding.to_host(value)  # process 0's gather needs this process's shards
        distributed.barrier(f"stackwise: store {group}@{version}")
        return target
    partial = target + ".partial"
    flat = flatten(tree)
    itemsize = 2 if dtype == "bf16" else 4
    needed = sum(int(np.prod(np.shape(v))) * itemsize + 128 for v in flat.values())  # + headers
    with faults.writing(partial, needed, f"the stored parameters of {describe(group)}"):
        leaves = _write_leaves(partial, flat, dtype)
    manifest = {"format": FORMAT, "group": group, "version": version, "dtype": dtype,
                "leaves": leaves}
    atomic_write_text(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1))
    fsync_dir(partial)
    if os.path.isdir(target):
        shutil.rmtree(target)
    os.rename(partial, target)
    fsync_dir(os.path.dirname(target))
    distributed.barrier(f"stackwise: store {group}@{version}")
    return target


def _write_leaves(partial: str, flat: dict, dtype: str) -> dict:
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    leaves = {}
    for name, value in flat.items():
        # A sharded array is gathered whole to the host here: one array at a time, so the
        # host holds one leaf (at 70B, one stacked kernel: about 1 GiB per block in
        # float32), and every device's shard crosses to host memory once. Fine at the
        # scale this writes (one stack per phase); a per-shard writer (each process its
        # own shards, as Orbax does) would avoid the gather.
        array = sharding.to_host(value)
        if dtype == "bf16":
            array = array.astype(ml_dtypes.bfloat16).view(np.uint16)
        else:
            array = array.astype(np.float32, copy=False)
        path = os.path.join(partial, name + ".npy")
        with open(path, "wb") as f:
            hashing = _HashingWriter(f)  # hashed as written: no second pass over the file
            np.lib.format.write_array(hashing, np.ascontiguousarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        digest = hashing.digest.hexdigest()
        leaves[name] = {"shape": list(array.shape), "bytes": os.path.getsize(path),
                        "sha256": digest}
        del array
    return leaves


class _HashingWriter:
    """A file wrapper that hashes what passes through (np.save then writes in 16 MiB chunks)."""

    def __init__(self, file):
        self.file, self.digest = file, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)


# ------------------------------------------------------------------------------ reading


def versions(run_dir: str, group: str) -> list[int]:
    """Versions of `group` with a complete directory (a `.partial` is not one)."""
    directory = os.path.join(root(run_dir), group)
    if not os.path.isdir(directory):
        return []
    found = (_VERSION.match(name) for name in os.listdir(directory))
    return sorted(int(m.group(1)) for m in found if m)


def newest(run_dir: str, group: str, max_version: int) -> int | None:
    """The newest version of `group` that is <= max_version, or None."""
    ok = [v for v in versions(run_dir, group) if v <= max_version]
    return ok[-1] if ok else None


@dataclasses.dataclass
class Store:
    """One complete store: its manifest, and per-leaf reads checked against it."""

    path: str
    group: str
    version: int
    dtype: str
    leaves: dict  # name -> {"shape", "bytes", "sha256"}

    def _bad(self, why: str) -> UserError:
        return UserError(f"the stored parameters of {describe(self.group)} at {self.path} are "
                         f"{why}. {_NO_WAY_ON}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.leaves[name]["shape"])

    def read(self, name: str, verify: bool = True) -> np.ndarray:
        """Leaf `name` as float32 or ml_dtypes.bfloat16, memory-mapped (read lazily) unless
        verify is True, which reads it once to check its checksum."""
        meta = self.leaves.get(name)
        if meta is None:
            raise self._bad(f"missing the array '{name}'")
        file = os.path.join(self.path, name + ".npy")
        if not os.path.isfile(file):
            raise self._bad(f"missing the file {os.path.basename(file)}")
        size = os.path.getsize(file)
        if size != meta["bytes"]:
            raise self._bad(f"truncated or altered ({os.path.basename(file)}: {size} bytes, "
                            f"expected {meta['bytes']})")
        if verify:
            with open(file, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != meta["sha256"]:
                    raise self._bad(f"corrupted ({os.path.basename(file)}: checksum mismatch)")
        try:
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise self._bad(f"unreadable ({os.path.basename(file)}: {e})") from None
        if array.dtype != _BITS[self.dtype] or list(array.shape) != meta["shape"]:
            raise self._bad(f"inconsistent ({os.path.basename(file)} holds {array.dtype} "
                            f"{array.shape}, the manifest says {self.dtype} {meta['shape']})")
        return array.view(DTYPES[self.dtype]) if self.dtype == "bf16" else array

    def tree(self, verify: bool = True) -> dict:
        """Every leaf, as a nested dict of (memory-mapped) numpy arrays."""
        return unflatten({name: self.read(name, verify) for name in self.leaves})

    def nbytes(self) -> int:
        return sum(m["bytes"] for m in self.leaves.values())


def open_store(run_dir: str, group: str, version: int) -> Store:
    path = _dir(run_dir, group, version)
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        ok = (manifest.get("format") == FORMAT and manifest.get("group") == group
              and manifest.get("version") == version
              and manifest.get("dtype") in DTYPES and isinstance(manifest.get("leaves"), dict))
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"the stored parameters of {describe(group)} at {path} have no readable "
                        f"manifest (missing, truncated or of another format). {_NO_WAY_ON}")
    return Store(path, group, version, manifest["dtype"], manifest["leaves"])


def require(run_dir: str, group: str, max_version: int, why: str) -> Store:
    """The newest store of `group` with version <= max_version; a clear error if none."""
    version = newest(run_dir, group, max_version)
    if version is None:
        raise UserError(f"{run_dir}: the stored parameters of {describe(group)} are missing "
                        f"(no complete {os.path.join(root(run_dir), group, 'v*')} written by "
                        f"phase {max_version - 1} or earlier); {why} needs them. {_NO_WAY_ON}")
    return open_store(run_dir, group, version)


def damaged(run_dir: str, max_version: int) -> list[str]:
    """Every store a run resuming at phase `max_version` reads (per group, the newest
    version <= max_version) whose manifest is unreadable or whose files are missing or
    of the wrong size, one line each. Cheap (no file is read but the manifests); the
    checksums are checked as each array is read."""
    problems = []
    base = root(run_dir)
    for group in sorted(os.listdir(base)) if os.path.isdir(base) else ():
        version = newest(run_dir, group, max_version)
        if version is None:
            continue
        try:
            s = open_store(run_dir, group, version)
        except UserError:
            problems.append(f"{describe(group)}: {os.path.join(_dir(run_dir, group, version), MANIFEST)}"
                            " is missing or unreadable")
            continue
        for name, meta in sorted(s.leaves.items()):
            file = os.path.join(s.path, name + ".npy")
            size = os.path.getsize(file) if os.path.isfile(file) else None
            if size != meta["bytes"]:
                why = ("missing" if size is None else
                       f"{'truncated' if size < meta['bytes'] else 'too long'}: {size} bytes, "
                       f"expected {meta['bytes']}")
                problems.append(f"{describe(group)}: {file} is {why}")
    return problems


def require_intact(run_dir: str, max_version: int) -> None:
    """Raises one UserError naming every damaged store a resume at `max_version` needs;
    deletes nothing."""
    problems = damaged(run_dir, max_version)
    if problems:
        raise UserError(f"{run_dir}: {len(problems)} stored parameter file(s) are damaged: "
                        f"{'; '.join(problems)}. Nothing was changed or deleted. {_NO_WAY_ON}")


def collect_garbage(run_dir: str, current_phase: int) -> int:
    """Deletes, per group, the versions older than the newest one <= current_phase (no
    phase from current_phase on reads them) and any leftover `.partial`. Returns bytes freed."""
    freed = 0
    base = root(run_dir)
    if not os.path.isdir(base):
        return 0
    for group in sorted(os.listdir(base)):
        keep = newest(run_dir, group, current_phase)
        directory = os.path.join(base, group)
        for name in os.listdir(directory):
            m = _VERSION.match(name)
            stale = name.endswith(".partial") or (m and keep is not None
                                                  and int(m.group(1)) < keep)
            if stale:
                path = os.path.join(directory, name)
                freed += disk_usage(path)
                shutil.rmtree(path, ignore_errors=True)
    return freed


def disk_bytes(run_dir: str) -> int:
    """Bytes of every store in the run (all groups and versions)."""
    return disk_usage(root(run_dir))
