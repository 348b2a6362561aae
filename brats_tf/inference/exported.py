"""Exported models (a trainer work dir's `model.keras` with its `model_info.json`): finding
and hashing them, what they say about themselves, loading them for prediction, and the
2D-3D chains (a 2D-3D model and the three 2D models whose features it was trained on,
found by the sha256 recorded at training)."""

import hashlib
import json
import os
from dataclasses import dataclass, field

import keras

from brats_tf.constants import ORIENTATIONS
from brats_tf.errors import ConfigError, DataError
from brats_tf.inference import predict
from brats_tf.io import splits
from brats_tf.models import unet2d


def model_file(path):
    """A trainer work dir's `model.keras`, or the file itself."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(path, "model.keras") if os.path.isdir(path) else path


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_model_info(path):
    """`model_info.json` beside a model file (what the trainer exported with it)."""
    info_path = os.path.join(os.path.dirname(model_file(path)), "model_info.json")
    try:
        with open(info_path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(info_path, "no model_info.json beside the model; export it with brats_tf.train") from None
    except json.JSONDecodeError as err:
        raise DataError(info_path, f"not valid JSON ({err.msg})") from None


def trained_cases(path):
    """Case ids a model was trained on (its work dir's split.json), or None if unknown."""
    split = splits.read_split(os.path.dirname(model_file(path)))
    return None if split is None else set(split["train"])


def describe_model(path):
    """What the manifest says about one 2D model."""
    file = model_file(path)
    if not os.path.isfile(file):
        raise DataError(file, "model file not found")
    info = read_model_info(file)
    return {"path": file, "sha256": file_sha256(file), "kind": info.get("kind"),
            "orientation": info.get("orientation"), "iterations": info.get("iterations")}


@dataclass
class ExportedModel:
    """One exported model: its file, `model_info.json`, content hash; Keras model on demand."""
    path: str
    info: dict
    sha256: str
    _model: object = field(default=None, repr=False)

    @property
    def stage(self):
        return self.info.get("stage")

    @property
    def needs_features(self):
        return self.stage == "3d" and bool(self.info.get("num_features"))

    @property
    def keras_model(self):
        """The network used for prediction: main logits only (auxiliary heads dropped)."""
        if self._model is None:
            model = keras.models.load_model(self.path)
            self._model = predict.compiled(unet2d.inference_model(model) if self.stage == "2d" else model)
        return self._model

    def describe(self):
        what = f"{self.stage} {self.info.get('kind')}"
        return f"{what} {self.info.get('orientation')}" if self.stage == "2d" else what


def load_exported(path):
    file = model_file(path)
    if not os.path.isfile(file):
        raise DataError(file, "model file not found (pass a trainer work dir or its model.keras)")
    info = read_model_info(file)
    if info.get("stage") not in ("2d", "3d", "baseline"):
        raise ConfigError(f"{file}: a {info.get('stage')!r} model cannot segment here "
                          f"(2d, 3d and baseline models can)")
    if info.get("stage") == "2d" and info.get("subnetwork") is not None:
        raise ConfigError(f"{file}: a pretrained subnetwork alone, not a segmentation model")
    if "preprocessing" not in info:
        raise ConfigError(f"{file}: model_info.json has no preprocessing record; re-export the model")
    return ExportedModel(file, info, file_sha256(file))


@dataclass
class Plan:
    """What to run: `final` models give label maps; `chains[i]` is the {orientation: model}
    feature triple of final[i] (None when it takes no features)."""
    final: list
    chains: list


def plan_models(paths):
    """The models that give label maps, each with its feature chain; 2D models that only
    feed a chain do not vote."""
    if not paths:
        raise ConfigError("--models: give at least one exported model")
    loaded = load_with_chains(paths)
    extractors = {m.sha256 for _, chain in loaded for m in (chain or {}).values()}
    final = [(m, c) for m, c in loaded if m.sha256 not in extractors or m.stage == "3d"]
    return Plan([m for m, _ in final], [c for _, c in final])


def load_with_chains(paths):
    """[(model, chain or None)] for every path, in order, each model loaded once (a 2D model
    feeding a chain stays in the list: see `plan_models` for the voting ones)."""
    by_hash = {}
    models = [by_hash.setdefault(m.sha256, m) for m in map(load_exported, paths)]
    return [(m, _find_chain(m, by_hash) if m.needs_features else None) for m in models]


def _find_chain(model, by_hash):
    """The three 2D models whose features a 2D-3D model was trained on."""
    recorded = (model.info.get("features") or {}).get("models")
    if not recorded:
        raise ConfigError(f"{model.path}: model_info.json does not name the 2D models of its features")
    chain = {}
    for orientation in ORIENTATIONS:
        wanted = recorded[orientation]
        found = by_hash.get(wanted["sha256"])
        if found is None and os.path.isfile(wanted["path"]) and \
                file_sha256(wanted["path"]) == wanted["sha256"]:
            found = load_exported(wanted["path"])
            by_hash[found.sha256] = found
        if found is None:
            raise ConfigError(f"{model.path}: needs its {orientation} 2D model (sha256 {wanted['sha256'][:12]}, "
                              f"trained as {wanted['path']}); add it to --models")
        chain[orientation] = found
    return chain
