"""FLOPs per output voxel of the à trous and pooled 3D designs (issue 14 item 5), counted
from the graph (bench/flops.py), nothing run: one JSON line per preset, design and kind.

    python -m bench.bench_designs [--presets small,paper] [--kinds A,standard] [--tile_size 64]

For each: a training patch (70³ à trous, 68³ pooled: ~ the same label block), its inference
call and its training gradient (batch 1) per label voxel; whole-case inference on the real
case's 148x198x145 brain box tiled as `segment` tiles it (fitted tiles of side <= tile_size,
multiples of the design's period); and one pass over the whole padded box (what layer-wise
inference computes for à trous; a lower bound for the pooled design, which is always tiled).
"""

import argparse
import json
import math

import keras

from bench import flops
from brats_tf.inference import predict
from brats_tf.models import unet3d

BOX = (148, 198, 145)   # the real case's brain box (BUILD_NOTES, 3D figures)
PATCH = {"atrous": 70, "pooled": 68}


def measure(preset, design, kind, tile_size):
    geometry = unet3d.geometry(design)
    features = 0 if kind == "standard" else 12
    channels = 4 + features
    model = unet3d.build_3d_model(kind, 4, features, preset, design=design)
    line = {"preset": preset, "design": design, "kind": kind, "params": model.count_params()}

    size = PATCH[design]
    out = geometry.output_size(size)
    call = flops.model_call_flops(model, (1, size, size, size, channels)).total
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    logits = lambda outputs: outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    train = flops.gradient_flops(model, (1, size, size, size, channels), (1, out, out, out),
                                 lambda y, outputs: loss(y, logits(outputs))).total
    line.update(patch=f"{size}^3 -> {out}^3", patch_gflop=round(call / 1e9, 2),
                patch_mflop_per_voxel=round(call / out ** 3 / 1e6, 3),
                train_mflop_per_label_voxel=round(train / out ** 3 / 1e6, 3))

    tile = predict.fitted_tile_size(BOX, tile_size, geometry.period)
    tiles = math.prod(-(-n // tile) for n in BOX)
    side = tile + geometry.context
    per_tile = flops.model_call_flops(model, (1, side, side, side, channels)).total
    voxels = math.prod(BOX)
    line.update(tiles=f"{tiles} x {tile}^3 (input {side}^3)", tiled_gflop=round(per_tile * tiles / 1e9, 1),
                tiled_mflop_per_voxel=round(per_tile * tiles / voxels / 1e6, 3),
                tile_mflop_per_computed_voxel=round(per_tile / tile ** 3 / 1e6, 3))

    padded = [n + -n % geometry.period + geometry.context for n in BOX]
    whole = flops.model_call_flops(model, (1, *padded, channels)).total
    line.update(whole_pass_gflop=round(whole / 1e9, 1), whole_pass_mflop_per_voxel=round(whole / voxels / 1e6, 3))
    return line


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="small,paper")
    parser.add_argument("--kinds", default="A,standard")
    parser.add_argument("--tile_size", type=int, default=64)
    args = parser.parse_args()
    for preset in args.presets.split(","):
        for kind in args.kinds.split(","):
            for design in unet3d.DESIGNS:
                print(json.dumps(measure(preset, design, kind, args.tile_size)), flush=True)


if __name__ == "__main__":
    main()
