"""Faults outside the program's control, turned into one message a user can act on:
a full disk (or a file-size limit, or a quota), and Orbax's own error logging, which
prints hundreds of lines of tracebacks from its worker threads for a failure the caller
reports anyway."""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import re
import shutil

from stackwise_jax.errors import UserError

_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# Orbax surfaces TensorStore's failures as ValueError text carrying the OS error code.
_CODE_IN_TEXT = re.compile(r"os_error_code='?(\d+)'?")
_WORDS = ("No space left on device", "File too large", "Disk quota exceeded")


class DiskFull(UserError):
    """A write failed for lack of space; the message names the path and the bytes."""


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc` (or what it wraps) is a write refused for lack of space."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        text = str(exc)
        codes = {int(c) for c in _CODE_IN_TEXT.findall(text)}
        if codes & set(_NO_SPACE) or any(w in text for w in _WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem holding `path` (its nearest existing parent)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


RESUME = ("Nothing half-written is used later; the last complete checkpoint is intact. Free "
          "space (or lift the limit) and rerun the same command to resume from it")


def disk_full(path: str, needed: int | None, what: str, after: str = RESUME) -> DiskFull:
    """The one message: what was written, where, the bytes it needed; `after` says what
    was kept and what to do (by default: resume from the last checkpoint)."""
    free = free_bytes(path)
    need = f"it needed {needed:,d} bytes" if needed is not None else "it needed more space"
    have = f", {free:,d} are free there" if free is not None else ""
    return DiskFull(f"no space left writing {what} at {path}: {need}{have} (a full disk, a "
                    f"quota or a file-size limit: ulimit -f). {after}")


@contextlib.contextmanager
def writing(path: str, needed: int | None, what: str, after: str = RESUME):
    """Turns a failed write of `path` for lack of space into DiskFull."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise disk_full(path, needed, what, after) from None
        raise


class _DropAll(logging.Filter):
    def filter(self, record):
        return False


_LOGGERS = ("absl", "asyncio")


@contextlib.contextmanager
def quiet_orbax():
    """Orbax logs each failure of its worker threads with a traceback (through absl's
    logger) before raising it to the caller, and its abandoned asyncio tasks log theirs
    again when collected; the caller names the failure itself, once."""
    drop = _DropAll()
    for name in _LOGGERS:
        logging.getLogger(name).addFilter(drop)
    try:
        yield
    except BaseException:
        gc.collect()  # the failed save's tasks report here, while filtered (only on failure:
        raise  # a full collection costs about a second in a large process)
    finally:
        for name in _LOGGERS:
            logging.getLogger(name).removeFilter(drop)


class _DropDiskFullTasks(logging.Filter):
    """A failed save's asyncio tasks may be collected only at interpreter exit, long after
    the run reported the full disk: asyncio then logs each one's error with a traceback."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not is_disk_full(exc)


logging.getLogger("asyncio").addFilter(_DropDiskFullTasks())
