"""The 2D trainer: a kill -9 mid-run resumes to exactly the weights of an uninterrupted run;
non-finite losses stop training; what a run writes to its work dir."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from brats_tf.configs.train2d import get_config
from brats_tf.errors import ConfigError
from brats_tf.records.writer import build_records
from brats_tf.training.stage2d import Trainer2D as Trainer
from brats_tf.training.loop import TrainingError
from tests.conftest import REPO, write_brats2017_case


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    for i in range(4):
        write_brats2017_case(root / "data", f"Case_{i}", shape=(24, 26, 20), seed=i, with_enhancing=i != 1)
    build_records(root / "data", root / "records", verbose=False)
    return root / "records"


def _flags(records, iterations, checkpoint_every=4):
    # A 2-iteration plateau period and a demanding decrease ratio make the LR schedule
    # halve during the run, so its restored state matters.
    return [f"--config.data.records_dir={records}", f"--config.train.iterations={iterations}",
            f"--config.train.checkpoint_every={checkpoint_every}", "--config.train.val_every=4",
            "--config.data.batch_size=4", "--config.optim.period=2", "--config.optim.decrease_ratio=0.01",
            "--config.deterministic=True",
            "--config.data.num_val_cases=1"]


def _train(workdir, flags):
    return subprocess.Popen([sys.executable, "-m", "brats_tf.train", f"--workdir={workdir}", *flags],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(workdir):
    return [np.asarray(w) for w in keras.models.load_model(workdir / "model.keras").get_weights()]


def test_kill9_then_rerun_matches_uninterrupted_run(records, tmp_path):
    flags = _flags(records, iterations=8)
    reference = _train(tmp_path / "reference", flags)
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-2000:]

    killed = _train(tmp_path / "run", flags)
    first_ckpt = tmp_path / "run" / "checkpoints" / "ckpt-00000004" / "state.json"
    deadline = time.time() + 300
    while not first_ckpt.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "model.keras").exists()
    state = json.loads(first_ckpt.read_text())
    assert state["iteration"] == 4 and state["schedule"]["iteration"] == 4

    resumed = _train(tmp_path / "run", flags)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert "trained 8 iterations" in out
    for got, want in zip(_weights(tmp_path / "run"), _weights(tmp_path / "reference")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with open(tmp_path / "run" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 9))   # each iteration once
    with open(tmp_path / "reference" / "train_log.csv") as f:
        ref_rows = list(csv.DictReader(f))
    np.testing.assert_allclose([float(r["loss"]) for r in rows], [float(r["loss"]) for r in ref_rows],
                               rtol=1e-4)
    assert [r["learning_rate"] for r in rows] == [r["learning_rate"] for r in ref_rows]
    assert len({r["learning_rate"] for r in rows}) > 1     # the schedule did act


def test_work_dir_contents_and_config_guard(records, tmp_path):
    config = get_config("small")
    config.data.records_dir = str(records)
    config.train.iterations = 2
    config.train.checkpoint_every = 1
    config.train.val_every = 2
    config.data.batch_size = 4
    result = Trainer(config, tmp_path).run()
    assert result["iterations"] == 2
    assert set(result["validation"]) == {"val_dice_ncr_net", "val_dice_edema", "val_dice_enhancing"}
    names = set(os.listdir(tmp_path))
    assert {"config.json", "split.json", "model.keras", "model_info.json", "train_log.csv",
            "tensorboard", "checkpoints"} <= names
    _check_tensorboard(tmp_path / "tensorboard", iterations=2)
    assert json.loads((tmp_path / "config.json").read_text())["data"]["records_dir"] == str(records)
    info = json.loads((tmp_path / "model_info.json").read_text())
    assert info["kind"] == "model1" and info["orientation"] == "axial" and info["pooling_factor"] >= 1
    split = json.loads((tmp_path / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"]) and len(split["val"]) == 2
    # Re-running with another config in the same work dir is refused.
    config.model.kind = "model2"
    with pytest.raises(ConfigError, match="another config"):
        Trainer(config, tmp_path).run()


def _check_tensorboard(log_dir, iterations):
    """The event files hold the scalars, the validation overlay (an RGB image, after each
    validation), the config as HParams and the final validation Dice (the HParams metrics)."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import metadata as hparams_metadata
    values = [(e.step, v) for f in sorted(log_dir.iterdir())
              for e in tf.compat.v1.train.summary_iterator(str(f)) for v in e.summary.value]
    tags = {(step, v.tag) for step, v in values}
    assert {(iterations, "loss"), (iterations, "validation/overlay"), (iterations, "final/val_dice_edema")} <= tags
    [image] = [v for step, v in values if v.tag == "validation/overlay" and step == iterations]
    width, height, png = image.tensor.string_val
    assert tf.io.decode_png(png).shape == (int(height), int(width), 3) and int(width) % 2 == 0   # reference | prediction
    [start] = [v for _, v in values if v.tag == hparams_metadata.SESSION_START_INFO_TAG]
    assert start.metadata.plugin_data.plugin_name == hparams_metadata.PLUGIN_NAME
    hparams = hparams_metadata.parse_session_start_info_plugin_data(start.metadata.plugin_data.content).hparams
    assert hparams["model.kind"].string_value == "model1"
    assert hparams["train.iterations"].number_value == iterations
    assert hparams["data.val_cases"].string_value == "null"       # None and lists as JSON text


def test_non_finite_loss_stops_training(records, tmp_path):
    config = get_config("small")
    config.data.records_dir = str(records)
    config.optim.learning_rate = 1e38        # the first update overflows the weights
    config.optim.min_learning_rate = 1e-3
    config.optim.accumulation_steps = 1
    config.train.iterations = 5
    config.data.batch_size = 4
    with pytest.raises(TrainingError, match="non-finite loss"):
        Trainer(config, tmp_path).run()
    assert not (tmp_path / "model.keras").exists()


def test_subnetwork_pretraining_feeds_the_full_model(tmp_path):
    data = tmp_path / "data"
    for i in range(4):
        write_brats2017_case(data, f"Case_{i}", shape=(24, 26, 20), seed=i)
    (data / "Case_3" / "Case_3_t1.nii.gz").unlink()          # one case lacks T1
    build_records(data, tmp_path / "records", allow_missing_modalities=True, verbose=False)

    config = get_config("small")
    config.data.records_dir = str(tmp_path / "records")
    config.data.batch_size = 4
    config.data.val_cases = ["Case_0"]
    config.train.iterations = 2
    config.train.subnetwork = "t1"
    sub_trainer = Trainer(config, tmp_path / "sub_t1")
    sub_trainer.run()
    # Pretrained only on the cases that have T1, on the T1 channel alone.
    assert sub_trainer.train_source.case_ids == ("Case_1", "Case_2")
    assert sub_trainer.sampler.batch(0)[0].shape[-1] == 1
    sub_model = keras.models.load_model(tmp_path / "sub_t1" / "model.keras")

    full = get_config("small")
    full.data.records_dir = str(tmp_path / "records")
    full.data.val_cases = ["Case_0"]
    full.train.iterations = 0
    full.train.pretrained_subnetworks = str(tmp_path / "sub_t1")
    Trainer(full, tmp_path / "full").run()
    model = keras.models.load_model(tmp_path / "full" / "model.keras")
    for layer in sub_model.layers:
        for got, want in zip(model.get_layer(layer.name).get_weights(), layer.get_weights()):
            np.testing.assert_array_equal(got, want)
    # The T1c subnetwork is untouched by the T1 pretraining (still at its fresh init).
    fresh = keras.models.load_model(tmp_path / "full" / "model.keras").get_layer("sub_t1c.conv0.conv")
    assert not np.array_equal(fresh.get_weights()[0][..., :1, :1],
                              sub_model.get_layer("sub_t1.conv0.conv").get_weights()[0][..., :1, :1])


MIRRORED_SCRIPT = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from brats_tf.configs.train2d import get_config
from brats_tf.training.stage2d import Trainer2D as Trainer
c = get_config("small")
c.data.records_dir, c.train.strategy, c.train.iterations = sys.argv[1], "mirrored", 3
c.data.batch_size, c.train.val_every = 2, 3
c.train.precise_bn_batches = 2   # the recalibration under a strategy, synchronized batch norm on
c.train.average_last = 2         # the tail average assigned to mirrored variables, then recalibrated
t = Trainer(c, sys.argv[2])
r = t.run()
assert t.strategy.num_replicas_in_sync == 2, t.strategy.num_replicas_in_sync
assert t.sampler.batch_size == 4
import keras, numpy as np
from brats_tf.training.loop import batch_norm_layers
layers = batch_norm_layers(keras.models.load_model(sys.argv[2] + "/model.keras"))
assert layers and all(np.isfinite(np.asarray(l.moving_variance)).all() for l in layers)
assert '"weights_averaged_over_iterations": 2' in open(sys.argv[2] + "/model_info.json").read()
print("OK", r["iterations"])
"""


def test_mirrored_strategy_trains_on_two_logical_devices(records, tmp_path):
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, str(records), str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 3" in result.stdout
    assert (tmp_path / "model.keras").exists()
