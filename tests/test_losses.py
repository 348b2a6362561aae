"""Losses against NumPy float64 references (METHOD §2, §4).

The mirrored check (class counts of the global batch) runs this file as a script in
a subprocess with two logical CPUs (`python tests/test_losses.py mirrored`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

T2D = (0.7, 0.1, 0.1, 0.1)


def np_log_softmax(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_weighted_ce(labels, logits, target_weights):
    """sum_c t'_c * mean over class-c voxels of -log p, t' renormalized over present."""
    ce = -np.take_along_axis(np_log_softmax(logits), labels[..., None], -1)[..., 0]
    t = np.asarray(target_weights, np.float64)
    present = np.array([np.any(labels == c) for c in range(len(t))])
    t_present = t * present / (t * present).sum()
    return sum(t_present[c] * ce[labels == c].mean() for c in range(len(t)) if present[c])


def sample(shape, classes=(0, 1, 2, 3), seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(classes, size=shape).astype(np.int32)
    logits = rng.normal(scale=2.0, size=(*shape, 4)).astype(np.float32)
    return labels, logits


def wce(target_weights=T2D):
    from brats_tf.training.losses import weighted_cross_entropy
    return weighted_cross_entropy(target_weights)


def test_weighted_ce_2d_matches_numpy():
    labels, logits = sample((2, 5, 6))
    np.testing.assert_allclose(float(wce()(labels, logits)),
                               np_weighted_ce(labels, logits, T2D), rtol=1e-6)


def test_weighted_ce_3d_with_trailing_label_axis():
    labels, logits = sample((2, 3, 4, 5), seed=1)
    t3d = (0.4, 0.2, 0.2, 0.2)
    np.testing.assert_allclose(float(wce(t3d)(labels[..., None], logits)),
                               np_weighted_ce(labels, logits, t3d), rtol=1e-6)


def test_absent_class_is_renormalized_without_division_by_zero():
    labels, logits = sample((3, 4, 4), classes=(0, 1, 2), seed=2)  # no enhancing core
    value = float(wce()(labels, logits))
    assert np.isfinite(value)
    np.testing.assert_allclose(value, np_weighted_ce(labels, logits, T2D), rtol=1e-6)
    # the same as target weights (0.7, 0.1, 0.1) / 0.9 over three classes
    three = np_weighted_ce(labels, logits[..., :4], (0.7 / 0.9, 0.1 / 0.9, 0.1 / 0.9, 0.0))
    np.testing.assert_allclose(value, three, rtol=1e-6)


def test_single_class_batch_is_the_plain_cross_entropy():
    import keras
    labels, logits = sample((2, 4, 4), classes=(0,), seed=3)
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    np.testing.assert_allclose(float(wce()(labels, logits)), float(plain), rtol=1e-6)


def test_gradient_is_voxel_weight_times_softmax_minus_onehot():
    import tensorflow as tf
    labels, logits = sample((2, 4, 5), seed=4)
    logits_var = tf.Variable(logits)
    with tf.GradientTape() as tape:
        loss = wce()(labels, logits_var)
    grad = tape.gradient(loss, logits_var).numpy()
    counts = np.bincount(labels.ravel(), minlength=4)
    voxel_weight = (np.asarray(T2D) / counts)[labels]
    probs = np.exp(np_log_softmax(logits))
    expected = voxel_weight[..., None] * (probs - np.eye(4)[labels])
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


def test_per_example_values_reduce_to_the_batch_loss():
    from brats_tf.training.losses import WeightedCrossEntropy
    labels, logits = sample((3, 4, 4), seed=5)
    per_example = np.asarray(WeightedCrossEntropy(T2D, reduction=None)(labels, logits))
    assert per_example.shape == (3,)
    np.testing.assert_allclose(per_example.mean(), np_weighted_ce(labels, logits, T2D),
                               rtol=1e-6)


def test_deep_supervision_weights_and_total():
    from brats_tf.training.losses import deep_supervision_loss, deep_supervision_weights
    names4 = ["main", "aux_t1", "aux_t1c", "aux_t2", "aux_flair", "aux_all"]
    weights = deep_supervision_weights(names4)
    assert weights["main"] == 0.75
    assert all(weights[n] == pytest.approx(0.05) for n in names4[1:])
    assert deep_supervision_weights(["main"]) == {"main": 1.0}
    names2 = ["main", "aux_flair", "aux_t1c", "aux_all"]
    labels, _ = sample((2, 4, 4), seed=6)
    outputs = {n: sample((2, 4, 4), seed=10 + i)[1] for i, n in enumerate(names2)}
    expected = 0.75 * np_weighted_ce(labels, outputs["main"], T2D) + sum(
        0.25 / 3 * np_weighted_ce(labels, outputs[n], T2D) for n in names2[1:])
    np.testing.assert_allclose(float(deep_supervision_loss(labels, outputs)), expected,
                               rtol=1e-6)


def test_target_weights_are_validated():
    with pytest.raises(ValueError):
        wce((0.5, 0.1, 0.1, 0.1))
    with pytest.raises(ValueError):
        wce((1.2, -0.2, 0.0, 0.0))


def np_soft_dice(labels, logits, include_background=False, smooth=1.0):
    axes = tuple(range(1, labels.ndim))
    if logits.shape[-1] == 1:
        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        truth = (labels > 0)[..., None].astype(np.float64)
    else:
        probs = np.exp(np_log_softmax(logits))
        truth = np.eye(logits.shape[-1])[labels]
        if not include_background:
            probs, truth = probs[..., 1:], truth[..., 1:]
    inter = (probs * truth).sum(axes)
    dice = (2 * inter + smooth) / (probs.sum(axes) + truth.sum(axes) + smooth)
    return (1.0 - dice.mean(-1)).mean()


@pytest.mark.parametrize("include_background", [False, True])
def test_soft_dice_multiclass_matches_numpy(include_background):
    from brats_tf.training.losses import SoftDiceLoss
    labels, logits = sample((2, 3, 4, 5), classes=(0, 1, 3), seed=7)  # class 2 absent
    loss = SoftDiceLoss(include_background=include_background)
    np.testing.assert_allclose(float(loss(labels, logits)),
                               np_soft_dice(labels, logits, include_background), rtol=1e-6)


def test_soft_dice_binary_matches_numpy_and_is_zero_when_perfect():
    from brats_tf.training.losses import SoftDiceLoss
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 2, size=(2, 6, 6)).astype(np.int32)
    logits = rng.normal(size=(2, 6, 6, 1)).astype(np.float32)
    np.testing.assert_allclose(float(SoftDiceLoss()(labels, logits)),
                               np_soft_dice(labels, logits), rtol=1e-6)
    perfect = np.where(labels[..., None] > 0, 50.0, -50.0).astype(np.float32)
    assert float(SoftDiceLoss(smooth=1e-6)(labels, perfect)) < 1e-6


# --- global-batch class counts under MirroredStrategy (subprocess) -------------------


def test_mirrored_replicas_use_global_batch_counts():
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "mirrored"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    np.testing.assert_allclose(report["mirrored"], report["reference"], rtol=1e-6)
    # the replicas' own batches differ in composition, so per-replica counts would not
    assert abs(report["per_replica_counts"] - report["reference"]) > 1e-3
    # model.fit under the strategy: the per-iteration losses the schedule callback
    # receives are the global-batch losses
    np.testing.assert_allclose(report["fit_iteration_losses"],
                               report["fit_reference_losses"], rtol=1e-5)


def _mirrored_main():
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    labels, logits = sample((4, 4, 4), seed=9)
    labels[:2][labels[:2] == 3] = 0  # replica 0's half has no enhancing core
    loss_fn = wce()
    dataset = tf.data.Dataset.from_tensor_slices((labels, logits)).batch(4)
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
    per_replica = strategy.run(lambda y, z: loss_fn(y, z), args=batch)
    halves = [np_weighted_ce(labels[i:i + 2], logits[i:i + 2], T2D) for i in (0, 2)]
    fit_losses, fit_reference = _mirrored_fit_losses(strategy)
    print(json.dumps({
        "fit_iteration_losses": fit_losses, "fit_reference_losses": fit_reference,
        "replicas": strategy.num_replicas_in_sync,
        "mirrored": float(strategy.reduce("SUM", per_replica, axis=None)),
        "reference": np_weighted_ce(labels, logits, T2D),
        "per_replica_counts": float(np.mean(halves)),
    }))


def _mirrored_fit_losses(strategy):
    """Iteration losses seen by PlateauHalvingCallback in a mirrored fit (N=2), and
    their float64 reference; a 1e-12 learning rate keeps the weights fixed."""
    import keras
    from brats_tf.training.optim import NormalizedMomentum
    from brats_tf.training.schedules import PlateauHalving, PlateauHalvingCallback
    with strategy.scope():
        image = keras.Input((None, None, 2))
        model = keras.Model(image, keras.layers.Conv2D(4, 1)(image))
        model.compile(optimizer=NormalizedMomentum(accumulation_steps=2), loss=wce())
    rng = np.random.default_rng(10)
    x = rng.normal(size=(16, 8, 8, 2)).astype(np.float32)
    y = rng.integers(0, 4, size=(16, 8, 8)).astype(np.int32)
    y[:2][y[:2] == 3] = 0
    schedule = PlateauHalving(initial=1e-12, minimum=1e-12, period=100)
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0,
              callbacks=[PlateauHalvingCallback(schedule)])
    logits = model.predict(x, verbose=0)
    batches = [np_weighted_ce(y[i:i + 4], logits[i:i + 4], T2D) for i in range(0, 16, 4)]
    return schedule.losses_since_check, [np.mean(batches[:2]), np.mean(batches[2:])]


if __name__ == "__main__" and sys.argv[1:] == ["mirrored"]:
    _mirrored_main()
