"""Missing sequences (issue 15): 2D models built with a `present` input, whose missing
sequences' subnetworks contribute exactly nothing, and sequence dropout in the slice stream."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from brats_tf.configs.train2d import get_config
from brats_tf.errors import ConfigError
from brats_tf.inference import predict
from brats_tf.configs import train3d
from brats_tf.models import unet2d, unet3d
from brats_tf.records import streams
from brats_tf.records.writer import build_records
from brats_tf.training.stage2d import Trainer2D
from brats_tf.training.stage3d import Trainer3D
from tests.conftest import write_brats2017_case

SEQUENCES = ("t1", "t1c", "t2", "flair")


@pytest.mark.parametrize("kind", ["model1", "model2"])
def test_a_missing_sequence_changes_nothing_in_any_output(kind):
    model = unet2d.build_2d_model(kind, SEQUENCES, presence=True)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 32, 32, 4)).astype(np.float32)
    present = np.array([[1, 0, 1, 1], [1, 1, 1, 0], [0, 0, 1, 0]], np.float32)
    changed = image.copy()
    changed[0, ..., 1] = rng.normal(size=(32, 32)) * 50      # what a missing slot holds is ignored
    changed[1, ..., 3] = 7.0
    changed[2, ..., [0, 1, 3]] = -3.0
    before = model({"image": image, "present": present})
    after = model({"image": changed, "present": present})
    for name, a, b in zip(model.output_names, before, after):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    # A missing sequence's auxiliary head says nothing (zero logits), a present one's does.
    aux_t1c = np.asarray(before[1 + SEQUENCES.index("t1c")])
    assert not aux_t1c[0].any() and aux_t1c[1].any()
    # ...and a present sequence does change the output.
    moved = image.copy()
    moved[0, ..., 0] += 1.0
    assert np.abs(np.asarray(model({"image": moved, "present": present})[0])[0] - np.asarray(before[0])[0]).max() > 0


def test_no_gradient_reaches_a_missing_sequences_subnetwork():
    model = unet2d.build_2d_model("model1", SEQUENCES, presence=True)
    image = tf.random.stateless_normal((2, 32, 32, 4), [1, 2])
    present = tf.constant([[1, 0, 1, 1], [1, 0, 1, 0]], tf.float32)     # T1c missing in the batch
    with tf.GradientTape() as tape:
        outputs = model({"image": image, "present": present}, training=True)
        loss = tf.add_n([tf.reduce_mean(tf.square(o - 1.0)) for o in outputs])
    weights = [w for w in model.trainable_weights if w.path.startswith(("sub_t1c.", "aux_t1c"))]
    grads = tape.gradient(loss, weights)
    assert weights and all(not np.asarray(g).any() for g in grads)


def test_the_gated_model_saves_and_loads():
    model = unet2d.build_2d_model("model2", SEQUENCES, presence=True)
    x = {"image": np.ones((1, 16, 16, 4), np.float32), "present": np.array([[0, 1, 1, 1]], np.float32)}
    path = "/tmp/_gated_model_test.keras"
    model.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_array_equal(np.asarray(again(x)[0]), np.asarray(model(x)[0]))
    assert [i.name for i in again.inputs] == ["image", "present"]


def test_sequence_dropout_never_drops_every_sequence_and_never_invents_one():
    present = tf.constant(np.random.default_rng(1).random((4000, 4)) < 0.7)
    present = tf.where(tf.reduce_any(present, 1, keepdims=True), present, [[True, False, False, False]])
    kept = streams.drop_sequences([3, 4], present, 0.5).numpy().astype(bool)
    assert kept.any(axis=1).all()                       # never all dropped
    assert not (kept & ~present.numpy()).any()          # a missing sequence stays missing
    rate = 1 - kept.sum() / present.numpy().sum()
    assert 0.40 < rate < 0.5                            # p = 0.5, less the rows kept from all-dropped
    again = streams.drop_sequences([3, 4], present, 0.5).numpy().astype(bool)
    np.testing.assert_array_equal(kept, again)          # seeded
    assert streams.drop_sequences([3, 4], present, 0.0).numpy().astype(bool).tolist() == present.numpy().tolist()


@pytest.fixture(scope="module")
def records_with_a_missing_sequence(tmp_path_factory):
    root = tmp_path_factory.mktemp("missing")
    for i in range(4):
        write_brats2017_case(root / "data", f"Case_{i}", shape=(24, 26, 20), seed=i)
    (root / "data" / "Case_3" / "Case_3_t1ce.nii.gz").unlink()          # one case lacks T1c
    build_records(root / "data", root / "records", allow_missing_modalities=True, verbose=False)
    return root / "records"


def test_the_slice_stream_carries_the_presence_mask(records_with_a_missing_sequence):
    source = streams.case_source(str(records_with_a_missing_sequence), [f"Case_{i}" for i in range(4)])
    stream = streams.SliceStream(source, "axial", 8, (24, 32), seed=5, sequence_dropout=0.3, window_cases=4)
    spec = stream.dataset().element_spec[0]
    assert spec["image"].shape == (8, 24, 32, 4) and spec["present"].shape == (8, 4)
    dropped_some = False
    for b in range(20):
        x, _ = stream.batch(b)
        present = x["present"].astype(bool)
        assert present.any(axis=1).all()
        channel_used = np.abs(x["image"]).reshape(8, -1, 4).max(axis=1) > 0
        assert not (channel_used & ~present).any()       # dropped or missing: zero-filled
        dropped_some |= bool((~present).any())
    assert dropped_some
    first, _ = stream.batch(3)
    np.testing.assert_array_equal(first["present"], streams.SliceStream(
        source, "axial", 8, (24, 32), seed=5, sequence_dropout=0.3, window_cases=4).batch(3)[0]["present"])
    # The case lacking T1c never shows it present.
    lone = streams.case_source(str(records_with_a_missing_sequence), ["Case_3"])
    x, _ = streams.SliceStream(lone, "axial", 4, (24, 32), seed=0, sequence_dropout=0.0, window_cases=1).batch(0)
    assert (x["present"][:, SEQUENCES.index("t1c")] == 0).all() and (x["present"][:, 0] == 1).all()


@pytest.mark.parametrize("kind", ["standard", "B"])
def test_a_3d_models_missing_image_channel_changes_nothing(kind):
    """3D models: a missing sequence's channel is zero-filled whatever it holds, and the
    presence channels change the output (the model knows which sequences it sees)."""
    features = 0 if kind == "standard" else 3
    keras.utils.set_random_seed(3)
    model = unet3d.build_3d_model(kind, 4, features, levels=(4, 4, 4), final=8, presence=True)
    assert [i.name for i in model.inputs] == ["patch", "present"]
    rng = np.random.default_rng(2)
    patch = rng.normal(size=(2, 46, 46, 46, 4 + features)).astype(np.float32)
    present = np.array([[1, 0, 1, 1], [0, 0, 0, 1]], np.float32)
    changed = patch.copy()
    changed[0, ..., 1] = 40.0
    changed[1, ..., :3] = rng.normal(size=(46, 46, 46, 3)) * 9
    before = np.asarray(model({"patch": patch, "present": present})[0])
    np.testing.assert_array_equal(before, np.asarray(model({"patch": changed, "present": present})[0]))
    zeroed = patch * np.concatenate([present, np.ones((2, features), np.float32)], 1)[:, None, None, None]
    other = np.asarray(model({"patch": zeroed, "present": np.ones((2, 4), np.float32)})[0])
    assert before.any() and np.abs(other - before).max() > 0     # same zeros, told "present": another output


@pytest.fixture(scope="module")
def features_for_missing_records(records_with_a_missing_sequence):
    """Three feature channels per case (made-up values; the stream only joins them)."""
    import json
    from brats_tf.records import schema
    root = records_with_a_missing_sequence.parent / "features"
    root.mkdir(exist_ok=True)
    manifest = json.loads((records_with_a_missing_sequence / "manifest.json").read_text())
    paths = {}
    for case in manifest["cases"]:
        shape = tuple(b - a for a, b in zip(case["crop"]["start"], case["crop"]["stop"]))
        path = root / f"{case['case_id']}.tfrecord"
        schema.write_feature_record(str(path), case["case_id"], np.full(shape + (3,), 0.5, np.float16))
        paths[case["case_id"]] = str(path)
    return paths


def test_the_patch_stream_carries_the_presence_mask(records_with_a_missing_sequence, features_for_missing_records):
    ids = [f"Case_{i}" for i in range(4)]
    source = streams.case_source(str(records_with_a_missing_sequence), ids,
                                 feature_paths=features_for_missing_records, num_features=3)
    stream = streams.PatchStream(source, 20, 8, 6, seed=1, sequence_dropout=0.4, window_cases=4)
    spec = stream.dataset().element_spec[0]
    assert spec["patch"].shape == (6, 20, 20, 20, 7) and spec["present"].shape == (6, 4)
    dropped_some = False
    for b in range(12):
        x, _ = stream.batch(b)
        present = x["present"].astype(bool)
        assert present.any(axis=1).all()
        used = np.abs(x["patch"]).reshape(6, -1, 7).max(axis=1) > 0
        assert not (used[:, :4] & ~present).any()    # dropped or missing image channels: zero
        assert used[:, 4:].all()                       # feature channels are never dropped
        dropped_some |= bool((~present).any())
    assert dropped_some
    lone = streams.case_source(str(records_with_a_missing_sequence), ["Case_3"])
    x, _ = streams.PatchStream(lone, 20, 8, 4, seed=0, sequence_dropout=0.0, window_cases=1).batch(0)
    assert (x["present"][:, SEQUENCES.index("t1c")] == 0).all() and (x["present"][:, 0] == 1).all()


@pytest.fixture(scope="module")
def dropout_models(records_with_a_missing_sequence, tmp_path_factory):
    """A 2D model 1 and a standard 3D model trained (briefly) with sequence dropout on
    records where a case lacks T1c: {"2d": dir, "3d": dir}."""
    root = tmp_path_factory.mktemp("dropout_models")
    config2d = get_config("small_dropout")
    config3d = train3d.get_config("small_dropout")
    config3d.model.kind, config3d.model.input_size, config3d.model.levels, config3d.model.final = \
        "standard", 50, (2, 2, 2), 2
    for config in (config2d, config3d):
        config.data.records_dir = str(records_with_a_missing_sequence)
        config.data.batch_size, config.data.val_cases = 4, ["Case_0"]
        config.train.iterations, config.optim.accumulation_steps, config.train.val_every = 2, 1, 2
    Trainer2D(config2d, root / "2d").run()
    Trainer3D(config3d, root / "3d").run()
    return {"2d": str(root / "2d"), "3d": str(root / "3d")}


@pytest.mark.slow
def test_a_3d_model_trained_with_sequence_dropout_segments_without_a_sequence(records_with_a_missing_sequence,
                                                                               dropout_models, tmp_path, capsys):
    """The standard 3D model with sequence dropout: trained on records where a case lacks T1c,
    `segment` runs it on that case (gated), saying so."""
    import json
    from brats_tf.inference import pipeline
    model = keras.models.load_model(f"{dropout_models['3d']}/model.keras")
    assert [i.name for i in model.inputs] == ["patch", "present"]
    capsys.readouterr()
    data = records_with_a_missing_sequence.parent / "data"
    pipeline.segment([dropout_models["3d"]], tmp_path / "out", case_dir=str(data / "Case_3"))
    assert capsys.readouterr().out.splitlines()[0] == \
        "Case_3: no t1c image; 1 model(s) trained with sequence dropout gate them out"
    volumes = json.loads((tmp_path / "out" / "Case_3_volumes.json").read_text())
    assert volumes["missing_sequences"]["handling"] == {f"{dropout_models['3d']}/model.keras": "gated"}


@pytest.mark.slow
def test_a_bundle_of_dropout_models_takes_present_and_gives_the_keras_labels(records_with_a_missing_sequence,
                                                                             dropout_models, tmp_path):
    """Bundles: networks trained with sequence dropout get a `present` signature input; on a
    case lacking T1c the bundle's label map equals the Keras models' voxel for voxel."""
    import nibabel as nib
    from brats_tf.inference import bundle, bundle_writer, pipeline
    paths = [dropout_models["2d"], dropout_models["3d"]]
    manifest = bundle_writer.export_bundle(paths, tmp_path / "bundle", max_grid=(32, 32, 32), tile_size=16,
                                           verbose=False)
    for entry in manifest["networks"]:
        inputs = entry["signature"]["inputs"]
        assert inputs["present"]["shape"] == [inputs["image"]["shape"][0], 4]
        assert entry["signature"]["export_check_max_abs_difference"] == 0
    case_dir = str(records_with_a_missing_sequence.parent / "data" / "Case_3")
    keras_out = pipeline.segment(paths, tmp_path / "keras", case_dir=case_dir, max_grid=(32, 32, 32),
                                 tile_size=16, verbose=False)
    bundle_out = pipeline.segment(None, tmp_path / "bundled", case_dir=case_dir, bundle=str(tmp_path / "bundle"),
                                  verbose=False)
    seg = lambda out: np.asarray(nib.load(out[0][1]["seg"]).dataobj)
    np.testing.assert_array_equal(seg(bundle_out), seg(keras_out))


@pytest.mark.slow
def test_a_model_trained_with_sequence_dropout_segments_a_case_without_a_sequence(records_with_a_missing_sequence,
                                                                                   tmp_path):
    config = get_config("small_dropout")
    config.data.records_dir = str(records_with_a_missing_sequence)
    config.data.batch_size, config.data.val_cases = 4, ["Case_0"]
    config.train.iterations, config.optim.accumulation_steps = 2, 1
    trainer = Trainer2D(config, tmp_path)
    trainer.run()
    model = keras.models.load_model(tmp_path / "model.keras")
    assert [i.name for i in model.inputs] == ["image", "present"]
    image = trainer.val_cases[0].image.astype(np.float32)
    image[..., SEQUENCES.index("flair")] = 0                       # FLAIR missing at test time
    present = predict.sequences_present(image)
    assert present.tolist() == [1, 1, 1, 0]
    labels = predict.predict_2d_labels(unet2d.inference_model(model), image, "axial",
                                      trainer.model_spec["pooling_factor"], present=present)
    assert labels.shape == image.shape[:3]


def test_sequence_dropout_is_refused_where_it_cannot_apply(records_with_a_missing_sequence, tmp_path):
    for field, value in (("model.kind", "unet_axial"), ("data.sequence_dropout", 1.0)):
        config = get_config("small_dropout")
        config.data.records_dir = str(records_with_a_missing_sequence)
        section, key = field.split(".")
        config[section][key] = value
        with pytest.raises(ConfigError, match="sequence_dropout"):
            Trainer2D(config, tmp_path / field).run()


@pytest.mark.slow
def test_segment_runs_a_dropout_model_on_a_case_without_a_sequence_and_says_so(records_with_a_missing_sequence,
                                                                               tmp_path, capsys):
    """Through the segment library on a BraTS-layout case lacking T1c: the dropout-trained 2D
    model runs (gated), a model trained without dropout is refused unless zero_fill is asked."""
    import json
    from brats_tf.inference import pipeline
    data = records_with_a_missing_sequence.parent / "data"
    models = {}
    for name, preset in (("dropout", "small_dropout"), ("plain", "small")):
        config = get_config(preset)
        config.data.records_dir = str(records_with_a_missing_sequence)
        config.data.batch_size, config.data.val_cases = 4, ["Case_0"]
        config.train.iterations, config.optim.accumulation_steps, config.train.val_every = 1, 1, 0
        Trainer2D(config, tmp_path / name).run()
        models[name] = str(tmp_path / name)
    capsys.readouterr()
    pipeline.segment([models["dropout"]], tmp_path / "out", case_dir=str(data / "Case_3"))
    line = capsys.readouterr().out.splitlines()[0]
    assert line == "Case_3: no t1c image; 1 model(s) trained with sequence dropout gate them out"
    volumes = json.loads((tmp_path / "out" / "Case_3_volumes.json").read_text())
    assert volumes["missing_sequences"]["missing"] == ["t1c"]
    assert volumes["missing_sequences"]["handling"] == {f"{models['dropout']}/model.keras": "gated"}
    with pytest.raises(Exception, match=r"Case_3.*no t1c image.*--allow_missing=zero_fill"):
        pipeline.segment([models["plain"]], tmp_path / "out2", case_dir=str(data / "Case_3"))
    assert not (tmp_path / "out2").exists()
    pipeline.segment([models["plain"]], tmp_path / "out3", case_dir=str(data / "Case_3"), allow_missing="zero_fill")
    volumes = json.loads((tmp_path / "out3" / "Case_3_volumes.json").read_text())
    assert volumes["missing_sequences"]["handling"] == {f"{models['plain']}/model.keras": "zero_fill"}


@pytest.mark.slow
def test_segment_on_a_real_case_with_one_sequence_removed(records_with_a_missing_sequence, tmp_path):
    """The real BraTS 2023 case without its FLAIR (T2-FLAIR, t2f) file, by a 2D model trained
    with sequence dropout (on phantoms: the label map is not judged, the path is)."""
    import json
    import os
    from tests.conftest import shared_data
    from brats_tf.inference import pipeline
    case = shared_data("brats2023_glioma_case", "BraTS-GLI-00001-000")
    incomplete = tmp_path / "BraTS-GLI-00001-000"
    incomplete.mkdir()
    for path in case.iterdir():
        if not path.name.endswith(("-t2f.nii.gz", "-seg.nii.gz")):
            os.symlink(path, incomplete / path.name)
    config = get_config("small_dropout")
    config.data.records_dir = str(records_with_a_missing_sequence)
    config.data.batch_size, config.data.val_cases = 4, ["Case_0"]
    config.train.iterations, config.optim.accumulation_steps, config.train.val_every = 1, 1, 0
    Trainer2D(config, tmp_path / "model").run()
    [(case_id, written)] = pipeline.segment([str(tmp_path / "model")], tmp_path / "out", case_dir=str(incomplete),
                                            verbose=False)
    volumes = json.loads(open(written["volumes"]).read())
    assert case_id == "BraTS-GLI-00001-000" and volumes["missing_sequences"]["missing"] == ["flair"]
    import nibabel as nib
    assert nib.load(written["seg"]).shape == nib.load(next(case.glob("*-t1n.nii.gz"))).shape


@pytest.mark.slow
def test_features_of_dropout_models_on_a_case_lacking_a_sequence(records_with_a_missing_sequence, tmp_path):
    """The 2D-3D chains' features from 2D models trained with sequence dropout: each case's
    own presence (Case_3 lacks T1c) is fed to the models."""
    from brats_tf.inference import features as features_lib
    paths = {}
    for orientation in ("axial", "coronal", "sagittal"):
        config = get_config("small_dropout")
        config.data.records_dir, config.data.orientation = str(records_with_a_missing_sequence), orientation
        config.data.batch_size, config.data.val_cases = 4, ["Case_0"]
        config.train.iterations, config.optim.accumulation_steps, config.train.val_every = 1, 1, 0
        Trainer2D(config, tmp_path / orientation).run()
        paths[orientation] = str(tmp_path / orientation)
    manifest = features_lib.extract_features(str(records_with_a_missing_sequence), str(tmp_path / "features"), paths,
                                             verbose=False)
    assert manifest["complete"] and len(manifest["cases"]) == 4


def test_fifteen_subsets_for_four_sequences_and_copies_of_similar_contrast():
    from brats_tf.experiments import missing
    subsets = missing.sequence_subsets(list(SEQUENCES))
    assert len(subsets) == 15 == len(set(subsets)) and subsets[0] == SEQUENCES and all(subsets)
    image = np.stack([np.full((2, 2, 2), v, np.float32) for v in (1, 2, 3, 4)], axis=-1)
    filled = missing.copy_fill(image, list(SEQUENCES), ("t1", "flair"))
    assert filled[0, 0, 0].tolist() == [1, 1, 4, 4]         # t1c <- t1, t2 <- flair
    assert missing.copy_fill(image, list(SEQUENCES), ("t2",))[0, 0, 0].tolist() == [3, 3, 3, 3]


@pytest.mark.slow
def test_missing_inference_experiment_scores_every_subset(tmp_path):
    from types import SimpleNamespace
    from brats_tf import experiments
    from brats_tf.configs.experiments import get_config
    from brats_tf.evaluation.evaluate import read_evaluation_csv
    config = get_config("tiny")
    args = SimpleNamespace(scale="tiny", config=config, workdir=str(tmp_path), data_dir=None, layout="auto",
                           layout_file=None, test_dir=None, seed=0, strategy="off", config_2d=[], config_3d=[])
    report = open(experiments.run("missing_inference", args)).read()
    table = report.split("## Mean Dice x100 per subset")[1].split("##")[0]
    assert len([line for line in table.splitlines() if line.startswith("| ") and "Sequences" not in line]) == 15
    tests = report.split("## Paired one-tailed t-tests")[1].split("##")[0]
    assert len([line for line in tests.splitlines() if line.startswith("| ") and "Sequences" not in line]) == 15
    csvs = sorted((tmp_path / "missing_inference" / "evaluation").glob("*.csv"))
    assert len(csvs) == 45
    split_test = __import__("json").loads((tmp_path / "split.json").read_text())["test"]
    rows, _ = read_evaluation_csv(tmp_path / "missing_inference" / "evaluation" / "dropout_t1.csv")
    assert [r["Label"] for r in rows] == split_test
    assert (tmp_path / "missing_inference" / "subsets_dice.png").stat().st_size > 5_000
    info = __import__("json").loads((tmp_path / "models" / "2d_model1_axial_dropout" / "model_info.json").read_text())
    assert info["presence"] is True
