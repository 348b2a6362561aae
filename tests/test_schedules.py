"""PlateauHalving on hand-computed loss sequences, and its model.fit callback."""

import json
import math

import numpy as np
import pytest

from brats_tf.training.schedules import PlateauHalving, PlateauHalvingCallback


def feed(schedule, losses):
    return [schedule.update(loss) for loss in losses]


def test_defaults_are_the_papers():
    s = PlateauHalving()
    assert (s.learning_rate, s.minimum, s.period, s.decrease_ratio) == (0.25, 0.001, 200, 0.98)


def test_hand_computed_sequence():
    s = PlateauHalving(initial=1.0, minimum=0.1, period=4, decrease_ratio=0.9)
    # Check 1 (after 4): previous mean 10, current 5 <= 0.9*10 -> keep alpha.
    assert feed(s, [10, 10, 5, 5]) == [1.0, 1.0, 1.0, 1.0]
    # Check 2: 5 > 0.9*5 -> halve; first insufficient check.
    assert feed(s, [5, 5, 5, 5]) == [1.0, 1.0, 1.0, 0.5]
    assert (s.period, s.consecutive_insufficient) == (4, 1)
    # Check 3: insufficient again -> halve, and F doubles (counter restarts).
    assert feed(s, [5, 5, 5, 5]) == [0.5, 0.5, 0.5, 0.25]
    assert (s.period, s.consecutive_insufficient) == (8, 0)
    # Next check comes 8 iterations after the last one, comparing 4 vs 4.
    assert feed(s, [4, 4, 4, 4, 4, 4, 4]) == [0.25] * 7
    assert s.update(4) == 0.125  # means 4 vs 4: insufficient
    assert s.iteration == 20 and s.consecutive_insufficient == 1


def test_exact_threshold_is_sufficient_and_resets_the_count():
    s = PlateauHalving(initial=1.0, minimum=0.1, period=2, decrease_ratio=0.5)
    feed(s, [4, 4])  # 4 > 2 -> halve, count 1
    assert (s.learning_rate, s.consecutive_insufficient) == (0.5, 1)
    feed(s, [4, 2])  # 2 <= 0.5*4: sufficient (boundary counts as a decrease)
    assert (s.learning_rate, s.consecutive_insufficient, s.period) == (0.5, 0, 2)
    feed(s, [3, 3])  # insufficient once more: count 1, no doubling
    assert (s.learning_rate, s.consecutive_insufficient, s.period) == (0.25, 1, 2)


def test_minimum_clamps_and_still_counts_towards_doubling():
    s = PlateauHalving(initial=0.25, minimum=0.1, period=2, decrease_ratio=0.9)
    lrs = feed(s, [1, 1] * 4)
    assert lrs[1::2] == [0.125, 0.1, 0.1, 0.1]
    # insufficient at checks 1,2 (double to 4), then at check 3 (F=4 covers 4 losses)
    assert s.period == 4 and s.consecutive_insufficient == 1


def test_nan_counts_as_insufficient_decrease():
    s = PlateauHalving(initial=1.0, minimum=0.01, period=2, decrease_ratio=0.9)
    assert feed(s, [1.0, math.nan])[-1] == 0.5


def test_state_round_trips_through_json_mid_period():
    losses = list(np.linspace(3.0, 2.0, 37)) + [2.0] * 40
    straight = PlateauHalving(period=4)
    expected = feed(straight, losses)
    first = PlateauHalving(period=4)
    got = feed(first, losses[:23])
    state = json.loads(json.dumps(first.get_state()))
    resumed = PlateauHalving()  # other constructor values: the state must override them
    resumed.set_state(state)
    got += feed(resumed, losses[23:])
    assert got == expected
    assert resumed.get_state() == straight.get_state()


def test_rejects_odd_period():
    with pytest.raises(ValueError):
        PlateauHalving(period=5)


# --- callback with model.fit -------------------------------------------------------

N = 2


def _model_and_data(weights_seed=0):
    import keras
    from brats_tf.training.optim import NormalizedMomentum
    rng = np.random.default_rng(weights_seed)
    x = rng.normal(size=(8 * N * 3, 3)).astype(np.float32)
    scale = np.repeat(np.arange(1, 3 * N + 1), 8)[:, None].astype(np.float32)
    t = (3.0 * scale + rng.normal(size=(len(x), 1))).astype(np.float32)  # losses grow
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    kernel, bias = rng.normal(size=(3, 1)), rng.normal(size=(1,))
    model.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    model.compile(optimizer=NormalizedMomentum(accumulation_steps=N), loss="mse")
    return model, x, t, (kernel, bias)


def test_callback_feeds_per_iteration_losses_not_running_means():
    model, x, t, (kernel, bias) = _model_and_data()
    # A learning rate of 1e-12 leaves the weights (hence each batch loss) unchanged,
    # so the batch losses can be computed independently in float64.
    schedule = PlateauHalving(initial=1e-12, minimum=1e-12, period=100)
    callback = PlateauHalvingCallback(schedule)
    model.fit(x[:8 * 5], t[:8 * 5], batch_size=8, shuffle=False, verbose=0,
              callbacks=[callback])
    predictions = x.astype(np.float64) @ kernel + bias
    batch_losses = ((predictions - t) ** 2).reshape(-1, 8).mean(axis=1)
    expected_iterations = [batch_losses[0:2].mean(), batch_losses[2:4].mean()]
    np.testing.assert_allclose(schedule.losses_since_check, expected_iterations, rtol=1e-5)
    # the 5th batch waits in the optimizer's accumulator, and its loss in the callback
    np.testing.assert_allclose(callback.get_state()["pending_losses"], batch_losses[4:5],
                               rtol=1e-5)
    assert schedule.iteration == int(model.optimizer.iterations) == 2


def test_callback_assigns_the_halved_rate_to_the_optimizer():
    model, x, t, _ = _model_and_data()
    schedule = PlateauHalving(initial=1e-12, minimum=1e-14, period=2, decrease_ratio=0.98)
    model.fit(x[:8 * 2 * N], t[:8 * 2 * N], batch_size=8, shuffle=False, verbose=0,
              callbacks=[PlateauHalvingCallback(schedule)])
    assert schedule.learning_rate == 5e-13  # losses grow, so the first check halves
    assert float(model.optimizer.learning_rate) == pytest.approx(5e-13, rel=1e-6)
