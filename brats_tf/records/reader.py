"""Reads record sets written by `writer.build_records`: manifest, tf.data of cases, NumPy cases."""

import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from brats_tf.errors import DataError
from brats_tf.io.manifest import read_manifest
from brats_tf.preprocess import CropBox, PreparedCase
from brats_tf.records import schema
from brats_tf.records.writer import MANIFEST


def load_manifest(records_dir):
    return read_manifest(records_dir, MANIFEST, "record", "build records with data_prep.build_records",
                         "schema_version", schema.SCHEMA_VERSION)


def case_dataset(records_dir, case_ids=None):
    """tf.data.Dataset of decoded case dicts (schema features), in sorted case-id order.

    `case_ids` restricts to those cases (e.g. a train split); unknown ids are an error.
    """
    manifest = load_manifest(records_dir)
    known = [c["case_id"] for c in manifest["cases"]]
    builder = tfds.builder_from_directory(os.path.join(records_dir, manifest["records"]))
    ds = builder.as_dataset(split=schema.SPLIT, shuffle_files=False)
    if case_ids is not None:
        unknown = sorted(set(case_ids) - set(known))
        if unknown:
            raise DataError(records_dir, f"cases not in the record set: {unknown[:5]}")
        wanted = tf.constant(sorted(set(case_ids)), dtype=tf.string)   # typed: [] is float otherwise
        ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(ex["case_id"], wanted)))
    return ds


@dataclass
class RecordCase:
    """A case read back from records (image float16 as stored)."""
    prepared: PreparedCase
    modality_present: np.ndarray


def read_cases(records_dir, case_ids=None):
    """Yields `RecordCase`s (NumPy) in sorted case-id order."""
    manifest = load_manifest(records_dir)
    for ex in tfds.as_numpy(case_dataset(records_dir, case_ids)):
        yield case_from_example(ex, manifest["modalities"])


def case_from_example(ex, modalities):
    box = CropBox(tuple(int(v) for v in ex["crop_start"]), tuple(int(v) for v in ex["crop_stop"]),
                  tuple(int(v) for v in ex["full_shape"]))
    prepared = PreparedCase(
        case_id=ex["case_id"].decode() if isinstance(ex["case_id"], bytes) else str(ex["case_id"]),
        image=ex["image"], label=ex["label"] if ex["has_label"] else None,
        brain=ex["brain"].astype(bool), box=box, modalities=tuple(modalities))
    return RecordCase(prepared, ex["modality_present"])
