"""Voting ensembles of label maps (METHOD §6, [M] §2.3 and Fig. 7).

`hierarchical_vote` is the paper's decision tree: with n maps and per-voxel votes
v1 (NCR/NET), v2 (edema), v3 (enhancing),

    P_tumor = (v1+v2+v3)/n,  P_core = (v1+v3)/(v1+v2+v3),  P_enh = v3/(v1+v3),

a voxel is tumor if P_tumor >= T_tumor; a tumor voxel is core (else edema) if
P_core >= T_core; a core voxel is enhancing (else NCR/NET) if P_enh >= T_enh. An
undefined ratio (0/0) counts as 0. `majority_vote` is the plain per-voxel mode, for
comparison. Both work on label maps in the internal convention (0..3).

How it is computed: per voxel, count the votes (v1, v2, v3) and pack them into one
integer key; the decision for every possible (v1, v2, v3) is worked out once in a
small table ((n+1)^3 entries) and looked up per voxel. That keeps the voxel work to
counting plus one gather (a vote of six 240x240x155 maps in ~0.1 s) and lets the
rule be written plainly on the table. The decisions are exact: thresholds are read
as the decimals they were written as (0.3 is 3/10) and compared in integer
arithmetic, so "P >= T" holds when the vote fraction equals T (T=1 means
unanimity; with 10 maps, T_core=0.3 accepts 3 of 10).

`fuse_files` is the file-level entry point behind `python -m brats_tf.fuse`.
"""

import math
import os
from fractions import Fraction

import numpy as np

from brats_tf.constants import EDEMA, ENHANCING, LABEL_MAPS, NCR_NET, NUM_CLASSES, OUTPUT_LABEL_MAPS
from brats_tf.errors import ConfigError, DataError
from brats_tf.io.labels import map_labels, write_label_map
from brats_tf.io.nifti import load_volume, save_volume

DEFAULT_THRESHOLDS = (0.4, 0.3, 0.4)   # (T_tumor, T_core, T_enh) [M] §2.3
PROPORTION_NAMES = ("tumor", "core", "enh")
METHODS = ("hierarchical", "majority")
MAX_MAPS = 255   # votes are counted in uint8


def hierarchical_vote(label_maps, thresholds=DEFAULT_THRESHOLDS, with_proportions=True):
    """The paper's hierarchical vote of label maps (internal convention 0..3).

    Returns (labels, proportions): labels is a uint8 array shaped like the inputs;
    proportions maps "tumor", "core", "enh" to float32 arrays of P_tumor, P_core,
    P_enh (an uncertainty estimate), or is None when with_proportions is False.
    """
    maps = _check_maps(label_maps)
    table = _hierarchical_table(len(maps), parse_thresholds(thresholds))
    key = _vote_key(_class_votes(maps), len(maps))
    return table[key], (_proportions(key, len(maps)) if with_proportions else None)


def majority_vote(label_maps):
    """Per-voxel most frequent label (internal convention), as uint8.

    Tie rule: a tie goes to the lowest tied label (0 < 1 < 2 < 3), so a tie never
    turns background into tumor (3 maps saying 0 and 3 saying 2 give 0), and a tie
    between tumor classes picks the lower internal label.
    """
    maps = _check_maps(label_maps)
    return _majority_table(len(maps))[_vote_key(_class_votes(maps), len(maps))]


def vote_proportions(label_maps):
    """P_tumor, P_core, P_enh (float32) of label maps, whatever method fuses them."""
    maps = _check_maps(label_maps)
    return _proportions(_vote_key(_class_votes(maps), len(maps)), len(maps))


def parse_thresholds(thresholds):
    """(T_tumor, T_core, T_enh) as exact Fractions from floats, strings or "a,b,c"."""
    if isinstance(thresholds, str):
        thresholds = [t.strip() for t in thresholds.split(",")]
    thresholds = list(thresholds)
    if len(thresholds) != 3:
        raise ConfigError(f"thresholds: need 3 values (T_tumor, T_core, T_enh), got {len(thresholds)}")
    parsed = []
    for value in thresholds:
        try:
            # repr of a float is its shortest decimal, so 0.3 becomes exactly 3/10.
            fraction = Fraction(value if isinstance(value, str) else repr(float(value)))
        except (ValueError, TypeError):
            raise ConfigError(f"thresholds: {value!r} is not a number") from None
        if not 0 <= fraction <= 1:
            raise ConfigError(f"thresholds: {value} is outside [0, 1]")
        parsed.append(fraction)
    return tuple(parsed)


def fuse_files(seg_paths, output_path, method="hierarchical", thresholds=DEFAULT_THRESHOLDS,
               proportions_prefix=None, label_convention="brats2017", output_convention="brats2017"):
    """Fuses label-map files into `output_path`, in the first input's geometry.

    Inputs are read in `label_convention` and must share shape and affine; the fused
    map is written in `output_convention`. With `proportions_prefix` P, also writes
    P_tumor.nii.gz, P_core.nii.gz and P_enh.nii.gz (float32). Returns the internal labels.
    """
    if method not in METHODS:
        raise ConfigError(f"method: {method!r} is not one of {METHODS}")
    if label_convention not in LABEL_MAPS:
        raise ConfigError(f"label_convention: {label_convention!r} is not one of {sorted(LABEL_MAPS)}")
    if output_convention not in OUTPUT_LABEL_MAPS:
        raise ConfigError(f"output_convention: {output_convention!r} is not one of {sorted(OUTPUT_LABEL_MAPS)}")
    if not seg_paths:
        raise ConfigError("no segmentations to fuse: pass SEG1 SEG2 ... after the flags")
    parse_thresholds(thresholds)  # fail before reading any file
    maps, geometry = _read_label_maps(seg_paths, label_convention)
    if method == "hierarchical":
        labels, proportions = hierarchical_vote(maps, thresholds, with_proportions=bool(proportions_prefix))
    else:
        labels = majority_vote(maps)
        proportions = vote_proportions(maps) if proportions_prefix else None
    write_label_map(output_path, labels, geometry, output_convention)
    for name, values in (proportions or {}).items():
        save_volume(f"{proportions_prefix}_{name}.nii.gz", values.astype(np.float32), geometry)
    return labels


def _read_label_maps(paths, label_convention):
    maps, first = [], None
    for path in paths:
        raw, geometry = load_volume(os.fspath(path))
        if first is None:
            first = (geometry, path)
        elif geometry.shape != first[0].shape:
            raise DataError(path, f"shape {geometry.shape} differs from {os.path.basename(first[1])} "
                                  f"{first[0].shape}")
        elif not np.allclose(geometry.affine, first[0].affine, atol=1e-3):
            raise DataError(path, f"affine (geometry) differs from {os.path.basename(first[1])}")
        maps.append(map_labels(raw, LABEL_MAPS[label_convention], path))
    return maps, first[0]


def _check_maps(label_maps):
    """Validates the maps and gives them one memory layout (nibabel arrays are Fortran
    order; mixing layouts in element-wise loops is several times slower)."""
    maps = [np.asarray(m) for m in label_maps]
    order = "F" if maps and maps[0].flags.f_contiguous and not maps[0].flags.c_contiguous else "C"
    maps = [np.asarray(m, order=order) for m in maps]
    if not 1 <= len(maps) <= MAX_MAPS:
        raise ValueError(f"can vote 1 to {MAX_MAPS} label maps, got {len(maps)}")
    for i, m in enumerate(maps):
        if m.shape != maps[0].shape:
            raise ValueError(f"label map {i} has shape {m.shape}, map 0 has {maps[0].shape}")
        if m.dtype.kind not in "iub":
            raise ValueError(f"label map {i} has dtype {m.dtype}; expected integer labels 0..3")
        if m.size and (m.min() < 0 or m.max() >= NUM_CLASSES):
            raise ValueError(f"label map {i} has values outside 0..{NUM_CLASSES - 1} (internal convention)")
    return maps


def _class_votes(maps):
    """(v1, v2, v3): per voxel, how many maps say NCR/NET, edema, enhancing (uint8)."""
    votes = []
    scratch = np.empty_like(maps[0], dtype=bool)          # same memory layout as the maps
    for label in (NCR_NET, EDEMA, ENHANCING):
        count = np.zeros_like(maps[0], dtype=np.uint8)
        for m in maps:
            np.equal(m, label, out=scratch)
            np.add(count, scratch.view(np.uint8), out=count)   # in place: no temporaries
        votes.append(count)
    return votes


def _vote_key(votes, n):
    """Packs (v1, v2, v3) into one integer per voxel: (v1*(n+1) + v2)*(n+1) + v3."""
    key = votes[0].astype(np.uint16 if (n + 1) ** 3 <= 2 ** 16 else np.uint32)
    for v in votes[1:]:
        key *= n + 1
        key += v
    return key


def _table_votes(n):
    """v1, v2, v3 (int64) for every key value, so rules can be written once on the table."""
    key = np.arange((n + 1) ** 3, dtype=np.int64)
    return key // (n + 1) ** 2, key // (n + 1) % (n + 1), key % (n + 1)


def _hierarchical_table(n, thresholds):
    """Label for every vote combination, by the exact decision tree of Fig. 7."""
    t_tumor, t_core, t_enh = thresholds
    v1, v2, v3 = _table_votes(n)
    tumor_votes = v1 + v2 + v3
    is_tumor = tumor_votes >= math.ceil(t_tumor * n)       # P_tumor >= T, exactly
    is_core = is_tumor & _at_least(v1 + v3, tumor_votes, t_core)
    is_enh = is_core & _at_least(v3, v1 + v3, t_enh)
    labels = np.where(is_enh, ENHANCING, np.where(is_core, NCR_NET, np.where(is_tumor, EDEMA, 0)))
    return labels.astype(np.uint8)


def _majority_table(n):
    """Most frequent label for every vote combination; argmax keeps the lowest on ties."""
    v1, v2, v3 = _table_votes(n)
    counts = np.stack([n - (v1 + v2 + v3), v1, v2, v3])
    return np.argmax(counts, axis=0).astype(np.uint8)


def _at_least(numerator, denominator, threshold):
    """numerator/denominator >= threshold, exactly, with 0/0 counted as 0.

    For each possible denominator d the smallest passing numerator is ceil(threshold*d),
    computed with Fractions: exact for any threshold, and no large integer products.
    """
    smallest = np.array([math.ceil(threshold * d) for d in range(int(denominator.max(initial=0)) + 1)])
    return np.where(denominator > 0, numerator >= smallest[denominator], threshold == 0)


def _proportions(key, n):
    """P_tumor, P_core, P_enh per voxel, looked up like the labels (0/0 counts as 0)."""
    v1, v2, v3 = (v.astype(np.float64) for v in _table_votes(n))
    tumor, core = v1 + v2 + v3, v1 + v3
    with np.errstate(invalid="ignore", divide="ignore"):
        tables = {"tumor": tumor / n,
                  "core": np.where(tumor > 0, core / tumor, 0.0),
                  "enh": np.where(core > 0, v3 / core, 0.0)}
    return {name: table.astype(np.float32)[key] for name, table in tables.items()}
