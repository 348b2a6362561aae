"""2D slices from whole cropped cases: orientation handling, class-aware batch sampling, padding.

Training batches are drawn so that every class present anywhere in the training set is
present in every batch ([M] assumes it for the batch-adaptive loss weights): one slice
containing each class is picked first, the rest of the batch at random. Batch b of a run
is drawn from a generator seeded by (seed, b), so a resumed run sees the same stream.
"""

import numpy as np

from brats_tf.constants import NUM_CLASSES, ORIENTATIONS
from brats_tf.records.batching import batch_dataset

# Volume axis that indexes slices: axial slices are x-y planes (fixed z), etc.
SLICE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}


def to_slices(volume, orientation):
    """(X, Y, Z, ...) -> (num_slices, H, W, ...) in the given orientation."""
    return np.moveaxis(volume, SLICE_AXIS[orientation], 0)


def from_slices(slices, orientation):
    """Inverse of `to_slices`."""
    return np.moveaxis(slices, 0, SLICE_AXIS[orientation])


def padded_size(size, multiple):
    return int(-(-size // multiple) * multiple)


def pad_to(array, shape):
    """Zero-pads the two leading spatial axes of a (H, W, ...) array at the end to `shape`."""
    pads = [(0, shape[0] - array.shape[0]), (0, shape[1] - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pads)


class SliceSampler:
    """Class-aware random batches of full (padded) slices of one orientation.

    cases: list of PreparedCase-like objects with .image (X,Y,Z,K) and .label (X,Y,Z).
    """

    def __init__(self, cases, orientation, batch_size, seed=0, multiple=1, slice_shape=None,
                 tumor_fraction=0.5):
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        self.orientation, self.batch_size, self.seed = orientation, batch_size, seed
        self.images = [to_slices(c.image, orientation) for c in cases]
        self.labels = [to_slices(c.label, orientation) for c in cases]
        self.num_channels = self.images[0].shape[-1]
        self.slice_shape = tuple(slice_shape) if slice_shape else tuple(
            padded_size(max(im.shape[d] for im in self.images), multiple) for d in (1, 2))
        self.tumor_fraction = tumor_fraction
        self._index_slices()

    def _index_slices(self):
        """(case, slice) pairs and, per class, the pairs whose slice contains that class."""
        pairs, presence = [], []
        for case_index, labels in enumerate(self.labels):
            flat = labels.reshape(labels.shape[0], -1)
            for slice_index in range(flat.shape[0]):
                counts = np.bincount(flat[slice_index], minlength=NUM_CLASSES)
                pairs.append((case_index, slice_index))
                presence.append(counts > 0)
        self.pairs = np.asarray(pairs)
        presence = np.asarray(presence)
        self.slices_with_class = [np.flatnonzero(presence[:, c]) for c in range(NUM_CLASSES)]
        self.tumor_slices = np.flatnonzero(presence[:, 1:].any(axis=1))
        # Classes the data allow in every batch (present in some slice); tumor classes first.
        self.guaranteed_classes = [c for c in (1, 2, 3, 0) if self.slices_with_class[c].size]
        if self.batch_size < len(self.guaranteed_classes):
            raise ValueError(f"batch_size {self.batch_size} cannot hold all {len(self.guaranteed_classes)} classes")

    def batch_indices(self, batch_number):
        rng = np.random.default_rng([self.seed, batch_number])
        chosen = [rng.choice(self.slices_with_class[c]) for c in self.guaranteed_classes]
        for _ in range(self.batch_size - len(chosen)):
            pool = self.tumor_slices if (self.tumor_slices.size and rng.random() < self.tumor_fraction) \
                else np.arange(len(self.pairs))
            chosen.append(rng.choice(pool))
        return rng.permutation(np.asarray(chosen))

    def batch(self, batch_number):
        """(images (B,H,W,K) float32, labels (B,H,W) int32) for batch `batch_number`."""
        x = np.zeros((self.batch_size,) + self.slice_shape + (self.num_channels,), np.float32)
        y = np.zeros((self.batch_size,) + self.slice_shape, np.int32)
        for i, pair_index in enumerate(self.batch_indices(batch_number)):
            case_index, slice_index = self.pairs[pair_index]
            image = self.images[case_index][slice_index]
            h, w = image.shape[:2]
            x[i, :h, :w] = image
            y[i, :h, :w] = self.labels[case_index][slice_index]
        return x, y

    def dataset(self, first_batch=0, num_batches=None):
        """tf.data.Dataset of batches starting at `first_batch` (resume), prefetched."""
        return batch_dataset(self.batch, (self.batch_size,) + self.slice_shape + (self.num_channels,),
                             (self.batch_size,) + self.slice_shape, first_batch, num_batches)
