"""Reliability matrix (issue 17), the model-side commands: `extract_features`, `train`,
`segment`, `export` and `run_experiment`, each against every kind of bad input it can meet.
Each run must exit 1 with one line naming the file and the problem, print no traceback, and
leave its output location as it was (no partial file, an earlier output untouched).
BUILD_NOTES "Reliability matrix" lists what each command was tried with. (The data-side
commands: tests/test_bad_input_data.py.)

Each command × kind is one `Job`: a `_<command>_job` function damages a copy of the good
inputs the way the kind says and names the command line, the output locations and the words
the error line must hold. The selected jobs are prepared at once and run `WORKERS` at a time
(`runs`): each is a TensorFlow start of ~4 s of CPU, mostly on one core, so on 2 free cores
the file takes about half its serial time. Each test then checks its job's result."""

import concurrent.futures
import json
import os
import shutil
from dataclasses import dataclass, field

import pytest

from brats_tf.configs.train2d import get_config
from brats_tf.inference import bundle_writer, features, pipeline
from brats_tf.training.stage2d import Trainer2D
from tests import badinput
from tests.badinput import expect_refusal, run_command, snapshot
from tests.test_bad_input_data import SEQUENCE_DAMAGE
from tests.test_features import export_2d_models, make_records

pytestmark = pytest.mark.slow

GRID = "24,26,20"   # the phantoms' whole grid: the bundle serves any of their crops
WORKERS = max(2, min(4, os.cpu_count() or 1))   # commands run at once (each holds ~0.5 GB)
ORIENTATIONS = ("axial", "coronal", "sagittal")
TRAIN_FLAGS = {"model.kind": "unet_axial", "data.batch_size": 4, "train.iterations": 2, "train.checkpoint_every": 1,
               "train.val_every": 0}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Built once: a record set of four phantoms, three 2D models (as initialized), their
    features, a 2D work dir stopped before its export (checkpoints only), a bundle of the
    axial model and an earlier segmentation of Case_0 by the coronal model (a refused run
    with the axial one cannot leave the same bytes by chance)."""
    root = tmp_path_factory.mktemp("bad-models")
    records = make_records(root)
    models = export_2d_models(records, root / "2d")
    features.extract_features(records, root / "features", models, verbose=False)
    bundle_writer.export_bundle([models["axial"]], root / "bundle", max_grid=GRID, verbose=False)
    pipeline.segment([models["coronal"]], root / "segmented", case_dir=root / "data" / "Case_0", verbose=False)
    unfinished = root / "unfinished"
    Trainer2D(_train_config(records), unfinished).run()
    (unfinished / "model.keras").unlink()   # as if killed before the export
    (unfinished / "model_info.json").unlink()
    return {"records": records, "data": root / "data", **models, "features": root / "features",
            "bundle": root / "bundle", "segmented": root / "segmented", "unfinished": unfinished}


def _train_config(records):
    """The config `python -m brats_tf.train` makes of TRAIN_FLAGS (a resumed run must ask for it)."""
    c = get_config("small")
    c.data.records_dir = str(records)
    for key, value in TRAIN_FLAGS.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


@dataclass
class Job:
    """One command line against one kind of bad input: the words its error line must hold,
    the output locations it must leave as they were (snapshots taken before it runs)."""
    module: str
    args: list
    words: list
    outputs: list = field(default_factory=list)
    unprivileged: bool = False
    file_size_limit: int = None
    after: object = None   # a further check of the output, called after the contract's


@pytest.fixture(scope="module")
def runs(built, request, tmp_path_factory):
    """{(command, kind): (future result, job, snapshots)} of the jobs selected in this session."""
    selected = [item for item in request.session.items if item.module is request.module and
                hasattr(item, "callspec") and "kind" in item.callspec.params]
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        started = {}
        for item in selected:
            command, kind = item.originalname[len("test_"):], item.callspec.params["kind"]
            job = JOBS[command](built, tmp_path_factory.mktemp(f"{command}-{kind}"), kind)
            before = [snapshot(output) for output in job.outputs]
            result = pool.submit(run_command, job.module, *job.args, unprivileged=job.unprivileged,
                                 file_size_limit=job.file_size_limit)
            started[command, kind] = result, job, before
        yield started


def _check(runs, command, kind):
    result, job, before = runs[command, kind]
    expect_refusal(result.result(), job.words, outputs=job.outputs, before=before)
    if job.after:
        job.after()


def _forget_model_hash(model_dir):
    """model_info.json as written before it recorded the sha256 of model.keras."""
    info = json.loads((model_dir / "model_info.json").read_text())
    del info["model_sha256"]
    (model_dir / "model_info.json").write_text(json.dumps(info))


def _damage_model(model_dir, kind):
    """The model kinds every command that reads exported models meets."""
    if kind == "missing_model":
        (model_dir / "model.keras").unlink()
        return [f"{model_dir.name}/model.keras", "not found"]
    if kind == "corrupt_model_info":
        badinput.corrupt_bytes(model_dir / "model_info.json")
        return [f"{model_dir.name}/model_info.json", "not valid JSON"]
    if kind == "unreadable_model":
        badinput.unreadable(model_dir / "model.keras")
        return [f"{model_dir.name}/model.keras", "ermission denied"]
    (badinput.truncate_bytes if kind == "truncated_model" else badinput.corrupt_bytes)(model_dir / "model.keras")
    if kind == "corrupt_model_without_hash":   # checked by loading it: Keras's errors, one line
        _forget_model_hash(model_dir)
        return [f"{model_dir.name}/model.keras", "cannot load the model"]
    return [f"{model_dir.name}/model.keras", "modified since export"]


# --- segment ------------------------------------------------------------------------------

SEGMENT = sorted(SEQUENCE_DAMAGE) + [
    "unreadable_sequence", "missing_case_dir", "empty_case_dir", "duplicate_sequence", "missing_model",
    "corrupt_model", "corrupt_model_without_hash", "corrupt_model_info", "unreadable_model", "corrupt_bundle_json",
    "unwritable_output", "full_output", "thresholds", "batch_size"]


def _segment_job(built, folder, kind):
    """Case_0 segmented into a folder holding its earlier segmentation (by another model)."""
    case = badinput.copy_tree(built["data"] / "Case_0", folder / "Case_0")
    out = badinput.copy_tree(built["segmented"], folder / "out")
    model = badinput.copy_tree(built["axial"], folder / "axial")
    source, args, job = [f"--models={model}"], [], {}
    if kind in SEQUENCE_DAMAGE:
        getattr(badinput, kind)(case / "Case_0_t2.nii.gz")
        words = ["Case_0_t2.nii.gz", SEQUENCE_DAMAGE[kind]]
    elif kind == "unreadable_sequence":
        badinput.unreadable(case / "Case_0_flair.nii.gz")
        words, job = ["Case_0_flair.nii.gz", "ermission denied"], {"unprivileged": True}
    elif kind == "missing_case_dir":
        case, words = folder / "nowhere", [str(folder / "nowhere"), "not found"]
    elif kind == "empty_case_dir":
        case = folder / "empty"
        case.mkdir()
        words = [str(case), "no cases"]
    elif kind == "duplicate_sequence":
        shutil.copy(case / "Case_0_flair.nii.gz", case / "Case_0_FLAIR.nii.gz")
        words = ["Case_0", "2 flair files"]
    elif kind.endswith("_model") or kind.startswith("corrupt_model"):
        words = _damage_model(model, kind)
        job = {"unprivileged": kind == "unreadable_model"}
    elif kind == "corrupt_bundle_json":
        bundle = badinput.copy_tree(built["bundle"], folder / "bundle")
        badinput.corrupt_bytes(bundle / "bundle.json")
        source, words = [f"--bundle={bundle}"], ["bundle/bundle.json", "not valid JSON"]
    elif kind == "unwritable_output":   # the earlier segmentation's folder, now read-only
        out.chmod(0o555)
        words, job = [str(out), "ermission denied"], {"unprivileged": True}
    elif kind == "full_output":   # the label map fits, the probabilities do not: none of the case's files change
        args, words, job = ["--save_probabilities"], ["Case_0_probabilities.nii.gz", "too large"], \
            {"file_size_limit": 20_000}
    elif kind == "thresholds":
        args, words = ["--thresholds=0.4,1.7,0.4"], ["thresholds", "outside [0, 1]"]
    elif kind == "batch_size":
        args, words = ["--batch_size=0"], ["batch_size"]
    return Job("brats_tf.segment", [f"--case_dir={case}", f"--out_dir={out}", *source, *args], words, [out], **job)


@pytest.mark.parametrize("kind", SEGMENT)
def test_segment(runs, kind):
    _check(runs, "segment", kind)


# --- extract_features ---------------------------------------------------------------------

EXTRACT_FEATURES = ["missing_records", "corrupt_manifest", "truncated_record", "missing_model", "corrupt_model",
                    "corrupt_model_without_hash", "unreadable_model", "unwritable_output", "full_output",
                    "batch_size"]


def _record_file(records, case_index):
    manifest = json.loads((records / "manifest.json").read_text())
    return records / manifest["records"] / manifest["cases"][case_index]["record_file"]


def _extract_features_job(built, folder, kind):
    """Into an earlier complete extraction by the same models, which the refused run must
    leave as it was. A truncated record (which that one need not read), a model loaded (whose
    other hash makes that folder another models' one) and the output kinds: into a new folder,
    which must stay empty (the cases extracted before the bad one are removed)."""
    records = badinput.copy_tree(built["records"], folder / "records")
    models = {o: badinput.copy_tree(built[o], folder / o) for o in ORIENTATIONS}
    out = badinput.copy_tree(built["features"], folder / "features")
    args, job = [], {}
    if kind == "missing_records":
        records, words = folder / "nowhere", [str(folder / "nowhere"), "no record manifest"]
    elif kind == "corrupt_manifest":
        badinput.corrupt_bytes(records / "manifest.json")
        words = ["records/manifest.json", "record manifest"]
    elif kind == "truncated_record":
        badinput.truncate_bytes(_record_file(records, 2))
        words = ["tfrecord-00002-of-00004", "corrupt records"]
    elif kind.endswith("_model") or kind.startswith("corrupt_model"):
        words = _damage_model(models["coronal"], kind)
        job = {"unprivileged": kind == "unreadable_model"}
    elif kind == "unwritable_output":
        out = badinput.read_only_folder(folder / "locked")
        words, job = [str(out), "ermission denied"], {"unprivileged": True}
        out = out / "features"
    elif kind == "full_output":
        words, job = ["Case_0.tfrecord", "too large"], {"file_size_limit": 20_000}
    elif kind == "batch_size":
        args, words = ["--batch_size=0"], ["batch_size"]
    if kind in ("truncated_record", "corrupt_model_without_hash", "full_output"):
        shutil.rmtree(out)
    return Job("data_prep.extract_features", [f"--records_dir={records}", f"--out_dir={out}",
                                              *[f"--{o}={models[o]}" for o in ORIENTATIONS], *args],
               words, [out.parent if kind == "unwritable_output" else out], **job)


@pytest.mark.parametrize("kind", EXTRACT_FEATURES)
def test_extract_features(runs, kind):
    _check(runs, "extract_features", kind)


# --- train --------------------------------------------------------------------------------

TRAIN = ["missing_records", "corrupt_manifest", "corrupt_checkpoint", "truncated_checkpoint_state", "iterations",
         "batch_size", "unwritable_workdir", "full_workdir"]


def _train_job(built, folder, kind):
    """Resuming the work dir of a run killed before its export: refused before it changes."""
    records, args, job = built["records"], [], {}
    workdir = badinput.copy_tree(built["unfinished"], folder / "workdir")
    checkpoint = workdir / "checkpoints" / "ckpt-00000002"
    outputs, after = [workdir], None
    if kind == "missing_records":
        records, words = folder / "nowhere", [str(folder / "nowhere"), "no record manifest"]
    elif kind == "corrupt_manifest":
        records = badinput.copy_tree(built["records"], folder / "records")
        badinput.corrupt_bytes(records / "manifest.json")
        words = ["records/manifest.json", "record manifest"]
    elif kind == "corrupt_checkpoint":
        badinput.corrupt_bytes(checkpoint / "model_weights.npz")
        words = ["ckpt-00000002/model_weights.npz", "modified since"]
    elif kind == "truncated_checkpoint_state":
        badinput.truncate_bytes(checkpoint / "state.json")
        words = ["ckpt-00000002/state.json", "not valid JSON"]
    elif kind == "iterations":
        args, words = ["--config.train.iterations=-1"], ["--config.train.iterations=-1", ">= 0"]
    elif kind == "batch_size":
        args, words = ["--config.data.batch_size=0"], ["--config.data.batch_size=0", ">= 1"]
    elif kind == "unwritable_workdir":
        locked = badinput.read_only_folder(folder / "locked")
        workdir, outputs = locked / "workdir", [locked]
        words, job = [str(workdir), "ermission denied"], {"unprivileged": True}
    elif kind == "full_workdir":
        # The first checkpoint does not fit. A new work dir is a run's resumable state: what
        # is there (config.json, split.json, the log) stays, but no partial checkpoint or model.
        workdir, outputs = folder / "new", []
        words, job = [str(workdir / "checkpoints" / "ckpt-00000001"), "too large"], {"file_size_limit": 20_000}

        def after():
            assert not list((workdir / "checkpoints").iterdir())
            assert not (workdir / "model.keras").exists() and not list(workdir.glob(".*"))
    return Job("brats_tf.train", [f"--config.data.records_dir={records}", f"--workdir={workdir}",
                                  *[f"--config.{k}={v}" for k, v in TRAIN_FLAGS.items()], *args],
               words, outputs, after=after, **job)


@pytest.mark.parametrize("kind", TRAIN)
def test_train(runs, kind):
    _check(runs, "train", kind)


# --- export -------------------------------------------------------------------------------

EXPORT = ["missing_model", "corrupt_model", "truncated_model", "corrupt_model_without_hash", "unreadable_model",
          "exists", "unwritable_output", "full_output", "max_grid", "tile_size"]


def _export_job(built, folder, kind):
    """With --overwrite over an earlier bundle (but for `exists`), which stays as it was; the
    folder beside it gets nothing either (the new bundle is built there)."""
    model = badinput.copy_tree(built["axial"], folder / "axial")
    out = badinput.copy_tree(built["bundle"], folder / "site" / "bundle")
    args, job, outputs = ["--overwrite"], {}, [out.parent]
    if kind.endswith("_model") or kind.startswith("corrupt_model"):
        words = _damage_model(model, kind)
        job = {"unprivileged": kind == "unreadable_model"}
    elif kind == "exists":
        args, words = [], [str(out), "exists; pass --overwrite"]
    elif kind == "unwritable_output":
        locked = badinput.read_only_folder(folder / "locked")
        out, outputs = locked / "bundle", [locked]
        words, job = [str(out), "ermission denied"], {"unprivileged": True}
    elif kind == "full_output":
        words, job = [str(out), "too large"], {"file_size_limit": 20_000}
    elif kind == "max_grid":
        args, words = ["--overwrite", "--max_grid=24,0,20"], ["max_grid", "three positive"]
    elif kind == "tile_size":
        args, words = ["--overwrite", "--tile_size=0"], ["tile_size"]
    grid = [] if kind == "max_grid" else [f"--max_grid={GRID}"]
    return Job("brats_tf.export", [f"--models={model}", f"--out={out}", *grid, *args], words, outputs, **job)


@pytest.mark.parametrize("kind", EXPORT)
def test_export(runs, kind):
    _check(runs, "export", kind)


# --- run_experiment -----------------------------------------------------------------------

RUN_EXPERIMENT = ["missing_data_dir", "empty_data_dir", "damaged_case", "unknown_experiment", "unknown_config_field",
                  "iterations", "test_fraction", "unwritable_workdir", "full_workdir"]


def _run_experiment_job(built, folder, kind):
    """On a work dir holding an earlier run's report; a dataset of three phantoms."""
    workdir = folder / "work"
    (workdir / "demo").mkdir(parents=True)
    (workdir / "demo" / "report.md").write_text("an earlier report\n")
    data = folder / "data"
    for number in range(3):
        shutil.copytree(built["data"] / f"Case_{number}", data / f"Case_{number}")
    args, job = [], {}
    if kind == "missing_data_dir":
        data, words = folder / "nowhere", [str(folder / "nowhere"), "not found"]
    elif kind == "empty_data_dir":
        data = folder / "empty"
        data.mkdir()
        words = [str(data), "no cases"]
    elif kind == "damaged_case":
        badinput.corrupt_gzip(data / "Case_1" / "Case_1_t2.nii.gz")
        words = ["Case_1_t2.nii.gz", "corrupt gzip stream"]
    elif kind == "unknown_experiment":
        args, words = ["--experiment=table9"], ["experiment", "table9"]
    elif kind == "unknown_config_field":
        args, words = ["--config.twod.train.nosuch=3"], ["--config.twod.train.nosuch", "no such field"]
    elif kind == "iterations":   # the 3D models' value: refused before the 2D models train
        args, words = ["--config.threed.train.iterations=-1"], ["--config.threed.train.iterations=-1", ">= 0"]
    elif kind == "test_fraction":
        args, words = ["--config.test_fraction=1.5"], ["--config.test_fraction=1.5", "[0, 1)"]
    elif kind == "unwritable_workdir":
        workdir.chmod(0o555)
        words, job = [str(workdir), "ermission denied"], {"unprivileged": True}
    elif kind == "full_workdir":
        words, job = [str(workdir / "records"), "too large"], {"file_size_limit": 20_000}
    return Job("run_experiment", [f"--workdir={workdir}", f"--data_dir={data}", *args], words, [workdir], **job)


@pytest.mark.parametrize("kind", RUN_EXPERIMENT)
def test_run_experiment(runs, kind):
    _check(runs, "run_experiment", kind)


JOBS = {"segment": _segment_job, "extract_features": _extract_features_job, "train": _train_job,
        "export": _export_job, "run_experiment": _run_experiment_job}
