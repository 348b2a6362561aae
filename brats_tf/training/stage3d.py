"""The 3D stage's trainer: the standard 3D model and 2D-3D models A, B, C on class-balanced
3D patches (image channels, then the 12 stored 2D feature channels for 2D-3D models)."""

import numpy as np

from brats_tf.constants import ORIENTATIONS
from brats_tf.inference import features as features_lib
from brats_tf.inference import predict
from brats_tf.errors import ConfigError
from brats_tf.models import unet3d
from brats_tf.records import streams
from brats_tf.records.streams import SAMPLING
from brats_tf.training.loop import Trainer
from brats_tf.training.data import load_cases


class Trainer3D(Trainer):
    stage = "3d"

    def load_data(self, manifest):
        c = self.config
        kind = c.model.kind
        if kind not in unet3d.KINDS:
            raise ConfigError(f"model.kind={kind!r}: use one of {unet3d.KINDS}")
        if c.data.sampling not in SAMPLING:
            raise ConfigError(f"data.sampling={c.data.sampling!r}: use one of {SAMPLING}")
        design = c.model.get("design", "atrous")
        if design not in unet3d.DESIGNS:
            raise ConfigError(f"model.design={design!r}: use one of {unet3d.DESIGNS}")
        geometry = unet3d.geometry(design)
        try:
            output_size = geometry.output_size(c.model.input_size)
        except ValueError as err:
            raise ConfigError(f"model.input_size={c.model.input_size}: {err} ({design} design)") from None
        modalities = list(c.data.modalities or manifest["modalities"])
        missing = [m for m in modalities if m not in manifest["modalities"]]
        if missing:
            raise ConfigError(f"data.modalities {missing} are not in the records ({manifest['modalities']})")
        channels = [manifest["modalities"].index(m) for m in modalities]
        dropout = c.data.get("sequence_dropout")
        if dropout is not None and not 0 <= dropout < 1:
            raise ConfigError(f"data.sequence_dropout={dropout}: needs a probability in [0, 1)")
        self.val_cases = load_cases(c.data.records_dir, self.split["val"], channels)
        self.model_spec = {"stage": "3d", "kind": kind, "preset": c.model.preset, "modalities": modalities,
                           "levels": list(c.model.levels) if c.model.levels else None, "final": c.model.final,
                           "input_size": c.model.input_size, "output_size": output_size,
                           # What inference tiles by (inference/exported.py): input = output + 2 * margin,
                           # tile sides and offsets multiples of `period`.
                           "design": design, "receptive_field": geometry.receptive_field,
                           "margin": geometry.margin, "period": geometry.period,
                           "num_features": 0, "features": None, "presence": dropout is not None}
        self.val_features, feature_paths = None, None
        if unet3d.needs_features(kind):
            feature_paths = self._load_features(manifest)
        # Training cases (and their feature records) are streamed; validation ones held in memory.
        self.train_source = streams.case_source(c.data.records_dir, self.split["train"], channels,
                                                feature_paths=feature_paths,
                                                num_features=self.model_spec["num_features"])

    def _load_features(self, manifest):
        c = self.config
        if not c.features.dir:
            raise ConfigError(f"2D-3D model {c.model.kind} needs --config.features.dir (data_prep.extract_features)")
        stored = features_lib.load_manifest(c.features.dir)
        model_paths = None
        if c.features.models:
            paths = [p.strip() for p in c.features.models.split(",")]
            if len(paths) != 3:
                raise ConfigError("features.models: give three model dirs, axial,coronal,sagittal")
            model_paths = dict(zip(ORIENTATIONS, paths))
        features_lib.check_request(stored, c.features.dir, c.features.kind, c.features.cross_fold, model_paths)
        records_prep = {k: manifest[k] for k in features_lib.PREPROCESSING_KEYS}
        if stored["preprocessing"] != records_prep:
            raise ConfigError(f"{c.features.dir}: features were extracted from records prepared as "
                              f"{stored['preprocessing']}, not as these records ({records_prep})")
        self.val_features = [features_lib.load_features(c.features.dir, [x.case_id], {x.case_id: x.label.shape})
                             [x.case_id] for x in self.val_cases]
        self.model_spec["num_features"] = len(stored["channels"])
        # What segment needs to rebuild the chain: the three 2D models, by content hash.
        self.model_spec["features"] = {"kind": stored["kind"], "models": stored["models"],
                                       "cross_fold": bool(stored["cross_fold"]), "channels": stored["channels"],
                                       "dtype": stored["dtype"]}
        train = self.split["train"]
        return dict(zip(train, features_lib.feature_record_paths(c.features.dir, train)))

    def check_finished(self, info):
        """A finished 2D-3D model must come from the 2D models of the current features: if
        they were retrained and extracted again, this model is not theirs (and `segment`
        finds its chain by the hashes it recorded)."""
        super().check_finished(info)
        c = self.config
        if not (unet3d.needs_features(c.model.kind) and c.features.dir):
            return
        trained = (info.get("features") or {}).get("models") or {}
        current = features_lib.load_manifest(c.features.dir)["models"]
        if any(trained.get(o, {}).get("sha256") != current[o]["sha256"] for o in ORIENTATIONS):
            raise ConfigError(f"{self.workdir}: its model was trained on features of other 2D models than "
                              f"{c.features.dir} holds now; use a new --workdir to train on these")

    def make_sampler(self, global_batch_size):
        c, spec = self.config, self.model_spec
        return streams.PatchStream(self.train_source, spec["input_size"], spec["output_size"], global_batch_size,
                                   seed=c.seed, sampling=c.data.sampling,
                                   sequence_dropout=c.data.get("sequence_dropout"), **streams.window_options(c.data))

    def build_model(self):
        spec = self.model_spec
        return unet3d.build_3d_model(spec["kind"], len(spec["modalities"]), spec["num_features"], spec["preset"],
                                     levels=spec["levels"], final=spec["final"], presence=spec["presence"],
                                     design=spec["design"])

    def predict_labels(self, case):
        volume = case.image
        if self.val_features is not None:
            index = [v.case_id for v in self.val_cases].index(case.case_id)
            volume = np.concatenate([np.asarray(case.image, np.float16), self.val_features[index]], axis=-1)
        present = predict.sequences_present(case.image) if self.model_spec["presence"] else None
        spec = self.model_spec
        tile = predict.fitted_tile_size(volume.shape[:3], self.config.train.tile_size, spec["period"])
        logits = predict.predict_tiled_3d(self.model, volume, tile + 2 * spec["margin"], tile, batch_size=1,
                                          present=present)
        return np.argmax(logits, axis=-1).astype(np.uint8)
