"""Inference (and training) cost against the machine's peak, printing JSON lines.

  env        versions, cores
  peak       the machine's matmul peak, measured in this run: fp32 (and bf16, null when
             bf16 is not faster than fp32 or not supported), best of a few n x n matmuls
  monai      with --anchor_python PATH (issue 14 item 6): the anchor, MONAI's SegResNet in the
             setting of MONAI's brats_mri_segmentation bundle (PyTorch, CPU, fp32), run as
             `PATH bench/bench_monai.py` in its own environment (bench/requirements-anchor.txt)
             on the same case (the real one, or a phantom of the same shape: its own random
             volume), its line passed through as it printed it (its peak RSS is its own
             process's); --anchor_roi: its sliding-window size (default the bundle's
             240,240,160). A failed run: one line {"what": "monai", "error": ...}, and the
             bench goes on
  case       the case used (the real BraTS 2023 case if ../shared is there, else a
             240x240x155 phantom; --phantom_shape: a phantom of that shape, always)
  network    each network of the six-model 2D-3D ensemble, run over the whole case by the
             project's own inference code (2D: `pipeline.predict_2d`, slice batches;
             3D: `pipeline.predict_model`: layer by layer over the whole grid when its memory
             estimate fits --memory_budget_gb, "method": "layerwise", else tiled by
             `predict_tiled_3d`, "method": "tiled"): 2D model 1 and 2D model 2 per
             orientation, then 2D-3D models A, B, C (on model-1 features; on model-2 features
             they cost the same)
  ensemble   the whole six-model `segment` run (`pipeline.segment_case`), files written
  train      (item 7) one training iteration (N accumulated batches, N from the preset's
             config) of 2D model 1 and of 3D model A: FLOPs of forward + backward (the loss
             gradient, no optimizer) x N; seconds and share of peak with --train
  summary    the last line

Against MONAI (with --anchor_python): every network and ensemble line carries
`gflop_per_s_vs_monai` (its warm GFLOP/s over MONAI's warm GFLOP/s) and `seconds_vs_monai`
(its warm seconds over MONAI's warm seconds for the whole sliding-window inference of the
case: one of our networks, or our whole six-model ensemble, against their one model); null
when MONAI failed. The summary: `monai_s`, `monai_gflop_per_s`, `monai_share_of_peak`
(against torch's own fp32 matmul peak, measured in its run), `gflop_per_s_ratio_to_monai`
and `seconds_ratio_to_monai` of the ensemble, `model_a_gflop_per_s_ratio_to_monai` and
`model_a_seconds_ratio_to_monai` of 2D-3D model A (null when not run or without the anchor).

Precision: --precision runs every inference network in it (models/precision.py: bf16 =
bfloat16 inner layers, float32 logits); inference shares of peak are against that
precision's measured peak (bf16: against fp32 when no bf16 peak was measured, with a
`peak_note`). Training runs in float32, its shares against the fp32 peak.

FLOPs: counted from the graph of a fixed-shape concrete function (bench/flops.py,
TensorFlow's profiler: a multiply-add = 2 FLOPs) of what the inference code ran, recorded
while it runs (no tiling, batching or blocking re-implemented here):
- 2D and tiled 3D: each network is wrapped and its calls' input shapes recorded; FLOPs of
  the network at each shape. `predict.compiled` pads a last, smaller batch to the largest
  batch seen so far, so the FLOPs are those executed at that padded shape;
- layer-wise 3D: each `layerwise.predict_layerwise_3d` run is recorded (model, volume
  shape) and its blocks listed by `layerwise.block_calls`; FLOPs = sum over windowed layers
  of blocks x FLOPs of one block call of the layer (counted once per layer and block
  shape). The per-voxel layers between them (crops, concatenations, channel selection)
  are not counted: they do no or negligible arithmetic. `calls` = blocks, `traces` =
  distinct (layer, block shape), `flops_per_call` null, `input_shape` the whole padded
  volume, `estimate_mb` the memory estimate compared with the budget.
`useful_share` is the share of the computed output voxels that lie in the case's cropped
grid (the rest is padding: slices rounded up to the pooling multiple, 3D tiles past the
grid, padded batches; layer-wise: the last blocks of the logits layer past the grid; the
padded last blocks of inner layers, and the sides a dilated convolution rounds up to its
dilation, are in the FLOPs but not in this share).
Seconds: `first_s` is the first run over the case (loading and tracing included), `warm_s`
the second; `network_s` the time inside the network calls of the warm run (the rest is
NumPy slicing, padding and pasting; layer-wise: the time inside `predict_layerwise_3d`,
which includes its own block slicing and pasting). Weights are random (speed only). Every
line carries the peak RSS of the process so far (ru_maxrss). --dry_run: no network runs
(zeros come back; a layer-wise model is not run at all), FLOPs and calls only.

    python -m bench.bench_inference [--preset small|paper] [--tile_size 64] [--train]
        [--phantom_shape 64,64,48] [--peak_size 4096] [--networks model1_axial,A] [--skip_ensemble]
        [--memory_budget_gb 8] [--precision fp32|bf16] [--dry_run]
        [--anchor_python /work/anchor_venv/bin/python] [--anchor_roi 240,240,160]
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from bench import flops
from bench.bench_3d import PREPROCESSING, REAL_CASE, Given, export_2d, export_3d
from brats_tf import preprocess
from brats_tf.configs import train2d, train3d
from brats_tf.constants import MEMORY_BUDGET_GB, ORIENTATIONS, PRECISIONS, TILE_SIZE_3D
from brats_tf.inference import exported, layerwise, predict
from brats_tf.inference import pipeline as segmentation
from brats_tf.inference.features import FeatureExtractor
from brats_tf.io.cases import discover_cases, load_case
from brats_tf.models import unet2d, unet3d
from brats_tf.records.slices import padded_size
from brats_tf.synthetic import generator as synthetic
from brats_tf.training import losses
from brats_tf.training.loop import build_train_step
from brats_tf.training.optim import NormalizedMomentum

KINDS_2D = ("model1", "model2")
KINDS_3D = ("A", "B", "C")
NETWORKS = tuple(f"{k}_{o}" for k in KINDS_2D for o in ORIENTATIONS) + KINDS_3D


def rss_mb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def emit(**record):
    record["peak_rss_mb"] = rss_mb()
    print(json.dumps(record), flush=True)


# --- the machine's peak ----------------------------------------------------------------------------

def matmul_gflops(n, dtype, repeats):
    """Best GFLOP/s of an n x n x n matmul (2 n^3 FLOPs) over `repeats` timed calls."""
    a = tf.cast(tf.random.normal((n, n), seed=1), dtype)
    b = tf.cast(tf.random.normal((n, n), seed=2), dtype)
    matmul = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))   # a scalar back: no copy-out
    matmul(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best / 1e9


def measure_peak(n, repeats):
    fp32 = matmul_gflops(n, tf.float32, repeats)
    try:
        bf16 = matmul_gflops(n, tf.bfloat16, repeats)
    except (tf.errors.OpError, TypeError, ValueError) as err:   # no bf16 matmul kernel
        bf16, note = None, f"bf16 matmul failed: {type(err).__name__}"
    else:
        note = None if bf16 > fp32 else f"bf16 measured {bf16:.1f} GFLOP/s, not faster than fp32"
    bf16 = None if note else bf16
    emit(what="peak", matrix=n, repeats=repeats, fp32_gflops=round(fp32, 1),
         bf16_gflops=None if bf16 is None else round(bf16, 1), note=note)
    return fp32, bf16


def inference_peak(precision, fp32, bf16):
    """(the peak inference shares are against, a note or None)."""
    if precision != "bf16":
        return fp32, None
    if bf16 is None:
        return fp32, "no bf16 peak above fp32 measured: bf16 shares are against the fp32 peak"
    return bf16, None


# --- the anchor: MONAI's SegResNet (issue 14 item 6) --------------------------------------------------

ANCHOR = Path(__file__).resolve().with_name("bench_monai.py")


def run_anchor(python, phantom_shape, options):
    """Runs bench/bench_monai.py under `python` on the case this bench uses (a phantom of
    `phantom_shape`, else the real case, else a 240x240x155 phantom as `the_case`); emits its
    line, or one error line. Its record, or None when it failed."""
    command = [python, str(ANCHOR), "--peak_size", str(options.peak_size),
               "--peak_repeats", str(options.peak_repeats)]
    if phantom_shape is not None:
        command += ["--phantom_shape", ",".join(map(str, phantom_shape))]
    elif REAL_CASE.is_dir():
        command += ["--case", str(REAL_CASE)]
    else:
        command += ["--phantom"]
    if options.anchor_roi:
        command += ["--roi", options.anchor_roi]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        record = next((r for r in lines if r.get("what") == "monai"), None)
        if result.returncode != 0 or record is None:
            raise RuntimeError(f"exit {result.returncode}: {result.stderr.strip()[-2000:] or 'no monai line'}")
    except (OSError, ValueError, RuntimeError) as err:
        emit(what="monai", error=f"{type(err).__name__}: {err}", command=command)
        return None
    print(json.dumps(record), flush=True)   # as it printed it (its own peak RSS)
    return record


def versus_monai(gflop_per_s, seconds, options):
    """The ratio fields of a line (none without --anchor_python; null when MONAI failed)."""
    if not options.anchor_python:
        return {}
    monai = options.monai
    return {"gflop_per_s_vs_monai": ratio(gflop_per_s, monai and monai["gflop_per_s"]),
            "seconds_vs_monai": ratio(seconds, monai and monai["warm_s"])}


def ratio(ours, theirs):
    return round(ours / theirs, 4) if ours is not None and theirs else None


# --- counting the calls the project's code makes -----------------------------------------------------

class Counted:
    """Stands in for an ExportedModel's network: forwards each call (the model loads on the
    first one, as it would unwrapped), records the executed input and output shapes and the
    time spent inside. dry: the network is not run; each call returns zeros of its output
    shape (from the traced graph), so the project's code runs through and its calls are
    counted without the arithmetic."""

    def __init__(self, model, table, dry=False):
        if model.shapes is not None:
            raise ValueError("fixed network shapes (bundles, --max_grid) are not benchmarked here")
        self.model, self.table, self.dry, self.inner = model, table, dry, None
        self.reset()

    def reset(self):
        self.shapes, self.seconds, self.largest = [], 0.0, 0

    def __call__(self, x, training=False):
        array = np.asarray(next(v for k, v in x.items() if k != "present") if isinstance(x, dict) else x)
        # predict.compiled pads a smaller batch to the largest seen so far: that shape runs.
        self.largest = max(self.largest, len(array))
        shape = (self.largest,) + array.shape[1:]
        if self.dry:
            out_shape = self.table.per_call(self.model, shape).outputs[0]
            self.shapes.append((shape, out_shape))
            return np.zeros((len(array),) + tuple(out_shape[1:]), np.float32)
        if self.inner is None:
            self.inner = self.model.keras_model   # loads and wraps in predict.compiled
        start = time.perf_counter()
        result = self.inner(x, training=training)
        self.seconds += time.perf_counter() - start
        out = result[0] if isinstance(result, (list, tuple)) else result
        self.shapes.append((shape, (self.largest,) + tuple(out.shape[1:])))
        return result

    def traces(self):
        """Distinct executed input shapes (predict.compiled traces once per shape)."""
        return len({s for s, _ in self.shapes})


def counted(model, table, dry):
    model._network = Counted(model, table, dry)
    return model._network


class LayerwiseRuns:
    """Stands in for `layerwise.predict_layerwise_3d` (see `recording_layerwise`): records
    each run's Keras model and volume shape and the time spent inside. dry: nothing runs;
    zero logits of the volume's grid come back."""

    def __init__(self, original, dry=False):
        self.original, self.dry = original, dry
        self.reset()

    def reset(self):
        self.runs, self.seconds = [], 0.0

    def __call__(self, model, volume, margin, *args, **kwargs):
        self.runs.append((model, tuple(np.shape(volume)), margin))
        if self.dry:
            return np.zeros(np.shape(volume)[:3] + (int(model.outputs[0].shape[-1]),), np.float32)
        start = time.perf_counter()
        result = self.original(model, volume, margin, *args, **kwargs)
        self.seconds += time.perf_counter() - start
        return result

    def of(self, models):
        """{ExportedModel path: [(Keras model, volume shape, margin)]} of the recorded runs."""
        paths = {id(m._layers): m.path for m in models if m._layers is not None}
        by_path = {}
        for run in self.runs:
            by_path.setdefault(paths[id(run[0])], []).append(run)
        return by_path


@contextlib.contextmanager
def recording_layerwise(dry):
    """The pipeline imports `layerwise` and calls its `predict_layerwise_3d` at each run:
    replaced by a recording LayerwiseRuns while the block runs."""
    runs = LayerwiseRuns(layerwise.predict_layerwise_3d, dry)
    layerwise.predict_layerwise_3d = runs
    try:
        yield runs
    finally:
        layerwise.predict_layerwise_3d = runs.original


class FlopTable:
    """FLOPs per (model file, precision, input shape) and per (model file, layer, block
    shape), each counted once from the graph."""

    def __init__(self):
        self.networks, self.counts, self.blocks = {}, {}, {}

    def per_call(self, model, shape):
        key = (model.path, model.precision, shape)
        if key not in self.counts:
            if key[:2] not in self.networks:   # the network inference runs (2D: main head only)
                self.networks[key[:2]] = exported.load_network(model.path, model.stage, model.precision)
            self.counts[key] = flops.model_call_flops(self.networks[key[:2]], shape)
        return self.counts[key]

    def of_calls(self, model, calls):
        """(FLOPs, computed output voxels, first call's FlopCount or None) of the recorded calls."""
        total, voxels = 0, 0
        for in_shape, out_shape in calls.shapes:
            total += self.per_call(model, in_shape).total
            voxels += int(np.prod(out_shape[:-1]))
        return total, voxels, self.per_call(model, calls.shapes[0][0]) if calls.shapes else None

    def per_block(self, path, layer, shape):
        key = (path, layer.name, shape)   # layer names are unique within a model
        if key not in self.blocks:
            self.blocks[key] = flops.count_flops(lambda x: layer(x), tf.TensorSpec(shape))
        return self.blocks[key]

    def of_layerwise(self, path, runs):
        """Of a model's recorded layer-wise runs: FLOPs, computed output voxels (the logits
        layer's blocks), blocks, distinct (layer, block shape), uncounted op types."""
        total = voxels = blocks = 0
        distinct, uncounted = set(), {}
        for keras_model, shape, margin in runs:
            calls = layerwise.block_calls(keras_model, shape, margin)
            for layer, block_shape, count in calls:
                one = self.per_block(path, layer, block_shape)
                total, blocks = total + count * one.total, blocks + count
                if (layer.name, block_shape) not in distinct:
                    distinct.add((layer.name, block_shape))
                    for op, n in one.uncounted.items():
                        uncounted[op] = uncounted.get(op, 0) + n
            layer, block_shape, count = calls[-1]   # the logits layer
            voxels += count * int(np.prod(self.per_block(path, layer, block_shape).outputs[0][1:4]))
        return {"flops": total, "voxels": voxels, "blocks": blocks, "traces": len(distinct), "uncounted": uncounted}


def rounded(seconds):
    return None if seconds is None else round(seconds, 3)


def rates(total_flops, seconds, peak):
    gflops = total_flops / seconds / 1e9 if seconds else None
    return {"gflop": round(total_flops / 1e9, 3), "gflop_per_s": None if gflops is None else round(gflops, 2),
            "share_of_peak": None if gflops is None else round(gflops / peak, 4)}


# --- the case and the models ----------------------------------------------------------------------

def the_case(workdir, phantom_shape):
    if phantom_shape is None and REAL_CASE.is_dir():
        return discover_cases(REAL_CASE)[0], "real"
    data = Path(workdir) / "phantom"
    synthetic.write_dataset(data, 1, seed=0, shape=phantom_shape, progress=False)   # default 240x240x155
    return discover_cases(data)[0], "phantom"


def export_models(preset, workdir):
    triples = {k: {o: export_2d(k, o, preset, Path(workdir) / f"{k}_{o}") for o in ORIENTATIONS} for k in KINDS_2D}
    three_d = {(k, f): export_3d(k, preset, triples[f], Path(workdir) / f"{k}_{f}") for f in KINDS_2D for k in KINDS_3D}
    return triples, three_d


def run_twice(fn, calls, dry=False):
    """(first s, warm s, s inside the network in the warm run); `calls` records the warm run.
    dry: one run, no seconds."""
    if dry:
        fn()
        return None, None, None
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for c in calls:
        c.reset()
    start = time.perf_counter()
    fn()
    return first, time.perf_counter() - start, sum(c.seconds for c in calls)


def load(path, precision):
    """An exported model, in `precision` before its first use."""
    model = exported.load_exported(path)
    model.precision = precision
    return model


def bench_networks(triples, three_d, prepared, options, table, peak, wanted):
    """One line per network (those named in `wanted`); returns [share of peak], model A's line
    (None when not run)."""
    grid = int(np.prod(prepared.box.shape))
    dry = options.dry_run
    results, model_a = [], None
    for kind in KINDS_2D:
        for orientation in ORIENTATIONS:
            if f"{kind}_{orientation}" not in wanted:
                continue
            model = load(triples[kind][orientation], options.precision)
            calls = counted(model, table, dry)
            first, warm, inside = run_twice(
                lambda: segmentation.predict_2d(model, prepared.image, segmentation.BATCH_SIZE_2D), [calls], dry)
            results.append(network_line(f"{kind}_{orientation}", "2d", model, calls, table, grid, options,
                                        first, warm, inside, peak)["share_of_peak"])
            del model, calls
            gc.collect()
    if not wanted & set(KINDS_3D):
        return results, model_a
    if dry:   # only the shape matters
        features = np.zeros(prepared.image.shape[:3] + (12,), np.float16)
    else:
        features = FeatureExtractor(triples["model1"]).extract(prepared.image).astype(np.float16)
    volume = Given(np.concatenate([prepared.image.astype(np.float16), features], axis=-1))
    for kind in (k for k in KINDS_3D if k in wanted):
        model = load(three_d[(kind, "model1")], options.precision)
        run = (model, None, volume, segmentation.BATCH_SIZE_2D, options.tile_size, {})
        calls = counted(model, table, dry)
        with recording_layerwise(dry) as runs:
            first, warm, inside = run_twice(
                lambda: segmentation.predict_model(*run, memory_budget_gb=options.memory_budget_gb),
                [calls, runs], dry)
        if segmentation.runs_layerwise(model, volume.volume.shape, options.memory_budget_gb, options.tile_size):
            line = layerwise_line(kind, model, runs, table, grid, options, first, warm, inside, peak,
                                  volume.volume.shape)
        else:
            line = network_line(kind, "3d", model, calls, table, grid, options, first, warm, inside, peak,
                                method="tiled", tile=predict.fitted_tile_size(prepared.box.shape, options.tile_size),
                                features="model1")
        results.append(line["share_of_peak"])
        if kind == "A":
            model_a = line
        del model, calls, runs
        gc.collect()
    return results, model_a


def network_line(name, stage, model, calls, table, grid, options, first, warm, inside, peak, **extra):
    total, voxels, one = table.of_calls(model, calls)
    line = {"what": "network", "network": name, "stage": stage, "preset": options.preset,
            "precision": options.precision, "calls": len(calls.shapes), "traces": calls.traces(),
            "input_shape": list(calls.shapes[0][0]), "flops_per_call": one.total, **extra, **rates(total, warm, peak),
            "useful_share": round(grid / voxels, 4), "first_s": rounded(first), "warm_s": rounded(warm),
            "network_s": rounded(inside), "uncounted_ops": one.uncounted}
    line.update(versus_monai(line["gflop_per_s"], warm, options))
    emit(**line)
    return line


def layerwise_line(name, model, runs, table, grid, options, first, warm, inside, peak, shape):
    """A 3D network run layer by layer: FLOPs of its blocks (`FlopTable.of_layerwise`)."""
    count = table.of_layerwise(model.path, runs.of([model])[model.path])
    estimate = layerwise.peak_bytes(model.layers_model, shape, model.margin)
    line = {"what": "network", "network": name, "stage": "3d", "preset": options.preset,
            "precision": options.precision, "method": "layerwise", "block": layerwise.DEFAULT_BLOCK,
            "estimate_mb": round(estimate / 2 ** 20, 1), "calls": count["blocks"], "traces": count["traces"],
            "input_shape": [1, *(n + 2 * model.margin for n in shape[:3]), shape[3]], "flops_per_call": None,
            "features": "model1", **rates(count["flops"], warm, peak), "useful_share": round(grid / count["voxels"], 4),
            "first_s": rounded(first), "warm_s": rounded(warm), "network_s": rounded(inside),
            "uncounted_ops": count["uncounted"]}
    line.update(versus_monai(line["gflop_per_s"], warm, options))
    emit(**line)
    return line


def bench_ensemble(case, triples, three_d, workdir, options, table, peak):
    paths = [p for triple in triples.values() for p in triple.values()] + list(three_d.values())
    plan = exported.plan_models(paths, precision=options.precision)
    models = plan.models()
    dry = options.dry_run
    calls = [counted(m, table, dry) for m in models]
    out = Path(workdir) / "out"
    with recording_layerwise(dry) as runs:
        first, warm, inside = run_twice(
            lambda: segmentation.segment_case(case, plan, out, tile_size=options.tile_size,
                                              memory_budget_gb=options.memory_budget_gb), calls + [runs], dry)
    total = sum(table.of_calls(model, c)[0] for model, c in zip(models, calls))
    layered = [table.of_layerwise(path, r) for path, r in runs.of(models).items()]
    total += sum(c["flops"] for c in layered)
    gflop_per_s = None if dry else total / warm / 1e9
    emit(what="ensemble", preset=options.preset, precision=options.precision, final_models=len(plan.final),
         networks=len(models), layerwise_runs=len(runs.runs), calls=sum(len(c.shapes) for c in calls)
         + sum(c["blocks"] for c in layered), tile_size=options.tile_size,
         memory_budget_gb=options.memory_budget_gb, **rates(total, warm, peak),
         traces=sum(c.traces() for c in calls) + sum(c["traces"] for c in layered), first_s=rounded(first),
         warm_s=rounded(warm), network_s=rounded(inside), **versus_monai(gflop_per_s, warm, options))
    return warm, None if dry else gflop_per_s / peak, gflop_per_s


# --- training (item 7) ------------------------------------------------------------------------------

def train_setups(preset, slice_shape):
    """(name, model, config, x shape, y shape, output names, head weights, loss) per trained model."""
    c2, c3 = train2d.get_config(preset), train3d.get_config(preset)
    m1 = unet2d.build_2d_model_1(4, c2.model.preset)
    names = list(m1.output_names)
    weights = losses.deep_supervision_weights(names, c2.loss.main_weight)
    yield ("model1", m1, c2, (c2.data.batch_size, *slice_shape, 4), (c2.data.batch_size, *slice_shape), names,
           weights, losses.weighted_cross_entropy(tuple(c2.loss.target_weights)))
    size = c3.model.input_size
    a = unet3d.build_3d_model("A", 4, 12, c3.model.preset)
    batch = c3.data.batch_size
    yield ("A", a, c3, (batch, size, size, size, 16), (batch,) + (unet3d.output_size(size),) * 3,
           ["main"], {"main": 1.0}, losses.weighted_cross_entropy(tuple(c3.loss.target_weights)))


def bench_training(preset, slice_shape, timed, peak):
    shares = []
    for name, model, config, x_shape, y_shape, names, weights, loss_fn in train_setups(preset, slice_shape):
        def total_loss(y, outputs):
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            return tf.add_n([weights[n] * loss_fn(y, o) for n, o in zip(names, outputs)])

        n = int(config.optim.accumulation_steps)
        count = flops.gradient_flops(model, x_shape, y_shape, total_loss)
        line = {"what": "train", "model": name, "preset": preset, "precision": "fp32", "batch_shape": list(x_shape),
                "N": n,
                "flops_per_batch": count.total, "profiler_flops": count.profiler, "added_flops": count.added,
                "forward_flops_per_batch": flops.model_call_flops(model, x_shape).total,
                "uncounted_ops": count.uncounted, "iteration_gflop": round(n * count.total / 1e9, 3)}
        if timed:
            micro = int(config.train.get("micro_batches", 1) or 1)
            step = build_train_step(model, NormalizedMomentum(0.25, accumulation_steps=n), tf.distribute.get_strategy(),
                                    names, weights, loss_fn, micro_batches=micro)
            x = tf.random.normal(x_shape, seed=3)
            y = tf.random.uniform(y_shape, 0, 4, dtype=tf.int32, seed=4)
            start = time.perf_counter()
            step(x, y)["loss"].numpy()   # trace + first batch
            first = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(n):
                step(x, y)["loss"].numpy()
            seconds = time.perf_counter() - start
            line.update(micro_batches=micro, first_step_s=round(first, 3), iteration_s=round(seconds, 3),
                        **{k: v for k, v in rates(n * count.total, seconds, peak).items() if k != "gflop"})
            shares.append(line["share_of_peak"])
        emit(**line)
        del model
        gc.collect()
    return shares


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", choices=["small", "paper"], help="2D and 3D model widths")
    parser.add_argument("--tile_size", type=int, default=TILE_SIZE_3D, help="largest 3D output tile side")
    parser.add_argument("--phantom_shape", default=None,
                        help="X,Y,Z: benchmark on a phantom of this shape (even when the real case is there)")
    parser.add_argument("--peak_size", type=int, default=4096, help="side of the peak-measuring matmuls")
    parser.add_argument("--peak_repeats", type=int, default=3)
    parser.add_argument("--networks", default=",".join(NETWORKS),
                        help="comma-separated networks run alone (default: all; '' for none)")
    parser.add_argument("--skip_ensemble", action="store_true")
    parser.add_argument("--train", action="store_true", help="also time one training iteration (else FLOPs only)")
    parser.add_argument("--dry_run", action="store_true",
                        help="count calls and FLOPs only: networks are not run (zeros come back), no seconds")
    parser.add_argument("--memory_budget_gb", type=float, default=MEMORY_BUDGET_GB,
                        help="a 3D model runs layer by layer when its memory estimate fits this (GB), else "
                             "tiled; 0: always tiled (as segment)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="the inference networks' precision (as segment); training stays fp32")
    parser.add_argument("--anchor_python", default=None,
                        help="python of the anchor's venv (bench/requirements-anchor.txt): also run MONAI's "
                             "SegResNet (bench/bench_monai.py) on the same case, and the ratios to it")
    parser.add_argument("--anchor_roi", default=None,
                        help="X,Y,Z: the anchor's sliding-window size (default the bundle's 240,240,160)")
    args = parser.parse_args()
    phantom_shape = synthetic.parse_shape(args.phantom_shape)
    wanted = {n for n in args.networks.split(",") if n}
    if wanted - set(NETWORKS):
        parser.error(f"--networks: unknown {sorted(wanted - set(NETWORKS))}; known: {','.join(NETWORKS)}")
    if args.anchor_python and args.dry_run:
        parser.error("--anchor_python times MONAI: not with --dry_run")
    emit(what="env", tf=tf.__version__, python=sys.version.split()[0], cpus=os.cpu_count(),
         machine=platform.processor() or platform.machine(),
         threads_intra=tf.config.threading.get_intra_op_parallelism_threads())
    peak_fp32, peak_bf16 = measure_peak(args.peak_size, args.peak_repeats)
    peak, peak_note = inference_peak(args.precision, peak_fp32, peak_bf16)
    args.monai = run_anchor(args.anchor_python, phantom_shape, args) if args.anchor_python else None
    table = FlopTable()
    with tempfile.TemporaryDirectory() as workdir:
        case, source = the_case(workdir, phantom_shape)
        loaded = load_case(case, PREPROCESSING["modalities"], with_label=False)
        prepared = preprocess.prepare_case(loaded, "median", PREPROCESSING["median_scale"],
                                           PREPROCESSING["crop_margin"])
        emit(what="case", source=source, case_id=case.case_id, shape=list(loaded.image.shape[:3]),
             cropped=list(prepared.box.shape))
        del loaded
        triples, three_d = export_models(args.preset, workdir)
        shares, model_a = bench_networks(triples, three_d, prepared, args, table, peak, wanted)
        ensemble_s = ensemble_gflop_per_s = None
        if not args.skip_ensemble:
            ensemble_s, share, ensemble_gflop_per_s = bench_ensemble(case, triples, three_d, workdir, args, table,
                                                                     peak)
            shares.append(share)
        multiple = unet2d.pooling_factor("model1", args.preset)
        slice_shape = tuple(padded_size(n, multiple) for n in prepared.box.shape[:2])   # axial slices of the case
        shares += bench_training(args.preset, slice_shape, args.train and not args.dry_run, peak_fp32)
    monai = args.monai or {}
    model_a = model_a or {}
    emit(what="summary", preset=args.preset, precision=args.precision, memory_budget_gb=args.memory_budget_gb,
         source=source, peak_fp32_gflops=round(peak_fp32, 1),
         peak_bf16_gflops=None if peak_bf16 is None else round(peak_bf16, 1), peak_note=peak_note,
         ensemble_s=None if ensemble_s is None else round(ensemble_s, 3),
         model_a_s=model_a.get("warm_s"),
         min_share_of_peak=min((round(s, 4) for s in shares if s is not None), default=None),
         monai_s=monai.get("warm_s"), monai_gflop_per_s=monai.get("gflop_per_s"),
         monai_share_of_peak=monai.get("share_of_peak"),
         gflop_per_s_ratio_to_monai=ratio(ensemble_gflop_per_s, monai.get("gflop_per_s")),
         seconds_ratio_to_monai=ratio(ensemble_s, monai.get("warm_s")),
         model_a_gflop_per_s_ratio_to_monai=model_a.get("gflop_per_s_vs_monai"),
         model_a_seconds_ratio_to_monai=model_a.get("seconds_vs_monai"),
         dry_run=args.dry_run)


if __name__ == "__main__":
    main()
