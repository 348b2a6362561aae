"""Re-running is harmless: a finished `brats_tf.train` re-run leaves `model.keras` byte for
byte (Keras stamps every save with its date, and 2D-3D chains and feature manifests find
their 2D models by its sha256), asking for more iterations still continues and exports
again, and a finished 2D-3D model whose features now come from other 2D models is refused."""

import hashlib
import json

import pytest

from brats_tf.configs.train2d import get_config as get_2d_config
from brats_tf.constants import ORIENTATIONS
from brats_tf.errors import ConfigError
from brats_tf.inference import features, pipeline
from brats_tf.training.stage2d import Trainer2D
from tests.conftest import run_module, write_brats2017_case
from tests.test_features import handmade_2d_models, make_records
from tests.test_segment import _train_3d

TRAIN_2D = "brats_tf/configs/train2d.py:small"


def _overrides(records, orientation, seed, iterations):
    """2D settings a command line can give too (no list fields), so the CLI re-run has the
    same config as the first, in-process, training."""
    return {"data.records_dir": str(records), "data.orientation": orientation, "model.kind": "unet_axial",
            "seed": seed, "data.batch_size": 4, "data.num_val_cases": 1, "optim.accumulation_steps": 1,
            "train.iterations": iterations, "train.val_every": 0}


def _train_2d(records, workdir, orientation, seed, iterations):
    config = get_2d_config("small")
    config.update_from_flattened_dict(_overrides(records, orientation, seed, iterations))
    return Trainer2D(config, workdir).run()


def _files(workdir):
    """The bytes of what a finished work dir exports and records."""
    return {name: (workdir / name).read_bytes() for name in ("model.keras", "model_info.json", "config.json")}


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Three trained 2D models (axial: one iteration, with a checkpoint), their features and
    a 2D-3D model A trained on them."""
    root = tmp_path_factory.mktemp("rerun")
    records = make_records(root)
    two_d = {}
    for seed, orientation in enumerate(ORIENTATIONS):
        _train_2d(records, root / orientation, orientation, seed, iterations=1 if orientation == "axial" else 0)
        two_d[orientation] = str(root / orientation)
    features.extract_features(records, root / "features", two_d, verbose=False)
    model_a = _train_3d(records, root / "A", "A", root / "features")
    return {"root": root, "records": records, "two_d": two_d, "A": model_a}


def test_rerunning_a_finished_training_keeps_model_and_chain(chain, tmp_path):
    root, records, two_d = chain["root"], chain["records"], chain["two_d"]
    axial = root / "axial"
    before, sha_before = _files(axial), _sha256(axial / "model.keras")
    assert json.loads(before["model_info.json"])["model_sha256"] == sha_before

    flags = [f"--config.{k}={v}" for k, v in _overrides(records, "axial", 0, 1).items()]
    result = run_module("brats_tf.train", f"--config={TRAIN_2D}", *flags, f"--workdir={axial}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already trained 1 iterations; model (unchanged)" in result.stdout
    assert _files(axial) == before and _sha256(axial / "model.keras") == sha_before

    # The 3D model re-run in process: the same.
    a_dir = root / "A"
    a_before = _files(a_dir)
    _train_3d(records, a_dir, "A", root / "features")
    assert _files(a_dir) == a_before

    # Features still name the 2D models, a feature re-run changes nothing, and `segment`
    # finds the chain by the hashes model A recorded.
    manifest_before = (root / "features" / features.MANIFEST).read_bytes()
    features.extract_features(records, root / "features", two_d, verbose=False)
    assert (root / "features" / features.MANIFEST).read_bytes() == manifest_before
    features.check_request(features.load_manifest(root / "features"), root / "features", None, False, two_d)
    case_dir = write_brats2017_case(tmp_path / "new", "Held_out", seed=9)
    [(case_id, written)] = pipeline.segment([*two_d.values(), chain["A"]], tmp_path / "out", case_dir=case_dir,
                                            verbose=False, tile_size=16)
    assert case_id == "Held_out" and (tmp_path / "out" / "Held_out_seg.nii.gz").is_file()


def test_more_iterations_continue_and_export_again(chain, tmp_path):
    records = chain["records"]
    workdir = tmp_path / "sagittal"
    _train_2d(records, workdir, "sagittal", 2, iterations=0)
    first = _sha256(workdir / "model.keras")
    assert _train_2d(records, workdir, "sagittal", 2, iterations=0)["reused"]
    result = _train_2d(records, workdir, "sagittal", 2, iterations=1)
    assert result["iterations"] == 1 and "reused" not in result
    info = json.loads((workdir / "model_info.json").read_text())
    assert info["iterations"] == 1 and info["model_sha256"] == _sha256(workdir / "model.keras") != first
    # A model file that is not the exported one is exported again from the checkpoint.
    (workdir / "model.keras").write_bytes(b"not the exported model")
    assert "reused" not in _train_2d(records, workdir, "sagittal", 2, iterations=1)
    assert _sha256(workdir / "model.keras") == json.loads((workdir / "model_info.json").read_text())["model_sha256"]


def test_a_finished_2d3d_model_refuses_features_of_other_2d_models(chain, tmp_path):
    records, feature_dir = chain["records"], tmp_path / "features"
    features.extract_features(records, feature_dir, chain["two_d"], verbose=False)
    _train_3d(records, tmp_path / "A", "A", feature_dir)
    other = handmade_2d_models(chain["two_d"], tmp_path / "other", [], seed=5)
    features.extract_features(records, feature_dir, other, overwrite=True, verbose=False)
    with pytest.raises(ConfigError, match="features of other 2D models"):
        _train_3d(records, tmp_path / "A", "A", feature_dir)
