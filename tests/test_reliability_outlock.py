"""One run per results folder: the lock names its holder; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from disdl_mpi.reliability import outlock


def test_a_second_run_is_refused_with_the_holder_named(tmp_path):
    assert outlock.acquire(tmp_path) == (None, None)
    holder = json.loads((tmp_path / outlock.LOCK).read_text())
    assert holder["pid"] == os.getpid()
    err, note = outlock.acquire(tmp_path)  # this process is alive: the lock is respected
    assert note is None and f"pid {os.getpid()}" in err and "choose another --out" in err
    outlock.release(tmp_path)
    assert not (tmp_path / outlock.LOCK).exists()


def test_the_lock_of_a_run_that_is_gone_is_taken_over(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(gone.stdout)
    (tmp_path / outlock.LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": pid}))
    err, note = outlock.acquire(tmp_path)
    assert err is None and f"pid {pid}" in note
    assert json.loads((tmp_path / outlock.LOCK).read_text())["pid"] == os.getpid()
    outlock.release(tmp_path)


def test_an_unwritable_results_folder_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = outlock.check_writable(blocker / "out")
    assert err is not None and str(blocker / "out") in err and "not writable" in err
    assert outlock.check_writable(tmp_path / "fresh") is None
