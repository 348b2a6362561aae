"""Per-case metrics against MedPy (the chosen HD95 reference), hand-worked cases and the
BraTS empty-mask conventions; the evaluation CSV format."""

import math
from pathlib import Path

import numpy as np
import pytest
from medpy.metric import binary as medpy

from brats_tf.evaluation import evaluate, metrics
from brats_tf.constants import HD95_ONE_EMPTY_MM
from brats_tf.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PEERS = SHARED / "tcga_peer_segmentations" / "TCGA-DU-7294" / "peer_segmentations"


def ellipsoid(shape, center, radii):
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def blobs(shape, seed, fraction):
    """Irregular, multi-component masks: thresholded smoothed noise."""
    from scipy import ndimage
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
    return noise > np.quantile(noise, 1 - fraction)


SYNTHETIC_PAIRS = {
    "shifted spheres": (ellipsoid((40, 40, 30), (20, 20, 15), (8, 8, 8)),
                        ellipsoid((40, 40, 30), (22, 19, 15), (8, 8, 8))),
    "ellipsoid vs sphere": (ellipsoid((40, 40, 30), (20, 20, 15), (12, 6, 5)),
                            ellipsoid((40, 40, 30), (20, 20, 15), (7, 7, 7))),
    "disjoint blobs": (blobs((36, 32, 28), 1, 0.05), blobs((36, 32, 28), 2, 0.05)),
    "touching the image border": (ellipsoid((30, 30, 20), (0, 15, 10), (9, 9, 6)),
                                  ellipsoid((30, 30, 20), (2, 15, 19), (9, 8, 6))),
    "single voxels": (np.pad(np.ones((1, 1, 1), bool), ((3, 10), (4, 2), (5, 5))),
                      np.pad(np.ones((1, 1, 1), bool), ((9, 4), (1, 5), (5, 5)))),
    "small inside large": (ellipsoid((40, 40, 30), (20, 20, 15), (3, 3, 3)),
                           ellipsoid((40, 40, 30), (20, 20, 15), (15, 15, 12))),
}
SPACINGS = [(1.0, 1.0, 1.0), (0.9375, 0.9375, 3.0), (1.2, 0.8, 2.5)]


@pytest.mark.parametrize("name", sorted(SYNTHETIC_PAIRS))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_hd95_matches_medpy_on_synthetic_pairs(name, spacing):
    a, b = SYNTHETIC_PAIRS[name]
    expected = medpy.hd95(a, b, voxelspacing=spacing)
    assert metrics.hd95(a, b, spacing) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert metrics.hd95(b, a, spacing) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name", sorted(SYNTHETIC_PAIRS))
def test_overlap_metrics_match_medpy(name):
    a, b = SYNTHETIC_PAIRS[name]
    assert metrics.dice(a, b) == pytest.approx(medpy.dc(a, b))
    assert metrics.sensitivity(a, b) == pytest.approx(medpy.sensitivity(a, b))
    assert metrics.specificity(a, b) == pytest.approx(medpy.specificity(a, b))


def test_hand_worked_cube():
    ref = np.zeros((10, 10, 10), bool)
    ref[2:6, 2:6, 2:6] = True                # 64 voxels
    pred = np.roll(ref, 1, axis=0)           # shifted by one voxel: 48 overlap
    assert metrics.dice(pred, ref) == pytest.approx(2 * 48 / 128)
    assert metrics.sensitivity(pred, ref) == pytest.approx(48 / 64)
    assert metrics.specificity(pred, ref) == pytest.approx((1000 - 64 - 16) / (1000 - 64))
    # The shift moves each face one voxel; with spacing 2 mm along that axis, the
    # surface voxels of the two end faces are 2 mm from the other surface, the rest 0.
    assert metrics.hd95(pred, ref, (2.0, 1.0, 1.0)) == pytest.approx(medpy.hd95(pred, ref, (2.0, 1.0, 1.0)))
    assert metrics.hd95(pred, ref, (2.0, 1.0, 1.0)) == pytest.approx(2.0)


def test_empty_mask_conventions():
    empty = np.zeros((8, 8, 8), bool)
    some = empty.copy()
    some[2:4, 2:4, 2:4] = True
    assert metrics.dice(empty, empty) == 1.0 and metrics.hd95(empty, empty) == 0.0
    assert metrics.dice(some, empty) == 0.0 and metrics.dice(empty, some) == 0.0
    assert metrics.hd95(some, empty) == HD95_ONE_EMPTY_MM == metrics.hd95(empty, some) == 373.13
    assert metrics.sensitivity(some, empty) == 1.0 and metrics.sensitivity(empty, some) == 0.0
    assert metrics.specificity(empty, empty) == 1.0
    assert metrics.specificity(some, empty) == pytest.approx(1 - 8 / 512)
    assert metrics.specificity(empty, np.ones((2, 2, 2), bool)) == 1.0   # no negatives at all


def test_case_metrics_per_region():
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:10, 2:10, 2:10] = 2          # edema
    ref[4:8, 4:8, 4:8] = 1             # necrosis
    ref[5:7, 5:7, 5:7] = 3             # enhancing
    pred = ref.copy()
    pred[pred == 3] = 1                # enhancing missed, called necrosis
    row = metrics.case_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert tuple(row) == metrics.COLUMNS
    assert row["Dice_WT"] == 1.0 and row["Dice_TC"] == 1.0 and row["Dice_ET"] == 0.0
    assert row["Hausdorff95_WT"] == 0.0 and row["Hausdorff95_ET"] == 373.13
    assert row["Sensitivity_ET"] == 0.0 and row["Specificity_ET"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        metrics.case_metrics(pred[:-1], ref)


def test_column_order_is_the_brats_csv_header():
    assert ",".join(("Label",) + metrics.COLUMNS) == (
        "Label,Dice_ET,Dice_WT,Dice_TC,Sensitivity_ET,Sensitivity_WT,Sensitivity_TC,"
        "Specificity_ET,Specificity_WT,Specificity_TC,Hausdorff95_ET,Hausdorff95_WT,Hausdorff95_TC")


def read_peers(count):
    from brats_tf.constants import LABEL_MAPS
    from brats_tf.io.labels import map_labels
    from brats_tf.io.nifti import load_volume
    paths = sorted(PEERS.glob("*.nii.gz"))[:count]
    return [map_labels(load_volume(p)[0], LABEL_MAPS["brats2017"], p) for p in paths]


def crop_around(masks, margin):
    """A box holding all masks with `margin` background voxels, for a faster MedPy."""
    union = np.logical_or.reduce(masks)
    lo = [max(int(np.flatnonzero(union.any(axis=tuple(j for j in range(3) if j != i)))[0]) - margin, 0)
          for i in range(3)]
    hi = [int(np.flatnonzero(union.any(axis=tuple(j for j in range(3) if j != i)))[-1]) + margin + 1
          for i in range(3)]
    return tuple(slice(a, b) for a, b in zip(lo, hi))


@pytest.mark.skipif(not PEERS.is_dir(), reason="shared TCGA peer segmentations not available")
def test_hd95_matches_medpy_on_real_peer_segmentations():
    maps = read_peers(3)
    # MedPy on a box 10 voxels larger than both masks on each side (its result there is
    # the full-grid one; ours crops to 1 voxel, so a wrong crop would show). The slow
    # test below runs MedPy on the full 240x240x155 grid (~5 s per call).
    for region in ("WT", "TC"):
        for i, j in ((0, 1), (0, 2), (1, 2)):
            a, b = metrics.region_mask(maps[i], region), metrics.region_mask(maps[j], region)
            box = crop_around([a, b], margin=10)
            for spacing in SPACINGS[1:]:
                expected = medpy.hd95(a[box], b[box], voxelspacing=spacing)
                assert metrics.hd95(a, b, spacing) == pytest.approx(expected, rel=1e-9), (region, i, j, spacing)


@pytest.mark.slow
@pytest.mark.skipif(not PEERS.is_dir(), reason="shared TCGA peer segmentations not available")
def test_case_metrics_match_medpy_on_full_real_volumes():
    maps = read_peers(5)
    spacing = (1.0, 1.0, 2.0)
    for pred, ref in ((maps[0], maps[1]), (maps[2], maps[4])):
        row = metrics.case_metrics(pred, ref, spacing)
        for region in ("WT", "TC", "ET"):
            p, r = metrics.region_mask(pred, region), metrics.region_mask(ref, region)
            if p.any() and r.any():
                assert row[f"Hausdorff95_{region}"] == pytest.approx(medpy.hd95(p, r, spacing), rel=1e-9)
            assert row[f"Dice_{region}"] == pytest.approx(medpy.dc(p, r))


# --- the evaluation CSV -------------------------------------------------------------

def test_summary_rows_hand_computed():
    rows = [{"Label": f"c{i}", "Dice_ET": v} for i, v in enumerate([4.0, 1.0, 3.0, 2.0])]
    summary = {row["Label"]: row["Dice_ET"] for row in evaluate.summary_rows(rows, ["Dice_ET"])}
    assert summary["Mean"] == 2.5
    assert summary["StdDev"] == pytest.approx(math.sqrt(5 / 3))     # sample std (ddof=1)
    assert summary["Median"] == 2.5
    assert summary["25quantile"] == 1.75 and summary["75quantile"] == 3.25
    single = evaluate.summary_rows(rows[:1], ["Dice_ET"])
    assert math.isnan(single[1]["Dice_ET"]) and single[0]["Dice_ET"] == 4.0


def test_evaluation_csv_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"Label": f"case_{i:03d}", **{c: float(rng.uniform(0, 1)) for c in metrics.COLUMNS}}
            for i in range(5)]
    path = tmp_path / "eval.csv"
    evaluate.write_evaluation_csv(path, rows)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(("Label",) + metrics.COLUMNS)
    assert [line.split(",")[0] for line in lines[1:]] == [r["Label"] for r in rows] + list(evaluate.SUMMARY_LABELS)
    back, summary = evaluate.read_evaluation_csv(path)
    assert [r["Label"] for r in back] == [r["Label"] for r in rows]
    for original, read in zip(rows, back):
        for column in metrics.COLUMNS:
            assert read[column] == pytest.approx(original[column], rel=1e-9)
    assert summary["Mean"]["Dice_WT"] == pytest.approx(np.mean([r["Dice_WT"] for r in rows]), rel=1e-9)
    assert not list(tmp_path.glob(".*tmp*"))     # no temp file left behind


def test_summary_rows_leave_nan_out_and_keep_inf():
    # The organisers' summary (pandas, skipna): NaN (region empty in both masks) is left out;
    # inf (lesion-wise HD95 without a matched lesion) makes the Mean inf and the StdDev NaN,
    # and sorts last for the Median and the quantiles.
    rows = [{"Label": f"c{i}", "hd95": h, "dice": d, "empty": math.nan}
            for i, (h, d) in enumerate([(2.0, 1.0), (math.inf, 0.0), (4.0, math.nan), (math.nan, 0.5)])]
    summary = {row["Label"]: row for row in evaluate.summary_rows(rows, ["hd95", "dice", "empty"])}
    hd95 = {label: row["hd95"] for label, row in summary.items()}      # over 2, 4, inf
    assert hd95["Mean"] == math.inf and math.isnan(hd95["StdDev"])
    assert (hd95["Median"], hd95["25quantile"], hd95["75quantile"]) == (4.0, 3.0, math.inf)
    dice = {label: row["dice"] for label, row in summary.items()}      # over 1, 0, 0.5
    assert (dice["Mean"], dice["StdDev"], dice["Median"], dice["25quantile"], dice["75quantile"]) == (
        0.5, 0.5, 0.5, 0.25, 0.75)
    assert all(math.isnan(row["empty"]) for row in summary.values())
    both_inf = evaluate.summary_rows([{"Label": "a", "x": math.inf}, {"Label": "b", "x": math.inf}], ["x"])
    assert [row["x"] for row in both_inf][2:] == [math.inf] * 3          # never inf - inf = NaN


def test_evaluation_csv_round_trip_with_lesionwise_columns(tmp_path):
    columns = evaluate.csv_columns("all")
    rng = np.random.default_rng(1)
    rows = [{"Label": f"case_{i}", **{c: float(rng.uniform(0, 400)) for c in columns}} for i in range(4)]
    rows[0].update(LesionHD95_ET=math.inf, LesionDice_ET=0.0, LesionTP_ET=0, LesionFN_ET=3)    # lesions missed
    rows[1].update(LesionHD95_NETC=math.nan, LesionDice_NETC=math.nan)             # no NETC anywhere
    path = tmp_path / "all.csv"
    evaluate.write_evaluation_csv(path, rows, columns)
    lines = [line.split(",") for line in path.read_text().splitlines()]
    assert tuple(lines[0]) == ("Label",) + metrics.COLUMNS + columns[len(metrics.COLUMNS):]
    cells = [dict(zip(lines[0], line)) for line in lines[1:3]]
    assert (cells[0]["LesionHD95_ET"], cells[0]["LesionTP_ET"], cells[0]["LesionFN_ET"]) == ("inf", "0", "3")
    assert cells[1]["LesionDice_NETC"] == "nan"
    back, summary = evaluate.read_evaluation_csv(path)
    assert [tuple(row) for row in back] == [("Label",) + columns] * 4
    for original, read in zip(rows, back):
        for column in columns:
            assert read[column] == pytest.approx(original[column], rel=1e-9, nan_ok=True)
    expected = {row["Label"]: row for row in evaluate.summary_rows(rows, columns)}
    for label in evaluate.SUMMARY_LABELS:
        for column in columns:
            assert summary[label][column] == pytest.approx(expected[label][column], rel=1e-9, nan_ok=True)
    assert summary["Mean"]["LesionHD95_ET"] == math.inf
    assert summary["Mean"]["LesionDice_NETC"] == pytest.approx(np.mean([r["LesionDice_NETC"] for r in rows[::2]]
                                                                       + [rows[3]["LesionDice_NETC"]]))


@pytest.mark.parametrize("text, message", [
    ("case,Dice_ET\na,1\n", "Label"),
    ("Label,Dice_ET\na,1\na,0.5\n", "appears twice"),
    ("Label,Dice_ET\na,high\n", "not a number"),
    ("Label,Dice_ET\na,1,2\n", "fields"),
    ("Label,Dice_ET\n,1\n", "empty case id"),
])
def test_bad_evaluation_csvs_are_data_errors(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        evaluate.read_evaluation_csv(path)
    assert str(path) in str(err.value)
