"""Full-volume prediction of the [S] baselines, pasted back into the original grid.

- BCN: tiled with `inference.predict_tiled_3d`; its valid convolutions make every output
  tile of n³ voxels need an (n+16)³ input block. n = 9 is [S]'s 25³ -> 9³; larger tiles
  give the same scores with less recomputation (`tile_size` picks the largest n <= a
  maximum that covers the volume with as few tiles as that maximum would).
- Patch FCN: 24³ -> 24³ tiles laid edge to edge, as it was trained.
- FIFCN: the cropped case is center-cropped / zero-padded to the model's volume size
  ([S]: 240×240×155 -> 160×160×144), predicted in one pass, and voxels outside that
  window are background ([S]: "padded with pixels labeled as background").

Binary models (background / whole tumor) write their tumor voxels as internal label 2
(edema, the largest whole-tumor component): only the whole-tumor metrics of their
outputs are meaningful. 4-class models write their classes as they are.
"""

import dataclasses
import json
import math
import os

import keras
import numpy as np

from brats_tf import preprocess
from brats_tf.constants import EDEMA
from brats_tf.inference.predict import main_logits, predict_tiled_3d
from brats_tf.models.baselines import BCN_INPUT, BCN_OUTPUT, BaselineSpec

BCN_CONTEXT = BCN_INPUT - BCN_OUTPUT   # 16 voxels of context around any output block
BINARY_TUMOR_LABEL = EDEMA


# --------------------------------------------------------------------- center crop / pad

def window(shape, size):
    """Per axis (source start, target start, length) of the centered overlap of a volume
    of `shape` with a window of `size`: crops axes longer than the window, pads shorter ones."""
    placement = []
    for n, s in zip(shape, size):
        length = min(n, s)
        placement.append(((n - length) // 2, (s - length) // 2, length))
    return placement


def fit_to_size(volume, size):
    """Center-crops / zero-pads the first three axes of `volume` to `size`."""
    placement = window(volume.shape[:3], size)
    out = np.zeros(tuple(size) + volume.shape[3:], volume.dtype)
    src = tuple(slice(a, a + n) for a, _, n in placement)
    dst = tuple(slice(b, b + n) for _, b, n in placement)
    out[dst] = volume[src]
    return out


def restore_from_size(fitted, shape, fill=0):
    """Inverse of `fit_to_size` onto a `shape` grid; voxels outside the window get `fill`."""
    placement = window(shape, fitted.shape[:3])
    out = np.full(tuple(shape) + fitted.shape[3:], fill, fitted.dtype)
    src = tuple(slice(a, a + n) for a, _, n in placement)
    dst = tuple(slice(b, b + n) for _, b, n in placement)
    out[src] = fitted[dst]
    return out


# --------------------------------------------------------------------- prediction

def tile_size(shape, max_tile):
    """BCN output tile edge: as small as possible with no more tiles than `max_tile` needs."""
    counts = [math.ceil(n / max_tile) for n in shape]
    return max(math.ceil(n / c) for n, c in zip(shape, counts))


def predict_classes(model, spec, image, bcn_max_tile=BCN_OUTPUT, batch_size=8):
    """Class index per voxel (X, Y, Z) uint8 of a cropped, normalized image (X, Y, Z, K)."""
    image = np.asarray(image, np.float32)
    if spec.kind == "bcn":
        tile = tile_size(image.shape[:3], bcn_max_tile)
        # Large tiles: fewer in a batch, so memory stays that of ~8 paper tiles.
        per_batch = max(1, int(batch_size * (BCN_INPUT / (tile + BCN_CONTEXT)) ** 3))
        logits = predict_tiled_3d(model, image, tile + BCN_CONTEXT, tile, per_batch)
    elif spec.kind == "fcn":
        logits = predict_tiled_3d(model, image, spec.patch_size, spec.patch_size, batch_size)
    else:
        fitted = fit_to_size(image, spec.volume_size)
        classes = np.argmax(main_logits(model, fitted[None])[0], axis=-1).astype(np.uint8)
        return restore_from_size(classes, image.shape[:3], fill=0)
    return np.argmax(logits, axis=-1).astype(np.uint8)


def to_internal_labels(classes, num_classes):
    """Model classes -> internal label convention (binary tumor -> BINARY_TUMOR_LABEL)."""
    if num_classes == 2:
        return np.where(classes > 0, BINARY_TUMOR_LABEL, 0).astype(np.uint8)
    return classes.astype(np.uint8)


# --------------------------------------------------------------------- exported models

def load_baseline(model_dir):
    """(model, BaselineSpec, model_info dict) of a trained baseline's work dir."""
    with open(os.path.join(model_dir, "model_info.json")) as f:
        info = json.load(f)
    if info.get("stage") != "baseline":
        raise ValueError(f"{model_dir}: not a baseline model (stage {info.get('stage')!r})")
    model = keras.models.load_model(os.path.join(model_dir, "model.keras"), compile=False)
    return model, BaselineSpec.from_json(info["spec"]), info


def segment(model, spec, info, loaded, bcn_max_tile=BCN_OUTPUT):
    """Label map (internal convention) of a `LoadedCase` on its original grid: the same
    preprocessing as the training records (model_info: every recorded modality, then the
    model's input channels among them), prediction, paste-back."""
    prep = info["preprocessing"]
    modalities = list(prep["modalities"])
    if tuple(loaded.modalities) != tuple(modalities):
        missing = [m for m in modalities if m not in loaded.modalities]
        if missing:
            raise ValueError(f"case {loaded.case_id} lacks {missing}, which the model needs")
        index = [list(loaded.modalities).index(m) for m in modalities]
        loaded = dataclasses.replace(loaded, image=loaded.image[..., index], modalities=tuple(modalities))
    prepared = preprocess.prepare_case(loaded, prep["normalization"], prep["median_scale"] or
                                       preprocess.DEFAULT_MEDIAN_SCALE, prep["crop_margin"])
    channels = [modalities.index(m) for m in info["modalities"]]
    classes = predict_classes(model, spec, prepared.image[..., channels], bcn_max_tile)
    labels = to_internal_labels(classes, spec.num_classes)
    labels[~prepared.brain] = 0
    return preprocess.paste(labels, prepared.box)
