"""io/resample.py: the coarse grid covers the same field of view, images average each
2 x 2 x 2 block at a factor of 2, labels map back exactly, and a dataset copy keeps its
layout and resumes."""

import os

import nibabel as nib
import numpy as np
import pytest

from brats_tf.errors import DataError
from brats_tf.io import resample
from brats_tf.io.cases import discover_cases, load_case
from brats_tf.io.nifti import Geometry, load_volume
from brats_tf.synthetic import generator


def _geometry(shape, spacing=(1.0, 1.0, 1.0), origin=(10.0, -20.0, 5.0), flip=True):
    affine = np.diag([-spacing[0] if flip else spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_zooms(spacing)
    return Geometry(tuple(shape), affine, header)


def _world(geometry, index):
    return geometry.affine[:3, :3] @ np.asarray(index, float) + geometry.affine[:3, 3]


def test_the_coarse_grid_covers_the_same_field_of_view():
    fine = _geometry((240, 240, 155))
    coarse = resample.coarse_geometry(fine, 2.0)
    assert coarse.shape == (120, 120, 78)
    assert np.allclose(coarse.spacing, (2.0, 2.0, 155 / 78))
    # Coarse voxel 0's centre is the mean of fine voxels 0 and 1 (x, y) and lies half a
    # coarse voxel inside the fine grid's edge; the last one likewise at the other edge.
    first, last = _world(coarse, (0, 0, 0)), _world(coarse, np.array(coarse.shape) - 1)
    assert np.allclose(first[:2], (_world(fine, (0, 0, 0))[:2] + _world(fine, (1, 1, 0))[:2]) / 2)
    fine_edge = _world(fine, np.array(fine.shape) - 0.5) - _world(fine, (-0.5, -0.5, -0.5))
    coarse_edge = _world(coarse, np.array(coarse.shape) - 0.5) - _world(coarse, (-0.5, -0.5, -0.5))
    assert np.allclose(fine_edge, coarse_edge)
    assert np.allclose(last, _world(fine, np.array(fine.shape) - 1) - (first - _world(fine, (0, 0, 0))))


def test_images_average_each_block_at_a_factor_of_two():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(8, 6, 4)).astype(np.float32)
    out, geometry = resample.resample_volume(data, _geometry(data.shape), 2.0, nearest=False)
    blocks = data.reshape(4, 2, 3, 2, 2, 2).mean(axis=(1, 3, 5))
    assert geometry.shape == (4, 3, 2) and np.allclose(out, blocks, atol=1e-5)


def test_labels_map_back_exactly_when_constant_on_blocks():
    rng = np.random.default_rng(1)
    coarse_labels = rng.integers(0, 4, size=(5, 4, 3)).astype(np.uint8)
    fine_labels = coarse_labels.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    fine = _geometry(fine_labels.shape, spacing=(1.0, 1.0, 1.5))
    down, coarse = resample.resample_volume(fine_labels, fine, 2.0, nearest=True)
    assert coarse.shape == (5, 4, 4)   # z: 6 voxels of 1.5 mm -> 4 of 2.25 mm
    back = resample.labels_on_grid(down, coarse, fine)
    assert back.shape == fine_labels.shape
    even = _geometry(fine_labels.shape)
    down, coarse = resample.resample_volume(fine_labels, even, 2.0, nearest=True)
    assert np.array_equal(down, coarse_labels)
    assert np.array_equal(resample.labels_on_grid(down, coarse, even), fine_labels)


def test_labels_between_grids_that_are_not_aligned_are_refused():
    fine = _geometry((8, 8, 8))
    rotated = Geometry(fine.shape, fine.affine[[1, 0, 2, 3]], fine.header)
    with pytest.raises(DataError, match="axis-aligned"):
        resample.labels_on_grid(np.zeros(fine.shape, np.uint8), rotated, fine)


def test_a_dataset_copy_keeps_its_layout_and_resumes(tmp_path):
    data_dir = tmp_path / "data"
    generator.write_dataset(str(data_dir), 2, seed=0, shape=(48, 48, 40), progress=False)
    out = resample.resample_dataset(str(data_dir), str(tmp_path / "coarse"), "auto", None, 7.5)
    cases = discover_cases(out)
    assert [c.case_id for c in cases] == [c.case_id for c in discover_cases(str(data_dir))]
    fine, coarse = load_case(discover_cases(str(data_dir))[0]), load_case(cases[0])
    assert coarse.image.shape == (32, 32, 21, 4) and np.allclose(coarse.geometry.spacing, (7.5, 7.5, 155 / 21))
    assert set(np.unique(coarse.label)) <= set(np.unique(fine.label))
    # The tumor keeps its place: its centre of mass in world coordinates moves by less than a coarse voxel.
    centre = [_world(c.geometry, np.argwhere(c.label > 0).mean(axis=0)) for c in (fine, coarse)]
    assert np.linalg.norm(centre[0] - centre[1]) < 7.5
    stamp = os.path.getmtime(cases[0].label.path)
    resample.resample_dataset(str(data_dir), str(tmp_path / "coarse"), "auto", None, 7.5)
    assert os.path.getmtime(cases[0].label.path) == stamp   # done cases are skipped
    labels, geometry = load_volume(cases[0].label.path)
    assert labels.shape == coarse.label.shape and geometry.shape == (32, 32, 21)
