r"""Training input pipelines at dataset scale, printing JSON lines.

For the 2D slice stream (paper 2D model 1 settings: axial slices, batch 10) and the 3D patch
stream (paper 2D-3D model A: 70³ patches of 4 image + 12 feature channels, batch 5), on the
first 20, 50 and 100 cases of a record set of full-size cases, each in a process of its own:
peak RSS, batches/s once warm (several windows read), and the paper-scale training step the
pipeline feeds, timed in the same run, so `ratio` = batches delivered per batch consumed.
Also the disk bytes per case of records and feature records. Feature channels are random
float16 (speed and memory only), written once as the feature extraction writes them.

    python -m data_prep.synthesize --out_dir D/nifti --num_cases 100 --shape 240,240,155
    python -m data_prep.build_records --data_dir D/nifti --out_dir D/records
    python -m bench.bench_pipelines --records D/records [--counts 20,50,100] [--batches 48]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def emit(**record):
    print(json.dumps(record), flush=True)


def peak_rss_mb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def feature_paths(records, features_dir, case_ids):
    """Random float16 feature records (12 channels) on each case's grid, written once."""
    from brats_tf.records import reader, schema
    os.makedirs(features_dir, exist_ok=True)
    entries = {c["case_id"]: c for c in reader.load_manifest(records)["cases"]}
    paths = {}
    for case_id in case_ids:
        path = os.path.join(features_dir, f"{case_id}.tfrecord")
        if not os.path.exists(path):
            crop = entries[case_id]["crop"]
            shape = tuple(b - a for a, b in zip(crop["start"], crop["stop"])) + (12,)
            rng = np.random.default_rng(len(paths))
            schema.write_feature_record(path + ".tmp", case_id, rng.standard_normal(shape, np.float32).astype(np.float16))
            os.replace(path + ".tmp", path)
        paths[case_id] = path
    return paths


def stream_for(kind, records, features_dir, count):
    from brats_tf.configs import train2d, train3d
    from brats_tf.models import unet2d
    from brats_tf.records import reader, streams
    ids = sorted(c["case_id"] for c in reader.load_manifest(records)["cases"])[:count]
    if kind == "2d":
        c = train2d.get_config("paper")
        source = streams.case_source(records, ids)
        shape = streams.slice_shape(source, "axial", unet2d.pooling_factor("model1", "paper"))
        return streams.SliceStream(source, "axial", c.data.batch_size, shape, seed=0,
                                   **streams.window_options(c.data)), c
    c = train3d.get_config("paper")
    source = streams.case_source(records, ids, feature_paths=feature_paths(records, features_dir, ids),
                                 num_features=12)
    from brats_tf.models import unet3d
    return streams.PatchStream(source, c.model.input_size, unet3d.output_size(c.model.input_size),
                               c.data.batch_size, seed=0, **streams.window_options(c.data)), c


def child_pipeline(kind, records, features_dir, count, batches):
    stream, config = stream_for(kind, records, features_dir, count)
    iterator = iter(stream.dataset())
    start = time.perf_counter()
    x, _ = next(iterator)                      # the first window read and the graph built
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        x, _ = next(iterator)
    seconds = time.perf_counter() - start
    emit(bench="pipeline", stage=kind, cases=count, batch_shape=list(x.shape), batches=batches,
         window_cases=stream.window_size, batches_per_window=stream.batches_per_window,
         first_batch_s=round(first_s, 2), batches_per_s=round(batches / seconds, 3), peak_rss_mb=peak_rss_mb())


def child_step(kind, records, features_dir):
    """One paper-scale training step (random weights) on a batch of the stream's shape."""
    import tensorflow as tf
    from brats_tf.models import unet2d, unet3d
    from brats_tf.training import losses
    from brats_tf.training.loop import build_train_step
    from brats_tf.training.optim import NormalizedMomentum
    stream, config = stream_for(kind, records, features_dir, 20)
    x, y = stream.dataset(num_batches=1).get_single_element()
    if kind == "2d":
        model = unet2d.build_2d_model("model1", ["t1", "t1c", "t2", "flair"], "paper")
        names = list(model.output_names)
        heads = (names, losses.deep_supervision_weights(names, config.loss.main_weight),
                 losses.weighted_cross_entropy(tuple(config.loss.target_weights)))
    else:
        model = unet3d.build_3d_model("A", 4, 12, "paper")
        heads = (list(model.output_names), {model.output_names[0]: 1.0},
                 losses.weighted_cross_entropy(tuple(config.loss.target_weights)))
    step = build_train_step(model, NormalizedMomentum(0.25, accumulation_steps=config.optim.accumulation_steps),
                            tf.distribute.get_strategy(), *heads)
    step(x, y)["loss"].numpy()
    start = time.perf_counter()
    step(x, y)["loss"].numpy()
    emit(bench="paper_step", stage=kind, batch_shape=list(x.shape), step_s=round(time.perf_counter() - start, 2),
         peak_rss_mb=peak_rss_mb())


def run_child(*args):
    out = subprocess.run([sys.executable, "-m", "bench.bench_pipelines", *map(str, args)],
                         capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return lines[-1]


def disk_per_case(records, features_dir, case_ids):
    from brats_tf.records import reader
    manifest = reader.load_manifest(records)
    folder = os.path.join(records, manifest["records"])
    sizes = [os.path.getsize(os.path.join(folder, c["record_file"])) for c in manifest["cases"]
             if c["case_id"] in case_ids]
    features = [os.path.getsize(os.path.join(features_dir, f"{i}.tfrecord")) for i in case_ids
                if os.path.exists(os.path.join(features_dir, f"{i}.tfrecord"))] or [0]
    emit(bench="disk", cases=len(sizes), record_mb_per_case=round(np.mean(sizes) / 2 ** 20, 1),
         feature_mb_per_case=round(np.mean(features) / 2 ** 20, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", required=True)
    parser.add_argument("--features_dir", help="random feature records (default: <records>-bench-features)")
    parser.add_argument("--counts", default="20,50,100")
    parser.add_argument("--batches", type=int, default=48, help="batches timed (3 windows at the paper settings)")
    parser.add_argument("--stages", default="2d,3d")
    parser.add_argument("--child", choices=["pipeline", "step"])
    parser.add_argument("--stage", choices=["2d", "3d"])
    parser.add_argument("--count", type=int)
    args = parser.parse_args()
    features_dir = args.features_dir or args.records.rstrip("/") + "-bench-features"
    if args.child == "pipeline":
        return child_pipeline(args.stage, args.records, features_dir, args.count, args.batches)
    if args.child == "step":
        return child_step(args.stage, args.records, features_dir)
    counts = [int(n) for n in args.counts.split(",")]
    common = ["--records", args.records, "--features_dir", features_dir, "--batches", args.batches]
    for stage in args.stages.split(","):
        step = run_child("--child", "step", "--stage", stage, *common)
        emit(**step)
        rss = {}
        for count in counts:
            line = run_child("--child", "pipeline", "--stage", stage, "--count", count, *common)
            line["ratio_to_paper_step"] = round(line["batches_per_s"] * step["step_s"], 1)
            rss[count] = line["peak_rss_mb"]
            emit(**line)
        emit(bench="memory_growth", stage=stage, peak_rss_mb=rss,
             ratio_largest_to_smallest=round(rss[max(counts)] / rss[min(counts)], 3))
    from brats_tf.records import reader
    ids = sorted(c["case_id"] for c in reader.load_manifest(args.records)["cases"])[:max(counts)]
    disk_per_case(args.records, features_dir, ids)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
