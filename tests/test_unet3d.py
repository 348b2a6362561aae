"""3D models: the receptive field measured empirically is exactly 45³ for every model,
shapes (70 -> 26, any n + 44 -> n), the dilated max-pool against NumPy, where the features
enter, and the .keras round trip. The pooled design: every kind builds, sizes (multiples of
4, n -> n - 40), and its measured field (44 wide, off-center by the position modulo 4)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from brats_tf.models import unet3d
from brats_tf.models.receptive_field import measure_receptive_field

TINY = dict(levels=(3, 3, 3), final=3)   # receptive field does not depend on widths
K, F = 2, 3


def _model(kind, **kw):
    keras.utils.set_random_seed(0)
    return unet3d.build_3d_model(kind, K, 0 if kind == "standard" else F, **{**TINY, **kw})


def _monotone(model):
    """Non-negative kernels, each filter's summing to 1: with positive inputs no ReLU is ever
    dead and activations stay O(1), so every input voxel inside the receptive field visibly
    reaches the output (random weights can silence a tiny net's center output)."""
    for layer in model.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            kernel = np.abs(kernel)
            layer.set_weights([kernel / kernel.sum(axis=(0, 1, 2, 3), keepdims=True), np.full_like(bias, 0.01)])
    return model


def _logits(model, x):
    out = model(x, training=False)
    return out[0] if isinstance(out, (list, tuple)) else out


def _center(model, x):
    out = np.asarray(_logits(model, x))
    c = out.shape[1] // 2
    return out[:, c, c, c, :]


def _gradient_support(model, x):
    """Input voxels (any channel) with a non-zero gradient of the center output."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = _logits(model, x)
        c = out.shape[1] // 2
        weights = tf.constant(np.random.default_rng(1).normal(size=out.shape[-1]), tf.float32)
        target = tf.reduce_sum(out[:, c, c, c, :] * weights)
    return np.any(tape.gradient(target, x).numpy() != 0, axis=(0, -1))


@pytest.mark.parametrize("kind", unet3d.KINDS)
def test_receptive_field_is_exactly_45_cubed(kind):
    """Measured: input voxels outside the centered 45³ block never change the center output,
    each of the block's six boundary faces does, and the gradient support's bounding box is
    the block."""
    size, channels = 70, K + (0 if kind == "standard" else F)
    model = _monotone(_model(kind))
    assert _logits(model, np.zeros((1, size, size, size, channels), np.float32)).shape[1:4] == (26, 26, 26)
    rng = np.random.default_rng(0)
    base = rng.random((1, size, size, size, channels)).astype(np.float32)
    # Output voxel 13 of 26 sits at input 35 (margin 22), so its block is [13, 57].
    lo, hi = 35 - 22, 35 + 22
    inside = np.zeros((size,) * 3, bool)
    inside[lo:hi + 1, lo:hi + 1, lo:hi + 1] = True
    variants = [np.where(inside[None, ..., None], base, rng.random(base.shape).astype(np.float32) * 5)]
    for axis in range(3):
        for plane in (lo, hi):
            face = np.zeros((size,) * 3, bool)
            index = [slice(lo, hi + 1)] * 3
            index[axis] = plane
            face[tuple(index)] = True
            variants.append(np.where(face[None, ..., None], base + 3.0, base))
    reference = _center(model, base)
    outputs = _center(model, np.concatenate(variants))
    np.testing.assert_allclose(outputs[0], reference[0], rtol=1e-5, atol=1e-6)   # outside: no effect
    for i in range(1, 7):
        assert np.abs(outputs[i] - reference[0]).max() > 1e-6, f"face {i} does not reach the center output"

    support = _gradient_support(model, base)
    where = np.argwhere(support)
    assert where.min(axis=0).tolist() == [lo] * 3 and where.max(axis=0).tolist() == [hi] * 3
    # Max-pooling passes gradients to the window maxima only, so a few voxels of the block
    # show no gradient for this one input; most do (the block is filled, not just its edges).
    assert support.sum() > 0.75 * 45 ** 3


def test_any_input_size_gives_input_minus_44():
    model = _model("standard")
    for size, expected in ((45, 1), (49, 5), (60, 16)):
        out = _logits(model, np.zeros((1, size, size + 2, size + 4, K), np.float32))
        assert out.shape[1:] == (expected, expected + 2, expected + 4, 4)
    assert unet3d.output_size(70) == 26
    with pytest.raises(ValueError):
        unet3d.output_size(44)


def test_dilated_max_pool_matches_numpy():
    x = np.random.default_rng(2).normal(size=(1, 11, 12, 13, 2)).astype(np.float32)
    for rate in (1, 2):
        got = np.asarray(unet3d.DilatedMaxPool3D(rate)(x))
        n = [s - 2 * rate for s in x.shape[1:4]]
        want = np.full((1, *n, 2), -np.inf, np.float32)
        for dx in range(3):
            for dy in range(3):
                for dz in range(3):
                    a, b, c = dx * rate, dy * rate, dz * rate
                    want = np.maximum(want, x[:, a:a + n[0], b:b + n[1], c:c + n[2]])
        np.testing.assert_array_equal(got, want)


def test_features_enter_where_each_model_says():
    """A: a feature change spreads over the 45³ field; B: only over the final 3³ conv;
    C: through its feature stream, like A. The standard model refuses feature channels."""
    size = 49
    x = np.random.default_rng(3).random((1, size, size, size, K + F)).astype(np.float32)
    shifted = x.copy()
    shifted[0, 24 + 10, :, :, K:] += 5.0     # the feature plane 10 voxels from the center input (24)
    near = x.copy()
    near[0, 24 + 1, :, :, K:] += 5.0         # 1 away: within the final 3³ conv
    for kind, far_matters in (("A", True), ("B", False), ("C", True)):
        model = _monotone(_model(kind))
        base, far, close = (_center(model, v) for v in (x, shifted, near))
        assert (np.abs(far - base).max() > 1e-6) == far_matters, kind
        assert np.abs(close - base).max() > 1e-6, kind
    with pytest.raises(ValueError):
        unet3d.build_3d_model("A", K, 0)
    with pytest.raises(ValueError):
        unet3d.build_3d_model("standard", K, F)


def test_keras_round_trip_and_no_batch_norm(tmp_path):
    model = _model("C")
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert model.output_names == ["main"]
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(4).random((1, 47, 47, 47, K + F)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(_logits(loaded, x)), np.asarray(_logits(model, x)), rtol=1e-6)
    paper = unet3d.build_3d_model("A", 4, 12, "paper", input_size=70)
    assert paper.input_shape == (None, 70, 70, 70, 16) and paper.output_shape == (None, 26, 26, 26, 4)


# --- the pooled design (issue 14 item 5) ------------------------------------------------------

# à trous: test_receptive_field_is_exactly_45_cubed measures it in the default suite already
@pytest.mark.parametrize("design, kind", [pytest.param(d, k, marks=[pytest.mark.slow] if d == "atrous" else [])
                                          for d in unet3d.DESIGNS for k in unet3d.KINDS])
def test_measured_receptive_field_of_each_design(design, kind):
    """Measured by perturbing one input plane at a time (models/receptive_field.py): à trous,
    exactly 45 centered on every output voxel; pooled, 44 (close to 45, as the geometry
    records), off-center by -20..+23 to -23..+20 in a cycle of 4 positions."""
    geometry = unet3d.geometry(design)
    size = geometry.smallest_input + 8   # 9 (à trous) / 12 (pooled) output positions per axis
    axes = (0, 1, 2) if kind == "standard" else (0,)   # the layers treat the axes alike
    field = measure_receptive_field(_model(kind, design=design), size, geometry.smallest_input, axes)
    print(f"{design} {kind}: {field.describe()}")
    assert field.margin == geometry.margin and field.widths == [geometry.receptive_field]
    if design == "atrous":
        assert field.widths == [45] and {p for pairs in field.extents.values() for p in pairs} == {(-22, 22)}
        return
    assert abs(field.widths[0] - 45) <= 3 and field.span == (-23, 23)
    for pairs in field.extents.values():
        assert len(pairs) >= 8 and all(pairs[j] == pairs[j + 4] for j in range(len(pairs) - 4))
        assert set(pairs) == {(-20, 23), (-21, 22), (-22, 21), (-23, 20)}


@pytest.mark.parametrize("kind", unet3d.KINDS)
def test_pooled_model_sizes_for_every_kind(kind):
    model = _model(kind, design="pooled")
    assert model.name == f"unet3d_{kind}_pooled"
    assert any(isinstance(layer, keras.layers.MaxPooling3D) for layer in model.layers)
    assert any(isinstance(layer, keras.layers.Conv3DTranspose) for layer in model.layers)
    channels = K + (0 if kind == "standard" else F)
    for size, expected in ((44, 4), (52, 12)):
        out = _logits(model, np.zeros((1, size, size + 4, size + 8, channels), np.float32))
        assert out.shape[1:] == (expected, expected + 4, expected + 8, 4)


def test_pooled_geometry_and_valid_sizes():
    pooled = unet3d.geometry("pooled")
    assert (pooled.context, pooled.margin, pooled.period) == (40, 20, 4)
    assert unet3d.output_size(68, "pooled") == 28 and unet3d.output_size(72, "pooled") == 32
    assert pooled.input_sizes(66, 76) == [68, 72, 76] and pooled.input_sizes(0, 48) == [44, 48]
    assert unet3d.geometry("atrous").input_sizes(44, 47) == [45, 46, 47]
    with pytest.raises(ValueError, match="not a multiple of 4.*use 68 or 72"):
        unet3d.output_size(70, "pooled")
    with pytest.raises(ValueError, match="smaller than the smallest"):
        unet3d.output_size(40, "pooled")
    with pytest.raises(ValueError, match="unknown 3D design"):
        unet3d.build_3d_model("standard", K, design="strided")
    paper = unet3d.build_3d_model("A", 4, 12, "paper", input_size=68, design="pooled")
    assert paper.input_shape == (None, 68, 68, 68, 16) and paper.output_shape == (None, 28, 28, 28, 4)


def test_pooled_keras_round_trip(tmp_path):
    model = _model("C", design="pooled")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    x = np.random.default_rng(5).random((1, 48, 48, 52, K + F)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(_logits(loaded, x)), np.asarray(_logits(model, x)), rtol=1e-6)
