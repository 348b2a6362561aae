"""Writes normalized, brain-cropped cases to sharded TFRecords (tensorflow-datasets) plus a manifest.

The builder reads the NIfTI folder as its manual dir (no network), and its FeaturesDict is
`schema.case_features`. Everything is written under a temporary sibling folder and renamed
to `out_dir` only when complete, manifest included.
"""

import contextlib
import glob
import io
import os
import shutil
import sys

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from brats_tf import preprocess
from brats_tf.constants import MODALITIES, NUM_CLASSES
from brats_tf.errors import ConfigError, DataError, short_error
from brats_tf.io.cases import discover_cases, load_case, requested_modalities
from brats_tf.io import locks
from brats_tf.io.files import write_json
from brats_tf.records import schema

MANIFEST = "manifest.json"


class BratsCases(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder over one dataset folder; configured per build (layout, modalities, normalization)."""

    VERSION = tfds.core.Version(schema.SCHEMA_VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the NIfTI dataset folder as manual_dir."

    def __init__(self, *, modalities, layout, layout_file, normalization, scale, margin, on_case=None, **kwargs):
        self.modalities = tuple(modalities)
        self.layout, self.layout_file = layout, layout_file
        self.normalization, self.scale, self.margin = normalization, scale, margin
        self.on_case = on_case  # called with (case, prepared) after each case: manifest + progress
        super().__init__(**kwargs)

    @classmethod
    def _get_builder_name(cls):  # one name for every build, whatever the Python class path
        return schema.DATASET_NAME

    def _info(self):
        return self.dataset_info_from_configs(
            features=schema.case_features(len(self.modalities)),
            description="Brain-cropped, normalized MRI cases; one example per case.",
            disable_shuffling=True,  # keep sorted case-id order; samplers shuffle themselves
        )

    def _split_generators(self, dl_manager):
        cases = discover_cases(dl_manager.manual_dir, self.layout, self.layout_file)
        return {schema.SPLIT: self._generate_examples(cases)}

    def _generate_examples(self, cases):
        for case in cases:
            present = [m in case.images for m in self.modalities]
            loaded = load_case(case, [m for m, p in zip(self.modalities, present) if p])
            prepared = preprocess.prepare_case(loaded, self.normalization, self.scale, self.margin)
            prepared.image = _insert_missing_channels(prepared.image, present)
            prepared.modalities = self.modalities
            if self.on_case:
                self.on_case(case, loaded, prepared)
            yield case.case_id, schema.example_from_case(prepared, present)


def _insert_missing_channels(image, present):
    full = np.zeros(image.shape[:3] + (len(present),), np.float32)
    full[..., np.flatnonzero(present)] = image
    return full


def build_records(data_dir, out_dir, layout="auto", layout_file=None, normalization=None,
                  modalities=None, scale=preprocess.DEFAULT_MEDIAN_SCALE, margin=preprocess.DEFAULT_CROP_MARGIN,
                  allow_missing_modalities=False, overwrite=False, verbose=True):
    """Builds the record set of a dataset folder; returns the manifest dict. A build to an
    `out_dir` that another live build writes is refused (io/locks.py)."""
    out_dir = os.path.abspath(out_dir)
    with locks.hold(f"{out_dir}.lock", out_dir):   # out_dir appears by a rename: its lock lies beside it
        return _build_records(data_dir, out_dir, layout, layout_file, normalization, modalities, scale, margin,
                              allow_missing_modalities, overwrite, verbose)


def _build_records(data_dir, out_dir, layout, layout_file, normalization, modalities, scale, margin,
                   allow_missing_modalities, overwrite, verbose):
    _check_out_dir(out_dir, overwrite)
    cases = discover_cases(data_dir, layout, layout_file)
    modalities = _resolve_modalities(cases, modalities, allow_missing_modalities)
    normalization = normalization or cases[0].normalization or "median"
    if normalization not in preprocess.NORMALIZATIONS:
        raise ConfigError(f"--normalization={normalization!r}: use one of {preprocess.NORMALIZATIONS}")

    manifest_cases = []

    def on_case(case, loaded, prepared):
        counts = np.bincount(prepared.label.ravel(), minlength=NUM_CLASSES) if prepared.label is not None else None
        manifest_cases.append({
            "case_id": case.case_id,
            "modalities_present": [m for m in modalities if m in case.images],
            "original_shape": list(loaded.geometry.shape),
            "spacing_mm": list(loaded.geometry.spacing),
            "crop": prepared.box.to_json(),
            "voxels_per_class": None if counts is None else [int(c) for c in counts],
        })
        if verbose:
            print(f"  [{len(manifest_cases)}/{len(cases)}] {case.case_id}: cropped to {prepared.box.shape}",
                  file=sys.stderr, flush=True)

    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    # Killed builds' folders: under the lock no live build owns one.
    for leftover in glob.glob(f"{glob.escape(out_dir)}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        builder = BratsCases(modalities=modalities, layout=layout, layout_file=layout_file,
                             normalization=normalization, scale=scale, margin=margin, on_case=on_case,
                             data_dir=os.path.join(tmp_dir, "tfds"))
        tfds.disable_progress_bar()
        with _tfds_prints_unless_info(), _write_failures_name(out_dir):
            # One record file per case: a streaming sampler reads exactly the cases it needs.
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=os.path.abspath(data_dir), verify_ssl=False, num_shards=len(cases)))
        _add_record_files(builder.data_dir, manifest_cases)
        manifest = {
            "schema_version": schema.SCHEMA_VERSION,
            "records": os.path.relpath(builder.data_dir, tmp_dir),
            "source_dir": os.path.abspath(data_dir),
            "layout": cases[0].layout,
            "modalities": list(modalities),
            "normalization": normalization,
            "median_scale": scale if normalization == "median" else None,
            "crop_margin": margin,
            "num_cases": len(manifest_cases),
            "cases": manifest_cases,
        }
        write_json(os.path.join(tmp_dir, MANIFEST), manifest)
        _replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return manifest


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
    if not os.path.exists(out_dir) or not os.listdir(out_dir):
        return
    if not overwrite:
        raise ConfigError(f"{out_dir}: already exists and is not empty; pass --overwrite or choose another --out_dir")
    if not os.path.isfile(os.path.join(out_dir, MANIFEST)):
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
