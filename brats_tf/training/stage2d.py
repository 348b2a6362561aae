"""The 2D stage's trainer: modality-specific 2D models on full slices of one orientation,
and the pretraining of one subnetwork alone (missing-sequence experiment)."""


import keras

from brats_tf.inference import predict
from brats_tf.training import losses
from brats_tf.errors import ConfigError
from brats_tf.io import files as fs
from brats_tf.models import unet2d
from brats_tf.records import streams
from brats_tf.training.loop import Trainer
from brats_tf.training.data import load_cases


class Trainer2D(Trainer):
    stage = "2d"

    def load_data(self, manifest):
        c = self.config
        modalities, channels = self._input_modalities(manifest)
        kind = c.model.kind
        if kind not in unet2d.KINDS:
            raise ConfigError(f"model.kind={kind!r}: use one of {unet2d.KINDS}")
        dropout = c.data.get("sequence_dropout")
        if dropout is not None and (not 0 <= dropout < 1 or kind == "unet_axial" or c.train.subnetwork):
            raise ConfigError(f"data.sequence_dropout={dropout}: needs model1 or model2 (not a subnetwork "
                              f"alone) and a probability in [0, 1)")
        self.model_spec = {"stage": "2d", "kind": kind, "preset": c.model.preset, "modalities": modalities,
                           "orientation": c.data.orientation, "subnetwork": c.train.subnetwork,
                           "pooling_factor": unet2d.pooling_factor(kind, c.model.preset),
                           "presence": dropout is not None}
        # A subnetwork is pretrained only on the cases that have its sequence. Training cases
        # are streamed from the records; the few validation cases are held in memory.
        only_present = c.train.subnetwork is not None
        self.train_source = streams.case_source(c.data.records_dir, self.split["train"], channels, only_present)
        self.val_cases = load_cases(c.data.records_dir, self.split["val"], channels, only_present)

    def _input_modalities(self, manifest):
        """Modalities the model sees, and the record channels to load for it."""
        stored = manifest["modalities"]
        wanted = list(self.config.data.modalities or stored)
        missing = [m for m in wanted if m not in stored]
        if missing:
            raise ConfigError(f"data.modalities {missing} are not in the records ({stored})")
        sub = self.config.train.subnetwork
        if sub is not None and sub != unet2d.ALL:
            if sub not in wanted:
                raise ConfigError(f"train.subnetwork={sub!r} is not among the modalities {wanted}")
            return wanted, [stored.index(sub)]
        return wanted, [stored.index(m) for m in wanted]

    def make_sampler(self, global_batch_size):
        c = self.config
        shape = streams.slice_shape(self.train_source, c.data.orientation, self.model_spec["pooling_factor"])
        return streams.SliceStream(self.train_source, c.data.orientation, global_batch_size, shape, seed=c.seed,
                                   tumor_fraction=c.data.tumor_fraction,
                                   sequence_dropout=c.data.get("sequence_dropout"), **streams.window_options(c.data))

    def build_model(self):
        spec = self.model_spec
        if spec["subnetwork"] is not None:
            return unet2d.build_subnetwork_model(spec["subnetwork"], spec["modalities"], spec["kind"],
                                                 spec["preset"])
        model = unet2d.build_2d_model(spec["kind"], spec["modalities"], spec["preset"], presence=spec["presence"])
        for path in (self.config.train.pretrained_subnetworks or "").split(","):
            if path.strip():   # a resumed run then overwrites these with its checkpoint, as it should
                unet2d.load_subnetwork_weights(model, keras.models.load_model(_model_file(path.strip())))
        return model

    def loss_heads(self):
        if self.model_spec["subnetwork"] is not None:   # one (auxiliary) head: the whole loss
            name = self.model.output_names[0]
            return [name], {name: 1.0}, losses.weighted_cross_entropy(tuple(self.config.loss.target_weights))
        return super().loss_heads()

    def predict_labels(self, case):
        model = self.model if self.model_spec["subnetwork"] is not None else unet2d.inference_model(self.model)
        present = predict.sequences_present(case.image) if self.model_spec["presence"] else None
        return predict.predict_2d_labels(model, case.image, self.config.data.orientation,
                                         self.model_spec["pooling_factor"], present=present)


def _model_file(path):
    return fs.join(path, "model.keras") if fs.isdir(path) else path
