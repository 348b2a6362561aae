"""How many slices per forward pass a 2D model runs fastest with (issue 14 item 2), JSON lines.

2D model 1 (random weights) over every axial slice of the brain-cropped real case (else a
240x240x155 phantom), through the project's own `predict.predict_2d_logits` with a traced
model (`predict.compiled`, as `segment` runs it), once per batch size: warm seconds, slices
per second, at each precision. The last line names the fastest batch size per precision.

    python -m bench.bench_2d_batch [--preset small|paper] [--batch_sizes 1,2,4,8,16]
        [--precisions fp32,bf16]
"""

import argparse
import json
import time

import keras
import numpy as np

from bench.bench_layerwise import the_volume
from brats_tf.inference import predict
from brats_tf.models import unet2d
from brats_tf.models.precision import with_precision


def emit(**record):
    print(json.dumps(record), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=("small", "paper"))
    parser.add_argument("--batch_sizes", default="1,2,4,8,16")
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    volume, source = the_volume()
    image = volume[..., :4]
    multiple = unet2d.pooling_factor("model1", args.preset)
    best = {}
    for precision in args.precisions.split(","):
        keras.utils.set_random_seed(0)
        network = with_precision(unet2d.inference_model(unet2d.build_2d_model_1(4, args.preset)), precision)
        for batch in map(int, args.batch_sizes.split(",")):
            model = predict.compiled(network)   # a fresh trace per batch size, as one segment run has
            run = lambda: predict.predict_2d_logits(model, image, "axial", multiple, batch)
            run()
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            emit(what="batch", preset=args.preset, precision=precision, source=source, batch_size=batch,
                 slices=int(image.shape[2]), warm_s=round(seconds, 3), slices_per_s=round(image.shape[2] / seconds, 2))
            if seconds < best.get(precision, (None, np.inf))[1]:
                best[precision] = (batch, seconds)
    emit(what="summary", preset=args.preset, fastest_batch_size={p: b for p, (b, _) in best.items()})


if __name__ == "__main__":
    main()
