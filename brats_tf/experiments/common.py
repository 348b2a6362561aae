"""What every experiment needs: its config (the scale's preset with the run's overrides), its
data (given or synthesized), records checked against their manifest, a seeded split saved
once, measured timings, finished-model checks, and a child process per large model."""

import ast
import concurrent.futures
import contextlib
import copy
import ctypes
import json
import multiprocessing
import os
import signal
import time

from brats_tf.synthetic import generator
from brats_tf.configs import common as common_configs
from brats_tf.configs import experiments as experiment_configs
from brats_tf import errors
from brats_tf.errors import ConfigError, DataError
from brats_tf.io.cases import discover_cases
from brats_tf.io.files import write_json
from brats_tf.models import unet3d
from brats_tf.records import reader
from brats_tf.records.writer import build_records


def synthesize_unless_given(data_dir, work, name, num_cases, seed, shape=None, site="a"):
    """`data_dir` when given; else phantoms written (deterministically, skipping complete
    cases) to `<work>/data/<name>`. Returns the absolute data folder."""
    if data_dir:
        return os.path.abspath(data_dir)
    data_dir = os.path.join(work, "data", name)
    print(f"  synthesizing {num_cases} phantoms ({site=}, shape {shape or 'default'}) in {data_dir}", flush=True)
    generator.write_dataset(data_dir, num_cases, seed, shape=shape, site=site, progress=False)
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


def experiment_config(args):
    """The config of a run (configs/experiments.py): `args.config` (run_experiment's --config
    with its --config.x overrides), else the `args.scale` preset, with `args.strategy` set on
    every 2D / 3D model config that keeps "off". The old spelling's overrides (`config_2d`,
    `config_3d`) are checked here and applied to each model's config by `old_overrides`."""
    config = getattr(args, "config", None)
    if config is None:
        if args.scale not in experiment_configs.PRESETS:
            raise ConfigError(f"--scale={args.scale!r}: use one of {list(experiment_configs.PRESETS)}")
        config = experiment_configs.get_config(args.scale)
    config = copy.deepcopy(config)
    strategy = getattr(args, "strategy", None) or "off"
    for section in (config.twod, config.threed):
        if section.train.strategy == "off":
            section.train.strategy = strategy
    for stage in ("2d", "3d"):   # unknown keys and values out of range refused before any work
        common_configs.check_ranges(
            old_overrides(copy.deepcopy(config.twod if stage == "2d" else config.threed), args, stage),
            "--config_2d" if stage == "2d" else "--config_3d")
    config = experiment_configs.check_ranges(config)
    check_3d_design(old_overrides(copy.deepcopy(config.threed), args, "3d"), config.get("standard_input_size"))
    return config


def check_3d_design(threed, standard_input_size=None):
    """Refuses, before any work, 3D patch sides the 3D model design cannot take (the pooled
    design's are multiples of 4: not the demo's 54 and 62)."""
    design = threed.model.get("design", "atrous")
    if design not in unet3d.DESIGNS:
        raise ConfigError(f"--config.threed.model.design={design!r}: use one of {unet3d.DESIGNS}")
    for key, size in (("threed.model.input_size", threed.model.input_size),
                      ("standard_input_size", standard_input_size)):
        try:
            if size is not None:
                unet3d.output_size(size, design)
        except ValueError as err:
            raise ConfigError(f"--config.{key}={size}: {err} (the {design} 3D design)") from None


def old_overrides(model_config, args, stage):
    """`model_config` with the old spelling's overrides of its stage applied (`args.config_2d`
    / `config_3d`: KEY=VALUE, Python literals), last, as they always were; returns it."""
    flag, section = ("config_2d", "twod") if stage == "2d" else ("config_3d", "threed")
    for text in getattr(args, flag, None) or ():
        key, _, value = text.partition("=")
        _set_dotted(model_config, key.strip(), _literal(value.strip()),
                    f"--{flag} {text!r} (new spelling: --config.{section}.{text.strip()})")
    return model_config


def _set_dotted(config, key, value, where):
    """config[key] = value for a dotted key that the config defines."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if part not in node or not hasattr(node[part], "keys"):
            raise ConfigError(f"{where}: the config has no {key!r}")
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"{where}: the config has no {key!r}")
    try:
        node[leaf] = value
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def _literal(text):
    """A Python literal where the text is one (4, (4,6,8), 0.5, True, None), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


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
        write_json(self.path, self.data)


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


def in_child_process(what, fn, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh (spawned) process that dies with this one; returns its
    result and raises its errors here. TensorFlow keeps the memory a model's training reached
    for the life of its process (measured at paper scale: 5.7 GB after the standard 3D model,
    12.9 GB after 2D-3D model C, with clear_session, gc and malloc_trim), so a run that trains
    many large models trains each in its own process. `what` (a path) names the work in the
    error raised when the child dies (killed, out of memory)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=_start_child,
                                                initargs=(errors.libraries_silenced(),)) as pool:
        try:
            return pool.submit(fn, *args, **kwargs).result()
        except concurrent.futures.process.BrokenProcessPool:
            raise DataError(what, "its process died (killed, or out of memory)") from None


def _start_child(quiet):
    """Linux: the child gets SIGKILL when its parent dies, so a killed run leaves no trainer
    writing into the work dir its re-run resumes from; it is as quiet as its parent."""
    if quiet:
        errors.silence_libraries()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def call(isolated, what, fn, *args, **kwargs):
    """fn(*args, **kwargs), in a child process when `isolated` (`in_child_process`), else here."""
    return in_child_process(what, fn, *args, **kwargs) if isolated else fn(*args, **kwargs)
