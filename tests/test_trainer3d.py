"""The 3D trainer: presets, a 2D-3D model A trained on stored features (patches hold every
class and the right feature voxels), resume, refusal of mismatched features, the
`brats_tf.train` dispatch by config.stage, and the pooled design trained, exported and
segmenting a case."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from brats_tf.inference import bundle_writer, exported, features, pipeline
from brats_tf.configs import train3d
from brats_tf.errors import ConfigError
from brats_tf.models import unet3d
from brats_tf.records import reader
from brats_tf.training.stage3d import Trainer3D
from brats_tf.training.loop import record_config
from tests.conftest import run_module, write_brats2017_case
from tests.test_features import export_2d_models, make_records


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer3d")
    records = make_records(root)
    models = export_2d_models(records, root / "2d")
    features.extract_features(records, root / "features", models, verbose=False)
    return records, root / "features", models


def _config(records, kind="standard", features_dir=None, iterations=2):
    c = train3d.get_config("small")
    c.data.records_dir = str(records)
    c.model.kind = kind
    c.model.levels, c.model.final = (2, 3, 4), 3     # tiny widths; the receptive field is fixed
    c.model.input_size = 49                          # 5³ labels per patch
    c.features.dir = str(features_dir) if features_dir else None
    c.data.val_cases = ["Case_3"]
    c.optim.accumulation_steps = 2
    c.train.iterations = iterations
    c.train.checkpoint_every = 1
    c.train.val_every = 2
    c.train.tile_size = 32
    return c


def test_presets_say_what_their_names_say():
    paper, small = train3d.get_config("paper"), train3d.get_config("small")
    for c in (paper, small):
        assert c.stage == "3d" and tuple(c.loss.target_weights) == (0.4, 0.2, 0.2, 0.2)
        assert c.optim.accumulation_steps == 5 and c.data.batch_size >= 4
        assert unet3d.output_size(c.model.input_size) == c.model.input_size - 44
        assert c.model.design == "atrous"
    assert paper.model.input_size == 70 and paper.model.preset == "paper"
    # The paper's batch of 5 patches in 5 parts (the same update; fits 16 GB on a CPU).
    assert (paper.data.batch_size, paper.train.micro_batches, small.train.micro_batches) == (5, 5, 1)
    assert (paper.optim.learning_rate, paper.optim.min_learning_rate, paper.optim.period,
            paper.optim.decrease_ratio) == (0.25, 0.001, 200, 0.98)
    with pytest.raises(ValueError):
        train3d.get_config("huge")


def test_model_a_trains_on_features_and_records_its_chain(data, tmp_path):
    records, features_dir, models = data
    trainer = Trainer3D(_config(records, "A", features_dir), tmp_path)
    result = trainer.run()
    assert result["iterations"] == 2
    assert set(result["validation"]) == {"val_dice_ncr_net", "val_dice_edema", "val_dice_enhancing"}
    # Patches: image channels then the 12 stored feature channels of the same voxel (the
    # patch center's 16 values are some training voxel's), every class in every batch.
    split = json.loads((tmp_path / "split.json").read_text())
    stored = features.load_features(features_dir, split["train"])
    voxels = np.concatenate([
        np.concatenate([case.prepared.image.astype(np.float32), stored[case.prepared.case_id].astype(np.float32)],
                       axis=-1).reshape(-1, 16)
        for case in reader.read_cases(records, split["train"])])
    for x, y in trainer.sampler.dataset(num_batches=5).as_numpy_iterator():
        assert x.shape == (4, 49, 49, 49, 4 + 12) and y.shape == (4, 5, 5, 5)
        assert set(np.unique(y)) == {0, 1, 2, 3}
        for patch in x:
            if patch[24, 24, 24].any():     # a center in the zero padding matches no voxel
                assert (voxels == patch[24, 24, 24]).all(axis=1).any()
    info = json.loads((tmp_path / "model_info.json").read_text())
    assert info["stage"] == "3d" and info["kind"] == "A" and info["receptive_field"] == 45
    assert info["num_features"] == 12 and info["output_size"] == 5 and info["modalities"] == ["t1", "t1c", "t2", "flair"]
    for orientation, path in models.items():
        assert info["features"]["models"][orientation]["sha256"] == exported.file_sha256(f"{path}/model.keras")
    assert info["preprocessing"]["normalization"] == "median"
    assert (tmp_path / "model.keras").is_file() and (tmp_path / "tensorboard").is_dir()


def test_rerun_resumes_the_standard_model(data, tmp_path):
    records, _, _ = data
    Trainer3D(_config(records, iterations=1), tmp_path).run()
    result = Trainer3D(_config(records, iterations=2), tmp_path).run()
    assert result["iterations"] == 2
    with open(tmp_path / "train_log.csv") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [1, 2]
    info = json.loads((tmp_path / "model_info.json").read_text())
    assert info["kind"] == "standard" and info["num_features"] == 0 and info["features"] is None


def test_mismatched_or_missing_features_are_refused(data, tmp_path):
    records, features_dir, models = data
    config = _config(records, "B", features_dir)
    config.features.kind = "model1"          # the features come from unet_axial models
    with pytest.raises(ConfigError, match="the config asks for model1"):
        Trainer3D(config, tmp_path / "a").run()
    config = _config(records, "C", features_dir)
    config.features.models = ",".join([models["sagittal"], models["coronal"], models["axial"]])
    with pytest.raises(ConfigError, match="axial features come from"):
        Trainer3D(config, tmp_path / "b").run()
    with pytest.raises(ConfigError, match="needs --config.features.dir"):
        Trainer3D(_config(records, "A"), tmp_path / "c").run()


def test_train_command_dispatches_to_the_3d_trainer(data, tmp_path):
    records, _, _ = data
    result = run_module("brats_tf.train", "--config=brats_tf/configs/train3d.py:small", f"--workdir={tmp_path}",
                        f"--config.data.records_dir={records}", "--config.model.kind=standard",
                        "--config.model.levels=(2,2,2)", "--config.model.final=2", "--config.model.input_size=45",
                        "--config.train.iterations=1", "--config.optim.accumulation_steps=1",
                        "--config.train.val_every=0", "--config.train.tile_size=32",
                        "--config.data.num_val_cases=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained 1 iterations" in result.stdout
    assert json.loads((tmp_path / "model_info.json").read_text())["stage"] == "3d"


@pytest.mark.slow   # ~7 s; the default suite builds, sizes and tiles pooled models (test_unet3d, test_inference)
def test_pooled_design_trains_exports_and_segments_a_case(data, tmp_path):
    """model.design=pooled: 48³ patches give 8³ labels; validation and `segment` tile it on
    its grid of 4 (tile_size 18 -> tiles of at most 16), at the case's shapes, at fixed
    network shapes (--max_grid) and from a bundle alike; model_info.json and bundle.json
    record what tiling needs."""
    records, _, _ = data
    config = _config(records, iterations=1)
    config.model.design, config.model.input_size, config.train.val_every = "pooled", 48, 1
    trainer = Trainer3D(config, tmp_path / "pooled")
    result = trainer.run()
    assert result["iterations"] == 1 and set(result["validation"]) == {"val_dice_ncr_net", "val_dice_edema",
                                                                      "val_dice_enhancing"}
    x, y = next(trainer.sampler.dataset(num_batches=1).as_numpy_iterator())
    assert x.shape == (4, 48, 48, 48, 4) and y.shape == (4, 8, 8, 8)
    info = json.loads((tmp_path / "pooled" / "model_info.json").read_text())
    assert {k: info[k] for k in ("design", "input_size", "output_size", "receptive_field", "margin", "period")} == \
        {"design": "pooled", "input_size": 48, "output_size": 8, "receptive_field": 44, "margin": 20, "period": 4}
    case_dir = write_brats2017_case(tmp_path / "new", "Held_out", shape=(26, 24, 22), seed=7)
    model = [str(tmp_path / "pooled")]
    manifest = bundle_writer.export_bundle(model, tmp_path / "bundle", max_grid=(40, 40, 40), tile_size=18,
                                           verbose=False)
    [entry] = manifest["networks"]
    assert (entry["design"], entry["margin"], entry["period"], entry["receptive_field"]) == ("pooled", 20, 4, 44)
    assert entry["signature"]["inputs"]["image"]["shape"] == [1, 56, 56, 56, 4]   # 16 + 40
    segs = []
    for out, options in (("out", {"models": model}), ("fixed", {"models": model, "max_grid": "40,40,40"}),
                         ("bundle", {"models": None, "bundle": str(tmp_path / "bundle")})):
        [(_, written)] = pipeline.segment(out_dir=tmp_path / out, case_dir=case_dir, verbose=False, tile_size=18,
                                          **options)
        image = nib.load(written["seg"])
        segs.append(np.asarray(image.dataobj))
        assert image.shape == (26, 24, 22) and set(np.unique(segs[-1])) <= {0, 1, 2, 4}
    np.testing.assert_array_equal(segs[0], segs[1])
    np.testing.assert_array_equal(segs[0], segs[2])


def test_pooled_design_refuses_sizes_off_its_grid(data, tmp_path):
    records, _, _ = data
    config = _config(records)
    config.model.design = "pooled"                   # input_size 49
    with pytest.raises(ConfigError, match=r"model.input_size=49: .*not a multiple of 4.*use 48 or 52"):
        Trainer3D(config, tmp_path / "a").run()
    config.model.design = "strided"
    with pytest.raises(ConfigError, match="model.design='strided'"):
        Trainer3D(config, tmp_path / "b").run()


def test_a_work_dir_from_before_the_design_field_resumes_as_atrous(tmp_path):
    """Every 3D model was à trous before model.design existed: such a work dir resumes with
    the default, and refuses the pooled design."""
    config = train3d.get_config("small")
    path = tmp_path / "config.json"
    record_config(tmp_path, config)
    recorded = json.loads(path.read_text())
    del recorded["model"]["design"]                  # as written before the field existed
    path.write_text(json.dumps(recorded))
    record_config(tmp_path, config)                  # accepted
    path.write_text(json.dumps(recorded))
    config.model.design = "pooled"
    with pytest.raises(ConfigError, match="another config"):
        record_config(tmp_path, config)
