"""NIfTI reading and writing with nibabel: geometry kept, errors that name the file,
writes that appear only when complete.

Reading checks a file's integrity before nibabel sees it. nibabel reads exactly the bytes
an image needs and never reaches a gzip stream's trailer, so a `.nii.gz` damaged in the
middle of its stream would load as silently wrong voxels (BUILD_NOTES, "Reliability, first
part"). `load_header` therefore reads a `.nii.gz` once, decompresses the whole stream with
zlib (every member's CRC-32 and length are checked, truncation and trailing bytes are
errors) and hands nibabel the decompressed bytes: the image's `dataobj` stays a lazy proxy,
over memory instead of the file. For `.nii` and `.nii.gz` alike, the header must describe
real-number voxels that are present in the file before any data is read.
"""

import contextlib
import logging
import os
import struct
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from brats_tf.errors import DataError
from brats_tf.io.files import atomic_write

# nibabel raises a variety of exceptions for damaged headers and data; all mean "unreadable".
_READ_ERRORS = (OSError, EOFError, ValueError, TypeError, OverflowError, zlib.error, struct.error,
                nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError,
                nib.spatialimages.HeaderTypeError, nib.spatialimages.ImageDataError,
                nib.wrapstruct.WrapStructError)

_GZIP_MAGIC = b"\x1f\x8b"
# gzip header flags (RFC 1952 §2.3.1)
_FHCRC, _FEXTRA, _FNAME, _FCOMMENT, _FRESERVED = 0x02, 0x04, 0x08, 0x10, 0xE0
_IMAGE_CLASSES = (nib.Nifti1Image, nib.Nifti2Image)   # single-file NIfTI, the order nib.load tries
_HEAD = 540                                            # bytes that hold either header
_NUMERIC_KINDS = "biuf"                                # bool, int, uint, float: no complex, no RGB


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
    """Opens a NIfTI file after checking its integrity; returns the nibabel image, data not
    yet read (`dataobj` is a lazy proxy). A `.nii.gz` is read once and its whole gzip stream
    verified, and the proxy reads the decompressed bytes in memory; a `.nii` is memory-mapped
    as nibabel does (it has no checksum to verify). Either way the header must describe bytes
    that are present. Any damage raises DataError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "file not found")
    try:
        if path.endswith(".gz"):
            with open(path, "rb") as f:
                raw = _gunzip(path, f.read())
            return _checked_image(path, raw[:_HEAD], len(raw), lambda klass: klass.from_bytes(raw),
                                  "decompressed file")
        with open(path, "rb") as f:
            head = f.read(_HEAD)
        return _checked_image(path, head, os.path.getsize(path), lambda klass: klass.from_filename(path),
                              "file")
    except OSError as err:
        raise DataError(path, f"cannot read the file ({_short(err)})") from None


def load_volume(path, allow_4d=False, dtype=np.float32):
    """Reads a 3D volume (or, with allow_4d, a 4D multi-channel file) and its geometry.

    Returns (array, Geometry); Geometry.shape is the spatial (3D) shape. Damaged files
    (corrupt or truncated gzip stream, a header that does not match the data), wrong
    dimensionality, an empty image and non-finite values or geometry raise DataError naming
    the file.
    """
    img = load_header(path)
    shape = tuple(img.shape)
    if len(shape) == 4 and shape[3] == 1 and not allow_4d:
        shape = shape[:3]
    if len(shape) != 3 and not (allow_4d and len(shape) == 4):
        raise DataError(path, f"expected a {'3D or 4D' if allow_4d else '3D'} image, found shape {img.shape}")
    if 0 in shape:
        raise DataError(path, f"image has no voxels (shape {img.shape})")
    try:
        stored = np.asarray(img.dataobj).reshape(shape)
        affine = img.affine.copy()
    except _READ_ERRORS as err:
        raise DataError(path, f"cannot read image data ({_short(err)})") from None
    header = img.header.copy()
    del img                                   # frees a .nii.gz's bytes before the cast below
    _require_finite(path, stored)             # before a cast to an integer dtype hides NaN
    with np.errstate(over="ignore"):          # float64 beyond float32 becomes inf: reported below
        data = stored.astype(dtype, copy=False)
    if data is not stored:
        _require_finite(path, data)
    if not np.all(np.isfinite(affine)):
        raise DataError(path, "non-finite affine (check the header's pixdim, qform and sform)")
    geometry = Geometry(shape[:3], affine, header)
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


# --- reading: the gzip stream, then the header against the bytes ---------------------------

class _StreamError(Exception):
    """A damaged gzip stream (the message says how)."""


def _gunzip(path, raw):
    """The decompressed bytes of a whole gzip stream (one or more members), each member's
    CRC-32 and length checked, as `gzip.decompress` does (which nibabel's reads never reach)."""
    try:
        return _decompress_members(memoryview(raw))
    except _StreamError as err:
        problem = str(err)
    except zlib.error as err:
        problem = f"corrupt gzip stream: {str(err).split(': ', 1)[-1]}"
    if problem.startswith("corrupt gzip stream ("):
        raise DataError(path, problem)
    # Truncated or undecodable: say whether the NIfTI header survived (then the data did not).
    where = "cannot read image data" if _header_survives(raw) else "not a readable NIfTI file"
    raise DataError(path, f"{where} ({problem})")


def _decompress_members(view):
    members, pos = [], 0
    while True:
        start = _skip_member_header(view, pos)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        data = inflater.decompress(view[start:])
        if not inflater.eof:
            raise _StreamError("truncated gzip stream: it ends before its end-of-stream marker")
        trailer = inflater.unused_data
        if len(trailer) < 8:
            raise _StreamError("truncated gzip stream: its trailer (CRC and length) is cut off")
        crc, size = struct.unpack("<II", trailer[:8])
        if crc != zlib.crc32(data):
            raise _StreamError("corrupt gzip stream (CRC check failed)")
        if size != len(data) & 0xFFFFFFFF:
            raise _StreamError("corrupt gzip stream (length check failed)")
        members.append(data)
        pos = len(view) - len(trailer) + 8
        while pos < len(view) and view[pos] == 0:   # zero padding after a member is allowed
            pos += 1
        if pos == len(view):
            return members[0] if len(members) == 1 else b"".join(members)
        if bytes(view[pos:pos + 2]) != _GZIP_MAGIC:
            raise _StreamError(f"corrupt gzip stream ({len(view) - pos} bytes after the last "
                               f"member are not gzip data)")


def _skip_member_header(view, pos):
    """Offset of a member's compressed data; checks the gzip header (RFC 1952)."""
    def need(n):
        if pos + n > len(view):
            raise _StreamError("truncated gzip stream: it ends inside a gzip header")
    start = pos
    need(10)
    if bytes(view[pos:pos + 2]) != _GZIP_MAGIC:
        raise _StreamError("not a gzip stream (a .gz file must start with bytes 1f 8b)")
    method, flags = view[pos + 2], view[pos + 3]
    if method != 8 or flags & _FRESERVED:
        raise _StreamError(f"corrupt gzip stream: unknown method {method} or flags {flags:#04x} "
                           f"in a gzip header")
    pos += 10
    if flags & _FEXTRA:
        need(2)
        pos += 2 + struct.unpack("<H", view[pos:pos + 2])[0]
    for flag in (_FNAME, _FCOMMENT):
        if flags & flag:
            while True:
                need(1)
                pos += 1
                if view[pos - 1] == 0:
                    break
    if flags & _FHCRC:
        need(2)
        if struct.unpack("<H", view[pos:pos + 2])[0] != zlib.crc32(view[start:pos]) & 0xFFFF:
            raise _StreamError("corrupt gzip stream: header CRC check failed")
        pos += 2
    need(0)    # FEXTRA's length may point past the end
    return pos


def _header_survives(raw):
    """Whether the first bytes of a damaged stream still decompress into a NIfTI header."""
    try:
        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw, _HEAD)
    except zlib.error:
        return False
    return _image_class(head) is not None


def _image_class(raw):
    for klass in _IMAGE_CLASSES:
        if klass.header_class.may_contain_header(raw[:klass.header_class.sizeof_hdr]):
            return klass
    return None


def _checked_image(path, head, size, open_as, what):
    """The image `open_as(klass)` opens, once its header (whose first bytes are `head`) is
    known to describe real-number voxels inside the `size` bytes of the `what` (the file, or
    what a .nii.gz decompresses to)."""
    klass = _image_class(head)
    if klass is None:
        raise DataError(path, "not a readable NIfTI file (no NIfTI-1 or NIfTI-2 header)")
    try:
        with _nibabel_quiet():
            img = open_as(klass)
        proxy = img.dataobj        # the header as read (img.header's offset is reset to 0)
        shape, dtype, offset = tuple(proxy.shape), np.dtype(proxy.dtype), int(proxy.offset)
    except _READ_ERRORS as err:
        raise DataError(path, f"not a readable NIfTI file ({_short(err)})") from None
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
        raise DataError(path, f"unsupported NIfTI data type {img.header.get_value_label('datatype')} "
                              f"(only real numbers are images here)")
    if any(n < 0 for n in shape):
        raise DataError(path, f"not a readable NIfTI file (negative dimension in {shape})")
    needed = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
    if needed > size:
        raise DataError(path, f"cannot read image data (the header's {shape} {dtype} voxels at "
                              f"offset {offset} need {needed} bytes, the {what} has {size}: "
                              f"truncated file or damaged header)")
    return img


@contextlib.contextmanager
def _nibabel_quiet():
    """nibabel logs each header problem it finds (fixed or raised) on stderr, twice through
    absl; a problem that stops the load is our one-line DataError instead."""
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _require_finite(path, data):
    if data.dtype.kind == "f":
        bad = data.size - np.count_nonzero(np.isfinite(data))
        if bad:
            raise DataError(path, f"{bad} non-finite voxels (NaN or Inf)")


def _short(err):
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]
