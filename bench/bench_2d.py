"""2D-stage benchmarks, printing JSON lines (warm-up excluded):

  (the training input pipeline: bench/bench_pipelines.py)
  train_consumption slices/s a real train step consumes (same slice size, small preset)
  accumulation     one N-batch iteration vs N plain forward-backward passes (overhead %)
  peak_rss         peak resident memory of a paper-scale 2D model 1 training step

    python -m bench.bench_2d [--slice_size 160] [--paper_slice_size 240] [--skip_paper]
"""

import argparse
import json
import resource
import time

import numpy as np
import tensorflow as tf

from brats_tf.training import losses
from brats_tf.configs.train2d import get_config
from brats_tf.models import unet2d
from brats_tf.training.optim import NormalizedMomentum
from brats_tf.preprocess import PreparedCase
from brats_tf.records.slices import padded_size
from brats_tf.training.loop import build_train_step


def fake_cases(n, size, depth, channels=4, seed=0):
    """Cropped-case-like volumes with nested tumor blobs (content irrelevant to speed)."""
    rng = np.random.default_rng(seed)
    cases = []
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in (size, size, depth)], indexing="ij"), -1)
    for i in range(n):
        center = rng.uniform([size * 0.3] * 2 + [depth * 0.3], [size * 0.7] * 2 + [depth * 0.7])
        r = np.linalg.norm(grid - center, axis=-1)
        label = np.select([r < 4, r < 8, r < 14], [1, 3, 2], 0).astype(np.uint8)
        image = rng.normal(size=(size, size, depth, channels)).astype(np.float16)
        cases.append(PreparedCase(f"c{i}", image, label, np.ones(label.shape, bool), None, ()))
    return cases


def _heads(model, config):
    names = list(model.output_names)
    return (names, losses.deep_supervision_weights(names, config.loss.main_weight),
            losses.weighted_cross_entropy(tuple(config.loss.target_weights)))


def emit(**record):
    print(json.dumps(record), flush=True)


def time_calls(fn, count, warmup=2, clock=time.perf_counter):
    for _ in range(warmup):
        fn()
    start = clock()
    for _ in range(count):
        fn()
    return (clock() - start) / count


def fake_batch(size, batch_size, preset, seed=0):
    """Slices of fake cases padded as the slice stream pads them: (x, y) tensors."""
    shape = (padded_size(size, unet2d.pooling_factor("model1", preset)),) * 2
    cases = fake_cases(batch_size, size, 1, seed=seed)
    x = np.zeros((batch_size,) + shape + (4,), np.float32)
    y = np.zeros((batch_size,) + shape, np.int32)
    for i, case in enumerate(cases):
        x[i, :size, :size] = case.image[:, :, 0]
        y[i, :size, :size] = case.label[:, :, 0]
    return tf.constant(x), tf.constant(y), shape


def bench_pipeline_vs_training(size, batch_size, preset):
    x, y, slice_shape = fake_batch(size, batch_size, preset)
    model = unet2d.build_2d_model_1(4, preset)
    optimizer = NormalizedMomentum(0.25, accumulation_steps=1)
    config = get_config("small")
    step = build_train_step(model, optimizer, tf.distribute.get_strategy(), *_heads(model, config))
    seconds = time_calls(lambda: step(x, y)["loss"].numpy(), 10)
    emit(bench="train_consumption", model="model1", preset=preset, slice_shape=list(slice_shape),
         batch_size=batch_size, slices_per_s=round(batch_size / seconds, 1), step_s=round(seconds, 4))


def bench_accumulation(size, batch_size, preset, n, rounds=7):
    x, y, _ = fake_batch(size, batch_size, preset, seed=1)
    model = unet2d.build_2d_model_1(4, preset)
    config = get_config("small")
    optimizer = NormalizedMomentum(0.25, accumulation_steps=n)
    step = build_train_step(model, optimizer, tf.distribute.get_strategy(), *_heads(model, config))

    @tf.function
    def forward_backward(x, y):   # the same loss, gradients only: no optimizer at all
        with tf.GradientTape() as tape:
            loss = losses.deep_supervision_loss(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        return tf.add_n([tf.reduce_sum(g) for g in grads])   # forces every gradient, returns a scalar

    # Interleave the two measurements and take medians: robust to other load on the cores.
    run_plain = lambda: [forward_backward(x, y).numpy() for _ in range(n)]
    run_iteration = lambda: [step(x, y)["loss"].numpy() for _ in range(n)]
    run_plain(), run_iteration()
    plain, iteration = [], []
    # Process CPU time, not wall time: other jobs on the cores inflate it far less.
    for _ in range(rounds):
        plain.append(time_calls(run_plain, 1, warmup=0, clock=time.process_time))
        iteration.append(time_calls(run_iteration, 1, warmup=0, clock=time.process_time))
    plain, iteration = float(np.median(plain)), float(np.median(iteration))
    emit(bench="accumulation", preset=preset, batch_size=batch_size, N=n, slice=size, rounds=rounds,
         iteration_cpu_s=round(iteration, 4), n_forward_backward_cpu_s=round(plain, 4),
         overhead_pct=round(100 * (iteration - plain) / plain, 2))


def bench_paper_step(size, batch_size):
    model = unet2d.build_2d_model_1(4, "paper")
    optimizer = NormalizedMomentum(0.25, accumulation_steps=10)
    step = build_train_step(model, optimizer, tf.distribute.get_strategy(), *_heads(model, get_config("paper")))
    x = tf.random.normal((batch_size, size, size, 4))
    y = tf.random.uniform((batch_size, size, size), 0, 4, dtype=tf.int32)
    seconds = time_calls(lambda: step(x, y)["loss"].numpy(), 2, warmup=1)
    emit(bench="paper_step", model="model1", preset="paper", params=int(model.count_params()),
         slice=size, batch_size=batch_size, step_s=round(seconds, 2),
         peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--slice_size", type=int, default=160)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--paper_slice_size", type=int, default=240)
    parser.add_argument("--paper_batch_size", type=int, default=10)
    parser.add_argument("--skip_paper", action="store_true")
    args = parser.parse_args()
    emit(bench="env", tf=tf.__version__, cpus=len(tf.config.list_physical_devices("CPU")),
         threads=tf.config.threading.get_inter_op_parallelism_threads())
    bench_pipeline_vs_training(args.slice_size, args.batch_size, "small")
    bench_accumulation(args.slice_size, args.batch_size, "small", n=10)
    if not args.skip_paper:
        bench_paper_step(args.paper_slice_size, args.paper_batch_size)


if __name__ == "__main__":
    main()
