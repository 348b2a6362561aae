"""Layer-wise against tiled whole-case inference of 2D-3D model A (issue 14 item 2), one JSON
line: FLOPs (counted per tile / per block with bench/flops.py), first and warm seconds, peak RSS,
and the largest logit difference between the two methods. Random weights (speed only); the
real BraTS 2023 case when ../shared is there, else a 240x240x155 phantom.

    python -m bench.bench_layerwise [--preset small|paper] [--method both|tiled|layerwise] [--block 96] \
        [--precision fp32|bf16]

Also the FLOPs of one pass of the network over the whole padded volume (counted from its
graph, not run) and each method's overhead against them, and the memory `segment` expects of the layer-wise run (`layerwise.peak_bytes`, what it
compares with --memory_budget_gb) beside the RSS growth measured over it.
"""

import argparse
import json
import os
import resource
import tempfile
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from bench import flops
from bench.bench_3d import PREPROCESSING, REAL_CASE
from brats_tf import preprocess
from brats_tf.constants import TILE_SIZE_3D
from brats_tf.inference import predict
from brats_tf.constants import PRECISIONS
from brats_tf.inference.layerwise import DEFAULT_BLOCK, peak_bytes, predict_layerwise_3d
from brats_tf.io.cases import discover_cases, load_case
from brats_tf.models import unet3d
from brats_tf.models.precision import with_precision
from brats_tf.synthetic import generator as synthetic


def the_volume():
    """The prepared case's 4 image channels and 12 random feature channels (float32)."""
    if REAL_CASE.is_dir():
        case, source = discover_cases(REAL_CASE)[0], "real"
    else:
        folder = tempfile.mkdtemp()
        synthetic.write_dataset(folder, 1, 0, progress=False)
        case, source = discover_cases(folder)[0], "phantom"
    loaded = load_case(case, PREPROCESSING["modalities"])
    prepared = preprocess.prepare_case(loaded, "median", PREPROCESSING["median_scale"], PREPROCESSING["crop_margin"])
    features = np.random.default_rng(0).normal(size=prepared.image.shape[:3] + (12,))
    return np.concatenate([prepared.image, features], -1).astype(np.float32), source


def rss_mb():
    """Peak RSS of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssGrowth:
    """The largest resident-memory growth over a `with` block, MB: /proc/self/statm sampled
    every 20 ms from a thread, against the resident size when the block starts."""

    def __enter__(self):
        self.start, self.peak, self.running = current_rss_mb(), 0.0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, current_rss_mb())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.mb = round(max(self.peak, current_rss_mb()) - self.start)


def current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def timed_twice(fn):
    seconds = []
    for _ in range(2):
        start = time.time()
        result = fn()
        seconds.append(round(time.time() - start, 1))
    return result, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=("small", "paper"))
    parser.add_argument("--method", default="both", choices=("both", "tiled", "layerwise"))
    parser.add_argument("--block", type=int, default=DEFAULT_BLOCK)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    args = parser.parse_args()
    volume, source = the_volume()
    keras.utils.set_random_seed(0)
    model = with_precision(unet3d.build_3d_model("A", 4, 12, args.preset), args.precision)
    voxels = int(np.prod(volume.shape[:3]))
    line, outputs = {"preset": args.preset, "precision": args.precision, "source": source,
                     "grid": list(volume.shape[:3])}, {}
    if args.method in ("both", "tiled"):
        tile = predict.fitted_tile_size(volume.shape[:3], TILE_SIZE_3D)
        tiles = int(np.prod([-(-n // tile) for n in volume.shape[:3]]))
        gflop = flops.model_call_flops(model, (1,) + (tile + 2 * unet3d.MARGIN,) * 3 + (16,)).total * tiles / 1e9
        outputs["tiled"], (first, warm) = timed_twice(
            lambda: predict.predict_tiled_3d(model, volume, tile + 2 * unet3d.MARGIN, tile, batch_size=1))
        line["tiled"] = {"tile": tile, "tiles": tiles, "gflop": round(gflop, 1), "first_s": first, "warm_s": warm}
    if args.method in ("both", "layerwise"):
        per_block, total = {}, [0]

        def count(layer, shape):
            key = (layer.name, tuple(shape))
            if key not in per_block:
                per_block[key] = flops.count_flops(lambda x: layer(x), tf.TensorSpec(tuple(shape))).total
            total[0] += per_block[key]
        with RssGrowth() as growth:
            predict_layerwise_3d(model, volume, unet3d.MARGIN, block=args.block, on_block=count)
        line["layerwise_rss_growth_mb"] = growth.mb
        line["layerwise_estimate_mb"] = round(peak_bytes(model, volume.shape, unet3d.MARGIN, args.block) / 2 ** 20)
        outputs["layerwise"], (first, warm) = timed_twice(
            lambda: predict_layerwise_3d(model, volume, unet3d.MARGIN, block=args.block))
        line["layerwise"] = {"block": args.block, "gflop": round(total[0] / 1e9, 1), "first_s": first, "warm_s": warm}
    for method in outputs:
        line[method]["mflop_per_voxel"] = round(line[method]["gflop"] * 1e3 / voxels, 3)
    # The network once over the whole padded volume (counted from its graph, never run: it
    # would not fit in memory): the FLOPs no method can go below; each method's overhead.
    whole = flops.model_call_flops(model, (1,) + tuple(n + 2 * unet3d.MARGIN for n in volume.shape[:3]) + (16,))
    line["whole_volume_gflop"] = round(whole.total / 1e9, 1)
    for method in outputs:
        line[method]["overhead"] = round(line[method]["gflop"] * 1e9 / whole.total, 3)
    if len(outputs) == 2:
        line["max_abs_difference"] = float(np.abs(outputs["tiled"] - outputs["layerwise"]).max())
    line["peak_rss_mb"] = round(rss_mb())
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
