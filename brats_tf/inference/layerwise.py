"""Whole-volume inference of the 3D models layer by layer: every voxel of every layer is
computed once (issue 14 item 2).

Tiled inference (`predict.predict_tiled_3d`) runs the whole network on each tile, and each
tile recomputes a 22-voxel margin on every side at every layer: at 50³ output tiles the
small and paper models spend ~2.3× the FLOPs per output voxel of one pass over the whole
volume, and a tile big enough to make the margin small does not fit in memory (the
convolutions' workspace grows with the tile). Here the network is evaluated one layer at a
time over the whole (padded) volume, each layer's output kept as a NumPy array; a layer with
a spatial window (a valid convolution, the dilated max-pool) is computed in blocks that
read their input with that layer's own halo, (k - 1) × dilation voxels, and write disjoint
output blocks. So no output is computed twice, and memory holds the live activations of the
whole volume (the skips of the U-Net) plus one block's workspace.

Works for the functional models of `models/unet3d.py` (Conv3D, DilatedMaxPool3D,
Cropping3D, Concatenate, and per-voxel layers); the result equals tiled inference up to
float rounding (tests/test_inference.py).
"""

import math

import keras
import numpy as np
import tensorflow as tf

from brats_tf.models.unet3d import DilatedMaxPool3D

# Output block side of a windowed layer, by default. Measured on the paper widths: a 64³ block
# of the widest layer needs < 2 GB of convolution workspace (BUILD_NOTES, issue 14).
DEFAULT_BLOCK = 64


def predict_layerwise_3d(model, volume, margin, present=None, block=DEFAULT_BLOCK, on_block=None):
    """Logits (X, Y, Z, C) of a valid-convolution 3D model over a whole volume (X, Y, Z, K),
    zero-padded by `margin` (the model's shrink per side, as in training and tiling).
    present: (K,) for a model with a `present` input. on_block(layer, input_shape) is called
    for every block a windowed layer computes (bench/bench_inference.py counts FLOPs so)."""
    volume = np.asarray(volume, np.float32)
    padded = np.pad(volume, [(margin, margin)] * 3 + [(0, 0)])[None]
    given = {"patch": padded}
    if present is not None:
        given["present"] = np.asarray(present, np.float32).reshape(1, -1)
    values = {id(t): given[_input_name(t, model)] for t in model.inputs}
    uses = _consumers(model)
    for layer in model.operations:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        inputs = _as_list(layer.input)
        arrays = [values[id(t)] for t in inputs]
        values[id(layer.output)] = _apply(layer, arrays, block, on_block)
        for t in inputs:   # free an activation after its last consumer (the skips live longest)
            uses[id(t)] -= 1
            if uses[id(t)] == 0 and not any(t is o for o in model.outputs):
                del values[id(t)]
    return values[id(model.outputs[0])][0]


def _input_name(tensor, model):
    names = [t.name for t in model.inputs]
    return "patch" if len(names) == 1 else tensor.name


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _consumers(model):
    uses = {}
    for layer in model.operations:
        if not isinstance(layer, keras.layers.InputLayer):
            for t in _as_list(layer.input):
                uses[id(t)] = uses.get(id(t), 0) + 1
    return uses


def _apply(layer, arrays, block, on_block):
    if isinstance(layer, keras.layers.Cropping3D):
        (x,) = arrays
        (a0, b0), (a1, b1), (a2, b2) = layer.cropping
        return x[:, a0:x.shape[1] - b0, a1:x.shape[2] - b1, a2:x.shape[3] - b2]
    if isinstance(layer, keras.layers.Concatenate):
        return np.concatenate(arrays, axis=-1)
    halo = _halo(layer)
    if halo is None:   # per-voxel layers (channel selection, presence): the whole array at once
        return np.asarray(layer(arrays if len(arrays) > 1 else arrays[0]))
    (x,) = arrays
    return _blockwise(layer, x, halo, block, on_block)


def _halo(layer):
    """Voxels a windowed layer takes off each spatial side in total (None: a per-voxel layer)."""
    if isinstance(layer, keras.layers.Conv3D):
        if layer.padding != "valid" or any(s != 1 for s in layer.strides):
            raise ValueError(f"{layer.name}: layer-wise inference needs valid, stride-1 convolutions")
        return tuple((k - 1) * d for k, d in zip(layer.kernel_size, layer.dilation_rate))
    if isinstance(layer, DilatedMaxPool3D):
        return (2 * layer.rate,) * 3
    return None


def _blockwise(layer, x, halo, block, on_block=None):
    """The layer's output over the whole of `x` (1, X, Y, Z, C), block by block: equal output
    blocks (the last ones padded past the end, then cut), each from its input block plus
    the layer's halo; one traced function per layer (every call has the same shape)."""
    out_shape = [n - h for n, h in zip(x.shape[1:4], halo)]
    sides = [math.ceil(n / math.ceil(n / block)) for n in out_shape]   # as even as the blocks can be
    counts = [math.ceil(n / s) for n, s in zip(out_shape, sides)]
    function = tf.function(layer, reduce_retracing=False)
    out = None
    for i in range(counts[0]):
        for j in range(counts[1]):
            for k in range(counts[2]):
                s = [i * sides[0], j * sides[1], k * sides[2]]
                piece = x[:, s[0]:s[0] + sides[0] + halo[0], s[1]:s[1] + sides[1] + halo[1],
                          s[2]:s[2] + sides[2] + halo[2]]
                short = [sd + h - n for sd, h, n in zip(sides, halo, piece.shape[1:4])]
                if any(short):   # a last block past the end: zero-padded to the common shape
                    piece = np.pad(piece, [(0, 0)] + [(0, n) for n in short] + [(0, 0)])
                if on_block is not None:
                    on_block(layer, piece.shape)
                result = np.asarray(function(tf.constant(piece)))
                if out is None:
                    out = np.zeros((1, *(c * sd for c, sd in zip(counts, sides)), result.shape[-1]), np.float32)
                out[:, s[0]:s[0] + sides[0], s[1]:s[1] + sides[1], s[2]:s[2] + sides[2]] = result
    return out[:, :out_shape[0], :out_shape[1], :out_shape[2]]
