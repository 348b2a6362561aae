"""Learning-rate halving on loss plateaus [M §2.4, METHOD §5].

Reading of the rule, with the edge cases the paper leaves open:
- Iterations are optimizer updates (each = N batches); `update(loss)` is called once
  per update with that update's loss (the mean of its N batch losses).
- A check happens every F iterations, counted from the previous check (or from the
  start). It compares the mean loss of the last F/2 iterations (current) with the
  mean of the F/2 before (previous); both windows lie after the previous check, so
  only the losses since the last check are kept.
- Insufficient decrease means NOT (current <= d_loss * previous) — so a NaN loss
  counts as insufficient. Then alpha <- max(alpha / 2, alpha_min). A check that finds
  insufficient decrease counts towards "two in a row" even when alpha is already at
  alpha_min.
- When two consecutive checks find insufficient decrease, F doubles (the new F
  applies from this check on) and the consecutive count restarts at 0, so doubling
  again needs two more insufficient checks in a row. A sufficient decrease resets it.
- F must be even (F/2 windows); doubling keeps it even.
"""

import math

import keras


class PlateauHalving:
    """Plain-Python LR schedule; its whole state is JSON-serializable."""

    def __init__(self, initial=0.25, minimum=0.001, period=200, decrease_ratio=0.98):
        if period < 2 or period % 2:
            raise ValueError(f"period must be an even integer >= 2, got {period}")
        if not 0.0 < decrease_ratio < 1.0:
            raise ValueError(f"decrease_ratio must be in (0, 1), got {decrease_ratio}")
        if not 0.0 < minimum <= initial:
            raise ValueError(f"need 0 < minimum <= initial, got {minimum}, {initial}")
        self.minimum = float(minimum)
        self.decrease_ratio = float(decrease_ratio)
        self.learning_rate = float(initial)
        self.period = int(period)
        self.iteration = 0
        self.consecutive_insufficient = 0
        self.losses_since_check = []

    def update(self, iteration_loss):
        """Records one iteration's loss; returns the learning rate for the next one."""
        self.iteration += 1
        self.losses_since_check.append(float(iteration_loss))
        if len(self.losses_since_check) == self.period:
            self._check()
        return self.learning_rate

    def _check(self):
        half = self.period // 2
        previous = _mean(self.losses_since_check[:half])
        current = _mean(self.losses_since_check[half:])
        self.losses_since_check = []
        if current <= self.decrease_ratio * previous:
            self.consecutive_insufficient = 0
            return
        self.learning_rate = max(self.learning_rate / 2.0, self.minimum)
        self.consecutive_insufficient += 1
        if self.consecutive_insufficient == 2:
            self.period *= 2
            self.consecutive_insufficient = 0

    def get_state(self):
        return {
            "learning_rate": self.learning_rate, "period": self.period,
            "iteration": self.iteration,
            "consecutive_insufficient": self.consecutive_insufficient,
            "losses_since_check": list(self.losses_since_check),
            "minimum": self.minimum, "decrease_ratio": self.decrease_ratio,
        }

    def set_state(self, state):
        self.learning_rate = float(state["learning_rate"])
        self.period = int(state["period"])
        self.iteration = int(state["iteration"])
        self.consecutive_insufficient = int(state["consecutive_insufficient"])
        self.losses_since_check = [float(x) for x in state["losses_since_check"]]
        self.minimum = float(state["minimum"])
        self.decrease_ratio = float(state["decrease_ratio"])


def _mean(values):
    return math.fsum(values) / len(values)


class PlateauHalvingCallback(keras.callbacks.Callback):
    """Drives a PlateauHalving schedule from `model.fit`, one call per optimizer update.

    Keras' `logs['loss']` is the running mean over the epoch, not the batch's loss.
    This callback therefore resets the model's metrics at the start of every batch
    (`model.reset_metrics()`), so that `logs['loss']` at the end of the batch is that
    batch's loss. Side effect: progress bars and epoch logs show the last batch's
    values rather than epoch means. Requires `steps_per_execution=1`.

    Update boundaries are read from the optimizer (`iterations` of a
    brats_tf.training.optim.NormalizedMomentum, which counts updates), so the callback stays
    aligned after a resume; the losses of batches waiting in the optimizer's
    accumulator are part of `get_state()` so a resume mid-accumulation loses nothing.
    At the start of training the optimizer's learning rate is set to the schedule's.
    """

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.pending_losses = []
        self._last_update_count = None

    def on_train_begin(self, logs=None):
        self._last_update_count = int(self.model.optimizer.iterations)
        self.model.optimizer.learning_rate = self.schedule.learning_rate

    def on_train_batch_begin(self, batch, logs=None):
        self.model.reset_metrics()

    def on_train_batch_end(self, batch, logs=None):
        self.pending_losses.append(float(logs["loss"]))
        updates = int(self.model.optimizer.iterations)
        if updates == self._last_update_count:
            return
        self._last_update_count = updates
        iteration_loss = _mean(self.pending_losses)
        self.pending_losses = []
        self.model.optimizer.learning_rate = self.schedule.update(iteration_loss)

    def get_state(self):
        return {"schedule": self.schedule.get_state(),
                "pending_losses": list(self.pending_losses)}

    def set_state(self, state):
        self.schedule.set_state(state["schedule"])
        self.pending_losses = [float(x) for x in state["pending_losses"]]


class ConstantRate:
    """A fixed learning rate with the schedule interface (for optimizers like Adam)."""

    def __init__(self, learning_rate):
        self.learning_rate = float(learning_rate)

    def update(self, iteration_loss):
        return self.learning_rate

    def get_state(self):
        return {"learning_rate": self.learning_rate}

    def set_state(self, state):
        self.learning_rate = float(state["learning_rate"])
