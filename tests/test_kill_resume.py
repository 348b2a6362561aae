"""Kill -9 at seeded random moments, re-run the same command, lose nothing (issue 17, item 2):
the 2D, 3D and baseline trainers end bit-identical to an uninterrupted run (op determinism on);
build_records and extract_features end with the same records and features; run_experiment,
killed inside each of its stages, ends with the same models, label maps and evaluation."""

import csv
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from brats_tf.inference import features
from brats_tf.models import baselines, unet3d  # noqa: F401  (registers their layers for loading)
from brats_tf.records import reader
from brats_tf.records.writer import build_records
from tests.conftest import REPO, write_brats2017_case
from tests.test_features import export_2d_models

pytestmark = pytest.mark.slow

ITERATIONS = 8
STAGES = {
    "2d": ["--config=brats_tf/configs/train2d.py:small", "--config.data.batch_size=4", "--config.optim.period=2",
           "--config.optim.decrease_ratio=0.01"],
    "3d": ["--config=brats_tf/configs/train3d.py:small", "--config.model.kind=standard",
           "--config.model.levels=(2,3,4)", "--config.model.final=3", "--config.model.input_size=49",
           "--config.optim.accumulation_steps=2", "--config.train.tile_size=32"],
    "baseline": ["--config=brats_tf/configs/baselines.py:bcn_demo", "--config.data.batch_size=4"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    for i in range(4):
        write_brats2017_case(root / "data", f"Case_{i}", shape=(36, 38, 32), seed=i, with_enhancing=i != 1)
    build_records(root / "data", root / "records", normalization="zscore", verbose=False)
    return root


def _start(args):
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process):
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-2000:]
    return out


def _kill_when(process, ready, delay):
    """SIGKILL once `ready()` holds (then after `delay` s); returns whether it was killed mid-run."""
    deadline = time.time() + 600
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    killed = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.communicate()
    return killed


def _checkpoint(workdir, iteration):
    return lambda: (workdir / "checkpoints" / f"ckpt-{iteration:08d}" / "state.json").exists()


def _weights(workdir):
    return [np.asarray(w) for w in keras.models.load_model(workdir / "model.keras", compile=False).get_weights()]


def _log(workdir):
    with open(workdir / "train_log.csv") as f:
        return [(r["iteration"], r["loss"], r["learning_rate"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_trainer_killed_twice_ends_bit_identical(data, tmp_path, stage):
    flags = [*STAGES[stage], f"--config.data.records_dir={data / 'records'}", f"--config.train.iterations={ITERATIONS}",
             "--config.train.checkpoint_every=1", "--config.train.val_every=0", "--config.deterministic=True",
             "--config.data.num_val_cases=1"]
    train = lambda workdir: _start(["brats_tf.train", f"--workdir={workdir}", *flags])
    _finish(train(tmp_path / "reference"))
    rng = np.random.default_rng(sum(map(ord, stage)))
    first = int(rng.integers(1, ITERATIONS // 2))
    second = int(rng.integers(first + 2, ITERATIONS))
    run = tmp_path / "run"
    kills = 0
    for point in (first, second):
        kills += _kill_when(train(run), _checkpoint(run, point), float(rng.uniform(0, 0.3)))
        assert not (run / "model.keras").exists() or kills < 2
    assert kills >= 1
    _finish(train(run))
    for got, want in zip(_weights(run), _weights(tmp_path / "reference"), strict=True):
        np.testing.assert_array_equal(got, want)
    assert _log(run) == _log(tmp_path / "reference")   # each iteration once, same loss and rate


def _records_content(folder):
    manifest = reader.load_manifest(folder)
    cases = [(c.prepared.case_id, c.prepared.image.tobytes(), c.prepared.label.tobytes(),
              c.prepared.brain.tobytes()) for c in reader.read_cases(folder)]
    volatile = ("source_dir",)
    return {k: v for k, v in manifest.items() if k not in volatile}, cases


def test_build_records_killed_then_rerun_builds_the_same_records(data, tmp_path):
    args = ["data_prep.build_records", f"--data_dir={data / 'data'}", "--normalization=zscore"]
    _finish(_start([*args, f"--out_dir={tmp_path / 'reference'}"]))
    out = tmp_path / "records"
    rng = np.random.default_rng(3)
    kills = 0
    for _ in range(2):
        process = _start([*args, f"--out_dir={out}"])
        kills += _kill_when(process, lambda: any(p.name.startswith("records.tmp-") for p in tmp_path.iterdir()),
                            float(rng.uniform(0, 0.2)))
    assert kills >= 1
    _finish(_start([*args, f"--out_dir={out}", "--overwrite"]))
    assert _records_content(out) == _records_content(tmp_path / "reference")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records", "reference"]   # no leftovers, no lock


def test_extract_features_killed_then_rerun_resumes_to_the_same_features(data, tmp_path):
    models = export_2d_models(data / "records", tmp_path / "2d")
    args = ["data_prep.extract_features", f"--records_dir={data / 'records'}",
            *(f"--{o}={p}" for o, p in models.items())]
    _finish(_start([*args, f"--out_dir={tmp_path / 'reference'}"]))
    out = tmp_path / "features"
    rng = np.random.default_rng(5)
    kills = 0
    for written in (1, 3):
        process = _start([*args, f"--out_dir={out}"])
        done = lambda: out.is_dir() and len([p for p in out.iterdir() if p.suffix == ".tfrecord"]) >= written
        kills += _kill_when(process, done, float(rng.uniform(0, 0.2)))
    assert kills >= 1
    _finish(_start([*args, f"--out_dir={out}"]))
    ids = [f"Case_{i}" for i in range(4)]
    got, want = features.load_features(out, ids), features.load_features(tmp_path / "reference", ids)
    for case_id in ids:
        np.testing.assert_array_equal(got[case_id], want[case_id])
    manifest = features.load_manifest(out)
    assert manifest["complete"] and manifest["cases"] == features.load_manifest(tmp_path / "reference")["cases"]
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name or p.name.endswith(".lock")]


EXPERIMENT = ["run_experiment", "--experiment=demo", "--config=brats_tf/configs/experiments.py:tiny",
              "--config.twod.deterministic=True", "--config.threed.deterministic=True", "--seed=0"]


def _start_logged(args, log):
    """A run whose output goes to `log` (read while it runs, to kill it inside a stage)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                text=True)


def _experiment_results(workdir):
    """What the demo computes: every model's weights, the evaluation CSVs and the label maps
    (not the predictions' manifest: it lists the models by the sha256 of `model.keras`, and
    Keras stamps each save with its date)."""
    demo = workdir / "demo"
    weights = {str(p.parent.relative_to(demo)): _weights(p.parent) for p in sorted(demo.rglob("model.keras"))}
    files = {str(p.relative_to(demo)): p.read_bytes() for folder in ("evaluation", "predictions")
             for p in sorted((demo / folder).rglob("*")) if p.is_file() and p.name != "manifest.json"}
    return weights, files


def test_run_experiment_killed_in_every_stage_ends_with_the_same_results(tmp_path):
    """The tiny demo (op determinism on) killed once inside each of its seven stages, each
    time re-run: its models, label maps and evaluation equal an uninterrupted run's."""
    reference = tmp_path / "reference"
    process = _start_logged([*EXPERIMENT, f"--workdir={reference}"], tmp_path / "reference.log")
    assert process.wait(timeout=1800) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    run, rng, killed_in = tmp_path / "run", np.random.default_rng(17), []
    for stage in range(1, 8):
        log = tmp_path / f"run-{stage}.log"
        process = _start_logged([*EXPERIMENT, f"--workdir={run}"], log)
        if _kill_when(process, lambda: f"[{stage}/7]" in log.read_text(), float(rng.uniform(0, 1.5))):
            killed_in.append(stage)
    assert len(killed_in) >= 5, killed_in      # most kills land inside a stage, none after the end
    process = _start_logged([*EXPERIMENT, f"--workdir={run}"], tmp_path / "final.log")
    assert process.wait(timeout=1800) == 0, (tmp_path / "final.log").read_text()[-3000:]
    (got_weights, got_files), (want_weights, want_files) = _experiment_results(run), _experiment_results(reference)
    assert sorted(got_weights) == sorted(want_weights) and sorted(got_files) == sorted(want_files)
    for name, weights in want_weights.items():
        for got, want in zip(got_weights[name], weights, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=name)
    for name, content in want_files.items():
        assert got_files[name] == content, name
