"""The [S] baselines' trainer: BCN and patch FCN on tumor/background-balanced patches,
FIFCN on whole (center-cropped) volumes; Adam + L2, softmax cross-entropy or Dice loss.

    python -m brats_tf.train --config=brats_tf/configs/baselines.py:bcn_demo \
        --config.data.records_dir=R --workdir=W

Everything else (checkpoints, exact resume, TensorBoard, export of model.keras and
model_info.json) is the shared `training.Trainer`. Validation reports the whole-tumor
Dice (`val_dice_wt`), the metric of [S]. `train.init_from` starts from the weights of
another trained baseline (transfer learning, [S] §5): layers are matched by name, so a
model trained without dropout/BN initializes one with them ("fine-tuned"); the added BN
layers are set to start as the identity on the new training data (`identity_batch_norm`).
"""


import keras
import numpy as np

from brats_tf.inference import baselines as baselines_inference
from brats_tf.training import losses
from brats_tf.evaluation import metrics
from brats_tf.errors import ConfigError
from brats_tf.io import files as fs
from brats_tf.models.baselines import BaselineSpec, build_baseline, copy_matching_weights, identity_batch_norm
from brats_tf.records import streams
from brats_tf.training.schedules import ConstantRate
from brats_tf.training.loop import Trainer
from brats_tf.training.data import load_cases

LOSSES = ("cross_entropy", "dice")
CALIBRATION_BATCHES = 4   # batches that set the statistics of BN layers added for fine-tuning


def spec_from_config(config, num_channels):
    m = config.model
    return BaselineSpec(kind=m.kind, num_channels=num_channels, num_classes=m.num_classes,
                        filters=tuple(m.filters), fc_units=m.fc_units, dropout=m.dropout,
                        batch_norm=m.batch_norm, dropout_rate=m.dropout_rate, l2=m.l2,
                        patch_size=m.patch_size, volume_size=tuple(m.volume_size), num_pools=m.num_pools)


class BaselineTrainer(Trainer):
    stage = "baseline"

    def load_data(self, manifest):
        c = self.config
        if c.data.normalization and manifest["normalization"] != c.data.normalization:
            raise ConfigError(f"{c.data.records_dir}: records are {manifest['normalization']}-normalized; "
                              f"[S] baselines need {c.data.normalization} (build_records "
                              f"--normalization={c.data.normalization})")
        if c.loss.kind not in LOSSES:
            raise ConfigError(f"loss.kind={c.loss.kind!r}: use one of {LOSSES}")
        stored = manifest["modalities"]
        wanted = list(c.data.modalities or stored)
        missing = [m for m in wanted if m not in stored]
        if missing:
            raise ConfigError(f"data.modalities {missing} are not in the records ({stored})")
        channels = [stored.index(m) for m in wanted]
        try:
            self.spec = spec_from_config(c, len(wanted))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.model_spec = {"stage": "baseline", "kind": self.spec.kind, "preset": c.preset,
                           "modalities": wanted, "num_classes": self.spec.num_classes,
                           "loss": c.loss.kind, "spec": self.spec.to_json(),
                           "init_from": c.train.init_from}
        self.train_source = streams.case_source(c.data.records_dir, self.split["train"], channels)
        self.val_cases = load_cases(c.data.records_dir, self.split["val"], channels)

    def make_sampler(self, global_batch_size):
        c, spec = self.config, self.spec
        binary = spec.num_classes == 2
        window = streams.window_options(c.data)
        if spec.kind == "fifcn":
            return streams.VolumeStream(self.train_source, spec.volume_size, global_batch_size, c.seed, binary,
                                        **window)
        return streams.PatchStream(self.train_source, spec.input_size, spec.output_size, global_batch_size,
                                   seed=c.seed, sampling=c.data.sampling, binary=binary, **window)

    def build_model(self):
        model = build_baseline(self.spec)
        source = self.config.train.init_from
        if source:   # a resumed run then overwrites these with its checkpoint, as it should
            path = fs.join(source, "model.keras") if fs.isdir(source) else source
            if not fs.isfile(path):
                raise ConfigError(f"train.init_from={source!r}: no model.keras there")
            copied = copy_matching_weights(keras.models.load_model(path, compile=False), model)
            added = [layer.name for layer in model.layers
                     if isinstance(layer, keras.layers.BatchNormalization) and layer.name not in copied]
            # Added BN layers start as the identity on this site's data (BUILD_NOTES).
            calibration = self.sampler.dataset(num_batches=CALIBRATION_BATCHES)
            identity_batch_norm(model, added, [x.numpy() for x, _ in calibration])
        return model

    def loss_heads(self):
        name = self.model.output_names[0]
        if self.config.loss.kind == "dice":
            loss_fn = losses.SoftDiceLoss()
        else:
            loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return [name], {name: 1.0}, loss_fn

    def make_optimizer(self):
        return keras.optimizers.Adam(self.config.optim.learning_rate)

    def make_schedule(self):
        return ConstantRate(self.config.optim.learning_rate)

    def predict_labels(self, case):
        classes = baselines_inference.predict_classes(self.model, self.spec, case.image,
                                                      self.config.train.inference_tile)
        labels = baselines_inference.to_internal_labels(classes, self.spec.num_classes)
        labels[~case.brain] = 0
        return labels

    def validate(self):
        """Mean whole-tumor Dice over the validation cases ([S]'s metric)."""
        if not self.val_cases:
            return {}
        scores = [metrics.dice(self.validation_labels(case) > 0, case.label > 0) for case in self.val_cases]
        return {"val_dice_wt": float(np.mean(scores))}
