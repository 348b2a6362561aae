"""Normalized-gradient momentum with N-batch accumulation [M §2.4, METHOD §5].

    g = sum of the gradients of N consecutive batches (summed over replicas too)
    v <- mu * v - alpha * g / (||g|| + epsilon)       ||.|| = global L2 norm over
    theta <- theta + v                                 all trainable variables

Design (KERAS3_NOTES "The custom optimizer", design (b)): the accumulation lives in
the optimizer, so the same class works with `model.compile(optimizer=...)` +
`model.fit` and with `optimizer.apply_gradients(...)` inside `strategy.run` of a custom
loop. Every batch:
  1. the batch gradients are all-reduced (SUM) across replicas right away, so the
     accumulators hold the global gradient and the norm is the global one;
  2. the sum (accumulator + batch gradient) is computed; on the N-th batch of an
     iteration the update is applied and the accumulator cleared, otherwise only the
     accumulator is written. Keras' built-in gradient accumulation puts the all-reduce
     inside a cond, which fails under MirroredStrategy (merge_call inside control flow);
     here the all-reduce comes first, outside the branch, so a `cond` is safe (tested
     under MirroredStrategy) and the N-1 accumulate-only batches skip the norm and the
     momentum arithmetic (a masked `where` update, tried first, did them every batch).
Design (a) (accumulating in a custom train_step) would leave the optimizer simpler
but tie accumulation to one particular train_step; (b) keeps `fit`, custom loops and
the trainer on one code path, at the cost of one all-reduce per batch instead of
one per iteration (negligible next to a forward-backward pass of these models).

All variables touched (model weights, velocity, accumulator) are Keras variables
with aggregation "none", and every replica computes the same values from the
all-reduced gradients, so each replica updates its own copy directly in replica
context; the mirrors stay identical without a merge_call.

Keras-private hook (pinned keras==3.15.1): we override
`BaseOptimizer._backend_apply_gradients(grads, trainable_variables)`, which
`Optimizer.apply` calls after filtering empty gradients and before incrementing
`_iterations` (the raw batch counter). Re-check it when upgrading Keras.
"""

import keras
import tensorflow as tf
from keras import ops

_UNSUPPORTED_DEFAULTS = {
    "weight_decay": None, "clipnorm": None, "clipvalue": None, "global_clipnorm": None,
    "use_ema": False, "loss_scale_factor": None, "gradient_accumulation_steps": None,
}


def _check_unsupported(kwargs):
    """Base-optimizer options that would silently change the algorithm are refused."""
    for key, default in _UNSUPPORTED_DEFAULTS.items():
        if kwargs.get(key, default) != default:
            raise ValueError(f"NormalizedMomentum does not support {key}={kwargs[key]!r}"
                             + (" (use accumulation_steps)"
                                if key == "gradient_accumulation_steps" else ""))


def _sum_over_replicas(grads):
    """All-reduce (SUM) the gradients when called in a multi-replica context."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return list(grads)
    return context.all_reduce(tf.distribute.ReduceOp.SUM, list(grads))


@keras.saving.register_keras_serializable(package="brats_tf")
class NormalizedMomentum(keras.optimizers.Optimizer):
    """SGD with momentum on the normalized gradient of N accumulated batches.

    Args:
      learning_rate: float alpha; settable between steps by assignment
        (`opt.learning_rate = x`), which is how brats_tf.training.schedules drives it.
      momentum: mu.
      accumulation_steps: N, batches per iteration (optimizer update).
      epsilon: added to the gradient norm.

    Counters: `iterations` counts updates (one per N batches) and is what the LR
    schedule is driven by; `batches_seen` counts batches; `pending_batches` is how
    many batches sit in the accumulator (0 right after an update).
    """

    def __init__(self, learning_rate=0.25, momentum=0.9, accumulation_steps=1,
                 epsilon=1e-8, name="normalized_momentum", **kwargs):
        _check_unsupported(kwargs)
        if isinstance(learning_rate, int):
            learning_rate = float(learning_rate)
        if not isinstance(learning_rate, float):
            raise ValueError("learning_rate must be a float (drive it by assignment, "
                             "e.g. with brats_tf.training.schedules), not a schedule object")
        if int(accumulation_steps) != accumulation_steps or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an integer >= 1, "
                             f"got {accumulation_steps}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self.accumulation_steps = int(accumulation_steps)
        self.epsilon = float(epsilon)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._velocities, self._accumulators = self.add_optimizer_variables(
            variables, ["velocity", "accumulator"])

    @property
    def iterations(self):
        """Completed updates (each one consumed `accumulation_steps` batches)."""
        return self._iterations // self.accumulation_steps

    @property
    def batches_seen(self):
        return self._iterations

    @property
    def pending_batches(self):
        return self._iterations % self.accumulation_steps

    def _backend_apply_gradients(self, grads, trainable_variables):
        # Keras 3.15.1 private hook, see the module docstring.
        grads = _sum_over_replicas(grads)
        indices = [self._get_variable_index(v) for v in trainable_variables]
        sums = [ops.add(self._accumulators[i], ops.cast(g, self._accumulators[i].dtype))
                for g, i in zip(grads, indices)]
        is_update = ops.equal((self._iterations + 1) % self.accumulation_steps, 0)
        pairs = [(v, i, s) for v, i, s in zip(trainable_variables, indices, sums)]

        def update():
            global_norm = ops.sqrt(ops.sum(ops.stack(
                [ops.sum(ops.square(ops.cast(s, "float32"))) for s in sums])))
            step = ops.cast(self.learning_rate, "float32") / (global_norm + self.epsilon)
            for variable, index, summed in pairs:
                self._apply_update(variable, index, summed, step)
            return ops.convert_to_tensor(True)

        def accumulate():
            for _, index, summed in pairs:
                self.assign(self._accumulators[index], summed)
            return ops.convert_to_tensor(False)

        # The all-reduce happened above, outside the branch: a cond is safe here, and the
        # N-1 accumulate-only batches of an iteration cost one write per variable.
        ops.cond(is_update, update, accumulate)

    def _apply_update(self, variable, index, summed, step):
        velocity, accumulator = self._velocities[index], self._accumulators[index]
        dtype = variable.dtype
        new_velocity = (ops.cast(self.momentum, dtype) * velocity
                        - ops.cast(step, dtype) * summed)
        self.assign(velocity, new_velocity)
        self.assign_add(variable, new_velocity)
        self.assign(accumulator, ops.zeros_like(summed))

    def update_step(self, gradient, variable, learning_rate):
        raise NotImplementedError("NormalizedMomentum updates all variables at once in "
                                  "_backend_apply_gradients (it needs the global norm)")

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum,
                       "accumulation_steps": self.accumulation_steps,
                       "epsilon": self.epsilon})
        return config
