"""`brats_tf.evaluate`: predictions paired with references by case id, metrics per case,
the BraTS-format CSV (legacy columns, then lesion-wise ones), and unmatched cases reported
rather than dropped."""

import csv
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
from medpy.metric import binary as medpy

from brats_tf.evaluation import evaluate, lesionwise
from brats_tf.evaluation.metrics import COLUMNS as LEGACY_COLUMNS
from brats_tf.errors import ConfigError, DataError
from tests.conftest import REPO, run_module, shared_data
from tests.test_lesionwise import MISSED, SPLIT, edema, synthetic_case

HEADER = ("Label,Dice_ET,Dice_WT,Dice_TC,Sensitivity_ET,Sensitivity_WT,Sensitivity_TC,Specificity_ET,"
          "Specificity_WT,Specificity_TC,Hausdorff95_ET,Hausdorff95_WT,Hausdorff95_TC")


def seg_of(dataset, case_id):
    img = nib.load(dataset / case_id / f"{case_id}_seg.nii.gz")
    return np.asarray(img.dataobj), img.affine


@pytest.fixture
def predictions(tiny_dataset, tmp_path):
    """Case_000 exact; Case_001 with enhancing called necrosis; Case_002 shifted by 2 voxels."""
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    seg, affine = seg_of(tiny_dataset, "Case_000")
    nib.save(nib.Nifti1Image(seg, affine), pred_dir / "Case_000_seg.nii.gz")
    seg, affine = seg_of(tiny_dataset, "Case_001")
    nib.save(nib.Nifti1Image(np.where(seg == 4, 1, seg).astype(np.uint8), affine), pred_dir / "Case_001.nii.gz")
    seg, affine = seg_of(tiny_dataset, "Case_002")
    nib.save(nib.Nifti1Image(np.roll(seg, 2, axis=1), affine), pred_dir / "Case_002_seg.nii.gz")
    return pred_dir


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_evaluates_a_folder_against_a_brats_dataset(tiny_dataset, predictions, tmp_path):
    out = tmp_path / "metrics.csv"
    evaluation = evaluate.run_evaluation(out, pred_dir=predictions, ref_dir=tiny_dataset, workers=1, progress=False)
    records = read_csv(out)
    assert ",".join(records[0]) == HEADER
    assert [r[0] for r in records[1:]] == ["Case_000", "Case_001", "Case_002",
                                           "Mean", "StdDev", "Median", "25quantile", "75quantile"]
    exact, relabelled, shifted = ({h: float(v) for h, v in zip(records[0][1:], r[1:])} for r in records[1:4])
    assert all(exact[f"Dice_{r}"] == 1.0 and exact[f"Hausdorff95_{r}"] == 0.0 for r in ("ET", "WT", "TC"))
    assert relabelled["Dice_ET"] == 0.0 and relabelled["Hausdorff95_ET"] == 373.13
    assert relabelled["Dice_WT"] == 1.0 and relabelled["Dice_TC"] == 1.0
    # Case_002 has no enhancing tumor, nor has its prediction: both empty.
    assert shifted["Dice_ET"] == 1.0 and shifted["Hausdorff95_ET"] == 0.0
    ref, _ = seg_of(tiny_dataset, "Case_002")
    pred = np.roll(ref, 2, axis=1)
    for region, labels in (("WT", (1, 2, 4)), ("TC", (1, 4))):
        p, r = np.isin(pred, labels), np.isin(ref, labels)
        assert shifted[f"Dice_{region}"] == pytest.approx(medpy.dc(p, r), rel=1e-8)
        assert shifted[f"Hausdorff95_{region}"] == pytest.approx(medpy.hd95(p, r, (1, 1, 1)), rel=1e-8)
        assert shifted[f"Sensitivity_{region}"] == pytest.approx(medpy.sensitivity(p, r), rel=1e-8)
        assert shifted[f"Specificity_{region}"] == pytest.approx(medpy.specificity(p, r), rel=1e-8)
    mean = {h: float(v) for h, v in zip(records[0][1:], records[4][1:])}
    assert mean["Dice_ET"] == pytest.approx(2 / 3)      # 1 (exact), 0 (missed), 1 (both empty)
    assert [row["Label"] for row in evaluation.rows] == ["Case_000", "Case_001", "Case_002"]


# What `python -m brats_tf.evaluate` wrote for the `predictions` fixture before lesion-wise
# metrics existed (commit b395ab5); `--metrics legacy` must still write exactly this.
LEGACY_CSV = """\
Label,Dice_ET,Dice_WT,Dice_TC,Sensitivity_ET,Sensitivity_WT,Sensitivity_TC,Specificity_ET,Specificity_WT,Specificity_TC,Hausdorff95_ET,Hausdorff95_WT,Hausdorff95_TC
Case_000,1,1,1,1,1,1,1,1,1,0,0,0
Case_001,0,1,1,0,1,1,1,1,1,373.13,0,0
Case_002,1,0.7414448669,0.5897435897,1,0.7414448669,0.5897435897,1,0.988623055,0.9948068809,0,2,2
Mean,0.6666666667,0.9138149556,0.8632478632,0.6666666667,0.9138149556,0.8632478632,1,0.996207685,0.9982689603,124.3766667,0.6666666667,0.6666666667
StdDev,0.5773502692,0.1492768757,0.2368616489,0.5773502692,0.1492768757,0.2368616489,0,0.006568482233,0.00299824872,215.4267059,1.154700538,1.154700538
Median,1,1,1,1,1,1,1,1,1,0,0,0
25quantile,0.5,0.8707224335,0.7948717949,0.5,0.8707224335,0.7948717949,1,0.9943115275,0.9974034404,0,0,0
75quantile,1,1,1,1,1,1,1,1,1,186.565,1,1
"""


def test_legacy_csv_is_byte_identical_to_before(tiny_dataset, predictions, tmp_path):
    out = tmp_path / "cli.csv"
    result = run_module("brats_tf.evaluate", "--pred_dir", predictions, "--ref_dir", tiny_dataset, "--out", out,
                        "--metrics", "legacy", "--noprogress")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == LEGACY_CSV.encode()
    # The library's defaults (what the experiments call) stay legacy as well.
    evaluate.run_evaluation(tmp_path / "lib.csv", pred_dir=predictions, ref_dir=tiny_dataset, workers=1,
                            progress=False)
    rows = evaluate.evaluate_dirs(predictions, tiny_dataset, workers=1, progress=False).rows
    evaluate.write_evaluation_csv(tmp_path / "experiments.csv", rows)
    assert (tmp_path / "lib.csv").read_bytes() == (tmp_path / "experiments.csv").read_bytes() == LEGACY_CSV.encode()
    assert all(tuple(row)[1:] == LEGACY_COLUMNS for row in rows)


def test_parallel_workers_give_the_same_rows(tiny_dataset, predictions):
    serial = evaluate.evaluate_dirs(predictions, tiny_dataset, workers=1, progress=False)
    parallel = evaluate.evaluate_dirs(predictions, tiny_dataset, workers=2, progress=False)
    assert serial.rows == parallel.rows and len(serial.rows) == 3
    serial = evaluate.evaluate_dirs(predictions, tiny_dataset, workers=1, progress=False, metrics="all")
    parallel = evaluate.evaluate_dirs(predictions, tiny_dataset, workers=2, progress=False, metrics="all")
    assert str(serial.rows) == str(parallel.rows)            # str: NaN != NaN in a plain ==
    assert tuple(serial.rows[0])[1:] == LEGACY_COLUMNS + lesionwise.COLUMNS


def test_unmatched_cases_are_reported_not_dropped(tiny_dataset, predictions, tmp_path):
    shutil.copy(predictions / "Case_000_seg.nii.gz", predictions / "Stray_seg.nii.gz")
    (predictions / "Case_001.nii.gz").unlink()
    lines = []
    with pytest.raises(DataError, match=r"2 case\(s\) without a counterpart"):
        evaluate.run_evaluation(tmp_path / "m.csv", pred_dir=predictions, ref_dir=tiny_dataset, workers=1,
                               progress=False, log=lines.append)
    assert lines == [f"prediction without reference: Stray ({predictions / 'Stray_seg.nii.gz'})",
                     f"reference without prediction: Case_001 "
                     f"({tiny_dataset / 'Case_001' / 'Case_001_seg.nii.gz'})"]
    assert not (tmp_path / "m.csv").exists()
    lines.clear()
    evaluation = evaluate.run_evaluation(tmp_path / "m.csv", pred_dir=predictions, ref_dir=tiny_dataset,
                                        workers=1, progress=False, allow_missing=True, log=lines.append)
    assert [row["Label"] for row in evaluation.rows] == ["Case_000", "Case_002"] and len(lines) == 2
    assert [r[0] for r in read_csv(tmp_path / "m.csv")][1:3] == ["Case_000", "Case_002"]


def test_flat_reference_folder_and_label_conventions(tiny_dataset, predictions, tmp_path):
    flat = tmp_path / "flat_refs"
    flat.mkdir()
    for case_id in ("Case_000", "Case_001", "Case_002"):
        seg, affine = seg_of(tiny_dataset, case_id)
        seg_2023 = np.where(seg == 4, 3, seg).astype(np.uint8)         # BraTS 2023: enhancing is 3
        nib.save(nib.Nifti1Image(seg_2023, affine), flat / f"{case_id}.nii.gz")
    flat_eval = evaluate.evaluate_dirs(predictions, flat, layout="flat", ref_convention="brats2023",
                                      workers=1, progress=False)
    dataset_eval = evaluate.evaluate_dirs(predictions, tiny_dataset, workers=1, progress=False)
    assert flat_eval.rows == dataset_eval.rows
    with pytest.raises(DataError, match=r"Case_000.nii.gz: unknown label values \[3\]"):
        evaluate.evaluate_dirs(predictions, flat, layout="flat", workers=1, progress=False)   # read as 2017


def test_grid_mismatch_is_a_data_error_naming_the_prediction(tiny_dataset, predictions):
    seg, affine = seg_of(tiny_dataset, "Case_002")
    nib.save(nib.Nifti1Image(seg[:-1], affine), predictions / "Case_002_seg.nii.gz")
    for workers in (1, 2):       # the error also crosses the process pool intact
        with pytest.raises(DataError, match=r"pred/Case_002_seg.nii.gz: shape \(23, 26, 20\) differs "
                                            r"from reference Case_002_seg.nii.gz \(24, 26, 20\)"):
            evaluate.evaluate_dirs(predictions, tiny_dataset, workers=workers, progress=False)


def test_files_or_folders_not_both(tiny_dataset, predictions, tmp_path):
    for kwargs in ({"pred": predictions / "Case_001.nii.gz"}, {"pred_dir": predictions},
                   {"pred": predictions / "Case_001.nii.gz", "ref": tiny_dataset, "pred_dir": predictions}):
        with pytest.raises(ConfigError, match="either --pred and --ref, or --pred_dir and --ref_dir"):
            evaluate.run_evaluation(tmp_path / "m.csv", **kwargs)


def test_duplicate_prediction_names_are_refused(tiny_dataset, predictions):
    shutil.copy(predictions / "Case_000_seg.nii.gz", predictions / "Case_000.nii.gz")
    with pytest.raises(DataError, match="second file for case Case_000"):
        evaluate.find_predictions(predictions)


def test_cli_folder_and_single_file_modes(tiny_dataset, predictions, tmp_path):
    out = tmp_path / "metrics.csv"
    result = run_module("brats_tf.evaluate", "--pred_dir", predictions, "--ref_dir", tiny_dataset, "--out", out,
                        "--noprogress")
    assert result.returncode == 0, result.stderr
    assert len(read_csv(out)) == 1 + 3 + 5
    single = tmp_path / "single.csv"
    result = run_module("brats_tf.evaluate", "--pred", predictions / "Case_001.nii.gz",
                        "--ref", tiny_dataset / "Case_001" / "Case_001_seg.nii.gz", "--out", single)
    assert result.returncode == 0, result.stderr
    assert read_csv(single)[1] == read_csv(out)[2]           # same row for Case_001 either way


# --- lesion-wise columns through the command ----------------------------------------

LESION_SPACING = (0.75, 1.25, 2.5)     # exact in float32, as NIfTI headers store it


@pytest.fixture
def lesion_cases(tmp_path):
    """Flat folders of three cases {case_id: (pred, ref, spacing)}: two hand-worked edema cases
    of test_lesionwise (a missed lesion; a lesion split in two) and a multi-lesion case."""
    cases = {"hand_missed": (edema(MISSED[0]), edema(MISSED[1]), (1.0, 1.0, 1.0)),
             "hand_split": (edema(SPLIT[0]), edema(SPLIT[1]), (1.0, 1.0, 1.0)),
             "multi": (*synthetic_case(3), LESION_SPACING)}
    internal_to_2017 = np.array([0, 1, 2, 4], np.uint8)
    for side, index in (("pred", 0), ("ref", 1)):
        (tmp_path / side).mkdir()
        for case_id, arrays in cases.items():
            affine = np.diag(list(arrays[2]) + [1.0])
            nib.save(nib.Nifti1Image(internal_to_2017[arrays[index]], affine), tmp_path / side / f"{case_id}.nii.gz")
    return tmp_path / "pred", tmp_path / "ref", cases


def run_cli(lesion_cases, out, *flags):
    pred_dir, ref_dir, _ = lesion_cases
    result = run_module("brats_tf.evaluate", "--pred_dir", pred_dir, "--ref_dir", ref_dir, "--layout", "flat",
                        "--out", out, "--noprogress", *flags)
    assert result.returncode == 0, result.stderr
    return evaluate.read_evaluation_csv(out)


def assert_same_value(got, expected, what):
    if math.isnan(expected) or math.isinf(expected):
        assert got == expected or (math.isnan(got) and math.isnan(expected)), f"{what}: {got} != {expected}"
    else:                                     # the CSV keeps 10 significant digits
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), f"{what}: {got} != {expected}"


@pytest.mark.parametrize("rules", ["brats2026", "brats2023"])
def test_cli_all_metrics_adds_lesionwise_columns(lesion_cases, tmp_path, rules):
    _, _, cases = lesion_cases
    rows, summary = run_cli(lesion_cases, tmp_path / "all.csv", "--metrics", "all", "--lesion_rules", rules)
    header = (tmp_path / "all.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == ("Label",) + LEGACY_COLUMNS + lesionwise.columns(rules)
    legacy_rows, _ = run_cli(lesion_cases, tmp_path / "legacy.csv", "--metrics", "legacy")
    for row, legacy_row in zip(rows, legacy_rows):
        assert {c: row[c] for c in LEGACY_COLUMNS} == {c: legacy_row[c] for c in LEGACY_COLUMNS}
        pred, ref, spacing = cases[row["Label"]]
        expected = lesionwise.lesionwise_metrics(pred, ref, spacing, rules)
        for column, value in expected.items():
            assert_same_value(row[column], value, f"{row['Label']} {column}")
    for label, expected in evaluate.summary_rows(rows, header[1:])[0].items():    # Mean
        if label != "Label":
            assert_same_value(summary["Mean"][label], expected, f"Mean {label}")


def test_cli_lesionwise_values_of_the_hand_worked_cases(lesion_cases, tmp_path):
    rows, summary = run_cli(lesion_cases, tmp_path / "lw.csv", "--metrics", "lesionwise")
    assert set(rows[0]) == {"Label", *lesionwise.COLUMNS}
    by_case = {row["Label"]: row for row in rows}
    # test_lesionwise's hand computation: a missed lesion leaves Dice 1 and counts as FN;
    # the split lesion's larger part matches (Dice 0.75, HD95 3.25, NSD 0.85), the other is FP.
    missed, split = by_case["hand_missed"], by_case["hand_split"]
    assert (missed["LesionDice_WT"], missed["LesionTP_WT"], missed["LesionFN_WT"]) == (1, 1, 1)
    assert missed["LesionF1_WT"] == pytest.approx(2 / 3, rel=1e-9)
    assert (split["LesionDice_WT"], split["LesionHD95_WT"], split["LesionNSD_WT"]) == (0.75, 3.25, 0.85)
    assert (split["LesionTP_WT"], split["LesionFP_WT"], split["LesionFN_WT"]) == (1, 1, 0)
    assert math.isnan(missed["LesionDice_ET"]) and math.isnan(missed["LesionHD95_ET"])   # no ET anywhere
    assert by_case["multi"]["LesionNSDTolerance"] == 0.75                             # smallest spacing
    # The summary leaves NaN out: the ET mean is the multi-lesion case's value alone.
    assert summary["Mean"]["LesionDice_ET"] == by_case["multi"]["LesionDice_ET"]


def test_cli_refuses_an_unknown_metric_set(lesion_cases, tmp_path):
    pred_dir, ref_dir, _ = lesion_cases
    for flag, value in (("--metrics", "lesion"), ("--lesion_rules", "brats2021")):
        result = run_module("brats_tf.evaluate", "--pred_dir", pred_dir, "--ref_dir", ref_dir, "--layout", "flat",
                            "--out", tmp_path / "m.csv", flag, value)
        assert result.returncode == 1 and "Flags parsing error" in result.stderr, result.stderr
        assert f"{flag}={value}" in result.stderr and not (tmp_path / "m.csv").exists()
    with pytest.raises(ConfigError, match="unknown metric set 'lesion'"):
        evaluate.evaluate_dirs(pred_dir, ref_dir, "flat", metrics="lesion")
    with pytest.raises(ConfigError, match="unknown lesion-wise rules"):
        evaluate.run_evaluation(tmp_path / "m.csv", pred_dir=pred_dir, ref_dir=ref_dir, layout="flat",
                                metrics="all", lesion_rules="brats2021")


def test_cli_reports_unmatched_and_exits_1(tiny_dataset, predictions, tmp_path):
    shutil.copy(predictions / "Case_000_seg.nii.gz", predictions / "Stray.nii.gz")
    result = run_module("brats_tf.evaluate", "--pred_dir", predictions, "--ref_dir", tiny_dataset,
                        "--out", tmp_path / "m.csv", "--workers", "1")
    assert result.returncode == 1
    assert "prediction without reference: Stray" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    result = run_module("brats_tf.evaluate", "--pred_dir", predictions, "--ref", tiny_dataset,
                        "--out", tmp_path / "m.csv")
    assert result.returncode == 1 and "either --pred and --ref, or --pred_dir and --ref_dir" in result.stderr


def test_real_brats2013_references_through_a_layout_file(tmp_path):
    data = shared_data("brats2013_flair_t1c")
    layout = REPO / "data_prep" / "layouts" / "brats2013_deepmedic.json"
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    # Predictions for two of the four cases: the expert label itself (in BraTS 2017
    # values) and an eroded copy of it.
    from scipy import ndimage
    internal_to_2017 = np.array([0, 1, 2, 4], dtype=np.uint8)
    to_internal = np.array([0, 1, 2, 1, 3], dtype=np.uint8)         # BraTS 2013 five classes
    refs = {}
    for case_id, erode in (("brats_2013_pat0003_1", False), ("brats_2013_pat0004_1", True)):
        img = nib.load(data / case_id / "OTMultiClass.nii.gz")
        ref = to_internal[np.rint(np.asarray(img.dataobj)).astype(np.int64)]
        pred = ref.copy()
        if erode:
            tumor = np.nonzero(ref)
            box = tuple(slice(int(i.min()) - 3, int(i.max()) + 4) for i in tumor)   # erosion is local
            pred[box][~ndimage.binary_erosion(ref[box] > 0, iterations=2)] = 0
        nib.save(nib.Nifti1Image(internal_to_2017[pred], img.affine), pred_dir / f"{case_id}_seg.nii.gz")
        refs[case_id] = (pred, ref)
    out = tmp_path / "real.csv"
    result = run_module("brats_tf.evaluate", "--pred_dir", pred_dir, "--ref_dir", data, "--layout_file", layout,
                        "--out", out, "--allow_missing", "--noprogress", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("reference without prediction") == 2
    records = read_csv(out)
    rows = {r[0]: {h: float(v) for h, v in zip(records[0][1:], r[1:])} for r in records[1:3]}
    assert all(rows["brats_2013_pat0003_1"][f"Dice_{r}"] == 1.0 for r in ("ET", "WT", "TC"))
    pred, ref = refs["brats_2013_pat0004_1"]
    p, r = pred > 0, ref > 0
    box = tuple(slice(max(int(np.flatnonzero(r.any(axis=tuple(j for j in range(3) if j != i)))[0]) - 5, 0),
                      int(np.flatnonzero(r.any(axis=tuple(j for j in range(3) if j != i)))[-1]) + 6)
                for i in range(3))
    assert rows["brats_2013_pat0004_1"]["Dice_WT"] == pytest.approx(medpy.dc(p, r), rel=1e-8)
    assert rows["brats_2013_pat0004_1"]["Hausdorff95_WT"] == pytest.approx(
        medpy.hd95(p[box], r[box], (1, 1, 1)), rel=1e-8)
