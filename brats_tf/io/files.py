"""Writing files so that they appear only when complete (temp name + rename), and the JSON
files every stage writes (manifests, configs, splits, summaries) in one format."""

import json
import os
import re
import tempfile

from brats_tf.errors import DataError

_MISSING = object()


def atomic_write(path, write_fn):
    """Calls write_fn(tmp_path) then renames tmp_path to path; no partial file survives."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    # Keep the real suffix so writers that infer the format from the name still work.
    suffix = ".nii.gz" if base.endswith(".nii.gz") else os.path.splitext(base)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp" + suffix, dir=directory)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp creates 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and err.filename in (None, tmp):
            # a full disk or a file-size limit: name the file the user asked for
            raise DataError(path, f"cannot write ({err.strerror or err})") from err
        raise


def remove_temporaries(directory):
    """Removes what `atomic_write` leaves in `directory` when its process is killed (hidden
    `.<name>.<random>.tmp<suffix>` files). Call it only while holding the folder's lock
    (io/locks.py): then no live writer owns one."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if _TEMPORARY.match(name):
            os.remove(os.path.join(directory, name))


_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp")


def write_json(path, obj, indent=1, sort_keys=False):
    """`obj` as JSON at `path`, atomically. Callers keep their historical layout (indent,
    key order) so files written before stay byte-identical."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, sort_keys=sort_keys)
    atomic_write(path, write)


def read_json(path, default=_MISSING):
    """The JSON at `path`; `default` when the file does not exist (if given)."""
    if default is not _MISSING and not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_text(path, text):
    """A text file, atomically."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:   # no newline translation: the same bytes everywhere
            f.write(text)
    atomic_write(path, write)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
