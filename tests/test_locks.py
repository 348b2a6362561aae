"""Concurrent runs (issue 17): a folder that a live process writes is refused to a second one,
naming the holder's pid; a stale lock (its holder killed, or a half-written file) is taken over."""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from brats_tf.errors import ConfigError
from brats_tf.io import locks
from tests.conftest import REPO, run_module, write_brats2017_case

HOLDER = """
import sys, time
from brats_tf.io import locks
with locks.hold(sys.argv[1], "held"):
    print("holding", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder():
    """Starts a process holding a lock file; yields a function: path -> its Popen."""
    procs = []

    def start(path):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "holding"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def record(pid, host=None):
    return {"pid": pid, "host": host or socket.gethostname(), "started": "2024-01-01T00:00:00+00:00",
            "command": "python -m brats_tf.train --workdir W"}


def one_case(tmp_path):
    write_brats2017_case(tmp_path / "data", "Case_000", shape=(12, 14, 10))
    return tmp_path / "data"


# --- the commands ------------------------------------------------------------------------------

def test_live_holder_refuses_build_records(tmp_path, holder):
    out = tmp_path / "records"
    proc = holder(f"{out}.lock")
    result = run_module("data_prep.build_records", "--data_dir", one_case(tmp_path), "--out_dir", out)
    assert result.returncode == 1, result.stderr
    held = json.loads(open(f"{out}.lock").read())
    assert held["pid"] == proc.pid and held["command"] == f"-c {out}.lock"
    assert result.stderr.splitlines() == [
        f"error: {out}: in use by pid {proc.pid} (-c {out}.lock, since {held['started']}); "
        f"wait for it to finish, or use another folder"]
    assert not out.exists() and os.path.exists(f"{out}.lock")   # the holder's lock is left alone


def test_stale_lock_is_taken_over_by_build_records(tmp_path):
    out = tmp_path / "records"
    pid = dead_pid()
    with open(f"{out}.lock", "w") as f:
        json.dump(record(pid), f)
    result = run_module("data_prep.build_records", "--data_dir", one_case(tmp_path), "--out_dir", out)
    assert result.returncode == 0, result.stderr
    assert (out / "manifest.json").is_file() and not os.path.exists(f"{out}.lock")


def test_garbage_lock_is_taken_over(tmp_path):
    from brats_tf.records.writer import build_records
    out = tmp_path / "records"
    lock = f"{out}.lock"
    with open(lock, "w") as f:
        f.write('{"pid": 12')   # a holder killed while writing it
    os.utime(lock, (0, 0))   # older than the grace a writer gets
    assert build_records(one_case(tmp_path), out, verbose=False)["num_cases"] == 1
    assert not os.path.exists(lock)


def test_trainer_refuses_a_work_dir_in_use_and_releases_its_lock(tmp_path, holder):
    from brats_tf.configs import train2d
    from brats_tf.errors import DataError
    from brats_tf.training.loop import Trainer
    config = train2d.get_config("small")
    config.data.records_dir = str(tmp_path / "no_records")
    proc = holder(tmp_path / "busy" / locks.LOCK_FILE)
    with pytest.raises(ConfigError, match=rf"busy: in use by pid {proc.pid} "):
        Trainer(config, tmp_path / "busy").run()
    assert not (tmp_path / "busy" / "config.json").exists()
    # A free work dir is locked from the start and released when the run fails.
    with pytest.raises(DataError):
        Trainer(config, tmp_path / "free").run()
    assert not (tmp_path / "free" / "config.json").exists()   # refused before anything is written
    assert not (tmp_path / "free" / locks.LOCK_FILE).exists()


def test_feature_folder_holding_only_its_lock_is_not_foreign(tmp_path):
    from brats_tf.inference import features
    (tmp_path / locks.LOCK_FILE).write_text("{}")
    assert features._resume_or_start(str(tmp_path), {}, overwrite=False) == {}
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a feature folder"):
        features._resume_or_start(str(tmp_path), {}, overwrite=False)


# --- the module --------------------------------------------------------------------------------

def test_held_then_released_even_on_error(tmp_path):
    path = tmp_path / "sub" / locks.LOCK_FILE
    with pytest.raises(RuntimeError):
        with locks.hold(path, "sub"):
            held = json.loads(path.read_text())
            raise RuntimeError
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert held["command"] == " ".join(sys.argv) and held["started"][:2] == "20"
    assert not path.exists()


def test_re_entrant_in_one_process(tmp_path):
    path = tmp_path / locks.LOCK_FILE
    with locks.hold(path, "dir"):
        with locks.hold(tmp_path / "." / locks.LOCK_FILE, "dir"):   # the same file by another name
            pass
        assert json.loads(path.read_text())["pid"] == os.getpid()   # the inner exit left it
    assert not path.exists()


def test_not_removed_when_someone_else_holds_it_at_exit(tmp_path):
    path = tmp_path / locks.LOCK_FILE
    with locks.hold(path, "dir"):
        path.write_text(json.dumps(record(os.getppid())))   # taken over meanwhile
    assert json.loads(path.read_text())["pid"] == os.getppid()


def test_live_holders_refused(tmp_path):
    path = tmp_path / locks.LOCK_FILE
    path.write_text(json.dumps(record(1)))   # pid 1 lives (PermissionError when not ours: alive too)
    with pytest.raises(ConfigError) as err:
        with locks.hold(path, "dir"):
            pass
    assert str(err.value) == ("dir: in use by pid 1 (python -m brats_tf.train --workdir W, since "
                              "2024-01-01T00:00:00+00:00); wait for it to finish, or use another folder")
    path.write_text(json.dumps(record(dead_pid(), host="elsewhere")))   # another host: cannot be checked
    with pytest.raises(ConfigError, match=r"^dir: in use by pid \d+ on elsewhere \(python"):
        with locks.hold(path, "dir"):
            pass
    assert json.loads(path.read_text())["host"] == "elsewhere"


def test_stale_locks_taken_over(tmp_path):
    path = tmp_path / locks.LOCK_FILE
    for stale in (record(dead_pid()), record(os.getpid()), {"pid": 0}, [1, 2]):   # own pid: an earlier process
        path.write_text(json.dumps(stale))
        os.utime(path, (0, 0))   # an unreadable one is older than the grace a writer gets
        with locks.hold(path, "dir"):
            assert json.loads(path.read_text())["started"] != "2024-01-01T00:00:00+00:00"
        assert not path.exists()


def test_fresh_unreadable_lock_gets_time_to_be_written(tmp_path):
    """An empty lock file may be a holder between its create and its write: it is read again."""
    path = tmp_path / locks.LOCK_FILE
    path.write_text("")
    timer = threading.Timer(0.3, lambda: path.write_text(json.dumps(record(os.getppid()))))
    timer.start()
    try:
        with pytest.raises(ConfigError, match=f"in use by pid {os.getppid()} "):
            with locks.hold(path, "dir"):
                pass
    finally:
        timer.join()

