"""Label maps in and out of each on-disk convention (METHOD §1): values read from disk are
mapped to the internal labels (0 non-tumor, 1 NCR/NET, 2 edema, 3 enhancing), and internal
labels are written in an output convention (BraTS 2017: ET as 4; BraTS 2023: ET as 3)."""

import numpy as np

from brats_tf.constants import OUTPUT_LABEL_MAPS
from brats_tf.errors import ConfigError, DataError
from brats_tf.io.nifti import save_volume


def map_labels(raw, label_map, path="label map"):
    """Maps on-disk label values to the internal convention; unknown values are an error."""
    rounded = np.rint(raw)
    if not np.allclose(raw, rounded, atol=1e-3):
        raise DataError(path, "label map has non-integer values")
    values = np.unique(rounded).astype(np.int64)
    unknown = [int(v) for v in values if int(v) not in label_map]
    if unknown:
        raise DataError(path, f"unknown label values {unknown}; expected {sorted(label_map)}")
    lookup = np.zeros(int(values.max(initial=0)) + 1, dtype=np.uint8)
    for value, internal in label_map.items():
        if value < lookup.size:
            lookup[value] = internal
    return lookup[rounded.astype(np.int64)]


def to_output_convention(labels, convention="brats2017"):
    """Internal labels as the uint8 values of an output convention."""
    if convention not in OUTPUT_LABEL_MAPS:
        raise ConfigError(f"label convention {convention!r}: use one of {sorted(OUTPUT_LABEL_MAPS)}")
    lookup = np.zeros(len(OUTPUT_LABEL_MAPS[convention]), np.uint8)
    for internal, value in OUTPUT_LABEL_MAPS[convention].items():
        lookup[internal] = value
    return lookup[np.asarray(labels, dtype=np.intp)]


def write_label_map(path, labels, geometry, convention="brats2017"):
    """Writes internal labels in an output convention with an input's geometry, atomically."""
    save_volume(path, to_output_convention(labels, convention), geometry)
