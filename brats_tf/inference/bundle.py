"""Model bundles: a folder that segments cases without our training code.

    DIR/bundle.json          what each network is and how to run it: sequences and their order,
                             normalization and its constants, crop margin, label convention,
                             receptive field, fixed shapes, 2D-3D chains, vote thresholds, the
                             training data, versions, and the sha256 of every other file
    DIR/networks/<id>/       one TensorFlow SavedModel per network, with one serving signature,
                             "logits": float32 `image` of a fixed shape -> float32 `logits`

This module reads, verifies and runs bundles with `tf.saved_model.load` and the signature
alone: no Keras model class and nothing of `brats_tf.models` is imported. The segment loop
(inference/pipeline.py) runs a bundle's networks like exported models (`BundleModel` has the
interface of `ExportedModel`). `inference/bundle_writer.py` writes bundles (it needs Keras).
"""

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from brats_tf.constants import ORIENTATIONS
from brats_tf.errors import ConfigError, DataError
from brats_tf.inference import ensemble
from brats_tf.inference.exported import ExportedModel, NetworkShapes, Plan, file_sha256, fixed_shape_call

BUNDLE_FILE = "bundle.json"
FORMAT = "brats_tf model bundle"
FORMAT_VERSION = 1
NETWORKS_DIR = "networks"
SIGNATURE = "logits"       # the serving signature of every network
INPUT_NAME = "image"
PRESENT_NAME = "present"    # second input of networks trained with sequence dropout (issue 15)
OUTPUT_NAME = "logits"


# --- files and hashes -------------------------------------------------------------------------

def bundle_files(folder):
    """Every file under `folder` but bundle.json, as sorted '/'-separated relative paths."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if relative != BUNDLE_FILE:
                found.append(relative)
    return sorted(found)


def content_sha256(manifest):
    """The sha256 of bundle.json's content (canonical JSON, `content_sha256` itself left out):
    bundle.json cannot hold its own file hash, so it holds this."""
    content = {k: v for k, v in manifest.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_bundle_json(folder):
    path = os.path.join(folder, BUNDLE_FILE)
    if not os.path.isdir(folder):
        raise DataError(folder, "bundle folder not found")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(path, "no bundle.json: not a model bundle (write one with python -m brats_tf.export)") from None
    except json.JSONDecodeError as err:
        raise DataError(path, f"not valid JSON ({err.msg})") from None
    except UnicodeDecodeError:   # damaged bytes are seldom UTF-8
        raise DataError(path, "not valid JSON (not UTF-8 text)") from None
    if not isinstance(manifest, dict):
        raise DataError(path, "not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(path, f"not a {FORMAT} of format_version {FORMAT_VERSION} "
                              f"(found {manifest.get('format')!r} {manifest.get('format_version')!r})")
    return manifest


def verify_bundle(folder):
    """bundle.json after checking that nothing in the bundle changed since export: its own
    content hash, then every file's sha256, no file missing and none added. DataError naming
    the first offending file otherwise."""
    folder = os.path.abspath(os.fspath(folder))
    manifest = read_bundle_json(folder)
    if manifest.get("content_sha256") != content_sha256(manifest):
        raise DataError(os.path.join(folder, BUNDLE_FILE), "modified since export (its content no longer "
                                                           "matches its content_sha256)")
    listed = manifest.get("files") or {}
    for relative in sorted(listed):
        path = os.path.join(folder, *relative.split("/"))
        if not os.path.isfile(path):
            raise DataError(path, "missing from the bundle (bundle.json lists it)")
        actual = file_sha256(path)
        if actual != listed[relative]:
            raise DataError(path, f"modified since export (sha256 {actual[:12]}..., bundle.json records "
                                  f"{listed[relative][:12]}...)")
    for relative in bundle_files(folder):
        if relative not in listed:
            raise DataError(os.path.join(folder, *relative.split("/")),
                            "not part of the bundle (bundle.json does not list it)")
    return manifest


# --- running -----------------------------------------------------------------------------------

@dataclass
class BundleModel(ExportedModel):
    """A bundle's network as the segment loop sees it: `info` is the model_info.json it was
    exported with, `sha256` that of its source model.keras, `path` its SavedModel folder;
    `network` calls the serving signature at the recorded fixed input shape."""
    entry: dict = None

    @property
    def input_shape(self):
        return tuple(self.entry["signature"]["inputs"][INPUT_NAME]["shape"])

    @property
    def margin(self):
        return int(self.entry["margin"])

    @property
    def feature_dtype(self):
        return np.dtype(self.entry["feature_dtype"])

    @property
    def keras_model(self):
        raise ConfigError(f"{self.path}: a bundle network is a SavedModel, not a Keras model")

    @property
    def network(self):
        if self._network is None:
            loaded = tf.saved_model.load(self.path)
            if SIGNATURE not in loaded.signatures:
                raise DataError(self.path, f"SavedModel has no {SIGNATURE!r} signature")
            signature = loaded.signatures[SIGNATURE]
            spec = signature.structured_input_signature[1].get(INPUT_NAME)
            if spec is None or tuple(spec.shape) != self.input_shape:
                raise DataError(self.path, f"signature input {spec} is not the {self.input_shape} bundle.json records")
            self._model = loaded   # the signature's variables live as long as the loaded object
            call = lambda x, training=False: signature(**signature_inputs(x))[OUTPUT_NAME]
            self._network = fixed_shape_call(call, self.input_shape, 2 * self.margin if self.stage == "3d" else 0)
        return self._network


def signature_inputs(x):
    """The serving signature's keyword inputs: `image`, and `present` for a network with it
    (the image under the Keras model's own input name, "image" or "patch")."""
    if not isinstance(x, dict):
        return {INPUT_NAME: tf.constant(x)}
    image, = [v for k, v in x.items() if k != PRESENT_NAME]
    return {INPUT_NAME: tf.constant(image), PRESENT_NAME: tf.constant(x[PRESENT_NAME])}


@dataclass
class LoadedBundle:
    """A verified bundle: its folder, bundle.json, the plan of networks (final ones with
    their chains, as `exported.plan_models` makes for Keras models) and its shapes."""
    folder: str
    manifest: dict
    plan: Plan
    shapes: NetworkShapes

    @property
    def thresholds(self):
        return tuple(self.manifest["segmentation"]["vote"]["thresholds"])

    def segment_options(self, options):
        """`segment` options with the bundle's tile size, batch size and vote thresholds;
        refuses a different value given for one of them."""
        fixed = {"tile_size": self.shapes.tile_size, "batch_size": self.shapes.batch_size,
                 "thresholds": self.thresholds}
        for key, value in fixed.items():
            given = options.get(key)
            same = given is None or (ensemble.parse_thresholds(given) == ensemble.parse_thresholds(value)
                                     if key == "thresholds" else int(given) == value)
            if not same:
                raise ConfigError(f"--{key}={given}: the bundle {self.folder} runs with {key} {value} "
                                  f"(its bundle.json); leave the flag out")
        return {**options, **fixed}


def load_bundle(folder):
    """Verifies a bundle and makes its plan; networks are loaded on first use."""
    folder = os.path.abspath(os.fspath(folder))
    manifest = verify_bundle(folder)
    shapes = NetworkShapes.from_json(manifest["shapes"])
    models = {entry["id"]: BundleModel(os.path.join(folder, *entry["dir"].split("/")), entry["model_info"],
                                       entry["source"]["sha256"], shapes=shapes, entry=entry)
              for entry in manifest["networks"]}
    final, chains = [], []
    for item in manifest["segmentation"]["final"]:
        final.append(models[item["network"]])
        chains.append(None if item["chain"] is None else {o: models[item["chain"][o]] for o in ORIENTATIONS})
    return LoadedBundle(folder, manifest, Plan(final, chains), shapes)
