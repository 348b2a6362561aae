"""`segment`: a 2D-3D chain on a held-out synthetic case (geometry, labels, volumes, the
features it recomputes equal the stored ones), the vote of several 3D models, the real
cases of ../shared/data in all three layouts, explicit files, and the refusal of a case
missing a modality."""

import json

import nibabel as nib
import numpy as np
import pytest

from brats_tf.inference import ensemble
from brats_tf.inference import exported, features
from brats_tf.inference import pipeline
from brats_tf.configs import train3d
from brats_tf.constants import LABEL_MAPS
from brats_tf.errors import DataError
from brats_tf.io.labels import map_labels
from brats_tf.training.stage3d import Trainer3D
from tests.conftest import REPO, run_module, shared_data, write_brats2017_case
from tests.test_features import export_2d_models, handmade_2d_models, make_records

LAYOUTS = REPO / "data_prep" / "layouts"


def _train_3d(records, workdir, kind, features_dir=None):
    c = train3d.get_config("small")
    c.data.records_dir = str(records)
    c.model.kind = kind
    c.model.levels, c.model.final, c.model.input_size = (2, 2, 2), 2, 47
    c.features.dir = str(features_dir) if features_dir else None
    c.data.val_cases = ["Case_3"]
    c.optim.accumulation_steps = 1
    c.train.iterations, c.train.val_every = 0, 0     # exported as initialized
    Trainer3D(c, workdir).run()
    return str(workdir)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny exported models (trained for 0-1 iterations: only the plumbing matters here): a
    2D-3D chain (three 2D models, features, model A), a standard 3D model, and a
    2-modality (t1c, flair; z-score) 2D model."""
    root = tmp_path_factory.mktemp("segment")
    records = make_records(root)
    two_d = export_2d_models(records, root / "2d", iterations=0)
    features.extract_features(records, root / "features", two_d, verbose=False)
    two_modality_records = make_records(root / "k2", modalities=["t1c", "flair"], normalization="zscore")
    k2 = export_2d_models(two_modality_records, root / "k2_2d", orientations=["axial"])
    # Narrow twins of the axial models: whole real cases in seconds.
    narrow = lambda template, name: handmade_2d_models(template, root / name, [], 0, ["axial"],
                                                       main_filters=(4, 8))["axial"]
    return {"root": root, "records": records, "data": root / "data", "features": root / "features", **two_d,
            "A": _train_3d(records, root / "A", "A", root / "features"),
            "standard": _train_3d(records, root / "standard", "standard"),
            "narrow_axial": narrow(two_d, "narrow"), "narrow_k2_axial": narrow(k2, "narrow_k2")}


def _read_seg(path):
    image = nib.load(path)
    return np.asarray(image.dataobj), image


def _check_geometry(seg_path, reference_path, labels=(0, 1, 2, 4)):
    seg, image = _read_seg(seg_path)
    reference = nib.load(reference_path)
    assert seg.shape == reference.shape
    np.testing.assert_allclose(image.affine, reference.affine, atol=1e-5)
    np.testing.assert_allclose(image.header.get_zooms()[:3], reference.header.get_zooms()[:3])
    assert set(np.unique(seg)) <= set(labels) and seg.dtype == np.uint8
    return seg


def test_chain_segments_a_held_out_case_in_its_geometry(models, tmp_path):
    # A held-out case on another grid: anisotropic 1.5 x 1 x 2 mm voxels, rotated axes.
    affine = np.array([[0, -1.0, 0, 10], [1.5, 0, 0, -20], [0, 0, 2.0, 5], [0, 0, 0, 1]])
    case_dir = write_brats2017_case(tmp_path / "new", "Held_out", shape=(26, 24, 22), seed=7, affine=affine)
    chain = [models["axial"], models["coronal"], models["sagittal"], models["A"]]
    [(case_id, written)] = pipeline.segment(chain, tmp_path / "out", case_dir=case_dir, verbose=False,
                                                save_probabilities=True, save_proportions=True, tile_size=16)
    assert case_id == "Held_out" and written["seg"] == str(tmp_path / "out" / "Held_out_seg.nii.gz")
    seg = _check_geometry(written["seg"], case_dir / "Held_out_t1.nii.gz")
    volumes = json.loads(open(written["volumes"]).read())
    internal = map_labels(seg, LABEL_MAPS["brats2017"])
    for region, classes in (("WT", [1, 2, 3]), ("TC", [1, 3]), ("ET", [3])):
        assert volumes["volumes_ml"][region] == pytest.approx(np.isin(internal, classes).sum() * 3.0 / 1000, abs=1e-4)
    probabilities = np.asarray(nib.load(written["probabilities"]).dataobj)
    assert probabilities.shape == seg.shape + (4,)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
    for name in ("tumor", "core", "enh"):
        assert nib.load(written[f"P_{name}"]).shape == seg.shape


def test_chain_recomputes_the_stored_training_features(models):
    """Prepared as model_info.json says, a records case gives back its stored features."""
    plan = exported.plan_models([models["A"], models["axial"], models["coronal"], models["sagittal"]])
    assert [m.info["kind"] for m in plan.final] == ["A"] and set(plan.chains[0]) == {"axial", "coronal", "sagittal"}
    case = pipeline.cases_from_dir(models["data"] / "Case_2")[0]
    recomputed = pipeline.chain_features(plan.chains[0], pipeline.PreparedInputs(case), 8, {})
    stored = features.load_features(models["features"], ["Case_2"])["Case_2"]
    np.testing.assert_allclose(recomputed.astype(np.float32), stored.astype(np.float32), rtol=1e-2, atol=1e-2)


def test_several_3d_models_are_fused_by_the_vote(models, tmp_path):
    case = pipeline.cases_from_dir(models["data"] / "Case_3")[0]
    plan = exported.plan_models([models["A"], models["standard"], models["axial"], models["coronal"],
                                     models["sagittal"]])
    assert [m.info["kind"] for m in plan.final] == ["A", "standard"]    # the 2D models only feed A
    single = []
    for index in range(2):
        alone = exported.Plan([plan.final[index]], [plan.chains[index]])
        written = pipeline.segment_case(case, alone, tmp_path / str(index), tile_size=32)
        single.append(map_labels(_read_seg(written["seg"])[0], LABEL_MAPS["brats2017"]))
    written = pipeline.segment_case(case, plan, tmp_path / "both", tile_size=32, save_proportions=True,
                                        label_convention="brats2023")
    want, proportions = ensemble.hierarchical_vote(single)
    np.testing.assert_array_equal(_read_seg(written["seg"])[0], want)   # 2023 convention: internal labels
    np.testing.assert_allclose(np.asarray(nib.load(written["P_tumor"]).dataobj), proportions["tumor"])


def _chain_and_standard(models, **options):
    return exported.plan_models([models["A"], models["standard"], models["axial"], models["coronal"],
                                 models["sagittal"]], **options)


def test_3d_models_run_layer_by_layer_within_the_memory_budget_else_tiled(models):
    """A grid that needs several tiles runs layer-wise within the default budget; budget 0,
    a budget below the estimate, or a grid within one tile runs tiled; both give the same
    logits and label maps."""
    case = pipeline.cases_from_dir(models["data"] / "Case_3")[0]
    plan = _chain_and_standard(models)
    shape = pipeline.PreparedInputs(case).image_for(plan.final[0]).shape
    for model in plan.final:
        assert pipeline.runs_layerwise(model, shape, tile_size=16)
        assert not pipeline.runs_layerwise(model, shape, memory_budget_gb=0, tile_size=16)
        assert not pipeline.runs_layerwise(model, shape, memory_budget_gb=1e-4, tile_size=16)
        assert not pipeline.runs_layerwise(model, shape, tile_size=max(shape[:3]))   # one tile: nothing to save
    layerwise = list(pipeline.label_maps(pipeline.PreparedInputs(case), plan, tile_size=16))
    tiled = list(pipeline.label_maps(pipeline.PreparedInputs(case), plan, tile_size=16, memory_budget_gb=0))
    for (_, labels, logits), (_, tiled_labels, tiled_logits) in zip(layerwise, tiled, strict=True):
        np.testing.assert_allclose(logits, tiled_logits, atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(labels, tiled_labels)


@pytest.mark.slow   # ~10 s; the default suite checks the bf16 mechanism in tests/test_inference.py
def test_bf16_precision_runs_every_network_in_bfloat16_and_keeps_the_segmentation_close(models, tmp_path):
    """--precision=bf16: the chain's 2D models and both 3D models compute in bfloat16 with
    float32 logits, which stay within bfloat16 rounding of the fp32 ones."""
    case = pipeline.cases_from_dir(models["data"] / "Case_3")[0]
    plans = {p: _chain_and_standard(models, precision=p) for p in ("fp32", "bf16")}
    for model in plans["bf16"].models():
        inner = {layer.compute_dtype for layer in model.layers_model.layers[1:-1]}
        assert inner == {"bfloat16"} and model.layers_model.layers[-1].compute_dtype == "float32", model.path
    runs = {p: list(pipeline.label_maps(pipeline.PreparedInputs(case), plan, tile_size=16)) for p, plan in plans.items()}
    for (_, _, reference), (_, _, logits) in zip(runs["fp32"], runs["bf16"], strict=True):
        assert logits.dtype == np.float32
        assert 0 < np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()
    [(_, written)] = pipeline.segment([models["A"]], tmp_path / "bf16", case_dir=models["data"] / "Case_3",
                                      verbose=False, precision="bf16")
    assert _read_seg(written["seg"])[0].shape == _read_seg(models["data"] / "Case_3" / "Case_3_seg.nii.gz")[0].shape


def test_a_2d3d_model_alone_finds_its_2d_models_by_recorded_path_and_hash(models, tmp_path):
    plan = exported.plan_models([models["A"]])
    assert {o: m.path for o, m in plan.chains[0].items()} == {
        o: str(models[o]) + "/model.keras" for o in ("axial", "coronal", "sagittal")}


def test_real_cases_in_every_layout(models, tmp_path):
    brats2023 = shared_data("brats2023_glioma_case", "BraTS-GLI-00001-000")
    [(_, written)] = pipeline.segment([models["narrow_axial"]], tmp_path, case_dir=brats2023, verbose=False)
    _check_geometry(written["seg"], brats2023 / "BraTS-GLI-00001-000-t1n.nii.gz")
    tcga = shared_data("tcga_peer_segmentations", "TCGA-DU-7294")
    [(_, written)] = pipeline.segment([models["narrow_axial"]], tmp_path, case_dir=tcga, verbose=False,
                                          layout_file=LAYOUTS / "tcga_bet.json")
    _check_geometry(written["seg"], tcga / "TCGA-DU-7294_t1_bet.nii.gz")
    brats2013 = shared_data("brats2013_flair_t1c", "brats_2013_pat0003_1")
    [(case_id, written)] = pipeline.segment([models["narrow_k2_axial"]], tmp_path, case_dir=brats2013, verbose=False,
                                                layout_file=LAYOUTS / "brats2013_deepmedic.json")
    seg = _check_geometry(written["seg"], brats2013 / "Flair_subtrMeanDivStd.nii.gz")
    mask = np.asarray(nib.load(brats2013 / "brainmask.nii.gz").dataobj) > 0.5
    assert case_id == "brats_2013_pat0003_1" and not seg[~mask].any()   # tumor only inside the brain mask


def test_explicit_files_from_the_command_line(models, tmp_path):
    case_dir = models["data"] / "Case_1"
    files = {m: case_dir / f"Case_1_{s}.nii.gz" for m, s in (("t1", "t1"), ("t1c", "t1ce"), ("t2", "t2"),
                                                             ("flair", "flair"))}
    result = run_module("brats_tf.segment", *[f"--{m}={p}" for m, p in files.items()],
                        f"--models={models['axial']},{models['standard']}", f"--out_dir={tmp_path}",
                        "--label_convention=brats2023", "--tile_size=32")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"Case_1: {tmp_path / 'Case_1_seg.nii.gz'}"
    _check_geometry(tmp_path / "Case_1_seg.nii.gz", files["t1"], labels=(0, 1, 2, 3))
    volumes = json.loads((tmp_path / "Case_1_volumes.json").read_text())
    assert set(volumes["volumes_ml"]) == {"WT", "TC", "ET"} and volumes["voxel_volume_ml"] == pytest.approx(0.001)
    assert len(volumes["models"]) == 2


def test_a_case_missing_a_needed_modality_is_refused(models, tmp_path):
    case_dir = models["data"] / "Case_0"
    files = {"t1": case_dir / "Case_0_t1.nii.gz", "t1c": case_dir / "Case_0_t1ce.nii.gz"}
    with pytest.raises(DataError, match=r"case Case_0 has no t2, flair image, which the 3d A "
                                        r"model .* needs \(it uses t1, t1c, t2, flair\)"):
        pipeline.segment([models["A"]], tmp_path, files=files, verbose=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_chain_on_the_real_brats2023_case_from_explicit_files(models, tmp_path):
    case = shared_data("brats2023_glioma_case", "BraTS-GLI-00001-000")
    files = {m: case / f"BraTS-GLI-00001-000-{s}.nii.gz" for m, s in
             (("t1", "t1n"), ("t1c", "t1c"), ("t2", "t2w"), ("flair", "t2f"))}
    chain = [models["axial"], models["coronal"], models["sagittal"], models["A"]]
    result = run_module("brats_tf.segment", *[f"--{m}={p}" for m, p in files.items()],
                        f"--models={','.join(chain)}", f"--out_dir={tmp_path}", "--save_probabilities")
    assert result.returncode == 0, result.stderr[-2000:]
    _check_geometry(tmp_path / "BraTS-GLI-00001-000_seg.nii.gz", files["t1"])
    assert nib.load(tmp_path / "BraTS-GLI-00001-000_probabilities.nii.gz").shape == (240, 240, 155, 4)


def test_fitted_tiles_cover_the_volume_with_as_few_tiles_and_least_padding():
    rng = np.random.default_rng(0)
    for _ in range(200):
        shape, largest = rng.integers(1, 300, size=3), int(rng.integers(1, 100))
        tile = pipeline.predict.fitted_tile_size(shape, largest)
        counts = lambda side: [-(-int(n) // side) for n in shape]
        assert tile <= largest and counts(tile) == counts(largest)
        assert tile == 1 or counts(tile - 1) != counts(largest)   # one less needs more tiles


def test_the_next_case_is_prepared_while_the_current_one_is_segmented():
    """pipeline.ahead: results in order, the next item's work running in the background
    while the caller still holds the current one; a failure surfaces at its own turn."""
    import threading
    started = {i: threading.Event() for i in range(4)}

    def work(i):
        started[i].set()
        if i == 3:
            raise DataError(f"case_{i}", "cannot be read")
        return i * 10

    results = pipeline.ahead([0, 1, 2, 3], work)
    for i in range(3):
        assert next(results) == i * 10
        assert started[i + 1].wait(timeout=10), f"item {i + 1} was not started while item {i} was in use"
    with pytest.raises(DataError, match="case_3: cannot be read"):
        next(results)
    assert list(pipeline.ahead([], work)) == []
