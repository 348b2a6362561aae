"""The one record schema, shared by the writer and the reader.

One example per case, in a record file of its own: the normalized, brain-cropped image
volume, its labels and brain mask, and what the training samplers need to draw class-aware
slices and patches without ever scanning a whole case (per-slice class presence in each
orientation, a bounded seeded sample of candidate centers per class). The streaming
samplers (`records/streams.py`) read cases lazily and cut slices and patches in-graph
(BUILD_NOTES, "Streaming input pipelines"). The 2D feature channels of the 3D stage are a
second record set keyed by case id (`inference/features.py`), joined by the sampler.
"""

import zlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from brats_tf.constants import NUM_CLASSES, ORIENTATIONS, SLICE_AXIS

SCHEMA_VERSION = "2.0.0"
DATASET_NAME = "brats_cases"
SPLIT = "cases"
IMAGE_DTYPE = np.float16   # normalized intensities; halves bytes, ample precision for CNN input
LABEL_DTYPE = np.uint8
CENTER_DTYPE = np.int16    # voxel coordinates on the cropped grid (< 32768 per axis)
# Candidate centers kept per class (and in the brain): enough variety for sampling, a few
# kB per case whatever its size.
CENTERS_PER_CLASS = 1024


def case_features(num_modalities):
    """The FeaturesDict of one case (spatial dims vary per case after the brain crop)."""
    volume = lambda dtype: tfds.features.Tensor(shape=(None, None, None), dtype=dtype, encoding="bytes")
    small = lambda shape, dtype: tfds.features.Tensor(shape=shape, dtype=dtype)
    return tfds.features.FeaturesDict({
        "case_id": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(None, None, None, num_modalities), dtype=IMAGE_DTYPE,
                                      encoding="bytes"),
        # Internal labels 0..3; an unlabeled case stores an empty (0, 0, 0) array.
        "label": volume(LABEL_DTYPE),
        "has_label": tfds.features.Scalar(dtype=np.bool_),
        "brain": volume(np.uint8),
        # False where the case lacks a modality (its channel is all zero).
        "modality_present": small((num_modalities,), np.bool_),
        "crop_start": small((3,), np.int32),
        "crop_stop": small((3,), np.int32),
        "full_shape": small((3,), np.int32),
        # Sampling metadata (all zero for an unlabeled case): a seeded sample of voxels of
        # each class (class 0: non-tumor inside the brain) and of the brain; rows past the
        # count are padding.
        "class_centers": small((NUM_CLASSES, CENTERS_PER_CLASS, 3), CENTER_DTYPE),
        "class_center_count": small((NUM_CLASSES,), np.int32),
        "brain_centers": small((CENTERS_PER_CLASS, 3), CENTER_DTYPE),
        "brain_center_count": small((), np.int32),
        # Which classes each slice holds, per orientation: (num_slices, NUM_CLASSES).
        **{f"slice_classes_{o}": small((None, NUM_CLASSES), np.bool_) for o in ORIENTATIONS},
    })


def example_from_case(prepared, modality_present):
    """The feature dict for a `preprocess.PreparedCase` (inverse: reader.case_from_example)."""
    has_label = prepared.label is not None
    label = prepared.label.astype(LABEL_DTYPE) if has_label else None
    brain = prepared.brain.astype(bool)
    return {
        "case_id": prepared.case_id,
        "image": prepared.image.astype(IMAGE_DTYPE),
        "label": label if has_label else np.zeros((0, 0, 0), LABEL_DTYPE),
        "has_label": has_label,
        "brain": brain.astype(np.uint8),
        "modality_present": np.asarray(modality_present, dtype=np.bool_),
        "crop_start": np.asarray(prepared.box.start, np.int32),
        "crop_stop": np.asarray(prepared.box.stop, np.int32),
        "full_shape": np.asarray(prepared.box.full_shape, np.int32),
        **sampling_metadata(prepared.case_id, label, brain),
    }


def sampling_metadata(case_id, label, brain):
    """Candidate centers and per-slice class presence of one case (the schema's sampling
    fields). Seeded by the case id, so a rebuild writes the same records."""
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    centers = np.zeros((NUM_CLASSES, CENTERS_PER_CLASS, 3), CENTER_DTYPE)
    counts = np.zeros(NUM_CLASSES, np.int32)
    slices = {f"slice_classes_{o}": np.zeros((brain.shape[SLICE_AXIS[o]], NUM_CLASSES), np.bool_)
              for o in ORIENTATIONS}
    if label is not None:
        for c in range(NUM_CLASSES):
            mask = (label == c) & brain if c == 0 else label == c
            counts[c] = _sample_voxels(mask, rng, centers[c])
        one_hot = label[..., None] == np.arange(NUM_CLASSES)
        for o in ORIENTATIONS:
            others = tuple(a for a in range(3) if a != SLICE_AXIS[o])
            slices[f"slice_classes_{o}"] = one_hot.any(axis=others)
    brain_centers = np.zeros((CENTERS_PER_CLASS, 3), CENTER_DTYPE)
    brain_count = _sample_voxels(brain, rng, brain_centers) if label is not None else 0
    return {"class_centers": centers, "class_center_count": counts, "brain_centers": brain_centers,
            "brain_center_count": np.int32(brain_count), **slices}


def _sample_voxels(mask, rng, out):
    """Fills `out` (K, 3) with up to K distinct voxels of `mask`, uniformly; returns how many."""
    flat = np.flatnonzero(mask)
    if flat.size > len(out):
        flat = np.sort(rng.choice(flat, size=len(out), replace=False))
    out[:flat.size] = np.column_stack(np.unravel_index(flat, mask.shape))
    return flat.size


# --- feature records: the 2D feature channels of one case (written by feature extraction) ----

FEATURE_DTYPE = np.float16
FEATURE_RECORD_SPEC = {
    "case_id": tf.io.FixedLenFeature([], tf.string),
    "features": tf.io.FixedLenFeature([], tf.string),   # raw little-endian float16, C order
    "shape": tf.io.FixedLenFeature([4], tf.int64),      # (X, Y, Z, channels)
}


def serialize_feature_record(case_id, features):
    """One case's (X, Y, Z, C) feature channels as a serialized tf.train.Example."""
    array = np.ascontiguousarray(features, dtype=np.dtype(FEATURE_DTYPE).newbyteorder("<"))
    feature = {
        "case_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[case_id.encode()])),
        "features": tf.train.Feature(bytes_list=tf.train.BytesList(value=[array.tobytes()])),
        "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=list(array.shape))),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_feature_record(serialized):
    """Graph function: serialized feature record -> (case_id, float16 (X, Y, Z, C))."""
    ex = tf.io.parse_single_example(serialized, FEATURE_RECORD_SPEC)
    values = tf.io.decode_raw(ex["features"], tf.float16, little_endian=True)
    return ex["case_id"], tf.reshape(values, ex["shape"])


def write_feature_record(path, case_id, features):
    """Writes one case's feature record file (callers write to a temporary name and rename)."""
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(serialize_feature_record(case_id, features))
