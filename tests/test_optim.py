"""NormalizedMomentum against a float64 NumPy reference, on one device and mirrored.

The mirrored checks need two logical CPU devices, which must be configured before
TensorFlow initializes its devices, so they run this file as a script in a
subprocess (`python tests/test_optim.py mirrored`), which prints JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

IN, HIDDEN, OUT = 4, 3, 2
BATCH, N, UPDATES = 4, 2, 3
LR, MU, EPS = 0.25, 0.9, 1e-8


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH * N * UPDATES, IN)).astype(np.float32)
    t = rng.normal(size=(BATCH * N * UPDATES, OUT)).astype(np.float32)
    return x, t


def initial_params(seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(IN, HIDDEN)).astype(np.float32),
            rng.normal(size=(HIDDEN,)).astype(np.float32),
            rng.normal(size=(HIDDEN, OUT)).astype(np.float32),
            rng.normal(size=(OUT,)).astype(np.float32)]


def mse_grads(params, x, t):
    """Gradients of mean((x W1 + b1) W2 + b2 - t)^2 (Keras 'mse'), float64."""
    w1, b1, w2, b2 = params
    hidden = x @ w1 + b1
    y = hidden @ w2 + b2
    dy = 2.0 * (y - t) / y.size
    dhidden = dy @ w2.T
    return [x.T @ dhidden, dhidden.sum(0), hidden.T @ dy, dy.sum(0)]


def reference(params, x, t, learning_rates, per_variable_norm=False):
    """The algorithm of METHOD §5 in float64; one learning rate per update."""
    params = [p.astype(np.float64) for p in params]
    x, t = x.astype(np.float64), t.astype(np.float64)
    velocity = [np.zeros_like(p) for p in params]
    for update, lr in enumerate(learning_rates):
        summed = [np.zeros_like(p) for p in params]
        for b in range(N):
            rows = slice((update * N + b) * BATCH, (update * N + b + 1) * BATCH)
            summed = [s + g for s, g in zip(summed, mse_grads(params, x[rows], t[rows]))]
        if per_variable_norm:  # deliberately wrong, to show the test discriminates
            directions = [g / (np.linalg.norm(g) + EPS) for g in summed]
        else:
            norm = np.sqrt(sum(np.sum(g * g) for g in summed))
            directions = [g / (norm + EPS) for g in summed]
        velocity = [MU * v - lr * d for v, d in zip(velocity, directions)]
        params = [p + v for p, v in zip(params, velocity)]
    return params


def build_model():
    import keras
    inputs = keras.Input((IN,))
    hidden = keras.layers.Dense(HIDDEN, name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(OUT, name="out")(hidden))
    model.set_weights(initial_params())
    return model


def make_optimizer(lr=LR):
    from brats_tf.training.optim import NormalizedMomentum
    return NormalizedMomentum(learning_rate=lr, momentum=MU, accumulation_steps=N, epsilon=EPS)


def fit_model(strategy=None):
    """model.fit over 3 updates, learning rate changed by assignment before the last."""
    import contextlib
    x, t = make_data()
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = build_model()
        optimizer = make_optimizer()
        model.compile(optimizer=optimizer, loss="mse")
    first = BATCH * N * 2
    model.fit(x[:first], t[:first], batch_size=BATCH, shuffle=False, verbose=0)
    optimizer.learning_rate = 0.1
    model.fit(x[first:], t[first:], batch_size=BATCH, shuffle=False, verbose=0)
    return model, optimizer


def custom_loop_model(strategy):
    """optimizer.apply_gradients inside strategy.run, as a custom trainer would do."""
    import keras
    import tensorflow as tf
    x, t = make_data()
    with strategy.scope():
        model = build_model()
        optimizer = make_optimizer()
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.MeanSquaredError()

    def replica_step(xb, tb):
        with tf.GradientTape() as tape:
            loss = loss_fn(tb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def step(xb, tb):
        strategy.run(replica_step, args=(xb, tb))

    dataset = tf.data.Dataset.from_tensor_slices((x, t)).batch(BATCH)
    for xb, tb in strategy.experimental_distribute_dataset(dataset):
        step(xb, tb)
    return model, optimizer


def max_error(model, learning_rates, per_variable_norm=False):
    x, t = make_data()
    expected = reference(initial_params(), x, t, learning_rates, per_variable_norm)
    return max(float(np.max(np.abs(w - e))) for w, e in zip(model.get_weights(), expected))


# --- single device -----------------------------------------------------------------


def test_fit_matches_float64_reference_single_device():
    model, optimizer = fit_model()
    assert max_error(model, [LR, LR, 0.1]) < 1e-6
    assert int(optimizer.iterations) == UPDATES
    assert int(optimizer.batches_seen) == UPDATES * N


def test_wrong_references_do_not_match():
    model, _ = fit_model()
    assert max_error(model, [LR, LR, 0.1], per_variable_norm=True) > 1e-3
    assert max_error(model, [LR, LR, LR]) > 1e-3  # the LR assignment took effect


def test_custom_loop_apply_gradients_single_device():
    import tensorflow as tf
    model, optimizer = custom_loop_model(tf.distribute.get_strategy())
    assert max_error(model, [LR] * UPDATES) < 1e-6
    assert int(optimizer.iterations) == UPDATES


def test_save_load_mid_accumulation_resumes_exactly(tmp_path):
    import keras
    x, t = make_data()
    straight = build_model()
    straight.compile(optimizer=make_optimizer(), loss="mse")
    straight.fit(x, t, batch_size=BATCH, shuffle=False, verbose=0)

    model = build_model()
    model.compile(optimizer=make_optimizer(), loss="mse")
    cut = BATCH * (N + 1)  # one update done, one batch waiting in the accumulator
    model.fit(x[:cut], t[:cut], batch_size=BATCH, shuffle=False, verbose=0)
    assert int(model.optimizer.pending_batches) == 1
    path = tmp_path / "mid.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    optimizer = restored.optimizer
    assert type(optimizer).__name__ == "NormalizedMomentum"
    assert (optimizer.accumulation_steps, optimizer.momentum) == (N, MU)
    assert int(optimizer.pending_batches) == 1 and int(optimizer.iterations) == 1
    velocity_norm = sum(float(np.abs(v.numpy()).sum()) for v in optimizer._velocities)
    accumulator_norm = sum(float(np.abs(a.numpy()).sum()) for a in optimizer._accumulators)
    assert velocity_norm > 0 and accumulator_norm > 0  # slots came back, not zeros
    restored.fit(x[cut:], t[cut:], batch_size=BATCH, shuffle=False, verbose=0)
    for a, b in zip(restored.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)


def test_rejects_options_that_change_the_algorithm():
    import pytest
    from brats_tf.training.optim import NormalizedMomentum
    with pytest.raises(ValueError):
        NormalizedMomentum(gradient_accumulation_steps=4)
    with pytest.raises(ValueError):
        NormalizedMomentum(clipnorm=1.0)
    with pytest.raises(ValueError):
        NormalizedMomentum(accumulation_steps=0)


# --- mirrored (subprocess with two logical CPUs) ------------------------------------


def test_mirrored_fit_and_custom_loop_match_reference():
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "mirrored"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert report["fit_error"] < 1e-6
    assert report["loop_error"] < 1e-6
    assert report["fit_wrong_reference_error"] > 1e-3
    assert report["fit_updates"] == UPDATES and report["loop_updates"] == UPDATES


def _mirrored_main():
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    fit, fit_opt = fit_model(strategy)
    loop, loop_opt = custom_loop_model(strategy)
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "fit_error": max_error(fit, [LR, LR, 0.1]),
        "fit_wrong_reference_error": max_error(fit, [LR, LR, 0.1], per_variable_norm=True),
        "loop_error": max_error(loop, [LR] * UPDATES),
        "fit_updates": int(fit_opt.iterations),
        "loop_updates": int(loop_opt.iterations),
    }))


if __name__ == "__main__" and sys.argv[1:] == ["mirrored"]:
    _mirrored_main()
