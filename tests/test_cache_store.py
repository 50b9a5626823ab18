"""Activation cache storage: round trips, shard boundaries, integrity, atomicity, disk space."""

import errno
import json
import os
import pickle

import grain
import ml_dtypes
import numpy as np
import pytest

from stackwise_jax import cache_store as cs
from stackwise_jax.errors import UserError


def make_rows(spec, n, seed=0):
    """Rows whose tokens span many magnitudes (incl. tiny and all-zero vectors)."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((n, spec.seq_len, spec.d_model)).astype(np.float32)
    hidden *= 10.0 ** rng.uniform(-4, 3, (n, spec.seq_len, 1)).astype(np.float32)
    hidden[:, 0, :3] = [1e-12, -3e-9, 0.0]  # fp8 subnormals inside a normal-scaled token
    hidden[0, 1] = 0.0
    return dict(hidden=hidden,
                inputs=rng.integers(0, 300, (n, spec.seq_len)).astype(np.int32),
                targets=rng.integers(-1, 300, (n, spec.seq_len)).astype(np.int32),
                masked=rng.random((n, spec.seq_len)) < 0.3,
                t=rng.random(n).astype(np.float32))


def write_cache(directory, spec, rows, sizes=(3, 7, 1)):
    """Writes `rows` in batches of cycling, irregular sizes."""
    with cs.CacheWriter(directory, spec) as w:
        start, k = 0, 0
        while start < spec.n_rows:
            stop = min(start + sizes[k % len(sizes)], spec.n_rows)
            w.write({key: v[start:stop] for key, v in rows.items()})
            start, k = stop, k + 1


def spec_of(dtype="bf16", n_rows=23, rows_per_shard=5, seq_len=6, d_model=16):
    return cs.CacheSpec(n_rows=n_rows, seq_len=seq_len, d_model=d_model, dtype=dtype,
                        rows_per_shard=rows_per_shard)


def assert_hidden_close(dtype, x, y):
    """The stated error bound of each storage dtype, per element."""
    if dtype == "fp32":
        np.testing.assert_array_equal(x, y)
    elif dtype == "bf16":  # 7 explicit mantissa bits, round to nearest: 2^-8 relative
        assert np.all(np.abs(x - y) <= np.abs(x) * 2.0**-8)
    else:  # e4m3: 2^-4 relative for normals, 2^-10 * scale absolute for subnormals
        scale = np.max(np.abs(x), axis=-1, keepdims=True) / 448
        bound = (np.abs(x) * 2.0**-4 + scale * 2.0**-10) * (1 + 2.0**-20)
        assert np.all(np.abs(x - y) <= bound)
        assert np.all(np.abs(x - y) <= np.max(np.abs(x), axis=-1, keepdims=True) * 2.0**-4)


@pytest.mark.parametrize("dtype", cs.DTYPES)
def test_round_trip(tmp_path, dtype):
    spec = spec_of(dtype)
    rows = make_rows(spec, spec.n_rows)
    write_cache(str(tmp_path / "c"), spec, rows)
    reader = cs.open_cache(str(tmp_path / "c"))
    assert reader.spec == spec and len(reader) == spec.n_rows
    got = reader.batch(np.arange(spec.n_rows))
    for key in ("inputs", "targets", "masked", "t"):
        np.testing.assert_array_equal(got[key], rows[key])
        assert got[key].dtype == rows[key].dtype
    assert got["hidden"].dtype == np.float32
    assert_hidden_close(dtype, rows["hidden"], got["hidden"])
    assert not os.path.exists(str(tmp_path / "c.partial"))


def test_fp8_bound_is_tight_and_zero_safe():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 128)).astype(np.float32) * 10.0 ** rng.uniform(-6, 6, (64, 1))
    x[3] = 0.0
    q, scale = cs.quantize_fp8(x)
    assert q.dtype == ml_dtypes.float8_e4m3fn and scale.shape == (64,) and scale[3] == 0
    y = cs.dequantize_fp8(q, scale)
    assert_hidden_close("fp8", x, y)
    assert np.all(y[3] == 0) and np.all(np.isfinite(y))
    rel = np.abs(x - y) / np.abs(x).clip(1e-30)
    assert rel[np.abs(x) > x.max(-1, keepdims=True) / 448 * 2.0**-6].max() > 2.0**-5  # not vacuous


def test_prequantized_fp8_batch(tmp_path):
    spec = spec_of("fp8", n_rows=4, rows_per_shard=4)
    rows = make_rows(spec, 4)
    q, scale = cs.quantize_fp8(rows["hidden"])
    write_cache(str(tmp_path / "c"), spec, dict(rows, hidden=q, hidden_scale=scale), sizes=(4,))
    np.testing.assert_array_equal(cs.open_cache(str(tmp_path / "c")).batch(range(4))["hidden"],
                                  cs.dequantize_fp8(q, scale))


def test_shard_boundaries(tmp_path):
    spec = spec_of("fp32", n_rows=23, rows_per_shard=5)  # 5 shards, the last holds 3 rows
    rows = make_rows(spec, spec.n_rows)
    write_cache(str(tmp_path / "c"), spec, rows, sizes=(4, 9, 10))
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [
        [0, 5], [5, 10], [10, 15], [15, 20], [20, 23]]
    reader = cs.open_cache(str(tmp_path / "c"))
    idx = [4, 5, 22, 0, 14, 15, 9, 10, -1, 4]
    got = reader.batch(idx)
    for key in rows:
        np.testing.assert_array_equal(got[key], rows[key][idx])
    one = reader[20]
    assert one["hidden"].shape == (6, 16) and one["t"].shape == ()
    np.testing.assert_array_equal(one["inputs"], rows["inputs"][20])
    with pytest.raises(IndexError):
        reader[23]


def test_total_bytes_matches_disk(tmp_path):
    for dtype in cs.DTYPES:
        spec = spec_of(dtype, n_rows=13, rows_per_shard=4)
        directory = tmp_path / dtype
        write_cache(str(directory), spec, make_rows(spec, 13))
        on_disk = sum(f.stat().st_size for f in directory.iterdir())
        manifest = (directory / "manifest.json").stat().st_size
        assert on_disk - manifest == spec.total_bytes()
        assert manifest < cs._manifest_allowance(spec)
        L, D = spec.seq_len, spec.d_model
        per_elem = {"fp32": 4, "bf16": 2, "fp8": 1}[dtype]
        scales = 4 * L if dtype == "fp8" else 0
        assert spec.bytes_per_row() == L * D * per_elem + 9 * L + 4 + scales


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_shard_is_named(tmp_path):
    spec = spec_of("bf16")
    directory = str(tmp_path / "c")
    write_cache(directory, spec, make_rows(spec, spec.n_rows))
    shard = os.path.join(directory, "shard-00002.npy")
    flip_byte(shard, os.path.getsize(shard) // 2)
    cs.open_cache(directory, verify=False)  # sizes still match: only the checksum can tell
    with pytest.raises(UserError,
                       match=r"shard .*shard-00002\.npy is corrupted.*checksum.*--rebuild_cache"):
        cs.open_cache(directory)


def test_truncated_or_missing_shard_is_named(tmp_path):
    spec = spec_of("fp8")
    directory = str(tmp_path / "c")
    write_cache(directory, spec, make_rows(spec, spec.n_rows))
    shard = os.path.join(directory, "shard-00001.npy")
    os.truncate(shard, os.path.getsize(shard) - 10)
    with pytest.raises(UserError,
                       match=r"shard-00001\.npy is corrupted or truncated.*--rebuild_cache"):
        cs.open_cache(directory, verify=False)
    os.remove(shard)
    with pytest.raises(UserError, match=r"shard-00001\.npy .*missing"):
        cs.open_cache(directory)


def test_missing_cache_and_spec_mismatch(tmp_path):
    with pytest.raises(UserError, match="no complete activation cache at"):
        cs.open_cache(str(tmp_path / "nothing"))
    spec = spec_of("bf16", n_rows=5)
    write_cache(str(tmp_path / "c"), spec, make_rows(spec, 5))
    with pytest.raises(UserError, match="rebuild_cache"):
        cs.open_cache(str(tmp_path / "c"), expect=spec_of("fp8", n_rows=5))


def test_exception_in_writer_keeps_older_cache(tmp_path):
    directory = str(tmp_path / "c")
    spec = spec_of("fp32", n_rows=7, rows_per_shard=3)
    old = make_rows(spec, 7, seed=1)
    write_cache(directory, spec, old)
    with pytest.raises(RuntimeError, match="boom"):
        with cs.CacheWriter(directory, spec) as w:
            w.write({k: v[:4] for k, v in make_rows(spec, 7, seed=2).items()})
            raise RuntimeError("boom")
    assert not os.path.exists(directory + ".partial")
    np.testing.assert_array_equal(cs.open_cache(directory).batch(range(7))["hidden"], old["hidden"])
    # A successful rewrite replaces the older cache.
    new = make_rows(spec, 7, seed=3)
    write_cache(directory, spec, new)
    np.testing.assert_array_equal(cs.open_cache(directory).batch(range(7))["hidden"], new["hidden"])
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_finalize_with_too_few_rows_raises(tmp_path):
    directory = str(tmp_path / "c")
    spec = spec_of("bf16", n_rows=10)
    rows = make_rows(spec, 10)
    w = cs.CacheWriter(directory, spec)
    w.write({k: v[:6] for k, v in rows.items()})
    with pytest.raises(RuntimeError, match="6 of 10 rows"):
        w.finalize()
    w.abort()
    with pytest.raises(RuntimeError, match="6 of 10 rows"):  # same through the context manager
        with cs.CacheWriter(directory, spec) as w:
            w.write({k: v[:6] for k, v in rows.items()})
    with pytest.raises(ValueError, match="overflows"):
        with cs.CacheWriter(directory, spec) as w:
            w.write(rows)
            w.write({k: v[:1] for k, v in rows.items()})
    assert not os.path.exists(directory) and not os.path.exists(directory + ".partial")


def test_check_space_refuses(tmp_path, monkeypatch, capsys):
    directory = str(tmp_path / "deep" / "cache")  # parents do not exist yet
    spec = spec_of("fp32", n_rows=1000, seq_len=128, d_model=256)
    monkeypatch.setattr(cs, "_free_bytes", lambda path: 10 * 2**20)
    with pytest.raises(UserError) as e:
        cs.check_space(directory, spec)
    msg = str(e.value)
    assert directory in msg and str(10 * 2**20) in msg and "cache_dtype='fp8'" in msg
    assert "cache_views" in msg and "another disk" in msg
    assert "activation cache: 1000 rows" in capsys.readouterr().out
    with pytest.raises(UserError):  # the writer checks before it writes anything
        cs.CacheWriter(directory, spec)
    assert not os.path.exists(directory + ".partial")
    monkeypatch.setattr(cs, "_free_bytes", lambda path: 2**40)
    cs.check_space(directory, spec)


def test_disk_full_during_write(tmp_path):
    directory = str(tmp_path / "c")
    spec = spec_of("bf16", n_rows=10)
    rows = make_rows(spec, 10)

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.f.close()

    named = "no space left writing activation cache shard 1 of 2 at .*shard-00000.npy: it needed"
    with pytest.raises(UserError, match=named):
        with cs.CacheWriter(directory, spec) as w:
            w.write({k: v[:2] for k, v in rows.items()})
            w._file = FullFile(w._file)
            w.write({k: v[2:4] for k, v in rows.items()})
    assert not os.path.exists(directory) and not os.path.exists(directory + ".partial")


def test_grain_source_and_pickle(tmp_path):
    spec = spec_of("fp8")
    rows = make_rows(spec, spec.n_rows)
    write_cache(str(tmp_path / "c"), spec, rows)
    reader = cs.open_cache(str(tmp_path / "c"))
    ds = grain.MapDataset.source(reader)
    assert len(ds) == spec.n_rows
    np.testing.assert_array_equal(ds[7]["inputs"], rows["inputs"][7])
    batches = list(ds.shuffle(seed=0).batch(4))
    assert batches[0]["hidden"].shape == (4, 6, 16) and sum(len(b["t"]) for b in batches) == 23
    clone = pickle.loads(pickle.dumps(reader))  # grain workers receive a pickled source
    np.testing.assert_array_equal(clone[3]["hidden"], reader[3]["hidden"])


def test_delete_cache(tmp_path):
    spec = spec_of("bf16", n_rows=3)
    write_cache(str(tmp_path / "c"), spec, make_rows(spec, 3))
    os.makedirs(tmp_path / "c.partial")
    cs.delete_cache(str(tmp_path / "c"))
    assert os.listdir(tmp_path) == []
    cs.delete_cache(str(tmp_path / "c"))  # nothing there: no error


def test_fp8_encoder_matches_ml_dtypes():
    lattice = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    lattice = np.sort(lattice[np.isfinite(lattice)])
    mids = (lattice[1:] + lattice[:-1]) / 2  # ties: round to even
    x = np.concatenate([
        lattice, mids,
        np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, -np.float32(np.inf)),
        np.float32([463.99997, 464.0, 464.00003, 1e30, np.inf, -np.inf, np.nan, -0.0, 1e-45]),
        np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    with np.errstate(invalid="ignore"):
        ref = x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(cs._fp8_bits(x), ref)


def test_quantize_fp8_chunks_match_reference():
    x = np.random.default_rng(2).standard_normal((3, 9000, 40)).astype(np.float32)  # 5 chunks
    q, scale = cs.quantize_fp8(x)
    ref_scale = np.abs(x).max(-1) / 448
    np.testing.assert_array_equal(scale, ref_scale)
    ref = (x / ref_scale[..., None]).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(q.view(np.uint8), ref.view(np.uint8))
    np.testing.assert_array_equal(cs.dequantize_fp8(q, scale),
                                  ref.astype(np.float32) * ref_scale[..., None])


@pytest.mark.parametrize("dtype", cs.DTYPES)
def test_batch_without_decode(tmp_path, dtype):
    spec = spec_of(dtype, n_rows=8, rows_per_shard=3)
    rows = make_rows(spec, 8)
    write_cache(str(tmp_path / "c"), spec, rows)
    reader = cs.open_cache(str(tmp_path / "c"))
    idx = [7, 0, 4, 3]
    raw, dec = reader.batch(idx, decode=False), reader.batch(idx)
    assert raw["hidden"].dtype == {"fp32": np.float32, "bf16": ml_dtypes.bfloat16,
                                   "fp8": ml_dtypes.float8_e4m3fn}[dtype]
    widened = (cs.dequantize_fp8(raw["hidden"], raw["hidden_scale"]) if dtype == "fp8"
               else raw["hidden"].astype(np.float32))
    np.testing.assert_array_equal(widened, dec["hidden"])
    np.testing.assert_array_equal(raw["inputs"], rows["inputs"][idx])
