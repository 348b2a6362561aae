"""3D-stage benchmarks, printing JSON lines.

  case              the 240x240x155 case used (real BraTS 2023 case if ../shared is there,
                    else a phantom) and its brain-cropped grid
  infer_2d          one 2D model, one orientation, over the whole case
  extract_features  the three orientations (12 feature channels)
  infer_3d          one 2D-3D model A, tiled over the whole cropped volume (features given)
  ensemble          the whole six-model 2D-3D ensemble, end to end as `segment` runs it:
                    2D model 1 and 2D model 2 x 3 orientations -> two feature sets ->
                    A, B, C on each -> hierarchical vote -> files written
  (the training input pipeline: bench/bench_pipelines.py)
  train_consumption patches/s a 3D training step consumes (same patch size)
  paper_step        (--paper_step B) one paper-scale model A training step, B patches of 70³
Each line carries the peak RSS so far. Inference times are warm (models loaded and traced
by a first run, whose time is given as first_s); weights are random (speed only).

    python -m bench.bench_3d [--preset small] [--tile_size 64] [--patch_sizes 54,70] [--skip_ensemble]
"""

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from brats_tf.constants import ORIENTATIONS, TILE_SIZE_3D
from brats_tf import preprocess
from brats_tf.training import losses
from brats_tf.inference import exported
from brats_tf.inference import pipeline as segmentation
from brats_tf.synthetic import generator as synthetic
from brats_tf.inference.features import FeatureExtractor
from brats_tf.io.cases import discover_cases, load_case
from brats_tf.models import unet2d, unet3d
from brats_tf.training.optim import NormalizedMomentum
from brats_tf.training.loop import build_train_step

REAL_CASE = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2023_glioma_case"
PREPROCESSING = {"normalization": "median", "median_scale": preprocess.DEFAULT_MEDIAN_SCALE,
                 "crop_margin": preprocess.DEFAULT_CROP_MARGIN, "modalities": ["t1", "t1c", "t2", "flair"]}


def emit(**record):
    record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(record), flush=True)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def warm_and_time(fn):
    """(first call seconds, second call seconds)."""
    _, first = timed(fn)
    _, second = timed(fn)
    return round(first, 2), round(second, 2)


def the_case(workdir):
    if REAL_CASE.is_dir():
        return discover_cases(REAL_CASE)[0]
    data = Path(workdir) / "phantom"
    synthetic.write_dataset(data, 1, seed=0)   # site a: 240x240x155
    return discover_cases(data)[0]


def export(model, folder, info):
    """A work dir like the trainer's export: model.keras + model_info.json."""
    os.makedirs(folder, exist_ok=True)
    model.save(os.path.join(folder, "model.keras"))
    with open(os.path.join(folder, "model_info.json"), "w") as f:
        json.dump(info, f)
    return str(folder)


def export_2d(kind, orientation, preset, folder):
    modalities = PREPROCESSING["modalities"]
    info = {"stage": "2d", "kind": kind, "preset": preset, "modalities": modalities, "orientation": orientation,
            "subnetwork": None, "pooling_factor": unet2d.pooling_factor(kind, preset), "preprocessing": PREPROCESSING}
    return export(unet2d.build_2d_model(kind, modalities, preset), folder, info)


def export_3d(kind, preset, triple, folder):
    """A 2D-3D model whose model_info names its three 2D models by hash, as training does."""
    chain = {}
    for orientation, path in triple.items():
        model = exported.load_exported(path)
        chain[orientation] = {"path": model.path, "sha256": model.sha256}
    info = {"stage": "3d", "kind": kind, "preset": preset, "modalities": PREPROCESSING["modalities"],
            "num_features": 12, "preprocessing": PREPROCESSING, "features": {"models": chain}}
    return export(unet3d.build_3d_model(kind, 4, 12, preset), folder, info)


def bench_inference(case, preset_2d, preset_3d, tile_size, workdir, skip_ensemble):
    loaded = load_case(case, PREPROCESSING["modalities"], with_label=False)
    prepared = preprocess.prepare_case(loaded, "median", PREPROCESSING["median_scale"], PREPROCESSING["crop_margin"])
    emit(bench="case", case_id=case.case_id, shape=list(loaded.image.shape[:3]), cropped=list(prepared.box.shape))
    triples = {kind: {o: export_2d(kind, o, preset_2d, Path(workdir) / f"{kind}_{o}") for o in ORIENTATIONS}
               for kind in ("model1", "model2")}

    axial = exported.load_exported(triples["model1"]["axial"])
    first, warm = warm_and_time(lambda: segmentation.predict_2d(axial, prepared.image, 8))
    emit(bench="infer_2d", model="model1", preset=preset_2d, orientation="axial", batch_size=8,
         first_s=first, seconds=warm)

    extractor = FeatureExtractor(triples["model1"])
    first, warm = warm_and_time(lambda: extractor.extract(prepared.image))
    emit(bench="extract_features", model="model1", preset=preset_2d, first_s=first, seconds=warm)

    features = extractor.extract(prepared.image).astype(np.float16)
    volume = np.concatenate([prepared.image.astype(np.float16), features], axis=-1)
    model_a = exported.load_exported(export_3d("A", preset_3d, triples["model1"], Path(workdir) / "A_model1"))
    first, warm = warm_and_time(lambda: segmentation.predict_model(model_a, None, Given(volume), 8, tile_size, {}))
    tile = segmentation.predict.fitted_tile_size(prepared.box.shape, tile_size)
    tiles = int(np.prod([-(-n // tile) for n in prepared.box.shape]))
    emit(bench="infer_3d", model="A", preset=preset_3d, largest_tile=tile_size, tile=tile, tiles=tiles,
         first_s=first, seconds=warm)
    if skip_ensemble:
        return
    paths = [p for triple in triples.values() for p in triple.values()]
    paths += [export_3d(k, preset_3d, triples[f], Path(workdir) / f"{k}_{f}") for f in triples for k in "ABC"]
    plan = exported.plan_models(paths)
    out = Path(workdir) / "out"
    run = lambda: segmentation.segment_case(case, plan, out, tile_size=tile_size)
    first, warm = warm_and_time(run)
    emit(bench="ensemble", models=len(plan.final), two_d_models=6, preset_2d=preset_2d, preset_3d=preset_3d,
         tile_size=tile_size, first_s=first, seconds=warm)


class Given:
    """Stands in for pipeline.PreparedInputs when a 3D model's input (image + features) is
    ready: the same volume for every model, no `present` input."""

    def __init__(self, volume):
        self.volume = volume

    def image_for(self, model):
        return self.volume

    def present_for(self, model):
        return None


def fake_cases(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    cases, feats = [], []
    for i in range(n):
        center = rng.uniform(0.3, 0.7, 3) * np.array(shape)
        r = np.linalg.norm(grid - center, axis=-1)
        label = np.select([r < 5, r < 10, r < 18], [1, 3, 2], 0).astype(np.uint8)
        cases.append(preprocess.PreparedCase(f"c{i}", rng.normal(size=shape + (4,)).astype(np.float16), label,
                                             np.ones(shape, bool), None, ()))
        feats.append(rng.normal(size=shape + (12,)).astype(np.float16))
    return cases, feats


def bench_patches(sizes, preset, batch_size):
    cases, feats = fake_cases(batch_size, (80, 80, 80))
    for size in sizes:
        half, out = size // 2, unet3d.output_size(size)
        x = np.stack([np.concatenate([c.image, f], -1)[40 - half:40 - half + size, 40 - half:40 - half + size,
                                                       40 - half:40 - half + size] for c, f in zip(cases, feats)])
        y = np.stack([c.label[40 - out // 2:40 - out // 2 + out, 40 - out // 2:40 - out // 2 + out,
                              40 - out // 2:40 - out // 2 + out] for c in cases])
        x, y = tf.constant(x, tf.float32), tf.constant(y, tf.int32)
        model = unet3d.build_3d_model("A", 4, 12, preset)
        step = build_train_step(model, NormalizedMomentum(0.25, accumulation_steps=5), tf.distribute.get_strategy(),
                                ["main"], {"main": 1.0}, losses.weighted_cross_entropy(losses.TARGET_WEIGHTS_3D))
        step(x, y)
        _, seconds = timed(lambda: [step(x, y)["loss"].numpy() for _ in range(3)])
        emit(bench="train_consumption", model="A", preset=preset, params=int(model.count_params()), input_size=size,
             batch_size=batch_size, step_s=round(seconds / 3, 3), patches_per_s=round(3 * batch_size / seconds, 2),
             label_voxels_per_s=round(3 * batch_size * out ** 3 / seconds))
        gc.collect()


def bench_paper_step(batch_size):
    """One training step of the paper-scale 2D-3D model A on 70³ patches (time, memory)."""
    model = unet3d.build_3d_model("A", 4, 12, "paper")
    step = build_train_step(model, NormalizedMomentum(0.25, accumulation_steps=5), tf.distribute.get_strategy(),
                            ["main"], {"main": 1.0}, losses.weighted_cross_entropy(losses.TARGET_WEIGHTS_3D))
    x = tf.random.normal((batch_size, 70, 70, 70, 16))
    y = tf.random.uniform((batch_size, 26, 26, 26), 0, 4, dtype=tf.int32)
    step(x, y)
    _, seconds = timed(lambda: step(x, y)["loss"].numpy())
    emit(bench="paper_step", model="A", preset="paper", params=int(model.count_params()), input_size=70,
         batch_size=batch_size, step_s=round(seconds, 2))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small", help="3D (and 2D) filter preset")
    parser.add_argument("--tile_size", type=int, default=TILE_SIZE_3D)
    parser.add_argument("--patch_sizes", default="54,70")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--skip_ensemble", action="store_true")
    parser.add_argument("--skip_inference", action="store_true")
    parser.add_argument("--skip_patches", action="store_true")
    parser.add_argument("--paper_step", type=int, default=0, help="batch size of a paper-scale step (0: skip)")
    args = parser.parse_args()
    emit(bench="env", tf=tf.__version__, cpus=os.cpu_count(), python=sys.version.split()[0])
    if not args.skip_inference:
        with tempfile.TemporaryDirectory() as workdir:
            bench_inference(the_case(workdir), args.preset, args.preset, args.tile_size, workdir, args.skip_ensemble)
    if not args.skip_patches:
        bench_patches([int(s) for s in args.patch_sizes.split(",")], args.preset, args.batch_size)
    if args.paper_step:
        bench_paper_step(args.paper_step)


if __name__ == "__main__":
    main()
