"""Normalization against direct NumPy computations, and crop/paste-back as an exact round trip."""

import numpy as np
import pytest

from brats_tf import preprocess
from brats_tf.errors import DataError
from brats_tf.io.cases import discover_cases, load_case


def _volume(seed=0):
    rng = np.random.default_rng(seed)
    image = np.zeros((20, 22, 18, 2), np.float32)
    image[4:15, 5:17, 3:12] = rng.uniform(10, 200, size=(11, 12, 9, 2))
    return image


def test_median_normalization_matches_numpy():
    image = _volume()
    brain = preprocess.brain_mask(image)
    out = preprocess.normalize(image, brain, "median", scale=2.0)
    for k in range(2):
        values = image[..., k][image[..., k] != 0].astype(np.float64)
        expected = np.where(brain, image[..., k] / np.median(values) * 2.0, 0)
        np.testing.assert_allclose(out[..., k], expected, rtol=1e-6)
        assert np.median(out[..., k][brain]) == pytest.approx(2.0, rel=1e-5)


def test_zscore_uses_mask_not_nonzero():
    image = _volume() - 50.0       # background no longer zero, as in z-scored BraTS 2013 data
    mask = np.zeros(image.shape[:3], bool)
    mask[4:15, 5:17, 3:12] = True
    out = preprocess.normalize(image, mask, "zscore")
    inside = out[..., 0][mask].astype(np.float64)
    assert abs(inside.mean()) < 1e-5 and inside.std() == pytest.approx(1.0, rel=1e-4)
    assert np.all(out[~mask] == 0)


def test_non_positive_median_is_an_error():
    image = _volume() - 500.0
    mask = np.ones(image.shape[:3], bool)
    with pytest.raises(DataError, match="non-positive median"):
        preprocess.normalize(image, mask, "median", path="caseX")


def test_crop_paste_round_trip():
    image = _volume()
    brain = preprocess.brain_mask(image)
    box = preprocess.brain_box(brain, margin=2)
    assert box.start == (2, 3, 1) and box.stop == (17, 19, 14)
    cropped = preprocess.crop(image, box)
    restored = preprocess.paste(cropped, box)
    np.testing.assert_array_equal(restored, image)      # nothing outside the box is lost
    assert preprocess.CropBox.from_json(box.to_json()) == box


def test_margin_is_clipped_to_volume_and_empty_brain_errors():
    brain = np.zeros((5, 5, 5), bool)
    brain[0, 4, 2] = True
    box = preprocess.brain_box(brain, margin=3)
    assert box.start == (0, 1, 0) and box.stop == (4, 5, 5)
    with pytest.raises(DataError, match="empty brain"):
        preprocess.brain_box(np.zeros((5, 5, 5), bool), path="c1")


def test_prepare_case_round_trip_on_disk_case(tiny_dataset):
    loaded = load_case(discover_cases(tiny_dataset)[0])
    prepared = preprocess.prepare_case(loaded, "none", margin=1)
    np.testing.assert_array_equal(preprocess.paste(prepared.label, prepared.box), loaded.label)
    restored = preprocess.paste(prepared.image, prepared.box)
    np.testing.assert_array_equal(restored, loaded.image)
