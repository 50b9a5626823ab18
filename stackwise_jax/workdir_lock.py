"""One training process per run directory, and a run directory that can be written.

`acquire(workdir)` checks the path, creates the directory if needed and takes an exclusive
fcntl lock on WORKDIR/.lock, which holds the holder's pid and host. The kernel drops the
lock when its process ends, however it ends, so a lock file that can be locked again was
left by a run that is gone: it is taken over, and said so. `release()` removes the file
(and the directory, if this call created it and nothing was written there).

flock is advisory and per host: two hosts sharing a network filesystem may not see each
other's lock; the pid and host in the file still name the holder. On a filesystem without
locks, a live pid (on this host) in the file is what refuses a second process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time

from stackwise_jax.errors import UserError

LOCK_NAME = ".lock"
# flock's errors where the filesystem keeps no locks (some FUSE and network mounts).
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def check_path(workdir: str) -> None:
    """Refuses, writing nothing, a workdir that is a file or lies under one."""
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} is a file, not a directory; choose a new or empty "
                        "directory, or one that holds a run")
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"--workdir={workdir} cannot be created: '{parent}' is a file, not a "
                        "directory")


def _cannot_write(workdir: str, e: OSError) -> UserError:
    where = f" ('{e.filename}')" if e.filename and e.filename != workdir else ""
    return UserError(f"cannot write --workdir={workdir}: {e.strerror}{where}; choose a "
                     "directory on a writable filesystem")


def _holder(text: str) -> str:
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    pid, host = fields.get("pid", "?"), fields.get("host", "?")
    return f"pid {pid} on {host}" + (f", since {fields['since']}" if "since" in fields else "")


def _pid_alive(text: str) -> bool:
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    if fields.get("host") != socket.gethostname() or not fields.get("pid", "").isdigit():
        return False
    try:
        os.kill(int(fields["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class WorkdirLock:
    def __init__(self, workdir: str, fd: int, created_dir: bool):
        self.workdir, self.fd, self.created_dir = workdir, fd, created_dir
        self.path = os.path.join(workdir, LOCK_NAME)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: see acquire's inode check
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created_dir:
            try:
                os.rmdir(self.workdir)  # only when empty: a start that wrote nothing
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def acquire(workdir: str) -> WorkdirLock:
    """The run lock of `workdir`; UserError naming the holder when a live process has it."""
    check_path(workdir)
    created = not os.path.isdir(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise _cannot_write(workdir, e) from None
    path = os.path.join(workdir, LOCK_NAME)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if created:
                _rmdir_quietly(workdir)
            raise _cannot_write(workdir, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            text = _read_fd(fd)
            if e.errno in _NO_LOCKS and not _pid_alive(text):
                print(f"{workdir}: this filesystem has no file locks ({e.strerror}); only the "
                      "pid in the lock file guards the run", file=sys.stderr, flush=True)
                break
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES) or e.errno in _NO_LOCKS:
                raise UserError(f"--workdir={workdir} is in use by another training process "
                                f"({_holder(text)}); wait for it to end or stop it (kill -INT "
                                "<pid> saves a checkpoint), or use another --workdir") from None
            raise _cannot_write(workdir, e) from None
        # The holder before us may have unlinked the file between our open and our lock;
        # a lock on an unlinked file guards nothing, so lock the file that is there now.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_fd(fd)
    if previous.strip():
        state = "still running but no longer holds it" if _pid_alive(previous) else "gone"
        print(f"{workdir}: taking over the lock left by a run that ended without releasing it "
              f"({_holder(previous)}; that process is {state})", file=sys.stderr, flush=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} since={stamp}\n".encode(),
                  0)
        os.fsync(fd)
    except OSError as e:
        lock = WorkdirLock(workdir, fd, created)
        lock.release()
        raise _cannot_write(workdir, e) from None
    return WorkdirLock(workdir, fd, created)


def _read_fd(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace")
    except OSError:
        return ""


def _rmdir_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
