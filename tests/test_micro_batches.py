"""Micro-batches (train.micro_batches): a batch trained in parts, gradients summed, is the same
update as the whole batch for the 3D models (no batch normalization): the paper-scale 2D-3D
model C step fits in 16 GB that way."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from brats_tf.errors import ConfigError
from brats_tf.models import unet3d
from brats_tf.training import losses
from brats_tf.training.loop import build_train_step
from brats_tf.training.optim import NormalizedMomentum


def _model(seed):
    keras.utils.set_random_seed(seed)
    return unet3d.build_3d_model("C", 2, 3, "small", levels=(2, 2, 2), final=2)


def _one_step(parts, x, y):
    model = _model(7)
    optimizer = NormalizedMomentum(0.25, 0.9, 1)
    optimizer.build(model.trainable_variables)
    strategy = tf.distribute.get_strategy()
    step = build_train_step(model, optimizer, strategy, ["main"], {"main": 1.0},
                            losses.weighted_cross_entropy(losses.TARGET_WEIGHTS_3D), micro_batches=parts)
    values = {k: float(v) for k, v in step(x, y).items()}
    return values, [w.numpy() for w in model.trainable_weights]


@pytest.mark.slow
def test_four_parts_give_the_whole_batchs_loss_and_update():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(4, 50, 50, 50, 5)).astype(np.float32))
    y = tf.constant(rng.choice(4, size=(4, 6, 6, 6), p=[0.7, 0.1, 0.1, 0.1]).astype(np.int32))
    whole, whole_weights = _one_step(1, x, y)
    parts, part_weights = _one_step(4, x, y)
    assert parts["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    for a, b in zip(whole_weights, part_weights):
        np.testing.assert_allclose(b, a, atol=1e-6)
    assert any(np.abs(a - w).max() > 0 for a, w in zip(whole_weights, [w.numpy() for w in _model(7).trainable_weights]))


def test_part_sums_add_up_to_the_keras_loss():
    rng = np.random.default_rng(1)
    y = tf.constant(rng.choice(4, size=(6, 5, 5, 5), p=[0.85, 0.05, 0.1, 0.0]).astype(np.int32))
    logits = tf.constant(rng.normal(size=(6, 5, 5, 5, 4)).astype(np.float32))
    loss = losses.weighted_cross_entropy(losses.TARGET_WEIGHTS_3D)
    counts = loss.batch_counts(y)
    total = sum(float(loss.part_sum(y[i:i + 2], logits[i:i + 2], counts)) for i in (0, 2, 4))
    assert total == pytest.approx(float(loss(y, logits)), rel=1e-6)


def test_a_split_that_does_not_divide_the_batch_is_refused(tmp_path):
    from brats_tf.configs.train3d import get_config
    from brats_tf.training.stage3d import Trainer3D
    config = get_config("small")
    config.data.records_dir = str(tmp_path)
    config.train.micro_batches = 3          # batch 4 (small preset)
    with pytest.raises(ConfigError, match="micro_batches=3"):
        Trainer3D(config, tmp_path / "w").run()
    assert not (tmp_path / "w").exists()


def test_a_work_dir_resumes_with_another_split_or_a_new_field_left_off(tmp_path):
    """Another micro-batch split is the same training; a field added to the config since the
    work dir started (e.g. data.sequence_dropout) is no change while it is off (None)."""
    import json
    from brats_tf.configs.train2d import get_config
    from brats_tf.training.loop import record_config
    config = get_config("small")
    record_config(tmp_path, config)
    recorded = json.loads((tmp_path / "config.json").read_text())
    del recorded["data"]["sequence_dropout"]                     # as written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    record_config(tmp_path, config)                              # accepted
    config.train.micro_batches = 2
    record_config(tmp_path, config)                              # accepted: the same updates
    config.data.sequence_dropout = 0.25
    with pytest.raises(ConfigError, match="another config"):
        record_config(tmp_path, config)
