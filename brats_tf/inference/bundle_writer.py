"""Writing model bundles (`python -m brats_tf.export`); the format and its reader are in
inference/bundle.py. Apart from it because writing needs Keras and our model classes
(loading `model.keras`, dropping the auxiliary heads) and running a bundle must not.

`export_bundle` plans the given exported models as `segment` does (2D-3D chains found by
hash, the voting models), writes each network as a SavedModel whose serving signature takes
one fixed input shape (`exported.NetworkShapes`), checks on a random input that the SavedModel
gives the Keras model's logits, records everything in bundle.json with the sha256 of every
file, and renames the finished folder into place (it is built in a temporary folder beside it).
"""

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf

from brats_tf.constants import CLASS_NAMES, OUTPUT_LABEL_MAPS, REGIONS, TILE_SIZE_3D
from brats_tf.errors import ConfigError, DataError, file_system_words
from brats_tf.inference import bundle as bundle_lib
from brats_tf.inference import ensemble, predict
from brats_tf.inference import features as features_lib
from brats_tf.inference.exported import (NetworkShapes, file_sha256, load_network, network_input_shape, parse_grid,
                                         plan_models)
from brats_tf.inference.pipeline import BATCH_SIZE_2D
from brats_tf.io import splits
from brats_tf.io.files import read_json, write_json

# Any brain-cropped BraTS-grid case (240 x 240 x 155, 1 mm) fits; see BUILD_NOTES for the cost.
DEFAULT_MAX_GRID = (240, 240, 160)

SEQUENCES = {"t1": "T1-weighted (BraTS 2023: t1n)", "t1c": "T1-weighted with contrast (t1c, t1ce, t1gd)",
             "t2": "T2-weighted (t2w)", "flair": "T2-FLAIR (t2f, flair)"}

PROCEDURE = [
    "Read each sequence a network lists in `modalities`, in that order, as float arrays on the "
    "NIfTI voxel grid as stored (no reorientation or resampling): x, y, z = array axes 0, 1, 2.",
    "Brain = voxels non-zero in any of those sequences (or a brain-mask file, where given). Crop "
    "box = the brain's bounding box grown by `preprocessing.crop_margin` voxels on each side, "
    "clipped to the volume.",
    "Normalize each sequence inside the crop, with its statistics over the brain voxels where that "
    "sequence is non-zero: median: x * median_scale / median; zscore: (x - mean) / std (std at "
    "least 1e-8); none: unchanged. Every voxel outside the brain is 0.",
    "2D network: slices along array axis 2 (axial), 1 (coronal) or 0 (sagittal) of the cropped "
    "(x, y, z, K) image, in-plane axes in array order; each slice zero-padded at the end of both "
    "axes to the signature's (H, W), batches filled up with zero slices to its batch size; the "
    "logits of each slice are cropped back to its size.",
    "2D-3D chain: the final network's three 2D networks give 4 logits each, stacked axial, "
    "coronal, sagittal (12 channels); image and features are rounded to `feature_dtype`, "
    "concatenated (image channels first) and fed as float32.",
    "3D network: output tiles of side t = max over axes of ceil(n / ceil(n / shapes.tile_size)), "
    "laid edge to edge from voxel 0; the volume is zero-padded by `margin` before and margin plus "
    "the rest of the last tile after each axis; the input block of a tile (t + 2 margin per side) is "
    "zero-padded at the end to the signature's side and the first t^3 voxels of its output are "
    "the tile's logits.",
    "Networks with a second input `present` (model_info `presence`: trained with sequence "
    "dropout): a sequence the case lacks is an all-zero channel, and `present` holds 1.0 / 0.0 per "
    "sequence of `modalities` (whether its file exists) for every row of the batch.",
    "Labels = argmax over the 4 logits (internal convention), 0 outside the brain, pasted into "
    "the full grid (0 outside the crop box).",
    "Several final networks: the hierarchical vote of `segmentation.vote` on their label maps.",
    "Write the label map in the input's grid and affine, with the values of the output "
    "convention (`labels.output_values`).",
]


def export_bundle(models, out_dir, max_grid=DEFAULT_MAX_GRID, tile_size=TILE_SIZE_3D, batch_size=BATCH_SIZE_2D,
                  thresholds=ensemble.DEFAULT_THRESHOLDS, overwrite=False, verbose=True):
    """Writes the bundle of `models` (exported model dirs or files) to `out_dir`; returns
    bundle.json as a dict."""
    out = os.path.abspath(os.fspath(out_dir))
    shapes = NetworkShapes(parse_grid(max_grid), int(tile_size), int(batch_size))
    if shapes.tile_size < 1 or shapes.batch_size < 1:
        raise ConfigError("--tile_size and --batch_size must be positive")
    thresholds = [float(t) for t in ensemble.parse_thresholds(thresholds)]
    _check_target(out, overwrite)
    plan = plan_models(models)
    networks = plan.models()
    for model in networks:
        if model.stage not in ("2d", "3d"):
            raise ConfigError(f"{model.path}: a {model.stage} model cannot be bundled (2d and 3d models can)")
    ids = {id(m): _network_id(i, m) for i, m in enumerate(networks)}
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        building = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".partial", dir=parent)
    except OSError as err:
        raise DataError(out, f"cannot write the bundle beside it ({err.strerror or err})") from None
    try:
        entries = []
        for model in networks:
            relative = f"{bundle_lib.NETWORKS_DIR}/{ids[id(model)]}"
            if verbose:
                print(f"  {ids[id(model)]}: {model.path}", file=sys.stderr, flush=True)
            signature = _write_saved_model(model, os.path.join(building, *relative.split("/")),
                                           network_input_shape(model.info, shapes))
            entries.append(_network_entry(ids[id(model)], relative, model, signature))
        manifest = _manifest(plan, ids, entries, shapes, thresholds)
        manifest["files"] = {r: file_sha256(os.path.join(building, *r.split("/")))
                             for r in bundle_lib.bundle_files(building)}
        manifest = json.loads(json.dumps(manifest))   # hashed as it will be read back
        manifest["content_sha256"] = bundle_lib.content_sha256(manifest)
        write_json(os.path.join(building, bundle_lib.BUNDLE_FILE), manifest)
        _move_into_place(building, out, overwrite)
    except BaseException as err:
        shutil.rmtree(building, ignore_errors=True)   # our own temporary folder
        if isinstance(err, tf.errors.OpError):   # TensorFlow's SavedModel writer: a full disk
            raise DataError(out, f"cannot write the bundle ({file_system_words(err)})") from None
        raise
    return manifest


def _network_id(index, model):
    name = f"n{index}_{model.stage}_{model.info.get('kind')}"
    return f"{name}_{model.info['orientation']}" if model.stage == "2d" else name


# --- one network -------------------------------------------------------------------------------

def _write_saved_model(model, folder, input_shape):
    """The network (main logits only) as a SavedModel with the serving signature `logits` on
    `input_shape`; returns the signature's description, with the largest difference between
    its logits and the Keras model's on one random input (0 when they agree bit for bit)."""
    net = load_network(model.path, model.stage)
    specs = [tf.TensorSpec(input_shape, tf.float32, name=bundle_lib.INPUT_NAME)]
    x = np.random.default_rng(0).uniform(0, 4, input_shape).astype(np.float32)
    feed = x
    if model.info.get("presence"):   # a second input: 1.0 / 0.0 per sequence and example
        present_shape = (input_shape[0], len(model.info["modalities"]))
        specs.append(tf.TensorSpec(present_shape, tf.float32, name=bundle_lib.PRESENT_NAME))
        image_name = "image" if model.stage == "2d" else "patch"    # the Keras model's input names
        present = (np.arange(np.prod(present_shape)).reshape(present_shape) % 3 > 0).astype(np.float32)
        feed = {image_name: x, bundle_lib.PRESENT_NAME: present}

    def serve(*inputs):
        logits = net(inputs[0] if len(inputs) == 1 else {image_name: inputs[0], "present": inputs[1]},
                     training=False)
        return {bundle_lib.OUTPUT_NAME: logits[0] if isinstance(logits, (list, tuple)) else logits}

    archive = keras.export.ExportArchive()
    archive.track(net)
    archive.add_endpoint(bundle_lib.SIGNATURE, serve, input_signature=specs)
    archive.write_out(folder, verbose=False)
    # The check: the same random input through the SavedModel and through Keras, as segment runs it.
    signature = tf.saved_model.load(folder).signatures[bundle_lib.SIGNATURE]
    saved = signature(**bundle_lib.signature_inputs(feed))[bundle_lib.OUTPUT_NAME].numpy()
    direct = predict.main_logits(predict.compiled(net), feed)
    difference = float(np.abs(saved - direct).max())
    if difference:
        print(f"warning: {model.path}: the SavedModel's logits differ from the Keras model's by up to "
              f"{difference:.3g} on a random input", file=sys.stderr, flush=True)
    return {"name": bundle_lib.SIGNATURE,
            "inputs": {spec.name: {"shape": list(spec.shape), "dtype": "float32"} for spec in specs},
            "outputs": {bundle_lib.OUTPUT_NAME: {"shape": list(saved.shape), "dtype": "float32"}},
            "export_check_max_abs_difference": difference}


def _network_entry(network_id, relative, model, signature):
    info = model.info
    channels = list(info["modalities"])
    if model.needs_features:
        channels += (info.get("features") or {}).get("channels") or features_lib.channel_names()
    entry = {"id": network_id, "dir": relative, "stage": model.stage, "kind": info.get("kind"),
             "preset": info.get("preset"), "modalities": list(info["modalities"]), "input_channels": channels,
             "preprocessing": info["preprocessing"], "signature": signature}
    if model.stage == "2d":
        entry.update(orientation=info["orientation"], pooling_factor=info["pooling_factor"],
                     receptive_field="the whole padded slice (same-padded convolutions)")
    else:
        entry.update(design=model.design, receptive_field=int(info.get("receptive_field") or 2 * model.margin + 1),
                     margin=model.margin, period=model.period, num_features=int(info.get("num_features") or 0))
        if model.needs_features:
            entry.update(feature_dtype=model.feature_dtype.name)
    entry["source"] = {"path": model.path, "sha256": model.sha256}
    entry["model_info"] = info
    entry["training"] = _training_summary(model)
    return entry


# --- what the training data was ------------------------------------------------------------------

def _training_summary(model):
    """What the model's work dir says about its training: iterations, preset, validation,
    the split's case ids, the records it read (layout, cases, voxel spacing, grids), and the
    resolved config.json."""
    workdir = os.path.dirname(model.path)
    config = read_json(os.path.join(workdir, "config.json"), default=None)
    split = splits.read_split(workdir)
    records_dir = ((config or {}).get("data") or {}).get("records_dir")
    summary = {"workdir": workdir, "iterations": model.info.get("iterations"), "preset": model.info.get("preset"),
               "final_validation": model.info.get("final_validation"),
               "split": None if split is None else {
                   "num_train": len(split.get("train", [])), "num_val": len(split.get("val", [])),
                   "train": sorted(split.get("train", [])), "val": sorted(split.get("val", []))},
               "records": _records_summary(records_dir),
               "config": config}
    if model.needs_features:
        features = model.info.get("features") or {}
        summary["features"] = {k: features.get(k) for k in ("kind", "cross_fold", "dtype")}
    return summary


def _records_summary(records_dir):
    if not records_dir:
        return None
    path = os.path.join(records_dir, "manifest.json")
    if not os.path.isfile(path):
        return {"manifest": path, "available": False}
    manifest = read_json(path)
    cases = manifest.get("cases", [])
    grid = lambda key: None if not cases else {"min": np.min([c[key] for c in cases], axis=0).tolist(),
                                               "max": np.max([c[key] for c in cases], axis=0).tolist()}
    for case in cases:
        case["cropped_shape"] = [b - a for a, b in zip(case["crop"]["start"], case["crop"]["stop"])]
    return {"manifest": path, "available": True, "source_dir": manifest.get("source_dir"),
            "layout": manifest.get("layout"), "num_cases": manifest.get("num_cases", len(cases)),
            "modalities": manifest.get("modalities"), "normalization": manifest.get("normalization"),
            "median_scale": manifest.get("median_scale"), "crop_margin": manifest.get("crop_margin"),
            "spacing_mm": sorted({tuple(c["spacing_mm"]) for c in cases if "spacing_mm" in c}),
            "original_shape": grid("original_shape"), "cropped_shape": grid("cropped_shape"),
            "voxels_per_class": np.sum([c["voxels_per_class"] for c in cases], axis=0).tolist()
            if cases and all("voxels_per_class" in c for c in cases) else None}


# --- bundle.json -------------------------------------------------------------------------------

def _manifest(plan, ids, entries, shapes, thresholds):
    modalities = sorted({m for e in entries for m in e["modalities"]}, key=list(SEQUENCES).index)
    final = [{"network": ids[id(m)], "chain": None if c is None else {o: ids[id(n)] for o, n in c.items()}}
             for m, c in zip(plan.final, plan.chains)]
    records = {}
    for entry in entries:
        summary = entry["training"]["records"]
        if summary and summary.get("available"):
            item = records.setdefault(summary["manifest"], {k: summary[k] for k in (
                "manifest", "source_dir", "layout", "num_cases", "spacing_mm", "cropped_shape")} | {"networks": []})
            item["networks"].append(entry["id"])
    return {
        "format": bundle_lib.FORMAT, "format_version": bundle_lib.FORMAT_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": _versions(),
        "input": {"modalities": modalities, "sequences": {m: SEQUENCES[m] for m in modalities},
                  "brain": "voxels non-zero in any sequence a network reads, or a brain-mask file",
                  "geometry": "predictions are made on the brain-cropped voxel grid and pasted back into the "
                              "input's exact grid; the label map has the input's affine"},
        "labels": {"internal": dict(enumerate(CLASS_NAMES)), "regions": {k: list(v) for k, v in REGIONS.items()},
                   "output_convention": "brats2017 unless segment --label_convention says otherwise",
                   "output_values": {name: {str(k): v for k, v in table.items()}
                                     for name, table in OUTPUT_LABEL_MAPS.items()}},
        "shapes": shapes.to_json() | {
            "meaning": "2D slices padded to the canvas of max_grid (per orientation, rounded up to the pooling "
                       "factor) in batches of batch_size; 3D output tiles of side <= tile_size, each input "
                       "block padded to tile_size + 2 * margin. A case whose brain-cropped grid exceeds "
                       "max_grid is refused when the bundle has a 2D network."},
        "networks": entries,
        "segmentation": {"final": final, "vote": {
            "method": "hierarchical" if len(final) > 1 else "none (one network)", "thresholds": thresholds,
            "rule": "with n maps and per-voxel votes v1 (ncr/net), v2 (edema), v3 (enhancing): tumor if "
                    "(v1+v2+v3)/n >= T_tumor; a tumor voxel is core if (v1+v3)/(v1+v2+v3) >= T_core (else "
                    "edema); a core voxel is enhancing if v3/(v1+v3) >= T_enh (else ncr/net); 0/0 counts as 0"}},
        "procedure": PROCEDURE,
        "training_data": sorted(records.values(), key=lambda r: r["manifest"]),
    }


def _versions():
    try:
        version = importlib.metadata.version("brats_tf")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"brats_tf": version, "brats_tf_commit": _git_commit(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__, "python": platform.python_version()}


def _git_commit():
    """The commit of the brats_tf checkout (with "+modified" for local changes), or None
    when the package is not in a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        run = lambda *args: subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                                           timeout=10, check=True).stdout.strip()
        commit = run("rev-parse", "HEAD")
        return commit + ("+modified" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


# --- atomic replacement --------------------------------------------------------------------------

def _check_target(out, overwrite):
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise ConfigError(f"{out}: exists; pass --overwrite to replace the bundle there")
    if not os.path.isfile(os.path.join(out, bundle_lib.BUNDLE_FILE)):
        raise ConfigError(f"{out}: exists and is not a model bundle (no bundle.json); not replacing it")


def _move_into_place(building, out, overwrite):
    _check_target(out, overwrite)
    if not os.path.lexists(out):
        os.rename(building, out)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".replaced", dir=os.path.dirname(out))
    os.rename(out, os.path.join(old, "bundle"))
    os.rename(building, out)
    _remove_old_bundle(os.path.join(old, "bundle"))
    if os.path.isdir(os.path.join(old, "bundle")):
        print(f"warning: kept {os.path.join(old, 'bundle')}: the replaced bundle folder held files that were "
              f"not part of it", file=sys.stderr, flush=True)
    else:
        os.rmdir(old)


def _remove_old_bundle(folder):
    """Deletes the files a replaced bundle lists (and bundle.json), then its empty folders;
    anything else stays."""
    try:
        listed = list(bundle_lib.read_bundle_json(folder).get("files") or {})
    except DataError:
        listed = []
    for relative in listed + [bundle_lib.BUNDLE_FILE]:
        path = os.path.join(folder, *relative.split("/"))
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
    for root, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):
        if not os.listdir(root):
            os.rmdir(root)
