"""`brats_tf.fuse`: label-map files in, fused map (and vote proportions) out, geometry kept."""

import nibabel as nib
import numpy as np
import pytest

from brats_tf.inference import ensemble
from brats_tf.errors import DataError
from tests.conftest import run_module, shared_data

AFFINE = np.array([[-1.5, 0, 0, 90.0], [0, -1.5, 0, 120.0], [0, 0, 3.0, -60.0], [0, 0, 0, 1]])

# Three models, four voxels along x (BraTS 2017 values: 4 is enhancing).
VOTES = [
    [4, 4, 1],     # P_tumor 1, P_core 1, P_enh 2/3              -> enhancing
    [2, 2, 0],     # P_tumor 2/3, P_core 0                       -> edema
    [1, 0, 0],     # P_tumor 1/3 < 0.4                           -> background
    [1, 2, 4],     # P_core 2/3, P_enh 1/2                       -> enhancing
]
EXPECTED_2017 = [4, 2, 0, 4]
EXPECTED_PROPORTIONS = {"tumor": [1, 2 / 3, 1 / 3, 1], "core": [1, 0, 1, 2 / 3], "enh": [2 / 3, 0, 0, 1 / 2]}


def write_inputs(folder, votes=VOTES, affine=AFFINE, dtype=np.uint8):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for model, column in enumerate(zip(*votes)):
        path = folder / f"model{model}.nii.gz"
        nib.save(nib.Nifti1Image(np.array(column, dtype=dtype).reshape(4, 1, 1), affine), path)
        paths.append(path)
    return paths


def read(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img


def test_fuse_files_writes_the_vote_in_the_first_input_geometry(tmp_path):
    paths = write_inputs(tmp_path)
    out = tmp_path / "out" / "fused.nii.gz"
    labels = ensemble.fuse_files(paths, out, proportions_prefix=tmp_path / "out" / "P")
    data, img = read(out)
    assert data.reshape(-1).tolist() == EXPECTED_2017 and data.dtype == np.uint8
    assert labels.reshape(-1).tolist() == [3, 2, 0, 3]                 # internal convention returned
    np.testing.assert_allclose(img.affine, AFFINE)
    assert img.header.get_zooms()[:3] == (1.5, 1.5, 3.0)
    for name, expected in EXPECTED_PROPORTIONS.items():
        values, p_img = read(tmp_path / "out" / f"P_{name}.nii.gz")
        assert values.dtype == np.float32
        np.testing.assert_allclose(values.reshape(-1), expected, atol=1e-6)
        np.testing.assert_allclose(p_img.affine, AFFINE)


def test_brats2023_conventions_in_and_out(tmp_path):
    votes_2023 = [[3 if v == 4 else v for v in voxel] for voxel in VOTES]
    paths = write_inputs(tmp_path, votes_2023, dtype=np.int16)
    out = tmp_path / "fused.nii.gz"
    ensemble.fuse_files(paths, out, label_convention="brats2023", output_convention="brats2023")
    assert read(out)[0].reshape(-1).tolist() == [3, 2, 0, 3]
    ensemble.fuse_files(paths, out, label_convention="brats2023")      # output in 2017 by default
    assert read(out)[0].reshape(-1).tolist() == EXPECTED_2017
    # Read in the wrong convention, value 3 is unknown: a DataError naming the file.
    with pytest.raises(DataError, match=r"model0.nii.gz: unknown label values \[3\]"):
        ensemble.fuse_files(paths, out)


def test_majority_method_and_thresholds(tmp_path):
    paths = write_inputs(tmp_path)
    out = tmp_path / "fused.nii.gz"
    ensemble.fuse_files(paths, out, method="majority")
    assert read(out)[0].reshape(-1).tolist() == [4, 2, 0, 1]            # last voxel: 1-1-1 tie -> lowest (1)
    ensemble.fuse_files(paths, out, thresholds=(1.0, 0.5, 0.5))
    assert read(out)[0].reshape(-1).tolist() == [4, 0, 0, 4]


def test_inputs_that_do_not_share_geometry_are_refused(tmp_path):
    first = write_inputs(tmp_path / "a")
    shifted = AFFINE.copy()
    shifted[0, 3] += 5
    other = write_inputs(tmp_path / "b", affine=shifted)
    with pytest.raises(DataError, match=r"b/model0.nii.gz: affine \(geometry\) differs from model0.nii.gz"):
        ensemble.fuse_files([first[0], other[0]], tmp_path / "x.nii.gz")
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 1, 1), np.uint8), AFFINE), small)
    with pytest.raises(DataError, match=r"small.nii.gz: shape \(3, 1, 1\) differs"):
        ensemble.fuse_files([first[0], small], tmp_path / "x.nii.gz")
    assert not (tmp_path / "x.nii.gz").exists()


def test_cli_fuses_and_reports_errors_in_one_line(tmp_path):
    paths = write_inputs(tmp_path)
    out = tmp_path / "fused.nii.gz"
    result = run_module("brats_tf.fuse", "--output", out, "--thresholds", "0.4,0.3,0.4", *paths)
    assert result.returncode == 0, result.stderr
    assert read(out)[0].reshape(-1).tolist() == EXPECTED_2017
    result = run_module("brats_tf.fuse", "--output", out, "--thresholds", "0.4,2,0.4", *paths)
    assert result.returncode == 1 and "outside [0, 1]" in result.stderr and "Traceback" not in result.stderr
    result = run_module("brats_tf.fuse", "--output", out)
    assert result.returncode == 1 and "no segmentations to fuse" in result.stderr
    result = run_module("brats_tf.fuse", "--output", out, tmp_path / "missing.nii.gz")
    assert result.returncode == 1 and "missing.nii.gz: file not found" in result.stderr


def test_cli_on_real_peer_segmentations(tmp_path):
    case = shared_data("tcga_peer_segmentations", "TCGA-DU-7294")
    peers = sorted((case / "peer_segmentations").glob("*.nii.gz"))
    out = tmp_path / "fused.nii.gz"
    result = run_module("brats_tf.fuse", "--output", out, "--thresholds", "0.5,0.5,0.5",
                        "--proportions_prefix", tmp_path / "P", *peers)
    assert result.returncode == 0, result.stderr
    fused, img = read(out)
    mav, mav_img = read(case / "peer_fusions" / "mav.nii.gz")
    np.testing.assert_allclose(img.affine, mav_img.affine)
    assert set(np.unique(fused)) == {0, 1, 2, 4}
    for labels in ((1, 2, 4), (1, 4)):        # WT, TC (see test_ensemble for the ET discussion)
        a, b = np.isin(fused, labels), np.isin(mav, labels)
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.98
    p_tumor = read(tmp_path / "P_tumor.nii.gz")[0]
    assert set(np.round(np.unique(p_tumor) * 5, 4)) <= {0, 1, 2, 3, 4, 5}    # fractions of 5 models
