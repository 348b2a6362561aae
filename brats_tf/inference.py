"""Full-volume prediction: 2D models slice by slice in their orientation.

Works on the cropped, normalized grid of a case; `preprocess.paste` puts results back
into the original grid.
"""

import numpy as np

from brats_tf.records.slices import from_slices, padded_size, to_slices


def main_logits(model, batch):
    """The main (non-auxiliary) output of a model called on a batch, as NumPy."""
    outputs = model(batch, training=False)
    if isinstance(outputs, dict):
        outputs = outputs["main"]
    elif isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    return np.asarray(outputs, dtype=np.float32)


def predict_2d_logits(model, image, orientation, multiple=1, batch_size=8):
    """Pre-softmax logits (X, Y, Z, C) of a 2D model over every slice of `image` (X, Y, Z, K)."""
    slices = to_slices(np.asarray(image, np.float32), orientation)
    num, h, w = slices.shape[:3]
    ph, pw = padded_size(h, multiple), padded_size(w, multiple)
    out = None
    for start in range(0, num, batch_size):
        chunk = slices[start:start + batch_size]
        batch = np.zeros((len(chunk), ph, pw, chunk.shape[-1]), np.float32)
        batch[:, :h, :w] = chunk
        logits = main_logits(model, batch)[:, :h, :w]
        if out is None:
            out = np.empty((num, h, w, logits.shape[-1]), np.float32)
        out[start:start + len(chunk)] = logits
    return from_slices(out, orientation)


def predict_2d_labels(model, image, orientation, multiple=1, batch_size=8):
    """Label map (X, Y, Z) in the internal convention from a 2D model."""
    return np.argmax(predict_2d_logits(model, image, orientation, multiple, batch_size), axis=-1).astype(np.uint8)


def predict_tiled_3d(model, volume, input_size, output_size, batch_size=2, num_classes=None):
    """Logits (X, Y, Z, C) of a 3D patch model over a whole volume (X, Y, Z, K), by tiling.

    The model maps an `input_size`³ block to the `output_size`³ block at its center (valid
    convolutions: 70 -> 26; same-size models: 24 -> 24). Output tiles are laid edge to edge,
    so every voxel is predicted exactly once (no blending); the volume is zero-padded so
    border voxels get full context, as in training.
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
        logits = main_logits(model, batch)
        if out is None:
            out = np.zeros(tuple(padded_shape) + (num_classes or logits.shape[-1],), np.float32)
        for (x, y, z), tile in zip(chunk, logits):
            out[x:x + output_size, y:y + output_size, z:z + output_size] = tile
    return out[:shape[0], :shape[1], :shape[2]]
