"""On-disk activation cache: what stage k+1 reads instead of running the frozen trunk.

Format: plain .npy shards of fixed-size records, memory-mapped for reading. A sequential
append + random row reads is exactly what np.load(mmap_mode='r') + fancy indexing does at
page-cache speed, with no extra dependency; Orbax/TensorStore adds chunking, async and a
metadata layer we would not use, and makes a row read a chunk decode.

DIR/
  shard-00000.npy   1-D array of records, one record per row (rows [0, rows_per_shard))
  ...               record fields, in this order (4-byte fields first, bool last):
                      t () f32, inputs (L,) i32, targets (L,) i32,
                      hidden_scale (L,) f32 (fp8 only), hidden (L, D), masked (L,) bool
  manifest.json     written last: spec, meta, per-shard file, row range, bytes, sha256

A row is one contiguous record, so a random row read is one contiguous read. hidden is
stored raw: fp32 as float32, bf16 as the uint16 bits of ml_dtypes.bfloat16, fp8 as the
uint8 bits of float8_e4m3fn (np.save would write ml_dtypes arrays as opaque 'V2'/'V1').
The writer fills DIR.partial and renames it to DIR on finalize, so DIR with a manifest
always means a complete cache; a .partial is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import threading

import ml_dtypes
import numpy as np
from tqdm import tqdm

from stackwise_jax import faults
from stackwise_jax.checkpoint import atomic_write_text, fsync_dir
from stackwise_jax.config import CACHE_DTYPES
from stackwise_jax.errors import UserError

DTYPES = CACHE_DTYPES  # the one list, in config.py
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_STORAGE = {"fp32": np.float32, "bf16": np.uint16, "fp8": np.uint8}
_DECODE = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp8": ml_dtypes.float8_e4m3fn}
_REBUILD = "rerun with --rebuild_cache to regenerate it"


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    n_rows: int
    seq_len: int
    d_model: int
    dtype: str
    rows_per_shard: int

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"cache dtype {self.dtype!r} is not one of {DTYPES}")
        for name in ("n_rows", "seq_len", "d_model", "rows_per_shard"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CacheSpec.{name} must be positive, got {getattr(self, name)}")

    def record_dtype(self) -> np.dtype:
        L, D = self.seq_len, self.d_model
        fields = [("t", "<f4"), ("inputs", "<i4", (L,)), ("targets", "<i4", (L,))]
        if self.dtype == "fp8":
            fields.append(("hidden_scale", "<f4", (L,)))
        fields += [("hidden", _STORAGE[self.dtype], (L, D)), ("masked", "?", (L,))]
        return np.dtype(fields)

    def bytes_per_row(self) -> int:
        return self.record_dtype().itemsize

    def shards(self) -> int:
        return -(-self.n_rows // self.rows_per_shard)

    def shard_rows(self, s: int) -> tuple[int, int]:
        start = s * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.n_rows)

    def total_bytes(self) -> int:
        """Exact size of all shard files (npy headers included); manifest.json not counted."""
        def shard_bytes(rows):
            return len(_npy_header(self, rows)) + rows * self.bytes_per_row()
        a, b = self.shard_rows(self.shards() - 1)
        return (self.shards() - 1) * shard_bytes(self.rows_per_shard) + shard_bytes(b - a)


def _npy_header(spec: CacheSpec, rows: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {
        "descr": np.lib.format.dtype_to_descr(spec.record_dtype()),
        "fortran_order": False, "shape": (rows,)})
    return buf.getvalue()


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.npy"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


# ------------------------------------------------------------------ fp8 quantisation

def quantize_fp8(x) -> tuple[np.ndarray, np.ndarray]:
    """x (..., D) float -> (q (..., D) float8_e4m3fn, scale (...,) float32), scale = max|x|/448.

    One scale per vector (per token) so a token's largest entry maps to the e4m3 maximum.
    Error per element: |x - q*scale| <= 2^-4 |x| + 2^-10 scale (3 mantissa bits round to
    half a spacing, relative 2^-4 for normals; below 2^-6 the subnormal spacing 2^-9
    gives 2^-10 absolute), plus float32 rounding (~2^-23 relative).
    """
    x = np.asarray(x, dtype=np.float32)
    flat = x.reshape(-1, x.shape[-1])
    q = np.empty(flat.shape, np.uint8)
    scale = np.empty(len(flat), np.float32)
    # Chunks of ~64K elements keep the temporaries small (cache-resident, reused by
    # malloc): 5x faster than whole arrays, whose fresh multi-MB temporaries cost more in
    # page faults than in arithmetic.
    step = max(1, (1 << 16) // flat.shape[1])
    for i in range(0, len(flat), step):
        xc = flat[i:i + step]
        sc = scale[i:i + step] = np.max(np.abs(xc), axis=-1) / np.float32(FP8_MAX)
        safe = np.where(sc > 0, sc, np.float32(1))  # an all-zero vector stays zero
        q[i:i + step] = _fp8_bits(xc / safe[:, None])
    return q.reshape(x.shape).view(ml_dtypes.float8_e4m3fn), scale.reshape(x.shape[:-1])


def _fp8_bits(y: np.ndarray) -> np.ndarray:
    """float32 -> float8_e4m3fn bits, round to nearest even: the same bits as
    y.astype(float8_e4m3fn) (tested), ~5x faster than ml_dtypes' scalar loop."""
    bits = np.ascontiguousarray(y, dtype=np.float32).view(np.uint32)
    a = bits & np.uint32(0x7FFFFFFF)
    # Normals: round the 23-bit mantissa to 3 bits (ties to even); the top bits of the
    # rounded float32 are then exponent|mantissa, rebiased from 127 to 7 (120 << 3 = 960).
    rounded = a + np.uint32(0x7FFFF) + ((a >> 20) & np.uint32(1))
    code = ((rounded >> 20) - np.uint32(960)).astype(np.uint8)
    small = a < np.uint32(0x3C800000)  # |y| < 2^-6: subnormal, a multiple of 2^-9
    code[small] = np.rint(a[small].view(np.float32) * np.float32(512)).astype(np.uint8)
    code[a > np.uint32(0x43E80000)] = 0x7F  # beyond 464 (and inf, nan): e4m3fn's NaN
    return code | ((bits >> 24).astype(np.uint8) & np.uint8(0x80))


# float8_e4m3fn bits -> float32: a table lookup is ~4x faster than ml_dtypes' astype.
_FP8_TO_F32 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def dequantize_fp8(q, scale) -> np.ndarray:
    bits = np.asarray(q).view(np.uint8)
    return np.take(_FP8_TO_F32, bits) * np.asarray(scale, np.float32)[..., None]


# ------------------------------------------------------------------ disk space

def _free_bytes(path: str) -> int:
    """Free bytes on the filesystem holding `path` (tests monkeypatch this)."""
    return shutil.disk_usage(path).free


def _manifest_allowance(spec: CacheSpec) -> int:
    return 4096 + 512 * spec.shards()


def check_space(directory: str, spec: CacheSpec) -> None:
    """Prints what the cache needs; raises UserError if the disk cannot hold it."""
    directory = os.path.abspath(directory)
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    needed = spec.total_bytes() + _manifest_allowance(spec)
    # An older complete DIR is not counted as free: it stays until the new one replaces it.
    free = _free_bytes(existing)
    print(f"activation cache: {spec.n_rows} rows, {_gib(needed)} needed ({_gib(free)} free) "
          f"at {directory}", flush=True)
    if needed > free:
        raise UserError(
            f"not enough disk space for the activation cache at {directory}: it needs "
            f"{needed} bytes ({_gib(needed)}) and {free} bytes ({_gib(free)}) are free. Use "
            "training.progressive.cache_dtype='fp8' (or 'bf16'), fewer cache_views, or put "
            "the cache on another disk.")


# ------------------------------------------------------------------ writer

class CacheWriter:
    """Appends rows into DIR.partial; finalize() writes the manifest and renames it to DIR.

        with CacheWriter(directory, spec, meta={...}) as w:
            for batch in ...:
                w.write(batch)    # finalize() runs on a clean exit

    batch: hidden (B, L, D) float (or, for fp8, already float8_e4m3fn plus hidden_scale
    (B, L)), inputs/targets (B, L) int, masked (B, L) bool, t (B,) float. An exception
    inside the block deletes DIR.partial and leaves an older DIR untouched.
    """

    def __init__(self, directory: str, spec: CacheSpec, meta: dict | None = None):
        self.directory = os.path.abspath(directory)
        self.partial = self.directory + ".partial"
        self.spec, self.meta = spec, dict(meta or {})
        self._dtype = spec.record_dtype()
        self._rows = 0            # rows written so far
        self._file = self._hash = None
        self._shard = -1
        self._shards: list[dict] = []
        self._done = False
        shutil.rmtree(self.partial, ignore_errors=True)
        check_space(self.directory, spec)
        os.makedirs(self.partial)
        self._bar = tqdm(total=spec.n_rows, unit="row", desc="activation cache",
                         disable=not sys.stderr.isatty())

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._done:
            try:
                self.finalize()
            except BaseException:
                self.abort()
                raise
        return False

    def write(self, batch: dict) -> None:
        if self._done:
            raise RuntimeError(f"activation cache {self.directory}: write after finalize/abort")
        try:
            records = self._records(batch)
            offset = 0
            while offset < len(records):
                if self._file is None:
                    self._open_shard(self._shard + 1)
                end = self.spec.shard_rows(self._shard)[1]
                take = min(len(records) - offset, end - self._rows)
                chunk = records[offset:offset + take].view(np.uint8)
                self._file.write(chunk)
                self._hash.update(chunk)  # hash as we write: no second pass over the data
                self._rows += take
                offset += take
                self._bar.update(take)
                if self._rows == end:
                    self._close_shard()
        except OSError as e:
            self._disk_full(e, self._shard)
            raise

    def finalize(self) -> None:
        if self._done:
            return
        if self._rows != self.spec.n_rows:
            raise RuntimeError(f"activation cache {self.directory}: finalize after "
                               f"{self._rows} of {self.spec.n_rows} rows")
        try:
            manifest = dict(format="stackwise-activation-cache", version=FORMAT_VERSION,
                            spec=dataclasses.asdict(self.spec), meta=self.meta,
                            shards=self._shards)
            # Last file written: its presence inside DIR marks the shards as complete.
            atomic_write_text(os.path.join(self.partial, MANIFEST), json.dumps(manifest, indent=1))
            fsync_dir(self.partial)
            # Swap in: the older cache (if any) is moved aside and the new one renamed into
            # place, two renames back to back; the older one is deleted only afterwards.
            old = self.directory + ".old"
            shutil.rmtree(old, ignore_errors=True)
            if os.path.exists(self.directory):
                os.rename(self.directory, old)
            os.rename(self.partial, self.directory)
            fsync_dir(os.path.dirname(self.directory))
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            self._disk_full(e)
            raise
        self._done = True
        self._bar.close()

    def abort(self) -> None:
        """Drops everything written (the partial directory); an older DIR is kept."""
        if self._file is not None:
            try:
                self._file.close()  # flushes its buffer, which fails again on a full disk
            except OSError:
                pass
            self._file = None
        self._bar.close()
        shutil.rmtree(self.partial, ignore_errors=True)
        self._done = True

    # -- internals

    def _records(self, batch: dict) -> np.ndarray:
        """Validates a batch and packs it into records (one copy, which also encodes)."""
        spec = self.spec
        batch = {k: np.asarray(v) for k, v in batch.items()}
        hidden = batch.get("hidden", np.zeros(0))
        prequantized = spec.dtype == "fp8" and hidden.dtype == ml_dtypes.float8_e4m3fn
        expected = {"hidden", "inputs", "targets", "masked", "t"} | (
            {"hidden_scale"} if prequantized else set())
        if set(batch) != expected:
            raise ValueError(f"cache batch has keys {sorted(batch)}, expected {sorted(expected)}")
        B = len(batch["t"])
        for name in expected:
            want = (B,) + self._dtype[name].shape
            if batch[name].shape != want:
                raise ValueError(f"cache batch field {name!r} has shape {batch[name].shape}, "
                                 f"expected {want}")
        if self._rows + B > spec.n_rows:
            raise ValueError(f"cache batch of {B} rows overflows n_rows={spec.n_rows} "
                             f"({self._rows} written)")
        rec = np.empty(B, self._dtype)
        for name in ("t", "inputs", "targets", "masked"):
            rec[name] = batch[name]
        if spec.dtype == "fp32":
            rec["hidden"] = hidden
        elif spec.dtype == "bf16":
            rec["hidden"] = hidden.astype(ml_dtypes.bfloat16).view(np.uint16)
        else:
            q, scale = (hidden, batch["hidden_scale"]) if prequantized else quantize_fp8(hidden)
            rec["hidden"] = q.view(np.uint8)
            rec["hidden_scale"] = scale
        return rec

    def _open_shard(self, s: int) -> None:
        a, b = self.spec.shard_rows(s)
        self._shard = s
        self._file = open(os.path.join(self.partial, _shard_name(s)), "wb")
        self._hash = hashlib.sha256()
        header = _npy_header(self.spec, b - a)
        self._file.write(header)
        self._hash.update(header)

    def _close_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        self._file = None
        self._shards.append(dict(file=_shard_name(self._shard),
                                 rows=list(self.spec.shard_rows(self._shard)),
                                 bytes=size, sha256=self._hash.hexdigest()))

    def _disk_full(self, e: OSError, shard: int | None = None) -> None:
        """A write refused for lack of space: drops the partial cache and raises DiskFull
        naming the shard (or, for the manifest, the directory) and the bytes it needed."""
        if not faults.is_disk_full(e):
            return
        spec, written = self.spec, self._rows
        self.abort()
        if shard is None:
            path, needed, what = self.directory, _manifest_allowance(spec), "the activation cache"
        else:
            a, b = spec.shard_rows(shard)
            path = os.path.join(self.directory, _shard_name(shard))
            needed = len(_npy_header(spec, b - a)) + (b - a) * spec.bytes_per_row()
            what = f"activation cache shard {shard + 1} of {spec.shards()}"
        whole = spec.total_bytes() + _manifest_allowance(spec)
        raise faults.disk_full(path, needed, what, after=(
            f"The partial cache ({written} of {spec.n_rows} rows) was deleted, never to be read; "
            f"the whole cache needs {whole:,d} bytes ({_gib(whole)}). Free space (or lift the "
            "limit), or use training.progressive.cache_dtype='fp8' (or 'bf16'), fewer "
            "cache_views or another disk, and rerun the same command: it resumes from the last "
            "checkpoint and builds the cache again")) from None


# ------------------------------------------------------------------ reader

def open_cache(directory: str, verify: bool = True, expect: CacheSpec | None = None):
    """Opens a complete cache. Sizes are always checked; verify=True also checks sha256
    of every shard (about 1 s per GB). `expect` rejects a cache written with another spec."""
    directory = os.path.abspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"no complete activation cache at {directory}")
    try:
        with open(path) as f:
            manifest = json.load(f)
        spec = CacheSpec(**manifest["spec"])
        shards = manifest["shards"]
        ok = manifest.get("version") == FORMAT_VERSION and len(shards) == spec.shards()
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"activation cache manifest {path} is unreadable or of another "
                        f"format version; {_REBUILD}")
    if expect is not None and expect != spec:
        raise UserError(f"activation cache at {directory} was written for {spec}, this run "
                        f"needs {expect}; {_REBUILD}")
    for s, shard in enumerate(shards):
        file = os.path.join(directory, shard["file"])
        why = None
        if not os.path.isfile(file):
            why = "missing"
        elif os.path.getsize(file) != shard["bytes"]:
            why = f"{os.path.getsize(file)} bytes, expected {shard['bytes']}"
        elif verify:
            with open(file, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != shard["sha256"]:
                    why = "checksum mismatch"
        if why:
            raise UserError(f"activation cache shard {file} is corrupted or truncated "
                            f"({why}); {_REBUILD}")
    return CacheReader(directory, spec, shards, manifest.get("meta", {}))


class CacheReader:
    """Random access to rows; a grain source (`grain.MapDataset.source(reader)`).

    reader[i] and reader.batch(indices) return dicts of numpy arrays: hidden (.., L, D)
    float32 (bf16 widened, fp8 dequantised), inputs/targets int32, masked bool, t float32.
    Shards are memory-mapped lazily; pickling (for grain workers) drops the maps.
    """

    def __init__(self, directory: str, spec: CacheSpec, shards: list[dict], meta: dict):
        self.directory, self.spec, self.meta = directory, spec, meta
        self._files = [os.path.join(directory, s["file"]) for s in shards]
        self._maps: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.spec.n_rows

    def __getitem__(self, i) -> dict:
        row = self.batch([int(i)])
        return {k: v[0] for k, v in row.items()}

    def _getitems(self, indices) -> list[dict]:  # grain's batched read hook
        rows = self.batch(indices)
        return [{k: v[j] for k, v in rows.items()} for j in range(len(indices))]

    def batch(self, indices, decode: bool = True) -> dict:
        """Rows `indices`, stacked. decode=False returns hidden as stored (float32, bfloat16
        or float8_e4m3fn plus hidden_scale), e.g. to widen on the accelerator instead."""
        spec = self.spec
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + spec.n_rows, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= spec.n_rows):
            raise IndexError(f"activation cache row out of range [0, {spec.n_rows})")
        n, L, D = len(idx), spec.seq_len, spec.d_model
        out = dict(hidden=np.empty((n, L, D), np.float32 if decode else _DECODE[spec.dtype]),
                   inputs=np.empty((n, L), np.int32), targets=np.empty((n, L), np.int32),
                   masked=np.empty((n, L), bool), t=np.empty((n,), np.float32))
        small_fields = ("inputs", "targets", "masked", "t")
        if spec.dtype == "fp8" and not decode:
            out["hidden_scale"] = np.empty((n, L), np.float32)
            small_fields += ("hidden_scale",)
        shard_of = idx // spec.rows_per_shard
        for s in np.unique(shard_of):
            pos = np.nonzero(shard_of == s)[0]
            rec = self._map(int(s))[idx[pos] - s * spec.rows_per_shard]  # one copy per row
            for name in small_fields:
                out[name][pos] = rec[name]
            hidden = rec["hidden"].view(_DECODE[spec.dtype])
            if spec.dtype == "fp8" and decode:
                hidden = dequantize_fp8(hidden, rec["hidden_scale"])
            out["hidden"][pos] = hidden
        return out

    def _map(self, s: int) -> np.ndarray:
        m = self._maps.get(s)
        if m is None:
            with self._lock:
                m = self._maps.get(s)
                if m is None:
                    m = np.load(self._files[s], mmap_mode="r")
                    a, b = self.spec.shard_rows(s)
                    if m.dtype != self.spec.record_dtype() or m.shape != (b - a,):
                        raise UserError(f"activation cache shard {self._files[s]} is corrupted "
                                        f"(its header does not match the manifest); {_REBUILD}")
                    self._maps[s] = m
        return m

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def delete_cache(directory: str) -> None:
    """Removes a cache and any leftover .partial/.old next to it."""
    directory = os.path.abspath(directory)
    for path in (directory, directory + ".partial", directory + ".old"):
        shutil.rmtree(path, ignore_errors=True)
