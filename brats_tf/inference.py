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
