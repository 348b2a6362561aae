"""`experiments.common.in_child_process`: the paper-scale runs train each model in a fresh
process (TensorFlow keeps a model's peak memory for the life of its process)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from brats_tf.errors import DataError
from brats_tf.experiments import common


def _pid_and_sum(a, b=0):
    return os.getpid(), a + b


def _refuse(path):
    raise DataError(path, "bad header")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def test_the_function_runs_in_another_process_and_its_result_comes_back():
    pid, total = common.in_child_process("work", _pid_and_sum, 2, b=3)
    assert pid != os.getpid() and total == 5
    assert common.call(False, "work", _pid_and_sum, 2, b=3) == (os.getpid(), 5)


def test_an_expected_error_in_the_child_is_the_same_error_here():
    with pytest.raises(DataError) as err:
        common.in_child_process("work", _refuse, "/data/case_t1.nii.gz")
    assert str(err.value) == "/data/case_t1.nii.gz: bad header" and err.value.path == "/data/case_t1.nii.gz"


def test_a_killed_child_is_one_error_naming_the_work():
    with pytest.raises(DataError, match=r"^/w/models/3d_C: its process died"):
        common.in_child_process("/w/models/3d_C", _die)


@pytest.mark.slow
def test_the_child_dies_with_its_parent(tmp_path):
    """A killed run leaves no trainer behind writing into the work dir."""
    pid_file = tmp_path / "child.pid"
    script = (f"import os, time\nfrom brats_tf.experiments import common\n"
              f"def sleeper():\n    open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)\n"
              f"if __name__ == '__main__':\n    common.in_child_process('w', sleeper)\n")
    (tmp_path / "parent.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=os.getcwd()))
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    for _ in range(50):
        if not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split()[2]:
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"


def _absl_verbosity():
    from absl import logging as absl_logging
    return absl_logging.get_verbosity()


@pytest.mark.slow
def test_the_child_is_as_quiet_as_its_parent():
    """A command hides library chatter unless --verbosity is given; its model processes too."""
    import logging
    import warnings
    from absl import logging as absl_logging
    from brats_tf import errors
    before, tf_level = absl_logging.get_verbosity(), logging.getLogger("tensorflow").level
    assert common.in_child_process("w", _absl_verbosity) > absl_logging.ERROR
    try:
        with warnings.catch_warnings():
            errors.silence_libraries()
            assert common.in_child_process("w", _absl_verbosity) == absl_logging.ERROR
    finally:
        absl_logging.set_verbosity(before)
        logging.getLogger("tensorflow").setLevel(tf_level)
