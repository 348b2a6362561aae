"""Receptive fields measured, not derived (issue 14 item 5): which input voxels each output
voxel of a 3D model depends on, found by perturbing the input.

The model is copied with monotone weights (non-negative kernels, each output's taps summing
to 1, a small positive bias). With positive inputs no ReLU is then ever dead, activations stay
O(1), and a raised input raises every value it reaches, so it wins the max-pool windows it
enters: every dependency the architecture has shows, whatever a trained model's weights.
One input plane at a time across an axis is raised by `amplitude`, and the output voxels on
the line through the output's center along that axis that change are recorded: each output
position's first and last input plane. Forward passes only: a max-pool passes gradients to
its window's maximum alone, so the gradient for one input misses part of the field.
"""

import dataclasses

import keras
import numpy as np


@dataclasses.dataclass(frozen=True)
class MeasuredField:
    """Per axis, for each output position along it: (first, last) input voxel it depends on,
    as offsets from the input voxel at its place (output i lies at input i + margin)."""

    margin: int
    extents: dict   # axis -> tuple of (first, last) offsets, one pair per output position

    @property
    def widths(self):
        """The field widths seen (one value: every output voxel has the same width)."""
        return sorted({last - first + 1 for pairs in self.extents.values() for first, last in pairs})

    @property
    def span(self):
        """(first, last) offsets over every output position: the union of the fields."""
        pairs = [p for pairs in self.extents.values() for p in pairs]
        return min(p[0] for p in pairs), max(p[1] for p in pairs)

    def describe(self):
        offsets = sorted({p for pairs in self.extents.values() for p in pairs}, key=lambda p: -p[0])
        return (f"width {'/'.join(map(str, self.widths))}, offsets "
                f"{', '.join(f'{a:+d}..{b:+d}' for a, b in offsets)} around the output voxel")


def measure_receptive_field(model, size, cross_size, axes=(0, 1, 2), amplitude=32.0, seed=0, batch=8):
    """The measured field of a one-input 3D model: an input of side `size` along each axis
    measured (one output position per voxel of the output's side) and `cross_size` across it
    (small sides keep it fast: the model's layers treat the axes alike and separately)."""
    if len(model.inputs) != 1:
        raise ValueError("measure the receptive field of a model with one input (no `present`)")
    probe = monotone_copy(model)
    channels = int(model.inputs[0].shape[-1])
    rng = np.random.default_rng(seed)
    extents, margin = {}, None
    for axis in axes:
        shape = [cross_size] * 3
        shape[axis] = size
        base = rng.random((1, *shape, channels)).astype(np.float32)
        reference = _center_line(probe, base, axis)[0]   # (positions, classes)
        margin = (size - len(reference)) // 2
        changed = np.zeros((size, len(reference)), bool)
        for start in range(0, size, batch):
            planes = list(range(start, min(start + batch, size)))
            raised = np.repeat(base, len(planes), axis=0)
            for i, plane in enumerate(planes):
                index = [i, slice(None), slice(None), slice(None)]
                index[1 + axis] = plane
                raised[tuple(index)] += amplitude
            lines = _center_line(probe, raised, axis)
            changed[planes] = np.abs(lines - reference).max(axis=-1) > 1e-6 * (1 + np.abs(reference).max())
        extents[axis] = tuple(_first_last(changed[:, j], j + margin) for j in range(changed.shape[1]))
    return MeasuredField(margin, extents)


def _center_line(model, x, axis):
    """The outputs (n, positions, classes) on the line along `axis` through the center."""
    out = model(x, training=False)
    out = keras.ops.convert_to_numpy(out[0] if isinstance(out, (list, tuple)) else out)
    index = [slice(None)] + [out.shape[1 + a] // 2 for a in range(3)] + [slice(None)]
    index[1 + axis] = slice(None)
    return out[tuple(index)]


def _first_last(depends, place):
    where = np.flatnonzero(depends)
    if not len(where):
        raise ValueError(f"output position at input {place} changed with no input plane")
    if len(where) != where[-1] - where[0] + 1:
        raise ValueError(f"output position at input {place} depends on planes with gaps: {where.tolist()}")
    return int(where[0] - place), int(where[-1] - place)


def monotone_copy(model):
    """A copy of `model` with monotone weights (module docstring)."""
    copy = keras.models.clone_model(model)
    for layer in copy.layers:
        if layer.weights:
            kernel, *bias = layer.get_weights()
            kernel = np.abs(kernel) + 1e-3
            # Taps that reach one output: a convolution's all but the last axis; a stride-2
            # up-convolution's (kernel 2³ = stride) the input channels only (axis 4).
            axes = (4,) if isinstance(layer, keras.layers.Conv3DTranspose) else tuple(range(kernel.ndim - 1))
            layer.set_weights([kernel / kernel.sum(axis=axes, keepdims=True)] + [np.full_like(b, 0.01) for b in bias])
    return copy
