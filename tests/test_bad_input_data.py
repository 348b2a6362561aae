"""Reliability matrix (issue 17), the data-side commands: `check_dataset`, `build_records`,
`evaluate`, `fuse` and `compare`, each against every kind of bad input it can meet. Each
run must exit 1 with one line naming the file and the problem, print no traceback, and
leave its output location as it was (no partial file, an earlier output untouched).
BUILD_NOTES "Reliability matrix" lists what each command was tried with."""

import csv
import shutil

import nibabel as nib
import numpy as np
import pytest

from tests import badinput
from tests.badinput import expect_refusal, run_command, snapshot
from tests.conftest import write_brats2017_case

pytestmark = pytest.mark.slow

# kinds of damage to one sequence of a case: (damage, the words the error line must hold)
SEQUENCE_DAMAGE = {
    "not_nifti": "not a readable NIfTI",
    "png_renamed": "not a readable NIfTI",
    "truncated_gzip": "truncated gzip",
    "corrupt_gzip": "corrupt gzip stream",
    "impossible_header": "negative dimension",
    "bad_datatype": "not a readable NIfTI",
    "four_d": "expected a 3D image",
    "shape_mismatch": "shape",
    "affine_mismatch": "affine",
    "nan_voxels": "non-finite",
    "all_zero": "all zero",
}
LABEL_DAMAGE = {**{k: v for k, v in SEQUENCE_DAMAGE.items() if k not in ("nan_voxels", "all_zero")},
                "unknown_labels": "unknown label values [7]"}


def _dataset(root, cases=("Case_000", "Case_001", "Case_002")):
    for seed, case_id in enumerate(cases):
        write_brats2017_case(root, case_id, seed=seed, with_enhancing=seed != 2)
    return root


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("clean") / "data")


@pytest.fixture
def data(clean, tmp_path):
    return badinput.copy_tree(clean, tmp_path / "data")


def _damage(data, kind, case_id="Case_001", name="t2"):
    path = data / case_id / f"{case_id}_{name}.nii.gz"
    getattr(badinput, kind)(path)
    return path


# --- check_dataset ------------------------------------------------------------------------

def _check(*args):
    return run_command("data_prep.check_dataset", *args)


@pytest.mark.parametrize("kind", sorted(SEQUENCE_DAMAGE))
def test_check_dataset_damaged_sequence(data, kind):
    path = _damage(data, kind)
    result = _check("--data_dir", data)
    expect_refusal(result, [path.name, SEQUENCE_DAMAGE[kind]], stream="stdout")
    assert "problems: 1" in result.stdout


@pytest.mark.parametrize("kind", sorted(LABEL_DAMAGE))
def test_check_dataset_damaged_label_map(data, kind):
    path = _damage(data, kind, name="seg")
    result = _check("--data_dir", data)
    expect_refusal(result, [path.name, LABEL_DAMAGE[kind]], stream="stdout")


@pytest.mark.parametrize("kind, words", [
    ("missing_folder", ["data directory not found"]),
    ("empty_folder", ["empty folder: no cases"]),
    ("duplicate_sequence", ["Case_001: 2 flair files (Case_001_FLAIR.nii.gz, Case_001_flair.nii.gz)"]),
    ("duplicate_by_suffix", ["Case_001: 2 flair files (Case_001_flair.nii.gz, Case_001_flair.nii)"]),
    ("msd_3d", ["imagesTr/BRATS_001.nii.gz", "expected a 4D image", "found shape (24, 26, 20)"]),
    ("layout_file", ["layout.json", "not valid JSON"]),
])
def test_check_dataset_folder_problems(data, tmp_path, kind, words):
    target = data
    args = []
    if kind == "missing_folder":
        target = tmp_path / "nowhere"
        words = [str(target)] + words
    elif kind == "empty_folder":
        target = tmp_path / "empty"
        target.mkdir()
        words = [str(target)] + words
    elif kind.startswith("duplicate"):
        _duplicate_flair(data, kind)
    elif kind == "msd_3d":
        target = tmp_path / "Task01_BrainTumour"
        (target / "imagesTr").mkdir(parents=True)
        (target / "labelsTr").mkdir()
        shutil.copy(data / "Case_000" / "Case_000_t1.nii.gz", target / "imagesTr" / "BRATS_001.nii.gz")
        shutil.copy(data / "Case_000" / "Case_000_seg.nii.gz", target / "labelsTr" / "BRATS_001.nii.gz")
    elif kind == "layout_file":
        layout = tmp_path / "layout.json"
        layout.write_text('{"case_glob": "*", "images": [}')
        args = ["--layout_file", layout]
    expect_refusal(_check("--data_dir", target, *args), words, stream="stdout")


def _duplicate_flair(data, kind):
    """A second FLAIR file in case Case_001: another case of the name, or the .nii beside the .nii.gz."""
    source = data / "Case_001" / "Case_001_flair.nii.gz"
    if kind == "duplicate_sequence":
        shutil.copy(source, data / "Case_001" / "Case_001_FLAIR.nii.gz")
    else:
        nib.save(nib.load(source), data / "Case_001" / "Case_001_flair.nii")


def test_check_dataset_unreadable_file(data):
    path = _damage(data, "unreadable")
    expect_refusal(run_command("data_prep.check_dataset", "--data_dir", data, unprivileged=True),
                   [path.name, "ermission denied"], stream="stdout")


def test_check_dataset_flag_out_of_range(data):
    expect_refusal(_check("--data_dir", data, "--modalities", "t1,pd"), ["unknown modalities ['pd']"])


# --- build_records ------------------------------------------------------------------------

def _build(data, out, *args, **kwargs):
    return run_command("data_prep.build_records", "--data_dir", data, "--out_dir", out, *args, **kwargs)


@pytest.mark.parametrize("kind", sorted(SEQUENCE_DAMAGE))
def test_build_records_damaged_sequence(data, tmp_path, kind):
    path = _damage(data, kind)
    out = tmp_path / "records"
    expect_refusal(_build(data, out), [path.name, SEQUENCE_DAMAGE[kind]], outputs=[out])


@pytest.mark.parametrize("kind", sorted(LABEL_DAMAGE))
def test_build_records_damaged_label_map(data, tmp_path, kind):
    path = _damage(data, kind, name="seg")
    out = tmp_path / "records"
    expect_refusal(_build(data, out), [path.name, LABEL_DAMAGE[kind]], outputs=[out])


@pytest.fixture(scope="module")
def built(clean, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "records"
    result = _build(clean, out)
    assert result.returncode == 0, result.stderr
    return out


def test_build_records_damage_leaves_the_previous_records_untouched(data, built, tmp_path):
    previous = badinput.copy_tree(built, tmp_path / "records")
    before = snapshot(previous)
    path = _damage(data, "corrupt_gzip")
    expect_refusal(_build(data, previous, "--overwrite"), [path.name, "CRC"], outputs=[previous],
                   before=[before])
    expect_refusal(_build(data, previous), [str(previous), "exists"], outputs=[previous], before=[before])


@pytest.mark.parametrize("kind, words", [
    ("missing_folder", ["data directory not found"]),
    ("empty_folder", ["empty folder: no cases"]),
    ("duplicate_sequence", ["Case_001: 2 flair files"]),
    ("duplicate_by_suffix", ["Case_001: 2 flair files"]),
    ("median_scale", ["median_scale"]),
    ("crop_margin", ["crop_margin"]),
])
def test_build_records_folder_and_flag_problems(data, tmp_path, kind, words):
    target, args = data, []
    if kind == "missing_folder":
        target = tmp_path / "nowhere"
    elif kind == "empty_folder":
        target = tmp_path / "empty"
        target.mkdir()
    elif kind.startswith("duplicate"):
        _duplicate_flair(data, kind)
    elif kind == "median_scale":
        args = ["--median_scale=-1"]
    elif kind == "crop_margin":
        args = ["--crop_margin=-3"]
    out = tmp_path / "records"
    expect_refusal(_build(target, out, *args), words, outputs=[out])


def test_build_records_unreadable_file_and_unwritable_output(data, tmp_path):
    path = _damage(data, "unreadable")
    out = tmp_path / "records"
    expect_refusal(_build(data, out, unprivileged=True), [path.name, "ermission denied"], outputs=[out])
    path.chmod(0o644)
    locked = badinput.read_only_folder(tmp_path / "locked")
    expect_refusal(_build(data, locked / "records", unprivileged=True), [str(locked), "ermission denied"],
                   outputs=[locked])


def test_build_records_full_disk(data, tmp_path):
    out = tmp_path / "records"
    expect_refusal(_build(data, out, file_size_limit=20_000), [str(out), "too large"], outputs=[out])


# --- evaluate -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def predictions(clean, tmp_path_factory):
    pred = tmp_path_factory.mktemp("pred")
    for case_id in ("Case_000", "Case_001", "Case_002"):
        shutil.copy(clean / case_id / f"{case_id}_seg.nii.gz", pred / f"{case_id}.nii.gz")
    return pred


def _evaluate(pred, ref, out, *args, **kwargs):
    return run_command("brats_tf.evaluate", "--pred_dir", pred, "--ref_dir", ref, "--out", out,
                       "--noprogress", "--workers", "1", *args, **kwargs)


@pytest.mark.parametrize("kind", sorted(LABEL_DAMAGE))
@pytest.mark.parametrize("side", ["prediction", "reference"])
def test_evaluate_damaged_label_map(data, predictions, tmp_path, kind, side):
    pred = badinput.copy_tree(predictions, tmp_path / "pred")
    path = _damage(data, kind, name="seg") if side == "reference" else pred / "Case_001.nii.gz"
    if side == "prediction":
        getattr(badinput, kind)(path)
    out = tmp_path / "out" / "metrics.csv"
    words = {"shape_mismatch": "differs from reference", "affine_mismatch": "differs from reference"}.get(
        kind, LABEL_DAMAGE[kind])
    expect_refusal(_evaluate(pred, data, out), [path.name, words], outputs=[out.parent])


@pytest.mark.parametrize("kind, words", [
    ("missing_pred_folder", ["pred_missing", "prediction directory not found"]),
    ("empty_pred_folder", ["pred_empty", "no NIfTI predictions"]),
    ("case_id_mismatch", ["prediction without reference: Stray"]),
    ("duplicate_prediction", ["second file for case Case_000"]),
    ("metrics_flag", ["metrics"]),
])
def test_evaluate_folder_and_flag_problems(data, predictions, tmp_path, kind, words):
    pred, args = badinput.copy_tree(predictions, tmp_path / "pred"), []
    if kind == "missing_pred_folder":
        pred = tmp_path / "pred_missing"
    elif kind == "empty_pred_folder":
        pred = tmp_path / "pred_empty"
        pred.mkdir()
    elif kind == "case_id_mismatch":
        (pred / "Case_002.nii.gz").rename(pred / "Stray.nii.gz")
    elif kind == "duplicate_prediction":
        shutil.copy(pred / "Case_000.nii.gz", pred / "Case_000_seg.nii.gz")
    elif kind == "metrics_flag":
        args = ["--metrics=lesion"]
    out = tmp_path / "out" / "metrics.csv"
    result = _evaluate(pred, data, out, *args)
    if kind == "case_id_mismatch":   # every unmatched case on its own line, then the error
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: ")
        assert any(all(w in line for w in words) for line in result.stderr.splitlines())
        assert not out.parent.exists()
        return
    expect_refusal(result, words, outputs=[out.parent])


def test_evaluate_previous_output_untouched_and_full_disk(data, predictions, tmp_path):
    out = tmp_path / "metrics.csv"
    out.write_text("an earlier evaluation\n")
    before = snapshot(out)
    pred = badinput.copy_tree(predictions, tmp_path / "pred")
    badinput.corrupt_gzip(pred / "Case_002.nii.gz")
    expect_refusal(_evaluate(pred, data, out), ["Case_002.nii.gz", "CRC"], outputs=[out], before=[before])
    expect_refusal(_evaluate(predictions, data, out, file_size_limit=200), [str(out), "too large"],
                   outputs=[out], before=[before])


def test_evaluate_unreadable_prediction_and_unwritable_output(data, predictions, tmp_path):
    pred = badinput.copy_tree(predictions, tmp_path / "pred")
    (pred / "Case_001.nii.gz").chmod(0)
    out = tmp_path / "out" / "metrics.csv"
    expect_refusal(_evaluate(pred, data, out, unprivileged=True), ["Case_001.nii.gz", "ermission denied"],
                   outputs=[out.parent])
    (pred / "Case_001.nii.gz").chmod(0o644)
    locked = badinput.read_only_folder(tmp_path / "locked")
    expect_refusal(_evaluate(pred, data, locked / "metrics.csv", unprivileged=True),
                   [str(locked), "ermission denied"], outputs=[locked])


# --- fuse ---------------------------------------------------------------------------------

def _fuse(output, *inputs, **kwargs):
    return run_command("brats_tf.fuse", "--output", output, *inputs, **kwargs)


@pytest.mark.parametrize("kind", sorted(LABEL_DAMAGE))
def test_fuse_damaged_input(predictions, tmp_path, kind):
    pred = badinput.copy_tree(predictions, tmp_path / "pred")
    inputs = [pred / "Case_001.nii.gz", pred / "Case_000.nii.gz", pred / "Case_002.nii.gz"]
    # the three phantoms share one grid; the damaged one is the second input
    getattr(badinput, kind)(inputs[1])
    out = tmp_path / "out" / "fused.nii.gz"
    words = {"shape_mismatch": "shape", "affine_mismatch": "geometry"}.get(kind, LABEL_DAMAGE[kind])
    expect_refusal(_fuse(out, *inputs), [inputs[1].name, words], outputs=[out.parent])


@pytest.mark.parametrize("kind, words", [
    ("missing_input", ["Case_009.nii.gz", "file not found"]),
    ("no_inputs", ["no segmentations to fuse"]),
    ("thresholds", ["thresholds"]),
])
def test_fuse_input_and_flag_problems(predictions, tmp_path, kind, words):
    inputs, args = [predictions / "Case_000.nii.gz", predictions / "Case_001.nii.gz"], []
    if kind == "missing_input":
        inputs.append(predictions / "Case_009.nii.gz")
    elif kind == "no_inputs":
        inputs = []
    elif kind == "thresholds":
        args = ["--thresholds=0.4,1.7,0.4"]
    out = tmp_path / "out" / "fused.nii.gz"
    expect_refusal(_fuse(out, *args, *inputs), words, outputs=[out.parent])


def test_fuse_previous_output_untouched_full_disk_and_permissions(predictions, tmp_path):
    inputs = [predictions / "Case_000.nii.gz", predictions / "Case_001.nii.gz"]
    out = tmp_path / "fused.nii.gz"
    shutil.copy(inputs[0], out)
    before = snapshot(out)
    expect_refusal(_fuse(out, *inputs, file_size_limit=100), [str(out), "too large"], outputs=[out], before=[before])
    copies = [shutil.copy(p, tmp_path / p.name) for p in inputs]
    (tmp_path / inputs[1].name).chmod(0)
    expect_refusal(_fuse(tmp_path / "new.nii.gz", *copies, unprivileged=True), [inputs[1].name, "ermission denied"],
                   outputs=[tmp_path / "new.nii.gz"])
    (tmp_path / inputs[1].name).chmod(0o644)
    locked = badinput.read_only_folder(tmp_path / "locked")
    expect_refusal(_fuse(locked / "fused.nii.gz", *copies, unprivileged=True), [str(locked), "ermission denied"],
                   outputs=[locked])


# --- compare ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluations(clean, tmp_path_factory):
    """Two evaluation CSVs of the same three cases."""
    root = tmp_path_factory.mktemp("compare")
    pred = root / "pred"
    pred.mkdir()
    for case_id in ("Case_000", "Case_001", "Case_002"):
        image = nib.load(clean / case_id / f"{case_id}_seg.nii.gz")
        seg = np.asarray(image.dataobj)
        nib.save(nib.Nifti1Image(np.roll(seg, 1, axis=0), image.affine), pred / f"{case_id}.nii.gz")
    for name, folder in (("baseline", pred), ("candidate", clean)):
        if folder is clean:   # the reference itself: a perfect candidate
            folder = root / "perfect"
            folder.mkdir()
            for case_id in ("Case_000", "Case_001", "Case_002"):
                shutil.copy(clean / case_id / f"{case_id}_seg.nii.gz", folder / f"{case_id}.nii.gz")
        assert _evaluate(folder, clean, root / f"{name}.csv").returncode == 0
    return root


def _rewrite_csv(path, edit):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(edit(rows))


@pytest.mark.parametrize("kind, words", [
    ("missing_file", ["candidate.csv", "No such file"]),
    ("empty_file", ["candidate.csv", "the file is empty"]),
    ("not_csv", ["candidate.csv", "not an evaluation CSV"]),
    ("png_renamed", ["candidate.csv", "not an evaluation CSV"]),
    ("case_id_mismatch", ["candidate.csv", "Case_002"]),
    ("non_numeric", ["candidate.csv", "line 3: Dice_ET value 'n/a' is not a number"]),
])
def test_compare_bad_evaluation_csv(evaluations, tmp_path, kind, words):
    candidate = tmp_path / "candidate.csv"
    shutil.copy(evaluations / "candidate.csv", candidate)
    if kind == "missing_file":
        candidate.unlink()
    elif kind == "empty_file":
        candidate.write_text("")
    elif kind == "not_csv":
        candidate.write_text("just some text\nwithout the columns\n")
    elif kind == "png_renamed":
        badinput.png_renamed(candidate)
    elif kind == "case_id_mismatch":
        _rewrite_csv(candidate, lambda rows: [r for r in rows if r[0] != "Case_002"])
    elif kind == "non_numeric":
        _rewrite_csv(candidate, lambda rows: [r[:1] + ["n/a"] + r[2:] if r[0] == "Case_001" else r for r in rows])
    out = tmp_path / "out" / "table.md"
    result = run_command("brats_tf.compare", "--baseline", evaluations / "baseline.csv",
                         "--candidate", candidate, "--out", out)
    expect_refusal(result, words, outputs=[out.parent])


def test_compare_previous_output_untouched_and_unwritable(evaluations, tmp_path):
    out = tmp_path / "table.md"
    out.write_text("an earlier table\n")
    before = snapshot(out)
    expect_refusal(run_command("brats_tf.compare", "--baseline", evaluations / "baseline.csv",
                               "--candidate", tmp_path / "none.csv", "--out", out),
                   ["none.csv"], outputs=[out], before=[before])
    expect_refusal(run_command("brats_tf.compare", "--baseline", evaluations / "baseline.csv",
                               "--candidate", evaluations / "candidate.csv", "--out", out,
                               file_size_limit=10), [str(out), "too large"], outputs=[out], before=[before])
    shutil.copy(evaluations / "candidate.csv", tmp_path / "candidate.csv")
    (tmp_path / "candidate.csv").chmod(0)
    expect_refusal(run_command("brats_tf.compare", "--baseline", evaluations / "baseline.csv",
                               "--candidate", tmp_path / "candidate.csv", unprivileged=True),
                   ["candidate.csv", "ermission denied"])
