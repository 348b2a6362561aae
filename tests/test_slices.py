"""Slices of a volume in each orientation: round trip (training slices: tests/test_streams.py)."""

import numpy as np
import pytest

from brats_tf.constants import ORIENTATIONS
from brats_tf.records.slices import from_slices, to_slices


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_orientation_round_trip(orientation):
    volume = np.arange(4 * 5 * 6 * 2).reshape(4, 5, 6, 2)
    slices = to_slices(volume, orientation)
    expected_count = {"axial": 6, "coronal": 5, "sagittal": 4}[orientation]
    assert slices.shape[0] == expected_count
    np.testing.assert_array_equal(from_slices(slices, orientation), volume)
