"""Model bundles (`python -m brats_tf.export`, `segment --bundle`): the label map from a bundle's
SavedModels equals `segment`'s from the `.keras` models voxel for voxel (a 2D model, a 2D-3D
chain and a standard 3D model voted, on a phantom; a 2D model and the chain on the real BraTS
2023 case), without Keras model classes; what bundle.json records; modified bundles refused;
atomic writes."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from brats_tf.constants import ORIENTATIONS
from brats_tf.errors import ConfigError, DataError
from brats_tf.inference import bundle, bundle_writer, exported, features, pipeline
from brats_tf.inference.exported import NetworkShapes
from tests.conftest import REPO, run_module, shared_data, write_brats2017_case
from tests.test_features import export_2d_models, handmade_2d_models, make_records
from tests.test_segment import _train_3d

GRID, TILE = (28, 28, 24), 16   # the phantom bundle's shapes: 2D canvases of 32 x 32 / 32 x 24, 60³ tiles
REAL_CASE = ("brats2023_glioma_case", "BraTS-GLI-00001-000")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny exported models, as initialized: the three 2D models of a chain, its model A, a
    standard 3D model, and a 2D model that votes alone (a work dir without config.json)."""
    root = tmp_path_factory.mktemp("export")
    records = make_records(root)
    two_d = export_2d_models(records, root / "2d", iterations=0)
    features.extract_features(records, root / "features", two_d, verbose=False)
    alone = handmade_2d_models(two_d, root / "alone", ["Case_0", "Case_1"], 5, ["axial"])["axial"]
    return {"root": root, **two_d, "alone": alone, "A": _train_3d(records, root / "A", "A", root / "features"),
            "standard": _train_3d(records, root / "standard", "standard")}


def _vote(models, standard=False):
    """A 2D model alone and the 2D-3D chain (three 2D models, model A): two voting maps (and
    the standard 3D model's with `standard`)."""
    return [models[k] for k in ("alone", "axial", "coronal", "sagittal", "A") + (("standard",) if standard else ())]


@pytest.fixture(scope="module")
def vote_bundle(models):
    """Written by the command line."""
    out = models["root"] / "bundles" / "vote"
    result = run_module("brats_tf.export", f"--models={','.join(_vote(models))}", f"--out={out}",
                        f"--max_grid={','.join(map(str, GRID))}", f"--tile_size={TILE}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"{out}: 5 networks, 2 segmenting"
    return out


@pytest.fixture(scope="module")
def held_out(models):
    """A phantom no model saw, on another grid: anisotropic voxels, rotated axes."""
    affine = np.array([[0, -1.0, 0, 10], [1.5, 0, 0, -20], [0, 0, 2.0, 5], [0, 0, 0, 1]])
    case_dir = write_brats2017_case(models["root"] / "new", "Held_out", shape=(26, 24, 22), seed=7, affine=affine)
    return case_dir, pipeline.cases_from_dir(case_dir)[0]


@pytest.fixture(scope="module")
def keras_run(models, held_out):
    """The `.keras` models at the bundle's shapes: per-model (labels, logits) and segment's outputs."""
    plan = exported.plan_models(_vote(models), NetworkShapes(GRID, TILE, 8))
    maps = [(labels, logits) for _, labels, logits in
            pipeline.label_maps(pipeline.PreparedInputs(held_out[1]), plan, 8, TILE)]
    written = pipeline.segment_case(held_out[1], plan, models["root"] / "seg_keras", tile_size=TILE,
                                    save_probabilities=True)
    return maps, written


def _array(path):
    return np.asarray(nib.load(path).dataobj)


def test_the_bundle_gives_the_keras_label_maps_voxel_for_voxel(models, vote_bundle, held_out, keras_run, tmp_path):
    loaded = bundle.load_bundle(vote_bundle)
    assert [m.info["kind"] for m in loaded.plan.final] == ["unet_axial", "A"]
    assert [sorted(c) if c else None for c in loaded.plan.chains] == [None, ["axial", "coronal", "sagittal"]]
    maps, keras_written = keras_run
    bundle_maps = list(pipeline.label_maps(pipeline.PreparedInputs(held_out[1]), loaded.plan, 8, TILE))
    for (labels, logits), (model, bundle_labels, bundle_logits) in zip(maps, bundle_maps, strict=True):
        np.testing.assert_array_equal(bundle_logits, logits)
        np.testing.assert_array_equal(bundle_labels, labels)
        assert len(np.unique(labels)) > 1, f"{model.describe()}: a trivial label map proves nothing"
    written = pipeline.segment_case(held_out[1], loaded.plan, tmp_path, save_probabilities=True,
                                    **loaded.segment_options({}))
    seg = _array(written["seg"])
    np.testing.assert_array_equal(seg, _array(keras_written["seg"]))
    assert set(np.unique(seg)) > {0}
    np.testing.assert_array_equal(_array(written["probabilities"]), _array(keras_written["probabilities"]))
    np.testing.assert_array_equal(nib.load(written["seg"]).affine, nib.load(held_out[0] / "Held_out_t1.nii.gz").affine)


def test_bundle_json_records_how_to_run_the_networks(models, vote_bundle):
    manifest = json.loads((vote_bundle / "bundle.json").read_text())
    assert manifest["versions"]["tensorflow"] == tf.__version__ and manifest["versions"]["brats_tf"]
    assert manifest["input"]["modalities"] == ["t1", "t1c", "t2", "flair"]
    assert manifest["labels"]["output_values"]["brats2017"]["3"] == 4 and manifest["labels"]["regions"]["ET"] == [3]
    assert manifest["shapes"]["max_grid"] == list(GRID) and manifest["shapes"]["tile_size"] == TILE
    assert manifest["segmentation"]["vote"]["thresholds"] == [0.4, 0.3, 0.4]
    networks = {n["id"]: n for n in manifest["networks"]}
    for network in networks.values():
        assert network["preprocessing"] == {"normalization": "median", "median_scale": 2.0, "crop_margin": 4,
                                            "modalities": ["t1", "t1c", "t2", "flair"]}
        saved = tf.saved_model.load(str(vote_bundle / network["dir"]))
        spec = saved.signatures["logits"].structured_input_signature[1]["image"]
        assert spec.shape.is_fully_defined() and list(spec.shape) == network["signature"]["inputs"]["image"]["shape"]
        assert network["signature"]["export_check_max_abs_difference"] == 0.0
    chain_entry = manifest["segmentation"]["final"][1]
    model_a = networks[chain_entry["network"]]
    assert model_a["receptive_field"] == 45 and model_a["margin"] == 22 and model_a["feature_dtype"] == "float16"
    assert model_a["input_channels"][3:6] == ["flair", "axial:non-tumor", "axial:ncr/net"]
    assert model_a["signature"]["inputs"]["image"]["shape"] == [1, TILE + 44, TILE + 44, TILE + 44, 16]
    trained_on = model_a["model_info"]["features"]["models"]   # the chain: the 2D models A was trained on
    for orientation, network_id in chain_entry["chain"].items():
        assert networks[network_id]["source"]["sha256"] == trained_on[orientation]["sha256"]
        assert networks[network_id]["signature"]["inputs"]["image"]["shape"][0] == 8
    axial = networks[chain_entry["chain"]["axial"]]
    assert axial["signature"]["inputs"]["image"]["shape"] == [8, 32, 32, 4]                # 28 -> multiple of 8
    assert networks[chain_entry["chain"]["sagittal"]]["signature"]["inputs"]["image"]["shape"] == [8, 32, 24, 4]
    training = model_a["training"]
    assert training["split"]["num_train"] == 3 and training["split"]["val"] == ["Case_3"]
    assert training["records"]["layout"] == "brats2017" and training["records"]["num_cases"] == 4
    assert training["records"]["spacing_mm"] == [[1.0, 1.0, 1.0]] and training["preset"] == "small"
    assert training["config"]["model"]["kind"] == "A" and training["features"]["kind"] == "unet_axial"
    assert networks[manifest["segmentation"]["final"][0]["network"]]["training"]["config"] is None   # handmade
    assert [r["num_cases"] for r in manifest["training_data"]] == [4]
    files = sorted(os.path.relpath(os.path.join(d, f), vote_bundle) for d, _, fs in os.walk(vote_bundle) for f in fs)
    assert sorted(manifest["files"]) == [f for f in files if f != "bundle.json"]
    for relative, digest in manifest["files"].items():
        assert exported.file_sha256(vote_bundle / relative) == digest


def test_segment_bundle_on_the_command_line_loads_no_model_classes(models, vote_bundle, held_out, keras_run, tmp_path):
    script = (
        "import runpy, sys, keras\n"
        "def refuse(*a, **k): raise AssertionError('a Keras model was loaded')\n"
        "keras.models.load_model = keras.saving.load_model = refuse\n"
        f"sys.argv = ['segment', '--bundle={vote_bundle}', '--case_dir={held_out[0]}', '--out_dir={tmp_path}']\n"
        "try:\n    runpy.run_module('brats_tf.segment', run_name='__main__')\n"
        "except SystemExit as exit:\n    code = exit.code\n"
        "loaded = [m for m in sys.modules if m.startswith(('brats_tf.models', 'brats_tf.inference.bundle_writer',"
        " 'brats_tf.inference.features', 'brats_tf.training'))]\n"
        "print('MODULES', loaded)\nsys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [f"Held_out: {tmp_path / 'Held_out_seg.nii.gz'}", "MODULES []"]
    np.testing.assert_array_equal(_array(tmp_path / "Held_out_seg.nii.gz"), _array(keras_run[1]["seg"]))


def test_a_modified_bundle_is_refused_in_one_line_naming_the_file(vote_bundle, held_out, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(vote_bundle, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    weights = sorted(f for f in manifest["files"] if f.endswith(".data-00000-of-00001"))[0]
    data = bytearray((copy / weights).read_bytes())
    data[len(data) // 2] ^= 1
    (copy / weights).write_bytes(bytes(data))
    result = run_module("brats_tf.segment", f"--bundle={copy}", f"--case_dir={held_out[0]}",
                        f"--out_dir={tmp_path / 'o'}")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {copy / weights}: modified since export (sha256 {exported.file_sha256(copy / weights)[:12]}..., "
        f"bundle.json records {manifest['files'][weights][:12]}...)"]
    assert not (tmp_path / "o").exists()
    shutil.copy(vote_bundle / weights, copy / weights)
    bundle.verify_bundle(copy)   # restored: fine again
    (copy / "networks" / "notes.txt").write_text("extra")
    with pytest.raises(DataError, match=r"notes.txt: not part of the bundle"):
        bundle.load_bundle(copy)
    os.remove(copy / "networks" / "notes.txt")
    fingerprint = sorted(f for f in manifest["files"] if f.endswith("fingerprint.pb"))[0]
    os.remove(copy / fingerprint)
    with pytest.raises(DataError, match=rf"{fingerprint}: missing from the bundle"):
        bundle.load_bundle(copy)
    shutil.copy(vote_bundle / fingerprint, copy / fingerprint)
    manifest["segmentation"]["vote"]["thresholds"] = [0.5, 0.5, 0.5]
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"bundle.json: modified since export"):
        bundle.load_bundle(copy)


def test_segment_refuses_what_the_bundle_fixes_and_cases_beyond_its_grid(models, vote_bundle, tmp_path):
    big = write_brats2017_case(tmp_path / "big", "Big", shape=(40, 26, 20))
    with pytest.raises(ConfigError, match=r"--tile_size=32: the bundle .* runs with tile_size 16"):
        pipeline.segment(None, tmp_path / "o", case_dir=big, bundle=vote_bundle, tile_size=32, verbose=False)
    with pytest.raises(ConfigError, match="not both"):
        pipeline.segment([models["A"]], tmp_path / "o", case_dir=big, bundle=vote_bundle, verbose=False)
    with pytest.raises(DataError, match=r"Big: brain-cropped grid 40x26x20 is larger than the 28x28x24"):
        pipeline.segment(None, tmp_path / "o", case_dir=big, bundle=vote_bundle, thresholds="0.4,0.3,0.4",
                         verbose=False)
    assert not (tmp_path / "o").exists()


def test_export_builds_beside_the_target_and_replaces_a_bundle_only_when_asked(models, tmp_path, monkeypatch):
    out = tmp_path / "b"
    first = bundle_writer.export_bundle([models["alone"]], out, max_grid=GRID, verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    with pytest.raises(ConfigError, match=r"b: exists; pass --overwrite"):
        bundle_writer.export_bundle([models["alone"]], out, max_grid=GRID, verbose=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("a user's file")
    with pytest.raises(ConfigError, match="mine: exists and is not a model bundle"):
        bundle_writer.export_bundle([models["alone"]], tmp_path / "mine", overwrite=True, verbose=False)
    # A failure half way leaves no temporary folder, and the old bundle as it was.
    def half_written(model, folder, input_shape):
        os.makedirs(folder)
        open(os.path.join(folder, "saved_model.pb"), "w").close()
        raise OSError("disk full")
    monkeypatch.setattr(bundle_writer, "_write_saved_model", half_written)
    with pytest.raises(OSError, match="disk full"):
        bundle_writer.export_bundle([models["alone"]], out, max_grid=GRID, overwrite=True, verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "mine"]
    assert bundle.verify_bundle(out) == first
    monkeypatch.undo()
    (out / "notes.txt").write_text("not part of the bundle")
    manifest = bundle_writer.export_bundle([models["alone"]], out, max_grid=(40, 28, 24), overwrite=True, verbose=False)
    assert bundle.verify_bundle(out) == manifest and manifest["shapes"]["max_grid"] == [40, 28, 24]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]   # the replaced bundle's stray file is kept
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("b", "mine") and p not in kept] == []
    assert [f.read_text() for f in kept[0].rglob("notes.txt")] == ["not part of the bundle"]
    assert (tmp_path / "mine" / "keep.txt").read_text() == "a user's file"


# --- the real BraTS 2023 case ---------------------------------------------------------------------

def _same_on_the_real_case(paths, out, tmp_path, **shapes):
    case_dir = shared_data(*REAL_CASE)
    bundle_writer.export_bundle(paths, out, verbose=False, **shapes)
    loaded = bundle.load_bundle(out)
    [(_, from_bundle)] = pipeline.segment(None, tmp_path / "bundle", case_dir=case_dir, bundle=out, verbose=False)
    keras_shapes = {"max_grid": loaded.shapes.max_grid, "tile_size": loaded.shapes.tile_size}
    [(_, from_keras)] = pipeline.segment(paths, tmp_path / "keras", case_dir=case_dir, verbose=False, **keras_shapes)
    seg = _array(from_bundle["seg"])
    np.testing.assert_array_equal(seg, _array(from_keras["seg"]))
    assert seg.shape == (240, 240, 155) and len(np.unique(seg)) > 1
    return seg


def test_the_bundle_gives_the_keras_label_map_on_the_real_brats2023_case(models, tmp_path):
    shared_data(*REAL_CASE)
    narrow = handmade_2d_models({"axial": models["axial"]}, tmp_path / "narrow", [], 0, ["axial"],
                                main_filters=(4, 8))["axial"]
    _same_on_the_real_case([narrow], tmp_path / "bundle_2d", tmp_path)   # default max_grid 240,240,160


@pytest.mark.slow
def test_the_chain_and_vote_bundle_on_the_real_brats2023_case(models, tmp_path):
    """Narrow twins of the chain's 2D models (each its own seed: distinct files) and a copy of
    model A naming them as its feature models; voted with a narrow 2D model and the standard
    3D model; default shapes (240 x 240 x 160 grid, 64³ tiles)."""
    shared_data(*REAL_CASE)
    narrow = {o: handmade_2d_models(models, tmp_path / "narrow", [], seed, [o], main_filters=(4, 8))[o]
              for seed, o in enumerate(ORIENTATIONS)}
    alone = handmade_2d_models({"axial": models["axial"]}, tmp_path / "alone", [], 7, ["axial"],
                               main_filters=(4, 8))["axial"]
    model_a = tmp_path / "A"
    model_a.mkdir()
    shutil.copy(os.path.join(models["A"], "model.keras"), model_a / "model.keras")
    info = json.loads(open(os.path.join(models["A"], "model_info.json")).read())
    info["features"]["models"] = {o: {"path": os.path.join(p, "model.keras"),
                                      "sha256": exported.file_sha256(os.path.join(p, "model.keras"))}
                                  for o, p in narrow.items()}
    (model_a / "model_info.json").write_text(json.dumps(info))
    paths = [alone, *narrow.values(), str(model_a), models["standard"]]
    _same_on_the_real_case(paths, tmp_path / "bundle_vote", tmp_path)


def test_a_bundle_runs_in_float32_only(vote_bundle, held_out, tmp_path):
    with pytest.raises(ConfigError, match=r"^--precision=bf16: a bundle's SavedModels run in the float32"):
        pipeline.segment(None, tmp_path / "o", case_dir=held_out[0], bundle=vote_bundle, precision="bf16")
    assert not (tmp_path / "o").exists()
