"""Streaming training input: class-aware batches of 2D slices, 3D patches or whole volumes,
cut in-graph from cases read lazily from the records, with memory bounded by a window.

Design (BUILD_NOTES, "Streaming input pipelines"): the stream is a sequence of *windows*
of `window_cases` cases (DeepMedic's sub-epochs, MONAI's SmartCache). Window w is chosen
from (seed, w) alone: first one case holding each class present in the training set (from
the manifest's voxel counts), then the rest at random without repetition. Its cases are
read from their own record files (interleaved, in order), joined with their feature
records, and padded to one tensor; `batches_per_window` batches are then cut from it with
TensorFlow ops, batch b from (seed, b) alone. Hence:

- memory holds a few windows, whatever the number of cases;
- every batch holds every class of the training set (the window holds each class, and a
  slot of the batch is reserved for each);
- batch b is the same in a resumed run: `dataset(first_batch=b)` starts at window b // M
  and skips b % M batches;
- no Python in the input path: the graph has no PyFunc or generator op (tested), so it can
  run on a TPU host, be sharded across workers, and never holds the GIL.
"""

import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from brats_tf.constants import ORIENTATIONS, SLICE_AXIS
from brats_tf.errors import ConfigError
from brats_tf.records import reader, schema

SAMPLING = ("class_balanced", "tumor_balanced", "uniform")
# Class-aware slots are filled tumor classes first, then background.
SLOT_CLASS_ORDER = (1, 2, 3, 0)
MAJORITY_TRIES = 8          # candidate centers tried for a tumor-/background-majority patch
_ENDLESS = np.iinfo(np.int64).max


@dataclass
class CaseSource:
    """The training cases of a stream: where their records (and feature records) are, and
    the per-case facts the window selection needs (from the manifest, a few bytes a case)."""
    case_ids: tuple
    record_paths: tuple
    class_present: np.ndarray          # (N, NUM_CLASSES) bool
    crop_shapes: np.ndarray            # (N, 3) int
    channels: tuple                    # image channels kept, in order
    num_modalities: int                # image channels stored in the records
    feature_paths: tuple = None        # aligned with case_ids, or None
    num_features: int = 0

    @property
    def num_channels(self):
        return len(self.channels) + self.num_features

    def guaranteed_classes(self):
        """Classes some training case holds, in slot order."""
        return [c for c in SLOT_CLASS_ORDER if self.class_present[:, c].any()]


def case_source(records_dir, case_ids, channels=None, require_channels_present=False,
                feature_paths=None, num_features=0):
    """The `CaseSource` of `case_ids` (labeled cases of a record set).

    channels: image channels to keep (default all); with require_channels_present, cases
    lacking one of them are left out (subnetwork pretraining). feature_paths: {case_id:
    path} of the 2D feature records, `num_features` channels each.
    """
    manifest = reader.load_manifest(records_dir)
    entries = {c["case_id"]: c for c in manifest["cases"]}
    unknown = sorted(set(case_ids) - set(entries))
    if unknown:
        raise ConfigError(f"{records_dir}: cases not in the record set: {unknown[:5]}")
    modalities = manifest["modalities"]
    channels = tuple(range(len(modalities)) if channels is None else channels)
    folder = os.path.join(records_dir, manifest["records"])
    chosen = []
    for case_id in sorted(case_ids):
        entry = entries[case_id]
        if entry["voxels_per_class"] is None:
            raise ConfigError(f"{records_dir}: case {case_id} has no labels to train on")
        if require_channels_present and not all(modalities[i] in entry["modalities_present"] for i in channels):
            continue
        chosen.append(entry)
    if not chosen:
        raise ConfigError(f"{records_dir}: no training cases (after filtering by modality)")
    ids = tuple(e["case_id"] for e in chosen)
    return CaseSource(
        case_ids=ids,
        record_paths=tuple(os.path.join(folder, e["record_file"]) for e in chosen),
        class_present=np.array([[n > 0 for n in e["voxels_per_class"]] for e in chosen], bool),
        crop_shapes=np.array([[b - a for a, b in zip(e["crop"]["start"], e["crop"]["stop"])] for e in chosen]),
        channels=channels,
        num_modalities=len(modalities),
        feature_paths=None if feature_paths is None else tuple(feature_paths[i] for i in ids),
        num_features=int(num_features) if feature_paths is not None else 0)


# --- windows of cases -------------------------------------------------------------------------

def _key(seed, *numbers):
    """A stateless RNG key for (seed, numbers...)."""
    key = tf.constant([seed, 0], tf.int64)
    for n in numbers:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(n, tf.int64))
    return key


def pick_where(key, mask):
    """Index of a uniformly chosen True entry of `mask` (of any entry if none is True)."""
    return pick_many(key, mask, 1)[0]


def pick_many(key, mask, n):
    """`n` indices of True entries of `mask`, uniformly with replacement (any entry if none is True)."""
    mask = tf.logical_or(mask, tf.logical_not(tf.reduce_any(mask)))
    logits = tf.where(mask, 0.0, -1e9)[tf.newaxis]
    return tf.cast(tf.random.stateless_categorical(logits, n, seed=key)[0], tf.int32)


def uniform_index(key, count):
    """A uniform integer in [0, count) (0 when count is 0)."""
    return tf.random.stateless_uniform([], key, minval=0, maxval=tf.maximum(count, 1), dtype=tf.int32)


def uniform_rows(key, counts):
    """Per entry of `counts`, a uniform integer in [0, count) (0 when count is 0)."""
    u = tf.random.stateless_uniform(tf.shape(counts), key)
    rows = tf.cast(tf.floor(u * tf.cast(counts, tf.float32)), tf.int32)
    return tf.clip_by_value(rows, 0, tf.maximum(counts - 1, 0))


def _fold(key, n):
    return tf.random.experimental.stateless_fold_in(key, n)


def window_cases(seed, window, class_present, size, classes):
    """Case indices of window `window`: a case holding each of `classes`, then the others in
    random order; `size` distinct cases (graph function of (seed, window))."""
    present = tf.constant(class_present)
    num_cases = class_present.shape[0]
    taken = tf.zeros([num_cases], tf.bool)
    for c in classes:   # a new case only for a class the window does not hold yet
        covered = tf.reduce_any(tf.logical_and(taken, present[:, c]))
        pick = pick_where(_key(seed, window, 1, c), present[:, c])
        taken = tf.logical_or(taken, tf.logical_and(tf.logical_not(covered), tf.equal(tf.range(num_cases), pick)))
    priority = tf.random.stateless_uniform([num_cases], _key(seed, window, 2))
    order = tf.argsort(tf.where(taken, -1.0, priority))   # chosen first, then the rest shuffled
    return tf.cast(order[:size], tf.int32)


def window_dataset(source, parse, window_size, seed, first_window=0):
    """Endless dataset of windows: each a dict of tensors stacked over `window_size` cases
    (zero-padded to the window's largest case), plus "window" (its number)."""
    classes = source.guaranteed_classes()
    records = tf.constant(source.record_paths)
    features = tf.constant(source.feature_paths) if source.feature_paths else None

    def cases_of(w):
        indices = window_cases(seed, w, source.class_present, window_size, classes)
        return tf.data.Dataset.from_tensor_slices(indices).map(lambda i: (w, i))

    def read(w, i):
        case = tf.data.TFRecordDataset(records[i]).map(parse)
        if features is not None:
            case = tf.data.Dataset.zip((case, tf.data.TFRecordDataset(features[i]))).map(_join_features)
        return case.map(lambda ex: dict(ex, window=w))

    # Each file holds one case, so interleaving keeps the window's order.
    cases = tf.data.Dataset.range(first_window, _ENDLESS).flat_map(cases_of).interleave(
        read, cycle_length=window_size, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return cases.padded_batch(window_size, drop_remainder=True)


def _join_features(case, serialized):
    """Appends a case's feature channels to its volume; a record of another case or grid is
    an error (raised when the stream reaches it)."""
    case_id, features = schema.parse_feature_record(serialized)
    checks = [
        tf.debugging.assert_equal(case_id, case["case_id"], message="feature record of another case"),
        tf.debugging.assert_equal(tf.shape(features)[:3], tf.shape(case["volume"])[:3],
                                  message="feature record on another grid than its case"),
    ]
    with tf.control_dependencies(checks):
        volume = tf.concat([case["volume"], tf.cast(features, case["volume"].dtype)], axis=-1)
    return dict(case, volume=volume)


def case_parser(num_modalities, channels, fields):
    """Graph function: serialized case record -> dict of the fields a sampler needs, with
    "volume" (the kept image channels, float16) and "shape" (the cropped grid)."""
    decoder = schema.case_features(num_modalities)
    channels = list(channels)

    def parse(serialized):
        ex = decoder.deserialize_example(serialized)
        out = {"case_id": ex["case_id"], "volume": tf.gather(ex["image"], channels, axis=-1),
               "label": ex["label"], "shape": tf.shape(ex["label"], out_type=tf.int32)}
        out.update({k: ex[k] for k in fields})
        return out
    return parse


# --- cutting batches from a window ------------------------------------------------------------

def crop_block(windowed, case, start, size):
    """`size`³ block of case `case` of a windowed tensor (W, X, Y, Z, ...) starting at
    `start` (may reach outside: zero-padded, as if the case were)."""
    size = tf.constant([size] * 3, tf.int32)
    grid = tf.shape(windowed, out_type=tf.int32)[1:4]
    lo = tf.clip_by_value(start, 0, grid)
    hi = tf.clip_by_value(start + size, 0, grid)
    rest = tf.rank(windowed) - 4
    begin = tf.concat([[case], lo, tf.zeros([rest], tf.int32)], 0)
    extent = tf.concat([[1], hi - lo, -tf.ones([rest], tf.int32)], 0)
    block = tf.slice(windowed, begin, extent)[0]
    pads = tf.concat([tf.stack([lo - start, start + size - hi], axis=1), tf.zeros([rest, 2], tf.int32)], 0)
    return tf.pad(block, pads)


def drop_sequences(key, present, probability):
    """Sequence dropout (issue 15): each present sequence of each example (rows of `present`,
    (B, K) bool) dropped with `probability`, never all of a row (then the present one with the
    highest draw stays). Returns the kept mask as float32 (B, K)."""
    draws = tf.random.stateless_uniform(tf.shape(present), key)
    kept = tf.logical_and(present, draws >= probability)
    best = tf.one_hot(tf.argmax(tf.where(present, draws, -1.0), axis=1), tf.shape(present)[1], on_value=True,
                      off_value=False)
    kept = tf.where(tf.reduce_any(kept, axis=1, keepdims=True), kept, tf.logical_and(best, present))
    return tf.cast(kept, tf.float32)


def _check_dropout(probability):
    if probability is not None and not 0 <= probability < 1:
        raise ConfigError(f"sequence_dropout must be in [0, 1), got {probability}")


def augment(key, x, y, flip_axis, intensity_scale, num_images):
    """Per example of the batch: x and y mirrored along `flip_axis` with probability 1/2
    (None: never), and each of the first `num_images` channels of x multiplied by a factor
    uniform in [1 - intensity_scale, 1 + intensity_scale] (the channels after them, 2D
    features, unchanged). Stateless: the same key gives the same batch."""
    batch, channels = x.shape[0], x.shape[-1]
    if flip_axis is not None:
        flip = tf.random.stateless_uniform([batch], _fold(key, 1)) < 0.5
        where = lambda t: tf.where(tf.reshape(flip, [batch] + [1] * (len(t.shape) - 1)), tf.reverse(t, [flip_axis]), t)
        x, y = where(x), where(y)
    if intensity_scale:
        factors = 1.0 + intensity_scale * tf.random.stateless_uniform([batch, num_images], _fold(key, 2), -1.0, 1.0)
        factors = tf.concat([factors, tf.ones([batch, channels - num_images])], 1)
        x = x * tf.reshape(factors, [batch] + [1] * (len(x.shape) - 2) + [channels])
    return x, y


def permute(key, tensors):
    """The same random permutation of the leading axis of each tensor."""
    order = tf.argsort(tf.random.stateless_uniform([tensors[0].shape[0]], key))
    return [tf.gather(t, order) for t in tensors]


class _Stream:
    """Shared plumbing: a window dataset and `batches_per_window` batches cut from each."""

    fields = ()

    flip_axis = None   # the batch axis of x and y that is array axis 0 (left-right), if any

    def __init__(self, source, batch_size, seed=0, window_cases=8, batches_per_window=16, flip_lr=None,
                 intensity_scale=None):
        if window_cases < 1 or batches_per_window < 1:
            raise ConfigError(f"window_cases ({window_cases}) and batches_per_window ({batches_per_window}) "
                              f"must be >= 1")
        self.source, self.batch_size, self.seed = source, int(batch_size), int(seed)
        self.window_size = min(int(window_cases), len(source.case_ids))
        self.batches_per_window = int(batches_per_window)
        self.num_channels = source.num_channels
        self.flip_lr, self.intensity_scale = bool(flip_lr), float(intensity_scale or 0.0)
        if self.window_size < min(len(source.guaranteed_classes()), len(source.case_ids)):
            raise ConfigError(f"window_cases {window_cases} cannot hold a case of each of "
                              f"{len(source.guaranteed_classes())} classes")

    def dataset(self, first_batch=0, num_batches=None):
        """tf.data.Dataset of (x float32, y int32) batches from batch `first_batch` on
        (endless unless num_batches), fully static shapes, prefetched."""
        m = self.batches_per_window
        parse = case_parser(self.source.num_modalities, self.source.channels, self.fields)
        windows = window_dataset(self.source, parse, self.window_size, self.seed, first_window=first_batch // m)
        numbered = windows.flat_map(lambda win: tf.data.Dataset.range(m).map(
            lambda i: (win, win["window"][0] * m + i)))
        ds = numbered.skip(first_batch % m)
        if num_batches is not None:
            ds = ds.take(num_batches)
        ds = ds.map(self._cut, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    def slots(self, class_slot, other_slot):
        """(case (B,), position (B, ...)) of each slot of a batch: `class_slot(slot, c)` for the
        slots reserved for each class (unrolled: a few), `other_slot(slot)` for the rest (one
        function mapped over their slot numbers, so the graph stays small for large batches)."""
        picks = [class_slot(slot, c) for slot, c in enumerate(self.classes)]
        cases = [tf.reshape(case, [1]) for case, _ in picks]
        positions = [position[tf.newaxis] for _, position in picks]
        if self.batch_size > len(self.classes):
            other = tf.map_fn(other_slot, tf.range(len(self.classes), self.batch_size),
                              fn_output_signature=(tf.int32, self.position_spec))
            cases.append(other[0])
            positions.append(other[1])
        return tf.concat(cases, 0), tf.concat(positions, 0)

    def _cut(self, win, batch_number):
        x, y = self.cut(win, batch_number)
        if self.flip_lr or self.intensity_scale:
            x, y = self._augmented(x, y, batch_number)
        if isinstance(x, dict):   # {"image" or "patch", "present"}
            x = {k: tf.ensure_shape(v, self.x_shape if k != "present" else (self.batch_size, len(self.source.channels)))
                 for k, v in x.items()}
        else:
            x = tf.ensure_shape(x, self.x_shape)
        return x, tf.ensure_shape(y, self.y_shape)

    def _augmented(self, x, y, b):
        name = next((k for k in ("image", "patch") if isinstance(x, dict) and k in x), None)
        flip_axis = self.flip_axis if self.flip_lr else None
        image, y = augment(_key(self.seed, b, -3), x[name] if name else x, y, flip_axis, self.intensity_scale,
                           len(self.source.channels))
        return (dict(x, **{name: image}) if name else image), y

    def source_present(self, win, cases, b):
        """(B, K) float32: the sequences each example keeps after sequence dropout (issue 15),
        from its case's stored `modality_present` (the mask travels with the data)."""
        stored = tf.gather(win["modality_present"], list(self.source.channels), axis=1)   # (W, K)
        return drop_sequences(_key(self.seed, b, -2), tf.gather(stored, cases), self.sequence_dropout)

    def batch(self, batch_number):
        """Batch `batch_number` as NumPy (tests, calibration): the stream's own batch."""
        x, y = next(iter(self.dataset(first_batch=batch_number, num_batches=1)))
        x = {k: v.numpy() for k, v in x.items()} if isinstance(x, dict) else x.numpy()
        return x, y.numpy()


class SliceStream(_Stream):
    """Class-aware batches of full (padded) slices of one orientation.

    One slice holding each class of the training set is picked first, the rest at random
    (a tumor slice with probability `tumor_fraction`).
    """

    def __init__(self, source, orientation, batch_size, slice_shape, seed=0, tumor_fraction=0.5,
                 sequence_dropout=None, **window):
        if orientation not in ORIENTATIONS:
            raise ConfigError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        _check_dropout(sequence_dropout)
        super().__init__(source, batch_size, seed, **window)
        self.orientation, self.axis = orientation, SLICE_AXIS[orientation]
        self.flip_axis = 1 if self.axis != 0 else None   # sagittal slices (axis 0) have no left-right axis
        self.tumor_fraction = float(tumor_fraction)
        self.slice_shape = tuple(int(n) for n in slice_shape)
        self.fields = (f"slice_classes_{orientation}",)
        self.sequence_dropout = sequence_dropout
        if sequence_dropout is not None:   # x = {"image", "present"} for models built with presence
            self.fields += ("modality_present",)
        self.classes = source.guaranteed_classes()
        if batch_size < len(self.classes):
            raise ConfigError(f"batch_size {batch_size} cannot hold all {len(self.classes)} classes")
        self.x_shape = (self.batch_size,) + self.slice_shape + (self.num_channels,)
        self.y_shape = (self.batch_size,) + self.slice_shape

    position_spec = tf.TensorSpec([], tf.int32)    # a slice index

    def cut(self, win, b):
        presence = win[self.fields[0]]                       # (W, S, C) bool
        num_slices = win["shape"][:, self.axis]
        tumor = tf.reduce_any(presence[..., 1:], axis=-1)    # (W, S)

        def class_slot(slot, c):
            has = presence[..., c]
            case = pick_where(_key(self.seed, b, slot, 1), tf.reduce_any(has, axis=1))
            return case, pick_where(_key(self.seed, b, slot, 2), has[case])

        def other_slot(slot):
            want_tumor = tf.logical_and(
                tf.random.stateless_uniform([], _key(self.seed, b, slot, 3)) < self.tumor_fraction,
                tf.reduce_any(tumor))
            tumor_case = pick_where(_key(self.seed, b, slot, 1), tf.reduce_any(tumor, axis=1))
            any_case = uniform_index(_key(self.seed, b, slot), self.window_size)
            case = tf.where(want_tumor, tumor_case, any_case)
            tumor_slice = pick_where(_key(self.seed, b, slot, 2), tumor[case])
            any_slice = uniform_index(_key(self.seed, b, slot, 4), num_slices[case])
            return case, tf.where(want_tumor, tumor_slice, any_slice)

        cases, indices = self.slots(class_slot, other_slot)
        cut = lambda windowed, shape: tf.map_fn(
            lambda a: tf.ensure_shape(self._slice(windowed, a[0], a[1]), shape), (cases, indices),
            fn_output_signature=tf.TensorSpec(shape, windowed.dtype))
        x = tf.cast(cut(win["volume"], self.slice_shape + (self.num_channels,)), tf.float32)
        y = cut(win["label"], self.slice_shape)
        if self.sequence_dropout is None:
            x, y = permute(_key(self.seed, b, -1), [x, y])
            return x, tf.cast(y, tf.int32)
        present = self.source_present(win, cases, b)
        x = x * present[:, tf.newaxis, tf.newaxis, :]    # dropped: zero-filled, as a missing one is
        x, present, y = permute(_key(self.seed, b, -1), [x, present, y])
        return {"image": x, "present": present}, tf.cast(y, tf.int32)

    def _slice(self, windowed, case, index):
        """Slice `index` of case `case`, zero-padded at the end to the slice shape."""
        rank = len(windowed.shape)
        begin = tf.tensor_scatter_nd_update(tf.zeros([rank], tf.int32), [[0], [1 + self.axis]], tf.stack([case, index]))
        extent = tf.tensor_scatter_nd_update(-tf.ones([rank], tf.int32), [[0], [1 + self.axis]], [1, 1])
        one = tf.squeeze(tf.slice(windowed, begin, extent), [0, 1 + self.axis])
        size = tf.shape(one, out_type=tf.int32)[:2]
        pads = tf.stack([tf.zeros([2], tf.int32), tf.constant(self.slice_shape, tf.int32) - size], axis=1)
        pads = tf.concat([pads, tf.zeros([tf.rank(one) - 2, 2], tf.int32)], 0)
        return tf.pad(one, pads)


class PatchStream(_Stream):
    """Batches of (input patch, label patch): an `input_size`³ block of image (then feature)
    channels and the `label_size`³ label block at its center.

    sampling: "class_balanced" ([M]: a center of each class of the training set, jittered
    within the label block, the rest in the brain), "tumor_balanced" ([S]: half the patches
    majority-tumor, half majority-background), "uniform" (centers anywhere in the brain).
    """

    fields = ("class_centers", "class_center_count", "brain_centers", "brain_center_count")

    def __init__(self, source, input_size, label_size, batch_size, seed=0, sampling="class_balanced",
                 binary=False, sequence_dropout=None, **window):
        if sampling not in SAMPLING:
            raise ConfigError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        _check_dropout(sequence_dropout)
        self.sequence_dropout = sequence_dropout
        if sequence_dropout is not None:   # x = {"patch", "present"} for models built with presence
            self.fields = PatchStream.fields + ("modality_present",)
        if label_size > input_size or (input_size - label_size) % 2:
            raise ConfigError(f"label_size {label_size} must fit centered in input_size {input_size}")
        super().__init__(source, batch_size, seed, **window)
        self.input_size, self.label_size = int(input_size), int(label_size)
        self.sampling, self.binary = sampling, binary
        self.classes = source.guaranteed_classes() if sampling == "class_balanced" else []
        if batch_size < len(self.classes):
            raise ConfigError(f"batch_size {batch_size} cannot hold all {len(self.classes)} classes")
        self.x_shape = (self.batch_size,) + (self.input_size,) * 3 + (self.num_channels,)
        self.y_shape = (self.batch_size,) + (self.label_size,) * 3

    position_spec = tf.TensorSpec([3], tf.int32)   # a center voxel
    flip_axis = 1

    def cut(self, win, b):
        def other_slot(slot):
            key = _key(self.seed, b, slot)
            if self.sampling == "tumor_balanced":
                return self._majority_center(win, key, want_tumor=tf.equal(slot % 2, len(self.classes) % 2))
            cases, centers = self._brain_centers(win, key, 1)
            return cases[0], centers[0]

        cases, centers = self.slots(lambda slot, c: self._class_center(win, b, slot, c), other_slot)
        size, label_size = self.input_size, self.label_size
        x = tf.map_fn(lambda a: tf.ensure_shape(crop_block(win["volume"], a[0], a[1] - size // 2, size),
                                                (size,) * 3 + (self.num_channels,)),
                      (cases, centers), fn_output_signature=tf.TensorSpec((size,) * 3 + (self.num_channels,),
                                                                          win["volume"].dtype))
        y = tf.map_fn(lambda a: tf.ensure_shape(self._label_block(win, a[0], a[1]), (label_size,) * 3),
                      (cases, centers), fn_output_signature=tf.TensorSpec((label_size,) * 3, win["label"].dtype))
        x = tf.cast(x, tf.float32)
        if self.sequence_dropout is None:
            x, y = permute(_key(self.seed, b, -1), [x, y])
            return x, self._labels(y)
        present = self.source_present(win, cases, b)
        features = tf.ones([self.batch_size, self.num_channels - present.shape[1]])
        x = x * tf.concat([present, features], 1)[:, tf.newaxis, tf.newaxis, tf.newaxis, :]
        x, present, y = permute(_key(self.seed, b, -1), [x, present, y])
        return {"patch": x, "present": present}, self._labels(y)

    def _labels(self, y):
        y = tf.cast(y, tf.int32)
        return tf.cast(y > 0, tf.int32) if self.binary else y

    def _label_block(self, win, case, center):
        return crop_block(win["label"], case, center - self.label_size // 2, self.label_size)

    def _class_center(self, win, b, slot, c):
        counts = win["class_center_count"][:, c]
        case = pick_where(_key(self.seed, b, slot, 1), counts > 0)
        center = win["class_centers"][case, c, uniform_index(_key(self.seed, b, slot, 2), counts[case])]
        center = tf.cast(center, tf.int32)
        if c:   # the class voxel anywhere in the label block; kept inside the case
            half = self.label_size // 2
            jitter = tf.random.stateless_uniform([3], _key(self.seed, b, slot, 3), minval=-(self.label_size - half - 1),
                                                 maxval=half + 1, dtype=tf.int32)
            center = tf.clip_by_value(center + jitter, 0, win["shape"][case] - 1)
        return case, center

    def _brain_centers(self, win, key, n):
        """`n` random (case, center) pairs in the brain."""
        counts = win["brain_center_count"]
        cases = pick_many(_fold(key, 1), counts > 0, n)
        rows = uniform_rows(_fold(key, 2), tf.gather(counts, cases))
        return cases, tf.cast(tf.gather_nd(win["brain_centers"], tf.stack([cases, rows], 1)), tf.int32)

    def _tumor_centers(self, win, key, n):
        """`n` random (case, center) pairs on tumor voxels (a random tumor class of the case)."""
        counts = win["class_center_count"][:, 1:]                     # (W, 3)
        cases = pick_many(_fold(key, 1), tf.reduce_any(counts > 0, axis=1), n)
        has = tf.gather(counts, cases) > 0
        has = tf.logical_or(has, tf.logical_not(tf.reduce_any(has, axis=1, keepdims=True)))
        classes = tf.cast(tf.random.stateless_categorical(tf.where(has, 0.0, -1e9), 1, seed=_fold(key, 2))[:, 0],
                          tf.int32) + 1
        rows = uniform_rows(_fold(key, 3), tf.gather_nd(win["class_center_count"], tf.stack([cases, classes], 1)))
        centers = tf.gather_nd(win["class_centers"], tf.stack([cases, classes, rows], 1))
        return cases, tf.cast(centers, tf.int32)

    def _majority_center(self, win, key, want_tumor):
        """The first of MAJORITY_TRIES candidates whose label block is mostly tumor (or mostly
        background), else the last; tumor candidates are tumor voxels, background ones brain voxels."""
        brain_cases, brain_centers = self._brain_centers(win, _fold(key, 10), MAJORITY_TRIES)
        tumor_cases, tumor_centers = self._tumor_centers(win, _fold(key, 11), MAJORITY_TRIES)
        use_tumor = tf.logical_and(want_tumor, tf.reduce_any(win["class_center_count"][:, 1:] > 0))
        cases = tf.where(use_tumor, tumor_cases, brain_cases)
        centers = tf.where(use_tumor, tumor_centers, brain_centers)
        fractions = tf.map_fn(lambda a: tf.reduce_mean(tf.cast(self._label_block(win, a[0], a[1]) > 0, tf.float32)),
                              (cases, centers), fn_output_signature=tf.float32)
        ok = tf.where(want_tumor, fractions > 0.5, fractions <= 0.5)
        first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
        index = tf.where(tf.reduce_any(ok), first, MAJORITY_TRIES - 1)
        return cases[index], centers[index]


class VolumeStream(_Stream):
    """Whole cases, center-cropped / zero-padded to `size` (the [S] full-image FCN), drawn
    uniformly from the window."""

    def __init__(self, source, size, batch_size, seed=0, binary=True, **window):
        super().__init__(source, batch_size, seed, **window)
        self.size, self.binary = tuple(int(n) for n in size), binary
        self.x_shape = (self.batch_size,) + self.size + (self.num_channels,)
        self.y_shape = (self.batch_size,) + self.size

    def cut(self, win, b):
        cases = [uniform_index(_key(self.seed, b, slot), self.window_size) for slot in range(self.batch_size)]
        x = tf.stack([self._fit(win["volume"], win["shape"][case], case) for case in cases])
        y = tf.cast(tf.stack([self._fit(win["label"], win["shape"][case], case) for case in cases]), tf.int32)
        if self.binary:
            y = tf.cast(y > 0, tf.int32)
        return tf.cast(x, tf.float32), y

    def _fit(self, windowed, shape, case):
        """Centered overlap of the case with the target size (`inference.baselines.fit_to_size`)."""
        size = tf.constant(self.size, tf.int32)
        length = tf.minimum(shape, size)
        source_start = (shape - length) // 2
        target_start = (size - length) // 2
        rest = tf.rank(windowed) - 4
        block = tf.slice(windowed, tf.concat([[case], source_start, tf.zeros([rest], tf.int32)], 0),
                         tf.concat([[1], length, -tf.ones([rest], tf.int32)], 0))[0]
        pads = tf.stack([target_start, size - length - target_start], axis=1)
        return tf.pad(block, tf.concat([pads, tf.zeros([rest, 2], tf.int32)], 0))


def window_options(data_config):
    """The stream's window (and augmentation) keywords from a trainer's `data` config."""
    return {"window_cases": data_config.window_cases, "batches_per_window": data_config.batches_per_window,
            "flip_lr": data_config.get("flip_lr"), "intensity_scale": data_config.get("intensity_scale")}


def slice_shape(source, orientation, multiple=1):
    """The padded (H, W) of every slice of an orientation: the largest over the cases, rounded
    up to `multiple` (the 2D model's pooling factor)."""
    axes = [a for a in range(3) if a != SLICE_AXIS[orientation]]
    return tuple(int(-(-source.crop_shapes[:, a].max() // multiple) * multiple) for a in axes)
