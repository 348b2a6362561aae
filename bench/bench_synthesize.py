"""Phantom generator benchmark, printing JSON lines (warm-up excluded):

  synthesize   seconds per case to build a phantom in memory
  write        seconds per case to write its five .nii.gz files
  peak_rss     peak resident memory of the process

at the full BraTS matrix (240x240x155, site a), at a small demo matrix (96x96x72) and at
site b's default matrix (160x160x53).

    python -m bench.bench_synthesize [--cases 3] [--small_cases 10]   (from the repository root)
"""

import argparse
import json
import os
import platform
import resource
import tempfile
import time

# The generator's matrix products are tiny; BLAS threads only contend (as in the CLI).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from brats_tf.synthetic import generator as synthetic  # noqa: E402


def emit(**record):
    print(json.dumps(record), flush=True)


def bench_shape(shape, site, cases, warmup=1):
    for index in range(warmup):
        synthetic.synthesize_case(1000, index, shape, site)
    build, write = [], []
    with tempfile.TemporaryDirectory() as out_dir:
        for index in range(cases):
            start = time.perf_counter()
            phantom = synthetic.synthesize_case(0, index, shape, site)
            build.append(time.perf_counter() - start)
            start = time.perf_counter()
            synthetic.write_case(phantom, out_dir)
            write.append(time.perf_counter() - start)
    for name, seconds in (("synthesize", build), ("write", write)):
        emit(bench=name, site=site, shape=list(shape), cases=cases, seconds_per_case=round(float(np.mean(seconds)), 3),
             seconds_max=round(float(np.max(seconds)), 3))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3, help="cases timed at the large matrices")
    parser.add_argument("--small_cases", type=int, default=10, help="cases timed at the small matrix")
    args = parser.parse_args()
    emit(bench="env", python=platform.python_version(), numpy=np.__version__, cpus=os.cpu_count(),
         openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS"), load_avg_1min=round(os.getloadavg()[0], 2))
    bench_shape((96, 96, 72), "a", args.small_cases)
    bench_shape((160, 160, 53), "b", args.cases)
    bench_shape((240, 240, 155), "a", args.cases)
    emit(bench="peak_rss", mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


if __name__ == "__main__":
    main()
