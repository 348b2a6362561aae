"""Bad input for the reliability matrix (issue 17): each kind damages a good file the way a
user's data or machine can, and `expect_refusal` checks the contract every command keeps:
exit status 1, one line naming the file and the problem, no traceback, nothing new or
changed in the output location."""

import ctypes
import gzip
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.conftest import REPO

AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


# --- damage to one NIfTI file, in place -----------------------------------------------------

def not_nifti(path):
    Path(path).write_text("patient notes, not an image\n")


def png_renamed(path):
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


def truncated_gzip(path):
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[: len(raw) * 2 // 3])


def _flip_middle(path, count, mask):
    """`count` bytes in the middle of a file XOR-ed with `mask`."""
    raw = bytearray(Path(path).read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + count] = bytes(b ^ mask for b in raw[middle:middle + count])
    Path(path).write_bytes(bytes(raw))


def corrupt_gzip(path):
    """64 bytes flipped in the middle of the stream: nibabel alone reads other voxels."""
    _flip_middle(path, 64, 0x5A)


def impossible_header(path):
    """dim[1] negative: no image has a negative size."""
    raw = bytearray(gzip.decompress(Path(path).read_bytes()))
    raw[42:44] = np.int16(-7).tobytes()
    Path(path).write_bytes(gzip.compress(bytes(raw)))


def bad_datatype(path):
    raw = bytearray(gzip.decompress(Path(path).read_bytes()))
    raw[70:72] = np.int16(999).tobytes()
    Path(path).write_bytes(gzip.compress(bytes(raw)))


def _rewrite(path, fn):
    image = nib.load(path)
    data = fn(np.asarray(image.dataobj))
    nib.save(nib.Nifti1Image(data, image.affine), path)


def four_d(path):
    _rewrite(path, lambda a: np.stack([a, a], axis=-1))


def shape_mismatch(path):
    _rewrite(path, lambda a: a[:-1])


def affine_mismatch(path):
    image = nib.load(path)
    affine = image.affine.copy()
    affine[0, 0] *= 2.0
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), path)


def nan_voxels(path):
    def poison(a):
        a = a.astype(np.float32)
        a[a.shape[0] // 2, a.shape[1] // 2, a.shape[2] // 2] = np.nan
        a[1, 1, 1] = np.inf
        return a
    _rewrite(path, poison)


def all_zero(path):
    _rewrite(path, np.zeros_like)


def unknown_labels(path):
    _rewrite(path, lambda a: np.where(a == 2, 7, a).astype(np.uint8))


def unreadable(path):
    """Mode 000: refused to an `unprivileged` `run_command` (root reads it otherwise)."""
    os.chmod(path, 0)


NIFTI_DAMAGE = {f.__name__: f for f in (not_nifti, png_renamed, truncated_gzip, corrupt_gzip,
                                        impossible_header, bad_datatype, four_d, shape_mismatch,
                                        affine_mismatch, nan_voxels, all_zero, unreadable)}


def corrupt_bytes(path):
    """A file of any kind (model.keras, checkpoint, JSON) with bytes flipped in its middle."""
    _flip_middle(path, 32, 0xA5)


def truncate_bytes(path):
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[: len(raw) // 2])


# --- running a command --------------------------------------------------------------------

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _drop_file_permission_override():
    """Makes root obey file modes, as any user does: CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    leave the bounding set, so the exec'd process (still uid 0, owner of the test's files)
    does not regain them. A no-op for other users, who obey modes already."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_command(module, *args, unprivileged=False, file_size_limit=None, cwd=REPO):
    """`python -m module args`; `unprivileged`: file modes apply even when the tests run as
    root (for the permission kinds: `unreadable`, a folder of mode 555); `file_size_limit`:
    RLIMIT_FSIZE, a full disk (writes past the limit fail with EFBIG, SIGXFSZ being ignored)."""
    def limits():
        if unprivileged:
            _drop_file_permission_override()
        if file_size_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600, preexec_fn=limits)


def read_only_folder(path):
    """A folder no unprivileged writer can add to (mode 555)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    return path


def snapshot(path):
    """{relative path: sha256} of every file under `path` (or of `path` itself); {} if absent.
    Lock files and folders are not outputs."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


# run_main's line, and absl's for a flag its validator refuses (followed by ABSL_HINT)
ERROR_PREFIXES = ("error: ", "FATAL Flags parsing error: ")
ABSL_HINT = "Pass --helpshort or --helpfull to see help on flags."


def expect_refusal(result, names, outputs=(), before=None, stream="stderr"):
    """The contract: exit 1; exactly one error line (the last on stderr) that contains every
    string of `names` (a file name and a word of the problem) -- or, for check_dataset's
    report (`stream="stdout"`), exactly one report line holding them; no traceback; and each
    output location exactly as it was (`before`: its `snapshot`s, default nothing there)."""
    text = result.stdout + result.stderr
    assert result.returncode == 1, f"exit {result.returncode}\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in getattr(result, stream).splitlines() if line.strip()]
    if stream == "stderr":   # progress lines may come first; the error is one line, the last
        errors = [line for line in lines if line.startswith(ERROR_PREFIXES)]
        assert len(errors) == 1 and lines[-1] == errors[0] or (
            len(errors) == 1 and lines[-1] == ABSL_HINT), text[-3000:]
        lines = errors
    hits = [line for line in lines if all(name in line for name in names)]
    assert len(hits) == 1, (names, text[-3000:])
    if os.environ.get("BRATS_MATRIX_LOG"):   # the lines BUILD_NOTES' matrix table quotes
        with open(os.environ["BRATS_MATRIX_LOG"], "a") as log:
            log.write(f"{result.args[2]}\t{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\t{hits[0]}\n")
    before = before or [{} for _ in outputs]
    for output, previous in zip(outputs, before):
        assert snapshot(output) == previous, f"{output} changed"
        if not previous:
            assert not Path(output).exists() or not any(
                p.is_file() and not p.name.endswith(".lock") for p in Path(output).rglob("*")), output
    return hits[0]


def copy_tree(source, target):
    shutil.copytree(source, target)
    return Path(target)
