"""Tail averaging of the weights (train.average_last): the exported model holds the mean of
the weights after each of a run's last K iterations instead of the last weights.

Why: the normalized-gradient step has a fixed length, so a short run never settles; where
it stops decides how the model is calibrated. Averaging the last iterations' weights
(Polyak-Ruppert averaging, as in SWA) takes the middle of the region the steps circle in.
BUILD_NOTES "Why one 2D-3D model over-segmented" has the measurements that led to it.

The running sums are float64 host arrays, saved with every checkpoint (`arrays` /
`restore`), so a run resumed inside the window exports the same average as one that never
stopped. Every floating-point variable of `model.weights` is averaged, batch norm's moving
statistics included (precise batch norm, when on, re-estimates them afterwards).
"""

import numpy as np

CHECKPOINT_NAME = "weight_average"   # <checkpoint>/weight_average.npz


class TailAverage:
    """Sums of the weights after each iteration from `first` (1-based) to the end of the run."""

    def __init__(self, model, iterations, window):
        self.variables = [v for v in model.weights if np.issubdtype(np.dtype(v.dtype), np.floating)]
        self.first = iterations - min(int(window), iterations) + 1
        self.sums, self.count = None, 0

    def add(self, iteration):
        """Called after each iteration's update, with its 1-based number."""
        if iteration < self.first:
            return
        values = [np.asarray(v.numpy(), np.float64) for v in self.variables]
        self.sums = values if self.sums is None else [s + v for s, v in zip(self.sums, values)]
        self.count += 1

    def arrays(self):
        """What a checkpoint keeps: {"count": ..., "v0000": sum, ...} (sums absent while count is 0)."""
        out = {"count": np.asarray(self.count, np.int64)}
        out.update({f"v{i:04d}": s for i, s in enumerate(self.sums or [])})
        return out

    def restore(self, arrays):
        self.count = int(arrays["count"])
        keys = sorted(k for k in arrays if k != "count")
        if self.count and len(keys) != len(self.variables):
            raise ValueError(f"the weight average has {len(keys)} arrays, the model {len(self.variables)} variables")
        self.sums = [np.asarray(arrays[k], np.float64) for k in keys] if self.count else None

    def assign(self):
        """Sets the variables to the mean; returns how many iterations it averaged (0: left as they are)."""
        if not self.count:
            return 0
        for variable, total in zip(self.variables, self.sums):
            variable.assign((total / self.count).astype(np.dtype(variable.dtype)))
        return self.count
