"""Full-volume inference: slice-wise 2D and tiled 3D predictions cover every voxel exactly once."""

import keras
import numpy as np
import pytest
import tensorflow as tf

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


def test_layerwise_runs_dilated_layers_undilated_on_their_phase_lattices():
    """Every windowed layer runs undilated (a dilated one as its twin on each phase lattice),
    in the blocks `block_calls` lists (what the bench counts FLOPs from)."""
    import collections
    from brats_tf.inference.layerwise import block_calls, predict_layerwise_3d
    from brats_tf.models import unet3d
    model = _small_3d()
    assert any(max(layer.dilation_rate) > 1 for layer in model.layers if isinstance(layer, keras.layers.Conv3D))
    volume = np.random.default_rng(0).normal(size=(23, 30, 19, 5)).astype(np.float32)
    seen = collections.Counter()
    predict_layerwise_3d(model, volume, unet3d.MARGIN, block=12,
                         on_block=lambda layer, shape: seen.update([(layer.name, tuple(shape))]))
    listed = block_calls(model, volume.shape, unet3d.MARGIN, block=12)
    assert seen == collections.Counter({(layer.name, tuple(shape)): n for layer, shape, n in listed})
    assert all(layer.dilation_rate == (1, 1, 1) for layer, _, _ in listed if isinstance(layer, keras.layers.Conv3D))
    assert any(layer.name.endswith("_undilated") for layer, _, _ in listed)


def test_layerwise_blocks_reach_tensorflow_without_a_copy_when_aligned():
    """A block handed to TensorFlow shares its memory (float32, and bfloat16 through uint16)
    when it starts on the alignment TensorFlow's kernels require; an unaligned one is copied
    (TensorFlow would abort on it), with the same values."""
    import ml_dtypes
    from brats_tf.inference.layerwise import TENSOR_ALIGNMENT, _aligned_empty, _as_tensor
    for dtype in (np.float32, ml_dtypes.bfloat16):
        block = _aligned_empty((1, 5, 6, 7, 3), dtype)
        assert block.ctypes.data % TENSOR_ALIGNMENT == 0 and block.flags.c_contiguous
        block[...] = np.arange(block.size).reshape(block.shape) % 7
        tensor = _as_tensor(block)
        np.testing.assert_array_equal(np.asarray(tensor), block)
        block[0, 0, 0, 0, 0] = 42
        assert float(tensor[0, 0, 0, 0, 0]) == 42   # the same memory
        raw = np.empty(4 * 210 + TENSOR_ALIGNMENT + 4, np.uint8)
        offset = -raw.ctypes.data % TENSOR_ALIGNMENT + 4
        unaligned = raw[offset:offset + 4 * 210].view(np.float32).reshape(1, 5, 6, 7, 1)
        unaligned[...] = 3
        copied = _as_tensor(unaligned)
        unaligned[...] = 5
        assert float(copied[0, 0, 0, 0, 0]) == 3


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
    # bfloat16 activations take half the bytes (the padded float32 input stays float32: on this
    # small volume, at its peak, about a third of the estimate)
    assert peak_bytes(model, volume.shape, unet3d.MARGIN, block=16, itemsize=2) < 0.85 * estimate


def test_model_c_runs_one_stream_after_the_other_in_less_memory_with_the_same_logits():
    """Keras orders model C's layers by depth, so its two streams advance side by side, each
    holding its skips; the execution order chosen by the estimate finishes one branch first.
    Measured with tracemalloc: a lower peak, and the same logits."""
    import tracemalloc
    from brats_tf.inference import layerwise
    from brats_tf.models import unet3d
    model = _small_3d("C")
    volume = np.random.default_rng(2).normal(size=(40, 44, 36, 5)).astype(np.float32)
    padded = np.pad(volume, [(unet3d.MARGIN, unet3d.MARGIN)] * 3 + [(0, 0)])[None]
    keras_order, *_ = layerwise._candidate_orders(model)
    chosen = layerwise.execution_order(model, volume.shape, unet3d.MARGIN, block=16)
    assert chosen != keras_order and sorted(map(id, chosen)) == sorted(map(id, keras_order))

    def run(order):
        layerwise._run_layers(model, {id(model.inputs[0]): padded.copy()}, 16, None, order)   # traced first
        tracemalloc.start()
        logits = layerwise._run_layers(model, {id(model.inputs[0]): padded.copy()}, 16, None, order)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return logits, peak

    (keras_logits, keras_peak), (chosen_logits, chosen_peak) = run(keras_order), run(chosen)
    np.testing.assert_array_equal(chosen_logits, keras_logits)
    assert chosen_peak < 0.85 * keras_peak, (chosen_peak, keras_peak)
    estimate = layerwise.peak_bytes(model, volume.shape, unet3d.MARGIN, block=16)
    assert chosen_peak <= estimate < layerwise._peak_bytes(model, keras_order, volume.shape, unet3d.MARGIN, 16)


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


# --- the pooled 3D design (issue 14 item 5): tiles on its grid of 4 -----------------------------

def _pooled_3d(kind="A", features=3):
    from brats_tf.models import unet3d
    keras.utils.set_random_seed(2)
    return unet3d.build_3d_model(kind, 2, features, "small", levels=(3, 4, 5), final=4, design="pooled")


def _whole(model, volume, sides, margin):
    """One pass over the volume zero-padded to `sides` + 2 * margin, cropped back."""
    pad = [(margin, margin + s - n) for s, n in zip(sides, volume.shape[:3])] + [(0, 0)]
    out = predict.main_logits(model, np.pad(volume, pad)[None])[0]
    return out[:volume.shape[0], :volume.shape[1], :volume.shape[2]]


def test_tiled_pooled_model_equals_one_pass_over_the_whole_volume():
    """Output tiles of side 8 (a multiple of the period 4) with 20 voxels of context on each
    side, laid edge to edge, give exactly the logits of one pass over the padded volume;
    the same pass shifted by 2 voxels (off the grid) does not: the grid matters."""
    model = _pooled_3d()
    volume = np.random.default_rng(3).normal(size=(21, 14, 9, 5)).astype(np.float32)
    tiled = predict.predict_tiled_3d(model, volume, 8 + 40, 8, batch_size=4)
    whole = _whole(model, volume, (24, 16, 16), 20)
    assert tiled.shape == whole.shape == (21, 14, 9, 4)
    np.testing.assert_allclose(tiled, whole, atol=1e-5, rtol=1e-5)
    shifted = predict.main_logits(model, np.pad(volume, [(22, 21), (20, 22), (20, 27), (0, 0)])[None])[0]
    assert np.abs(shifted[2:23, :14, :9] - whole).max() > 1e-3   # voxel i at input i + 22: off the grid


def test_fitted_tiles_of_a_pooled_model_are_multiples_of_its_period():
    assert predict.fitted_tile_size((148, 198, 145), 64) == 50
    assert predict.fitted_tile_size((148, 198, 145), 64, multiple=4) == 52
    assert predict.fitted_tile_size((21, 10, 9), 18, multiple=4) == 12    # 2 x 1 x 1 tiles of at most 16
    assert predict.tile_limit(18, 4) == 16 and predict.tile_limit(3, 4) == 4


def test_layerwise_refuses_a_pooled_model():
    """Its strided layers are not per-voxel: refused before any work, and `segment` never
    chooses layer-wise inference for it."""
    from brats_tf.inference import exported, pipeline
    from brats_tf.inference.layerwise import peak_bytes, predict_layerwise_3d
    model = _pooled_3d()
    volume = np.zeros((8, 8, 8, 5), np.float32)
    with pytest.raises(ValueError, match="does not know MaxPooling3D"):
        predict_layerwise_3d(model, volume, 20)
    with pytest.raises(ValueError, match="does not know"):
        peak_bytes(model, volume.shape, 20)
    info = {"stage": "3d", "design": "pooled", "margin": 20, "period": 4, "receptive_field": 44}
    pooled = exported.ExportedModel("m.keras", info, "0" * 64)
    assert not pipeline.runs_layerwise(pooled, (300, 300, 300), memory_budget_gb=1000, tile_size=16)
    assert (pooled.margin, pooled.period, pooled.design) == (20, 4, "pooled")
    shapes = exported.NetworkShapes((40, 40, 40), tile_size=50, batch_size=1)
    assert exported.network_input_shape(dict(info, modalities=["t1", "t2"]), shapes) == (1, 88, 88, 88, 2)
    old = {"stage": "3d", "receptive_field": 45}   # model_info from before the design was recorded
    assert (exported.margin_3d(old), exported.period_3d(old), exported.design_3d(old)) == (22, 1, "atrous")


@pytest.mark.parametrize("rate", [1, 2, 3])
def test_layerwise_max_pool_equals_the_pool_layer(rate):
    """The pooling kernels layer-wise inference runs a pool's slabs with give the layer's own
    output exactly, on sides that are not multiples of the rate (padded, then cut)."""
    from brats_tf.inference.layerwise import max_pool
    from brats_tf.models.unet3d import DilatedMaxPool3D
    x = np.random.default_rng(rate).normal(size=(1, 13, 17, 14, 3)).astype(np.float32)
    expected = np.asarray(DilatedMaxPool3D(rate)(x))
    pooled = np.asarray(tf.function(lambda v: max_pool(v, rate))(x))
    assert pooled.shape == expected.shape == (1, 13 - 2 * rate, 17 - 2 * rate, 14 - 2 * rate, 3)
    np.testing.assert_array_equal(pooled, expected)


def test_layerwise_concatenations_are_never_made_whole():
    """A concatenation's output stays its parts (no whole-volume array is written); the next
    layer's blocks cut from the parts equal blocks cut from the concatenated array, on a
    phase lattice and past the end (zero-padded); other consumers get the array."""
    import ml_dtypes
    from brats_tf.inference import layerwise
    model = _small_3d()
    seen = {}
    apply = layerwise._apply

    def recording(layer, arrays, block, on_block):
        seen[layer.name] = out = apply(layer, arrays, block, on_block)
        return out
    volume = np.random.default_rng(0).normal(size=(14, 15, 13, 5)).astype(np.float32)
    try:
        layerwise._apply = recording
        layerwise.predict_layerwise_3d(model, volume, 22, block=8)
    finally:
        layerwise._apply = apply
    concats = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Concatenate)]
    assert concats and all(isinstance(seen[name], layerwise.ChannelParts) for name in concats)
    for dtype in (np.float32, ml_dtypes.bfloat16):
        rng = np.random.default_rng(1)
        parts = [rng.normal(size=(1, 11, 9, 10, c)).astype(dtype) for c in (2, 3)]
        whole = np.concatenate(parts, -1)
        lattice = (slice(None), slice(1, None, 2), slice(0, None, 2), slice(1, None, 2))
        for start in [(0, 0, 0), (2, 2, 2)]:   # the second runs past the end of every axis
            cut = layerwise._input_block(layerwise.ChannelParts(parts), lattice, start, (3, 3, 3), (2, 2, 2),
                                         np.full((1, 5, 5, 5, 5), 7, dtype))
            expected = layerwise._input_block(whole, lattice, start, (3, 3, 3), (2, 2, 2), np.full((1, 5, 5, 5, 5), 7, dtype))
            np.testing.assert_array_equal(cut, expected)
        assert np.array_equal(layerwise._materialized(layerwise.ChannelParts(parts)), whole)
    # a concatenation along a spatial axis takes the parts' concatenated array, not the parts
    rng = np.random.default_rng(2)
    first, second, third = (rng.normal(size=(1, 3, 4, 5, c)).astype(np.float32) for c in (2, 2, 4))
    along_x = keras.layers.Concatenate(axis=1)
    along_x([keras.Input((3, 4, 5, 4)), keras.Input((3, 4, 5, 4))])
    joined = layerwise._apply(along_x, [layerwise.ChannelParts([first, second]), third], 8, None)
    np.testing.assert_array_equal(joined, np.concatenate([np.concatenate([first, second], -1), third], 1))
