"""Lesion-wise BraTS metrics per region, in NumPy/SciPy on hard labels.

Whole-volume Dice and HD95 (`metrics.py`) hide missed or spurious small lesions behind
one large one; the BraTS challenges therefore also score each lesion. A *lesion* is a
connected component of a region mask, with 26-connectivity (the organisers label with
`cc3d.connected_components`, whose default is 26; `scipy.ndimage.label` with a full 3x3x3
structure gives the same components and, on a C-ordered array, the same numbering).

Regions (internal labels 0 background, 1 NCR/NET, 2 edema, 3 enhancing):
ET={3}, WT={1,2,3}, TC={1,3}, and the single labels NETC={1} and SNFH={2}, the names the
organisers' glioma config gives them. Its sixth group, RC (resection cavity, label 4 in
the BraTS 2024+ post-treatment data), has no internal label and is not computed.

rules="brats2026" (default): what the organisers' package `brats-evaluation` 0.0.10
(config `gli`, built on `panoptica` 2.1.7; published for the BraTS 2026 challenges)
computes and its `brats-parse-metrics seg` reports as `lesionwise_*_mean_<region>` and
`all_instance_{tp,fp,fn,f1}_<region>`. Per region:
- Matching: one-to-one, maximising the summed Dice of matched pairs (Hungarian
  assignment, `scipy.optimize.linear_sum_assignment`, on cost 1 - Dice); only pairs that
  overlap with Dice >= 1e-6 can match. Exact ties go by label order (raster order of a
  lesion's first voxel, as cc3d numbers a C-ordered array).
- Per matched pair: Dice, HD95 and NSD of the reference lesion against the prediction
  lesion, alone (other lesions ignored). HD95 is `metrics.hd95`'s (MedPy's) definition,
  which panoptica shares.
  NSD ("normalized surface distance/dice") is panoptica's: the mean of the two
  directional fractions of surface voxels lying within the tolerance of the other
  surface; the tolerance is the smallest voxel spacing (1 mm on BraTS data).
- LesionDice/HD95/NSD = mean over the matched pairs only: a missed (FN) or spurious (FP)
  lesion does not lower them; it shows in the counts TP (matched pairs), FP = #pred
  lesions - TP, FN = #ref lesions - TP, and in LesionF1 = TP / (TP + (FP + FN) / 2).
- No matched pair (TP = 0): Dice 0, NSD 0, HD95 inf, F1 0 -- or NaN for all four when
  both masks are empty. The package writes inf (not 373) into its lesion-wise HD95
  column, and so does this module; no volume threshold applies.

rules="brats2023": the BraTS 2023 lesion-wise rules (github.com/rachitsaluja/
BraTS-2023-Metrics, challenge BraTS-GLI), regions ET, WT, TC only, no NSD or F1:
- Reference lesions closer than the dilation are merged: the reference mask is dilated
  3 times with the 18-connected structure, and each component of the dilated mask makes
  one reference lesion (its original voxels; the reference itself is not changed).
- A reference lesion's matches are all prediction lesions that touch its own 3x
  dilation (a prediction lesion may match several); its Dice and HD95 are computed
  against their union, or are 0 and 374 mm when none touches.
- Reference lesions of volume <= 50 mm^3 are left out of the scores and of TP/FN
  (a prediction lesion touching one is still not a false positive).
- FP = prediction lesions touching no reference lesion's dilation; each adds a 0 to the
  Dice mean and 374 mm to the HD95 mean: Dice = sum(Dice) / (#kept + FP), HD95 =
  (sum(HD95) + 374 FP) / (#kept + FP); Dice 1 and HD95 0 when that denominator is 0.
- Difference kept on purpose: HD95 here is MedPy's voxel-surface definition (as in
  `metrics.py`), while the 2023 code used DeepMind's `surface_distance` (surfel-area
  weighted); the two differ slightly on the same masks.

Spacing is the voxel size in mm along each array axis; it scales all distances and the
2023 volume threshold (the dilation counts voxels, as in the 2023 code).
"""

import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from brats_tf.constants import EDEMA, NCR_NET, REGIONS
from brats_tf.evaluation.metrics import _union_box, surface_distances

RULES = ("brats2026", "brats2023")
LESION_REGIONS = {**REGIONS, "NETC": (NCR_NET,), "SNFH": (EDEMA,)}
REGIONS_BY_RULES = {"brats2026": ("ET", "WT", "TC", "NETC", "SNFH"), "brats2023": ("ET", "WT", "TC")}
METRICS_BY_RULES = {
    "brats2026": ("LesionDice", "LesionHD95", "LesionNSD", "LesionF1", "LesionTP", "LesionFP", "LesionFN"),
    "brats2023": ("LesionDice", "LesionHD95", "LesionTP", "LesionFP", "LesionFN"),
}

MATCH_MIN_DICE = 1e-6                 # panoptica MaxBipartiteMatching threshold in the gli config
BRATS2023_DILATION_ITERATIONS = 3     # BraTS-GLI dilation factor
BRATS2023_MIN_VOLUME_MM3 = 50.0       # BraTS-GLI: lesions <= 50 mm^3 are not scored
BRATS2023_HD95_PENALTY_MM = 374.0

_LESION_STRUCTURE = ndimage.generate_binary_structure(3, 3)      # 26-connectivity
_DILATION_STRUCTURE = ndimage.generate_binary_structure(3, 2)    # 18-connectivity (2023)


class LesionPair(NamedTuple):
    """One scored reference lesion: its label(s), the matched prediction label(s), its scores."""
    ref: tuple
    pred: tuple
    dice: float
    hd95: float
    nsd: float     # NaN under brats2023


def columns(rules="brats2026"):
    """CSV column names of `lesionwise_metrics` for these rules: LesionDice_ET, ..."""
    if rules not in RULES:
        raise ValueError(f"unknown lesion-wise rules {rules!r}; expected one of {RULES}")
    per_region = tuple(f"{metric}_{region}" for metric in METRICS_BY_RULES[rules]
                       for region in REGIONS_BY_RULES[rules])
    # The NSD tolerance (mm) depends on the case's spacing, so it is recorded with it.
    return per_region + (("LesionNSDTolerance",) if rules == "brats2026" else ())


COLUMNS = columns("brats2026")


def lesionwise_metrics(pred_labels, ref_labels, spacing=(1.0, 1.0, 1.0), rules="brats2026", nsd_tolerance=None):
    """Lesion-wise metrics of one case: {"LesionDice_ET": ..., "LesionTP_WT": ...} (`columns(rules)`).

    pred_labels and ref_labels are internal-convention label maps on the same grid;
    nsd_tolerance (mm) defaults to the smallest voxel spacing, as the organisers use.
    """
    _check_rules(rules)
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from reference {ref_labels.shape}")
    spacing = tuple(float(s) for s in spacing)
    tolerance = min(spacing) if nsd_tolerance is None else float(nsd_tolerance)
    row = {"LesionNSDTolerance": tolerance}
    for region in REGIONS_BY_RULES[rules]:
        pred = np.isin(pred_labels, LESION_REGIONS[region])
        ref = np.isin(ref_labels, LESION_REGIONS[region])
        result = region_lesionwise(pred, ref, spacing, rules, tolerance)
        for metric in METRICS_BY_RULES[rules]:
            row[f"{metric}_{region}"] = result[metric]
    return {column: row[column] for column in columns(rules)}


def region_lesionwise(pred, ref, spacing=(1.0, 1.0, 1.0), rules="brats2026", nsd_tolerance=None):
    """Lesion-wise metrics of one region's boolean masks: {"LesionDice": ..., "LesionTP": ..., "pairs": [...]}.

    "pairs" lists the scored reference lesions as `LesionPair`s, for inspection; labels
    are those of `label_lesions` on the masks' bounding box (merged reference in 2023).
    """
    _check_rules(rules)
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not (pred.any() or ref.any()):
        return _empty_result(rules)
    # Lesions never reach beyond the masks' bounding box; the 2023 dilation needs a margin.
    box = _union_box(pred, ref, margin=BRATS2023_DILATION_ITERATIONS + 1)
    spacing = tuple(float(s) for s in spacing)
    if rules == "brats2023":
        return _brats2023(pred[box], ref[box], spacing)
    tolerance = min(spacing) if nsd_tolerance is None else float(nsd_tolerance)
    return _brats2026(pred[box], ref[box], spacing, tolerance)


def label_lesions(mask):
    """(labels, count): 26-connected components numbered in C-order raster scan, like cc3d."""
    labels, count = ndimage.label(mask, structure=_LESION_STRUCTURE)
    return labels, int(count)


def match_lesions(pred_lesions, ref_lesions):
    """One-to-one matches [(ref label, pred label)] maximising the summed Dice (panoptica's rule)."""
    n_ref, n_pred = int(ref_lesions.max()), int(pred_lesions.max())
    if n_ref == 0 or n_pred == 0:
        return []
    ref_ids, pred_ids, dice = _overlap_dice(pred_lesions, ref_lesions, n_pred)
    # Same cost matrix as panoptica (rows: ref labels ascending, columns: pred labels),
    # so that linear_sum_assignment breaks ties the same way.
    cost = np.full((n_ref, n_pred), 1.0 + 1e-6)
    candidate = dice >= MATCH_MIN_DICE
    cost[ref_ids[candidate] - 1, pred_ids[candidate] - 1] = 1.0 - dice[candidate]
    rows, cols = linear_sum_assignment(cost)
    return [(int(r) + 1, int(c) + 1) for r, c in zip(rows, cols) if cost[r, c] < 1.0]


def _overlap_dice(pred_lesions, ref_lesions, n_pred):
    """(ref ids, pred ids, Dice) of every overlapping lesion pair, from one overlap table."""
    both = (ref_lesions > 0) & (pred_lesions > 0)
    key = ref_lesions[both].astype(np.int64) * (n_pred + 1) + pred_lesions[both]
    keys, intersections = np.unique(key, return_counts=True)
    ref_ids, pred_ids = keys // (n_pred + 1), keys % (n_pred + 1)
    ref_sizes, pred_sizes = np.bincount(ref_lesions.ravel()), np.bincount(pred_lesions.ravel())
    dice = 2.0 * intersections / (ref_sizes[ref_ids] + pred_sizes[pred_ids])
    return ref_ids, pred_ids, dice


def pair_metrics(pred, ref, spacing, nsd_tolerance=None):
    """(Dice, HD95, NSD) of two non-empty boolean masks; NSD is NaN without a tolerance."""
    overlap = int(np.count_nonzero(pred & ref))
    dice = 2.0 * overlap / (int(np.count_nonzero(pred)) + int(np.count_nonzero(ref)))
    ref_to_pred, pred_to_ref = surface_distances(ref, pred, spacing)
    hd95 = float(np.percentile(np.concatenate((ref_to_pred, pred_to_ref)), 95))
    if nsd_tolerance is None:
        return dice, hd95, math.nan
    # panoptica's NSD, (tp_a + tp_b) / (tp_a + tp_b + fp + fn) with fractions per surface,
    # reduces to the mean of the two within-tolerance fractions.
    nsd = (np.mean(ref_to_pred <= nsd_tolerance) + np.mean(pred_to_ref <= nsd_tolerance)) / 2.0
    return dice, hd95, float(nsd)


# ---------------------------------------------------------------------------------
# brats2026: one-to-one matching, means over matched pairs (brats-evaluation / panoptica).

def _brats2026(pred, ref, spacing, tolerance):
    pred_lesions, n_pred = label_lesions(pred)
    ref_lesions, n_ref = label_lesions(ref)
    pred_boxes, ref_boxes = ndimage.find_objects(pred_lesions), ndimage.find_objects(ref_lesions)
    pairs = []
    for ref_id, pred_id in match_lesions(pred_lesions, ref_lesions):
        box = _merge_boxes([ref_boxes[ref_id - 1], pred_boxes[pred_id - 1]])
        scores = pair_metrics(pred_lesions[box] == pred_id, ref_lesions[box] == ref_id, spacing, tolerance)
        pairs.append(LesionPair((ref_id,), (pred_id,), *scores))
    tp = len(pairs)
    counts = {"LesionTP": tp, "LesionFP": n_pred - tp, "LesionFN": n_ref - tp}
    if tp == 0:
        # The gli config's zero-TP edge case: one side empty or nothing overlapping.
        return {"LesionDice": 0.0, "LesionHD95": math.inf, "LesionNSD": 0.0, "LesionF1": 0.0,
                **counts, "pairs": []}
    dice, hd95, nsd = (float(np.mean([getattr(pair, k) for pair in pairs])) for k in ("dice", "hd95", "nsd"))
    f1 = tp / (tp + 0.5 * counts["LesionFP"] + 0.5 * counts["LesionFN"])
    return {"LesionDice": dice, "LesionHD95": hd95, "LesionNSD": nsd, "LesionF1": f1, **counts, "pairs": pairs}


# ---------------------------------------------------------------------------------
# brats2023: dilation-merged reference lesions, many-to-one matches, FP/FN penalised.

def _brats2023(pred, ref, spacing):
    pred_lesions, n_pred = label_lesions(pred)
    ref_lesions = _merged_reference_lesions(ref)
    pred_boxes, ref_boxes = ndimage.find_objects(pred_lesions), ndimage.find_objects(ref_lesions)
    voxel_mm3 = float(np.prod(spacing))
    scored, touched = [], set()
    for ref_id, ref_box in enumerate(ref_boxes, start=1):
        hits = _touching_predictions(pred_lesions, ref_lesions, ref_id, ref_box)
        touched.update(hits)
        volume = int(np.count_nonzero(ref_lesions[ref_box] == ref_id)) * voxel_mm3
        if volume > BRATS2023_MIN_VOLUME_MM3:
            scores = _union_scores(pred_lesions, ref_lesions, ref_id, hits, pred_boxes, ref_box, spacing)
            scored.append(LesionPair((ref_id,), tuple(hits), *scores))
    fp = n_pred - len(touched)
    tp = sum(1 for pair in scored if pair.pred)
    counts = {"LesionTP": tp, "LesionFP": fp, "LesionFN": len(scored) - tp}
    denominator = len(scored) + fp
    if denominator == 0:
        return {"LesionDice": 1.0, "LesionHD95": 0.0, **counts, "pairs": []}
    dice = sum(pair.dice for pair in scored) / denominator
    hd95 = (sum(pair.hd95 for pair in scored) + BRATS2023_HD95_PENALTY_MM * fp) / denominator
    return {"LesionDice": dice, "LesionHD95": hd95, **counts, "pairs": scored}


def _merged_reference_lesions(ref):
    """Reference lesions after merging those within the dilation distance of each other."""
    dilated = ndimage.binary_dilation(ref, _DILATION_STRUCTURE, iterations=BRATS2023_DILATION_ITERATIONS)
    dilated_lesions, _ = label_lesions(dilated)
    return np.where(ref, dilated_lesions, 0)


def _touching_predictions(pred_lesions, ref_lesions, ref_id, ref_box):
    """Sorted labels of the prediction lesions that touch this reference lesion's dilation."""
    box = _grow(ref_box, BRATS2023_DILATION_ITERATIONS, ref_lesions.shape)
    near = ndimage.binary_dilation(ref_lesions[box] == ref_id, _DILATION_STRUCTURE,
                                   iterations=BRATS2023_DILATION_ITERATIONS)
    hits = np.unique(pred_lesions[box][near])
    return [int(h) for h in hits if h != 0]


def _union_scores(pred_lesions, ref_lesions, ref_id, hits, pred_boxes, ref_box, spacing):
    """(Dice, HD95, NaN NSD) of one reference lesion against the union of its matches."""
    if not hits:
        return 0.0, BRATS2023_HD95_PENALTY_MM, math.nan
    box = _merge_boxes([ref_box] + [pred_boxes[h - 1] for h in hits])
    return pair_metrics(np.isin(pred_lesions[box], hits), ref_lesions[box] == ref_id, spacing)


# ---------------------------------------------------------------------------------

def _empty_result(rules):
    if rules == "brats2023":
        return {"LesionDice": 1.0, "LesionHD95": 0.0, "LesionTP": 0, "LesionFP": 0, "LesionFN": 0, "pairs": []}
    return {"LesionDice": math.nan, "LesionHD95": math.nan, "LesionNSD": math.nan, "LesionF1": math.nan,
            "LesionTP": 0, "LesionFP": 0, "LesionFN": 0, "pairs": []}


def _merge_boxes(boxes):
    """Smallest box (tuple of slices) containing all the given boxes."""
    return tuple(slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes))
                 for axis in range(len(boxes[0])))


def _grow(box, margin, shape):
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _check_rules(rules):
    columns(rules)
