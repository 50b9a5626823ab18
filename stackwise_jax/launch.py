"""N training processes on this machine, one run:

    python -m stackwise_jax.launch --num_processes=2 -- --config=configs/tiny.py --workdir=DIR

Starts `python -m stackwise_jax.train <args after -->` N times, each with
STACKWISE_NUM_PROCESSES, STACKWISE_PROCESS_ID and STACKWISE_COORDINATOR (127.0.0.1 and a
free port) set (see distributed.py), prints their output line by line prefixed [pI], and
exits with the exit code of the first process that failed. When one process fails, the
others are stopped (they would wait for it forever at the next collective). Several hosts start the train command
themselves, one per host, with those variables (README, "Scale-out").
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from stackwise_jax import distributed

USAGE = ("usage: python -m stackwise_jax.launch --num_processes=N [--port=P] -- "
         "<stackwise_jax.train arguments>")


class LaunchError(Exception):
    pass


def parse(argv: list[str]) -> tuple[int, int | None, list[str]]:
    """(num_processes, port or None, train args)."""
    if "--" not in argv:
        raise LaunchError(f"no '--' before the training arguments\n{USAGE}")
    cut = argv.index("--")
    own, rest = argv[:cut], argv[cut + 1:]
    num, port = None, None
    for arg in own:
        name, eq, value = arg.partition("=")
        if name not in ("--num_processes", "--port") or not eq:
            raise LaunchError(f"unknown launcher argument {arg!r}\n{USAGE}")
        try:
            n = int(value)
        except ValueError:
            raise LaunchError(f"{name}={value!r} must be an integer") from None
        if name == "--num_processes":
            if n < 1:
                raise LaunchError(f"--num_processes={n} must be at least 1")
            num = n
        else:
            if not 0 < n < 65536:
                raise LaunchError(f"--port={n} must be a TCP port (1 to 65535)")
            port = n
    if num is None:
        raise LaunchError(f"--num_processes is required\n{USAGE}")
    return num, port, rest


def check_environment(num: int, environ=None) -> None:
    """Variables already set in this shell that would contradict the launcher's."""
    env = os.environ if environ is None else environ
    for key in (distributed.ENV_NUM, distributed.ENV_ID, distributed.ENV_COORDINATOR,
                distributed.ENV_AUTO):
        if env.get(key):
            raise LaunchError(f"{key}={env[key]} is already set in the environment, but the "
                              f"launcher assigns it (--num_processes={num}): unset it, or "
                              "start the train command yourself on each host")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode("utf-8", "replace"))
        out.flush()
    stream.close()


def run(num: int, port: int | None, train_args: list[str]) -> int:
    coordinator = f"127.0.0.1:{port or free_port()}"
    procs, pumps = [], []
    for i in range(num):
        env = dict(os.environ)
        env.update({distributed.ENV_NUM: str(num), distributed.ENV_ID: str(i),
                    distributed.ENV_COORDINATOR: coordinator})
        p = subprocess.Popen([sys.executable, "-m", "stackwise_jax.train", *train_args],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(p)
        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, f"[p{i}] ", out), daemon=True)
            t.start()
            pumps.append(t)
    codes: dict[int, int] = {}
    first_failure = 0  # the cause: the others are stopped for it (their codes follow)
    stopping = False
    try:
        while len(codes) < num:
            for i, p in enumerate(procs):
                if i not in codes and p.poll() is not None:
                    codes[i] = p.returncode
                    if p.returncode != 0 and not stopping:
                        stopping, first_failure = True, p.returncode
                        print(f"launch: process {i} exited with {p.returncode}; stopping the "
                              "others", file=sys.stderr, flush=True)
                        _stop([q for j, q in enumerate(procs) if j not in codes])
            time.sleep(0.05)
    except KeyboardInterrupt:  # pass Ctrl-C on: each process saves and exits 130
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for i, p in enumerate(procs):
            codes[i] = p.wait()
    for t in pumps:
        t.join(timeout=5)
    if first_failure == 0:
        first_failure = next((c for c in codes.values() if c != 0), 0)  # Ctrl-C
    # A signal's negative returncode as the shell reports it (128 + signum).
    return 128 - first_failure if first_failure < 0 else first_failure


def _stop(procs, grace_s: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        num, port, rest = parse(argv)
        check_environment(num)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(num, port, rest))


if __name__ == "__main__":
    main()
