"""Tail averaging (train.average_last): the exported weights are the mean of the weights after
each of the run's last K iterations, and a run resumed inside that window exports the same."""

import shutil

import keras
import numpy as np
import pytest

from brats_tf.configs import train3d
from brats_tf.errors import ConfigError
from brats_tf.training.averaging import TailAverage
from brats_tf.training.stage3d import Trainer3D
from tests.test_features import make_records


def _dense_model():
    x_in = keras.Input((3,))
    return keras.Model(x_in, keras.layers.Dense(2, name="dense")(x_in))


def _set_all(model, value):
    for v in model.weights:
        v.assign(np.full(v.shape, value, np.float32))


def test_the_average_is_the_mean_of_the_last_window_and_survives_a_checkpoint():
    model = _dense_model()
    average = TailAverage(model, iterations=5, window=3)
    for iteration, value in enumerate([10.0, 20.0, 1.0, 2.0, 6.0], start=1):
        _set_all(model, value)
        average.add(iteration)
        if iteration == 4:   # a checkpoint inside the window, restored into a fresh average
            saved = average.arrays()
    assert average.count == 3
    resumed = TailAverage(model, iterations=5, window=3)
    resumed.restore(saved)
    resumed.add(5)
    for avg in (average, resumed):
        _set_all(model, -1.0)
        assert avg.assign() == 3
        for v in model.weights:
            np.testing.assert_allclose(np.asarray(v), 3.0)   # (1 + 2 + 6) / 3


def test_a_window_longer_than_the_run_averages_every_iteration_and_an_empty_one_changes_nothing():
    model = _dense_model()
    longer = TailAverage(model, iterations=2, window=10)
    for iteration, value in ((1, 1.0), (2, 4.0)):
        _set_all(model, value)
        longer.add(iteration)
    assert longer.assign() == 2 and np.allclose(np.asarray(model.weights[0]), 2.5)
    empty = TailAverage(model, iterations=2, window=1)
    empty.restore(empty.arrays())   # a checkpoint written before the window
    assert empty.assign() == 0 and np.allclose(np.asarray(model.weights[0]), 2.5)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return make_records(tmp_path_factory.mktemp("averaging"))


def _config(records, average_last):
    c = train3d.get_config("small")
    c.data.records_dir = str(records)
    c.model.kind = "standard"
    c.model.levels, c.model.final, c.model.input_size = (2, 3, 4), 3, 49
    c.data.val_cases = []
    c.optim.accumulation_steps = 1
    c.train.iterations, c.train.checkpoint_every, c.train.keep_checkpoints, c.train.val_every = 4, 1, 10, 0
    c.train.average_last = average_last
    c.deterministic = True
    return c


def _exported_weights(workdir):
    return [np.asarray(v) for v in keras.models.load_model(workdir / "model.keras").weights]


def _checkpoint_weights(workdir, iteration):
    with np.load(workdir / "checkpoints" / f"ckpt-{iteration:08d}" / "model_weights.npz") as saved:
        return [saved[k] for k in sorted(saved.files)]


def test_the_trainer_exports_the_mean_of_its_last_iterations_and_resumes_inside_the_window(records, tmp_path):
    work = tmp_path / "averaged"
    result = Trainer3D(_config(records, 3), work).run()
    assert result["iterations"] == 4
    # NumPy float64 reference: the weights after iterations 2, 3 and 4, as checkpointed.
    per_iteration = [_checkpoint_weights(work, i) for i in (2, 3, 4)]
    want = [np.mean(np.stack(ws).astype(np.float64), axis=0) for ws in zip(*per_iteration)]
    got = _exported_weights(work)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    assert any(np.abs(g - last).max() > 1e-5 for g, last in zip(got, per_iteration[-1]))   # not the last weights
    info = (work / "model_info.json").read_text()
    assert '"weights_averaged_over_iterations": 3' in info

    # Killed after iteration 2 (inside the window): the rerun resumes there and exports the same.
    for iteration in (3, 4):
        shutil.rmtree(work / "checkpoints" / f"ckpt-{iteration:08d}")
    (work / "model.keras").unlink()
    (work / "model_info.json").unlink()
    Trainer3D(_config(records, 3), work).run()
    for g, w in zip(_exported_weights(work), got):
        np.testing.assert_array_equal(g, w)

    # Off (the default): the export is the last iteration's weights.
    plain = tmp_path / "plain"
    Trainer3D(_config(records, None), plain).run()
    for g, w in zip(_exported_weights(plain), _checkpoint_weights(plain, 4)):
        np.testing.assert_array_equal(g, w)


def test_a_negative_window_is_refused(records, tmp_path):
    with pytest.raises(ConfigError, match="average_last"):
        Trainer3D(_config(records, -1), tmp_path / "w").run()
