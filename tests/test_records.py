"""Record writer and reader share one schema: cases read back equal what was written."""

import json
import os

import numpy as np
import pytest

from brats_tf import preprocess
from brats_tf.errors import ConfigError, DataError
from brats_tf.io.cases import discover_cases, load_case
from brats_tf.records import reader, schema
from brats_tf.records.writer import build_records
from tests.conftest import REPO, run_module, shared_data


def test_round_trip_equals_preprocessed_cases(tiny_dataset, tmp_path):
    out = tmp_path / "records"
    manifest = build_records(tiny_dataset, out, margin=2, verbose=False)
    assert manifest["num_cases"] == 3 and manifest["modalities"] == ["t1", "t1c", "t2", "flair"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    read_back = {rc.prepared.case_id: rc for rc in reader.read_cases(out)}
    for case in discover_cases(tiny_dataset):
        expected = preprocess.prepare_case(load_case(case), "median", margin=2)
        got = read_back[case.case_id].prepared
        np.testing.assert_array_equal(got.image, expected.image.astype(schema.IMAGE_DTYPE))
        np.testing.assert_array_equal(got.label, expected.label)
        np.testing.assert_array_equal(got.brain, expected.brain)
        assert got.box == expected.box
        entry = next(c for c in manifest["cases"] if c["case_id"] == case.case_id)
        assert entry["voxels_per_class"] == np.bincount(expected.label.ravel(), minlength=4).tolist()
        assert entry["crop"] == expected.box.to_json()
    # The no-enhancement case has no class 3 and says so.
    assert manifest["cases"][2]["voxels_per_class"][3] == 0


def test_case_subset_and_unknown_case(tiny_dataset, tmp_path):
    build_records(tiny_dataset, tmp_path / "r", verbose=False)
    ids = [rc.prepared.case_id for rc in reader.read_cases(tmp_path / "r", ["Case_002", "Case_000"])]
    assert ids == ["Case_000", "Case_002"]
    with pytest.raises(DataError, match="not in the record set"):
        reader.case_dataset(tmp_path / "r", ["Nope"])


def test_missing_modality_needs_flag_and_is_marked(tiny_dataset, tmp_path):
    (tiny_dataset / "Case_001" / "Case_001_t2.nii.gz").unlink()
    with pytest.raises(DataError, match="Case_001_t2.nii.gz: missing t2 image"):
        build_records(tiny_dataset, tmp_path / "r", verbose=False)
    assert not (tmp_path / "r").exists()
    build_records(tiny_dataset, tmp_path / "r", allow_missing_modalities=True, verbose=False)
    case = list(reader.read_cases(tmp_path / "r", ["Case_001"]))[0]
    assert case.modality_present.tolist() == [True, True, False, True]
    assert not case.prepared.image[..., 2].any() and case.prepared.image[..., 3].any()


def test_failed_build_leaves_nothing_and_existing_output_is_protected(tiny_dataset, tmp_path):
    bad = tiny_dataset / "Case_002" / "Case_002_flair.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    result = run_module("data_prep.build_records", "--data_dir", tiny_dataset, "--out_dir", tmp_path / "r")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Case_002_flair.nii.gz" in result.stderr.strip().splitlines()[-1]
    assert os.listdir(tmp_path) == ["data"]    # no partial record set, no temp folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(ConfigError, match="not empty"):
        build_records(tiny_dataset, tmp_path / "mine", verbose=False)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        build_records(tiny_dataset, tmp_path / "mine", overwrite=True, verbose=False)


def test_real_brats2013_builds_with_layout_normalization(tmp_path):
    data = shared_data("brats2013_flair_t1c")
    result = run_module("data_prep.build_records", "--data_dir", data, "--out_dir", tmp_path / "r",
                        "--layout_file", REPO / "data_prep" / "layouts" / "brats2013_deepmedic.json",
                        "--crop_margin", "0")
    assert result.returncode == 0, result.stderr
    manifest = reader.load_manifest(tmp_path / "r")
    assert manifest["normalization"] == "zscore" and manifest["modalities"] == ["t1c", "flair"]
    first = next(reader.read_cases(tmp_path / "r", [manifest["cases"][0]["case_id"]])).prepared
    inside = first.image[..., 1][first.brain].astype(np.float64)
    assert abs(inside.mean()) < 0.01 and abs(inside.std() - 1) < 0.01
    assert set(np.unique(first.label)) == {0, 1, 2, 3}
