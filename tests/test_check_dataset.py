"""`python -m data_prep.check_dataset`: clean data passes, each bad input is one line naming the file."""

import numpy as np
import nibabel as nib

from tests.conftest import REPO, run_module, shared_data, tiny_volumes, write_brats2017_case


def test_clean_dataset_passes(tiny_dataset):
    result = run_module("data_prep.check_dataset", "--data_dir", tiny_dataset)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cases: 3" in result.stdout and "problems: 0" in result.stdout
    assert "3 enhancing" in result.stdout and "(in 2 cases)" in result.stdout


def test_every_problem_is_one_line_and_exit_1(tmp_path):
    root = tmp_path / "data"
    a = write_brats2017_case(root, "A")
    (a / "A_t2.nii.gz").write_bytes(b"\x1f\x8b\x08\x00not really gzip")           # corrupt gzip
    b = write_brats2017_case(root, "B")
    raw = (b / "B_flair.nii.gz").read_bytes()
    (b / "B_flair.nii.gz").write_bytes(raw[: len(raw) // 3])                       # truncated
    c = write_brats2017_case(root, "C")
    images, seg = tiny_volumes()
    images["t1"][0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(images["t1"], np.diag([-1.0, -1, 1, 1])), c / "C_t1.nii.gz")   # NaN
    nib.save(nib.Nifti1Image((seg + 5 * (seg == 4)).astype(np.uint8), np.diag([-1.0, -1, 1, 1])),
             c / "C_seg.nii.gz")                                                   # label 9
    d = write_brats2017_case(root, "D")
    (d / "D_t1ce.nii.gz").unlink()                                                 # missing modality
    e = write_brats2017_case(root, "E")
    nib.save(nib.Nifti1Image(images["t2"][:-1], np.diag([-1.0, -1, 1, 1])), e / "E_t2.nii.gz")  # shape
    f = write_brats2017_case(root, "F")
    nib.save(nib.Nifti1Image(images["t2"], np.diag([-2.0, -1, 1, 1])), f / "F_t2.nii.gz")        # affine
    g = write_brats2017_case(root, "G")
    for name in ("t1", "t1ce", "t2", "flair"):
        nib.save(nib.Nifti1Image(np.zeros_like(images["t1"]), np.diag([-1.0, -1, 1, 1])), g / f"G_{name}.nii.gz")

    result = run_module("data_prep.check_dataset", "--data_dir", root)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    expected = {"A_t2.nii.gz": "not a readable NIfTI", "B_flair.nii.gz": "cannot read image data",
                "C_t1.nii.gz": "non-finite", "C_seg.nii.gz": "unknown label values [9]",
                "D_t1ce.nii.gz": "missing t1c image", "E_t2.nii.gz": "shape",
                "F_t2.nii.gz": "affine differs", "G: empty brain": ""}
    for name, problem in expected.items():
        hits = [line for line in lines if name in line and problem in line]
        assert len(hits) == 1, (name, result.stdout)
    assert "cases: 7" in result.stdout and "problems: 8" in result.stdout


def test_empty_directory(tmp_path):
    result = run_module("data_prep.check_dataset", "--data_dir", tmp_path)
    assert result.returncode == 1 and str(tmp_path) in result.stdout
    assert "Traceback" not in result.stderr


def test_real_data_sources_pass():
    for args in (["--data_dir", shared_data("brats2023_glioma_case")],
                 ["--data_dir", shared_data("brats2013_flair_t1c"),
                  "--layout_file", REPO / "data_prep" / "layouts" / "brats2013_deepmedic.json"]):
        result = run_module("data_prep.check_dataset", *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "problems: 0" in result.stdout


def test_synthesized_dataset_passes(tmp_path):
    from brats_tf.synthetic import generator as synthetic
    synthetic.write_dataset(tmp_path / "phantoms", 3, seed=1, shape=(32, 32, 24), progress=False)
    result = run_module("data_prep.check_dataset", "--data_dir", tmp_path / "phantoms")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cases: 3" in result.stdout and "labeled cases: 3" in result.stdout
