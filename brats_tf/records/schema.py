"""The one record schema, shared by the writer and the reader.

One example per case: the normalized, brain-cropped image volume and its labels. Samplers
cut 2D slices (any orientation) and 3D patches from whole cases in-graph, which is
faster than storing every patch and keeps one record set for every stage (BUILD_NOTES,
"Record layout"). 2D feature channels are stored beside the records by the 3D stage.
"""

import numpy as np
import tensorflow_datasets as tfds

SCHEMA_VERSION = "1.0.0"
DATASET_NAME = "brats_cases"
SPLIT = "cases"
IMAGE_DTYPE = np.float16   # normalized intensities; halves bytes, ample precision for CNN input
LABEL_DTYPE = np.uint8


def case_features(num_modalities):
    """The FeaturesDict of one case (spatial dims vary per case after the brain crop)."""
    volume = lambda dtype: tfds.features.Tensor(shape=(None, None, None), dtype=dtype, encoding="bytes")
    return tfds.features.FeaturesDict({
        "case_id": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(None, None, None, num_modalities), dtype=IMAGE_DTYPE,
                                      encoding="bytes"),
        # Internal labels 0..3; an unlabeled case stores an empty (0, 0, 0) array.
        "label": volume(LABEL_DTYPE),
        "has_label": tfds.features.Scalar(dtype=np.bool_),
        "brain": volume(np.uint8),
        # False where the case lacks a modality (its channel is all zero).
        "modality_present": tfds.features.Tensor(shape=(num_modalities,), dtype=np.bool_),
        "crop_start": tfds.features.Tensor(shape=(3,), dtype=np.int32),
        "crop_stop": tfds.features.Tensor(shape=(3,), dtype=np.int32),
        "full_shape": tfds.features.Tensor(shape=(3,), dtype=np.int32),
    })


def example_from_case(prepared, modality_present):
    """The feature dict for a `preprocess.PreparedCase` (inverse: reader.case_from_example)."""
    has_label = prepared.label is not None
    return {
        "case_id": prepared.case_id,
        "image": prepared.image.astype(IMAGE_DTYPE),
        "label": prepared.label.astype(LABEL_DTYPE) if has_label else np.zeros((0, 0, 0), LABEL_DTYPE),
        "has_label": has_label,
        "brain": prepared.brain.astype(np.uint8),
        "modality_present": np.asarray(modality_present, dtype=np.bool_),
        "crop_start": np.asarray(prepared.box.start, np.int32),
        "crop_stop": np.asarray(prepared.box.stop, np.int32),
        "full_shape": np.asarray(prepared.box.full_shape, np.int32),
    }
