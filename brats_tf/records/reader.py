"""Reads record sets written by `writer.build_records`: manifest, tf.data of cases, NumPy cases.

A damaged record set is one DataError naming the file: a manifest that is not what the
writer writes (checked field by field, since every stage reads it), TFDS metadata that is
unreadable or disagrees with the schema, and records that fail their CRC or decode. The
cases read must be the manifest's, so a lost or renamed case is an error too.
"""

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from google.protobuf import json_format, message
from tensorflow_datasets.core.proto import dataset_info_pb2

from brats_tf.constants import MODALITIES, NUM_CLASSES
from brats_tf.errors import DataError, short_error
from brats_tf.io.manifest import read_manifest
from brats_tf.preprocess import NORMALIZATIONS, CropBox, PreparedCase
from brats_tf.records import schema
from brats_tf.records.writer import MANIFEST

# What opening a damaged TFDS folder raises (metadata JSON / protobuf, missing files, TF I/O).
_OPEN_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError,
                json_format.Error, message.Error, tf.errors.OpError)


# The fields `writer.build_records` writes (every one is read by some stage).
_MANIFEST_KEYS = ("schema_version", "records", "source_dir", "layout", "modalities", "normalization",
                  "median_scale", "crop_margin", "num_cases", "cases")
_CASE_KEYS = ("case_id", "modalities_present", "original_shape", "spacing_mm", "crop", "voxels_per_class",
              "record_file")


def load_manifest(records_dir):
    """The record set's manifest, checked field by field (DataError naming the file)."""
    path = os.path.join(records_dir, MANIFEST)
    manifest = read_manifest(records_dir, MANIFEST, "record", "build records with data_prep.build_records",
                             "schema_version", schema.SCHEMA_VERSION)
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(path, f"record manifest is damaged: {problem}; rebuild it with data_prep.build_records")
    return manifest


def case_dataset(records_dir, case_ids=None):
    """tf.data.Dataset of decoded case dicts (schema features), in sorted case-id order.

    `case_ids` restricts to those cases (e.g. a train split); unknown ids are an error.
    """
    manifest = load_manifest(records_dir)
    known = [c["case_id"] for c in manifest["cases"]]
    if case_ids is not None:
        unknown = sorted(set(case_ids) - set(known))
        if unknown:
            raise DataError(records_dir, f"cases not in the record set: {unknown[:5]}")
    folder = os.path.join(records_dir, manifest["records"])
    try:
        features = _recorded_features(folder)
        expected = schema.case_features(len(manifest["modalities"]))
        if features.get_tensor_info() != expected.get_tensor_info() \
                or features.get_serialized_info() != expected.get_serialized_info():
            raise DataError(os.path.join(folder, "features.json"), "TFDS features do not match the record schema")
        num = _recorded_num_examples(folder)
        if num != len(known):
            raise DataError(os.path.join(folder, "dataset_info.json"),
                            f"TFDS metadata lists {num} cases, the manifest {len(known)}")
    except _OPEN_ERRORS as err:
        raise DataError(folder, f"unreadable TFDS record set ({short_error(err)})") from None
    # The wanted cases' shards in file order, as TFDS reads them with shuffle_files=False; read
    # with tf.data (tf.io.gfile), not TFDS's builder, whose paths know gs:// but not every file
    # system TensorFlow does (ram://, hdfs://).
    chosen = set(known if case_ids is None else case_ids)
    shards = sorted({os.path.join(folder, c["record_file"]) for c in manifest["cases"] if c["case_id"] in chosen})
    ds = tf.data.TFRecordDataset(shards).map(features.deserialize_example)
    if case_ids is not None:
        wanted = tf.constant(sorted(set(case_ids)), dtype=tf.string)   # typed: [] is float otherwise
        ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(ex["case_id"], wanted)))
    return ds


@dataclass
class RecordCase:
    """A case read back from records (image float16 as stored)."""
    prepared: PreparedCase
    modality_present: np.ndarray


def read_cases(records_dir, case_ids=None):
    """Yields `RecordCase`s (NumPy) in the record set's (sorted case-id) order: exactly the
    cases asked for (all the manifest's by default), each once, or DataError."""
    manifest = load_manifest(records_dir)
    entries = {c["case_id"]: c for c in manifest["cases"]}
    wanted = sorted(set(entries if case_ids is None else case_ids))
    examples = iter(tfds.as_numpy(case_dataset(records_dir, case_ids)))
    seen = []
    while True:
        try:
            ex = next(examples)
        except StopIteration:
            break
        except tf.errors.OpError as err:    # CRC mismatch, truncated record, undecodable bytes
            raise DataError(_bad_shard(records_dir, manifest), f"corrupt records ({short_error(err)})") from None
        case = case_from_example(ex, manifest["modalities"])
        _check_case(records_dir, case, entries, wanted, manifest["modalities"])
        seen.append(case.prepared.case_id)
        yield case
    if sorted(seen) != wanted:           # order aside: an MSD set is in discovery order
        missing = sorted(set(wanted) - set(seen))
        repeated = sorted({i for i in seen if seen.count(i) > 1})
        raise DataError(os.path.join(records_dir, manifest["records"]),
                        f"records give {len(seen)} cases for the {len(wanted)} asked for "
                        f"(missing: {missing[:5]}, repeated: {repeated[:5]}; TFDS metadata damaged?)")


def _recorded_features(folder):
    """The FeaturesDict TFDS recorded (features.json)."""
    with tf.io.gfile.GFile(os.path.join(folder, "features.json"), "r") as f:
        return tfds.features.FeatureConnector.from_json(json.loads(f.read()))


def _recorded_num_examples(folder):
    """The number of examples TFDS recorded for the split (dataset_info.json)."""
    with tf.io.gfile.GFile(os.path.join(folder, "dataset_info.json"), "r") as f:
        info = json_format.Parse(f.read(), dataset_info_pb2.DatasetInfo())
    return sum(int(n) for split in info.splits if split.name == schema.SPLIT for n in split.shard_lengths)


def case_from_example(ex, modalities):
    box = CropBox(tuple(int(v) for v in ex["crop_start"]), tuple(int(v) for v in ex["crop_stop"]),
                  tuple(int(v) for v in ex["full_shape"]))
    prepared = PreparedCase(
        case_id=ex["case_id"].decode() if isinstance(ex["case_id"], bytes) else str(ex["case_id"]),
        image=ex["image"], label=ex["label"] if ex["has_label"] else None,
        brain=ex["brain"].astype(bool), box=box, modalities=tuple(modalities))
    return RecordCase(prepared, ex["modality_present"])


# --- checks ---------------------------------------------------------------------------------

def _check_case(records_dir, case, entries, wanted, modalities):
    """A decoded case agrees with its manifest entry (the writer wrote both from one case)."""
    p = case.prepared
    where = os.path.join(records_dir, MANIFEST)
    if p.case_id not in wanted:
        raise DataError(where, f"records hold case {p.case_id!r}, which the manifest does not list "
                               f"or was not asked for")
    entry = entries[p.case_id]
    present = [bool(v) for v in case.modality_present]
    box_shape = tuple(b - a for a, b in zip(p.box.start, p.box.stop))
    problems = [
        (present != [m in entry["modalities_present"] for m in modalities], "modalities present"),
        (list(p.box.start) != entry["crop"]["start"] or list(p.box.stop) != entry["crop"]["stop"]
         or list(p.box.full_shape) != entry["crop"]["full_shape"], "crop box"),
        (p.image.shape[:3] != box_shape or p.brain.shape != box_shape
         or (p.label is not None and p.label.shape != box_shape), "array shapes"),
        ((p.label is None) != (entry["voxels_per_class"] is None), "labels"),
    ]
    for differs, what in problems:
        if differs:
            raise DataError(where, f"case {p.case_id}: {what} differ between records and manifest")


def _manifest_problem(m):
    """What is wrong with a manifest's fields, or None (the layout `writer.build_records` writes)."""
    def ints(v, n=None, low=None):
        return (isinstance(v, list) and (n is None or len(v) == n)
                and all(isinstance(x, int) and not isinstance(x, bool) and (low is None or x >= low) for x in v))

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    missing = [k for k in _MANIFEST_KEYS if k not in m]
    if missing:
        return f"no {missing[0]!r} field"
    records = m.get("records")
    if not (isinstance(records, str) and records and not os.path.isabs(records)
            and not os.path.normpath(records).startswith("..")):
        return "'records' is not a folder inside the record set"
    modalities = m.get("modalities")
    if not (isinstance(modalities, list) and modalities and all(x in MODALITIES for x in modalities)
            and modalities == [x for x in MODALITIES if x in modalities]):
        return f"'modalities' is not a list of modality names in the order {list(MODALITIES)}"
    if m.get("normalization") not in NORMALIZATIONS:
        return f"'normalization' is not one of {list(NORMALIZATIONS)}"
    if not (m.get("median_scale") is None or number(m["median_scale"])) \
            or (m["normalization"] == "median") != (m.get("median_scale") is not None):
        return "'median_scale' does not fit the normalization"
    if not ints([m.get("crop_margin")], low=0):
        return "'crop_margin' is not a non-negative integer"
    if not (isinstance(m.get("source_dir"), str) and isinstance(m.get("layout"), str)):
        return "'source_dir' or 'layout' is not a string"
    cases = m.get("cases")
    if not isinstance(cases, list) or m.get("num_cases") != len(cases) or isinstance(m.get("num_cases"), bool):
        return "'num_cases' does not count the 'cases' list"
    ids = set()
    for i, c in enumerate(cases):
        crop = c.get("crop") if isinstance(c, dict) else None
        if not (isinstance(c, dict) and all(k in c for k in _CASE_KEYS)
                and isinstance(c.get("case_id"), str) and c["case_id"]
                and isinstance(c.get("record_file"), str) and c["record_file"] == os.path.basename(c["record_file"])
                and ".tfrecord" in c["record_file"]
                and c["case_id"] not in ids
                and isinstance(c.get("modalities_present"), list)
                and all(x in modalities for x in c["modalities_present"])
                and ints(c.get("original_shape"), 3, 1)
                and isinstance(c.get("spacing_mm"), list) and len(c["spacing_mm"]) == 3
                and all(number(x) and x > 0 for x in c["spacing_mm"])
                and isinstance(crop, dict) and all(ints(crop.get(k), 3, 0) for k in ("start", "stop", "full_shape"))
                and crop["full_shape"] == c["original_shape"]
                and (c.get("voxels_per_class") is None or ints(c["voxels_per_class"], NUM_CLASSES, 0))):
            return f"case entry {i} is incomplete or inconsistent"
        ids.add(c["case_id"])
    return None


def _bad_shard(records_dir, manifest):
    """The record file that fails to read (TF's error does not say which); on the error path
    only, so reading every shard again is affordable. The folder when no single one fails."""
    folder = os.path.join(records_dir, manifest["records"])
    for name in sorted(tf.io.gfile.listdir(folder)):
        if ".tfrecord" in name:
            try:
                for _ in tf.data.TFRecordDataset(os.path.join(folder, name)):
                    pass
            except tf.errors.OpError:
                return os.path.join(folder, name)
    return folder
