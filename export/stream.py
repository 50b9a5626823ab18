"""Streaming writes of safetensors files, and reading an HF directory's file index.

`ShardedWriter` never holds the whole model: it computes each file's header up front from
the shapes alone and writes each tensor's bytes to disk as soon as it has them (the export
reads them one stored array at a time from the run's parameter stores, stackwise_jax/run.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct

import ml_dtypes
import numpy as np

from stackwise_jax import faults
from stackwise_jax.errors import UserError

DTYPES = {"float32": (np.dtype(np.float32), "F32"),
          "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16")}
# What a write refused for lack of space leaves: export/dirs.py deletes the temporary
# directory, so the target stays as it was.
NO_SPACE_AFTER = ("The partial export was deleted; the --out directory is as it was. Free "
                  "space (or lift the limit) and rerun the same command")


# -------------------------------------------------------------------------- safetensors


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, '1000' -> 1000 (as HF reads them)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"--max_shard_size={text!r}: expected a size such as 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), match.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = "KMGT".find(unit[:1]) + 1 if unit else 0
    size = int(number * base ** power)
    if size < 1:
        raise UserError(f"--max_shard_size={text!r} must be positive")
    return size


def plan_shards(entries: list[tuple[str, tuple, int]], max_shard_size: int) -> list[list[str]]:
    """Groups (name, shape, nbytes) in order into shards of at most max_shard_size bytes
    (a tensor larger than that gets a shard of its own), as HF's save_pretrained does."""
    shards, current, size = [], [], 0
    for name, _, nbytes in entries:
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class _FileWriter:
    """One safetensors file: the header first (from shapes), then tensors in that order."""

    CHUNK_BYTES = 64 << 20  # transposes and casts go through buffers of at most this size

    def __init__(self, path: str, entries: list[tuple[str, tuple, int]], dtype: np.dtype,
                 code: str, shown_as: str | None = None):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, nbytes in entries:
            header[name] = {"dtype": code, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self.expected = [(name, tuple(shape)) for name, shape, _ in entries]
        self.dtype = dtype
        self.nbytes = 8 + len(raw) + offset  # the whole file, known before it is written
        self.shown_as = shown_as or path  # the path a user knows (not the temporary one)
        self.file = None
        with self._writing():
            self.file = open(path, "wb")
            self.file.write(struct.pack("<Q", len(raw)) + raw)

    @contextlib.contextmanager
    def _writing(self):
        """A write refused for lack of space: DiskFull naming the file and its full size;
        the file is closed (its buffer dropped), the caller deletes the directory."""
        try:
            with faults.writing(self.shown_as, self.nbytes, os.path.basename(self.shown_as),
                                NO_SPACE_AFTER):
                yield
        except faults.DiskFull:
            if self.file is not None:
                with contextlib.suppress(OSError):
                    self.file.close()  # flushes what is buffered, which fails again
            raise

    def write(self, name: str, array: np.ndarray) -> None:
        """Writes `array` (any layout, e.g. a transposed view) row block by row block."""
        want = self.expected.pop(0)
        if (name, tuple(array.shape)) != want:  # a bug in the caller, never user input
            raise AssertionError(f"writing {name} {array.shape}, header expects {want}")
        array = array.reshape(1) if array.ndim == 0 else array
        row_bytes = max(1, array[:1].size * self.dtype.itemsize)
        step = max(1, self.CHUNK_BYTES // row_bytes)
        for start in range(0, array.shape[0], step):
            block = np.ascontiguousarray(array[start:start + step], dtype=self.dtype)
            with self._writing():
                self.file.write(block.reshape(-1).view(np.uint8).data)

    def close(self) -> None:
        assert not self.expected, f"tensors never written: {self.expected}"
        with self._writing():
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()


class ShardedWriter:
    """Writes tensors, in the planned order, into model.safetensors or model-N-of-M shards."""

    def __init__(self, out_dir: str, tensors: list[tuple[str, tuple]], dtype: str,
                 max_shard_size: int, shown_as: str | None = None):
        self.np_dtype, self.code = DTYPES[dtype]
        item = self.np_dtype.itemsize
        entries = [(name, tuple(shape), int(np.prod(shape)) * item) for name, shape in tensors]
        sizes = {name: (shape, nbytes) for name, shape, nbytes in entries}
        shards = plan_shards(entries, max_shard_size)
        self.files = shard_file_names(len(shards))
        self.out_dir = out_dir
        self.shown_as = shown_as or out_dir  # named in messages: the final directory
        self.weight_map = {name: f for f, names in zip(self.files, shards) for name in names}
        self.total_size = sum(nbytes for _, _, nbytes in entries)
        self._plans = [[(n, *sizes[n]) for n in names] for names in shards]
        self._writer: _FileWriter | None = None
        self._index = -1

    def write(self, name: str, array: np.ndarray) -> None:
        while self._writer is None or not self._writer.expected:
            if self._writer is not None:
                self._writer.close()
            self._index += 1
            file = self.files[self._index]
            self._writer = _FileWriter(os.path.join(self.out_dir, file), self._plans[self._index],
                                       self.np_dtype, self.code,
                                       os.path.join(self.shown_as, file))
        self._writer.write(name, array)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        assert self._index == len(self.files) - 1, "not every shard was written"
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            text = json.dumps(index, indent=2, sort_keys=True)
            name = "model.safetensors.index.json"
            with faults.writing(os.path.join(self.shown_as, name), len(text.encode()), name,
                                NO_SPACE_AFTER):
                with open(os.path.join(self.out_dir, name), "w") as f:
                    f.write(text)


def safetensors_files(hf_dir: str) -> dict[str, str]:
    """{tensor name: file path} of an HF directory, sharded (index.json) or not."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    if os.path.isfile(single):
        from safetensors import safe_open
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise UserError(f"'{hf_dir}' holds no model.safetensors nor model.safetensors.index.json "
                    "(only safetensors checkpoints can be imported)")
