"""Case discovery and loading for every layout, and one-line errors for bad input."""

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from brats_tf.errors import DataError
from brats_tf.io.cases import discover_cases, load_case
from brats_tf.io.labels import map_labels
from brats_tf.io.files import atomic_write
from brats_tf.io.nifti import load_volume, save_volume
from tests.conftest import REPO, shared_data, tiny_volumes, write_brats2017_case


def test_brats2017_discovery_and_label_mapping(tiny_dataset):
    cases = discover_cases(tiny_dataset)
    assert [c.case_id for c in cases] == ["Case_000", "Case_001", "Case_002"]
    assert cases[0].layout == "brats2017" and cases[0].modalities == ("t1", "t1c", "t2", "flair")
    loaded = load_case(cases[0])
    _, seg = tiny_volumes(seed=0)
    assert loaded.image.shape == seg.shape + (4,)
    # 0/1/2/4 on disk -> 0/1/2/3 inside.
    np.testing.assert_array_equal(loaded.label, np.choose(np.searchsorted([0, 1, 2, 4], seg), [0, 1, 2, 3]))
    assert loaded.geometry.spacing == (1.0, 1.0, 1.0)


def test_modality_order_follows_request(tiny_dataset):
    case = discover_cases(tiny_dataset)[0]
    both = load_case(case, ["flair", "t1c"])
    full = load_case(case)
    np.testing.assert_array_equal(both.image[..., 0], full.image[..., 3])
    np.testing.assert_array_equal(both.image[..., 1], full.image[..., 1])


def test_single_case_folder_is_one_case(tiny_dataset):
    cases = discover_cases(tiny_dataset / "Case_001")
    assert [c.case_id for c in cases] == ["Case_001"]


def _write_brats2023(root, case_id, seg_values=(0, 1, 2, 3)):
    folder = root / case_id
    folder.mkdir(parents=True)
    images, seg = tiny_volumes()
    for name, suffix in zip(images, ("t1n", "t1c", "t2w", "t2f")):
        nib.save(nib.Nifti1Image(images[name], np.eye(4)), folder / f"{case_id}-{suffix}.nii.gz")
    seg = np.choose(np.searchsorted([0, 1, 2, 4], seg), seg_values).astype(np.uint8)
    nib.save(nib.Nifti1Image(seg, np.eye(4)), folder / f"{case_id}-seg.nii.gz")


def test_brats2023_layout(tmp_path):
    _write_brats2023(tmp_path, "BraTS-GLI-00002-000")
    case, = discover_cases(tmp_path)
    assert case.layout == "brats2023"
    loaded = load_case(case)
    assert set(np.unique(loaded.label)) == {0, 1, 2, 3}


def test_msd_layout_reads_4d_channels(tmp_path):
    images, seg = tiny_volumes()
    # MSD channel order: FLAIR, T1w, T1gd, T2w; labels 1 edema, 2 non-enh, 3 enh.
    stack = np.stack([images["flair"], images["t1"], images["t1ce"], images["t2"]], axis=-1)
    msd_seg = np.choose(np.searchsorted([0, 1, 2, 4], seg), [0, 2, 1, 3]).astype(np.uint8)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(stack, np.eye(4)), tmp_path / "imagesTr" / "BRATS_001.nii.gz")
    nib.save(nib.Nifti1Image(msd_seg, np.eye(4)), tmp_path / "labelsTr" / "BRATS_001.nii.gz")
    case, = discover_cases(tmp_path)
    assert case.layout == "msd" and case.case_id == "BRATS_001"
    loaded = load_case(case)
    np.testing.assert_array_equal(loaded.image[..., 0], images["t1"])
    np.testing.assert_array_equal(loaded.image[..., 3], images["flair"])
    expected = np.choose(np.searchsorted([0, 1, 2, 4], seg), [0, 1, 2, 3])
    np.testing.assert_array_equal(loaded.label, expected)


def test_generic_layout_file_on_real_brats2013():
    data = shared_data("brats2013_flair_t1c")
    cases = discover_cases(data, layout_file=REPO / "data_prep" / "layouts" / "brats2013_deepmedic.json")
    assert len(cases) == 4 and cases[0].modalities == ("t1c", "flair")
    assert cases[0].normalization == "zscore"
    loaded = load_case(cases[0])
    raw = np.asarray(nib.load(cases[0].label.path).dataobj)
    # Five-class BraTS 2013 labels: 3 (non-enhancing) joins 1, 4 becomes 3.
    assert np.array_equal(loaded.label == 1, (raw == 1) | (raw == 3))
    assert np.array_equal(loaded.label == 3, raw == 4)
    assert loaded.mask.sum() == int((np.asarray(nib.load(cases[0].mask.path).dataobj) > 0.5).sum())


def test_real_brats2023_case_loads():
    case, = discover_cases(shared_data("brats2023_glioma_case"))
    assert case.layout == "brats2023" and case.label is None
    assert load_case(case).image.shape == (240, 240, 155, 4)


def test_generic_layout_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json: layout file is not valid JSON"):
        discover_cases(tmp_path, layout_file=bad)
    bad.write_text(json.dumps({"modalities": {"t5": "x.nii.gz"}}))
    with pytest.raises(DataError, match="unknown modality names"):
        discover_cases(tmp_path, layout_file=bad)


# --- bad input: one error naming the file -------------------------------------------------

def test_corrupt_gzip_is_reported(tiny_dataset):
    path = tiny_dataset / "Case_000" / "Case_000_t2.nii.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(DataError) as err:
        load_case(discover_cases(tiny_dataset)[0])
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_file_is_reported(tiny_dataset):
    path = tiny_dataset / "Case_000" / "Case_000_flair.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="Case_000_flair.nii.gz"):
        load_case(discover_cases(tiny_dataset)[0])


def test_shape_and_affine_mismatch(tmp_path):
    folder = write_brats2017_case(tmp_path, "A")
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.float32), np.diag([-1.0, -1, 1, 1])), folder / "A_t2.nii.gz")
    with pytest.raises(DataError, match=r"A_t2.nii.gz: shape \(10, 10, 10\) differs"):
        load_case(discover_cases(tmp_path)[0])
    images, _ = tiny_volumes()
    nib.save(nib.Nifti1Image(images["t2"], np.diag([2.0, 1, 1, 1])), folder / "A_t2.nii.gz")
    with pytest.raises(DataError, match="A_t2.nii.gz: affine differs"):
        load_case(discover_cases(tmp_path)[0])


def test_nan_and_unknown_labels(tmp_path):
    folder = write_brats2017_case(tmp_path, "A")
    images, seg = tiny_volumes()
    images["t1"][3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(images["t1"], np.diag([-1.0, -1, 1, 1])), folder / "A_t1.nii.gz")
    with pytest.raises(DataError, match="A_t1.nii.gz: 1 non-finite voxels"):
        load_case(discover_cases(tmp_path)[0])
    with pytest.raises(DataError, match=r"seg.nii.gz: unknown label values \[3, 7\]"):
        map_labels(np.array([0, 3, 7, 4.0]), {0: 0, 1: 1, 2: 2, 4: 3}, "x/seg.nii.gz")


def test_missing_modality_file(tmp_path):
    folder = write_brats2017_case(tmp_path, "A")
    (folder / "A_t1ce.nii.gz").unlink()
    case, = discover_cases(tmp_path)
    assert case.modalities == ("t1", "t2", "flair")
    with pytest.raises(DataError, match="A_t1ce.nii.gz: missing t1c image"):
        load_case(case, ["t1", "t1c"])


def test_empty_directory(tmp_path):
    with pytest.raises(DataError, match="empty folder: no cases"):
        discover_cases(tmp_path, layout="brats2017")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="cannot detect the dataset layout"):
        discover_cases(tmp_path)
    with pytest.raises(DataError, match="no cases found"):
        discover_cases(tmp_path, layout="brats2017")


def test_save_keeps_geometry_and_is_atomic(tmp_path, tiny_dataset):
    loaded = load_case(discover_cases(tiny_dataset)[0])
    out = tmp_path / "out" / "seg.nii.gz"
    save_volume(out, loaded.label, loaded.geometry, dtype=np.uint8)
    data, geo = load_volume(out, dtype=np.uint8)
    np.testing.assert_array_equal(data, loaded.label)
    np.testing.assert_allclose(geo.affine, loaded.geometry.affine)
    assert [p.name for p in out.parent.iterdir()] == ["seg.nii.gz"]   # no temp files left

    def crash_midway(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(out.parent / "other.nii.gz", crash_midway)
    assert [p.name for p in out.parent.iterdir()] == ["seg.nii.gz"]
