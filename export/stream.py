"""Streaming writes of safetensors files, and reading an HF directory's file index.

`ShardedWriter` never holds the whole model: it computes each file's header up front from
the shapes alone and writes each tensor's bytes to disk as soon as it has them (the export
reads them one stored array at a time from the run's parameter stores, stackwise_jax/run.py).
"""

from __future__ import annotations

import json
import os
import re
import struct

import ml_dtypes
import numpy as np

from stackwise_jax.errors import UserError

DTYPES = {"float32": (np.dtype(np.float32), "F32"),
          "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16")}


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
                 code: str):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, nbytes in entries:
            header[name] = {"dtype": code, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self.expected = [(name, tuple(shape)) for name, shape, _ in entries]
        self.dtype = dtype
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

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
            self.file.write(block.reshape(-1).view(np.uint8).data)

    def close(self) -> None:
        assert not self.expected, f"tensors never written: {self.expected}"
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


class ShardedWriter:
    """Writes tensors, in the planned order, into model.safetensors or model-N-of-M shards."""

    def __init__(self, out_dir: str, tensors: list[tuple[str, tuple]], dtype: str,
                 max_shard_size: int):
        self.np_dtype, self.code = DTYPES[dtype]
        item = self.np_dtype.itemsize
        entries = [(name, tuple(shape), int(np.prod(shape)) * item) for name, shape in tensors]
        sizes = {name: (shape, nbytes) for name, shape, nbytes in entries}
        shards = plan_shards(entries, max_shard_size)
        self.files = shard_file_names(len(shards))
        self.out_dir = out_dir
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
            self._writer = _FileWriter(os.path.join(self.out_dir, self.files[self._index]),
                                       self._plans[self._index], self.np_dtype, self.code)
        self._writer.write(name, array)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        assert self._index == len(self.files) - 1, "not every shard was written"
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)


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
