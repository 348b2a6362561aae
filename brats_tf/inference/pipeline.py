"""Segmenting new cases with exported models: the library behind `python -m brats_tf.segment`.

Models are trainer work dirs (or their `model.keras`, with `model_info.json` beside it):
- a 2D model segments slice by slice in its orientation;
- a 2D-3D model (A, B, C) needs the three 2D models that made its training features; they
  are found among the given models by the sha256 recorded at training (or at their
  recorded paths, if the file there still has that hash), run first, and their 12
  pre-softmax maps fed to the 3D model with the image (the chain);
- a standard 3D model runs on the image alone.
Every model that is not only a feature extractor for a given 3D model produces a label
map; several label maps are fused by the hierarchical vote of METHOD §6.

Each case is prepared exactly as each model's `model_info.json` says (normalization,
scale, crop margin, stored modalities), predictions are made on the cropped grid, and
the result is pasted back into the input's exact grid and geometry.

The same loop runs a model bundle (`bundle=`, inference/bundle.py): its networks are
SavedModels with fixed input shapes, loaded with `tf.saved_model.load`, with the
chains, vote thresholds and shapes its bundle.json records. `max_grid=` runs Keras models
at the shapes a bundle exported with that grid would use, so both give the same label map.
This module imports neither Keras model code nor `brats_tf.models` itself (only a Keras
model, when loaded, does).
"""

import glob
import json
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from brats_tf import preprocess
from brats_tf.inference import bundle as bundle_lib
from brats_tf.inference import ensemble
from brats_tf.inference import predict
from brats_tf.inference.exported import NetworkShapes, parse_grid, plan_models
from brats_tf.constants import MEMORY_BUDGET_GB, ORIENTATIONS, OUTPUT_LABEL_MAPS, REGIONS, TILE_SIZE_3D
from brats_tf.errors import ConfigError, DataError
from brats_tf.io.cases import Case, Source, discover_cases, load_case
from brats_tf.io.labels import write_label_map
from brats_tf.io import locks
from brats_tf.io.files import write_json
from brats_tf.io.nifti import save_volume

MODALITY_FLAGS = ("t1", "t1c", "t2", "flair")
BATCH_SIZE_2D = 8   # slices per forward pass of a 2D model
STAGING_SUFFIX = ".segment.tmp"   # the hidden folder a case's outputs are written into first


# --- input cases -------------------------------------------------------------------------------

def cases_from_dir(case_dir, layout="auto", layout_file=None):
    return discover_cases(case_dir, layout, layout_file)


def case_from_files(files, case_id=None, mask=None):
    """A case from explicit modality files {modality: path} (any subset)."""
    files = {m: os.path.abspath(p) for m, p in files.items() if p}
    if not files:
        raise ConfigError("give --case_dir or at least one of --t1 --t1c --t2 --flair")
    for path in list(files.values()) + ([mask] if mask else []):
        if not os.path.isfile(path):
            raise DataError(path, "file not found")
    case_id = case_id or _case_id_from_names(list(files.values()))
    images = {m: Source(files[m]) for m in MODALITY_FLAGS if m in files}
    return Case(case_id, "files", images, {}, mask=Source(os.path.abspath(mask)) if mask else None)


def _case_id_from_names(paths):
    """The file names' common stem without the modality tag: BraTS-GLI-00001-000-t1n.nii.gz,
    ...-t2f.nii.gz -> BraTS-GLI-00001-000."""
    stems = [re.sub(r"\.nii(\.gz)?$", "", os.path.basename(p)) for p in paths]
    if len(stems) == 1:
        prefix = re.sub(r"[-_](t1n?|t1c|t1ce|t1gd|t2w?|t2f|flair|fla)(_bet)?$", "", stems[0], flags=re.IGNORECASE)
    else:
        prefix = os.path.commonprefix(stems)
        if not prefix.endswith(("-", "_", ".")):   # cut a shared start of the tags ("-t" of -t1n, -t2f)
            prefix = prefix[:max(prefix.rfind("-"), prefix.rfind("_"), 0)]
    return prefix.rstrip("-_.") or "case"


# --- preparing and predicting ------------------------------------------------------------------

class PreparedInputs:
    """A case prepared once per distinct preprocessing recipe; model inputs cut from it."""

    def __init__(self, case):
        self.case = case
        self.cache = {}
        self.geometry = None

    def prepared(self, recipe):
        key = json.dumps(recipe, sort_keys=True)
        if key not in self.cache:
            present = [m for m in recipe["modalities"] if m in self.case.images]
            if not present:
                raise DataError(self.case.case_id, f"none of the modalities {recipe['modalities']} is present")
            loaded = load_case(self.case, present, with_label=False)
            self.geometry = self.geometry or loaded.geometry
            scale = recipe["median_scale"] if recipe["median_scale"] is not None else preprocess.DEFAULT_MEDIAN_SCALE
            prepared = preprocess.prepare_case(loaded, recipe["normalization"], scale, recipe["crop_margin"])
            self.cache[key] = (prepared, present)
        return self.cache[key]

    def image_for(self, model):
        """The model's input channels on its recipe's cropped grid (float32); a sequence the
        case lacks is zero-filled (`check_modalities` has allowed it), as records fill it."""
        prepared, present = self.prepared(model.info["preprocessing"])
        blank = np.zeros(prepared.image.shape[:3], prepared.image.dtype)
        return np.stack([prepared.image[..., present.index(m)] if m in present else blank
                         for m in model.info["modalities"]], axis=-1)

    def present_for(self, model):
        """(K,) 1.0 / 0.0 per sequence of the model: the `present` input of a model trained
        with sequence dropout; None for the others."""
        if not model.info.get("presence"):
            return None
        return np.array([m in self.case.images for m in model.info["modalities"]], np.float32)


def check_modalities(case, models, allow_missing=None):
    """Refuses a case lacking a modality some model needs, before any work. A model trained
    with sequence dropout (model_info "presence") runs without it, its subnetwork gated
    out; the others only with allow_missing="zero_fill". Returns {model path: "gated" |
    "zero_fill"} for the models that run without a sequence."""
    if allow_missing not in (None, "zero_fill"):
        raise ConfigError(f"--allow_missing={allow_missing!r}: the only choice is zero_fill")
    handling = {}
    for model in models:
        missing = [m for m in model.info["modalities"] if m not in case.images]
        if not missing:
            continue
        if len(missing) == len(model.info["modalities"]):
            allowed = False
        elif model.info.get("presence"):
            handling[model.path] = "gated"
            continue
        else:
            allowed = allow_missing == "zero_fill"
        if not allowed:
            where = case.missing.get(missing[0], case.case_id)
            advice = "" if len(missing) == len(model.info["modalities"]) else \
                "; it was trained without sequence dropout: --allow_missing=zero_fill runs it on zeros"
            raise DataError(where, f"case {case.case_id} has no {', '.join(missing)} image, which the "
                                   f"{model.describe()} model {model.path} needs (it uses "
                                   f"{', '.join(model.info['modalities'])}){advice}")
        handling[model.path] = "zero_fill"
    return handling


def missing_note(case, models, handling):
    """The one line segment prints for a case lacking sequences, and what volumes.json records."""
    wanted = [m for m in MODALITY_FLAGS if any(m in model.info["modalities"] for model in models)]
    missing = [m for m in wanted if m not in case.images]
    if not missing:
        return None, None
    gated = sum(1 for h in handling.values() if h == "gated")
    zero = sum(1 for h in handling.values() if h == "zero_fill")
    how = ", ".join(part for part in (f"{gated} model(s) trained with sequence dropout gate them out" if gated else "",
                                      f"{zero} model(s) run with them zero-filled" if zero else "") if part)
    return (f"{case.case_id}: no {', '.join(missing)} image; {how}",
            {"missing": missing, "present": [m for m in wanted if m in case.images], "handling": handling})


def check_grid(inputs, models):
    """Refuses a case whose brain-cropped grid is larger than the slice canvases of a 2D
    model at fixed shapes (a bundle's, or --max_grid) allow, before any network runs (3D
    tiles fit any grid)."""
    for model in models:
        if model.stage != "2d" or model.shapes is None:
            continue
        limit = model.shapes.max_grid
        prepared, _ = inputs.prepared(model.info["preprocessing"])
        if any(n > g for n, g in zip(prepared.box.shape, limit)):
            raise DataError(inputs.case.case_id, f"brain-cropped grid {'x'.join(map(str, prepared.box.shape))} "
                                                 f"is larger than the {'x'.join(map(str, limit))} the networks' "
                                                 f"fixed shapes serve (max_grid of {model.path}); export the "
                                                 f"bundle again with a larger --max_grid")


def predict_2d(model, image, batch_size, present=None):
    return predict.predict_2d_logits(model.network, image, model.info["orientation"],
                                     model.info["pooling_factor"], batch_size, present)


def chain_features(chain, inputs, batch_size, cache, dtype=None):
    """The 12 feature channels of a chain (cached per triple), rounded to `dtype` (default:
    the feature store's, as stored for training)."""
    if dtype is None:   # what the feature store holds for training
        from brats_tf.inference.features import FEATURE_DTYPE as dtype
    dtype = np.dtype(dtype)
    key = (tuple(chain[o].sha256 for o in ORIENTATIONS), dtype.name)
    if key not in cache:
        maps = [predict_2d(chain[o], inputs.image_for(chain[o]), batch_size, inputs.present_for(chain[o]))
                for o in ORIENTATIONS]
        cache[key] = np.concatenate(maps, axis=-1).astype(dtype)
    return cache[key]


def predict_model(model, chain, inputs, batch_size, tile_size, feature_cache, memory_budget_gb=MEMORY_BUDGET_GB):
    """Logits (x, y, z, 4) of one final model on its recipe's cropped grid. A 3D model runs
    layer by layer over the whole grid when the grid needs several tiles and its estimate
    fits `memory_budget_gb` (no voxel of any layer computed twice: inference/layerwise.py),
    else it is tiled with output tiles of side <= tile_size (input + 2 * margin, each tile
    recomputing its margin); a network at fixed shapes (a bundle's, --max_grid) is always tiled. Both give the same logits up to
    float rounding. A pooled 3D model (equivariant to shifts by multiples of its period, 4)
    is always tiled, with tile sides and offsets multiples of it."""
    image = inputs.image_for(model)
    if model.stage == "2d":
        return predict_2d(model, image, batch_size, inputs.present_for(model))
    if chain is not None:
        features = chain_features(chain, inputs, batch_size, feature_cache, model.feature_dtype)
        if features.shape[:3] != image.shape[:3]:
            raise ConfigError(f"{model.path}: its 2D models were trained on differently prepared data "
                              f"(grid {features.shape[:3]} vs {image.shape[:3]})")
        image = np.concatenate([np.asarray(image, features.dtype), features], axis=-1)
    if runs_layerwise(model, image.shape, memory_budget_gb, tile_size):
        from brats_tf.inference import layerwise   # imports Keras and the model code
        return layerwise.predict_layerwise_3d(model.layers_model, image, model.margin, inputs.present_for(model))
    tile = predict.fitted_tile_size(image.shape[:3], tile_size, model.period)
    return predict.predict_tiled_3d(model.network, image, tile + 2 * model.margin, tile, batch_size=1,
                                    present=inputs.present_for(model))


def runs_layerwise(model, shape, memory_budget_gb=MEMORY_BUDGET_GB, tile_size=TILE_SIZE_3D):
    """Whether a 3D model runs layer by layer over a grid of `shape`: a Keras model at the
    case's own shapes, a grid that needs more than one tile (in one tile nothing is computed
    twice, and one call beats a call per layer and block), and an estimated peak memory
    that fits the budget (0: never). Never a pooled model: its strided layers are not
    computed layer by layer."""
    if model.stage != "3d" or model.design != "atrous" or model.shapes is not None or not memory_budget_gb:
        return False
    if all(n <= tile_size for n in shape[:3]):
        return False
    from brats_tf.inference import layerwise
    return layerwise.peak_bytes(model.layers_model, shape, model.margin) <= memory_budget_gb * 2 ** 30


def segment_case(case, plan, out_dir, label_convention="brats2017", thresholds=ensemble.DEFAULT_THRESHOLDS,
                 save_probabilities=False, save_proportions=False, batch_size=BATCH_SIZE_2D, tile_size=TILE_SIZE_3D,
                 allow_missing=None, memory_budget_gb=MEMORY_BUDGET_GB, inputs=None):
    """Segments one case with the plan's models; writes the outputs; returns their paths.
    allow_missing="zero_fill": models trained without sequence dropout run on a case
    lacking one of their sequences, zero-filled. memory_budget_gb: see `predict_model`.
    inputs: the case's PreparedInputs when already prepared (`prepared_ahead`)."""
    if save_probabilities and any(m.stage == "baseline" for m in plan.final):
        raise ConfigError("--save_probabilities: not available with [S] baseline models")
    inputs = inputs or PreparedInputs(case)
    labels, probability_sum = [], None
    models = plan.final + [m for c in plan.chains if c for m in c.values()]
    _, missing = missing_note(case, models, check_modalities(case, models, allow_missing))
    for model, model_map, logits in label_maps(inputs, plan, batch_size, tile_size, allow_missing, memory_budget_gb):
        labels.append(model_map)
        if save_probabilities:   # a running sum keeps one full-size 4-class volume in memory
            prepared, _ = inputs.prepared(model.info["preprocessing"])
            pasted = _paste_probabilities(predict.softmax(logits), prepared.box)
            probability_sum = pasted if probability_sum is None else probability_sum + pasted
        del logits
    fused, proportions = ensemble.hierarchical_vote(labels, thresholds) if len(labels) > 1 else \
        (labels[0], ensemble.vote_proportions(labels))
    return write_outputs(case.case_id, inputs.geometry, fused, out_dir, label_convention,
                         probability_sum / len(labels) if save_probabilities else None,
                         proportions if save_proportions else None, [m.path for m in plan.final], missing)


def label_maps(inputs, plan, batch_size=BATCH_SIZE_2D, tile_size=TILE_SIZE_3D, allow_missing=None,
               memory_budget_gb=MEMORY_BUDGET_GB):
    """(model, label map on the original grid, logits or None) for each final model of the
    plan, one at a time (a caller can drop each model's logits before the next), after
    checking that the case has every modality the models and their chains need. The 2D
    features of a chain shared by several models are computed once."""
    check_modalities(inputs.case, plan.final + [m for c in plan.chains if c for m in c.values()], allow_missing)
    check_grid(inputs, plan.models())
    feature_cache = {}
    for model, chain in zip(plan.final, plan.chains):
        labels, logits = model_labels(model, chain, inputs, batch_size, tile_size, feature_cache, memory_budget_gb)
        yield model, labels, logits


def model_labels(model, chain, inputs, batch_size=BATCH_SIZE_2D, tile_size=TILE_SIZE_3D, feature_cache=None,
                 memory_budget_gb=MEMORY_BUDGET_GB):
    """(label map on the case's original grid, logits on the cropped grid or None for an
    [S] baseline) of one final model of a plan."""
    if model.stage == "baseline":
        return baseline_labels(model, inputs), None
    logits = predict_model(model, chain, inputs, batch_size, tile_size, {} if feature_cache is None else feature_cache,
                           memory_budget_gb)
    prepared, _ = inputs.prepared(model.info["preprocessing"])
    # Tumor only inside the brain: the crop margin and background carry no tumor.
    labels = preprocess.paste(np.where(prepared.brain, np.argmax(logits, -1), 0).astype(np.uint8), prepared.box)
    return labels, logits


def baseline_labels(model, inputs):
    """An [S] baseline's label map on the original grid (binary models write tumor as edema)."""
    from brats_tf.inference import baselines as baselines_inference
    from brats_tf.models.baselines import BaselineSpec
    loaded = load_case(inputs.case, model.info["preprocessing"]["modalities"], with_label=False)
    inputs.geometry = inputs.geometry or loaded.geometry
    return baselines_inference.segment(model.keras_model, BaselineSpec.from_json(model.info["spec"]),
                                       model.info, loaded)


def _paste_probabilities(probabilities, box):
    """Outside the crop box everything is certainly non-tumor."""
    full = preprocess.paste(probabilities.astype(np.float32), box)
    full[..., 0] += 1.0 - preprocess.paste(np.ones(box.shape, np.float32), box)
    return full


def region_volumes_ml(labels, spacing):
    """mL per region (WT, TC, ET) of an internal label map with voxel spacing in mm."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {name: round(float(np.isin(labels, classes).sum()) * voxel_ml, 4) for name, classes in REGIONS.items()}


def write_outputs(case_id, geometry, labels, out_dir, label_convention, probabilities, proportions, models,
                  missing=None):
    """Writes a case's files so that they appear together: into a hidden folder in `out_dir`,
    then renamed into place. A failure half way (a full disk) leaves none of them, and the
    files of an earlier run as they were (not a new label map beside old volumes)."""
    if label_convention not in OUTPUT_LABEL_MAPS:
        raise ConfigError(f"label_convention={label_convention!r}: use one of {sorted(OUTPUT_LABEL_MAPS)}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{case_id}.", suffix=STAGING_SUFFIX, dir=out_dir)
    except OSError as err:
        raise DataError(out_dir, f"cannot write ({err.strerror or err})") from None
    try:
        staged = _write_case_files(case_id, geometry, labels, staging, label_convention, probabilities,
                                   proportions, models, missing)
        written = {}
        for key, path in staged.items():
            written[key] = os.path.join(out_dir, os.path.basename(path))
            os.replace(path, written[key])
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_staging(out_dir):
    """Removes the hidden folders of runs killed while writing a case (`write_outputs`); only
    while holding the output folder's lock, when no live run owns one."""
    for path in glob.glob(os.path.join(glob.escape(out_dir), f".*{STAGING_SUFFIX}")):
        shutil.rmtree(path, ignore_errors=True)


def _write_case_files(case_id, geometry, labels, out_dir, label_convention, probabilities, proportions, models,
                      missing=None):
    written = {}
    seg = os.path.join(out_dir, f"{case_id}_seg.nii.gz")
    write_label_map(seg, labels, geometry, label_convention)
    written["seg"] = seg
    if probabilities is not None:
        written["probabilities"] = os.path.join(out_dir, f"{case_id}_probabilities.nii.gz")
        save_volume(written["probabilities"], probabilities.astype(np.float32), geometry)
    for name, values in (proportions or {}).items():
        written[f"P_{name}"] = os.path.join(out_dir, f"{case_id}_P_{name}.nii.gz")
        save_volume(written[f"P_{name}"], values.astype(np.float32), geometry)
    volumes = {"case_id": case_id, "spacing_mm": list(geometry.spacing),
               "voxel_volume_ml": float(np.prod(geometry.spacing)) / 1000.0,
               "volumes_ml": region_volumes_ml(labels, geometry.spacing),
               "regions": {k: list(v) for k, v in REGIONS.items()}, "label_convention": label_convention,
               "models": models}
    if missing:   # which sequences the case lacked and how each model ran without them
        volumes["missing_sequences"] = missing
    written["volumes"] = os.path.join(out_dir, f"{case_id}_volumes.json")
    write_json(written["volumes"], volumes)
    return written


def prepared_ahead(cases, plan):
    """Each case's PreparedInputs in order, every recipe of the plan's networks prepared;
    the next case is read and prepared in a background thread while the caller segments
    the current one (NIfTI decompression and NumPy release the GIL), so several cases do not
    wait for their reading. A case that fails to load raises when its turn comes."""
    recipes = {json.dumps(m.info["preprocessing"], sort_keys=True): m.info["preprocessing"]
               for m in plan.models() if m.stage != "baseline"}

    def prepare(case):
        inputs = PreparedInputs(case)
        for recipe in recipes.values():
            inputs.prepared(recipe)
        return inputs
    return ahead(cases, prepare)


def ahead(items, work):
    """work(item) for each item in order, the next one computed in a background thread
    while the caller uses the current result."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(work, items[0]) if items else None
        for index in range(len(items)):
            current = pending.result()
            pending = pool.submit(work, items[index + 1]) if index + 1 < len(items) else None
            yield current


def segment(models, out_dir, case_dir=None, files=None, layout="auto", layout_file=None, case_id=None,
            mask=None, verbose=True, bundle=None, max_grid=None, precision="fp32", **options):
    """Segments the case(s) in `case_dir` (any layout) or the explicit `files` with exported
    `models` or a model `bundle` folder; returns [(case_id, written paths)]. `max_grid`
    (X,Y,Z): run `models` at the fixed shapes of a bundle exported with it (and the same
    tile_size and batch_size). precision: "fp32" or "bf16", the models' inner layers
    (models/precision.py; a bundle's SavedModels run as exported). options: see
    `segment_case` (None: the default, or the bundle's)."""
    if bool(case_dir) == bool(files and any(files.values())):
        raise ConfigError("give either --case_dir or modality files (--t1 --t1c --t2 --flair), not both")
    if bool(models) == bool(bundle):
        raise ConfigError("give either --models (exported models) or --bundle (a model bundle), not both")
    options = {k: v for k, v in options.items() if v is not None}
    if bundle:
        if max_grid is not None:
            raise ConfigError("--max_grid: a bundle's network shapes were fixed at export (bundle.json \"shapes\")")
        if precision != "fp32":
            raise ConfigError(f"--precision={precision}: a bundle's SavedModels run in the float32 they were "
                              f"exported in; use --models for {precision}")
        loaded = bundle_lib.load_bundle(bundle)   # verifies every file's sha256 first
        plan, options = loaded.plan, loaded.segment_options(options)
    ensemble.parse_thresholds(options.get("thresholds", ensemble.DEFAULT_THRESHOLDS))   # fail early
    cases = cases_from_dir(case_dir, layout, layout_file) if case_dir else [case_from_files(files, case_id, mask)]
    if not bundle:
        shapes = None if max_grid is None else NetworkShapes(parse_grid(max_grid),
                                                             options.get("tile_size", TILE_SIZE_3D),
                                                             options.get("batch_size", BATCH_SIZE_2D))
        plan = plan_models(models, shapes, precision)
    models = plan.final + [m for c in plan.chains if c for m in c.values()]
    notes = {}
    for case in cases:   # refuse before any heavy work
        notes[case.case_id], _ = missing_note(case, models, check_modalities(case, models,
                                                                             options.get("allow_missing")))
    results = []
    # One live writer per output folder; the lock lies beside it, so a refused case leaves no folder.
    with locks.hold(f"{os.path.abspath(out_dir)}.lock", os.path.abspath(out_dir)):
        _remove_staging(out_dir)
        for inputs in prepared_ahead(cases, plan):
            case = inputs.case
            if verbose and notes[case.case_id]:
                print(notes[case.case_id], flush=True)
            written = segment_case(case, plan, out_dir, inputs=inputs, **options)
            results.append((case.case_id, written))
            if verbose:
                print(f"{case.case_id}: {written['seg']}", flush=True)
    return results
