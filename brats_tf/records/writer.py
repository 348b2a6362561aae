"""Writes normalized, brain-cropped cases to sharded TFRecords (tensorflow-datasets) plus a manifest.

The builder reads the NIfTI folder as its manual dir (no network), and its FeaturesDict is
`schema.case_features`. Everything is written under a temporary sibling folder and renamed
to `out_dir` only when complete, manifest included.

With `beam_options`, the cases are prepared by an Apache Beam pipeline (TFDS's Beam support:
`_generate_examples` returns a PTransform), on Beam's local runner or on Dataflow, Flink or
Spark; the records are the same as the in-process build's. Beam is imported only then.
"""

import contextlib
import glob
import io
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from brats_tf import preprocess
from brats_tf.constants import MODALITIES, NUM_CLASSES
from brats_tf.errors import ConfigError, DataError, short_error
from brats_tf.io.cases import discover_cases, load_case, requested_modalities
from brats_tf.io import locks, nifti
from brats_tf.io import files as fs
from brats_tf.io.files import write_json
from brats_tf.records import schema

MANIFEST = "manifest.json"


class BratsCases(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder over one dataset folder; configured per build (layout, modalities, normalization)."""

    VERSION = tfds.core.Version(schema.SCHEMA_VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the NIfTI dataset folder as manual_dir."

    def __init__(self, *, modalities, layout, layout_file, normalization, scale, margin, on_case=None, beam=False,
                 **kwargs):
        self.settings = CaseSettings(tuple(modalities), normalization, scale, margin)
        self.layout, self.layout_file = layout, layout_file
        self.on_case = on_case  # called with (case, manifest entry) after each case (in-process builds)
        self.beam = beam
        super().__init__(**kwargs)

    @classmethod
    def _get_builder_name(cls):  # one name for every build, whatever the Python class path
        return schema.DATASET_NAME

    def _info(self):
        return self.dataset_info_from_configs(
            features=schema.case_features(len(self.settings.modalities)),
            description="Brain-cropped, normalized MRI cases; one example per case.",
            disable_shuffling=True,  # keep sorted case-id order; samplers shuffle themselves
        )

    def _split_generators(self, dl_manager):
        cases = discover_cases(dl_manager.manual_dir, self.layout, self.layout_file)
        return {schema.SPLIT: self._generate_examples(cases)}

    def _generate_examples(self, cases):
        if self.beam:
            import apache_beam as beam   # lazy: only Beam builds need it
            # Keyed by the case's index: TFDS's Beam writer orders unshuffled examples by an
            # integer key (one shard each, in case order, as the in-process build writes them).
            return beam.Create(list(enumerate(cases))) | beam.Map(keyed_example, self.settings)
        return self._examples_in_process(cases)

    def _examples_in_process(self, cases):
        for case in cases:
            loaded, prepared, present = _prepare(case, self.settings)
            if self.on_case:
                self.on_case(case, manifest_entry(case, self.settings.modalities, loaded.geometry.shape,
                                                  loaded.geometry.spacing, prepared.box, prepared.label))
            yield case.case_id, schema.example_from_case(prepared, present)


@dataclass(frozen=True)
class CaseSettings:
    """How every case of a build is prepared (picklable: Beam ships it to its workers)."""
    modalities: tuple
    normalization: str
    scale: float
    margin: int


def _prepare(case, settings):
    present = [m in case.images for m in settings.modalities]
    loaded = load_case(case, [m for m, p in zip(settings.modalities, present) if p])
    prepared = preprocess.prepare_case(loaded, settings.normalization, settings.scale, settings.margin)
    prepared.image = _insert_missing_channels(prepared.image, present)
    prepared.modalities = settings.modalities
    return loaded, prepared, present


def keyed_example(index_case, settings):
    """(index, example) of one (index, case): what a Beam worker computes."""
    index, case = index_case
    _, prepared, present = _prepare(case, settings)
    return index, schema.example_from_case(prepared, present)


def manifest_entry(case, modalities, shape, spacing, box, label):
    """A case's manifest entry (without its record file, which TFDS names)."""
    counts = np.bincount(label.ravel(), minlength=NUM_CLASSES) if label is not None else None
    return {
        "case_id": case.case_id,
        "modalities_present": [m for m in modalities if m in case.images],
        "original_shape": [int(n) for n in shape],
        "spacing_mm": [float(z) for z in spacing],
        "crop": box.to_json(),
        "voxels_per_class": None if counts is None else [int(c) for c in counts],
    }


def _insert_missing_channels(image, present):
    full = np.zeros(image.shape[:3] + (len(present),), np.float32)
    full[..., np.flatnonzero(present)] = image
    return full


def build_records(data_dir, out_dir, layout="auto", layout_file=None, normalization=None,
                  modalities=None, scale=preprocess.DEFAULT_MEDIAN_SCALE, margin=preprocess.DEFAULT_CROP_MARGIN,
                  allow_missing_modalities=False, overwrite=False, verbose=True, beam_options=None):
    """Builds the record set of a dataset folder; returns the manifest dict. A build to an
    `out_dir` that another live build writes is refused (io/locks.py). `beam_options`
    ("key=value,key=value" Beam pipeline options) prepares the cases with Apache Beam."""
    out_dir = fs.absolute(out_dir)
    with locks.hold(f"{out_dir}.lock", out_dir):   # out_dir appears by a rename: its lock lies beside it
        return _build_records(data_dir, out_dir, layout, layout_file, normalization, modalities, scale, margin,
                              allow_missing_modalities, overwrite, verbose, beam_options)


def _build_records(data_dir, out_dir, layout, layout_file, normalization, modalities, scale, margin,
                   allow_missing_modalities, overwrite, verbose, beam_options):
    pipeline_options = _pipeline_options(beam_options)   # Beam missing: one line before any work
    _check_out_dir(out_dir, overwrite)
    cases = discover_cases(data_dir, layout, layout_file)
    modalities = _resolve_modalities(cases, modalities, allow_missing_modalities)
    normalization = normalization or cases[0].normalization or "median"
    if normalization not in preprocess.NORMALIZATIONS:
        raise ConfigError(f"--normalization={normalization!r}: use one of {preprocess.NORMALIZATIONS}")

    manifest_cases = []

    def on_case(case, entry):
        manifest_cases.append(entry)
        if verbose:
            shape = preprocess.CropBox.from_json(entry["crop"]).shape
            print(f"  [{len(manifest_cases)}/{len(cases)}] {case.case_id}: cropped to {shape}",
                  file=sys.stderr, flush=True)

    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    # Killed builds' folders: under the lock no live build owns one.
    for leftover in fs.glob(f"{glob.escape(out_dir)}.tmp-*"):
        fs.remove_tree(leftover)
    # TFDS writes where its paths reach (a local folder, gs://, s3://, az://: on a distributed
    # Beam runner the workers write the shards there), else to a local folder copied after.
    staging = tmp_dir if _tfds_can_write(out_dir) else tempfile.mkdtemp(prefix="brats_tf-records-")
    try:
        builder = BratsCases(modalities=modalities, layout=layout, layout_file=layout_file,
                             normalization=normalization, scale=scale, margin=margin, on_case=on_case,
                             beam=beam_options is not None, data_dir=fs.join(staging, "tfds"))
        tfds.disable_progress_bar()
        with _tfds_prints_unless_info(), _write_failures_name(out_dir):
            # One record file per case: a streaming sampler reads exactly the cases it needs.
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=os.path.abspath(data_dir), verify_ssl=False, num_shards=len(cases),
                beam_options=pipeline_options))
        if beam_options is not None:   # the workers' entries are not ours to collect: read them back
            manifest_cases = _entries_from_records(builder, cases, modalities)
            if verbose:
                print(f"  [{len(cases)}/{len(cases)}] prepared by Beam", file=sys.stderr, flush=True)
        _add_record_files(builder.data_dir, manifest_cases)
        manifest = {
            "schema_version": schema.SCHEMA_VERSION,
            "records": os.path.relpath(builder.data_dir, staging),
            "source_dir": os.path.abspath(data_dir),
            "layout": cases[0].layout,
            "modalities": list(modalities),
            "normalization": normalization,
            "median_scale": scale if normalization == "median" else None,
            "crop_margin": margin,
            "num_cases": len(manifest_cases),
            "cases": manifest_cases,
        }
        if fs.is_url(out_dir):
            _publish_to_url(staging, out_dir, manifest)
        else:
            write_json(os.path.join(tmp_dir, MANIFEST), manifest)
            _replace_dir(tmp_dir, out_dir)
    finally:
        fs.remove_tree(tmp_dir)
        if staging != tmp_dir:
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _tfds_can_write(path):
    return not fs.is_url(path) or path.split("://", 1)[0] in ("gs", "s3", "az")


def _publish_to_url(staging, out_dir, manifest):
    """A finished build into a bucket, which has no folder rename: the records are copied
    first and the manifest last, so a reader (which needs the manifest) sees the whole set
    or none. An old set there (--overwrite) is removed first, not after as on a disk."""
    fs.remove_tree(out_dir)
    fs.copy_tree(staging, out_dir)
    write_json(fs.join(out_dir, MANIFEST), manifest)


def _pipeline_options(beam_options):
    """Beam's PipelineOptions from "key=value,key=value" (as `tfds build` takes them); None
    for an in-process build."""
    if beam_options is None:
        return None
    try:
        from apache_beam.options.pipeline_options import PipelineOptions   # lazy: only Beam builds need it
    except ImportError:
        raise ConfigError("--beam_pipeline_options needs Apache Beam: pip install -r requirements-beam.txt") from None
    flags = [f"--{item.strip()}" for item in beam_options.split(",") if item.strip()]
    if not any(f.startswith("--default_sdk_harness_log_level") for f in flags) and not logging.level_info():
        # The workers' INFO lines only at --verbosity=0 (each worker still prints a few lines
        # as it starts, before it reads this option).
        flags.append("--default_sdk_harness_log_level=WARNING")
    return PipelineOptions(flags=flags)


def _entries_from_records(builder, cases, modalities):
    """The manifest entries of a Beam build, in `cases` order, from the records it wrote
    (crop, shape, label counts) and each case's first image header (spacing)."""
    by_id = {case.case_id: case for case in cases}
    entries = {}
    for ex in tfds.as_numpy(builder.as_dataset(split=schema.SPLIT, shuffle_files=False)):
        case = by_id[ex["case_id"].decode()]
        box = preprocess.CropBox(*(tuple(int(v) for v in ex[k]) for k in ("crop_start", "crop_stop", "full_shape")))
        first = case.images[next(m for m in modalities if m in case.images)]
        spacing = nifti.load_header(first.path).header.get_zooms()[:3]
        entries[case.case_id] = manifest_entry(case, modalities, box.full_shape, spacing, box,
                                               ex["label"] if ex["has_label"] else None)
    return [entries[case.case_id] for case in cases]


@contextlib.contextmanager
def _write_failures_name(out_dir):
    """A full disk or a file-size limit while TFDS writes (it wraps the file system's error in
    a RuntimeError) becomes one line naming the record set; other errors pass unchanged."""
    try:
        yield
    except DataError:
        raise
    except Exception as err:
        cause = err
        while cause is not None and not isinstance(cause, (OSError, tf.errors.OpError)):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise DataError(out_dir, f"cannot write the records ({short_error(cause)})") from err


def _add_record_files(folder, manifest_cases):
    """Names each case's record file in its manifest entry (read back, not assumed: TFDS
    decides the shard names)."""
    where = {}
    for name in sorted(tf.io.gfile.listdir(folder)):
        if ".tfrecord" not in name:
            continue
        ids = [bytes(ex["case_id"].numpy()).decode() for ex in tf.data.TFRecordDataset(
            os.path.join(folder, name)).map(lambda s: tf.io.parse_single_example(s, _CASE_ID))]
        if len(ids) != 1:
            raise RuntimeError(f"{folder}/{name}: TFDS wrote {len(ids)} cases into one record file")
        where[ids[0]] = name
    for entry in manifest_cases:
        entry["record_file"] = where[entry["case_id"]]


_CASE_ID = {"case_id": tf.io.FixedLenFeature([], tf.string)}


def _tfds_prints_unless_info():
    """TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared"
    on stdout whatever the log level (print, not logging), which reads as if something were
    downloaded; they are kept only at absl INFO (`--verbosity=0`). Our own progress goes to
    stderr and is not affected."""
    if logging.level_info():
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(io.StringIO())


def _resolve_modalities(cases, requested, allow_missing):
    """Requested modalities (canonical order), or every modality some case has."""
    if requested:
        modalities = requested_modalities(requested)
    else:
        modalities = [m for m in MODALITIES if any(m in c.images for c in cases)]
    if not allow_missing:
        for case in cases:
            for m in modalities:
                if m not in case.images:
                    where = case.missing.get(m, case.case_id)
                    raise DataError(where, f"missing {m} image for case {case.case_id} "
                                           f"(pass --allow_missing_modalities to store it as an absent channel)")
    return modalities


def _check_out_dir(out_dir, overwrite):
    if not fs.exists(out_dir) or not fs.listdir(out_dir):
        return
    if not overwrite:
        raise ConfigError(f"{out_dir}: already exists and is not empty; pass --overwrite or choose another --out_dir")
    if not fs.isfile(fs.join(out_dir, MANIFEST)):
        raise ConfigError(f"{out_dir}: not a record set (no {MANIFEST}); refusing to overwrite it")


def _replace_dir(new_dir, out_dir):
    """Moves the finished build into place; an old record set is removed only after that."""
    old = None
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(new_dir, out_dir)
    if old:
        shutil.rmtree(old)
