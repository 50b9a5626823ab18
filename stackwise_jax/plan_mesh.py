"""The planner on a device mesh: bytes per device of each phase, and the smallest mesh on
which each phase fits a device's memory.

    python -m stackwise_jax.plan --config=... --devices=8 --config.mesh.fsdp=8
    python -m stackwise_jax.plan --config=... --smallest_mesh --max_devices=32 --device_memory=80GB

A mesh plan is plan.analyze with a sharding.Layout: each phase's step is compiled SPMD
with the shardings the trainer places its arguments with (XLA's memory_analysis of a
partitioned program is one device's), and every hold counts its arrays' shards. The mesh
is the config's (mesh.data/fsdp/tensor) over --devices devices, resolved as a run resolves
it. The devices need not exist: where the machine has fewer, the planner builds the mesh
from simulated CPU devices (jax_num_cpu_devices, set before JAX starts), so the numbers
are the CPU compiler's, as the one-device plan's are.

The search tries n = 1, 2, 4, ... up to --max_devices and, for each n, the meshes
data=1 x fsdp x tensor with fsdp and tensor powers of two whose product is n, most fsdp
first. data is left at 1: it splits batch rows, which fsdp splits as well while also
splitting the parameters, so no mesh with data > 1 holds fewer bytes per device than the
one with its data folded into fsdp. A mesh whose axes do not divide the dimensions they
split (sharding.check_divisible, e.g. data.batch_size over fsdp) is skipped and named in
the result. A phase's smallest mesh is the first that fits on the smallest n.
"""

from __future__ import annotations

import copy

import jax

from stackwise_jax import sharding
from stackwise_jax.errors import UserError


def default_devices(cfg) -> int:
    """The device count the config's mesh names: the product of its fixed axes (an axis of
    -1 takes what the others leave, so it adds none)."""
    n = 1
    for a in sharding.AXES:
        n *= max(cfg.mesh[a], 1)
    return n


def check_count(flag: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{flag}={value!r} must be a positive integer (a number of devices)")
    return value


def provide_cpu_devices(n: int) -> None:
    """Before JAX starts: n simulated CPU devices, for a mesh larger than the machine.
    Does nothing once a backend has started (mesh_devices then says what is missing)."""
    if n > 1:
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:  # JAX started already: the devices are what they are
            pass


def mesh_devices(n: int, flag: str = "--devices") -> list:
    """n devices to build a mesh of: the default backend's where it has enough (a real
    multi-device host plans on its own compiler), else simulated CPU devices."""
    found = []
    for backend in (None, "cpu"):
        try:
            devices = jax.devices(backend)
        except RuntimeError:
            continue
        if len(devices) >= n:
            return devices[:n]
        found.append(len(devices))
    raise UserError(f"{flag}={n}: this process has {max(found, default=0)} devices and JAX "
                    f"started before the planner could simulate {n} CPU devices; run "
                    "python -m stackwise_jax.plan in a fresh process (it sets "
                    "jax_num_cpu_devices before JAX starts)")


def check_mesh(cfg, n: int, flag: str = "--devices") -> dict:
    """cfg.mesh resolved over n devices; a mesh that does not resolve stops, naming the flag
    (and, from sharding.mesh_shape, the mesh keys or the dimension that does not divide)."""
    try:
        return sharding.mesh_shape(cfg, n)
    except UserError as e:
        raise UserError(f"{flag}={n}: {e}") from None


def layout_for(cfg, n: int, flag: str = "--devices"):
    """The sharding.Layout of cfg.mesh over n devices; None for one device (the plain
    one-device plan)."""
    check_mesh(cfg, n, flag)
    if n == 1:
        return None
    return sharding.from_config(cfg, mesh_devices(n, flag))


def with_mesh(cfg, sizes: dict):
    out = copy.deepcopy(cfg)
    for a in sharding.AXES:
        out.mesh[a] = sizes[a]
    return out


def candidates(n: int) -> list[dict]:
    """Meshes data=1 x fsdp x tensor of n devices (n a power of two), most fsdp first."""
    out, tensor = [], 1
    while tensor <= n:
        out.append({"data": 1, "fsdp": n // tensor, "tensor": tensor})
        tensor *= 2
    return out


def mesh_name(sizes: dict) -> str:
    return " x ".join(f"{a}={sizes[a]}" for a in sharding.AXES)


def smallest_mesh(cfg, budget: int, keys: list[str], max_devices: int) -> dict:
    """For each planner key, the first mesh (fewest devices) on which its phase fits
    `budget` bytes per device; every mesh tried is listed with its per-device total or
    why it was refused."""
    from stackwise_jax import plan as plan_lib  # plan imports this module

    check_count("--max_devices", max_devices)
    found: dict[str, dict] = {}
    tried: dict[str, list] = {k: [] for k in keys}
    n = 1
    while n <= max_devices and len(found) < len(keys):
        for sizes in candidates(n):
            todo = [k for k in keys if k not in found]
            if not todo:
                break
            trial = with_mesh(cfg, sizes)
            try:
                sharding.check_divisible(trial, sizes)
            except UserError as e:
                for k in todo:
                    tried[k].append({"mesh": sizes, "refused": str(e)})
                continue
            layout = layout_for(trial, n, "--max_devices")
            for k in todo:
                row = plan_lib.plan(trial, budget, [k], layout)["phases"][0]
                tried[k].append({"mesh": sizes, "total_bytes": row["total_bytes"],
                                 "fits": row["fits"]})
                if row["fits"]:
                    found[k] = {"mesh": sizes, "n_devices": n, "row": row}
        n *= 2
    phases = []
    for k in keys:
        f = found.get(k)
        phases.append({"key": k, "phase": plan_lib.phase_title(cfg, k),
                       "mesh": f and f["mesh"], "n_devices": f and f["n_devices"],
                       "row": f and f["row"], "tried": tried[k]})
    return {"device_memory_bytes": budget, "max_devices": max_devices, "phases": phases}


def format_search(result: dict) -> str:
    from stackwise_jax.plan import _gib

    lines = [f"smallest mesh per phase for {_gib(result['device_memory_bytes'])} per device "
             f"(meshes data=1 x fsdp x tensor, powers of two, up to {result['max_devices']} "
             "devices):",
             "| phase | devices | mesh | per device: trainable | frozen | optimizer | XLA temp "
             "| non-temporary | total |", "|---|---|---|---|---|---|---|---|---|"]
    refusals = {}
    for p in result["phases"]:
        for t in p["tried"]:
            if "refused" in t:
                refusals[mesh_name(t["mesh"])] = t["refused"]
        r = p["row"]
        if r is None:
            best = min((t["total_bytes"] for t in p["tried"] if "total_bytes" in t),
                       default=None)
            lines.append(f"| {p['phase']} | none of at most {result['max_devices']} | | | | | "
                         f"| | {'' if best is None else f'{_gib(best)} at best'} |")
            continue
        lines.append(f"| {p['phase']} | {p['n_devices']} | {mesh_name(p['mesh'])} | " + " | ".join(
            _gib(r[k]) for k in ("trainable_params_bytes", "frozen_params_bytes",
                                 "optimizer_bytes", "xla_temp_bytes", "non_temporary_bytes",
                                 "total_bytes")) + " |")
    lines += [f"skipped {m}: {why}" for m, why in refusals.items()]
    missing = [p["phase"] for p in result["phases"] if p["row"] is None]
    if missing:
        lines.append(f"no mesh of at most --max_devices={result['max_devices']} devices fits "
                     f"{', '.join(repr(m) for m in missing)} in --device_memory: raise --max_devices, or see the "
                     "memory knobs of python -m stackwise_jax.plan")
    return "\n".join(lines)
