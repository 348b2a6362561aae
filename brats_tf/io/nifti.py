"""NIfTI reading and writing with nibabel: geometry kept, errors that name the file,
writes that appear only when complete."""

import gzip
import os
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from brats_tf.errors import DataError
from brats_tf.io.files import atomic_write

# nibabel raises a variety of exceptions for damaged files; all mean "unreadable".
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile,
                nib.filebasedimages.ImageFileError)


@dataclass(frozen=True)
class Geometry:
    """What is needed to write an output aligned with an input image."""
    shape: tuple
    affine: np.ndarray
    header: nib.nifti1.Nifti1Header

    @property
    def spacing(self):
        return tuple(float(z) for z in self.header.get_zooms()[:3])


def load_header(path):
    """Opens a NIfTI file lazily; returns the nibabel image (data not yet read)."""
    if not os.path.isfile(path):
        raise DataError(path, "file not found")
    try:
        return nib.load(path)
    except _READ_ERRORS as err:
        raise DataError(path, f"not a readable NIfTI file ({_short(err)})") from None


def load_volume(path, allow_4d=False, dtype=np.float32):
    """Reads a 3D volume (or, with allow_4d, a 4D multi-channel file) and its geometry.

    Returns (array, Geometry); Geometry.shape is the spatial (3D) shape. Damaged files
    (corrupt gzip, truncated data), wrong dimensionality and non-finite values raise
    DataError naming the file.
    """
    img = load_header(path)
    shape = tuple(img.shape)
    if len(shape) == 4 and shape[3] == 1 and not allow_4d:
        shape = shape[:3]
    if len(shape) != 3 and not (allow_4d and len(shape) == 4):
        raise DataError(path, f"expected a {'3D or 4D' if allow_4d else '3D'} image, found shape {img.shape}")
    try:
        data = np.asarray(img.dataobj).reshape(shape)
    except _READ_ERRORS as err:
        raise DataError(path, f"cannot read image data ({_short(err)})") from None
    data = data.astype(dtype, copy=False)
    if data.dtype.kind == "f":
        bad = np.count_nonzero(~np.isfinite(data))
        if bad:
            raise DataError(path, f"{bad} non-finite voxels (NaN or Inf)")
    geometry = Geometry(shape[:3], img.affine.copy(), img.header.copy())
    return data, geometry


def save_volume(path, data, geometry, dtype=None):
    """Writes `data` with the geometry of an input image, atomically (temp + rename)."""
    data = np.asarray(data if dtype is None else data.astype(dtype))
    header = geometry.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(1.0, 0.0)
    if len(header.get_data_shape()) != data.ndim:
        header.set_data_shape(data.shape)
    img = nib.Nifti1Image(data, geometry.affine, header)
    atomic_write(path, img.to_filename)


def _short(err):
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]
