"""The experiment report: `report.md` with the paper's tables and PNG figures (METHOD §7).

    write_report(out_dir,
                 evaluations={"Standard 3D": "eval_3d.csv", "2D-3D A": "eval_a.csv", ...},
                 comparisons=[("Standard 3D vs 2D-3D", "Standard 3D", "2D-3D A"), ...],
                 training_logs={"2D model 1 axial": "train_log.csv"},
                 overlays=[Overlay("case_7", "case_7_t2.nii.gz", "case_7_seg.nii.gz",
                                   {"2D-3D A": "pred/case_7.nii.gz"})],
                 feature_maps=[FeatureMaps("case_7", features_array, image="case_7_t2.nii.gz")])

Tables: mean Dice per model (Tables 1-3), p-values of the paired one-tailed t-tests
of the named comparisons (Table 4, plus the Wilcoxon test), the distribution of the
final model's Dice (Table 6). Figures: training loss and per-class validation Dice
over iterations (Fig. 8), Dice box plots per model, segmentation overlays (Fig. 11)
and 2D feature maps (Fig. 10) when given. Layouts: `report_tables`, `report_figures`.

Training logs are CSV files with a header including `iteration` and `loss`, and
optionally `loss_main`, `loss_aux_<k>`, `learning_rate`, `val_dice_ncr_net`,
`val_dice_edema`, `val_dice_enhancing` (empty cells where a row has no value).
"""

import csv
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from brats_tf.report import figures
from brats_tf.report import tables
from brats_tf.evaluation import stats
from brats_tf.constants import CLASS_NAMES, LABEL_MAPS, ORIENTATIONS
from brats_tf.errors import DataError
from brats_tf.io.labels import map_labels
from brats_tf.io.files import write_text
from brats_tf.io.nifti import load_volume
from brats_tf.evaluation.evaluate import read_evaluation_csv



@dataclass
class Overlay:
    """One case for the segmentation figure. Volumes are arrays or NIfTI paths; label
    arrays are in the internal convention, label files in `label_convention`."""
    case_id: str
    image: object
    reference: object = None
    predictions: dict = field(default_factory=dict)
    label_convention: str = "brats2017"


@dataclass
class FeatureMaps:
    """2D features of one case: array (X, Y, Z, C) or a .npy path; C = groups x classes
    (by default 12 = 3 orientations x 4 classes, the 2D-3D models' extra channels).
    The axial slice shown: `axial_slice`, else the reference's largest tumor section
    (labels in the internal convention), else where the features vary most."""
    case_id: str
    features: object
    image: object = None
    reference: object = None
    axial_slice: int = None
    group_names: tuple = ORIENTATIONS
    channel_names: tuple = CLASS_NAMES


def write_report(out_dir, evaluations, comparisons=(), training_logs=None, overlays=(), feature_maps=(),
                 final_model=None, title="Results", regions=stats.PAPER_REGIONS, use_intersection=False,
                 notes=()):
    """Writes out_dir/report.md and its PNG figures; returns the report's path.

    evaluations: {model name: evaluation CSV path or per-case rows}, in table order.
    comparisons: [(name, baseline model, candidate model)] tested with the paired
    one-tailed t-test (candidate better) and the Wilcoxon test, joined on case id.
    final_model: the model of Table 6 (default: the last of `evaluations`).
    notes: extra Markdown sections appended after the figures (settings, timings).
    """
    os.makedirs(out_dir, exist_ok=True)
    evaluations = {name: _rows(source) for name, source in evaluations.items()}
    if not evaluations:
        raise ValueError("write_report needs at least one evaluation")
    final_model = final_model or list(evaluations)[-1]
    tested = [(name, stats.paired_tests(evaluations[_known(base, evaluations)],
                                        evaluations[_known(cand, evaluations)],
                                        regions=regions, use_intersection=use_intersection, names=(base, cand)))
              for name, base, cand in comparisons]
    sections = [f"# {title}\n", _tables_section(evaluations, tested, final_model, regions)]
    sections.append(_figures_section(out_dir, evaluations, training_logs or {}, overlays, feature_maps, regions))
    sections += list(notes)
    path = os.path.join(out_dir, "report.md")
    text = "\n".join(sections)
    write_text(path, text)
    return path


def _tables_section(evaluations, tested, final_model, regions):
    parts = ["## Mean Dice per model (Tables 1-3)\n",
             "Mean Dice x 100 over the cases of each evaluation.\n",
             tables.mean_dice_table(evaluations, regions)]
    if tested:
        parts += ["## Paired tests (Table 4)\n",
                  "p-values of paired one-tailed t-tests (candidate better than baseline) of per-case Dice, "
                  "cases joined by id; **bold**: significant at 5%.\n",
                  tables.pvalue_table(tested, regions, "t"),
                  "Wilcoxon signed-rank test, same pairs and alternative:\n",
                  tables.pvalue_table(tested, regions, "wilcoxon"),
                  "Mean per-case Dice difference (candidate - baseline) x 100:\n",
                  tables.mean_difference_table(tested, regions)]
    parts += [f"## Distribution of Dice scores: {final_model} (Table 6)\n",
              "Dice x 100; standard deviation in brackets.\n",
              tables.distribution_table(evaluations[final_model], regions)]
    return "\n".join(parts)


def _figures_section(out_dir, evaluations, training_logs, overlays, feature_maps, regions):
    parts = ["## Figures\n", "### Dice per case\n"]
    figures.dice_boxplots(evaluations, os.path.join(out_dir, "dice_boxplots.png"), regions)
    parts.append("![Dice per case and model](dice_boxplots.png)\n")
    if training_logs:
        parts.append("### Training curves (Fig. 8)\n")
        for model, log_path in training_logs.items():
            name = f"training_{_slug(model)}.png"
            figures.training_curves(read_training_log(log_path), os.path.join(out_dir, name), model)
            parts.append(f"![Training of {model}]({name})\n")
    if overlays:
        cases = [_load_overlay(overlay) for overlay in overlays]
        figures.segmentation_overlays(cases, os.path.join(out_dir, "segmentations.png"))
        parts += ["### Segmentations (Fig. 11)\n", "![Segmentations per model](segmentations.png)\n"]
    if feature_maps:
        cases = [_load_features(item) for item in feature_maps]
        figures.feature_maps(cases, os.path.join(out_dir, "feature_maps.png"))
        parts += ["### 2D feature maps (Fig. 10)\n", "![2D features](feature_maps.png)\n"]
    return "\n".join(parts)


def read_training_log(path):
    """{column: float array} of a training-log CSV; empty cells are NaN."""
    try:
        with open(path, newline="") as f:
            records = list(csv.reader(f))
    except OSError as err:
        raise DataError(path, f"cannot read training log ({err.strerror})") from None
    if not records or "iteration" not in records[0]:
        raise DataError(path, "training log needs a header with an 'iteration' column")
    header = [h.strip() for h in records[0]]
    columns = {name: [] for name in header}
    for line_number, record in enumerate(records[1:], start=2):
        if len(record) != len(header):
            raise DataError(path, f"line {line_number}: {len(record)} fields, header has {len(header)}")
        for name, cell in zip(header, record):
            try:
                columns[name].append(float(cell) if cell.strip() else math.nan)
            except ValueError:
                raise DataError(path, f"line {line_number}: {name} value {cell!r} is not a number") from None
    if not columns["iteration"]:
        raise DataError(path, "training log has no rows")
    return {name: np.asarray(values, dtype=np.float64) for name, values in columns.items()}


def _rows(source):
    if isinstance(source, (str, os.PathLike)):
        return read_evaluation_csv(source)[0]
    return list(source)


def _known(model, evaluations):
    if model not in evaluations:
        raise ValueError(f"comparison names model {model!r}, which has no evaluation; have {list(evaluations)}")
    return model


def _load_overlay(overlay):
    def labels(source):
        if source is None or not isinstance(source, (str, os.PathLike)):
            return source
        return map_labels(load_volume(source)[0], LABEL_MAPS[overlay.label_convention], source)

    return (overlay.case_id, _volume(overlay.image), labels(overlay.reference),
            {model: labels(source) for model, source in overlay.predictions.items()})


def _load_features(item):
    features = item.features
    if isinstance(features, (str, os.PathLike)):
        features = np.load(features, allow_pickle=False)
    features = np.asarray(features)
    per_group = len(item.channel_names)
    if features.ndim != 4 or features.shape[-1] % per_group:
        raise ValueError(f"{item.case_id}: features of shape {features.shape} are not (X, Y, Z, groups x "
                         f"{per_group})")
    groups = tuple(item.group_names)[: features.shape[-1] // per_group]
    groups += tuple(f"group {g}" for g in range(len(groups), features.shape[-1] // per_group))
    z = item.axial_slice
    if z is None:
        z = (figures.best_axial_slice(_volume(item.reference)) if item.reference is not None
             else figures.most_varied_axial_slice(features))
    return item.case_id, features, groups, tuple(item.channel_names), _volume(item.image), int(z)


def _volume(source):
    if source is None or not isinstance(source, (str, os.PathLike)):
        return None if source is None else np.asarray(source)
    return load_volume(source)[0]


def _slug(name):
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "model"
