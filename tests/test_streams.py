"""Streaming training input (records/streams.py): every batch holds every class, patches and
slices align with their labels, seeded and resumable streams, static shapes, no Python ops
in the graph, bounded windows; and the same on records built from NIfTI (phantoms, real data)."""

import numpy as np
import pytest
import tensorflow as tf

from brats_tf.constants import NUM_CLASSES, ORIENTATIONS, SLICE_AXIS
from brats_tf.errors import ConfigError
from brats_tf.preprocess import CropBox, PreparedCase
from brats_tf.records import schema, streams, writer
from brats_tf.records.slices import to_slices
from tests.conftest import REPO, shared_data, write_brats2017_case


def _case(seed, shape=(30, 28, 26), with_enhancing=True, with_edema=True):
    """A case whose image encodes each voxel's coordinates (+1), so crops can be checked."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    c = rng.integers(8, 18, size=3)
    if with_edema:
        label[c[0] - 5:c[0] + 5, c[1] - 5:c[1] + 5, c[2] - 4:c[2] + 4] = 2
    label[c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 2, c[2] - 2:c[2] + 2] = 3 if with_enhancing else 1
    label[c[0], c[1], c[2]] = 1
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) + 1
    brain = np.zeros(shape, bool)
    brain[2:-2, 2:-2, 2:-2] = True
    box = CropBox((0, 0, 0), shape, shape)
    return PreparedCase(f"c{seed:02d}", grid.astype(np.float16), label, brain, box, ("t1", "t1c", "t2"))


def write_source(folder, cases, features=None):
    """Case records (and feature records) as the writers write them, and their CaseSource."""
    decoder = schema.case_features(3)
    paths, feature_paths = [], {}
    for i, case in enumerate(cases):
        path = str(folder / f"{case.case_id}.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            w.write(decoder.serialize_example(schema.example_from_case(case, [True] * 3)))
        paths.append(path)
        if features is not None:
            feature_paths[case.case_id] = str(folder / f"{case.case_id}.features.tfrecord")
            schema.write_feature_record(feature_paths[case.case_id], case.case_id, features[i])
    present = np.array([[(c.label == k).any() for k in range(NUM_CLASSES)] for c in cases])
    return streams.CaseSource(
        case_ids=tuple(c.case_id for c in cases), record_paths=tuple(paths), class_present=present,
        crop_shapes=np.array([c.label.shape for c in cases]), channels=(0, 1, 2), num_modalities=3,
        feature_paths=None if features is None else tuple(feature_paths[c.case_id] for c in cases),
        num_features=0 if features is None else features[0].shape[-1])


def _rare_class_cases():
    """Ten cases: enhancing tumor in one (10 %), no edema in two."""
    return [_case(i, with_enhancing=i == 3, with_edema=i not in (1, 6)) for i in range(10)]


@pytest.fixture(scope="module")
def rare_source(tmp_path_factory):
    return write_source(tmp_path_factory.mktemp("rare"), _rare_class_cases())


def _class_fraction(dataset, num_batches, classes):
    ys = [y for _, y in dataset.take(num_batches).as_numpy_iterator()]
    return np.mean([set(np.unique(y)) >= set(classes) for y in ys]), ys


def test_every_patch_batch_holds_every_class_over_1000_batches(rare_source):
    stream = streams.PatchStream(rare_source, 12, 4, 4, seed=0, window_cases=4, batches_per_window=5)
    fraction, _ = _class_fraction(stream.dataset(), 1000, range(NUM_CLASSES))
    assert fraction >= 0.99, fraction


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_every_slice_batch_holds_every_class(rare_source, orientation):
    shape = streams.slice_shape(rare_source, orientation, 8)
    assert all(n % 8 == 0 for n in shape)
    stream = streams.SliceStream(rare_source, orientation, 4, shape, seed=1, window_cases=4, batches_per_window=4)
    batches = 1000 if orientation == "axial" else 100
    fraction, _ = _class_fraction(stream.dataset(), batches, range(NUM_CLASSES))
    assert fraction >= 0.99, fraction


def test_windows_hold_each_class_and_distinct_cases(rare_source):
    classes = rare_source.guaranteed_classes()
    for w in range(50):
        chosen = streams.window_cases(0, w, rare_source.class_present, 4, classes).numpy()
        assert len(set(chosen)) == 4
        assert rare_source.class_present[chosen].any(axis=0).all()


def test_patches_and_labels_align_with_the_case(tmp_path):
    cases = [_case(0), _case(1, with_enhancing=False)]
    features = [np.full(c.label.shape + (2,), i + 7, np.float16) for i, c in enumerate(cases)]
    source = write_source(tmp_path, cases, features)
    stream = streams.PatchStream(source, 16, 6, 5, seed=1, window_cases=2)
    assert stream.num_channels == 5
    for x, y in stream.dataset(num_batches=20).as_numpy_iterator():
        assert x.shape == (5, 16, 16, 16, 5) and y.shape == (5, 6, 6, 6)
        assert set(np.unique(y)) == {0, 1, 2, 3}
        for i in range(5):
            if (x[i, 8, 8, 8] == 0).all():
                continue                                   # center in padding: no case voxel there
            center = x[i, 8, 8, 8, :3].astype(int) - 1
            case = cases[int(x[i, 8, 8, 8, 3]) - 7]
            expected = np.pad(case.label, 20)[tuple(slice(v + 20 - 3, v + 20 + 3) for v in center)]
            np.testing.assert_array_equal(y[i], expected)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_slices_and_labels_align_with_the_case(tmp_path, orientation):
    cases = [_case(0), _case(2, shape=(26, 30, 22))]
    source = write_source(tmp_path, cases)
    shape = streams.slice_shape(source, orientation, 4)
    stream = streams.SliceStream(source, orientation, 4, shape, seed=0, window_cases=2)
    axis = SLICE_AXIS[orientation]
    for x, y in stream.dataset(num_batches=10).as_numpy_iterator():
        assert x.shape == (4,) + shape + (3,)
        for i in range(4):
            coords = x[i].reshape(-1, 3)
            inside = coords[(coords > 0).all(axis=1)].astype(int) - 1
            index = inside[0, axis]                    # every voxel of the slice shares it
            assert (inside[:, axis] == index).all()
            case = next(c for c in cases if (np.asarray(c.label.shape) > inside.max(axis=0)).all()
                        and np.array_equal(to_slices(c.image, orientation)[index].astype(np.float32),
                                           x[i, :c.label.shape[[a for a in range(3) if a != axis][0]],
                                             :c.label.shape[[a for a in range(3) if a != axis][1]]]))
            expected = to_slices(case.label, orientation)[index]
            np.testing.assert_array_equal(y[i, :expected.shape[0], :expected.shape[1]], expected)
            assert not y[i, expected.shape[0]:].any() and not y[i, :, expected.shape[1]:].any()


def test_tumor_balanced_patches_are_half_and_half(rare_source):
    stream = streams.PatchStream(rare_source, 8, 4, 8, seed=0, sampling="tumor_balanced", binary=True)
    ys = [y for _, y in stream.dataset(num_batches=30).as_numpy_iterator()]
    fractions = np.concatenate([y.reshape(8, -1).mean(axis=1) for y in ys])
    assert 0.4 <= (fractions > 0.5).mean() <= 0.6
    assert set(np.unique(ys[0])) <= {0, 1}


def test_volume_stream_matches_fit_to_size(tmp_path):
    from brats_tf.inference.baselines import fit_to_size
    cases = [_case(0), _case(2, shape=(26, 30, 22))]
    source = write_source(tmp_path, cases)
    stream = streams.VolumeStream(source, (24, 32, 20), 3, seed=0, binary=False, window_cases=2)
    for x, y in stream.dataset(num_batches=4).as_numpy_iterator():
        for i in range(3):
            case = next(c for c in cases if np.array_equal(fit_to_size(c.image, (24, 32, 20)), x[i]))
            np.testing.assert_array_equal(fit_to_size(case.label, (24, 32, 20)), y[i])


def test_same_seed_same_batches_and_resume_continues_the_stream(rare_source, tmp_path):
    again = write_source(tmp_path, _rare_class_cases())
    make = lambda source, seed: streams.PatchStream(source, 12, 4, 4, seed=seed, window_cases=4,
                                                    batches_per_window=3)
    first = list(make(rare_source, 5).dataset(num_batches=20).as_numpy_iterator())
    second = list(make(again, 5).dataset(num_batches=20).as_numpy_iterator())
    other = list(make(rare_source, 6).dataset(num_batches=20).as_numpy_iterator())
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))
    # A run restarted at batch 7 (mid-window) sees batches 7.. of the uninterrupted stream.
    resumed = list(make(rare_source, 5).dataset(first_batch=7, num_batches=13).as_numpy_iterator())
    for (x1, y1), (x2, y2) in zip(first[7:], resumed):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def _graph_ops(dataset):
    graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops |= {node.op for node in function.node_def}
    return ops


def test_static_shapes_and_no_python_in_the_graph(rare_source):
    shape = streams.slice_shape(rare_source, "axial", 8)
    for stream in (streams.SliceStream(rare_source, "axial", 4, shape),
                   streams.PatchStream(rare_source, 12, 4, 4),
                   streams.VolumeStream(rare_source, (16, 16, 16), 2)):
        ds = stream.dataset()
        for spec in ds.element_spec:
            assert spec.shape.is_fully_defined(), spec
        ops = _graph_ops(ds)
        assert "TFRecordDataset" in ops or "TFRecordDatasetV2" in ops   # the check sees inside functions
        assert not {op for op in ops if "PyFunc" in op or "Generator" in op}, ops
    # The check does catch a Python generator.
    generated = tf.data.Dataset.from_generator(lambda: iter([1]), output_signature=tf.TensorSpec([], tf.int32))
    assert {op for op in _graph_ops(generated) if "PyFunc" in op or "Generator" in op}


def test_patches_at_the_case_border_keep_their_shape_and_classes(tmp_path):
    """Regression: a class center jittered past the case's first voxel sliced an empty patch."""
    case = _case(0)
    case.label[:] = 0
    case.label[:6, :3, :3] = 2
    case.label[:3, :3, :3] = 1
    case.label[0, 0, 0] = 3
    stream = streams.PatchStream(write_source(tmp_path, [case]), 70, 26, 4, seed=0)
    for x, y in stream.dataset(num_batches=30).as_numpy_iterator():
        assert x.shape == (4, 70, 70, 70, 3) and set(np.unique(y)) == {0, 1, 2, 3}


def test_bad_settings_are_one_line_errors(rare_source):
    with pytest.raises(ConfigError, match="label_size"):
        streams.PatchStream(rare_source, 10, 5, 4)
    with pytest.raises(ConfigError, match="batch_size"):
        streams.PatchStream(rare_source, 12, 4, 3)
    with pytest.raises(ConfigError, match="window_cases"):
        streams.PatchStream(rare_source, 12, 4, 4, window_cases=0)


def test_a_feature_record_of_another_case_stops_the_stream(tmp_path):
    cases = [_case(0), _case(1)]
    features = [np.zeros(c.label.shape + (2,), np.float16) for c in cases]
    source = write_source(tmp_path, cases, features)
    swapped = source.feature_paths[::-1]
    source = streams.CaseSource(**{**source.__dict__, "feature_paths": swapped})
    with pytest.raises(tf.errors.InvalidArgumentError, match="another case"):
        list(streams.PatchStream(source, 12, 4, 4, window_cases=2).dataset(num_batches=2))


# --- through the writer: phantoms and real data -------------------------------------------------

def test_records_from_nifti_stream_every_class(tmp_path):
    for i in range(4):
        write_brats2017_case(tmp_path / "data", f"Case_{i:03d}", seed=i, with_enhancing=i != 2)
    manifest = writer.build_records(tmp_path / "data", tmp_path / "records", verbose=False)
    assert len({c["record_file"] for c in manifest["cases"]}) == 4
    source = streams.case_source(str(tmp_path / "records"), ["Case_000", "Case_001", "Case_002"])
    assert source.guaranteed_classes() == [1, 2, 3, 0]
    stream = streams.SliceStream(source, "coronal", 4, streams.slice_shape(source, "coronal", 8), window_cases=3)
    fraction, _ = _class_fraction(stream.dataset(), 50, range(NUM_CLASSES))
    assert fraction == 1.0
    # Subnetwork pretraining: one channel, only the cases that have it (all here).
    one = streams.case_source(str(tmp_path / "records"), ["Case_000", "Case_001"], channels=[3],
                              require_channels_present=True)
    x, _ = streams.PatchStream(one, 10, 4, 4, window_cases=2).batch(0)
    assert x.shape == (4, 10, 10, 10, 1)


def test_real_cases_stream_patches_and_slices(tmp_path):
    data = shared_data("brats2013_flair_t1c")
    writer.build_records(data, tmp_path / "records", layout_file=str(REPO / "data_prep/layouts/brats2013_deepmedic.json"),
                         verbose=False)
    manifest = __import__("json").loads((tmp_path / "records" / "manifest.json").read_text())
    ids = [c["case_id"] for c in manifest["cases"]][:2]
    source = streams.case_source(str(tmp_path / "records"), ids)
    assert source.num_channels == 2
    classes = source.guaranteed_classes()
    patches = streams.PatchStream(source, 30, 10, 4, window_cases=2)
    slices = streams.SliceStream(source, "axial", 4, streams.slice_shape(source, "axial", 16), window_cases=2)
    for stream in (patches, slices):
        for x, y in stream.dataset(num_batches=3).as_numpy_iterator():
            assert np.isfinite(x).all() and set(np.unique(y)) >= set(classes)


def test_sampling_metadata_round_trips_through_writer_and_reader(tmp_path):
    """Every sampling field, read back through the reader's TFDS dataset, is what the case's
    arrays say: per-slice class presence, candidate centers inside their class, counts."""
    import tensorflow_datasets as tfds
    from brats_tf.records import reader
    write_brats2017_case(tmp_path / "data", "Case_000", shape=(30, 34, 26), seed=1)
    writer.build_records(tmp_path / "data", tmp_path / "records", verbose=False)
    ex = next(iter(tfds.as_numpy(reader.case_dataset(str(tmp_path / "records")))))
    label, brain = ex["label"], ex["brain"].astype(bool)
    expected = schema.sampling_metadata("Case_000", label, brain)
    for key, value in expected.items():
        np.testing.assert_array_equal(ex[key], value, err_msg=key)
    for o in ORIENTATIONS:
        slices = to_slices(label, o).reshape(label.shape[SLICE_AXIS[o]], -1)
        want = np.stack([(slices == c).any(axis=1) for c in range(NUM_CLASSES)], axis=1)
        np.testing.assert_array_equal(ex[f"slice_classes_{o}"], want)
    for c in range(NUM_CLASSES):
        count = ex["class_center_count"][c]
        voxels = (label == c) & (brain if c == 0 else True)
        assert count == min(voxels.sum(), schema.CENTERS_PER_CLASS)
        centers = ex["class_centers"][c, :count].astype(int)
        assert voxels[tuple(centers.T)].all() and len({tuple(v) for v in centers}) == count
    assert brain[tuple(ex["brain_centers"][:ex["brain_center_count"]].astype(int).T)].all()


def _scaled_copy(a, b):
    """a == f * b for one factor f (over b's non-zero voxels; zero where b is)."""
    inside = b != 0
    if not np.array_equal(a != 0, inside) or not inside.any():
        return False
    ratio = a[inside] / b[inside]
    return np.ptp(ratio) < 1e-5


@pytest.mark.parametrize("orientation", ORIENTATIONS + ("patch",))
def test_augmented_batches_are_the_plain_ones_mirrored_left_right_and_scaled(tmp_path, orientation):
    """flip_lr / intensity_scale: each example is the un-augmented stream's example, mirrored
    along array axis 0 (left-right; never for sagittal slices, which lack it) or not, x and y
    alike, its image channels scaled by one factor each in [0.9, 1.1], its feature channels
    unchanged; the same seed gives the same augmented batches."""
    cases = [_case(0), _case(1)]
    features = [np.full(c.label.shape + (2,), 7, np.float16) for c in cases] if orientation == "patch" else None
    source = write_source(tmp_path, cases, features)

    def stream(**augment):
        if orientation == "patch":
            return streams.PatchStream(source, 12, 6, 4, seed=3, window_cases=2, **augment)
        return streams.SliceStream(source, orientation, 4, streams.slice_shape(source, orientation, 4), seed=3,
                                   window_cases=2, **augment)

    augmented = stream(flip_lr=True, intensity_scale=0.1)
    flips = []
    for (x0, y0), (x1, y1) in zip(stream().dataset(num_batches=8).as_numpy_iterator(),
                                  augmented.dataset(num_batches=8).as_numpy_iterator()):
        for i in range(4):
            # Channel 0 is the voxel's array index along axis 0 (+1): it runs the other way when mirrored.
            mirrored = _scaled_copy(x1[i, ..., 0], x0[i][::-1][..., 0]) and not _scaled_copy(x1[i, ..., 0],
                                                                                         x0[i][..., 0])
            plain_x, plain_y = (x0[i][::-1], y0[i][::-1]) if mirrored else (x0[i], y0[i])
            np.testing.assert_array_equal(y1[i], plain_y)
            for k in range(3):
                inside = plain_x[..., k] > 0
                if not inside.any():
                    continue
                factor = x1[i][..., k][inside] / plain_x[..., k][inside]
                assert 0.9 - 1e-6 <= factor.min() and factor.max() <= 1.1 + 1e-6 and np.ptp(factor) < 1e-5
            np.testing.assert_array_equal(x1[i][..., 3:], plain_x[..., 3:])   # 2D features: unchanged
            flips.append(mirrored)
    if orientation == "sagittal":
        assert not any(flips)
    else:
        assert 0 < sum(flips) < len(flips)
    again = [x for x, _ in augmented.dataset(num_batches=3).as_numpy_iterator()]
    first = [x for x, _ in augmented.dataset(num_batches=3).as_numpy_iterator()]
    assert all(np.array_equal(a, b) for a, b in zip(again, first))
