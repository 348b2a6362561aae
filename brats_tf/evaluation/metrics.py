"""Per-case segmentation metrics per region (METHOD §7), in NumPy/SciPy on hard labels.

Conventions (BraTS), defined here once:
- Dice = 2|P∩R| / (|P|+|R|); 1 when both P and R are empty, 0 when exactly one is.
- HD95 (mm) follows MedPy's `medpy.metric.binary.hd95`: surface voxels are the mask
  minus its erosion by the 6-connected structure; distances go from every surface
  voxel of each mask to the nearest surface voxel of the other (Euclidean, with the
  voxel spacing); HD95 is the 95th percentile (linear interpolation) of the pooled
  distances of both directions. 0 when both masks are empty, 373.13 when exactly one is.
- Sensitivity = |P∩R| / |R|; 1 when R is empty (nothing to miss; a false positive
  shows in Dice and specificity instead).
- Specificity = TN / (TN + FP) over the **whole volume**, background outside the brain
  included, as BraTS computes it; 1 when the reference covers the whole volume.

Pure math on arrays: reading files, pairing cases and the CSV are in `evaluate.py`.
"""

import numpy as np
from scipy import ndimage

from brats_tf.constants import HD95_ONE_EMPTY_MM, REGIONS

METRICS = ("Dice", "Sensitivity", "Specificity", "Hausdorff95")
CSV_REGIONS = ("ET", "WT", "TC")     # region order of the BraTS evaluation CSV
COLUMNS = tuple(f"{metric}_{region}" for metric in METRICS for region in CSV_REGIONS)

# Surface voxels are found with the same structure as MedPy's default (connectivity 1).
_SURFACE_STRUCTURE = ndimage.generate_binary_structure(3, 1)


def region_mask(labels, region):
    """Boolean mask of a region ("WT", "TC", "ET") of an internal-convention label map."""
    return np.isin(labels, REGIONS[region])


def dice(pred, ref):
    pred_size, ref_size = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if pred_size + ref_size == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & ref)) / (pred_size + ref_size)


def sensitivity(pred, ref):
    ref_size = int(np.count_nonzero(ref))
    if ref_size == 0:
        return 1.0
    return int(np.count_nonzero(pred & ref)) / ref_size


def specificity(pred, ref):
    negatives = ref.size - int(np.count_nonzero(ref))
    if negatives == 0:
        return 1.0
    false_positives = int(np.count_nonzero(pred & ~ref))
    return (negatives - false_positives) / negatives


def hd95(pred, ref, spacing=(1.0, 1.0, 1.0)):
    """95th-percentile symmetric surface distance in mm (MedPy's definition)."""
    pred_any, ref_any = bool(pred.any()), bool(ref.any())
    if not pred_any and not ref_any:
        return 0.0
    if pred_any != ref_any:
        return HD95_ONE_EMPTY_MM
    distances = surface_distances(pred, ref, spacing)
    return float(np.percentile(np.concatenate(distances), 95))


def surface_distances(a, b, spacing=(1.0, 1.0, 1.0)):
    """Distances (mm) from a's surface voxels to b's surface, and from b's to a's.

    Works on the union bounding box of both masks, which is what makes it fast on
    240x240x155 volumes, with the same result as on the full grid: every surface voxel
    lies in the box, so the distance transforms there are exact; and a mask voxel on
    the box's edge has its outward neighbour outside both masks, so it is a surface
    voxel either way (the erosion treats outside the array as background).
    """
    box = _union_box(a, b)
    a, b = a[box], b[box]
    a_surface = a & ~ndimage.binary_erosion(a, structure=_SURFACE_STRUCTURE)
    b_surface = b & ~ndimage.binary_erosion(b, structure=_SURFACE_STRUCTURE)
    spacing = tuple(float(s) for s in spacing)
    to_b = ndimage.distance_transform_edt(~b_surface, sampling=spacing)[a_surface]
    to_a = ndimage.distance_transform_edt(~a_surface, sampling=spacing)[b_surface]
    return to_b, to_a


def case_metrics(pred_labels, ref_labels, spacing=(1.0, 1.0, 1.0)):
    """All metrics of one case: {"Dice_ET": ..., "Hausdorff95_TC": ...} (the CSV columns).

    pred_labels and ref_labels are internal-convention label maps on the same grid;
    spacing is the voxel size in mm along each axis.
    """
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from reference {ref_labels.shape}")
    row = {}
    for region in CSV_REGIONS:
        pred, ref = region_mask(pred_labels, region), region_mask(ref_labels, region)
        row[f"Dice_{region}"] = dice(pred, ref)
        row[f"Sensitivity_{region}"] = sensitivity(pred, ref)
        row[f"Specificity_{region}"] = specificity(pred, ref)
        row[f"Hausdorff95_{region}"] = hd95(pred, ref, spacing)
    return {column: row[column] for column in COLUMNS}


def _union_box(a, b, margin=0):
    """Slices of the bounding box of a | b grown by `margin`, clipped to the grid."""
    union = a | b
    box = []
    for axis in range(union.ndim):
        other_axes = tuple(i for i in range(union.ndim) if i != axis)
        present = np.flatnonzero(union.any(axis=other_axes))
        start = max(int(present[0]) - margin, 0)
        stop = min(int(present[-1]) + 1 + margin, union.shape[axis])
        box.append(slice(start, stop))
    return tuple(box)


# ---------------------------------------------------------------------------------
