"""Multi-worker benchmark (issue 13, item 7), printing JSON lines:

  rate           iterations/s of the 2D (model 1) and 3D (standard) trainers on this machine,
                 1 process x 2 threads (strategy off) against 2 workers x 1 thread (the
                 launcher, MultiWorkerMirroredStrategy), the same global batch
  allreduce      bytes all-reduced per iteration by each model: the gradients every batch
                 (NormalizedMomentum sums them across replicas before the norm, N batches per
                 iteration), the synchronized batch-norm moments every batch, the loss's
                 class counts

Iterations/s come from two runs of each setting, `--short` and `--long` iterations: the
difference removes start-up and tracing. Small presets on phantoms; every run goes through
`python -m brats_tf.train` (and `python -m brats_tf.launch`) as a user would.

    python -m bench.bench_distributed [--short 4] [--long 24] [--workdir /tmp/bench_distributed]
"""

import argparse
import json
import os
import subprocess
import sys
import time

STAGES = {
    "2d": ["--config=brats_tf/configs/train2d.py:small", "--config.model.kind=model1"],
    "3d": ["--config=brats_tf/configs/train3d.py:small", "--config.model.kind=standard",
           "--config.model.input_size=54"],
}
GLOBAL_BATCH = 4
ACCUMULATION = 2


def emit(**record):
    print(json.dumps(record), flush=True)


def make_records(root):
    """Phantom records (built once)."""
    from brats_tf.records.writer import build_records
    from brats_tf.synthetic import generator
    records = os.path.join(root, "records")
    if not os.path.exists(os.path.join(records, "manifest.json")):
        generator.write_dataset(os.path.join(root, "phantoms"), num_cases=6, seed=0, shape=(64, 64, 48),
                                progress=False)
        build_records(os.path.join(root, "phantoms"), records, verbose=False)
    return records


def timed_run(stage, records, workdir, iterations, workers):
    flags = STAGES[stage] + [f"--config.data.records_dir={records}", f"--workdir={workdir}",
                             f"--config.train.iterations={iterations}",
                             f"--config.optim.accumulation_steps={ACCUMULATION}",
                             f"--config.data.batch_size={GLOBAL_BATCH // workers}", "--config.train.val_every=0",
                             "--config.data.num_val_cases=0",
                             f"--config.train.checkpoint_every={iterations}"]
    train = [sys.executable, "-m", "brats_tf.train", *flags]
    if workers == 1:
        command, env = train, {**os.environ, "TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "2"}
    else:
        command = [sys.executable, "-m", "brats_tf.launch", f"--workers={workers}", "--threads_per_worker=1", "--",
                   *train, "--config.train.strategy=multi_worker"]
        env = dict(os.environ)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{stage} {workers} worker(s): {(result.stdout + result.stderr)[-2000:]}")
    return time.perf_counter() - start


def allreduce_bytes(stage):
    """Bytes all-reduced per iteration (float32), by what is reduced."""
    import keras
    from brats_tf.configs import train2d, train3d
    from brats_tf.models import unet2d, unet3d
    if stage == "2d":
        c = train2d.get_config("small")
        model = unet2d.build_2d_model("model1", ("t1", "t1c", "t2", "flair"), c.model.preset)
    else:
        model = unet3d.build_3d_model("standard", 4, 0, "small", input_size=54)
    params = sum(int(keras.ops.size(w)) for w in model.trainable_weights)
    bn_channels = sum(int(layer.gamma.shape[0]) for layer in model.layers
                      if isinstance(layer, keras.layers.BatchNormalization))
    heads = len(model.outputs)
    per_batch = {"gradients": 4 * params, "batch_norm_moments": 4 * 3 * bn_channels,   # sum, sum of squares, count
                 "class_counts": 4 * 4 * heads}
    return params, {k: v * ACCUMULATION for k, v in per_batch.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--long", type=int, default=24)
    parser.add_argument("--workdir", default="/tmp/bench_distributed")
    args = parser.parse_args()
    records = make_records(args.workdir)
    for stage in STAGES:
        params, parts = allreduce_bytes(stage)
        emit(what="allreduce", stage=stage, trainable_parameters=params, accumulation_steps=ACCUMULATION,
             bytes_per_iteration=sum(parts.values()), **{f"{k}_bytes": v for k, v in parts.items()})
        for workers in (1, 2):
            seconds = {}
            for iterations in (args.short, args.long):
                workdir = os.path.join(args.workdir, f"{stage}_{workers}w_{iterations}")
                subprocess.run(["rm", "-rf", workdir], check=True)
                seconds[iterations] = timed_run(stage, records, workdir, iterations, workers)
            rate = (args.long - args.short) / (seconds[args.long] - seconds[args.short])
            emit(what="rate", stage=stage, workers=workers, threads_per_worker=2 // workers,
                 global_batch=GLOBAL_BATCH, accumulation_steps=ACCUMULATION, iterations_per_s=round(rate, 4),
                 startup_s=round(seconds[args.short] - args.short / rate, 1))


if __name__ == "__main__":
    main()
