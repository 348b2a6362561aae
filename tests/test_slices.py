"""Slice sampling: every batch holds every class the data allow; seeded; orientation round trip."""

import numpy as np
import pytest

from brats_tf.preprocess import PreparedCase
from brats_tf.constants import ORIENTATIONS
from brats_tf.records.slices import SliceSampler, from_slices, to_slices


def _case(seed, shape=(20, 18, 16), with_enhancing=True):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    cx, cy, cz = (rng.integers(5, n - 5) for n in shape)
    label[cx - 3:cx + 3, cy - 3:cy + 3, cz - 2:cz + 2] = 2
    label[cx - 1:cx + 1, cy - 1:cy + 1, cz - 1:cz + 1] = 3 if with_enhancing else 1
    label[cx, cy, cz] = 1
    image = rng.normal(size=shape + (2,)).astype(np.float16)
    return PreparedCase(f"c{seed}", image, label, np.ones(shape, bool), None, ("t1", "t2"))


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_every_batch_holds_every_class(orientation):
    cases = [_case(0), _case(1, (22, 15, 17), with_enhancing=False), _case(2)]
    sampler = SliceSampler(cases, orientation, batch_size=4, seed=3, multiple=8)
    assert all(s % 8 == 0 for s in sampler.slice_shape)
    for b in range(50):
        x, y = sampler.batch(b)
        assert x.shape == (4,) + sampler.slice_shape + (2,)
        assert set(np.unique(y)) == {0, 1, 2, 3}, b


def test_class_absent_from_data_is_not_required():
    cases = [_case(1, with_enhancing=False)]
    sampler = SliceSampler(cases, "axial", batch_size=3, seed=0)
    assert sampler.guaranteed_classes == [1, 2, 0]
    for b in range(10):
        assert set(np.unique(sampler.batch(b)[1])) == {0, 1, 2}


def test_seeded_and_resumable():
    cases = [_case(0), _case(2)]
    a = SliceSampler(cases, "coronal", batch_size=4, seed=7)
    b = SliceSampler(cases, "coronal", batch_size=4, seed=7)
    c = SliceSampler(cases, "coronal", batch_size=4, seed=8)
    np.testing.assert_array_equal(a.batch(5)[0], b.batch(5)[0])
    assert not np.array_equal(a.batch(5)[0], c.batch(5)[0])
    # The dataset started at batch 3 yields exactly batches 3, 4 of an uninterrupted stream.
    streamed = [y for _, y in a.dataset(first_batch=3, num_batches=2).as_numpy_iterator()]
    np.testing.assert_array_equal(streamed[0], a.batch(3)[1])
    np.testing.assert_array_equal(streamed[1], a.batch(4)[1])


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_orientation_round_trip(orientation):
    volume = np.arange(4 * 5 * 6 * 2).reshape(4, 5, 6, 2)
    slices = to_slices(volume, orientation)
    expected_count = {"axial": 6, "coronal": 5, "sagittal": 4}[orientation]
    assert slices.shape[0] == expected_count
    np.testing.assert_array_equal(from_slices(slices, orientation), volume)
