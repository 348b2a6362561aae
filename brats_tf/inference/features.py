"""2D features for the 3D stage [M §2.1, METHOD §3].

Three trained 2D models of one kind (axial, coronal, sagittal) are run over every slice
of every case of a record set; their final conv outputs before softmax (4 maps each)
are stacked into 12 channels (axial, coronal, sagittal order), stored per case on the
cropped grid as a float16 feature record `<case_id>.tfrecord` (`records.schema`: case id,
raw bytes, shape; CRC-checked, read in-graph by the training stream), beside
`features_manifest.json`, which names
the three models by path and by the sha256 of their `model.keras` (the content, so a
retrained model in the same folder is a different model).

Reading: `feature_record_paths` gives the cases' record files (the training stream reads
them in-graph with `tf.data.TFRecordDataset(path).map(parse_feature_record)`, parsing by
`FEATURE_RECORD_SPEC`); `load_features` gives them as NumPy arrays (one-line DataError on a
damaged record or one of another case). `check_request` refuses a set whose manifest does
not match what the 3D config asks for (2D kind, exact model hashes, cross-fold extraction)
in one line. A folder of format 1 (`.npy` features) is refused by its format_version;
re-extract it.

Cross-fold extraction (optional): [M] extracts training-set features with 2D models
trained on those same cases, so they are cleaner than at test time. Given extra model
triples (`fold_models`, each trained on part of the data), a case the main models were
trained on gets its features from a triple that did not see it (by the `split.json` of
each model's work dir); other cases (validation, test) from the main models.
`write_fold_splits` prepares those work dirs (the 2D trainer reuses a split.json it finds).
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

from brats_tf.inference import predict
from brats_tf.inference.exported import (describe_model, file_sha256, load_network, model_file, read_model_info,
                                         trained_cases)
from brats_tf.constants import CLASS_NAMES, ORIENTATIONS
from brats_tf.errors import ConfigError, DataError, file_system_words, short_error
from brats_tf.io.manifest import read_manifest
from brats_tf.io import files as fs
from brats_tf.io import locks, splits
from brats_tf.io.files import atomic_write, remove_temporaries, write_json
from brats_tf.records import reader, schema

MANIFEST = "features_manifest.json"
FORMAT_VERSION = 2          # 1: .npy files
FEATURE_DTYPE = schema.FEATURE_DTYPE
# The feature record format (one tf.train.Example per file: case_id bytes, features = raw
# little-endian float16 bytes of the C-order (X, Y, Z, C) array, shape int64[4]) lives in
# records.schema beside the case records; these are the same objects, public here.
FEATURE_RECORD_SPEC = schema.FEATURE_RECORD_SPEC
parse_feature_record = schema.parse_feature_record
PREPROCESSING_KEYS = ("normalization", "median_scale", "crop_margin", "modalities")


def channel_names(num_classes=len(CLASS_NAMES)):
    return [f"{o}:{CLASS_NAMES[c] if c < len(CLASS_NAMES) else c}" for o in ORIENTATIONS for c in range(num_classes)]


class FeatureExtractor:
    """Three 2D models (axial, coronal, sagittal) of one case -> (X, Y, Z, 12) logits."""

    def __init__(self, model_paths, batch_size=8):
        missing = [o for o in ORIENTATIONS if not model_paths.get(o)]
        if missing:
            raise ConfigError(f"feature extraction needs a 2D model per orientation; missing {missing}")
        self.batch_size = batch_size
        self.descriptions, self.infos, self.models = {}, {}, {}
        for orientation in ORIENTATIONS:
            path = model_paths[orientation]
            description, info = describe_model(path), read_model_info(path)
            _check_2d_model(description["path"], info, orientation)
            self.descriptions[orientation], self.infos[orientation] = description, info
        reference = self.infos["axial"]
        for orientation in ORIENTATIONS[1:]:
            info = self.infos[orientation]
            for key in ("modalities", "preprocessing"):
                if info.get(key) != reference.get(key):
                    raise ConfigError(f"{self.descriptions[orientation]['path']}: its {key} differ from the axial "
                                      f"model's ({info.get(key)} vs {reference.get(key)}); use three models "
                                      f"trained on the same records")
        self.modalities = list(reference["modalities"])
        self.preprocessing = reference["preprocessing"]

    def _model(self, orientation):
        if orientation not in self.models:   # loaded on first use
            network = load_network(self.descriptions[orientation]["path"], "2d")   # DataError if damaged
            self.models[orientation] = predict.compiled(network)
        return self.models[orientation]

    def extract(self, image):
        """12 pre-softmax channels (float32) for an image holding `self.modalities` in order."""
        maps = []
        for orientation in ORIENTATIONS:   # models trained with sequence dropout: the case's own presence
            present = predict.sequences_present(image) if self.infos[orientation].get("presence") else None
            maps.append(predict.predict_2d_logits(
                self._model(orientation), image, orientation,
                self.infos[orientation]["pooling_factor"], self.batch_size, present))
        return np.concatenate(maps, axis=-1)

    def trained_cases(self):
        """Union of the cases the three models were trained on (None if any is unknown)."""
        sets = [trained_cases(self.descriptions[o]["path"]) for o in ORIENTATIONS]
        return None if any(s is None for s in sets) else set().union(*sets)


def _check_2d_model(path, info, orientation):
    if info.get("stage") != "2d" or info.get("subnetwork") is not None:
        raise ConfigError(f"{path}: not a full 2D model (stage {info.get('stage')!r}, "
                          f"subnetwork {info.get('subnetwork')!r})")
    if info.get("orientation") != orientation:
        raise ConfigError(f"{path}: trained on {info.get('orientation')} slices, given as the {orientation} model")


def select_channels(image, stored_modalities, wanted):
    """Channels of `wanted` modalities from an image holding `stored_modalities`."""
    return image[..., [list(stored_modalities).index(m) for m in wanted]]


def extract_features(records_dir, out_dir, model_paths, fold_models=None, batch_size=8,
                     overwrite=False, verbose=True):
    """Features of every case of a record set into `out_dir`; returns the manifest.

    model_paths: {"axial": dir, "coronal": dir, "sagittal": dir}.
    fold_models: optional list of such dicts for cross-fold extraction (module docstring).
    A re-run with the same models and records continues where a killed run stopped.
    """
    records_manifest = reader.load_manifest(records_dir)
    main = FeatureExtractor(model_paths, batch_size)
    _check_preprocessing(main, records_manifest, records_dir)
    folds = [FeatureExtractor(paths, batch_size) for paths in (fold_models or [])]
    main_trained = main.trained_cases() if folds else None
    if folds and main_trained is None:
        raise ConfigError("cross-fold extraction needs the main models' work dirs (their split.json)")
    for fold in folds:
        _check_preprocessing(fold, records_manifest, records_dir)
        if fold.trained_cases() is None:
            raise ConfigError(f"{fold.descriptions['axial']['path']}: fold models need their work dir's split.json")
    manifest = {
        "format_version": FORMAT_VERSION, "dtype": np.dtype(FEATURE_DTYPE).name,
        "records_dir": fs.absolute(records_dir), "channels": channel_names(),
        "kind": _common_kind(main), "modalities": main.modalities,
        "preprocessing": {k: records_manifest[k] for k in PREPROCESSING_KEYS},
        "models": main.descriptions,
        "cross_fold": {"folds": [f.descriptions for f in folds]} if folds else None,
        "cases": {}, "complete": False,
    }
    # One live extraction per folder (io/locks.py; the folder is created for its lock file).
    with locks.hold(os.path.join(out_dir, locks.LOCK_FILE), fs.absolute(out_dir)):
        remove_temporaries(out_dir)   # a killed run's half-written file
        manifest["cases"] = _resume_or_start(out_dir, manifest, overwrite)
        case_ids = [c["case_id"] for c in records_manifest["cases"]]
        todo = [i for i in case_ids if i not in manifest["cases"]]
        found, added = _read_bytes(os.path.join(out_dir, MANIFEST)), []
        try:
            for number, record_case in enumerate(reader.read_cases(records_dir, todo) if todo else [], 1):
                case = record_case.prepared
                source = _source_for(case.case_id, main_trained, folds)
                extractor = main if source == "main" else folds[int(source[4:])]
                image = select_channels(case.image, records_manifest["modalities"], extractor.modalities)
                features = extractor.extract(image).astype(FEATURE_DTYPE)
                name = f"{case.case_id}.tfrecord"
                _write_feature_record(os.path.join(out_dir, name), case.case_id, features)
                added.append(name)
                manifest["cases"][case.case_id] = {"file": name, "shape": list(features.shape), "source": source}
                _write_manifest(out_dir, manifest)
                if verbose:
                    print(f"  [{len(case_ids) - len(todo) + number}/{len(case_ids)}] {case.case_id}: "
                          f"{features.shape} from {source} models", file=sys.stderr, flush=True)
            manifest["complete"] = True
            _write_manifest(out_dir, manifest)
        except (DataError, ConfigError):
            _undo(out_dir, added, found)
            raise
    return manifest


def _write_feature_record(path, case_id, features):
    """One case's feature record, atomically; a write TensorFlow refuses (a full disk) is a
    DataError naming the file."""
    try:
        atomic_write(path, lambda tmp: schema.write_feature_record(tmp, case_id, features))
    except tf.errors.OpError as err:
        raise DataError(path, f"cannot write ({file_system_words(err)})") from None


def _read_bytes(path):
    if not fs.isfile(path):
        return None
    with fs.open_file(path, "rb") as f:
        return f.read()


def _undo(out_dir, added, manifest_bytes):
    """Bad input stopped the run: its feature files go and the manifest is as it was, so the
    folder is as the run found it (an earlier run's features, or nothing). A killed run keeps
    its cases instead: a re-run continues it."""
    for name in added:
        fs.remove(os.path.join(out_dir, name))
    path = os.path.join(out_dir, MANIFEST)
    if manifest_bytes is None:
        if fs.exists(path):
            fs.remove(path)
        return

    def write(tmp):
        with fs.open_file(tmp, "wb") as f:
            f.write(manifest_bytes)
    atomic_write(path, write)


def _common_kind(extractor):
    kinds = {d["kind"] for d in extractor.descriptions.values()}
    return kinds.pop() if len(kinds) == 1 else None


def _check_preprocessing(extractor, records_manifest, records_dir):
    stored = {k: records_manifest[k] for k in PREPROCESSING_KEYS}
    if extractor.preprocessing != stored:
        raise ConfigError(f"{records_dir}: records prepared as {stored}, but the 2D models "
                          f"({extractor.descriptions['axial']['path']}) were trained on {extractor.preprocessing}")
    missing = [m for m in extractor.modalities if m not in records_manifest["modalities"]]
    if missing:
        raise ConfigError(f"{records_dir}: records lack modalities {missing} that the 2D models need")


def _source_for(case_id, main_trained, folds):
    """'main', or 'fold<i>' for a case the main models were trained on (cross-fold)."""
    if not folds or case_id not in main_trained:
        return "main"
    for index, fold in enumerate(folds):
        if case_id not in fold.trained_cases():
            return f"fold{index}"
    raise ConfigError(f"case {case_id}: every fold's 2D models were trained on it; "
                      f"cross-fold extraction needs a fold that left it out")


def _resume_or_start(out_dir, manifest, overwrite):
    """Cases already extracted by an interrupted run with the same models; {} otherwise."""
    path = os.path.join(out_dir, MANIFEST)
    if not fs.exists(path):
        if fs.isdir(out_dir) and set(fs.listdir(out_dir)) - {locks.LOCK_FILE} and not overwrite:
            raise ConfigError(f"{out_dir}: exists and is not a feature folder; choose another --out_dir")
        return {}
    with fs.open_file(path) as f:
        old = json.load(f)
    same = {k: v for k, v in old.items() if k not in ("cases", "complete")} == \
           {k: v for k, v in manifest.items() if k not in ("cases", "complete")}
    if same:
        return {i: c for i, c in old["cases"].items() if fs.isfile(os.path.join(out_dir, c["file"]))}
    if not overwrite:
        raise ConfigError(f"{out_dir}: holds features from other models or records; pass --overwrite "
                          f"or choose another --out_dir")
    for case in old.get("cases", {}).values():   # only our own files
        file = os.path.join(out_dir, case["file"])
        if fs.isfile(file):
            fs.remove(file)
    return {}


def _write_manifest(out_dir, manifest):
    write_json(os.path.join(out_dir, MANIFEST), manifest, sort_keys=True)


# --- loading for the 3D stage -----------------------------------------------------------------

def load_manifest(features_dir):
    return read_manifest(features_dir, MANIFEST, "feature", "extract features with data_prep.extract_features",
                         "format_version", FORMAT_VERSION)


def check_request(manifest, features_dir, kind=None, cross_fold=False, model_paths=None, fold_paths=None):
    """Refuses (ConfigError, one line) features that are not what a 3D config asks for.

    kind: the 2D model kind the features must come from (None: any);
    cross_fold: whether training-case features must come from cross-fold models;
    model_paths: optional {orientation: path}: the features must come from exactly these
    models (by content hash); fold_paths: optional [{orientation: path}], the same for the
    cross-fold models, fold by fold.
    """
    where = os.path.join(features_dir, MANIFEST)
    if not manifest.get("complete"):
        raise ConfigError(f"{where}: extraction did not finish; re-run data_prep.extract_features")
    if kind is not None and manifest.get("kind") != kind:
        raise ConfigError(f"{where}: features come from 2D {manifest.get('kind')} models, the config asks for "
                          f"{kind} (features.kind)")
    if bool(cross_fold) != bool(manifest.get("cross_fold")):
        raise ConfigError(f"{where}: features were extracted {'with' if manifest.get('cross_fold') else 'without'} "
                          f"cross-fold models, the config asks for features.cross_fold={bool(cross_fold)}")
    _check_models(where, manifest["models"], model_paths or {})
    if fold_paths is not None:
        stored_folds = manifest["cross_fold"]["folds"]
        if len(stored_folds) != len(fold_paths):
            raise ConfigError(f"{where}: features come from {len(stored_folds)} fold models, not {len(fold_paths)}")
        for stored, paths in zip(stored_folds, fold_paths):
            _check_models(where, stored, paths)


def _check_models(where, stored_models, model_paths):
    for orientation, path in model_paths.items():
        wanted = file_sha256(model_file(path))
        stored = stored_models[orientation]
        if stored["sha256"] != wanted:
            raise ConfigError(f"{where}: {orientation} features come from {stored['path']} "
                              f"(sha256 {stored['sha256'][:12]}), not from {model_file(path)} (sha256 {wanted[:12]})")


def feature_record_paths(features_dir, case_ids):
    """Paths of the cases' feature records, in the order given (DataError for a case without)."""
    manifest = load_manifest(features_dir)
    paths = []
    for case_id in case_ids:
        entry = manifest["cases"].get(case_id)
        if entry is None:
            raise DataError(os.path.join(features_dir, MANIFEST), f"no features for case {case_id}")
        paths.append(os.path.join(features_dir, entry["file"]))
    return paths


def load_features(features_dir, case_ids, shapes=None):
    """{case_id: (X, Y, Z, 12) float16} for the given cases; `shapes` (case_id -> (X, Y, Z))
    checks they lie on the cases' cropped grids."""
    loaded = {}
    for case_id, path in zip(case_ids, feature_record_paths(features_dir, case_ids)):
        try:
            records = [parse_feature_record(r) for r in tf.data.TFRecordDataset(path)]
        except tf.errors.OpError as err:    # missing, truncated, CRC mismatch, undecodable
            raise DataError(path, f"cannot read features ({short_error(err)})") from None
        if len(records) != 1 or records[0][0].numpy().decode() != case_id:
            raise DataError(path, f"not the feature record of case {case_id}; re-run data_prep.extract_features")
        array = records[0][1].numpy()
        if shapes is not None and tuple(array.shape[:3]) != tuple(shapes[case_id]):
            raise DataError(path, f"features of shape {array.shape[:3]} do not match the case grid "
                                  f"{tuple(shapes[case_id])}; were they extracted from other records?")
        loaded[case_id] = array
    return loaded


def write_fold_splits(main_model_dir, fold_root, num_folds, seed=0):
    """Prepares the work dirs of the cross-fold 2D models: `<fold_root>/fold<k>/<orientation>/
    split.json`, which the 2D trainer then uses as is. Fold k trains on the main models'
    training cases minus fold k (and never on their validation cases). Returns the fold dirs,
    for `extract_features(fold_models=...)` once they are trained."""
    main_dir = os.path.dirname(model_file(main_model_dir))
    main_split = splits.read_split(main_dir)
    if main_split is None:
        raise DataError(os.path.join(main_dir, splits.SPLIT_FILE), "no split.json: pass the main 2D model's work dir")
    folds = []
    for k, train in enumerate(splits.fold_train_cases(main_split["train"], num_folds, seed)):
        folder = os.path.join(fs.absolute(fold_root), f"fold{k}")
        for orientation in ORIENTATIONS:
            splits.write_split(os.path.join(folder, orientation), {"train": train, "val": sorted(main_split["val"])})
        folds.append(folder)
    return folds
