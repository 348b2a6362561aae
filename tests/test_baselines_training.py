"""The baselines through the shared trainer: exact resume, the L2 term in the loss, Dice
loss, transfer initialization (fine-tuning with added BN), and the CLI dispatch."""

import csv
import json

import keras
import numpy as np
import pytest

from brats_tf.training.baselines import BaselineTrainer
from brats_tf.configs.baselines import get_config
from brats_tf.records.writer import build_records
from tests.conftest import run_module, write_brats2017_case


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline_train")
    for i in range(3):
        write_brats2017_case(root / "data", f"Case_{i}", shape=(36, 38, 32), seed=i, with_enhancing=i != 1)
    build_records(root / "data", root / "records", normalization="zscore", verbose=False)
    return root / "records"


def _config(records, preset="bcn_demo", iterations=4, **model):
    c = get_config(preset)
    c.data.records_dir = str(records)
    c.data.train_cases, c.data.val_cases = ["Case_0", "Case_1"], ["Case_2"]
    c.data.batch_size = 4 if preset != "fifcn_demo" else 1
    c.deterministic = True
    c.train.iterations, c.train.checkpoint_every = iterations, 2
    for key, value in model.items():
        setattr(c.model, key, value)
    return c


def _weights(workdir):
    return keras.models.load_model(workdir / "model.keras", compile=False).get_weights()


def _log(workdir):
    with open(workdir / "train_log.csv") as f:
        return list(csv.DictReader(f))


def test_resumed_run_matches_an_uninterrupted_one(records, tmp_path):
    """Stop after 2 of 4 iterations, re-run with 4: same weights (dropout, BN and Adam's
    moments included) as a straight 4-iteration run."""
    BaselineTrainer(_config(records, dropout=True, batch_norm=True), tmp_path / "straight").run()
    BaselineTrainer(_config(records, iterations=2, dropout=True, batch_norm=True), tmp_path / "resumed").run()
    result = BaselineTrainer(_config(records, dropout=True, batch_norm=True), tmp_path / "resumed").run()
    assert result["iterations"] == 4 and 0.0 <= result["validation"]["val_dice_wt"] <= 1.0
    for got, want in zip(_weights(tmp_path / "resumed"), _weights(tmp_path / "straight")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert [int(r["iteration"]) for r in _log(tmp_path / "resumed")] == [1, 2, 3, 4]
    info = json.loads((tmp_path / "resumed" / "model_info.json").read_text())
    assert info["stage"] == "baseline" and info["preprocessing"]["normalization"] == "zscore"


def test_logged_loss_includes_the_l2_penalty(records, tmp_path):
    BaselineTrainer(_config(records, preset="fcn_demo", iterations=2), tmp_path).run()
    last = _log(tmp_path)[-1]
    penalty = float(last["loss"]) - float(last["loss_scores"])
    model = keras.models.load_model(tmp_path / "model.keras", compile=False)
    # Reference: 1e-4 * sum of squared kernels, in float64, from the final weights (one Adam
    # step of 1e-3 after the logged ones: close, not equal).
    expected = sum(1e-4 * np.sum(np.asarray(w, np.float64) ** 2) for w in model.trainable_weights
                   if "kernel" in w.path)
    assert penalty == pytest.approx(expected, rel=0.05)


def test_fifcn_trains_with_the_dice_loss(records, tmp_path):
    c = _config(records, preset="fifcn_demo", iterations=2, volume_size=(32, 48, 32))
    c.loss.kind = "dice"
    result = BaselineTrainer(c, tmp_path).run()
    assert result["iterations"] == 2
    assert all(0.0 <= float(r["loss_scores"]) <= 1.0 for r in _log(tmp_path))


def test_fine_tuning_starts_from_the_pretrained_function(records, tmp_path):
    BaselineTrainer(_config(records, preset="fcn_demo", iterations=2), tmp_path / "plain").run()
    c = _config(records, preset="fcn_demo", iterations=0, dropout=True, batch_norm=True)
    c.train.init_from = str(tmp_path / "plain")
    trainer = BaselineTrainer(c, tmp_path / "tuned")
    trainer.run()
    plain = keras.models.load_model(tmp_path / "plain" / "model.keras", compile=False)
    tuned = keras.models.load_model(tmp_path / "tuned" / "model.keras", compile=False)
    np.testing.assert_array_equal(tuned.get_layer("conv1").get_weights()[0], plain.get_layer("conv1").get_weights()[0])
    x = trainer.sampler.batch(100)[0]   # a batch the BN statistics were not set on
    want = np.asarray(plain(x, training=False))
    np.testing.assert_allclose(np.asarray(tuned(x, training=False)), want, atol=0.05 * np.abs(want).max())


def test_train_cli_dispatches_the_baseline_stage(records, tmp_path):
    result = run_module("brats_tf.train", "--config=brats_tf/configs/baselines.py:bcn_demo",
                        f"--config.data.records_dir={records}", "--config.train.iterations=2",
                        "--config.data.batch_size=2", "--config.data.num_val_cases=1", f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained 2 iterations" in result.stdout and "val_dice_wt" in result.stdout
    assert (tmp_path / "model.keras").exists()


def test_segment_runs_a_trained_baseline(records, tmp_path):
    """`segment` accepts a baseline work dir and writes a whole-tumor map in the input geometry."""
    import nibabel as nib
    from brats_tf.inference import pipeline
    BaselineTrainer(_config(records, iterations=2), tmp_path / "bcn").run()
    case_dir = write_brats2017_case(tmp_path / "new", "New_case", shape=(24, 26, 20), seed=9)
    pipeline.segment([str(tmp_path / "bcn")], tmp_path / "out", case_dir=str(case_dir))
    out = nib.load(tmp_path / "out" / "New_case_seg.nii.gz")
    reference = nib.load(case_dir / "New_case_flair.nii.gz")
    assert out.shape == reference.shape and np.allclose(out.affine, reference.affine)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 2}
