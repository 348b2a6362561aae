"""Record building and reading at full BraTS size, printing JSON lines.

    python -m bench.bench_records [--num_cases 3] [--shape 240,240,155]

Synthesizes phantoms (site a) in a temp dir, then times `build_records` per case, reports
record bytes per case, and the time to read every case back.
"""

import argparse
import json
import os
import tempfile
import time

from brats_tf.synthetic import generator as synthetic
from brats_tf.records import reader
from brats_tf.records.writer import build_records


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_cases", type=int, default=3)
    parser.add_argument("--shape", default="240,240,155")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, records = os.path.join(tmp, "data"), os.path.join(tmp, "records")
        synthetic.write_dataset(data, args.num_cases, seed=0, shape=args.shape, progress=False)
        build_records(data, os.path.join(tmp, "warmup"), verbose=False)   # imports, TFDS setup
        start = time.perf_counter()
        manifest = build_records(data, records, verbose=False)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        count = sum(1 for _ in reader.read_cases(records))
        read_s = time.perf_counter() - start
        crop = [c["crop"] for c in manifest["cases"]]
        kept = [(b[0] - a[0]) * (b[1] - a[1]) * (b[2] - a[2]) for a, b in
                ((c["start"], c["stop"]) for c in crop)]
        full = [x * y * z for x, y, z in (c["full_shape"] for c in crop)]
        print(json.dumps({"bench": "build_records", "shape": args.shape, "cases": count,
                          "seconds_per_case": round(build_s / count, 2),
                          "record_mb_per_case": round(folder_bytes(records) / count / 2**20, 1),
                          "crop_kept_fraction": round(sum(kept) / sum(full), 3),
                          "read_seconds_per_case": round(read_s / count, 2)}))


if __name__ == "__main__":
    main()
