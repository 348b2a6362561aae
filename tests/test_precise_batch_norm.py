"""Precise batch norm (train.precise_bn_batches): the moving statistics a model exports are
the mean of its batch statistics over further training batches, with the final weights."""

import keras
import numpy as np
import pytest

from brats_tf.configs.train2d import get_config
from brats_tf.records.writer import build_records
from brats_tf.training.loop import batch_norm_layers, recalibrate_batch_norm
from brats_tf.training.stage2d import Trainer2D
from tests.conftest import write_brats2017_case


def _model_with_nested_batch_norm():
    inner_in = keras.Input((6, 5, 3))
    shifted = keras.layers.Rescaling(3.0, offset=2.0)(inner_in)   # its batch means near 2, variances near 9
    inner = keras.Model(inner_in, keras.layers.BatchNormalization(name="inner_bn")(shifted), name="inner")
    x_in = keras.Input((6, 5, 2))
    conv = keras.layers.Conv2D(3, 3, padding="same", name="conv")(x_in)
    outer_bn = keras.layers.BatchNormalization(name="outer_bn")(conv)
    out = keras.layers.Conv2D(2, 1, name="head")(inner(outer_bn))
    return keras.Model(x_in, out), keras.Model(x_in, conv)


def test_recalibration_gives_the_mean_of_the_batch_statistics_and_leaves_the_weights():
    keras.utils.set_random_seed(0)
    model, conv_only = _model_with_nested_batch_norm()
    rng = np.random.default_rng(1)
    batches = [rng.normal(loc=i, scale=1 + i, size=(4, 6, 5, 2)).astype(np.float32) for i in range(5)]
    kernels = {v.path: np.asarray(v) for v in model.trainable_variables}

    assert [layer.name for layer in batch_norm_layers(model)] == ["outer_bn", "inner_bn"]
    assert recalibrate_batch_norm(model, iter(batches)) == 5

    # NumPy float64 reference: the per-batch mean and (biased) variance of the outer layer's
    # input, averaged over the batches with equal weights.
    activations = [np.asarray(conv_only(b), np.float64) for b in batches]
    want_mean = np.mean([a.mean(axis=(0, 1, 2)) for a in activations], axis=0)
    want_var = np.mean([a.var(axis=(0, 1, 2)) for a in activations], axis=0)
    outer = model.get_layer("outer_bn")
    np.testing.assert_allclose(np.asarray(outer.moving_mean), want_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(outer.moving_variance), want_var, rtol=1e-4, atol=1e-5)
    # The nested layer's too: its input is 3 x the outer layer's normalized output + 2.
    inner = batch_norm_layers(model)[1]
    np.testing.assert_allclose(np.asarray(inner.moving_mean), 2.0, atol=0.05)
    np.testing.assert_allclose(np.asarray(inner.moving_variance), 9.0, rtol=0.05)
    # Weights untouched, momentum and synchronization as they were.
    for v in model.trainable_variables:
        np.testing.assert_array_equal(np.asarray(v), kernels[v.path])
    assert outer.momentum == inner.momentum == 0.99 and not outer.synchronized


def test_a_model_without_batch_norm_is_left_alone():
    x_in = keras.Input((4,))
    model = keras.Model(x_in, keras.layers.Dense(2)(x_in))
    before = [w.copy() for w in model.get_weights()]
    assert recalibrate_batch_norm(model, iter([np.ones((2, 4), np.float32)])) == 0
    for got, want in zip(model.get_weights(), before):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("precise_bn")
    for i in range(3):
        write_brats2017_case(root / "data", f"Case_{i}", shape=(24, 26, 20), seed=i)
    build_records(root / "data", root / "records", verbose=False)
    return root / "records"


def _config(records, precise_bn_batches):
    config = get_config("small")
    config.data.records_dir = str(records)
    config.train.iterations, config.train.checkpoint_every, config.train.val_every = 2, 1, 0
    config.data.batch_size, config.data.num_val_cases = 4, 0
    config.deterministic = True
    config.train.precise_bn_batches = precise_bn_batches
    return config


def _bn_statistics(model_file):
    model = keras.models.load_model(model_file)
    stats = [np.asarray(v) for layer in batch_norm_layers(model) for v in (layer.moving_mean, layer.moving_variance)]
    kernels = [np.asarray(v) for v in model.trainable_variables]
    return stats, kernels


def test_the_trainer_exports_recalibrated_statistics_and_a_resumed_export_is_the_same(records, tmp_path):
    Trainer2D(_config(records, None), tmp_path / "plain").run()
    Trainer2D(_config(records, 3), tmp_path / "precise").run()
    plain_stats, plain_kernels = _bn_statistics(tmp_path / "plain" / "model.keras")
    precise_stats, precise_kernels = _bn_statistics(tmp_path / "precise" / "model.keras")
    for got, want in zip(precise_kernels, plain_kernels):   # the same training
        np.testing.assert_array_equal(got, want)
    assert any(np.abs(p - q).max() > 1e-4 for p, q in zip(precise_stats, plain_stats))

    # Export lost after the last checkpoint: the rerun restores it and recalibrates on the same
    # batches, so it exports the same model.
    (tmp_path / "precise" / "model.keras").unlink()
    (tmp_path / "precise" / "model_info.json").unlink()
    Trainer2D(_config(records, 3), tmp_path / "precise").run()
    again_stats, _ = _bn_statistics(tmp_path / "precise" / "model.keras")
    for got, want in zip(again_stats, precise_stats):
        np.testing.assert_array_equal(got, want)
