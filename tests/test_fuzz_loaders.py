"""Loaders fuzzed (issue 17): random byte damage and random header fields fed to the NIfTI
loading path, random damage to a record set fed to the record reader. The only outcomes
allowed are a correct load or one DataError whose message is one line naming the file:
never another exception, never a hang (each example runs under a hard time limit).

`BRATS_FUZZ_EXAMPLES=<n>` multiplies the number of examples (default 1x: about 20 s).
"""

import contextlib
import copy
import gzip
import hashlib
import io
import json
import os
import shutil
import signal

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from brats_tf.errors import DataError
from brats_tf.io.nifti import load_volume
from brats_tf.records import reader, schema
from tests.conftest import tiny_volumes, write_brats2017_case

SCALE = int(os.environ.get("BRATS_FUZZ_EXAMPLES", "1"))


def fuzz_settings(examples):
    return settings(max_examples=examples * SCALE, deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


class Hang(BaseException):          # not an Exception: library code cannot swallow it
    pass


@contextlib.contextmanager
def time_limit(seconds):
    def expire(signum, frame):
        raise Hang(f"no outcome within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_one_line_error(err, inside):
    """A DataError's message: one line, starting with a path at or below `inside`."""
    message = str(err)
    assert "\n" not in message and "\r" not in message, message
    assert err.path.startswith(str(inside)) and message.startswith(f"{err.path}: "), message
    assert err.problem.strip(), message


# --- byte damage: flips, truncation, insertion, deletion, overwriting ---------------------

def damage(size):
    """A list of 1-3 edits of a byte string of `size` bytes."""
    pos = st.integers(0, size)
    edit = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=32)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("overwrite"), pos, st.binary(min_size=1, max_size=64)))
    return st.lists(edit, min_size=1, max_size=3)


def apply(data, edits):
    data = bytearray(data)
    for kind, at, *arg in edits:
        at = min(at, len(data))
        if kind == "flip" and at < len(data):
            data[at] ^= arg[0]
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = arg[0]
        elif kind == "delete":
            del data[at:at + arg[0]]
        elif kind == "overwrite":
            data[at:at + len(arg[0])] = arg[0]
    return bytes(data)


# --- NIfTI ---------------------------------------------------------------------------------

def _base_images():
    images, seg = tiny_volumes(shape=(6, 7, 5))
    scaled = nib.Nifti1Image(images["t1"].astype(np.int16), np.diag([-1.0, -1, 1.5, 1]))
    scaled.header.set_slope_inter(0.5, 2.0)                 # scl_slope / scl_inter in play
    return {"int16_scaled": scaled, "float32": nib.Nifti1Image(images["flair"], np.eye(4)),
            "uint8_labels": nib.Nifti1Image(seg, np.eye(4))}


BASES = {name: img.to_bytes() for name, img in _base_images().items()}
ORIGINAL = {name: np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj).astype(np.float32)
            for name, raw in BASES.items()}


@pytest.fixture(scope="module")
def nifti_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("nifti_fuzz")


def _header_says(nii):
    """The data shape the header declares, as nibabel's parser reads it without checks."""
    klass = nib.Nifti1Header if nib.Nifti1Header.may_contain_header(nii[:348]) else nib.Nifti2Header
    return klass.from_fileobj(io.BytesIO(nii), check=False).get_data_shape()


def check_nifti_outcome(path, nii_bytes, original=None):
    """load_volume(path): a correct load or one DataError naming `path`, within 5 s.
    `nii_bytes` is the uncompressed content when known to be intact gzip (else None)."""
    try:
        with time_limit(5):
            data, geometry = load_volume(path, allow_4d=True)
    except DataError as err:
        assert_one_line_error(err, path)
        return "error"
    assert data.dtype == np.float32 and np.all(np.isfinite(data)) and np.all(np.isfinite(geometry.affine))
    if nii_bytes is not None:
        assert data.shape == _header_says(nii_bytes)
    if original is not None:          # a gzip stream that loads must hold the original bytes
        np.testing.assert_array_equal(data, original)
    return "loaded"


@fuzz_settings(60)
@given(base=st.sampled_from(sorted(BASES)), edits=st.data())
def test_nifti_gz_with_damaged_bytes(nifti_dir, base, edits):
    good = gzip.compress(BASES[base], mtime=0)
    raw = apply(good, edits.draw(damage(len(good))))
    path = nifti_dir / "damaged.nii.gz"
    path.write_bytes(raw)
    # Whatever the damage, a .nii.gz that loads held the original image: the CRC saw to it.
    event(check_nifti_outcome(path, None, ORIGINAL[base]))


@fuzz_settings(80)
@given(base=st.sampled_from(sorted(BASES)), edits=st.data())
def test_nii_with_damaged_bytes(nifti_dir, base, edits):
    raw = apply(BASES[base], edits.draw(damage(len(BASES[base]))))
    path = nifti_dir / "damaged.nii"
    path.write_bytes(raw)
    event(check_nifti_outcome(path, raw))   # no checksum in .nii: any finite array the header describes


f32 = st.floats(width=32)              # NaN, inf, subnormals, huge values included
i16 = st.integers(-32768, 32767)
HEADER_FIELDS = {
    "sizeof_hdr": st.sampled_from([348, 540, 0, -1, 1543569408]),
    "dim": st.lists(st.one_of(st.integers(-2, 10), i16), min_size=8, max_size=8),
    "datatype": st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280,
                                           1536, 1792, 2048, 2304]), i16),
    "bitpix": i16,
    "pixdim": st.lists(f32, min_size=8, max_size=8),
    "vox_offset": st.one_of(st.sampled_from([0.0, 348.0, 352.0, 353.0, 4096.0]), f32),
    "scl_slope": f32, "scl_inter": f32,
    "qform_code": st.integers(-3, 5), "sform_code": st.integers(-3, 5),
    "quatern_b": f32, "quatern_c": f32, "quatern_d": f32,
    "qoffset_x": f32, "qoffset_y": f32, "qoffset_z": f32,
    "srow_x": st.lists(f32, min_size=4, max_size=4), "srow_y": st.lists(f32, min_size=4, max_size=4),
    "srow_z": st.lists(f32, min_size=4, max_size=4),
    "magic": st.sampled_from([b"n+1", b"ni1", b"n+2", b"", b"xyz"]),
    "extents": st.integers(-2**31, 2**31 - 1), "intent_code": i16, "slice_code": st.integers(0, 255),
    "xyzt_units": st.integers(0, 255), "cal_max": f32, "cal_min": f32,
}


@fuzz_settings(100)
@given(base=st.sampled_from(sorted(BASES)), fields=st.fixed_dictionaries({}, optional=HEADER_FIELDS),
       gz=st.booleans(), tail=st.sampled_from([0, -1, -64, 16]))
def test_nifti_with_random_header_fields(nifti_dir, base, fields, gz, tail):
    raw = BASES[base]
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    for name, value in fields.items():
        header[name] = value             # the raw field, no validation
    nii = header.binaryblock + raw[348:]
    nii = nii[:len(nii) + tail] if tail < 0 else nii + bytes(tail)
    path = nifti_dir / ("fields.nii.gz" if gz else "fields.nii")
    path.write_bytes(gzip.compress(nii, mtime=0) if gz else nii)
    event(check_nifti_outcome(path, nii))


def _edited(base, **fields):
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(BASES[base]))
    for name, value in fields.items():
        header[name] = value
    return header.binaryblock + BASES[base][348:]


# What the fuzzer found in the loader before issue 17 (BUILD_NOTES "Reliability, first part"),
# kept as plain regressions: (header fields, expected problem). Before: a traceback (T) or a
# silent load (S).
NIFTI_FINDINGS = {
    "unknown data type (T HeaderDataError)": (dict(datatype=229), "not a readable NIfTI file (data code 229"),
    "data type 0 (T HeaderDataError)": (dict(datatype=0), "not a readable NIfTI file (data code 0"),
    "dim[0] out of range (T HeaderDataError)": (dict(dim=[9, 6, 7, 5, 1, 1, 1, 1]), "not a readable NIfTI file"),
    "vox_offset inf (T OverflowError)": (dict(vox_offset=np.inf), "not a readable NIfTI file"),
    "NaN intercept (T HeaderDataError)": (dict(scl_slope=2.0, scl_inter=np.nan), "invalid intercept nan"),
    "negative axis (T OverflowError in .nii memmap)": (dict(dim=[3, 6, -7, 5, 1, 1, 1, 1]), "negative dimension"),
    "huge dims, bytes absent (T MemoryError)": (dict(dim=[3, 32767, 32767, 32767, 1, 1, 1, 1]),
                                                "need 140724603847004 bytes, the"),
    "non-finite sform (S)": (dict(sform_code=1, srow_x=[np.inf, 0, 0, 0]), "non-finite affine"),
    # hardening beyond the fuzzer's oracle: no voxels, complex or RGB voxels cast to float
    "zero-length axis (S)": (dict(dim=[3, 6, 0, 5, 1, 1, 1, 1]), "image has no voxels"),
    "complex data type": (dict(datatype=32, bitpix=64), "unsupported NIfTI data type complex64"),
}


@pytest.mark.parametrize("name", sorted(NIFTI_FINDINGS))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_findings(nifti_dir, name, suffix):
    fields, expected = NIFTI_FINDINGS[name]
    nii = _edited("float32", **fields)
    if "complex" in name:
        nii += nii[352:]                    # bytes enough for complex64 voxels
    path = nifti_dir / f"found{suffix}"
    path.write_bytes(gzip.compress(nii) if suffix == ".nii.gz" else nii)
    with pytest.raises(DataError) as err:
        load_volume(path, allow_4d=True)
    assert_one_line_error(err.value, path)
    assert expected in err.value.problem, err.value.problem


# --- the record reader ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def record_set(tmp_path_factory):
    """Two tiny cases (the second unlabeled) built once; (records folder, what reading gives)."""
    from brats_tf.records.writer import build_records
    root = tmp_path_factory.mktemp("record_fuzz")
    for i in range(2):
        write_brats2017_case(root / "data", f"Case_{i}", shape=(12, 13, 10), seed=i)
    (root / "data" / "Case_1" / "Case_1_seg.nii.gz").unlink()
    build_records(root / "data", root / "records", margin=1, verbose=False)
    return root / "records", _summary(reader.read_cases(root / "records"))


def _summary(cases):
    """What reading gives, arrays as digests (so that a failing example prints short)."""
    def digest(array):
        return None if array is None else (array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest()[:16])
    return [(c.prepared.case_id, c.prepared.modalities, c.prepared.box, c.modality_present.tolist(),
             digest(c.prepared.image), digest(c.prepared.label), digest(c.prepared.brain)) for c in cases]


_copies = iter(range(10**9))


def _fresh_copy(record_set, tmp_root):
    folder = tmp_root / f"copy{next(_copies)}"
    shutil.copytree(record_set, folder)
    return folder


def check_records_outcome(folder, expected):
    try:
        with time_limit(30):
            manifest = reader.load_manifest(folder)
            got = _summary(reader.read_cases(folder))
    except DataError as err:
        assert_one_line_error(err, folder)
        return "error"
    assert got == expected
    assert isinstance(manifest["cases"], list) and all(isinstance(c["case_id"], str) for c in manifest["cases"])
    return "loaded"


RECORD_FILES = {
    "shard": f"tfds/brats_cases/{schema.SCHEMA_VERSION}/brats_cases-cases.tfrecord-00000-of-00002",
    "manifest": "manifest.json",
    "dataset_info": f"tfds/brats_cases/{schema.SCHEMA_VERSION}/dataset_info.json",
    "features": f"tfds/brats_cases/{schema.SCHEMA_VERSION}/features.json",
}


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    return tmp_path_factory.mktemp("record_copies")


@fuzz_settings(45)
@given(target=st.sampled_from(sorted(RECORD_FILES)), data=st.data())
def test_record_set_with_damaged_bytes(record_set, copies, target, data):
    records, expected = record_set
    folder = _fresh_copy(records, copies)
    path = folder / RECORD_FILES[target]
    raw = path.read_bytes()
    path.write_bytes(apply(raw, data.draw(damage(len(raw)))))
    outcome = check_records_outcome(folder, expected)
    event(f"{target}: {outcome}")
    if target == "shard":                    # every record carries a CRC: damage never reads back
        assert outcome == "error" or path.read_bytes() == raw
    shutil.rmtree(folder)


def _paths(value, prefix=()):
    """Every key path of a JSON value (lists by index)."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, sub in items:
        yield from _paths(sub, prefix + (key,))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["t1", "t1c", "t2", "flair", "median", "zscore", "none", "Case_0", "Case_1", "..", "/",
                       f"tfds/brats_cases/{schema.SCHEMA_VERSION}", ""]) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10)


@fuzz_settings(60)
@given(data=st.data())
def test_record_manifest_with_wrong_fields(record_set, copies, data):
    records, expected = record_set
    manifest = json.loads((records / "manifest.json").read_text())
    edited = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 2))):
        where = data.draw(st.sampled_from(list(_paths(edited))))
        value = data.draw(st.one_of(st.just("<delete>"), json_values))
        if not where:
            edited = value if value != "<delete>" else []
            break
        parent = edited
        for key in where[:-1]:
            parent = parent[key]
        if value == "<delete>":
            del parent[where[-1]]
        else:
            parent[where[-1]] = value
    folder = _fresh_copy(records, copies)
    (folder / "manifest.json").write_text(json.dumps(edited))
    event(check_records_outcome(folder, expected))
    shutil.rmtree(folder)


def _json_edit(fn):
    return lambda raw: json.dumps(fn(json.loads(raw))).encode()


# Before issue 17: a traceback (T) or other data read without a word (S).
RECORD_FINDINGS = {
    "shard byte flipped (T DataLossError)": ("shard", lambda raw: raw[:100] + bytes([raw[100] ^ 1]) + raw[101:],
                                             "brats_cases-cases.tfrecord-00000-of-00002: corrupt records"),
    "shard truncated (T DataLossError)": ("shard", lambda raw: raw[:-5], "tfrecord-00000-of-00002: corrupt records"),
    "manifest not UTF-8 (T UnicodeDecodeError)": ("manifest", lambda raw: b"\xff" + raw, "not UTF-8 text"),
    "manifest not an object (T AttributeError)": ("manifest", lambda raw: b"[1, 2]", "not a JSON object"),
    "manifest field missing (T KeyError)": ("manifest", _json_edit(lambda m: {k: v for k, v in m.items() if k != "records"}),
                                           "no 'records' field"),
    "manifest cases not a list (T TypeError)": ("manifest", _json_edit(lambda m: {**m, "cases": {"a": 1}}),
                                               "'num_cases' does not count"),
    "modalities permuted (S channels mislabelled)": ("manifest", _json_edit(lambda m: {**m, "modalities": ["t2", "t1c", "t1", "flair"]}),
                                                     "'modalities' is not a list"),
    "case id renamed in the manifest (S: manifest and records disagree)": ("manifest", _json_edit(lambda m: {**m, "cases": [{**m["cases"][0], "case_id": "X"}] + m["cases"][1:]}),
                                            "records hold case 'Case_0', which the manifest does not list"),
    "dataset_info not JSON (T ParseError)": ("dataset_info", lambda raw: raw[:1], "unreadable TFDS record set"),
    "dataset_info shard length (T FailedPreconditionError)": ("dataset_info", _json_edit(
        lambda d: {**d, "splits": [{**d["splits"][0], "shardLengths": ["1"]}]}),
                                                              "dataset_info.json: TFDS metadata lists 1 cases, the manifest 2"),
    "features encoding (T ValueError)": ("features", lambda raw: raw.replace(b'"bytes"', b'"byter"', 1), "unreadable TFDS record set"),
    "features dtype float16 -> bfloat16 (S other values)": ("features", lambda raw: raw.replace(b'"float16"', b'"bfloat16"'),
                                                           "features.json: TFDS features do not match the record schema"),
}


def test_record_findings(record_set, copies):
    records, expected = record_set
    for name, (target, edit, problem) in RECORD_FINDINGS.items():
        folder = _fresh_copy(records, copies)
        path = folder / RECORD_FILES[target]
        path.write_bytes(edit(path.read_bytes()))
        with pytest.raises(DataError) as err:
            list(reader.read_cases(folder))
        assert_one_line_error(err.value, folder)
        assert problem in str(err.value), (name, str(err.value))
        shutil.rmtree(folder)
