"""Lesion-wise BraTS metrics: hand-computed cases for both rule sets, then agreement with
the organisers' `brats-evaluation` package (test-only, AGPL, never imported by the library)
on synthetic multi-lesion label maps and on the real peer segmentations in ../shared, both
on arrays and through `evaluate` (files on disk -> the evaluation CSV), and of the CSV's
summary rows with the package's own summary."""

import json
import math
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brats_tf.constants import LABEL_MAPS
from brats_tf.evaluation.lesionwise import (COLUMNS, REGIONS_BY_RULES, columns, lesionwise_metrics,
                                            region_lesionwise)
from brats_tf.evaluation import evaluate
from brats_tf.evaluation.metrics import hd95
from brats_tf.inference.ensemble import hierarchical_vote
from brats_tf.io.cases import map_labels
from tests.conftest import REPO, shared_data

SHAPE = (24, 11, 11)
NAN = math.nan
INF = math.inf


def cube(x0, size=4, y0=3):
    """Mask of a size^3 cube starting at (x0, y0, y0) in SHAPE (size 4: 64 voxels)."""
    mask = np.zeros(SHAPE, bool)
    mask[x0:x0 + size, y0:y0 + size, y0:y0 + size] = True
    return mask


def line(*ranges):
    """Mask of 1-voxel-thick segments along axis 0 at y = z = 5; ranges are inclusive (x0, x1).

    Thin lines make surfaces easy to count by hand: with the 6-connected erosion every
    voxel of a line is a surface voxel, and surface distances are distances along x.
    """
    mask = np.zeros(SHAPE, bool)
    for x0, x1 in ranges:
        mask[x0:x1 + 1, 5, 5] = True
    return mask


def edema(mask):
    """Label map with the mask as edema (label 2): it is the WT and SNFH regions, the rest empty."""
    return np.where(mask, 2, 0).astype(np.uint8)


def assert_close(actual, expected, tol=1e-9):
    for key, value in expected.items():
        got = actual[key]
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got), f"{key}: {got} != nan"
        elif isinstance(value, float) and math.isinf(value):
            assert got == value, f"{key}: {got} != {value}"
        else:
            assert got == pytest.approx(value, abs=tol), f"{key}: {got} != {value}"


# ---------------------------------------------------------------------------------
# Hand-computed cases, unit spacing (NSD tolerance 1 mm). Each: (pred mask, ref mask,
# expected brats2026 WT metrics, expected brats2023 WT metrics).

PERFECT = (cube(2), cube(2),
           # One 64-voxel lesion on both sides, identical.
           dict(LesionDice=1.0, LesionHD95=0.0, LesionNSD=1.0, LesionF1=1.0, LesionTP=1, LesionFP=0, LesionFN=0),
           dict(LesionDice=1.0, LesionHD95=0.0, LesionTP=1, LesionFP=0, LesionFN=0))

MISSED = (cube(1), cube(1) | cube(15),
          # Reference lesions A (x 1..4) and B (x 15..18); only A predicted, exactly.
          # 2026: mean over matched pairs only -> Dice 1; B counts as FN; F1 = 1 / (1 + 0.5).
          # 2023: gap 10 voxels > 2x3 dilation, so A and B stay apart; both 64 mm^3 > 50;
          #       Dice (1 + 0) / 2, HD95 (0 + 374) / 2.
          dict(LesionDice=1.0, LesionHD95=0.0, LesionNSD=1.0, LesionF1=2 / 3, LesionTP=1, LesionFP=0, LesionFN=1),
          dict(LesionDice=0.5, LesionHD95=187.0, LesionTP=1, LesionFP=0, LesionFN=1))

SPURIOUS = (cube(1) | cube(15), cube(1),
            # Prediction adds lesion B nowhere near the reference.
            # 2026: FP only in the counts; 2023: B adds a 0 Dice and a 374 HD95 to the means.
            dict(LesionDice=1.0, LesionHD95=0.0, LesionNSD=1.0, LesionF1=2 / 3, LesionTP=1, LesionFP=1, LesionFN=0),
            dict(LesionDice=0.5, LesionHD95=187.0, LesionTP=1, LesionFP=1, LesionFN=0))

SPLIT = (line((2, 7), (9, 11)), line((2, 11)),
         # Reference R: x 2..11 (10 voxels). Prediction: P1 x 2..7 (6), P2 x 9..11 (3).
         # Dice(R,P1) = 2*6/16 = 0.75 > Dice(R,P2) = 6/13, so R-P1 match, P2 is FP.
         # Distances R->P1: 0 (x2..7, six), 1, 2, 3, 4; P1->R: six 0. Pooled, sorted: twelve 0,
         # 1, 2, 3, 4; 95th percentile at index 0.95*15 = 14.25: 3 + 0.25 = 3.25.
         # NSD (tol 1): R->P1 7/10 within, P1->R 6/6: (0.7 + 1) / 2 = 0.85.
         # 2023: every lesion is 10 mm^3 <= 50, so nothing is scored, and P1, P2 touch R's
         # dilation so they are not FP: empty score -> Dice 1, HD95 0.
         dict(LesionDice=0.75, LesionHD95=3.25, LesionNSD=0.85, LesionF1=2 / 3, LesionTP=1, LesionFP=1, LesionFN=0),
         dict(LesionDice=1.0, LesionHD95=0.0, LesionTP=0, LesionFP=0, LesionFN=0))

MERGED = (line((2, 9)), line((2, 5), (7, 9)),
          # Reference R1: x 2..5 (4), R2: x 7..9 (3). Prediction P: x 2..9 (8), bridging them.
          # Dice(R1,P) = 8/12 = 2/3 > Dice(R2,P) = 6/11: R1-P match, R2 is FN.
          # R1->P: four 0; P->R1: four 0, 1, 2, 3, 4. Pooled 12: eight 0, 1, 2, 3, 4;
          # index 0.95*11 = 10.45: 3 + 0.45 = 3.45. NSD: R1 4/4, P 5/8 within 1: 0.8125.
          dict(LesionDice=2 / 3, LesionHD95=3.45, LesionNSD=0.8125, LesionF1=2 / 3, LesionTP=1, LesionFP=0, LesionFN=1),
          dict(LesionDice=1.0, LesionHD95=0.0, LesionTP=0, LesionFP=0, LesionFN=0))

BOTH_EMPTY = (np.zeros(SHAPE, bool), np.zeros(SHAPE, bool),
              # 2026: the gli config's "no instances" case is NaN for every score.
              # 2023: empty denominator -> Dice 1, HD95 0.
              dict(LesionDice=NAN, LesionHD95=NAN, LesionNSD=NAN, LesionF1=NAN, LesionTP=0, LesionFP=0, LesionFN=0),
              dict(LesionDice=1.0, LesionHD95=0.0, LesionTP=0, LesionFP=0, LesionFN=0))

PRED_EMPTY = (np.zeros(SHAPE, bool), cube(2),
              # 2026: zero TP with a reference -> Dice 0, NSD 0, HD95 inf, F1 0.
              # 2023: the 64 mm^3 lesion is missed -> Dice 0 / 1, HD95 374 / 1.
              dict(LesionDice=0.0, LesionHD95=INF, LesionNSD=0.0, LesionF1=0.0, LesionTP=0, LesionFP=0, LesionFN=1),
              dict(LesionDice=0.0, LesionHD95=374.0, LesionTP=0, LesionFP=0, LesionFN=1))

REF_EMPTY = (cube(2), np.zeros(SHAPE, bool),
             # 2026: as above with one FP. 2023: one FP -> Dice 0 / 1, HD95 374 / 1.
             dict(LesionDice=0.0, LesionHD95=INF, LesionNSD=0.0, LesionF1=0.0, LesionTP=0, LesionFP=1, LesionFN=0),
             dict(LesionDice=0.0, LesionHD95=374.0, LesionTP=0, LesionFP=1, LesionFN=0))

DISJOINT = (cube(15), cube(1),
            # Both non-empty, no overlap: 2026 zero TP -> 0 / inf; 2023 one FN (0, 374) and
            # one FP (0, 374): Dice 0 / 2, HD95 (374 + 374) / 2.
            dict(LesionDice=0.0, LesionHD95=INF, LesionNSD=0.0, LesionF1=0.0, LesionTP=0, LesionFP=1, LesionFN=1),
            dict(LesionDice=0.0, LesionHD95=374.0, LesionTP=0, LesionFP=1, LesionFN=1))

HAND_CASES = {"perfect": PERFECT, "missed": MISSED, "spurious": SPURIOUS, "split": SPLIT, "merged": MERGED,
              "both_empty": BOTH_EMPTY, "pred_empty": PRED_EMPTY, "ref_empty": REF_EMPTY, "disjoint": DISJOINT}


@pytest.mark.parametrize("name", HAND_CASES)
def test_hand_cases_brats2026(name):
    pred, ref, expected, _ = HAND_CASES[name]
    row = lesionwise_metrics(edema(pred), edema(ref))
    for region in ("WT", "SNFH"):        # edema only: WT and SNFH are the same mask
        assert_close(row, {f"{k}_{region}": v for k, v in expected.items()})
    for region in ("ET", "TC", "NETC"):  # empty on both sides
        assert_close(row, {f"{k}_{region}": v for k, v in BOTH_EMPTY[2].items()})
    assert row["LesionNSDTolerance"] == 1.0


@pytest.mark.parametrize("name", HAND_CASES)
def test_hand_cases_brats2023(name):
    pred, ref, _, expected = HAND_CASES[name]
    row = lesionwise_metrics(edema(pred), edema(ref), rules="brats2023")
    assert_close(row, {f"{k}_WT": v for k, v in expected.items()})
    assert_close(row, {f"{k}_ET": v for k, v in BOTH_EMPTY[3].items()})


def test_brats2023_merges_close_reference_lesions():
    # Reference cubes x 2..5 and x 8..11: 2 voxels apart, so the 3x dilation joins them into
    # one 128-voxel lesion; the prediction is the first cube: Dice 2*64/(128+64) = 2/3, a TP.
    # brats2026 keeps them apart: one exact match (Dice 1) and one FN.
    pred, ref = cube(2), cube(2) | cube(8)
    result = region_lesionwise(pred, ref, rules="brats2023")
    assert (result["LesionTP"], result["LesionFP"], result["LesionFN"]) == (1, 0, 0)
    assert result["LesionDice"] == pytest.approx(2 / 3)
    assert result["LesionHD95"] == pytest.approx(hd95(pred, ref))
    result = region_lesionwise(pred, ref, rules="brats2026")
    assert (result["LesionTP"], result["LesionFP"], result["LesionFN"], result["LesionDice"]) == (1, 0, 1, 1.0)


def test_brats2023_volume_threshold_is_in_mm3():
    # A missed 27-voxel lesion is 27 mm^3 (<= 50, not scored) at 1 mm, 216 mm^3 at 2 mm.
    ref, pred = cube(2, size=3), np.zeros(SHAPE, bool)
    small = region_lesionwise(pred, ref, (1.0, 1.0, 1.0), rules="brats2023")
    large = region_lesionwise(pred, ref, (2.0, 2.0, 2.0), rules="brats2023")
    assert (small["LesionDice"], small["LesionHD95"], small["LesionFN"]) == (1.0, 0.0, 0)
    assert (large["LesionDice"], large["LesionHD95"], large["LesionFN"]) == (0.0, 374.0, 1)


def test_nsd_tolerance_defaults_to_smallest_spacing():
    # SPLIT at spacing (2, 1, 1): distances along x double, R->P1 within 1 mm: 6/10 -> NSD 0.8;
    # with a 2 mm tolerance 7/10 again -> 0.85.
    pred, ref = SPLIT[0], SPLIT[1]
    spacing = (2.0, 1.0, 1.0)
    assert region_lesionwise(pred, ref, spacing)["LesionNSD"] == pytest.approx(0.8)
    row = lesionwise_metrics(edema(pred), edema(ref), spacing, nsd_tolerance=2.0)
    assert row["LesionNSD_WT"] == pytest.approx(0.85)
    assert row["LesionNSDTolerance"] == 2.0
    assert row["LesionHD95_WT"] == pytest.approx(6.5)


def test_columns_and_errors():
    assert COLUMNS == columns("brats2026")
    assert COLUMNS[:5] == ("LesionDice_ET", "LesionDice_WT", "LesionDice_TC", "LesionDice_NETC", "LesionDice_SNFH")
    assert COLUMNS[-1] == "LesionNSDTolerance"
    labels = edema(cube(2))
    for rules in REGIONS_BY_RULES:
        assert tuple(lesionwise_metrics(labels, labels, rules=rules)) == columns(rules)
    with pytest.raises(ValueError, match="rules"):
        lesionwise_metrics(labels, labels, rules="brats2021")
    with pytest.raises(ValueError, match="shape"):
        lesionwise_metrics(labels, labels[:-1])


def test_module_imports_neither_tensorflow_nor_keras():
    code = ("import sys, brats_tf.evaluation.lesionwise; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------------
# Agreement with the official implementation (brats-evaluation's `gli` config on panoptica).

GROUPS = {"ET": "et", "WT": "wt", "TC": "tc", "NETC": "netc", "SNFH": "snfh"}
OFFICIAL_KEYS = {"LesionDice": "sq_dsc", "LesionHD95": "sq_hd95", "LesionNSD": "sq_nsd", "LesionF1": "rq",
                 "LesionTP": "tp", "LesionFP": "fp", "LesionFN": "fn"}
TOLERANCE = {"LesionDice": 1e-6, "LesionF1": 1e-6, "LesionHD95": 0.01, "LesionNSD": 0.01, "LesionTP": 0, "LesionFP": 0, "LesionFN": 0}


@pytest.fixture(scope="module")
def official():
    brats_evaluation = pytest.importorskip("brats_evaluation")
    panoptica = pytest.importorskip("panoptica")
    panoptica.disable_citation_reminder()
    return brats_evaluation, panoptica.Panoptica_Evaluator.load_from_config(
        str(brats_evaluation.config_path("gli")))


def official_row(evaluator, pred, ref, spacing):
    """The official per-region results as our column names, from label maps (arrays API)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # panoptica warns about the 0.5 tolerance of its global NSD
        results = evaluator.evaluate(np.ascontiguousarray(pred), np.ascontiguousarray(ref),
                                     voxelspacing=tuple(float(s) for s in spacing))
    return {f"{ours}_{region}": float(results[group].to_dict()[theirs])
            for region, group in GROUPS.items() for ours, theirs in OFFICIAL_KEYS.items()}


def assert_agrees(ours, theirs):
    for column, expected in theirs.items():
        got = float(ours[column])
        if math.isnan(expected) or math.isinf(expected):
            assert got == expected or (math.isnan(got) and math.isnan(expected)), f"{column}: {got} vs {expected}"
        else:
            assert abs(got - expected) <= TOLERANCE[column.split("_")[0]], f"{column}: {got} vs {expected}"


def ellipsoid(shape, center, radii):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)))


def add_tumor(labels, center, radii):
    """Edema ellipsoid around a core whose outer shell is enhancing and inner part NCR/NET."""
    distance = ellipsoid(labels.shape, center, radii)
    labels[(distance < 1.0) & (labels == 0)] = 2
    labels[distance < 0.65] = 3
    labels[distance < 0.4] = 1


def synthetic_case(seed, shape=(44, 48, 40)):
    """(pred, ref) with 4-6 reference tumours, specks, a missed, a spurious, a split and two merged lesions."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(shape, np.uint8)
    tumors = [(rng.uniform(6, np.array(shape) - 6), rng.uniform(2.0, 6.0, size=3))
              for _ in range(rng.integers(4, 7))]
    for center, radii in tumors:
        add_tumor(ref, center, radii)
    for label in (1, 2, 3):                                        # one-voxel lesions
        ref[tuple(rng.integers(1, n - 1) for n in shape)] = label
    pred = ref.copy()
    pred[(rng.random(shape) < 0.08) & (pred == 2)] = 0              # ragged edema
    grown = ndimage.binary_dilation(ref > 0) & (ref == 0) & (rng.random(shape) < 0.3)
    pred[grown] = 2
    center, radii = tumors[0]                                      # missed
    pred[ellipsoid(shape, center, radii + 1) < 1] = 0
    add_tumor(pred, rng.uniform(5, np.array(shape) - 5), rng.uniform(1.5, 3.5, size=3))   # spurious
    center, radii = tumors[1]                                      # split by a 2-voxel cut
    cut = slice(int(round(center[0])), int(round(center[0])) + 2)
    pred[cut][ellipsoid(shape, center, radii + 1)[cut] < 1] = 0
    (start, _), (stop, _) = tumors[2], tumors[3]                   # merged by an edema bridge
    for t in np.linspace(0, 1, 60):
        point = np.round(start + t * (stop - start)).astype(int)
        box = tuple(slice(max(v - 1, 0), v + 1) for v in point)
        pred[box] = np.where(pred[box] == 0, 2, pred[box])
    pred[(pred == 1) & (rng.random(shape) < 0.1)] = 3              # speckled enhancing
    return pred, ref


@pytest.mark.parametrize("name", HAND_CASES)
def test_hand_cases_match_official(official, name):
    pred, ref = (edema(mask) for mask in HAND_CASES[name][:2])
    _, evaluator = official
    assert_agrees(lesionwise_metrics(pred, ref), official_row(evaluator, pred, ref, (1, 1, 1)))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 1.3, 2.1)])
def test_synthetic_cases_match_official(official, spacing):
    _, evaluator = official
    totals = np.zeros(3, int)
    for seed in range(4):
        pred, ref = synthetic_case(seed)
        ours = lesionwise_metrics(pred, ref, spacing)
        assert_agrees(ours, official_row(evaluator, pred, ref, spacing))
        totals += [sum(ours[f"{c}_{r}"] for r in GROUPS) for c in ("LesionTP", "LesionFP", "LesionFN")]
    assert (totals > 0).all(), "the synthetic cases should hold matched, spurious and missed lesions"


def test_official_file_route_agrees_at_isotropic_spacing(official, tmp_path):
    # brats-evaluate reads NIfTI files through SimpleITK, which reverses the axes and (in
    # panoptica 2.1.7) not the spacing, so only isotropic files can be compared this way.
    brats_evaluation, evaluator = official
    pred, ref = synthetic_case(7)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    nib.save(nib.Nifti1Image(pred, affine), tmp_path / "pred.nii.gz")
    nib.save(nib.Nifti1Image(ref, affine), tmp_path / "ref.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = brats_evaluation.evaluate_single_exam(str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"),
                                                        "case", evaluator)
    theirs = {f"{ours}_{region}": float(results[group][key])
              for region, group in GROUPS.items() for ours, key in OFFICIAL_KEYS.items()}
    assert_agrees(lesionwise_metrics(pred, ref, (1.5, 1.5, 1.5)), theirs)


def test_peer_segmentations_match_official(official):
    # Reference: BraTS Toolkit's majority vote of the five peers, then peer against peer
    # (hnfnetv1 and sanet0 are the two with several enhancing lesions).
    _, evaluator = official
    case = shared_data("tcga_peer_segmentations", "TCGA-DU-7294")

    def load(path):
        image = nib.load(path)
        return map_labels(np.asanyarray(image.dataobj), LABEL_MAPS["brats2017"], path), image.header.get_zooms()

    peers = {p.name.split(".")[0]: load(p)[0] for p in sorted((case / "peer_segmentations").glob("*.nii.gz"))}
    peers["mav"], spacing = load(case / "peer_fusions" / "mav.nii.gz")
    pairs = [("mav", name) for name in peers if name != "mav"]
    pairs += [("hnfnetv1-20", "sanet0-20"), ("sanet0-20", "hnfnetv1-20"), ("hnfnetv1-20", "isen-20")]
    for ref_name, pred_name in pairs:
        pred, ref = peers[pred_name], peers[ref_name]
        assert_agrees(lesionwise_metrics(pred, ref, spacing), official_row(evaluator, pred, ref, spacing))


# ---------------------------------------------------------------------------------
# The same agreement through `evaluate`: label files on disk -> run_evaluation (parallel
# workers, lesion-wise metrics) -> the CSV read back, against the package on the arrays.

INTERNAL_TO_2017 = np.array([0, 1, 2, 4], np.uint8)


def evaluate_folders(tmp_path, cases, affine):
    """Writes {case_id: (pred, ref)} as flat folders, runs the evaluation, returns its CSV rows by case."""
    for side, index in (("pred", 0), ("ref", 1)):
        (tmp_path / side).mkdir()
        for case_id, maps in cases.items():
            nib.save(nib.Nifti1Image(INTERNAL_TO_2017[maps[index]], affine), tmp_path / side / f"{case_id}.nii.gz")
    evaluate.run_evaluation(tmp_path / "eval.csv", pred_dir=tmp_path / "pred", ref_dir=tmp_path / "ref",
                            layout="flat", workers=2, progress=False, metrics="all")
    rows, _ = evaluate.read_evaluation_csv(tmp_path / "eval.csv")
    return {row["Label"]: row for row in rows}


def test_evaluate_path_matches_official_on_synthetic_cases(official, tmp_path):
    _, evaluator = official
    spacing = (0.75, 1.25, 2.5)                   # anisotropic, exact in the NIfTI header's float32
    cases = {f"seed{seed}": synthetic_case(seed) for seed in range(4, 8)}
    rows = evaluate_folders(tmp_path, cases, np.diag(spacing + (1.0,)))
    for case_id, (pred, ref) in cases.items():
        assert_agrees(rows[case_id], official_row(evaluator, pred, ref, spacing))


def test_evaluate_path_matches_official_on_peers_vs_hierarchical_fusion(official, tmp_path):
    # Each of the five TCGA peer segmentations against the toolkit's fusion of all five
    # (the paper's hierarchical vote, default thresholds), evaluated from files.
    _, evaluator = official
    folder = shared_data("tcga_peer_segmentations", "TCGA-DU-7294", "peer_segmentations")
    images = {p.name.split(".")[0]: nib.load(p) for p in sorted(folder.glob("*.nii.gz"))}
    peers = {name: map_labels(np.asanyarray(image.dataobj), LABEL_MAPS["brats2017"], name)
             for name, image in images.items()}
    fused, _ = hierarchical_vote(list(peers.values()), with_proportions=False)
    first = next(iter(images.values()))
    rows = evaluate_folders(tmp_path, {name: (peer, fused) for name, peer in peers.items()}, first.affine)
    assert len(rows) == 5
    spacing = first.header.get_zooms()
    for name, peer in peers.items():
        assert_agrees(rows[name], official_row(evaluator, peer, fused, spacing))
    unmatched = sum(row[f"{kind}_{region}"] for row in rows.values() for kind in ("LesionFP", "LesionFN") for region in GROUPS)
    assert unmatched > 0, "the peers should miss or add some lesions of the fusion"


def test_summary_rows_follow_the_official_summary(official, tmp_path):
    # brats-parse-metrics writes per-case rows, then pandas mean / std / median rows that
    # skip NaN and keep inf; the evaluation CSV's Mean / StdDev / Median must be the same.
    brats_evaluation, evaluator = official
    from brats_evaluation.metrics_parser import parse_seg_results
    cases = {name: (edema(HAND_CASES[name][0]), edema(HAND_CASES[name][1])) for name in ("perfect", "disjoint")}
    cases.update({f"seed{seed}": synthetic_case(seed) for seed in (0, 1)})
    report = {"metrics": [], "missings": []}
    ours = []
    for case_id, (pred, ref) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = evaluator.evaluate(pred, ref, voxelspacing=(1.0, 1.0, 1.0))
        report["metrics"].append({**{k: r.to_dict(True) for k, r in results.items()}, "subject_name": case_id})
        ours.append({"Label": case_id, **lesionwise_metrics(pred, ref)})
    # numpy scalars to Python numbers (inf stays inf: JSON's Infinity, as the package writes it)
    (tmp_path / "report.json").write_text(json.dumps(report, default=lambda value: value.item()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # pandas' std of a column holding inf
        parse_seg_results(str(tmp_path / "report.json"), str(tmp_path / "official.csv"))
    theirs = {row["subject_id"]: row for row in _read_official_csv(tmp_path / "official.csv")}
    summary = {row["Label"]: row for row in evaluate.summary_rows(ours, COLUMNS)}
    assert math.isinf(summary["Mean"]["LesionHD95_WT"]), "a case without a matched WT lesion"
    official_columns = {"LesionDice": "lesionwise_dsc_mean", "LesionHD95": "lesionwise_hd95_mean",
                        "LesionNSD": "lesionwise_nsd_mean", "LesionF1": "all_instance_f1",
                        "LesionTP": "all_instance_tp", "LesionFP": "all_instance_fp", "LesionFN": "all_instance_fn"}
    for label, their_label in (("Mean", "mean"), ("StdDev", "std"), ("Median", "median")):
        for region, group in GROUPS.items():
            for metric, key in official_columns.items():
                got, expected = summary[label][f"{metric}_{region}"], theirs[their_label][f"{key}_{group}"]
                assert got == pytest.approx(expected, rel=1e-9, abs=1e-12, nan_ok=True), (label, metric, region)


def _read_official_csv(path):
    import csv
    with open(path, newline="") as f:
        return [{k: (v if k == "subject_id" else float(v) if v else math.nan) for k, v in row.items()}
                for row in csv.DictReader(f)]
