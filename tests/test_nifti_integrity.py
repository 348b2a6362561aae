"""Every NIfTI load verifies the file's integrity (issue 17): a gzip stream damaged anywhere
(CRC, length, truncation, trailing bytes) or a header that does not match the bytes is one
DataError naming the file, and a good file loads exactly as nibabel reads it."""

import gzip
import shutil
import struct
import zlib

import nibabel as nib
import numpy as np
import pytest

from brats_tf.errors import DataError
from brats_tf.io.nifti import load_header, load_volume
from tests.conftest import run_module, tiny_volumes

SHAPE = (48, 48, 32)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One small phantom case (BraTS 2017 layout, int16 images, uint8 labels), written once."""
    from brats_tf.synthetic import generator
    root = tmp_path_factory.mktemp("phantom")
    folder, = generator.write_dataset(root, 1, seed=3, shape=SHAPE, progress=False)
    return root


@pytest.fixture
def dataset(phantom, tmp_path):
    """A private copy of the phantom dataset, free to damage."""
    shutil.copytree(phantom, tmp_path / "data")
    return tmp_path / "data"


def _t1(dataset):
    return next(dataset.glob("*/*_t1.nii.gz"))


def _flip(raw, offset, count=64):
    out = bytearray(raw)
    for i in range(offset, offset + count):
        out[i] ^= 0xFF
    return bytes(out)


def _nibabel_alone(path):
    """What loading did before issue 17: nibabel reads only the image's bytes."""
    img = nib.load(path)
    return np.asarray(img.dataobj).astype(np.float32), img


def _one_line_naming(err, path):
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    return message


# --- the user's report: 64 bytes flipped in the middle of the stream ----------------------

def test_flipped_bytes_mid_stream_are_an_error_not_silently_wrong_voxels(dataset):
    path = _t1(dataset)
    good = path.read_bytes()
    original, _ = load_volume(path)
    silent = 0
    for k in range(12):                           # 64-byte flips spread over the middle half
        offset = len(good) // 4 + k * (len(good) // 2) // 12
        path.write_bytes(_flip(good, offset))
        try:
            wrong, _ = _nibabel_alone(path)
            silent += not np.array_equal(wrong, original)   # nibabel: no error, other voxels
        except Exception:                         # noqa: BLE001 - deflate itself may fail too
            pass
        with pytest.raises(DataError) as err:
            load_volume(path)
        message = _one_line_naming(err, path)
        assert "gzip stream" in message, message
    assert silent, "no flip was read silently by nibabel: the test no longer shows the bug"


def test_a_valid_deflate_stream_with_the_wrong_crc_is_caught(dataset):
    """The deterministic form of the report: other voxels, a well-formed deflate stream, and
    the original trailer, so only the CRC can tell."""
    path = _t1(dataset)
    good = path.read_bytes()
    original, _ = load_volume(path)
    nii = bytearray(gzip.decompress(good))
    middle = slice(len(nii) // 2 - 7000, len(nii) // 2 - 6936)      # inside the brain
    nii[middle] = bytes(b ^ 0xFF for b in nii[middle])
    path.write_bytes(gzip.compress(bytes(nii), mtime=0)[:-8] + good[-8:])
    wrong, _ = _nibabel_alone(path)
    assert not np.array_equal(wrong, original)
    with pytest.raises(DataError) as err:
        load_volume(path)
    assert _one_line_naming(err, path).endswith(": corrupt gzip stream (CRC check failed)")


def test_check_dataset_reports_the_flipped_file_in_one_line(dataset):
    path = _t1(dataset)
    raw = path.read_bytes()
    nii = bytearray(gzip.decompress(raw))
    nii[-21000:-20936] = bytes(b ^ 0xFF for b in nii[-21000:-20936])
    path.write_bytes(gzip.compress(bytes(nii), mtime=0)[:-8] + raw[-8:])
    result = run_module("data_prep.check_dataset", "--data_dir", dataset)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    problems = [line for line in result.stdout.splitlines() if line.startswith(str(dataset))]
    assert problems == [f"{path}: corrupt gzip stream (CRC check failed)"], result.stdout
    assert "problems: 1" in result.stdout


# --- every other way a stream can be damaged ----------------------------------------------

@pytest.mark.parametrize("cut, expected", [
    (lambda n: n // 2, "cannot read image data (truncated gzip stream: it ends before its end-of-stream marker)"),
    (lambda n: n - 4, "cannot read image data (truncated gzip stream: its trailer (CRC and length) is cut off)"),
    (lambda n: 5, "not a readable NIfTI file (truncated gzip stream: it ends inside a gzip header)"),
    (lambda n: 40, "not a readable NIfTI file (truncated gzip stream: it ends before its end-of-stream marker)"),
    (lambda n: 0, "not a readable NIfTI file (truncated gzip stream: it ends inside a gzip header)"),
])
def test_truncated_gzip(dataset, cut, expected):
    path = _t1(dataset)
    raw = path.read_bytes()
    path.write_bytes(raw[:cut(len(raw))])
    with pytest.raises(DataError) as err:
        load_volume(path)
    assert _one_line_naming(err, path) == f"{path}: {expected}"


def test_length_trailing_bytes_and_header_crc(dataset):
    path = _t1(dataset)
    raw = path.read_bytes()
    crc, size = struct.unpack("<II", raw[-8:])
    cases = {
        raw[:-4] + struct.pack("<I", size + 1): "corrupt gzip stream (length check failed)",
        raw + b"garbage": "corrupt gzip stream (7 bytes after the last member are not gzip data)",
        b"PK\x03\x04" + raw[4:]: "not a readable NIfTI file (not a gzip stream (a .gz file must start with bytes 1f 8b))",
        raw[:2] + b"\x07" + raw[3:]: "not a readable NIfTI file (corrupt gzip stream: unknown method 7 or flags 0x00 in a gzip header)",
        _with_header_crc(raw, bad=True): "not a readable NIfTI file (corrupt gzip stream: header CRC check failed)",
    }
    for data, problem in cases.items():
        path.write_bytes(data)
        with pytest.raises(DataError) as err:
            load_volume(path)
        assert _one_line_naming(err, path) == f"{path}: {problem}"


def _with_header_crc(raw, bad=False):
    """`raw` re-wrapped with a gzip header that has a file name and a header CRC (FHCRC)."""
    header = b"\x1f\x8b\x08" + bytes([0x08 | 0x02]) + raw[4:10] + b"case.nii\x00"
    crc16 = zlib.crc32(header) & 0xFFFF
    return header + struct.pack("<H", crc16 ^ bad) + raw[10:]


def test_header_must_match_the_bytes_present(tmp_path):
    images, _ = tiny_volumes()
    nii = nib.Nifti1Image(images["t1"], np.eye(4)).to_bytes()
    path = tmp_path / "short.nii"
    path.write_bytes(nii[:-100])                  # uncompressed, cut short
    with pytest.raises(DataError) as err:
        load_volume(path)
    assert "cannot read image data (the header's (24, 26, 20) float32 voxels at offset 352 need 50272 " \
           "bytes, the file has 50172" in _one_line_naming(err, path)
    gz = tmp_path / "short.nii.gz"                # an intact gzip stream of a short image
    gz.write_bytes(gzip.compress(nii[:-100]))
    with pytest.raises(DataError, match="need 50272 bytes, the decompressed file has 50172"):
        load_volume(gz)
    (tmp_path / "not.nii").write_bytes(b"\x00" * 400)
    with pytest.raises(DataError, match="not.nii: not a readable NIfTI file"):
        load_volume(tmp_path / "not.nii")
    with pytest.raises(DataError, match="nope.nii.gz: file not found"):
        load_volume(tmp_path / "nope.nii.gz")


# --- good files load exactly as before -----------------------------------------------------

def _assert_same_as_nibabel(path, allow_4d=False, dtype=np.float32):
    data, geometry = load_volume(path, allow_4d=allow_4d, dtype=dtype)
    img = nib.load(path)
    expected = np.asarray(img.dataobj).astype(dtype)
    if not allow_4d and expected.ndim == 4:
        expected = expected[..., 0]
    assert data.dtype == expected.dtype and data.shape == expected.shape
    np.testing.assert_array_equal(data, expected)
    np.testing.assert_array_equal(geometry.affine, img.affine)
    assert geometry.header.binaryblock == img.header.binaryblock
    assert geometry.shape == img.shape[:3]
    return data


def test_good_files_load_identically(phantom, tmp_path):
    for path in sorted(phantom.glob("*/*.nii.gz")):   # int16 images and a uint8 label map
        _assert_same_as_nibabel(path)
    _assert_same_as_nibabel(next(phantom.glob("*/*_seg.nii.gz")), dtype=np.uint8)
    images, _ = tiny_volumes()
    scaled = nib.Nifti1Image(images["t2"].astype(np.int16), np.diag([-1.0, 2, 1.5, 1]))
    scaled.header.set_slope_inter(0.5, -3.0)
    stack = nib.Nifti1Image(np.stack([images["t1"], images["flair"]], -1), np.eye(4))
    for name, img in {"scaled.nii.gz": scaled, "scaled.nii": scaled, "stack.nii.gz": stack}.items():
        nib.save(img, tmp_path / name)
        _assert_same_as_nibabel(tmp_path / name, allow_4d=name.startswith("stack"))
    nib.save(nib.Nifti2Image(images["t1"], np.eye(4)), tmp_path / "two.nii.gz")
    assert isinstance(load_header(tmp_path / "two.nii.gz"), nib.Nifti2Image)
    _assert_same_as_nibabel(tmp_path / "two.nii.gz")


def test_gzip_variants_every_writer_may_produce(phantom, tmp_path):
    """Several members (pigz, concatenated files), zero padding, a header with a file name
    and a header CRC: all valid gzip, all load."""
    source = next(phantom.glob("*/*_t1.nii.gz"))
    raw = source.read_bytes()
    nii = gzip.decompress(raw)
    third = len(nii) // 3
    variants = {
        "members.nii.gz": b"".join(gzip.compress(nii[i:i + third]) for i in range(0, len(nii), third)),
        "padded.nii.gz": raw + bytes(512),
        "named.nii.gz": _with_header_crc(raw),
        "level1.nii.gz": gzip.compress(nii, compresslevel=1),
    }
    expected = load_volume(source)[0]
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
        np.testing.assert_array_equal(_assert_same_as_nibabel(tmp_path / name), expected)
    assert isinstance(load_header(tmp_path / "members.nii.gz").dataobj, nib.arrayproxy.ArrayProxy)
