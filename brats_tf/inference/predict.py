"""Full-volume prediction: 2D models slice by slice in their orientation, 3D models tiled.

Works on the cropped, normalized grid of a case; `preprocess.paste` puts results back
into the original grid.
"""

import functools

import numpy as np
import tensorflow as tf

from brats_tf.records.slices import from_slices, padded_size, to_slices


def main_logits(model, batch):
    """The main (non-auxiliary) output of a model called on a batch, as NumPy."""
    outputs = model(batch, training=False)
    if isinstance(outputs, dict):
        outputs = outputs["main"]
    elif isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    return np.asarray(outputs, dtype=np.float32)


def sequences_present(image):
    """(K,) float32, 1.0 where a sequence is present: records and segment zero-fill a missing
    sequence, and a present one is never all zero (check_dataset and the loaders refuse it)."""
    image = np.asarray(image)
    return np.any(image.reshape(-1, image.shape[-1]) != 0, axis=0).astype(np.float32)


def with_present(batch, present, name):
    """A model's input: the batch alone, or {name: batch, "present": present per example}."""
    if present is None:
        return batch
    return {name: batch, "present": np.repeat(np.asarray(present, np.float32)[None], len(batch), 0)}


def predict_2d_logits(model, image, orientation, multiple=1, batch_size=8, present=None):
    """Pre-softmax logits (X, Y, Z, C) of a 2D model over every slice of `image` (X, Y, Z, K).
    present: (K,) 1.0 / 0.0 per sequence, for a model built with presence (its `present`
    input); missing sequences' channels should be zero, as records and segment fill them."""
    slices = to_slices(np.asarray(image, np.float32), orientation)
    num, h, w = slices.shape[:3]
    ph, pw = padded_size(h, multiple), padded_size(w, multiple)
    out = None
    for start in range(0, num, batch_size):
        chunk = slices[start:start + batch_size]
        batch = np.zeros((len(chunk), ph, pw, chunk.shape[-1]), np.float32)
        batch[:, :h, :w] = chunk
        logits = main_logits(model, with_present(batch, present, "image"))[:, :h, :w]
        if out is None:
            out = np.empty((num, h, w, logits.shape[-1]), np.float32)
        out[start:start + len(chunk)] = logits
    return from_slices(out, orientation)


def predict_2d_labels(model, image, orientation, multiple=1, batch_size=8, present=None):
    """Label map (X, Y, Z) in the internal convention from a 2D model."""
    return np.argmax(predict_2d_logits(model, image, orientation, multiple, batch_size, present),
                     axis=-1).astype(np.uint8)


def predict_tiled_3d(model, volume, input_size, output_size, batch_size=2, num_classes=None, present=None):
    """Logits (X, Y, Z, C) of a 3D patch model over a whole volume (X, Y, Z, K), by tiling.

    The model maps an `input_size`³ block to the `output_size`³ block at its center (valid
    convolutions: 70 -> 26; same-size models: 24 -> 24). Output tiles are laid edge to edge,
    so every voxel is predicted exactly once (no blending); the volume is zero-padded so
    border voxels get full context, as in training. A model equivariant only to shifts by
    multiples of a period (the pooled 3D design: 4) needs `output_size` a multiple of it:
    its tiles then start on its grid and give the logits of one pass over the whole padded
    volume. present: (K,) for a model built with presence (its `present` input), as in
    predict_2d_logits.
    """
    volume = np.asarray(volume, np.float32)
    shape = volume.shape[:3]
    margin = (input_size - output_size) // 2
    tiles = [range(0, n, output_size) for n in shape]
    padded_shape = [len(t) * output_size for t in tiles]
    pad = [(margin, margin + p - n) for p, n in zip(padded_shape, shape)] + [(0, 0)]
    padded = np.pad(volume, pad)
    starts = [(x, y, z) for x in tiles[0] for y in tiles[1] for z in tiles[2]]
    out = None
    for first in range(0, len(starts), batch_size):
        chunk = starts[first:first + batch_size]
        batch = np.stack([padded[x:x + input_size, y:y + input_size, z:z + input_size] for x, y, z in chunk])
        logits = main_logits(model, with_present(batch, present, "patch"))
        if out is None:
            out = np.zeros(tuple(padded_shape) + (num_classes or logits.shape[-1],), np.float32)
        for (x, y, z), tile in zip(chunk, logits):
            out[x:x + output_size, y:y + output_size, z:z + output_size] = tile
    return out[:shape[0], :shape[1], :shape[2]]


def fitted_tile_size(shape, largest, multiple=1):
    """The smallest cube output tile that covers `shape` with as few tiles per axis as tiles
    of side `largest` would: less padding past the volume, same number of tiles. For a
    148 x 198 x 145 brain box and largest=64: 50 (3 x 4 x 3 tiles) instead of 64.
    multiple: tile sides are multiples of it (a pooled 3D model's period: `largest` is
    rounded down to one, the fitted side up)."""
    largest = tile_limit(largest, multiple)
    counts = [-(-int(n) // largest) for n in shape]
    side = max(-(-int(n) // c) for n, c in zip(shape, counts))
    return side + -side % multiple


def tile_limit(largest, multiple=1):
    """The largest tile side <= `largest` that is a multiple of `multiple` (at least one)."""
    return max(int(largest) - int(largest) % multiple, multiple)


def softmax(logits, axis=-1):
    """Class probabilities from logits (float32, numerically stable)."""
    logits = np.asarray(logits, np.float32)
    shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def compiled(model):
    """`model` as a traced function for inference: a callable like `model(x, training=False)`.

    Eager calls of these models cost ~0.1-0.2 s of Python overhead each, more than the
    compute on small inputs. Shapes stay concrete (bilinear upsampling needs them): a batch
    smaller than the largest seen is zero-padded to it, so a whole volume needs one trace
    per slice or tile shape.
    """
    # A partial, not a lambda: TensorFlow counts traces per Python code object, so every
    # model's lambda shared one count and the ensemble's one trace per model printed
    # "triggered tf.function retracing" warnings; a partial is counted per model.
    function = tf.function(functools.partial(model, training=False))
    largest = [0]

    def padded(x, count):
        x = np.asarray(x, np.float32)
        return np.concatenate([x, np.zeros((largest[0] - count,) + x.shape[1:], np.float32)])

    def call(x, training=False):
        count = len(x["present"] if isinstance(x, dict) else x)
        largest[0] = max(largest[0], count)
        if isinstance(x, dict):   # a model with a `present` input
            outputs = function({k: tf.constant(padded(v, count)) for k, v in x.items()})
        else:
            outputs = function(tf.constant(padded(x, count)))
        if isinstance(outputs, (list, tuple)):
            return [o[:count] for o in outputs]
        return outputs[:count]

    return call
