"""Exported models (a trainer work dir's `model.keras` with its `model_info.json`): finding
and hashing them, what they say about themselves, loading them for prediction, and the
2D-3D chains (a 2D-3D model and the three 2D models whose features it was trained on,
found by the sha256 recorded at training).

Fixed network shapes (`NetworkShapes`): a model bundle (inference/bundle.py) serves each
network at one input shape (2D: a batch of slices padded to a canvas; 3D: one tile padded to
`tile_size` + 2 * margin). `fixed_shape_call` pads inputs to it and crops outputs back, and
a Keras model given the same shapes runs at exactly those shapes too, so the two give the
same logits bit for bit. Our model modules (`brats_tf.models`, whose custom layers Keras
needs to load a model) are imported only when a Keras model is loaded: running a bundle never
imports them.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from brats_tf.constants import ORIENTATIONS
from brats_tf.errors import ConfigError, DataError, short_error
from brats_tf.inference import predict
from brats_tf.io import files as fs
from brats_tf.io import splits
from brats_tf.constants import SLICE_AXIS
from brats_tf.records.slices import padded_size


def model_file(path):
    """A trainer work dir's `model.keras`, or the file itself."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(path, "model.keras") if os.path.isdir(path) else path


def file_sha256(path):
    digest = hashlib.sha256()
    with fs.open_file(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_model_info(path):
    """`model_info.json` beside a model file (what the trainer exported with it)."""
    info_path = os.path.join(os.path.dirname(model_file(path)), "model_info.json")
    try:
        with open(info_path) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise DataError(info_path, "no model_info.json beside the model; export it with brats_tf.train") from None
    except json.JSONDecodeError as err:
        raise DataError(info_path, f"not valid JSON ({err.msg})") from None
    except UnicodeDecodeError:   # damaged bytes are seldom UTF-8
        raise DataError(info_path, "not valid JSON (not UTF-8 text)") from None
    if not isinstance(info, dict):
        raise DataError(info_path, "not a JSON object")
    return info


def check_model_file(file, info):
    """The sha256 of a model file; DataError when model_info.json records another one (the
    trainer records it at export: a changed file is damaged, or not the model the info
    describes). Keras reads a `.keras` archive's weights without checking them all."""
    actual = file_sha256(file)
    recorded = info.get("model_sha256")
    if recorded is not None and actual != recorded:
        raise DataError(file, f"modified since export (sha256 {actual[:12]}..., model_info.json records "
                              f"{str(recorded)[:12]}...); damaged or replaced: export it again")
    return actual


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
    return {"path": file, "sha256": check_model_file(file, info), "kind": info.get("kind"),
            "orientation": info.get("orientation"), "iterations": info.get("iterations")}


# --- fixed network shapes ---------------------------------------------------------------------

@dataclass(frozen=True)
class NetworkShapes:
    """The one input shape each network runs at: 2D slices padded to the canvas of
    `max_grid` (the largest brain-cropped grid served) in batches of `batch_size`; 3D tiles
    of output side <= `tile_size` (a pooled model's: <= the largest multiple of its period),
    padded to that side + 2 * margin."""
    max_grid: tuple
    tile_size: int
    batch_size: int

    def to_json(self):
        return {"max_grid": list(self.max_grid), "tile_size": self.tile_size, "batch_size": self.batch_size}

    @classmethod
    def from_json(cls, d):
        return cls(tuple(int(n) for n in d["max_grid"]), int(d["tile_size"]), int(d["batch_size"]))


def parse_grid(value):
    """(X, Y, Z) from "X,Y,Z" or a sequence of three positive ints."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        grid = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        grid = ()
    if len(grid) != 3 or min(grid) < 1:
        raise ConfigError(f"max_grid={value!r}: give three positive voxel counts X,Y,Z")
    return grid


def slice_canvas(max_grid, orientation, multiple):
    """(H, W) every slice of `orientation` of a grid up to `max_grid` is padded to: the two
    in-plane sides, rounded up to the model's pooling multiple."""
    axes = [a for a in range(3) if a != SLICE_AXIS[orientation]]
    return tuple(padded_size(max_grid[a], multiple) for a in axes)


def margin_3d(info):
    """Input voxels on each side of a 3D model's output block: recorded since the pooled
    design (whose 44-voxel field is not centered on its voxel); before, (receptive field - 1) / 2."""
    if info.get("margin") is not None:
        return int(info["margin"])
    if info.get("receptive_field"):
        return (int(info["receptive_field"]) - 1) // 2
    from brats_tf.models import unet3d   # model_info written before the field was recorded
    return unet3d.MARGIN


def period_3d(info):
    """A 3D model's output is equivariant to shifts by multiples of this (the pooled design:
    4): tile sides and offsets must be multiples of it. 1 for the à trous design."""
    return int(info.get("period") or 1)


def design_3d(info):
    """A 3D model's design (models/unet3d.py); model_info from before the field: à trous."""
    return info.get("design") or "atrous"


def tile_size_3d(info, tile_size):
    """The largest output tile side <= `tile_size` a 3D model can be tiled with."""
    return predict.tile_limit(tile_size, period_3d(info))


def network_input_shape(info, shapes):
    """The fixed input shape (batch, spatial..., channels) of a network at `shapes` (3D: the
    largest tile the model takes, plus its margins)."""
    channels = len(info["modalities"])
    if info["stage"] == "2d":
        return (shapes.batch_size, *slice_canvas(shapes.max_grid, info["orientation"], info["pooling_factor"]),
                channels)
    if info["stage"] == "3d":
        side = tile_size_3d(info, shapes.tile_size) + 2 * margin_3d(info)
        return (1, side, side, side, channels + int(info.get("num_features") or 0))
    raise ConfigError(f"a {info.get('stage')!r} model has no fixed network shapes (2d and 3d models have)")


def fixed_shape_call(function, input_shape, shrink=0):
    """A model-like callable over a network that takes exactly `input_shape`: each chunk of
    `input_shape[0]` inputs (n, spatial <= the fixed ones, channels) is zero-padded at the
    end of every axis (batch included), run, and its output cropped back to the inputs' sides
    minus `shrink` (2 * margin for valid 3D convolutions, 0 for same-padded 2D ones).
    A model with a `present` input takes {name: x, "present": (n, K)} (padding rows: zeros)."""
    batch, fixed, channels = input_shape[0], tuple(input_shape[1:-1]), input_shape[-1]

    def call(x, training=False):
        name, present = None, None
        if isinstance(x, dict):
            present = np.asarray(x["present"], np.float32)
            (name, x), = [(k, v) for k, v in x.items() if k != "present"]
        x = np.asarray(x, np.float32)
        sides = x.shape[1:-1]
        if x.shape[-1] != channels or len(sides) != len(fixed) or any(s > f for s, f in zip(sides, fixed)):
            raise ConfigError(f"input {x.shape[1:]} does not fit the network's fixed input "
                              f"{tuple(input_shape[1:])}")
        out = []
        for start in range(0, len(x), batch):
            chunk = x[start:start + batch]
            canvas = np.zeros(input_shape, np.float32)
            canvas[(slice(0, len(chunk)),) + tuple(slice(0, s) for s in sides)] = chunk
            if present is not None:
                rows = np.zeros((batch, present.shape[1]), np.float32)
                rows[:len(chunk)] = present[start:start + batch]
                canvas = {name: canvas, "present": rows}
            logits = predict.main_logits(function, canvas)
            out.append(logits[(slice(0, len(chunk)),) + tuple(slice(0, s - shrink) for s in sides)])
        return np.concatenate(out)

    return call


# --- exported models -----------------------------------------------------------------------------

def load_network(path, stage, precision="fp32"):
    """The Keras network of a model file for prediction: a 2D model's main logits only
    (auxiliary heads dropped), other models as saved; its inner layers in `precision`
    (models/precision.py). Imports Keras and our model modules (their custom layers must be
    registered to load)."""
    import keras
    from brats_tf.models import baselines, unet2d, unet3d  # noqa: F401 (registers custom layers)
    from brats_tf.models.precision import with_precision
    try:
        model = keras.models.load_model(path)
    except Exception as err:   # Keras raises many kinds for a damaged archive (zip, HDF5, JSON, config)
        raise DataError(path, f"cannot load the model ({short_error(err)})") from None
    return with_precision(unet2d.inference_model(model) if stage == "2d" else model, precision)



@dataclass
class ExportedModel:
    """One exported model: its file, `model_info.json`, content hash; Keras model on demand,
    its inner layers in `precision` ("fp32" or "bf16", models/precision.py). With `shapes`,
    its network runs at those fixed shapes (as a bundle's would)."""
    path: str
    info: dict
    sha256: str
    _model: object = field(default=None, repr=False)
    shapes: NetworkShapes = None
    _network: object = field(default=None, repr=False)
    precision: str = "fp32"
    _layers: object = field(default=None, repr=False)

    @property
    def stage(self):
        return self.info.get("stage")

    @property
    def needs_features(self):
        return self.stage == "3d" and bool(self.info.get("num_features"))

    @property
    def margin(self):
        """Input voxels each side of a 3D output tile."""
        return margin_3d(self.info)

    @property
    def period(self):
        """3D output tile sides and offsets are multiples of it (`period_3d`)."""
        return period_3d(self.info)

    @property
    def design(self):
        return design_3d(self.info) if self.stage == "3d" else None

    @property
    def feature_dtype(self):
        """What a 2D-3D model's feature channels (and the image beside them) are rounded to,
        as they were stored for its training."""
        recorded = (self.info.get("features") or {}).get("dtype")
        if recorded:
            return np.dtype(recorded)
        from brats_tf.inference.features import FEATURE_DTYPE   # older model_info without it
        return np.dtype(FEATURE_DTYPE)

    @property
    def input_shape(self):
        """The fixed input shape of the network, or None when it runs at each case's shapes."""
        return None if self.shapes is None else network_input_shape(self.info, self.shapes)

    @property
    def layers_model(self):
        """The Keras model itself (layer-wise inference walks its layers)."""
        if self._layers is None:
            self._layers = load_network(self.path, self.stage, self.precision)
        return self._layers

    @property
    def keras_model(self):
        """The network used for prediction, traced: main logits only (auxiliary heads dropped)."""
        if self._model is None:
            self._model = predict.compiled(self.layers_model)
        return self._model

    @property
    def network(self):
        """A callable like `model(x, training=False)` -> logits: the Keras network, at the
        fixed shapes when `shapes` is set."""
        if self._network is None:
            self._network = self.keras_model if self.shapes is None else fixed_shape_call(
                self.keras_model, self.input_shape, 2 * self.margin if self.stage == "3d" else 0)
        return self._network

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
    return ExportedModel(file, info, check_model_file(file, info))


@dataclass
class Plan:
    """What to run: `final` models give label maps; `chains[i]` is the {orientation: model}
    feature triple of final[i] (None when it takes no features)."""
    final: list
    chains: list

    def models(self):
        """Every distinct model of the plan (final ones, then chain members), once each."""
        seen = {}
        for model in self.final + [m for chain in self.chains if chain for m in chain.values()]:
            seen.setdefault(id(model), model)
        return list(seen.values())


def plan_models(paths, shapes=None, precision="fp32"):
    """The models that give label maps, each with its feature chain; 2D models that only
    feed a chain do not vote. `shapes`: run every network at these fixed shapes;
    `precision`: every network's ("fp32", "bf16": models/precision.py)."""
    if not paths:
        raise ConfigError("--models: give at least one exported model")
    loaded = load_with_chains(paths)
    extractors = {m.sha256 for _, chain in loaded for m in (chain or {}).values()}
    final = [(m, c) for m, c in loaded if m.sha256 not in extractors or m.stage == "3d"]
    plan = Plan([m for m, _ in final], [c for _, c in final])
    for model in plan.models():
        model.precision = precision
    if shapes is not None:
        for model in plan.models():
            if model.stage == "baseline":
                raise ConfigError(f"{model.path}: fixed network shapes (--max_grid) are for 2d and 3d models")
            model.shapes = shapes
    return plan


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
