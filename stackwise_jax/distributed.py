"""Several processes, one run: jax.distributed from the environment, and who writes.

A multi-process run is the same `python -m stackwise_jax.train` command started once per
process (per host on a TPU slice or a GPU cluster; `python -m stackwise_jax.launch` starts
them on one machine). Each process finds its place in environment variables, read before
JAX starts a backend:

- STACKWISE_NUM_PROCESSES, STACKWISE_PROCESS_ID, STACKWISE_COORDINATOR (host:port of
  process 0): jax.distributed.initialize with those (several GPU hosts, or CPU processes).
- STACKWISE_DISTRIBUTED=auto: jax.distributed.initialize() with no arguments, which finds
  the cluster itself (a Cloud TPU slice, SLURM, Open MPI).
- neither: one process, as before.

On the CPU, processes exchange collectives over gloo. The mesh (config mesh.*) then spans
jax.devices(): every device of every process.

Writing. Orbax saves global arrays cooperatively (each process its own shards, metadata
once). Every other file of the run (config.json, the tokenizer, token caches, stores,
metrics.jsonl, summary.json, the workdir lock) is written by process 0 alone; the others
read it after a barrier. Store writes gather each array on every process (a collective),
so every process calls them and only process 0 writes.
"""

from __future__ import annotations

import os

import jax

from stackwise_jax.errors import UserError

ENV_NUM = "STACKWISE_NUM_PROCESSES"
ENV_ID = "STACKWISE_PROCESS_ID"
ENV_COORDINATOR = "STACKWISE_COORDINATOR"
ENV_AUTO = "STACKWISE_DISTRIBUTED"
ENV_TIMEOUT = "STACKWISE_INIT_TIMEOUT"  # seconds to wait for every process to join
DEFAULT_TIMEOUT_S = 300

_initialized = False


def _int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name}={text!r} must be an integer") from None


def settings(environ=None) -> dict | None:
    """The distributed settings the environment asks for, checked; None: one process."""
    env = os.environ if environ is None else environ
    auto = env.get(ENV_AUTO)
    explicit = [k for k in (ENV_NUM, ENV_ID, ENV_COORDINATOR) if env.get(k)]
    timeout = _int(ENV_TIMEOUT, env.get(ENV_TIMEOUT, str(DEFAULT_TIMEOUT_S)))
    if timeout < 1:
        raise UserError(f"{ENV_TIMEOUT}={timeout} must be at least 1 (seconds)")
    if auto is not None:
        if auto != "auto":
            raise UserError(f"{ENV_AUTO}={auto!r}: the only value is 'auto' (jax.distributed "
                            "finds the cluster itself: a TPU slice, SLURM, Open MPI)")
        if explicit:
            raise UserError(f"{ENV_AUTO}=auto and {', '.join(explicit)} are both set: use one "
                            "(auto finds the process count and id itself)")
        return {"auto": True, "timeout": timeout}
    if not explicit:
        return None
    missing = [k for k in (ENV_NUM, ENV_ID, ENV_COORDINATOR) if not env.get(k)]
    if missing:
        raise UserError(f"{', '.join(explicit)} set but {', '.join(missing)} not: a "
                        f"multi-process run needs all three ({ENV_NUM}, {ENV_ID}, "
                        f"{ENV_COORDINATOR}=host:port of process 0)")
    num = _int(ENV_NUM, env[ENV_NUM])
    pid = _int(ENV_ID, env[ENV_ID])
    if num < 1:
        raise UserError(f"{ENV_NUM}={num} must be at least 1")
    if not 0 <= pid < num:
        raise UserError(f"{ENV_ID}={pid} does not fit {ENV_NUM}={num}: process ids are 0 to "
                        f"{num - 1}, one per process")
    host, _, port = env[ENV_COORDINATOR].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{ENV_COORDINATOR}={env[ENV_COORDINATOR]!r}: expected host:port of "
                        "process 0, e.g. 10.0.0.1:12355")
    return {"auto": False, "num_processes": num, "process_id": pid,
            "coordinator": env[ENV_COORDINATOR], "timeout": timeout}


def initialize_from_env() -> None:
    """jax.distributed.initialize as the environment asks (nothing for one process). Must
    run before anything starts a JAX backend."""
    global _initialized
    s = settings()
    if s is None or _initialized:
        return
    # CPU processes exchange collectives over gloo (no effect on GPU or TPU computations).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if s["auto"]:
            jax.distributed.initialize(initialization_timeout=s["timeout"])
        else:
            jax.distributed.initialize(coordinator_address=s["coordinator"],
                                       num_processes=s["num_processes"],
                                       process_id=s["process_id"],
                                       initialization_timeout=s["timeout"])
    except Exception as e:  # noqa: BLE001 - JAX's own words, without its traceback
        where = ("jax.distributed.initialize() found no cluster, or not every process joined"
                 if s["auto"] else
                 f"process {s['process_id']} of {s['num_processes']} could not join the "
                 f"coordinator at {s['coordinator']} within {s['timeout']} s")
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"{where} ({first}); start the same command on every host, each with "
                        f"its own {ENV_ID} and the same {ENV_NUM} and {ENV_COORDINATOR}") from None
    _initialized = True


def is_primary() -> bool:
    """Whether this process writes the run's own files (process 0, or the only one)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have reached `name` (nothing with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
