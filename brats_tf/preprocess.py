"""Normalization, brain bounding-box crop, and the exact paste-back (METHOD §1)."""

from dataclasses import dataclass

import numpy as np

from brats_tf.errors import DataError

NORMALIZATIONS = ("median", "zscore", "none")

# Decision (BUILD_NOTES): median-normalized intensities are multiplied by this constant so
# that brain tissue lands around 1-4, the range of the 2D networks' pre-softmax outputs.
DEFAULT_MEDIAN_SCALE = 2.0
DEFAULT_CROP_MARGIN = 4


@dataclass(frozen=True)
class CropBox:
    """Half-open voxel box [start, stop) inside a volume of `full_shape`."""
    start: tuple
    stop: tuple
    full_shape: tuple

    @property
    def shape(self):
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def slices(self):
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def to_json(self):
        return {"start": list(self.start), "stop": list(self.stop), "full_shape": list(self.full_shape)}

    @classmethod
    def from_json(cls, d):
        return cls(tuple(d["start"]), tuple(d["stop"]), tuple(d["full_shape"]))


def brain_mask(image, mask=None):
    """The brain: the mask file when given, else voxels non-zero in any modality."""
    if mask is not None:
        return mask.astype(bool)
    return np.any(image != 0, axis=-1)


def brain_box(brain, margin=DEFAULT_CROP_MARGIN, path="case"):
    """Bounding box of the brain plus `margin` voxels, clipped to the volume."""
    coords = np.nonzero(brain)
    if coords[0].size == 0:
        raise DataError(path, "empty brain (no non-zero voxels / empty brain mask)")
    start = tuple(max(int(c.min()) - margin, 0) for c in coords)
    stop = tuple(min(int(c.max()) + 1 + margin, n) for c, n in zip(coords, brain.shape))
    return CropBox(start, stop, tuple(brain.shape))


def crop(volume, box):
    """Crops the spatial axes (first three) of `volume` to `box`."""
    return volume[box.slices]


def paste(cropped, box, fill=0):
    """Inverse of `crop`: puts a cropped array back into a `fill`ed full-size grid."""
    full = np.full(tuple(box.full_shape) + cropped.shape[3:], fill, dtype=cropped.dtype)
    full[box.slices] = cropped
    return full


def normalize(image, brain, method="median", scale=DEFAULT_MEDIAN_SCALE, modalities=None, path="case",
              channel_paths=()):
    """Per-modality intensity normalization inside the brain; outside it is set to 0.

    median: x / median(brain voxels) * scale  [M §3.1]   (brain = mask, or non-zero voxels)
    zscore: (x - mean) / std over brain voxels           [S]
    none:   unchanged inside the brain
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; use one of {NORMALIZATIONS}")
    out = np.zeros(image.shape, dtype=np.float32)
    for k in range(image.shape[-1]):
        channel = image[..., k]
        name = modalities[k] if modalities else f"channel {k}"
        where = channel_paths[k] if channel_paths else path
        # Without a mask file, 'brain' is the union over modalities: use this modality's
        # own non-zero voxels for its statistics, as the paper's median does.
        inside = brain & (channel != 0)
        values = channel[inside]
        if values.size == 0:
            raise DataError(where, f"{name} is all zero inside the brain")
        if method == "median":
            median = float(np.median(values))
            if median <= 0:
                raise DataError(where, f"{name} has a non-positive median ({median:.3g}) inside the brain; "
                                      f"use --normalization=zscore for data with negative intensities")
            out[..., k] = np.where(brain, channel * (scale / median), 0)
        elif method == "zscore":
            mean, std = float(values.mean()), float(values.std())
            out[..., k] = np.where(brain, (channel - mean) / max(std, 1e-8), 0)
        else:
            out[..., k] = np.where(brain, channel, 0)
    return out


@dataclass
class PreparedCase:
    """A case ready for the networks: normalized and cropped, with what is needed to undo the crop."""
    case_id: str
    image: np.ndarray       # (x, y, z, K) float32, cropped
    label: np.ndarray       # (x, y, z) uint8 or None, cropped
    brain: np.ndarray       # (x, y, z) bool, cropped
    box: CropBox
    modalities: tuple


def prepare_case(loaded, normalization="median", scale=DEFAULT_MEDIAN_SCALE, margin=DEFAULT_CROP_MARGIN):
    """Brain crop first (the big saving), then normalization, for a `LoadedCase`."""
    brain = brain_mask(loaded.image, loaded.mask)
    box = brain_box(brain, margin, path=loaded.case_id)
    brain_c = crop(brain, box)
    image = normalize(crop(loaded.image, box), brain_c, normalization, scale,
                      loaded.modalities, path=loaded.case_id, channel_paths=loaded.paths)
    label = crop(loaded.label, box) if loaded.label is not None else None
    return PreparedCase(loaded.case_id, image, label, brain_c, box, loaded.modalities)
