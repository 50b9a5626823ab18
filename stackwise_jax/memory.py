"""What the process holds, measured: live JAX array bytes and peak RSS, per phase.

`sample()` is called where a phase's holdings peak (after each stack of a trunk assembly,
after each train step, during cache builds and evaluation); `start_phase()` resets the
peaks so summary.json can report each phase's own (and `process_peak_rss_bytes()` the
whole run's): `peak_live_bytes` (the largest total
of live JAX arrays seen: parameters, optimizer state, trunk, batches; not the compiled
step's temporaries, which XLA frees inside the call), `peak_device_bytes` (the most of
them any one device held: each array's shard on each device it is placed on; on a mesh,
what the planner's per-device rows check) and `peak_rss_bytes` (the kernel's
high-water mark of resident memory, reset per phase through /proc/self/clear_refs; where
that is unavailable, the process's lifetime peak, flagged `peak_rss_since_start`).
"""

from __future__ import annotations

import collections
import ctypes
import math
import resource

import jax

_state = {"peak_live": 0, "peak_device": 0, "rss_reset": False, "process_rss": 0}


def live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


def _live() -> tuple[int, int]:
    """(bytes of all live arrays, the most of them on any one device)."""
    total, per_device = 0, collections.Counter()
    for x in jax.live_arrays():
        total += x.nbytes
        try:
            shard = x.nbytes // max(x.size, 1) * math.prod(x.sharding.shard_shape(x.shape))
            for d in x.sharding.device_set:
                per_device[d] += shard
        except ValueError:  # a layout whose shards differ in size: read each one
            for s in x.addressable_shards:
                per_device[s.device] += s.data.nbytes
    return total, max(per_device.values(), default=0)


def sample() -> int:
    now, device = _live()
    _state["peak_live"] = max(_state["peak_live"], now)
    _state["peak_device"] = max(_state["peak_device"], device)
    return now


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int:
    """The kernel's high-water mark of this process's resident memory (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def start_phase() -> None:
    # Resetting the kernel's high-water mark also resets what getrusage reports at exit:
    # the process's own peak is kept here across resets.
    _state["process_rss"] = max(_state["process_rss"], rss_peak_bytes())
    _state["rss_reset"] = _reset_rss_peak()
    _state["peak_live"] = _state["peak_device"] = 0
    sample()


def phase_record() -> dict:
    """{peak_live_bytes, peak_device_bytes, peak_rss_bytes} since start_phase()."""
    sample()
    out = {"peak_live_bytes": int(_state["peak_live"]),
           "peak_device_bytes": int(_state["peak_device"]), "peak_rss_bytes": rss_peak_bytes()}
    if not _state["rss_reset"]:
        out["peak_rss_since_start"] = True
    return out


def process_peak_rss_bytes() -> int:
    """The whole process's resident-memory peak so far, across the per-phase resets."""
    return max(_state["process_rss"], rss_peak_bytes())


def release_memory() -> None:
    """Hands freed heap pages back to the OS (glibc keeps them per thread arena otherwise,
    which over a long run adds up). A no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
