"""What every experiment needs: its data (given or synthesized), records checked against
their manifest, a seeded split saved once, measured timings, finished-model checks."""

import contextlib
import json
import os
import time

from brats_tf import synthetic
from brats_tf.errors import ConfigError, DataError
from brats_tf.io.cases import discover_cases
from brats_tf.io.nifti import atomic_write
from brats_tf.records import reader
from brats_tf.records.writer import build_records


def synthesize_unless_given(data_dir, work, name, num_cases, seed, shape=None, site="a"):
    """`data_dir` when given; else phantoms written (deterministically, skipping complete
    cases) to `<work>/data/<name>`. Returns the absolute data folder."""
    if data_dir:
        return os.path.abspath(data_dir)
    data_dir = os.path.join(work, "data", name)
    print(f"  synthesizing {num_cases} phantoms ({site=}, shape {shape or 'default'}) in {data_dir}", flush=True)
    synthetic.write_dataset(data_dir, num_cases, seed, shape=shape, site=site, progress=False)
    return data_dir


def ensure_records(data_dir, records_dir, layout="auto", layout_file=None, normalization=None,
                   allow_missing_modalities=False):
    """The record set of `data_dir`, rebuilt unless its manifest lists exactly the dataset's
    cases from this folder with this normalization. Returns the manifest."""
    cases = discover_cases(data_dir, layout, layout_file)
    wanted = normalization or cases[0].normalization or "median"
    try:
        manifest = reader.load_manifest(records_dir)
    except DataError:
        manifest = None
    if manifest and manifest["source_dir"] == os.path.abspath(data_dir) and manifest["normalization"] == wanted \
            and [c["case_id"] for c in manifest["cases"]] == [c.case_id for c in cases]:
        return manifest
    print(f"  building {wanted} records in {records_dir}", flush=True)
    build_records(data_dir, records_dir, layout, layout_file, normalization=wanted,
                  allow_missing_modalities=allow_missing_modalities, overwrite=True, verbose=False)
    return reader.load_manifest(records_dir)


def labeled_ids(manifest):
    return sorted(c["case_id"] for c in manifest["cases"] if c["voxels_per_class"] is not None)


def load_or_make_split(path, ids, make):
    """The split saved at `path` (checked against the data's ids), else `make()` saved there."""
    if os.path.exists(path):
        with open(path) as f:
            split = json.load(f)
        unknown = sorted(set(_ids_in(split)) - set(ids))
        if unknown:
            raise ConfigError(f"{path}: cases {unknown[:3]} are not in the data; use a new --workdir")
        return split
    split = make()
    atomic_write(path, lambda p: write_json(p, split))
    return split


def _ids_in(value):
    """Every case id in a split (lists of ids, possibly nested, in a dict)."""
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value
    return [i for item in items for i in _ids_in(item)]


def resolve_scale(scale, scales, scale_type):
    """A scale given by name (a key of `scales`) or as a `scale_type` object (tests, custom runs)."""
    if isinstance(scale, scale_type):
        return scale
    if scale not in scales:
        raise ConfigError(f"--scale={scale!r}: use one of {sorted(scales)}")
    return scales[scale]


def finished(model_dir, iterations):
    """True when the trainer exported the model after at least `iterations` (model_info.json
    is written atomically after model.keras: its presence means a complete export)."""
    path = os.path.join(model_dir, "model_info.json")
    if not os.path.exists(path) or not os.path.exists(os.path.join(model_dir, "model.keras")):
        return False
    with open(path) as f:
        return json.load(f).get("iterations", -1) >= iterations


class Timings:
    """Measured seconds per step, kept across re-runs (a skipped step keeps its figure)."""

    def __init__(self, path):
        self.path = path
        self.data = {}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def record(self, name, **values):
        self.data.setdefault(name, {}).update({k: round(float(v), 4) for k, v in values.items()})
        atomic_write(self.path, lambda p: write_json(p, self.data))


class Stages:
    """Numbered progress lines per stage and the wall time of each run of a stage."""

    def __init__(self, titles, timings):
        self.titles, self.timings = list(titles), timings

    @contextlib.contextmanager
    def run(self, title):
        number = self.titles.index(title) + 1
        print(f"[{number}/{len(self.titles)}] {title}", flush=True)
        start = time.time()
        yield
        seconds = time.time() - start
        self.timings.record("stages", **{title: seconds})
        print(f"      {title}: {seconds:.0f} s", flush=True)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
