"""Voting: the paper's hierarchical vote and the plain majority vote, against a
per-voxel reference written with Python Fractions and hand-worked cases."""

import itertools
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from brats_tf.inference import ensemble
from brats_tf.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PEERS = SHARED / "tcga_peer_segmentations" / "TCGA-DU-7294"


def reference_vote(votes, thresholds):
    """The decision tree of [M] Fig. 7 for one voxel, in exact arithmetic."""
    n = len(votes)
    v1, v2, v3 = (sum(v == label for v in votes) for label in (1, 2, 3))

    def ratio(a, b):
        return Fraction(a, b) if b else Fraction(0)   # 0/0 counts as 0

    p_tumor, p_core, p_enh = ratio(v1 + v2 + v3, n), ratio(v1 + v3, v1 + v2 + v3), ratio(v3, v1 + v3)
    t_tumor, t_core, t_enh = (Fraction(str(t)) for t in thresholds)
    if p_tumor < t_tumor:
        return 0, (p_tumor, p_core, p_enh)
    if p_core < t_core:
        return 2, (p_tumor, p_core, p_enh)
    return (3 if p_enh >= t_enh else 1), (p_tumor, p_core, p_enh)


def reference_majority(votes):
    counts = Counter(int(v) for v in votes)
    best = max(counts.values())
    return min(label for label, c in counts.items() if c == best)


@pytest.mark.parametrize("n, thresholds", [
    (1, (0.4, 0.3, 0.4)), (2, (0.5, 0.5, 0.5)), (3, (0.4, 0.3, 0.4)), (5, (0.5, 0.5, 0.5)),
    (6, (0.4, 0.3, 0.4)), (10, (0.3, 0.3, 0.7)), (7, (1.0, 1.0, 1.0)), (4, (0.0, 0.0, 0.0))])
def test_hierarchical_vote_matches_exact_reference(n, thresholds):
    rng = np.random.default_rng(n)
    # Skewed towards background and mixed votes so every branch of the tree is hit.
    maps = [rng.choice(4, size=(9, 8, 7), p=(0.4, 0.2, 0.2, 0.2)).astype(np.uint8) for _ in range(n)]
    labels, proportions = ensemble.hierarchical_vote(maps, thresholds)
    stacked = np.stack(maps, axis=-1)
    for index in np.ndindex(labels.shape):
        expected, (p_tumor, p_core, p_enh) = reference_vote(stacked[index], thresholds)
        assert labels[index] == expected, (index, stacked[index])
        assert proportions["tumor"][index] == pytest.approx(float(p_tumor), abs=1e-6)
        assert proportions["core"][index] == pytest.approx(float(p_core), abs=1e-6)
        assert proportions["enh"][index] == pytest.approx(float(p_enh), abs=1e-6)
    assert labels.dtype == np.uint8 and all(p.dtype == np.float32 for p in proportions.values())


def test_every_vote_combination_of_six_maps():
    """All 4^6 ways six models can vote, as one 4096-voxel volume, default thresholds."""
    combos = np.array(list(itertools.product(range(4), repeat=6)), dtype=np.uint8)  # (4096, 6)
    maps = [combos[:, i].reshape(16, 16, 16) for i in range(6)]
    labels, _ = ensemble.hierarchical_vote(maps, ensemble.DEFAULT_THRESHOLDS, with_proportions=False)
    expected = [reference_vote(votes, ensemble.DEFAULT_THRESHOLDS)[0] for votes in combos]
    np.testing.assert_array_equal(labels.reshape(-1), expected)
    majority = ensemble.majority_vote(maps)
    np.testing.assert_array_equal(majority.reshape(-1), [reference_majority(v) for v in combos])


def votes_as_maps(*voxel_votes):
    """Maps from per-voxel vote lists: votes_as_maps([0,2,3], [1,1,0]) -> 3 maps of 2 voxels."""
    return [np.array(column, dtype=np.uint8).reshape(-1, 1, 1) for column in zip(*voxel_votes)]


def test_hand_worked_votes_default_thresholds():
    maps = votes_as_maps(
        [0, 0, 0, 2, 2, 3],   # P_tumor 3/6 >= .4; P_core 1/3 >= .3; P_enh 1/1  -> enhancing
        [0, 0, 0, 0, 2, 3],   # P_tumor 2/6 < .4                                -> background
        [0, 0, 2, 2, 2, 1],   # P_core 1/4 < .3                                 -> edema
        [0, 2, 2, 1, 3, 1],   # P_core 3/5; P_enh 1/3 < .4                      -> ncr/net
        [2, 2, 2, 2, 2, 2],   # P_core 0/6, P_enh 0/0 counts as 0               -> edema
    )
    labels, proportions = ensemble.hierarchical_vote(maps)
    assert labels.reshape(-1).tolist() == [3, 0, 2, 1, 2]
    assert proportions["enh"].reshape(-1)[4] == 0.0


def test_threshold_is_inclusive_and_exact():
    # 10 models, 3 vote core: P_core = 3/10 exactly equals T_core = 0.3 ("≥" keeps it).
    # 0.3 * 10 is 3.0000000000000004 in floating point: a float comparison would drop it.
    maps = votes_as_maps([1, 1, 1, 2, 2, 2, 2, 2, 2, 2])
    assert ensemble.hierarchical_vote(maps, (0.4, 0.3, 0.4))[0].item() == 1
    assert ensemble.hierarchical_vote(maps, (0.4, 0.31, 0.4))[0].item() == 2
    # T = 1 means unanimity.
    labels = ensemble.hierarchical_vote(votes_as_maps([2, 2, 2], [2, 2, 0]), (1.0, 0.3, 0.4))[0]
    assert labels.reshape(-1).tolist() == [2, 0]


def test_many_digit_thresholds_stay_exact():
    # As typed on a command line: 29999999999999999 / 10^17, which does not reduce.
    threshold = ("0.4", "0.29999999999999999", "0.4")
    at_boundary = votes_as_maps([1] * 30 + [2] * 70)       # P_core = 0.3, just above T_core
    assert ensemble.hierarchical_vote(at_boundary, threshold)[0].item() == 1
    # 95 core votes x 10^17 is past int64: a product comparison would wrap around.
    many = votes_as_maps([1] * 95 + [2] * 5)                 # P_core = 0.95
    assert ensemble.hierarchical_vote(many, threshold)[0].item() == 1


def test_majority_tie_rule_prefers_lowest_label():
    maps = votes_as_maps([0, 0, 0, 2, 2, 2], [1, 1, 3, 3, 2, 0], [3, 3, 3, 2, 2, 2], [1, 2, 2, 1, 3, 3])
    assert ensemble.majority_vote(maps).reshape(-1).tolist() == [0, 1, 2, 1]


def test_vote_proportions_do_not_depend_on_method():
    rng = np.random.default_rng(1)
    maps = [rng.integers(0, 4, (5, 5, 5)).astype(np.int16) for _ in range(4)]
    by_vote = ensemble.hierarchical_vote(maps)[1]
    alone = ensemble.vote_proportions(maps)
    for name in ensemble.PROPORTION_NAMES:
        np.testing.assert_array_equal(by_vote[name], alone[name])


def test_layouts_and_dtypes_do_not_change_the_result():
    rng = np.random.default_rng(2)
    maps = [rng.integers(0, 4, (6, 7, 8)).astype(np.uint8) for _ in range(5)]
    mixed = [np.asfortranarray(m) if i % 2 else m.astype(np.int64) for i, m in enumerate(maps)]
    np.testing.assert_array_equal(ensemble.hierarchical_vote(maps)[0], ensemble.hierarchical_vote(mixed)[0])
    np.testing.assert_array_equal(ensemble.majority_vote(maps), ensemble.majority_vote(mixed))


@pytest.mark.parametrize("maps, message", [
    ([], "1 to 255"),
    ([np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8)], "shape"),
    ([np.full((2, 2, 2), 4, np.uint8)], "outside 0..3"),
    ([np.zeros((2, 2, 2), np.float32)], "dtype"),
])
def test_bad_label_maps_are_refused(maps, message):
    with pytest.raises(ValueError, match=message):
        ensemble.hierarchical_vote(maps)
    with pytest.raises(ValueError, match=message):
        ensemble.majority_vote(maps)


@pytest.mark.parametrize("value, message", [
    ("0.5,0.5", "3 values"), ("0.5,x,0.5", "not a number"), ((0.5, 1.5, 0.5), "outside"), ((-0.1, 0, 0), "outside")])
def test_bad_thresholds_are_config_errors(value, message):
    with pytest.raises(ConfigError, match=message):
        ensemble.parse_thresholds(value)


def test_thresholds_parse_as_written_decimals():
    assert ensemble.parse_thresholds("0.5, 0.3,1") == (Fraction(1, 2), Fraction(3, 10), Fraction(1))
    assert ensemble.parse_thresholds((0.4, 0.3, 0.4)) == (Fraction(2, 5), Fraction(3, 10), Fraction(2, 5))


def read_peer_maps():
    import nibabel as nib
    paths = sorted((PEERS / "peer_segmentations").glob("*.nii.gz"))
    raw = [np.asarray(nib.load(p).dataobj).astype(np.int64) for p in paths]
    to_internal = np.array([0, 1, 2, 0, 3], dtype=np.uint8)   # BraTS 2017: 4 is enhancing
    mav = np.asarray(nib.load(PEERS / "peer_fusions" / "mav.nii.gz").dataobj).astype(np.int64)
    return raw, [to_internal[r] for r in raw], mav


def numpy_dice(a, b):
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


@pytest.mark.skipif(not PEERS.is_dir(), reason="shared TCGA peer segmentations not available")
def test_peer_fusion_comes_close_to_the_toolkit_majority_vote():
    raw, maps, mav = read_peer_maps()
    # Everything below happens near the tumor: crop to where any map or mav has a label.
    box = tuple(slice(int(np.min(i)), int(np.max(i)) + 1)
                for i in np.nonzero(np.logical_or.reduce([r > 0 for r in raw] + [mav > 0])))
    raw, maps, mav = [r[box] for r in raw], [m[box] for m in maps], mav[box]
    n = len(maps)
    assert n == 5
    # What mav.nii.gz is: BraTS Toolkit's per-label majority in BraTS 2017 labels (0/1/2/4):
    # for label 4, then 2, then 1, voxels with at least n/2 votes for that label get it
    # (later labels overwrite). No voxel has 3 of 5 votes for label 4, hence no 4 in it.
    toolkit = np.zeros_like(mav)
    for label in (4, 2, 1):
        toolkit[sum((r == label).astype(int) for r in raw) >= n / 2] = label
    np.testing.assert_array_equal(toolkit, mav)

    fused, _ = ensemble.hierarchical_vote(maps, (0.5, 0.5, 0.5), with_proportions=False)
    mav_internal = np.array([0, 1, 2, 0, 0], dtype=np.uint8)[mav]
    regions = {"WT": (1, 2, 3), "TC": (1, 3)}
    for region, labels in regions.items():
        ours, theirs = np.isin(fused, labels), np.isin(mav_internal, labels)
        # Threshold: closer to mav than any two of the five algorithms are to each other
        # (WT 0.988, TC 0.963 at best); the rules differ only on split-vote voxels.
        best_peer_agreement = max(numpy_dice(np.isin(a, labels), np.isin(b, labels))
                                  for a, b in itertools.combinations(maps, 2))
        dice = numpy_dice(ours, theirs)
        assert dice > max(best_peer_agreement, 0.98), (region, dice, best_peer_agreement)
    # A label with a majority implies a tumor majority, so mav's tumor is inside ours.
    assert not np.any((mav_internal > 0) & (fused == 0))
    # ET: mav has none, ours has some. Our enhancing voxels are those where a minority
    # (at most 2 of 5) voted enhancing, yet at least half of the core votes are
    # enhancing: P_enh is conditional on core, the toolkit's vote is not.
    enhancing = fused == 3
    assert enhancing.any() and not np.any(mav_internal == 3)
    v1 = sum((m == 1).astype(int) for m in maps)[enhancing]
    v3 = sum((m == 3).astype(int) for m in maps)[enhancing]
    assert np.all(v3 <= 2) and np.all(2 * v3 >= v1 + v3)
