"""FLOPs counted from the graph (bench/flops.py) against hand counts, and a smoke run of
bench/bench_inference.py on a small phantom.

What TensorFlow's profiler counts (tf.compat.v1.profiler, float_operation(), TF 2.21), as
asserted below:
- a multiply-add counts as 2 FLOPs: a convolution is 2 * k^d * Cin * Cout per output
  element, a Dense layer 2 * Cin * Cout per example;
- a dilated convolution counts its real taps only (it runs as SpaceToBatchND + Conv3D), but
  the space-to-batch rounds each side up to a multiple of the dilation: the extra outputs
  are computed (and counted), then cropped away;
- a bias add counts 1 FLOP per output element; ReLU counts 0 (no registered statistic);
- the 3D convolution gradients are not counted by the profiler: bench/flops.py adds them
  (each as many FLOPs as the forward convolution).
"""

import json

import keras
import pytest
import tensorflow as tf

from bench import flops
from tests.conftest import run_module


def conv_flops(kernel, c_in, c_out, output_elements):
    """2 * k^d * Cin * Cout per output element (a multiply-add = 2 FLOPs)."""
    size = 1
    for k in kernel:
        size *= k
    return 2 * size * c_in * c_out * output_elements


def tiny_model(use_bias=False, activation=None):
    """A 10x10x3 image through a 3x3 Conv2D (5 maps, 8x8 out) and a Dense(7) on its 320
    values; a 10^3 x 2 volume through a 3^3 Conv3D dilated by 2 (4 maps, 6^3 out)."""
    image, volume = keras.Input((10, 10, 3)), keras.Input((10, 10, 10, 2))
    a = keras.layers.Conv2D(5, 3, use_bias=use_bias, activation=activation)(image)
    dense = keras.layers.Dense(7, use_bias=use_bias)(keras.layers.Flatten()(a))
    b = keras.layers.Conv3D(4, 3, dilation_rate=2, use_bias=use_bias, activation=activation)(volume)
    return keras.Model([image, volume], [dense, b])


def count(model, batch=1):
    return flops.count_flops(lambda x, v: model([x, v], training=False),
                             tf.TensorSpec((batch, 10, 10, 3)), tf.TensorSpec((batch, 10, 10, 10, 2)))


HAND_CONV2D = conv_flops((3, 3), 3, 5, 8 * 8)            # 17,280
HAND_CONV3D = conv_flops((3, 3, 3), 2, 4, 6 * 6 * 6)     # 93,312: 27 real taps, not 5^3
HAND_DENSE = 2 * 320 * 7                                  # 4,480
OUTPUTS = 8 * 8 * 5 + 7 + 6 * 6 * 6 * 4                   # output elements of the three layers


def test_counts_match_a_hand_count():
    result = count(tiny_model())
    assert result.by_type == {"Conv2D": HAND_CONV2D, "Conv3D": HAND_CONV3D, "MatMul": HAND_DENSE}
    assert result.total == result.profiler == HAND_CONV2D + HAND_CONV3D + HAND_DENSE
    assert result.added == 0
    assert "SpaceToBatchND" not in result.uncounted   # the dilation's reshuffles: no arithmetic


def test_a_dilated_conv_computes_sides_rounded_up_to_the_dilation():
    """9^3 in, dilation 2: 5^3 outputs wanted, but the space-to-batch pads 9 to 10, so the
    conv computes 6^3 outputs per map and crops them."""
    volume = keras.Input((9, 9, 9, 2))
    model = keras.Model(volume, keras.layers.Conv3D(4, 3, dilation_rate=2, use_bias=False)(volume))
    assert model.output_shape == (None, 5, 5, 5, 4)
    assert flops.model_call_flops(model, (1, 9, 9, 9, 2)).total == conv_flops((3, 3, 3), 2, 4, 6 ** 3)


def test_flops_scale_with_the_batch():
    assert count(tiny_model(), batch=3).total == 3 * count(tiny_model()).total


def test_bias_adds_count_one_per_element_and_relu_nothing():
    plain = count(tiny_model()).total
    assert count(tiny_model(use_bias=True)).total == plain + OUTPUTS
    relu = count(tiny_model(activation="relu"))
    assert relu.total == plain
    assert relu.uncounted.get("Relu") == 2   # listed as present and uncounted


def test_conv3d_gradients_are_added():
    """Two 3^3 convs: the gradient holds the filter gradient of both (as many FLOPs as
    each forward conv) and the input gradient of the second only (the input is no variable)."""
    volume = keras.Input((8, 8, 8, 2))
    first = keras.layers.Conv3D(3, 3, use_bias=False)(volume)       # 6^3 out
    second = keras.layers.Conv3D(4, 3, use_bias=False)(first)       # 4^3 out
    model = keras.Model(volume, second)
    f1, f2 = conv_flops((3, 3, 3), 2, 3, 6 ** 3), conv_flops((3, 3, 3), 3, 4, 4 ** 3)
    forward = flops.model_call_flops(model, (1, 8, 8, 8, 2))
    assert forward.total == f1 + f2
    # (a loss of sum(out) alone would not need the last conv's output: its forward op is pruned)
    grads = flops.gradient_flops(model, (1, 8, 8, 8, 2), (1, 4, 4, 4), lambda y, out: tf.reduce_sum(out * out))
    assert grads.added == f1 + 2 * f2
    assert grads.by_type["Conv3D"] == f1 + f2
    assert grads.total == grads.profiler + grads.added


def bench_lines(*args):
    # 8³ output tiles: the phantom's grid needs several, so the 3D models run layer by layer
    result = run_module("bench.bench_inference", "--preset", "small", "--phantom_shape", "24,24,16",
                        "--tile_size", "8", "--peak_size", "256", "--peak_repeats", "1", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert lines[-1]["what"] == "summary"
    return lines


@pytest.mark.slow   # a whole (tiny) ensemble run, and a dry tiled one: ~60 s
def test_bench_inference_smoke():
    lines = bench_lines()
    summary = lines[-1]
    for key in ("preset", "precision", "ensemble_s", "model_a_s", "min_share_of_peak", "peak_rss_mb",
                "memory_budget_gb", "peak_fp32_gflops", "peak_bf16_gflops"):
        assert key in summary
    assert summary["preset"] == "small" and summary["precision"] == "fp32"
    assert summary["ensemble_s"] > 0 and summary["model_a_s"] > 0
    case = next(line for line in lines if line["what"] == "case")
    assert case["source"] == "phantom" and case["shape"] == [24, 24, 16]
    networks = {line["network"]: line for line in lines if line["what"] == "network"}
    assert set(networks) == {f"{k}_{o}" for k in ("model1", "model2") for o in ("axial", "coronal", "sagittal")} \
        | {"A", "B", "C"}
    # 3D: layer by layer under the default memory budget (calls = blocks, no single call's FLOPs)
    assert {networks[k]["method"] for k in "ABC"} == {"layerwise"}
    for line in networks.values():
        assert line["gflop"] > 0 and line["calls"] >= 1 and line["warm_s"] > 0
        if line.get("method") == "layerwise":
            assert line["flops_per_call"] is None and line["estimate_mb"] > 0 and 0 < line["useful_share"] <= 1
        else:
            assert line["gflop"] * 1e9 == pytest.approx(line["calls"] * line["flops_per_call"], rel=1e-3)
    ensemble = next(line for line in lines if line["what"] == "ensemble")
    # the six 2D networks run once each (features cached per chain), A/B/C twice (two feature sets)
    expected = sum(n["gflop"] for n in networks.values()) + sum(networks[k]["gflop"] for k in "ABC")
    assert ensemble["gflop"] == pytest.approx(expected, rel=1e-3)
    train = {line["model"]: line for line in lines if line["what"] == "train"}
    assert set(train) == {"model1", "A"}
    assert train["A"]["added_flops"] > 0   # the 3D convolution gradients

    # budget 0: the 3D networks are tiled; a dry run (nothing runs) counts their FLOPs
    dry = bench_lines("--memory_budget_gb", "0", "--dry_run", "--networks", "A,B,C", "--skip_ensemble",
                      "--precision", "bf16")
    assert dry[-1]["precision"] == "bf16" and dry[-1]["memory_budget_gb"] == 0 and dry[-1]["dry_run"]
    tiled = {line["network"]: line for line in dry if line["what"] == "network"}
    assert set(tiled) == {"A", "B", "C"} and {line["method"] for line in tiled.values()} == {"tiled"}
    for kind, line in tiled.items():   # a tile recomputes its margin; layer by layer, no voxel is computed twice
        assert line["gflop"] * 1e9 == pytest.approx(line["calls"] * line["flops_per_call"], rel=1e-3)
        assert line["gflop"] > networks[kind]["gflop"]
