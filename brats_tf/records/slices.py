"""2D slices of whole cropped cases in NumPy: orientation handling and padding (inference).
Training slices are cut in-graph by `records.streams.SliceStream`."""

import numpy as np

from brats_tf.constants import SLICE_AXIS


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
