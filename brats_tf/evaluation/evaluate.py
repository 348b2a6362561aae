"""Evaluating segmentations against references (METHOD §7): predictions paired with
references by case id (files or folders, in parallel over cases), the per-case metrics of
`metrics.py` (legacy) and `lesionwise.py`, and the evaluation CSV (BraTS online-evaluation
format) with its summary rows. `run_evaluation` is `python -m brats_tf.evaluate`.

Metric sets (`metrics=`): "legacy" (the BraTS CSV of `metrics.COLUMNS`, as it always
was), "lesionwise" (`lesionwise.columns(lesion_rules)`) or "all" (legacy, then
lesion-wise). The library functions default to "legacy", so callers that write their own
CSVs (the experiments) neither pay for nor see the lesion-wise columns; the command
defaults to "all"."""

import csv
import io
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from brats_tf.constants import LABEL_MAPS
from brats_tf.errors import ConfigError, DataError
from brats_tf.evaluation import lesionwise
from brats_tf.evaluation.metrics import COLUMNS, case_metrics
from brats_tf.io.cases import discover_cases
from brats_tf.io.files import atomic_write
from brats_tf.io.labels import map_labels
from brats_tf.io.nifti import load_volume

NIFTI_SUFFIXES = (".nii.gz", ".nii")
METRIC_SETS = ("legacy", "lesionwise", "all")


def csv_columns(metrics="legacy", lesion_rules="brats2026"):
    """Metric columns of the evaluation CSV for a metric set: legacy ones first, then lesion-wise."""
    if metrics not in METRIC_SETS:
        raise ConfigError(f"unknown metric set {metrics!r}; expected one of {', '.join(METRIC_SETS)}")
    if lesion_rules not in lesionwise.RULES:
        raise ConfigError(f"unknown lesion-wise rules {lesion_rules!r}; "
                          f"expected one of {', '.join(lesionwise.RULES)}")
    legacy = COLUMNS if metrics in ("legacy", "all") else ()
    lesion = lesionwise.columns(lesion_rules) if metrics in ("lesionwise", "all") else ()
    return tuple(legacy) + tuple(lesion)


def case_row(pred_labels, ref_labels, spacing=(1.0, 1.0, 1.0), metrics="legacy", lesion_rules="brats2026"):
    """One case's metrics in `csv_columns(metrics, lesion_rules)` order (internal label maps)."""
    row = {}
    if metrics in ("legacy", "all"):
        row.update(case_metrics(pred_labels, ref_labels, spacing))
    if metrics in ("lesionwise", "all"):
        row.update(lesionwise.lesionwise_metrics(pred_labels, ref_labels, spacing, lesion_rules))
    return row


# The evaluation CSV (BraTS online-evaluation format): `Label` (the case id) and the
# metric columns, one row per case, then the summary rows. StdDev is the sample standard
# deviation (ddof=1; NaN for a single case); quantiles use linear interpolation.
# Non-finite values are written as `nan` and `inf` and summarised as the organisers'
# `brats-parse-metrics` summarises its CSV (pandas mean/std/median, skipna): NaN (a
# lesion-wise score of a region empty in both masks: nothing to score) is left out of
# the summary, like a case that lacks the region; inf (lesion-wise HD95 with no matched
# lesion) is kept, so Mean is inf and StdDev NaN when any case has it, while Median and
# the quantiles are order statistics (inf sorts last). Legacy columns are always finite,
# so their summary rows are what they always were.

SUMMARY_LABELS = ("Mean", "StdDev", "Median", "25quantile", "75quantile")


def summary_rows(rows, columns=COLUMNS):
    """The five summary rows (Mean, StdDev, Median, 25quantile, 75quantile) of per-case rows."""
    summaries = {label: {"Label": label} for label in SUMMARY_LABELS}
    for column in columns:
        values = np.array([row[column] for row in rows], dtype=np.float64)
        stats = _distribution(values)
        for label in SUMMARY_LABELS:
            summaries[label][column] = stats[label]
    return [summaries[label] for label in SUMMARY_LABELS]


def _distribution(values):
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {label: math.nan for label in SUMMARY_LABELS}
    if np.isinf(values).any():
        return _distribution_with_inf(values)
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    std = float(np.std(values, ddof=1)) if values.size > 1 else math.nan
    return {"Mean": float(np.mean(values)), "StdDev": std, "Median": float(median),
            "25quantile": float(q25), "75quantile": float(q75)}


def _distribution_with_inf(values):
    # np.percentile interpolates inf - inf into NaN (and np.std warns), so the order
    # statistics are interpolated here, with inf as the limit: a + t (inf - a) = inf for t > 0.
    ordered = np.sort(values)
    q25, median, q75 = (_order_quantile(ordered, q) for q in (0.25, 0.5, 0.75))
    return {"Mean": float(np.mean(values)), "StdDev": math.nan, "Median": median,
            "25quantile": q25, "75quantile": q75}


def _order_quantile(ordered, q):
    position = q * (ordered.size - 1)
    low, high = math.floor(position), math.ceil(position)
    a, b, t = float(ordered[low]), float(ordered[high]), position - low
    return a if t == 0 or a == b else a + t * (b - a)


def write_evaluation_csv(path, rows, columns=COLUMNS):
    """Writes per-case rows and their summary rows, atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("Label",) + tuple(columns))
    for row in list(rows) + summary_rows(rows, columns):
        writer.writerow([row["Label"]] + [format_number(row[c]) for c in columns])

    def write(tmp_path):
        with open(tmp_path, "w", newline="") as f:
            f.write(text.getvalue())

    atomic_write(path, write)


def read_evaluation_csv(path):
    """Reads an evaluation CSV: (per-case rows, {summary label: row}).

    Rows are dicts {"Label": case_id, column: float}; summary rows (Mean, StdDev, ...)
    are kept apart so they never enter per-case statistics. Any numeric columns are
    accepted (other tools add their own); duplicate or empty case ids are errors.
    """
    try:
        with open(path, newline="") as f:
            records = list(csv.reader(f))
    except OSError as err:
        raise DataError(path, f"cannot read evaluation CSV ({err.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(path, f"not an evaluation CSV ({err})") from None
    if not records:
        raise DataError(path, "not an evaluation CSV: the file is empty")
    if not records[0] or records[0][0].strip() != "Label":
        raise DataError(path, "not an evaluation CSV: the first column of the header must be 'Label'")
    header = [h.strip() for h in records[0]]
    rows, summary, seen = [], {}, set()
    for line_number, record in enumerate(records[1:], start=2):
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            raise DataError(path, f"line {line_number}: {len(record)} fields, header has {len(header)}")
        row = {"Label": record[0].strip()}
        for name, cell in zip(header[1:], record[1:]):
            row[name] = _parse_number(cell, path, line_number, name)
        if not row["Label"]:
            raise DataError(path, f"line {line_number}: empty case id")
        if row["Label"] in SUMMARY_LABELS:
            summary[row["Label"]] = row
        elif row["Label"] in seen:
            raise DataError(path, f"line {line_number}: case {row['Label']} appears twice")
        else:
            seen.add(row["Label"])
            rows.append(row)
    return rows, summary


def format_number(value):
    value = float(value)
    return "nan" if math.isnan(value) else format(value, ".10g")


def _parse_number(cell, path, line_number, column):
    try:
        return float(cell)
    except ValueError:
        raise DataError(path, f"line {line_number}: {column} value {cell!r} is not a number") from None


# ---------------------------------------------------------------------------------
# Evaluating files and folders: pairing predictions with references by case id.

@dataclass(frozen=True)
class Pair:
    case_id: str
    pred_path: str
    ref_path: str
    ref_label_map: dict


@dataclass
class Evaluation:
    rows: list                      # per case, sorted by id: {"Label": case_id, column: value}
    predictions_without_reference: list = field(default_factory=list)   # (case_id, path)
    references_without_prediction: list = field(default_factory=list)   # (case_id, path)


def run_evaluation(out_csv, pred=None, ref=None, pred_dir=None, ref_dir=None, layout="auto", layout_file=None,
                   pred_convention="brats2017", ref_convention="brats2017", workers=2, allow_missing=False,
                   progress=True, log=None, metrics="legacy", lesion_rules="brats2026"):
    """What `python -m brats_tf.evaluate` does: evaluate a file pair or two folders, write the CSV.

    The CSV holds the columns of `csv_columns(metrics, lesion_rules)`. Unmatched cases are
    reported one line each to `log` (default: stderr); unless allow_missing, any unmatched
    case is a DataError and no CSV is written.
    """
    files, dirs = (pred, ref), (pred_dir, ref_dir)
    if not ((None not in files and dirs == (None, None)) or (None not in dirs and files == (None, None))):
        raise ConfigError("pass either --pred and --ref, or --pred_dir and --ref_dir")
    columns = csv_columns(metrics, lesion_rules)
    log = log or (lambda line: print(line, file=sys.stderr))
    if pred is not None:
        row = evaluate_files(pred, ref, pred_convention, ref_convention, metrics, lesion_rules)
        evaluation = Evaluation(rows=[row])
    else:
        evaluation = evaluate_dirs(pred_dir, ref_dir, layout, layout_file, pred_convention, ref_convention,
                                   workers, progress, evaluate_matched=allow_missing, metrics=metrics,
                                   lesion_rules=lesion_rules)
    for case_id, path in evaluation.predictions_without_reference:
        log(f"prediction without reference: {case_id} ({path})")
    for case_id, path in evaluation.references_without_prediction:
        log(f"reference without prediction: {case_id} ({path})")
    unmatched = len(evaluation.predictions_without_reference) + len(evaluation.references_without_prediction)
    if unmatched and not allow_missing:
        raise DataError(pred_dir, f"{unmatched} case(s) without a counterpart (listed above); "
                                  "pass --allow_missing to evaluate the matched cases")
    if not evaluation.rows:
        raise DataError(pred_dir, "no prediction has a reference: nothing to evaluate")
    write_evaluation_csv(out_csv, evaluation.rows, columns)
    return evaluation


def evaluate_files(pred_path, ref_path, pred_convention="brats2017", ref_convention="brats2017",
                   metrics="legacy", lesion_rules="brats2026"):
    """Metrics row of one prediction file against one reference file."""
    csv_columns(metrics, lesion_rules)
    case_id = case_id_from_filename(pred_path)
    pair = Pair(case_id, os.fspath(pred_path), os.fspath(ref_path), dict(LABEL_MAPS[ref_convention]))
    return _evaluate_pair(pair, LABEL_MAPS[pred_convention], metrics, lesion_rules)


def evaluate_dirs(pred_dir, ref_dir, layout="auto", layout_file=None, pred_convention="brats2017",
                  ref_convention="brats2017", workers=2, progress=True, evaluate_matched=True,
                  metrics="legacy", lesion_rules="brats2026"):
    """Evaluates every prediction in pred_dir that has a reference in ref_dir.

    References come from `discover_cases` (any supported layout, or a layout file);
    layout "flat" reads a folder of label files named like the predictions, in
    `ref_convention`. Unmatched files on either side are listed in the result, not
    dropped silently; with evaluate_matched=False and any unmatched, nothing is
    evaluated (the caller is going to refuse anyway).
    """
    csv_columns(metrics, lesion_rules)     # refuse an unknown metric set before any work
    predictions = find_predictions(pred_dir)
    references = find_references(ref_dir, layout, layout_file, ref_convention)
    pairs = [Pair(cid, predictions[cid], *references[cid]) for cid in sorted(predictions) if cid in references]
    pred_only = [(cid, predictions[cid]) for cid in sorted(predictions) if cid not in references]
    ref_only = [(cid, references[cid][0]) for cid in sorted(references) if cid not in predictions]
    rows = []
    if evaluate_matched or not (pred_only or ref_only):
        rows = evaluate_pairs(pairs, LABEL_MAPS[pred_convention], workers, progress, metrics, lesion_rules)
    return Evaluation(rows, pred_only, ref_only)


def evaluate_pairs(pairs, pred_label_map, workers=2, progress=True, metrics="legacy", lesion_rules="brats2026"):
    """Metric rows of (prediction, reference) pairs, in parallel processes, sorted by case id.

    The first case that fails stops the run (its DataError is raised, pending cases
    are cancelled).
    """
    jobs = [(pair, pred_label_map, metrics, lesion_rules) for pair in pairs]
    pool = None
    if workers > 1 and len(jobs) > 1:
        # spawn: the parent may hold TensorFlow threads, which fork does not survive safely.
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    outcomes = pool.map(_evaluate_job, jobs) if pool else map(_evaluate_job, jobs)
    rows = []
    try:
        # disable=None: tqdm shows the bar only when stderr is a terminal.
        for outcome in tqdm(outcomes, total=len(jobs), desc="evaluate", unit="case",
                            disable=None if progress else True):
            if outcome[0] == "error":            # DataError does not pickle; rebuilt here
                raise DataError(outcome[1], outcome[2])
            rows.append(outcome[1])
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return sorted(rows, key=lambda row: row["Label"])


def find_predictions(pred_dir):
    """{case_id: path} of `<case_id>_seg.nii[.gz]` or `<case_id>.nii[.gz]` files in a folder."""
    pred_dir = os.fspath(pred_dir)
    if not os.path.isdir(pred_dir):
        raise DataError(pred_dir, "prediction directory not found")
    found = {}
    for name in sorted(os.listdir(pred_dir)):
        path = os.path.join(pred_dir, name)
        if name.startswith(".") or not name.endswith(NIFTI_SUFFIXES) or not os.path.isfile(path):
            continue
        case_id = case_id_from_filename(name)
        if case_id in found:
            raise DataError(path, f"second file for case {case_id} (also {os.path.basename(found[case_id])})")
        found[case_id] = path
    if not found:
        raise DataError(pred_dir, "no NIfTI predictions (<case_id>_seg.nii.gz or <case_id>.nii.gz) found")
    return found


def find_references(ref_dir, layout="auto", layout_file=None, ref_convention="brats2017"):
    """{case_id: (label path, label map)} of the cases in ref_dir that have a label file."""
    if layout == "flat" and not layout_file:
        return {cid: (path, dict(LABEL_MAPS[ref_convention])) for cid, path in find_predictions(ref_dir).items()}
    cases = discover_cases(ref_dir, layout, layout_file)
    return {case.case_id: (case.label.path, dict(case.label_map)) for case in cases if case.label is not None}


def case_id_from_filename(path):
    name = os.path.basename(os.fspath(path))
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    return name[:-len("_seg")] if name.endswith("_seg") else name


def _evaluate_job(job):
    """Worker entry point: ("ok", row) or ("error", path, problem)."""
    try:
        return ("ok", _evaluate_pair(*job))
    except DataError as err:
        return ("error", err.path, err.problem)


def _evaluate_pair(pair, pred_label_map, metrics="legacy", lesion_rules="brats2026"):
    ref_raw, ref_geometry = load_volume(pair.ref_path)
    pred_raw, pred_geometry = load_volume(pair.pred_path)
    if pred_geometry.shape != ref_geometry.shape:
        raise DataError(pair.pred_path, f"shape {pred_geometry.shape} differs from reference "
                                        f"{os.path.basename(pair.ref_path)} {ref_geometry.shape}")
    if not np.allclose(pred_geometry.affine, ref_geometry.affine, atol=1e-3):
        raise DataError(pair.pred_path, f"affine differs from reference {os.path.basename(pair.ref_path)}")
    pred = map_labels(pred_raw, pred_label_map, pair.pred_path)
    ref = map_labels(ref_raw, pair.ref_label_map, pair.ref_path)
    return {"Label": pair.case_id, **case_row(pred, ref, ref_geometry.spacing, metrics, lesion_rules)}
