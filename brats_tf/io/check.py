"""Dataset validation: every problem of every case reported as one line naming the file."""

import os
from dataclasses import dataclass, field

import numpy as np

from brats_tf.constants import CLASS_NAMES, MODALITIES, NUM_CLASSES
from brats_tf.errors import DataError
from brats_tf.io.cases import discover_cases, requested_modalities
from brats_tf.io.labels import map_labels
from brats_tf.io.nifti import load_volume


@dataclass
class CheckReport:
    problems: list = field(default_factory=list)          # "path: problem" lines
    num_cases: int = 0
    modality_counts: dict = field(default_factory=dict)   # modality -> cases having it
    labeled_cases: int = 0
    voxels_per_class: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES, np.int64))
    cases_per_class: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES, np.int64))

    @property
    def ok(self):
        return not self.problems

    def summary_lines(self):
        mods = ", ".join(f"{m} {n}/{self.num_cases}" for m, n in self.modality_counts.items())
        lines = [f"cases: {self.num_cases}", f"modalities: {mods or 'none'}",
                 f"labeled cases: {self.labeled_cases}"]
        if self.labeled_cases:
            lines.append("voxels per class: " + ", ".join(
                f"{i} {name} {int(v)} (in {int(c)} cases)" for i, (name, v, c) in
                enumerate(zip(CLASS_NAMES, self.voxels_per_class, self.cases_per_class))))
        lines.append(f"problems: {len(self.problems)}")
        return lines


def check_dataset(data_dir, layout="auto", layout_file=None, modalities=None, allow_missing=False,
                  on_case=None):
    """Validates every case; returns a CheckReport (never raises for bad case data)."""
    report = CheckReport()
    modalities = requested_modalities(modalities) if modalities else None
    try:
        cases = discover_cases(data_dir, layout, layout_file)
    except DataError as err:
        report.problems.append(str(err))
        return report
    expected = tuple(modalities) if modalities else tuple(
        m for m in MODALITIES if any(m in c.images for c in cases))
    report.num_cases = len(cases)
    report.modality_counts = {m: sum(m in c.images for c in cases) for m in expected}
    for case in cases:
        report.problems.extend(_check_case(case, expected, allow_missing, report))
        if on_case:
            on_case(case)
    return report


def _check_case(case, expected, allow_missing, report):
    problems = []
    if not allow_missing:
        problems += [f"{case.missing.get(m, case.case_id)}: missing {m} image for case {case.case_id}"
                     for m in expected if m not in case.images]
    reference, brain, blank = None, None, []
    for modality, source in case.images.items():
        data = _load_or_report(source.path, problems, allow_4d=source.channel is not None)
        if data is None:
            continue
        volume, geo = data
        if source.channel is not None:
            if volume.ndim != 4 or source.channel >= volume.shape[3]:
                problems.append(f"{source.path}: expected a 4D image with a channel per sequence, "
                                f"found shape {volume.shape}")
                continue
            volume = volume[..., source.channel]
        if not _same_grid(source.path, geo, reference, problems):
            continue
        reference = reference or (geo, source.path)
        nonzero = volume != 0
        brain = nonzero if brain is None else (brain | nonzero)
        if not nonzero.any():
            blank.append(f"{source.path}: {modality} is all zero")
    if case.mask is not None:
        data = _load_or_report(case.mask.path, problems)
        if data is not None and _same_grid(case.mask.path, data[1], reference, problems):
            brain = data[0] > 0.5
            if not brain.any():
                problems.append(f"{case.mask.path}: brain mask is empty")
    elif brain is not None and not brain.any():
        problems.append(f"{os.path.dirname(next(iter(case.images.values())).path)}: "
                        f"empty brain (all images are zero)")
        blank = []
    problems += blank   # build_records and segment refuse a blank sequence (preprocess.py)
    if case.label is not None:
        data = _load_or_report(case.label.path, problems)
        if data is not None and _same_grid(case.label.path, data[1], reference, problems):
            try:
                labels = map_labels(data[0], case.label_map, case.label.path)
                counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
                report.labeled_cases += 1
                report.voxels_per_class += counts
                report.cases_per_class += counts > 0
            except DataError as err:
                problems.append(str(err))
    return list(dict.fromkeys(problems))   # an MSD file holds four sequences: one line per problem


def _load_or_report(path, problems, allow_4d=False):
    try:
        return load_volume(path, allow_4d=allow_4d)
    except DataError as err:
        problems.append(str(err))
        return None


def _same_grid(path, geo, reference, problems):
    if reference is None:
        return True
    ref_geo, ref_path = reference
    if geo.shape != ref_geo.shape:
        problems.append(f"{path}: shape {geo.shape} differs from {os.path.basename(ref_path)} {ref_geo.shape}")
        return False
    if not np.allclose(geo.affine, ref_geo.affine, atol=1e-3):
        problems.append(f"{path}: affine differs from {os.path.basename(ref_path)}")
        return False
    return True
