"""[S] baseline models: shapes, receptive fields measured empirically, dropout/BN switches,
weight transfer, tiled inference, center crop/pad, and the trainer's samplers' balance."""

import keras
import numpy as np
import pytest

from brats_tf.inference import baselines as baselines_inference
from brats_tf.training.baselines import BaselineTrainer
from brats_tf.configs.baselines import PRESETS, get_config
from brats_tf.errors import ConfigError
from brats_tf.io.labels import write_label_map
from brats_tf.inference.predict import predict_tiled_3d
from brats_tf.models.baselines import BaselineSpec, build_baseline, copy_matching_weights
from brats_tf.records.reader import load_manifest, read_cases
from brats_tf.records.writer import build_records
from tests.conftest import write_brats2017_case


def _out(model, x):
    return np.asarray(model(x, training=False))


def _positive_weights(model, seed=0):
    """Every kernel positive and biases zero: with a positive input every ReLU is active,
    so a gradient is non-zero exactly where the output depends on the input."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv3D, keras.layers.Conv3DTranspose)):
            kernel, bias = layer.get_weights()
            layer.set_weights([rng.uniform(0.01, 0.1, kernel.shape).astype(np.float32), np.zeros_like(bias)])


def _dependency(model, x, output_slices):
    """Boolean (X, Y, Z) mask of input voxels the class-1 scores in `output_slices` depend on."""
    import tensorflow as tf
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        scores = model(x, training=False)[(0,) + output_slices + (1,)]
        total = tf.reduce_sum(scores)
    return np.abs(np.asarray(tape.gradient(total, x))[0]).sum(axis=-1) > 0


@pytest.mark.parametrize("kind, shape, out_shape", [
    ("bcn", (25, 25, 25), (9, 9, 9)), ("bcn", (41, 30, 27), (25, 14, 11)),
    ("fcn", (24, 24, 24), (24, 24, 24)), ("fifcn", (32, 48, 16), (32, 48, 16))])
@pytest.mark.parametrize("num_classes", [2, 4])
def test_output_shapes(kind, shape, out_shape, num_classes):
    filters = {"bcn": (2, 2, 2, 2), "fcn": (2, 2), "fifcn": (2, 2, 2, 2, 2)}[kind]
    spec = BaselineSpec(kind, num_classes=num_classes, filters=filters, fc_units=4, volume_size=shape)
    x = np.random.default_rng(0).normal(size=(2,) + shape + (4,)).astype(np.float32)
    assert _out(build_baseline(spec), x).shape == (2,) + out_shape + (num_classes,)


def test_bcn_receptive_field_is_25_cubed_for_its_9_cubed_block():
    spec = BaselineSpec("bcn", filters=(2, 3, 2, 3), fc_units=4, batch_norm=True, dropout=True)
    model = build_baseline(spec)
    _positive_weights(model)
    x = np.random.default_rng(1).uniform(0.5, 1.0, (1, 33, 33, 33, 4)).astype(np.float32)
    assert _out(model, x).shape[1:4] == (17, 17, 17)
    expected = np.zeros((33,) * 3, bool)
    expected[4:29, 4:29, 4:29] = True                       # output block 4..12 <- input 4..28
    np.testing.assert_array_equal(_dependency(model, x, (slice(4, 13),) * 3), expected)
    one_voxel = np.zeros((33,) * 3, bool)
    one_voxel[8:25, 8:25, 8:25] = True                      # one output voxel sees 17³
    np.testing.assert_array_equal(_dependency(model, x, (8, 8, 8)), one_voxel)


def test_fcn_receptive_field_of_the_center_voxel():
    """Perturbing input voxels on the three lines through the center: output voxel 12
    depends on input voxels 4j-3 .. 4j+6 with j = 12 // 4 (conv 3, pool 2, conv 3, pool 2,
    then 2³ stride-2 unpoolings that map each voxel from one voxel), i.e. 9..18."""
    keras.utils.set_random_seed(2)
    model = build_baseline(BaselineSpec("fcn", filters=(8, 8), batch_norm=True))
    base = np.random.default_rng(2).normal(size=(24, 24, 24, 4)).astype(np.float32)
    reference = _out(model, base[None])[0, 12, 12, 12]
    for axis in range(3):
        changed = np.zeros(24, bool)
        for step in (50.0, -50.0):   # a ReLU may hide a change of one sign, not of both
            batch = np.repeat(base[None], 24, axis=0)
            for p in range(24):
                index = [12, 12, 12]
                index[axis] = p
                batch[(p,) + tuple(index)] += step
            # A batch of 24 may take another oneDNN kernel than a batch of 1: float noise
            # (~1e-8) is not dependence; a ±50 step inside the field changes outputs by > 0.05.
            changed |= np.abs(_out(model, batch)[:, 12, 12, 12] - reference).max(axis=-1) > 1e-4
        np.testing.assert_array_equal(np.flatnonzero(changed), np.arange(9, 19), err_msg=f"axis {axis}")


def _layer_types(model):
    return [type(layer).__name__ for layer in model.layers]


@pytest.mark.parametrize("kind, dropouts, norms", [("bcn", 1, 5), ("fcn", 2, 4), ("fifcn", 5, 4)])
def test_dropout_and_batch_norm_switches(kind, dropouts, norms):
    filters = {"bcn": (2, 2, 2, 2), "fcn": (2, 2), "fifcn": (2, 2, 2, 2, 2)}[kind]
    for dropout in (False, True):
        for batch_norm in (False, True):
            spec = BaselineSpec(kind, filters=filters, fc_units=4, dropout=dropout, batch_norm=batch_norm,
                                volume_size=(16, 16, 16))
            types = _layer_types(build_baseline(spec))
            assert types.count("Dropout") == (dropouts if dropout else 0)
            assert types.count("BatchNormalization") == (norms if batch_norm else 0)


def test_dropout_acts_only_in_training_and_l2_is_on_every_kernel():
    x = np.random.default_rng(3).normal(size=(1, 25, 25, 25, 4)).astype(np.float32)
    plain = build_baseline(BaselineSpec("bcn", filters=(2, 2, 2, 2), fc_units=8))
    np.testing.assert_allclose(np.asarray(plain(x, training=True)), _out(plain, x), rtol=1e-6)
    with_dropout = build_baseline(BaselineSpec("bcn", filters=(2, 2, 2, 2), fc_units=8, dropout=True))
    assert not np.allclose(np.asarray(with_dropout(x, training=True)), _out(with_dropout, x))
    kernels = [w for w in plain.trainable_weights if "kernel" in w.path]
    expected = sum(1e-4 * float(np.sum(np.asarray(w, np.float64) ** 2)) for w in kernels)
    assert len(plain.losses) == len(kernels) == 6
    np.testing.assert_allclose(sum(float(v) for v in plain.losses), expected, rtol=1e-5)


def test_plain_weights_load_into_a_model_with_dropout_and_bn():
    """Fine-tuning [S] §5.2: a fresh BN layer in inference mode is x / sqrt(1 + 1e-3), so
    the copied model's scores are the plain one's up to that factor per BN layer."""
    plain = build_baseline(BaselineSpec("fcn", filters=(4, 4)))
    tuned = build_baseline(BaselineSpec("fcn", filters=(4, 4), dropout=True, batch_norm=True))
    copied = copy_matching_weights(plain, tuned)
    assert sorted(copied) == ["conv1", "conv2", "deconv1", "deconv2", "scores"]
    x = np.random.default_rng(4).normal(size=(1, 24, 24, 24, 4)).astype(np.float32)
    np.testing.assert_allclose(_out(tuned, x), _out(plain, x), rtol=0.01, atol=1e-3)


def test_bcn_large_tiles_give_the_scores_of_25_to_9_tiles():
    model = build_baseline(BaselineSpec("bcn", filters=(3, 3, 3, 3), fc_units=4, batch_norm=True))
    volume = np.random.default_rng(5).normal(size=(20, 23, 17, 4)).astype(np.float32)
    paper = predict_tiled_3d(model, volume, 25, 9, batch_size=4)
    large = predict_tiled_3d(model, volume, 12 + 16, 12, batch_size=4)
    assert paper.shape == (20, 23, 17, 2)
    np.testing.assert_allclose(large, paper, rtol=1e-4, atol=1e-4)
    assert baselines_inference.tile_size((58, 67, 64), 40) == 34                # 2 tiles per axis, smallest edge
    assert baselines_inference.tile_size((20, 23, 16), 9) == 8                  # 3, 3, 2 tiles
    assert baselines_inference.tile_size((20, 23, 17), 9) == 9                  # z: 2 tiles need 9


def test_center_crop_pad_round_trip():
    volume = np.arange(10 * 7 * 5, dtype=np.int32).reshape(10, 7, 5) + 1
    fitted = baselines_inference.fit_to_size(volume, (6, 9, 5))
    np.testing.assert_array_equal(fitted[:, 1:8], volume[2:8])              # x cropped, y padded
    assert (fitted[:, 0] == 0).all() and (fitted[:, 8] == 0).all()
    back = baselines_inference.restore_from_size(fitted, volume.shape)
    np.testing.assert_array_equal(back[2:8], volume[2:8])
    assert (back[:2] == 0).all() and (back[8:] == 0).all()


def test_every_preset_says_what_its_name_says():
    for preset in PRESETS:
        c = get_config(preset)
        kind, scale = preset.split("_")
        assert c.stage == "baseline" and c.model.kind == kind and c.data.normalization == "zscore"
        assert c.data.sampling == "tumor_balanced" and c.loss.kind == "cross_entropy"
        if kind == "fifcn" and scale == "paper":
            assert tuple(c.model.volume_size) == (160, 160, 144)
        BaselineSpec(kind, filters=tuple(c.model.filters), volume_size=tuple(c.model.volume_size))


# ------------------------------------------------------------------ samplers of the trainer

@pytest.fixture(scope="module")
def zscore_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline_records")
    for i in range(2):
        write_brats2017_case(root / "data", f"Case_{i}", shape=(40, 42, 36), seed=i)
    build_records(root / "data", root / "records", normalization="zscore", verbose=False)
    return root / "records"


def _trainer(records, tmp_path, preset, **model):
    c = get_config(preset)
    c.data.records_dir = str(records)
    for key, value in model.items():
        setattr(c.model, key, value)
    trainer = BaselineTrainer(c, tmp_path)
    trainer.split = {"train": ["Case_0", "Case_1"], "val": []}
    trainer.load_data(load_manifest(records))
    return trainer


def test_patch_sampler_draws_majority_tumor_and_majority_background_equally(zscore_records, tmp_path):
    trainer = _trainer(zscore_records, tmp_path, "bcn_demo")
    sampler = trainer.make_sampler(16)
    blocks = []
    for x, y in sampler.dataset(num_batches=20).as_numpy_iterator():
        assert x.shape == (16, 25, 25, 25, 4) and y.shape == (16, 9, 9, 9)
        assert set(np.unique(y)) <= {0, 1}
        blocks.append(y.reshape(16, -1).mean(axis=1))
    majority_tumor = (np.concatenate(blocks) > 0.5).mean()
    assert 0.4 <= majority_tumor <= 0.6
    # Without the balancing, a brain voxel would be tumor this rarely:
    cases = [c.prepared for c in read_cases(zscore_records)]
    tumor_share = sum((c.label > 0).sum() for c in cases) / sum(c.brain.sum() for c in cases)
    assert tumor_share < 0.25


def test_volume_sampler_crops_cases_to_the_fifcn_window(zscore_records, tmp_path):
    trainer = _trainer(zscore_records, tmp_path, "fifcn_demo", volume_size=(32, 48, 32))
    x, y = trainer.make_sampler(2).batch(0)
    assert x.shape == (2, 32, 48, 32, 4) and y.shape == (2, 32, 48, 32)
    for i in range(2):   # each example is one of the cases, centered: find which
        matches = [np.array_equal(y[i], (baselines_inference.fit_to_size(c.label, (32, 48, 32)) > 0))
                   for c in (r.prepared for r in read_cases(zscore_records))]
        assert any(matches)


def test_records_must_be_zscore_normalized(tmp_path):
    write_brats2017_case(tmp_path / "data", "Case_0", shape=(24, 26, 20))
    build_records(tmp_path / "data", tmp_path / "records", normalization="median", verbose=False)
    with pytest.raises(ConfigError, match="zscore"):
        _trainer(tmp_path / "records", tmp_path / "work", "bcn_demo")


# ------------------------------------------------------------------ full-volume segmentation

def test_segment_pastes_the_prediction_into_the_original_grid(tmp_path):
    from brats_tf.io.cases import discover_cases, load_case
    from brats_tf.io.nifti import load_volume
    from brats_tf.preprocess import prepare_case
    write_brats2017_case(tmp_path / "data", "Case_0", shape=(30, 32, 28))
    loaded = load_case(discover_cases(tmp_path / "data")[0])
    stored = ["t1", "t1c", "t2", "flair"]
    spec = BaselineSpec("fcn", num_channels=2, filters=(2, 2))   # a model on 2 of the 4 recorded modalities
    model = build_baseline(spec)
    info = {"modalities": ["t1c", "flair"], "preprocessing": {
        "modalities": stored, "normalization": "zscore", "median_scale": None, "crop_margin": 2}}
    labels = baselines_inference.segment(model, spec, info, loaded)
    assert labels.shape == (30, 32, 28) and set(np.unique(labels)) <= {0, 2}
    prepared = prepare_case(loaded, "zscore", margin=2)
    cropped = np.argmax(predict_tiled_3d(model, prepared.image[..., [1, 3]], 24, 24), axis=-1)
    expected = np.zeros((30, 32, 28), np.uint8)
    expected[prepared.box.slices] = np.where((cropped > 0) & prepared.brain, 2, 0)
    np.testing.assert_array_equal(labels, expected)
    # Written in the BraTS 2017 convention (internal 3 -> 4) with the input's geometry.
    labels[0, 0, 0] = 3
    write_label_map(tmp_path / "out" / "Case_0_seg.nii.gz", labels, loaded.geometry)
    written, geometry = load_volume(tmp_path / "out" / "Case_0_seg.nii.gz")
    assert written[0, 0, 0] == 4 and np.array_equal(written[1:] > 0, labels[1:] > 0)
    np.testing.assert_allclose(geometry.affine, loaded.geometry.affine)
