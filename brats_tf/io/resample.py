"""A dataset on a coarser grid, and label maps back onto the original one.

The `cpu` experiment scale trains on real 240 x 240 x 155 scans at 2 mm (an eighth of the
voxels) and scores its predictions on the original 1 mm grid:

    resample_dataset(data_dir, out_dir, layout, layout_file, spacing_mm=2.0)
    labels_on_grid(labels, geometry, original_geometry)      # nearest neighbour, exact inverse

The coarse grid covers the same field of view: each axis of n voxels of spacing s gets
m = round(n * s / spacing_mm) voxels of spacing n * s / m, and voxel i's centre lies at the
original voxel coordinate (i + 0.5) * n / m - 0.5 (scipy's `grid_mode`). Images are
interpolated linearly (at a factor of 2 that averages each 2 x 2 x 2 block), labels and
brain masks take the nearest voxel.
"""

import os

import numpy as np
import scipy.ndimage

from brats_tf.errors import DataError
from brats_tf.io.cases import discover_cases
from brats_tf.io.files import read_json, write_json
from brats_tf.io.nifti import Geometry, load_volume, save_volume

MANIFEST = "resampled.json"


def coarse_geometry(geometry, spacing_mm):
    """The Geometry of the grid at `spacing_mm` covering `geometry`'s field of view."""
    old_shape = np.array(geometry.shape, dtype=float)
    shape = tuple(int(max(1, round(n * s / spacing_mm))) for n, s in zip(geometry.shape, geometry.spacing))
    factor = old_shape / np.array(shape)
    step = np.eye(4)
    step[:3, :3] = np.diag(factor)
    step[:3, 3] = (factor - 1) / 2
    affine = geometry.affine @ step
    header = geometry.header.copy()
    header.set_data_shape(shape)
    header.set_zooms(tuple(float(z) for z in np.array(geometry.spacing) * factor))
    return Geometry(shape, affine, header)


def resample_volume(data, geometry, spacing_mm, nearest):
    """(data on the coarse grid, its Geometry); `nearest` for labels and masks."""
    target = coarse_geometry(geometry, spacing_mm)
    if nearest:
        return labels_on_grid(data, geometry, target), target
    zoom = np.array(target.shape) / np.array(geometry.shape)
    out = scipy.ndimage.zoom(data.astype(np.float32, copy=False), zoom, order=1, mode="nearest", grid_mode=True)
    return out, target


def labels_on_grid(labels, geometry, target):
    """`labels` (on `geometry`) on the grid of `target`: each target voxel takes the value of
    the nearest source voxel. Both grids must be axis-aligned to each other (a coarse grid of
    the other, or the same grid), which any pair made by `coarse_geometry` is."""
    to_source = np.linalg.inv(geometry.affine) @ target.affine
    linear = to_source[:3, :3]
    if not np.allclose(linear, np.diag(np.diag(linear)), atol=1e-6):
        raise DataError("label map", "grids are not axis-aligned to each other; cannot map labels between them")
    index = []
    for axis in range(3):
        i = np.arange(target.shape[axis]) * linear[axis, axis] + to_source[axis, 3]
        index.append(np.clip(np.floor(i + 0.5).astype(np.int64), 0, labels.shape[axis] - 1))
    return labels[np.ix_(*index)]


def resample_dataset(data_dir, out_dir, layout, layout_file, spacing_mm):
    """A copy of the dataset at `spacing_mm` in `out_dir`, same folders and file names (so the
    same layout reads it); cases already done (`resampled.json`) are skipped. Returns out_dir."""
    manifest_path = os.path.join(out_dir, MANIFEST)
    manifest = read_json(manifest_path, {})
    wanted = {"source": os.path.abspath(data_dir), "spacing_mm": float(spacing_mm)}
    if {k: manifest.get(k) for k in wanted} != wanted:
        manifest = dict(wanted, cases=[])
    for case in discover_cases(data_dir, layout, layout_file):
        if case.case_id in manifest["cases"]:
            continue
        sources = [(s, False) for s in case.images.values()]
        sources += [(s, True) for s in (case.label, case.mask) if s is not None]
        for source, nearest in sources:
            if source.channel is not None:
                raise DataError(source.path, "modalities share one 4D file; resampling needs a file per modality")
            data, geometry = load_volume(source.path)
            out, target = resample_volume(data, geometry, spacing_mm, nearest)
            save_volume(os.path.join(out_dir, os.path.relpath(source.path, data_dir)), out, target,
                        dtype=data.dtype)
        manifest["cases"].append(case.case_id)
        write_json(manifest_path, manifest)
    return out_dir
