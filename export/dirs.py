"""Output directories that appear complete or not at all.

Everything is written into a hidden temporary directory beside the target and renamed
into place at the end; on any error the temporary directory is removed. A non-empty
target is replaced only with --overwrite, and only once the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from stackwise_jax.errors import UserError


def check_target(target: str, flag: str, overwrite: bool, protect: str) -> None:
    """Fails before anything is written if `target` may not be (re)placed."""
    target, protect = os.path.realpath(target), os.path.realpath(protect)
    if os.path.exists(target) and not os.path.isdir(target):
        raise UserError(f"{flag}={target} exists and is not a directory")
    if target == protect or protect.startswith(target + os.sep):
        raise UserError(f"{flag}={target} would replace the input '{protect}'; choose another")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise UserError(f"{flag}={target} exists and is not empty; pass --overwrite to replace it")


def _commit(tmp: str, target: str) -> None:
    """Renames the finished tmp dir to target; an old target is removed only after that."""
    if os.path.isdir(target) and os.listdir(target):
        old = tempfile.mkdtemp(dir=os.path.dirname(target),
                               prefix=f".{os.path.basename(target)}.old-")
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)  # put the old one back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)  # rename(2) may replace an empty directory


@contextlib.contextmanager
def written_in_temp(target: str):
    """Yields a temp dir beside target; renamed to target on success, deleted on any error."""
    target = os.path.abspath(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.tmp-")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
