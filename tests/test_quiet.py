"""Commands print only their own progress: no TFDS "Downloading and preparing dataset" lines,
no `FeatureConnector.dtype` deprecations, no oneDNN banner or TensorFlow C++ info lines;
absl's --verbosity shows them again. Run the way a user runs them: subprocesses, without
the TF_CPP_MIN_LOG_LEVEL that conftest sets for the other tests."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, write_brats2017_case

NOISE = ("Downloading and preparing dataset", "downloaded and prepared", "FeatureConnector", "oneDNN",
         "TF_ENABLE_ONEDNN_OPTS", "cpu_feature_guard", "absl::InitializeLog", "WARNING:", "Warning:")
# absl / TensorFlow C++ log lines: "W1130 15:05:38.045564 139853 feature.py:72] ..." or "I0000 00:00:17..."
LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ", re.MULTILINE)


def _run(module, *args):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def _assert_quiet(output):
    found = [n for n in NOISE if n in output] + LOG_LINE.findall(output)
    assert not found, f"library chatter {found} in:\n{output[-3000:]}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet")
    for i in range(3):
        write_brats2017_case(root / "data", f"Case_{i}", seed=i)
    return root


def test_build_records_train_and_segment_print_only_their_own_lines(data):
    records, model = data / "records", data / "model"
    output = _run("data_prep.build_records", "--data_dir", data / "data", "--out_dir", records)
    _assert_quiet(output)
    assert "wrote 3 cases" in output and "[3/3] Case_2" in output          # its own progress stays
    # Reading the records is where TFDS warns about FeatureConnector.dtype.
    output = _run("brats_tf.train", "--config=brats_tf/configs/train2d.py:small", f"--config.data.records_dir={records}",
                  "--config.model.kind=unet_axial", "--config.train.iterations=0", "--config.data.num_val_cases=1",
                  f"--workdir={model}")
    _assert_quiet(output)
    assert "trained 0 iterations" in output
    output = _run("brats_tf.segment", "--case_dir", data / "data" / "Case_0", "--models", model,
                  "--out_dir", data / "seg")
    _assert_quiet(output)
    assert output.strip() == f"Case_0: {data / 'seg' / 'Case_0_seg.nii.gz'}"


def test_verbosity_shows_the_library_lines_again(data):
    output = _run("data_prep.build_records", "--data_dir", data / "data", "--out_dir", data / "records_verbose",
                  "--verbosity=0")
    assert "Downloading and preparing dataset" in output and LOG_LINE.search(output)
