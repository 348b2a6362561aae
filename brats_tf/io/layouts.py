"""On-disk dataset layouts: where a case's modality, label and mask files are.

A layout is data (a `Layout`): per-modality file patterns relative to a case folder,
the label pattern, an optional brain-mask pattern, and the label convention. The built-in
BraTS layouts and generic JSON layout files are all expressed this way; MSD Task01
(4D image files) is the one layout with its own discovery in `cases.py`.
"""

import json
import os
from dataclasses import dataclass, field

from brats_tf.constants import LABEL_MAPS, MODALITIES
from brats_tf.errors import DataError


@dataclass(frozen=True)
class Layout:
    name: str
    # modality -> file pattern inside the case folder; "{id}" is the case id. A tuple of
    # patterns means "the first that exists" (e.g. .nii.gz or .nii).
    modalities: dict
    label: tuple = ()
    mask: tuple = ()
    label_map: dict = field(default_factory=dict)
    normalization: str = None  # recommended normalization for this data, if any


def _both_suffixes(pattern):
    return (pattern + ".nii.gz", pattern + ".nii")


BRATS2017 = Layout(
    name="brats2017",
    modalities={m: _both_suffixes("{id}_" + f) for m, f in
                zip(MODALITIES, ("t1", "t1ce", "t2", "flair"))},
    label=_both_suffixes("{id}_seg"),
    label_map=LABEL_MAPS["brats2017"],
)

BRATS2023 = Layout(
    name="brats2023",
    modalities={m: _both_suffixes("{id}-" + f) for m, f in
                zip(MODALITIES, ("t1n", "t1c", "t2w", "t2f"))},
    label=_both_suffixes("{id}-seg"),
    label_map=LABEL_MAPS["brats2023"],
)

BUILTIN_LAYOUTS = {"brats2017": BRATS2017, "brats2023": BRATS2023}

# MSD Task01 channel order in its 4D images.
MSD_CHANNELS = {"flair": 0, "t1": 1, "t1c": 2, "t2": 3}


def load_layout_file(path):
    """Reads a generic layout JSON file.

    Format::

        {"name": "...",
         "modalities": {"flair": "Flair*.nii.gz", "t1c": "{id}_t1c.nii.gz"},
         "label": "OTMultiClass.nii.gz",          # optional
         "mask": "brainmask.nii.gz",              # optional
         "label_convention": "brats2013"          # or "label_map": {"0": 0, "4": 3}
         "normalization": "zscore"}               # optional recommendation

    Patterns are relative to a case folder and may use "{id}" and glob wildcards.
    """
    try:
        with open(path) as f:
            spec = json.load(f)
    except OSError as err:
        raise DataError(path, f"cannot read layout file ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise DataError(path, f"layout file is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("modalities"), dict) or not spec["modalities"]:
        raise DataError(path, "layout file needs a non-empty 'modalities' object")
    unknown = sorted(set(spec["modalities"]) - set(MODALITIES))
    if unknown:
        raise DataError(path, f"unknown modality names {unknown}; use {list(MODALITIES)}")
    if "label_map" in spec:
        try:
            label_map = {int(k): int(v) for k, v in spec["label_map"].items()}
        except (TypeError, ValueError, AttributeError):
            raise DataError(path, "'label_map' must map label values to internal labels 0-3") from None
        if not set(label_map.values()) <= {0, 1, 2, 3}:
            raise DataError(path, "'label_map' targets must be internal labels 0-3")
    else:
        convention = spec.get("label_convention", "brats2017")
        if convention not in LABEL_MAPS:
            raise DataError(path, f"unknown label_convention {convention!r}; "
                                  f"use one of {sorted(LABEL_MAPS)} or a label_map")
        label_map = LABEL_MAPS[convention]
    as_tuple = lambda p: (p,) if isinstance(p, str) else tuple(p or ())
    # Modalities in canonical order, whatever order the file lists them in.
    modalities = {m: as_tuple(spec["modalities"][m]) for m in MODALITIES if m in spec["modalities"]}
    return Layout(
        name=spec.get("name", os.path.splitext(os.path.basename(path))[0]),
        modalities=modalities,
        label=as_tuple(spec.get("label")),
        mask=as_tuple(spec.get("mask")),
        label_map=label_map,
        normalization=spec.get("normalization"),
    )
