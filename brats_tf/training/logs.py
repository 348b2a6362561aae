"""What a training run logs: `train_log.csv` (one row per iteration) and TensorBoard
summaries: the scalars of each row; after each validation, a slice of the first validation
case with the reference and the prediction overlaid (the image users look at to see what
the model does); the resolved config as hyperparameters, so runs can be compared in
TensorBoard's HParams view; and the final validation under `final/...`, the metrics that
view compares (`tensorboard --logdir W` for one run, `--logdir runs/demo/models` for all
models of an experiment)."""

import csv
import json

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from brats_tf.io import files as fs
from brats_tf.io.files import atomic_write

OVERLAY_TAG = "validation/overlay"
OVERLAY_DESCRIPTION = ("First validation case, the slice through most reference tumor: reference (left) and "
                       "prediction (right) over the last input channel. Red ncr/net, green edema, yellow enhancing.")
FINAL_PREFIX = "final/"
# RGB of internal labels 1..3 (ncr/net, edema, enhancing); label 0 leaves the image gray.
LABEL_COLORS = np.array([[0, 0, 0], [230, 40, 40], [40, 200, 60], [250, 220, 30]], np.float32)
OVERLAY_ALPHA = 0.55


def overlay_image(image, reference, prediction, axis=2):
    """[1, H, 2W, 3] uint8 for `tf.summary.image`: the slice along `axis` through the most
    reference tumor (the middle one without tumor), reference | prediction in color over
    the image's last channel (FLAIR in the canonical order: it shows the whole tumor)."""
    tumor = np.sum(reference > 0, axis=tuple(a for a in range(3) if a != axis))
    index = int(np.argmax(tumor)) if tumor.any() else reference.shape[axis] // 2
    gray = np.take(np.asarray(image[..., -1], np.float32), index, axis=axis)
    low, high = np.percentile(gray, [1, 99])
    gray = np.clip((gray - low) / max(high - low, 1e-6), 0, 1)[..., None] * 255
    panels = []
    for labels in (reference, prediction):
        plane = np.clip(np.take(labels, index, axis=axis), 0, len(LABEL_COLORS) - 1)
        alpha = np.where(plane > 0, OVERLAY_ALPHA, 0.0)[..., None]
        panels.append((1 - alpha) * gray + alpha * LABEL_COLORS[plane])
    return np.concatenate(panels, axis=1)[None].round().astype(np.uint8)


def flat_hparams(config):
    """The resolved config as {dotted key: bool | int | float | str}; lists and None as JSON
    text (the HParams plugin takes scalars only)."""
    flat = {}

    def visit(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                visit(value, f"{prefix}{key}.")
            else:
                is_scalar = isinstance(value, (bool, int, float, str))
                flat[f"{prefix}{key}"] = value if is_scalar else json.dumps(value)

    visit(json.loads(config.to_json_best_effort()), "")
    return flat


class TrainLog:
    """Per-iteration CSV (`train_log.csv`) and TensorBoard summaries (scalars; after each
    validation an overlay image; the config as hyperparameters; the final validation);
    rows after a resume point are dropped so a resumed run's log has each iteration once."""

    def __init__(self, workdir, resume_iteration, enabled=True):
        self.enabled = enabled
        self.path = fs.join(workdir, "train_log.csv")
        self.rows = []
        if enabled and fs.exists(self.path):
            with fs.open_file(self.path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_iteration]
        self.writer = tf.summary.create_file_writer(fs.join(workdir, "tensorboard")) if enabled else None
        self.image_step = None   # the last step with an image: the final one is not written twice

    def write(self, row):
        if not self.enabled:
            return
        self.rows.append(row)
        with self.writer.as_default(step=row["iteration"]):
            for key, value in row.items():
                if key != "iteration":
                    tf.summary.scalar(key, value)
        if len(self.rows) % 10 == 0:
            self.flush()

    def hparams(self, config):
        """The resolved config, flattened, for TensorBoard's HParams view (written at every
        start, so a resumed run shows its current iteration target)."""
        if self.enabled:
            with self.writer.as_default():
                hparams_api.hparams(flat_hparams(config))

    def image(self, iteration, image):
        if self.enabled and image is not None and iteration != self.image_step:
            with self.writer.as_default(step=iteration):
                tf.summary.image(OVERLAY_TAG, image, description=OVERLAY_DESCRIPTION)
            self.image_step = iteration

    def final(self, iteration, validation, image):
        """The final validation, under `final/...`: the metrics the HParams view compares."""
        if not self.enabled:
            return
        with self.writer.as_default(step=iteration):
            for key, value in validation.items():
                tf.summary.scalar(f"{FINAL_PREFIX}{key}", value)
        self.image(iteration, image)

    def flush(self):
        if not self.enabled:
            return
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        columns = ["iteration"] + [k for k in columns if k != "iteration"]

        def write(p):
            with open(p, "w", newline="") as f:
                w = csv.DictWriter(f, columns, restval="")
                w.writeheader()
                w.writerows(self.rows)
        atomic_write(self.path, write)

    def close(self):
        if self.enabled:
            self.flush()
            self.writer.flush()
