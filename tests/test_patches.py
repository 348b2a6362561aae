"""3D patch sampling: class presence per batch, alignment of labels with inputs, balance, seeding."""

import numpy as np
import pytest

from brats_tf.preprocess import PreparedCase
from brats_tf.records.patches import PatchSampler


def _case(seed, shape=(30, 28, 26), with_enhancing=True):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    c = rng.integers(8, 18, size=3)
    label[c[0] - 5:c[0] + 5, c[1] - 5:c[1] + 5, c[2] - 4:c[2] + 4] = 2
    label[c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 2, c[2] - 2:c[2] + 2] = 3 if with_enhancing else 1
    label[c[0], c[1], c[2]] = 1
    # The image encodes each voxel's coordinates, so patches can be checked for alignment.
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float16)
    brain = np.zeros(shape, bool)
    brain[2:-2, 2:-2, 2:-2] = True
    return PreparedCase(f"c{seed}", grid, label, brain, None, ("a", "b", "c"))


def test_every_batch_holds_every_class_and_labels_align():
    cases = [_case(0), _case(1, with_enhancing=False)]
    features = [np.full(c.label.shape + (2,), i + 7, np.float16) for i, c in enumerate(cases)]
    sampler = PatchSampler(cases, input_size=16, label_size=6, batch_size=5, seed=1, features=features)
    assert sampler.num_channels == 5
    for b in range(40):
        x, y = sampler.batch(b)
        assert x.shape == (5, 16, 16, 16, 5) and y.shape == (5, 6, 6, 6)
        assert set(np.unique(y)) == {0, 1, 2, 3}
        for i in range(5):
            center = x[i, 8, 8, 8, :3].astype(int)        # coordinates of the patch center voxel
            if (x[i, 8, 8, 8, 3:] == 0).all():
                continue                                   # center in padding: no case voxel there
            case = int(x[i, 8, 8, 8, 3]) - 7
            expected = np.pad(cases[case].label, 20)[tuple(slice(v + 20 - 3, v + 20 + 3) for v in center)]
            np.testing.assert_array_equal(y[i], expected)


def test_tumor_balanced_sampling_is_half_and_half():
    sampler = PatchSampler([_case(0), _case(2)], input_size=8, label_size=4, batch_size=8, seed=0,
                           sampling="tumor_balanced", binary=True)
    fractions = np.concatenate([sampler.batch(b)[1].reshape(8, -1).mean(axis=1) for b in range(30)])
    majority_tumor = (fractions > 0.5).mean()
    assert 0.4 <= majority_tumor <= 0.6
    assert set(np.unique(sampler.batch(0)[1])) <= {0, 1}


def test_seeded_and_resumable():
    a = PatchSampler([_case(0)], 10, 4, 4, seed=3)
    b = PatchSampler([_case(0)], 10, 4, 4, seed=3)
    np.testing.assert_array_equal(a.batch(7)[0], b.batch(7)[0])
    streamed = [y for _, y in a.dataset(first_batch=7, num_batches=1).as_numpy_iterator()]
    np.testing.assert_array_equal(streamed[0], a.batch(7)[1])
    with pytest.raises(ValueError):
        PatchSampler([_case(0)], 10, 5, 4)
