"""Paths and locks of a run directory: a workdir that is a file or cannot be written, a
cache directory that vanishes, one process per workdir, and a failed start that leaves
the workdir as it found it so the corrected command runs there."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import generated_text, small_config
from stackwise_jax import checkpoint, data, phases, train, workdir_lock
from stackwise_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("STACKWISE_CACHE_DIR", str(root))
    return root


def test_workdir_that_is_a_file_is_refused_untouched(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir)
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(UserError, match="is a file, not a directory"):
        train.run(cfg, str(f), progress=False)
    with pytest.raises(UserError, match=f"'{f}' is a file"):
        train.run(cfg, str(f / "run"), progress=False)  # its parent is the file
    assert f.read_text() == "mine"


def test_workdir_that_cannot_be_written_stops_with_one_message(corpus_dir):
    # /proc refuses new directories even to root: a real failed write, not a mock.
    with pytest.raises(UserError, match="cannot write --workdir=/proc/stackwise_run"):
        train.run(small_config(corpus_dir), "/proc/stackwise_run", progress=False)


@pytest.mark.skipif(shutil.which("unshare") is None or subprocess.run(
    ["unshare", "-rm", "true"], capture_output=True).returncode != 0,
    reason="no user and mount namespaces here for a read-only mount")
def test_workdir_on_a_read_only_mount_stops_with_exit_code_2(corpus_dir, tmp_path):
    # A tmpfs remounted read-only in a private mount namespace: writes fail with EROFS even
    # for root, as on a read-only volume.
    mnt = tmp_path / "ro"
    mnt.mkdir()
    args = ["--config=configs/tiny.py", f"--workdir={mnt}",
            f"--config.data.files={os.path.join(corpus_dir, '*.txt')}",
            "--config.data.heldout_files=heldout.txt", "--config.model.vocab_size=300"]
    script = (f"mount -t tmpfs none {mnt} && mount -o remount,ro {mnt} && "
              f"exec {sys.executable} -m stackwise_jax.train \"$@\"")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *args], cwd=ROOT,
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: cannot write --workdir={mnt}: Read-only file system")
    assert "Traceback" not in r.stderr


def test_cache_directory_that_vanishes_while_tokenizing(corpus_dir, tmp_path, private_cache,
                                                        monkeypatch):
    write_split = data._write_split

    def vanish_first(*args):  # the cache directory is removed under the running tokenizer
        shutil.rmtree(private_cache)
        return write_split(*args)

    cfg = small_config(corpus_dir)
    with monkeypatch.context() as m:
        m.setattr(data, "_write_split", vanish_first)
        with pytest.raises(UserError, match=f"the cache directory '{private_cache}' vanished"):
            data.prepare(cfg, str(tmp_path / "run"), save_tokenizer=False)
    assert not (tmp_path / "run").exists()
    # Once tokenised, the rows are memory-mapped: the cache vanishing under a running
    # training changes nothing it reads.
    p = data.prepare(cfg, str(tmp_path / "run"), save_tokenizer=False)
    rows = np.array(p.train_rows)
    shutil.rmtree(private_cache)
    np.testing.assert_array_equal(p.train_rows, rows)


HOLD = ("import sys, time\nfrom stackwise_jax import workdir_lock\n"
        "lock = workdir_lock.acquire(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(300)\n")


def test_one_process_per_workdir_and_a_dead_holder_is_taken_over(corpus_dir, tmp_path, capsys):
    wd = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(wd)], stdout=subprocess.PIPE,
                              text=True, env=ENV, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = subprocess.run([sys.executable, "-m", "stackwise_jax.train", "--config=configs/tiny.py",
                            f"--workdir={wd}",
                            f"--config.data.files={os.path.join(corpus_dir, '*.txt')}",
                            "--config.data.heldout_files=heldout.txt",
                            "--config.model.vocab_size=300"],
                           capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"in use by another training process (pid {holder.pid} on" in r.stderr, r.stderr
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup: the lock file stays behind
        holder.wait()
    assert f"pid={holder.pid}" in (wd / workdir_lock.LOCK_NAME).read_text()
    cfg = small_config(corpus_dir)
    assert checkpoint.check_workdir(str(wd), cfg) is False  # a stale lock is not a run
    capsys.readouterr()
    with workdir_lock.acquire(str(wd)):
        assert f"pid={os.getpid()}" in (wd / workdir_lock.LOCK_NAME).read_text()
        err = capsys.readouterr().err
        assert f"taking over the lock left by a run that ended without releasing it (pid " \
               f"{holder.pid} on" in err and "that process is gone" in err, err
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):  # held: a second is refused
            workdir_lock.acquire(str(wd))
    assert os.listdir(wd) == []  # released: the lock file goes with it


def test_failed_starts_leave_the_workdir_as_found_and_the_corrected_run_starts_there(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The king finds a lantern by the river.\n")  # 39 bytes
    (corpus / "heldout.txt").write_text(generated_text(60, seed=99))
    (corpus / "blank.txt").write_text("")
    empty_wd, new_wd = tmp_path / "empty", tmp_path / "new"
    empty_wd.mkdir()
    cfg = small_config(str(corpus))
    for wd in (empty_wd, new_wd):
        with pytest.raises(UserError, match="train text is too short for data.seq_len=32"):
            train.run(cfg, str(wd), progress=False)
    assert os.listdir(empty_wd) == [] and not new_wd.exists()

    (corpus / "a.txt").write_text(generated_text(400, seed=1))  # the user adds text
    too_small = small_config(str(corpus), **{"model.vocab_size": 200})
    with pytest.raises(UserError, match="model.vocab_size=200"):
        train.run(too_small, str(empty_wd), progress=False)
    assert os.listdir(empty_wd) == []

    fixed = small_config(str(corpus), **{"training.progressive.enabled": False,
                                          "eval.batches": 50})
    # max_steps=0: the start is all this test is about (training is tested elsewhere).
    assert train.run(fixed, str(empty_wd), max_steps=0, progress=False) == {}
    tok = data.Tokenizer.load(str(empty_wd / "tokenizer"))
    # Trained on the new text: its merges reach the vocabulary the model asks for (a
    # tokenizer of the first 39 bytes had 258 byte and special ids and a few merges).
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode("the silver key")) == "the silver key"
    assert json.loads((empty_wd / "config.json").read_text())["model"]["vocab_size"] == 300
    assert not (empty_wd / workdir_lock.LOCK_NAME).exists()


def test_data_stats_and_their_warnings(corpus_dir, tmp_path, capsys):
    cfg = small_config(corpus_dir, **{"eval.batches": 50, "training.steps_per_stage": 2000})
    prepared = data.prepare(cfg, str(tmp_path / "run"), save_tokenizer=False)
    stats = data.describe(cfg, prepared, phases.all_phases(cfg))
    out = capsys.readouterr()
    rows = len(prepared.train_rows)
    assert stats["train_tokens"] == rows * 32 and stats["heldout_tokens"] == prepared.heldout_rows.size
    assert stats["budget_tokens"] == 2 * 2000 * 4 * 32
    assert stats["epochs"] == round(2 * 2000 * 4 / rows, 3) > data.MANY_EPOCHS
    assert f"{stats['train_tokens']:,} training tokens" in out.out
    asked = "fewer than the eval.batches x data.batch_size = 200"
    assert len(prepared.heldout_rows) < 200 and asked in out.err
    assert f"the budget is {stats['epochs']:.1f} epochs of a small corpus" in out.err
    assert len(stats["warnings"]) == 2
    plain = small_config(corpus_dir)
    quiet = data.describe(plain, prepared, phases.all_phases(plain))
    assert quiet["warnings"] == [] and quiet["epochs"] < 1


def test_without_file_locks_the_pid_in_the_lock_file_guards_the_run(tmp_path, monkeypatch,
                                                                     capsys):
    import errno
    import fcntl

    def no_locks(fd, op):  # what flock says on a filesystem that keeps no locks
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    wd = tmp_path / "run"
    wd.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (wd / workdir_lock.LOCK_NAME).write_text(f"pid={dead} host={os.uname().nodename}\n")
    with workdir_lock.acquire(str(wd)):
        err = capsys.readouterr().err
        assert "has no file locks" in err and f"(pid {dead} on" in err, err
        with pytest.raises(UserError, match=f"in use by another training process \\(pid "
                                            f"{os.getpid()} on"):
            workdir_lock.acquire(str(wd))  # the pid in the file is alive: refused
    assert os.listdir(wd) == []
