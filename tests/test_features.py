"""2D feature extraction: 12 pre-softmax channels per case against a slice-by-slice reference,
the manifest (content hashes), refusal of mismatched features, cross-fold extraction,
resuming, and the CLI's one-line errors."""

import hashlib
import json
import os
import shutil

import keras
import numpy as np
import pytest

from brats_tf.constants import ORIENTATIONS
from brats_tf.inference import features
from brats_tf.configs.train2d import get_config
from brats_tf.errors import ConfigError, DataError
from brats_tf.io import splits
from brats_tf.models import unet2d
from brats_tf.records import reader
from brats_tf.records.writer import build_records
from brats_tf.training.stage2d import Trainer2D
from tests.conftest import run_module, write_brats2017_case



def make_records(root, num_cases=4, shape=(24, 26, 20), **build_kwargs):
    for i in range(num_cases):
        write_brats2017_case(root / "data", f"Case_{i}", shape=shape, seed=i, with_enhancing=i != 1)
    build_records(root / "data", root / "records", verbose=False, **build_kwargs)
    return root / "records"


def export_2d_models(records, workdir, iterations=0, train_cases=None, kind="unet_axial", val_cases=("Case_3",),
                     modalities=None, orientations=ORIENTATIONS):
    """Exported 2D models, one per orientation; `iterations=0` exports the freshly
    initialized network (enough where only the plumbing matters)."""
    paths = {}
    for number, orientation in enumerate(orientations):
        config = get_config("small")
        config.seed = number   # distinct networks: identical ones saved in the same second hash alike
        config.data.records_dir = str(records)
        config.data.orientation = orientation
        config.model.kind = kind
        config.data.val_cases = list(val_cases)
        config.data.modalities = modalities
        if train_cases is not None:
            config.data.train_cases = list(train_cases)
        config.data.batch_size = 4
        config.train.iterations = iterations
        config.train.val_every = 0
        Trainer2D(config, workdir / orientation).run()
        paths[orientation] = str(workdir / orientation)
    return paths


def handmade_2d_models(template, workdir, train_cases, seed, orientations=ORIENTATIONS, **sizes):
    """Work dirs like the trainer's (model.keras, model_info.json, split.json) holding freshly
    initialized 2D models: distinct networks that 'were trained on' `train_cases`, with the
    template work dirs' info; `sizes` (e.g. main_filters=(4, 8)) shrink them."""
    paths = {}
    for orientation in orientations:
        info = json.loads(open(os.path.join(template[orientation], "model_info.json")).read())
        info.pop("model_sha256", None)   # the template's: it describes another network
        keras.utils.set_random_seed(seed)
        model = unet2d.build_2d_model(info["kind"], info["modalities"], info["preset"], **sizes)
        info["pooling_factor"] = unet2d.pooling_factor(info["kind"], info["preset"], **sizes)
        folder = workdir / orientation
        folder.mkdir(parents=True)
        model.save(folder / "model.keras")
        (folder / "model_info.json").write_text(json.dumps(info))
        (folder / "split.json").write_text(json.dumps({"train": sorted(train_cases), "val": []}))
        paths[orientation] = str(folder)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    records = make_records(root)
    models = export_2d_models(records, root / "main")
    manifest = features.extract_features(records, root / "features", models, verbose=False)
    return root, records, models, manifest


def _reference_features(model_dir, image, orientation, every=4):
    """Slice by slice with the Keras model itself: pad each slice to the pooling factor, run,
    crop. Only every `every`-th slice is computed (the rest stays NaN)."""
    info = json.loads((open(os.path.join(model_dir, "model_info.json"))).read())
    net = unet2d.inference_model(keras.models.load_model(os.path.join(model_dir, "model.keras")))
    factor = info["pooling_factor"]
    axis = {"axial": 2, "coronal": 1, "sagittal": 0}[orientation]
    out = np.full(image.shape[:3] + (4,), np.nan)
    for index in range(0, image.shape[axis], every):
        plane = np.take(image, index, axis=axis).astype(np.float32)
        h, w = plane.shape[:2]
        padded = np.zeros((-(-h // factor) * factor, -(-w // factor) * factor, plane.shape[2]), np.float32)
        padded[:h, :w] = plane
        logits = np.asarray(net(padded[None]))[0, :h, :w]
        target = [slice(None)] * 3
        target[axis] = index
        out[tuple(target)] = logits
    return out


def test_features_match_a_slice_by_slice_reference(setup):
    root, records, models, manifest = setup
    assert manifest["complete"] and len(manifest["cases"]) == 4
    assert manifest["channels"][:4] == ["axial:non-tumor", "axial:ncr/net", "axial:edema", "axial:enhancing"]
    case = next(reader.read_cases(records, ["Case_2"])).prepared
    stored = features.load_features(root / "features", ["Case_2"], {"Case_2": case.label.shape})["Case_2"]
    assert stored.dtype == np.float16 and stored.shape == case.image.shape[:3] + (12,)
    assert (root / "features" / "Case_2.tfrecord").is_file()
    for k, orientation in enumerate(ORIENTATIONS):
        want = _reference_features(models[orientation], case.image, orientation)
        done = ~np.isnan(want)
        np.testing.assert_allclose(stored[..., 4 * k:4 * k + 4][done], want[done], rtol=2e-3, atol=2e-3)
    # Pre-softmax: logits, not probabilities.
    assert stored.min() < 0 or stored.max() > 1


def test_manifest_names_models_by_content_hash(setup):
    root, _, models, manifest = setup
    for orientation in ORIENTATIONS:
        file = os.path.join(models[orientation], "model.keras")
        entry = manifest["models"][orientation]
        assert entry["sha256"] == hashlib.sha256(open(file, "rb").read()).hexdigest()
        assert entry["path"] == os.path.abspath(file) and entry["orientation"] == orientation
    assert manifest["kind"] == "unet_axial" and manifest["dtype"] == "float16" and manifest["cross_fold"] is None
    on_disk = json.loads((root / "features" / features.MANIFEST).read_text())
    assert on_disk == json.loads(json.dumps(manifest))


def test_mismatched_features_are_refused(setup, tmp_path):
    root, _, models, manifest = setup
    where = root / "features"
    features.check_request(manifest, where, kind="unet_axial", model_paths=models)   # what was asked: fine
    with pytest.raises(ConfigError, match="unet_axial models, the config asks for model2"):
        features.check_request(manifest, where, kind="model2")
    with pytest.raises(ConfigError, match="cross-fold"):
        features.check_request(manifest, where, cross_fold=True)
    swapped = dict(models, axial=models["coronal"])
    with pytest.raises(ConfigError, match="axial features come from"):
        features.check_request(manifest, where, model_paths=swapped)
    with pytest.raises(ConfigError, match="did not finish"):
        features.check_request(dict(manifest, complete=False), where)
    with pytest.raises(DataError, match="do not match the case grid"):
        features.load_features(where, ["Case_0"], {"Case_0": (5, 5, 5)})
    with pytest.raises(DataError, match="no features for case"):
        features.load_features(where, ["Case_9"])
    with pytest.raises(DataError, match="no feature manifest"):
        features.load_manifest(tmp_path)


def test_cross_fold_features_come_from_models_that_did_not_see_the_case(setup):
    root, records, models, _ = setup
    main_train = set(json.loads((root / "main" / "axial" / "split.json").read_text())["train"])
    assert main_train == {"Case_0", "Case_1", "Case_2"}
    fold_dirs = features.write_fold_splits(models["axial"], root / "folds", 2)
    fold_lists = [json.loads(open(f"{d}/coronal/split.json").read())["train"] for d in fold_dirs]
    assert fold_lists == splits.fold_train_cases(sorted(main_train), 2, seed=0)
    assert all(set(f) < main_train for f in fold_lists) and set().union(*fold_lists) == main_train
    # Stand-ins for the trained fold models: distinct networks in those work dirs.
    folds = [handmade_2d_models(models, root / f"fold{i}", cases, seed=10 + i) for i, cases in enumerate(fold_lists)]
    manifest = features.extract_features(records, root / "features_cv", models, fold_models=folds, verbose=False)
    features.check_request(manifest, root / "features_cv", cross_fold=True)
    for case_id, entry in manifest["cases"].items():
        if case_id not in main_train:
            assert entry["source"] == "main"
            continue
        fold = int(entry["source"][4:])
        assert case_id not in fold_lists[fold]
        stored = features.load_features(root / "features_cv", [case_id])[case_id]
        case = next(reader.read_cases(records, [case_id])).prepared
        want = _reference_features(folds[fold]["sagittal"], case.image, "sagittal")
        done = ~np.isnan(want)
        np.testing.assert_allclose(stored[..., 8:][done], want[done], rtol=2e-3, atol=2e-3)


def test_interrupted_extraction_resumes(setup):
    root, records, models, _ = setup
    out = root / "features_resume"
    shutil.copytree(root / "features", out)
    manifest = json.loads((out / features.MANIFEST).read_text())
    del manifest["cases"]["Case_3"]                      # as if killed before the last case
    manifest["complete"] = False
    (out / features.MANIFEST).write_text(json.dumps(manifest))
    (out / "Case_3.tfrecord").unlink()
    kept = os.stat(out / "Case_0.tfrecord").st_mtime_ns
    resumed = features.extract_features(records, out, models, verbose=False)
    assert resumed["complete"] and sorted(resumed["cases"]) == ["Case_0", "Case_1", "Case_2", "Case_3"]
    assert os.stat(out / "Case_0.tfrecord").st_mtime_ns == kept   # not recomputed
    other = handmade_2d_models(models, root / "other", [], seed=5)
    with pytest.raises(ConfigError, match="other models"):
        features.extract_features(records, out, other, verbose=False)


def test_cli_refuses_a_model_given_for_the_wrong_orientation(setup, tmp_path):
    root, records, models, _ = setup
    result = run_module("data_prep.extract_features", f"--records_dir={records}", f"--out_dir={tmp_path / 'f'}",
                        f"--axial={models['coronal']}", f"--coronal={models['coronal']}",
                        f"--sagittal={models['sagittal']}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "trained on coronal slices, given as the axial model" in lines[-1]
    assert "Traceback" not in result.stderr


def test_feature_records_round_trip_and_refuse_damage(tmp_path):
    import tensorflow as tf
    from brats_tf.io.files import atomic_write
    from brats_tf.records import schema

    def write(case_id, array, name=None):
        path = str(tmp_path / f"{name or case_id}.tfrecord")
        atomic_write(path, lambda p: schema.write_feature_record(p, case_id, array))
        return path

    array = np.random.default_rng(0).standard_normal((7, 5, 6, 12)).astype(np.float16)
    manifest = {"format_version": features.FORMAT_VERSION, "complete": True,
                "cases": {i: {"file": f"{i}.tfrecord", "shape": list(array.shape), "source": "main"}
                          for i in ("Case_0", "Case_1", "Case_2")}}
    (tmp_path / features.MANIFEST).write_text(json.dumps(manifest))
    path = write("Case_0", array)
    assert features.feature_record_paths(tmp_path, ["Case_1", "Case_0"]) == [
        str(tmp_path / "Case_1.tfrecord"), path]
    loaded = features.load_features(tmp_path, ["Case_0"], {"Case_0": array.shape[:3]})["Case_0"]
    assert loaded.dtype == np.float16 and loaded.tobytes() == array.tobytes()      # bit-identical
    # In-graph: the stream's way of reading them.
    assert set(features.FEATURE_RECORD_SPEC) == {"case_id", "features", "shape"}
    case_id, parsed = next(iter(tf.data.TFRecordDataset(path).map(features.parse_feature_record)))
    assert case_id.numpy() == b"Case_0" and parsed.dtype == tf.float16 and parsed.shape == array.shape
    assert parsed.numpy().tobytes() == array.tobytes()
    # The stored bytes are the raw little-endian float16 array, C order.
    example = tf.io.parse_single_example(next(iter(tf.data.TFRecordDataset(path))), features.FEATURE_RECORD_SPEC)
    assert example["features"].numpy() == array.astype("<f2").tobytes()
    assert list(example["shape"].numpy()) == list(array.shape)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp.tfrecord")]     # temp name renamed
    # A record of another case under this case's name.
    write("Case_0", array, name="Case_1")
    with pytest.raises(DataError, match="Case_1.tfrecord.*not the feature record of case Case_1"):
        features.load_features(tmp_path, ["Case_1"])
    # Listed in the manifest, missing on disk.
    with pytest.raises(DataError, match="Case_2.tfrecord: cannot read features"):
        features.load_features(tmp_path, ["Case_2"])
    # Truncated.
    whole = (tmp_path / "Case_0.tfrecord").read_bytes()
    (tmp_path / "Case_2.tfrecord").write_bytes(whole[:len(whole) - 100])
    with pytest.raises(DataError, match="Case_2.tfrecord: cannot read features") as caught:
        features.load_features(tmp_path, ["Case_2"])
    assert "\n" not in str(caught.value)
    # Bytes flipped in the middle: the record's CRC fails.
    data = bytearray(whole)
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    (tmp_path / "Case_0.tfrecord").write_bytes(bytes(data))
    with pytest.raises(DataError, match="Case_0.tfrecord: cannot read features") as caught:
        features.load_features(tmp_path, ["Case_0"])
    assert "\n" not in str(caught.value)
    # A folder of the old format (.npy features) is refused by its manifest, with what to do.
    manifest["format_version"] = 1
    (tmp_path / features.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="format_version 1 is not 2; extract features with data_prep.extract_features"):
        features.load_features(tmp_path, ["Case_0"])
