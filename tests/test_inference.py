"""Full-volume inference: slice-wise 2D and tiled 3D predictions cover every voxel exactly once."""

import keras
import numpy as np
import pytest

from brats_tf.inference import predict


def _identity_3d(input_size, output_size, channels):
    """A 'model' whose output is the centered crop of its input: tiling must reproduce the volume."""
    crop = (input_size - output_size) // 2
    x = keras.Input((input_size,) * 3 + (channels,))
    y = keras.layers.Cropping3D(crop)(x) if crop else x
    return keras.Model(x, y)


@pytest.mark.parametrize("input_size,output_size", [(12, 4), (8, 8), (11, 5)])
def test_tiled_3d_reproduces_the_volume(input_size, output_size):
    volume = np.random.default_rng(0).normal(size=(13, 9, 10, 2)).astype(np.float32)
    model = _identity_3d(input_size, output_size, 2)
    out = predict.predict_tiled_3d(model, volume, input_size, output_size, batch_size=3)
    np.testing.assert_allclose(out, volume, rtol=1e-6)


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_slicewise_2d_reproduces_the_volume(orientation):
    volume = np.random.default_rng(1).normal(size=(10, 12, 7, 3)).astype(np.float32)
    x = keras.Input((None, None, 3))
    model = keras.Model(x, keras.layers.Identity()(x))
    out = predict.predict_2d_logits(model, volume, orientation, multiple=8, batch_size=4)
    np.testing.assert_allclose(out, volume, rtol=1e-6)


def test_compiled_models_trace_once_each_without_retracing_warnings(caplog):
    """An ensemble compiles one function per model; each traces once per input shape, and
    TensorFlow must not report that as retracing (it did while all shared one lambda)."""
    import logging
    models = [keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, padding="same")]) for _ in range(8)]
    x = np.ones((2, 6, 6, 2), np.float32)
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for model in models:
            np.testing.assert_allclose(np.asarray(predict.compiled(model)(x)), np.asarray(model(x)), atol=1e-6)
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]


@pytest.mark.parametrize("kind, presence", [("C", False), ("B", True)] + [
    pytest.param(kind, False, marks=pytest.mark.slow) for kind in ("standard", "A", "B")])
def test_layerwise_inference_equals_tiled_inference(kind, presence):
    """Layer by layer over the whole volume (each voxel of each layer once, in blocks smaller
    than the volume) gives the tiled logits."""
    from brats_tf.inference.layerwise import predict_layerwise_3d
    from brats_tf.models import unet3d
    keras.utils.set_random_seed(1)
    features = 0 if kind == "standard" else 3
    model = unet3d.build_3d_model(kind, 2, features, "small", levels=(3, 4, 5), final=4, presence=presence)
    volume = np.random.default_rng(0).normal(size=(23, 30, 19, 2 + features)).astype(np.float32)
    present = np.array([1.0, 0.0]) if presence else None
    tiled = predict.predict_tiled_3d(model, volume, 16 + 44, 16, present=present)
    layerwise = predict_layerwise_3d(model, volume, unet3d.MARGIN, present=present, block=12)
    assert layerwise.shape == tiled.shape == (23, 30, 19, 4)
    np.testing.assert_allclose(layerwise, tiled, atol=1e-4, rtol=1e-4)


def _small_3d(kind="A", features=3, presence=False):
    from brats_tf.models import unet3d
    keras.utils.set_random_seed(1)
    return unet3d.build_3d_model(kind, 2, features, "small", levels=(3, 4, 5), final=4, presence=presence)


def test_layerwise_memory_estimate_bounds_the_arrays_it_keeps():
    """`peak_bytes` (what segment compares with --memory_budget_gb) is at least the NumPy
    memory layer-wise inference holds at its peak, and within a small factor of it."""
    import tracemalloc
    from brats_tf.inference.layerwise import peak_bytes, predict_layerwise_3d
    from brats_tf.models import unet3d
    model = _small_3d()
    volume = np.random.default_rng(0).normal(size=(40, 44, 36, 5)).astype(np.float32)
    predict_layerwise_3d(model, volume, unet3d.MARGIN, block=16)   # traces outside the measurement
    tracemalloc.start()
    predict_layerwise_3d(model, volume, unet3d.MARGIN, block=16)
    _, measured = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    estimate = peak_bytes(model, volume.shape, unet3d.MARGIN, block=16)
    assert measured <= estimate <= 3 * measured, (measured, estimate)
    # bfloat16 activations take half the bytes (the padded float32 input stays float32)
    assert peak_bytes(model, volume.shape, unet3d.MARGIN, block=16, itemsize=2) < 0.8 * estimate


def test_bf16_precision_computes_inner_layers_in_bfloat16_with_float32_logits():
    """with_precision("bf16"): every inner layer computes in bfloat16, the logits layer in
    float32; the logits stay within bfloat16 rounding of the float32 ones; layer-wise
    inference keeps bfloat16 activations."""
    from brats_tf.inference.layerwise import peak_bytes, predict_layerwise_3d
    from brats_tf.models import unet3d
    from brats_tf.models.precision import with_precision
    volume = np.random.default_rng(0).normal(size=(20, 18, 16, 5)).astype(np.float32)
    reference = predict.predict_tiled_3d(_small_3d(), volume, 20 + 44, 20)
    model = with_precision(_small_3d(), "bf16")
    dtypes = {layer.name: layer.compute_dtype for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)}
    assert dtypes.pop(model.layers[-1].name) == "float32" and set(dtypes.values()) == {"bfloat16"}
    for logits in (predict.predict_tiled_3d(model, volume, 20 + 44, 20),
                   predict_layerwise_3d(model, volume, unet3d.MARGIN, block=12)):
        assert logits.dtype == np.float32
        error = np.abs(logits - reference).max() / np.abs(reference).max()
        assert 0 < error < 0.05, error   # bfloat16 keeps 8 significant bits: not float32, not far off
    assert peak_bytes(model, volume.shape, unet3d.MARGIN) < peak_bytes(_small_3d(), volume.shape, unet3d.MARGIN)


def test_layerwise_inference_of_many_cases_logs_no_retracing_warning(caplog):
    """Cases of different shapes reuse each layer's traced function (shape-relaxed): no
    "triggered tf.function retracing" warning however many cases a segment run takes."""
    import logging
    from brats_tf.inference.layerwise import predict_layerwise_3d
    from brats_tf.models import unet3d
    model = _small_3d()
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for i, shape in enumerate([(20, 22, 18), (24, 20, 18), (18, 26, 20), (22, 22, 22), (26, 18, 16), (20, 20, 20)]):
            volume = np.random.default_rng(i).normal(size=shape + (5,)).astype(np.float32)
            # default blocks: one per layer and case, so each case would trace every layer again
            assert predict_layerwise_3d(model, volume, unet3d.MARGIN).shape == shape + (4,)
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
