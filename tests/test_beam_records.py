"""Beam-built records (issue 13, item 6): `data_prep.build_records --beam_pipeline_options`
prepares the cases in an Apache Beam pipeline (TFDS's Beam support) on Beam's local
multi-process runner, and writes the same record set as the in-process build."""

import json
import sys

import numpy as np
import pytest

from brats_tf.records import reader
from brats_tf.records.writer import build_records
from tests.conftest import run_module, write_brats2017_case

pytest.importorskip("apache_beam")   # requirements-dev.txt installs it; reading records never needs it

BEAM_OPTIONS = "direct_running_mode=multi_processing,direct_num_workers=2"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam") / "data"
    for i in range(4):   # the last two: one without enhancing tumor, one of another shape
        write_brats2017_case(root, f"Case_{i}", shape=(24, 26, 20) if i < 3 else (20, 22, 18), seed=i,
                             with_enhancing=i != 2)
    return root


@pytest.mark.slow   # Beam's worker processes start TensorFlow: ~20 s
def test_the_beam_build_equals_the_in_process_build(dataset, tmp_path):
    in_process = build_records(dataset, tmp_path / "in_process", verbose=False)
    result = run_module("data_prep.build_records", f"--data_dir={dataset}", f"--out_dir={tmp_path / 'beam'}",
                        f"--beam_pipeline_options={BEAM_OPTIONS}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 4 cases" in result.stdout
    assert "Traceback" not in result.stderr and "[4/4] prepared by Beam" in result.stderr
    beam = json.loads((tmp_path / "beam" / "manifest.json").read_text())
    assert beam == in_process   # crops, shapes, spacings, label counts, one record file per case
    for a, b in zip(reader.read_cases(tmp_path / "in_process"), reader.read_cases(tmp_path / "beam"), strict=True):
        assert a.prepared.case_id == b.prepared.case_id
        np.testing.assert_array_equal(a.modality_present, b.modality_present)
        for field in ("image", "label", "brain"):
            x, y = getattr(a.prepared, field), getattr(b.prepared, field)
            assert x.dtype == y.dtype and x.shape == y.shape, field
            np.testing.assert_array_equal(x, y, err_msg=f"{a.prepared.case_id} {field}")
        assert a.prepared.box == b.prepared.box


def test_a_beam_build_without_beam_installed_is_one_line(dataset, tmp_path):
    script = ("import sys; sys.modules['apache_beam'] = None; "   # as if Beam were not installed
              "from absl import app; from data_prep import build_records as b; "
              "app.run(b.run_main(b.main))")
    import subprocess
    from tests.conftest import REPO
    result = subprocess.run([sys.executable, "-c", script, f"--data_dir={dataset}", f"--out_dir={tmp_path / 'r'}",
                             f"--beam_pipeline_options={BEAM_OPTIONS}"], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == \
        "error: --beam_pipeline_options needs Apache Beam: pip install -r requirements-beam.txt"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()
