"""Writing files so that they appear only when complete (temp name + rename), the JSON
files every stage writes (manifests, configs, splits, summaries) in one format, and the
file-system calls of everything training reads and writes.

Paths are local paths or URLs (`gs://bucket/…`, TensorFlow's in-memory `ram://…`). A URL
goes through `tf.io.gfile`, so a TPU or multi-host job can keep its records, work dirs and
exports in a bucket; a local path keeps the plain `os` calls (the same behaviour as before
URLs were accepted, and no TensorFlow import for the NIfTI tools that use this module).
"""

import json
import os
import re
import shutil
import tempfile

from brats_tf.errors import DataError

_MISSING = object()


def atomic_write(path, write_fn):
    """Calls write_fn(tmp_path) then renames tmp_path to path; no partial file survives.
    `tmp_path` is always a local file (writers such as `model.save` or nibabel need one);
    for a URL it is copied to a hidden name beside `path`, then renamed into place."""
    path = os.fspath(path)
    if is_url(path):
        return _atomic_write_url(path, write_fn)
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


def _atomic_write_url(path, write_fn):
    gfile = _gfile()
    directory, base = path.rsplit("/", 1)
    gfile.makedirs(directory)
    suffix = ".nii.gz" if base.endswith(".nii.gz") else os.path.splitext(base)[1]
    local_dir = tempfile.mkdtemp(prefix="brats_tf-")
    remote_tmp = f"{directory}/.{base}.{os.urandom(4).hex()}.tmp{suffix}"
    try:
        local = os.path.join(local_dir, "file" + suffix)
        write_fn(local)
        gfile.copy(local, remote_tmp, overwrite=True)
        gfile.rename(remote_tmp, path, overwrite=True)
    except _gfile_errors() as err:
        raise DataError(path, f"cannot write ({err.message})") from None
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)
        if gfile.exists(remote_tmp):
            gfile.remove(remote_tmp)


def remove_temporaries(directory):
    """Removes what `atomic_write` leaves in `directory` when its process is killed (hidden
    `.<name>.<random>.tmp<suffix>` files). Call it only while holding the folder's lock
    (io/locks.py): then no live writer owns one."""
    if not isdir(directory):
        return
    for name in listdir(directory):
        if _TEMPORARY.match(name):
            remove(join(directory, name))


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
    if default is not _MISSING and not exists(path):
        return default
    with open_file(path) as f:
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


# --- file-system calls for local paths and URLs (see the module docstring) ------------------

def is_url(path):
    """A `scheme://` path (gs://, ram://, …), which goes through tf.io.gfile."""
    return "://" in os.fspath(path)


def _gfile():
    import tensorflow as tf   # only for URLs: the NIfTI tools never load TensorFlow for this
    return tf.io.gfile


def _gfile_errors():
    import tensorflow as tf
    return tf.errors.OpError


def join(folder, *names):
    return os.path.join(os.fspath(folder), *names)   # "gs://b/x" + "y" -> "gs://b/x/y"


def absolute(path):
    """An absolute local path; a URL unchanged."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def exists(path):
    return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path):
    return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def isfile(path):
    if is_url(path):
        return _gfile().exists(path) and not _gfile().isdir(path)
    return os.path.isfile(path)


def makedirs(path):
    if is_url(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path):
    """Entry names, without the trailing "/" gfile gives sub-folders on some file systems."""
    if is_url(path):
        return [name.rstrip("/") for name in _gfile().listdir(path)]
    return os.listdir(path)


def remove(path):
    if is_url(path):
        _gfile().remove(path)
    else:
        os.remove(path)


def remove_tree(path):
    """Removes a folder and its contents; nothing when it does not exist."""
    if is_url(path):
        if _gfile().exists(path):
            _gfile().rmtree(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def rename(source, target):
    """Moves a file or folder to `target`, replacing a file there (a folder there must be
    removed first). Atomic on a local file system; on an object store a file's rename is a
    copy, which readers see only when complete, and a folder's is a copy of each file."""
    if is_url(source):
        gfile = _gfile()
        if not gfile.isdir(source):
            gfile.rename(source, target, overwrite=True)
            return
        for folder, _, names in gfile.walk(source):   # object stores have no folder rename
            relative = folder[len(source):].lstrip("/")
            gfile.makedirs(join(target, relative))
            for name in names:
                gfile.rename(join(folder, name), join(target, relative, name), overwrite=True)
        gfile.rmtree(source)
    else:
        os.replace(source, target)


def glob(pattern):
    if is_url(pattern):
        return _gfile().glob(pattern)
    import glob as local_glob
    return local_glob.glob(pattern)


def copy_tree(source, target):
    """Copies a folder's files to `target` (local and URL folders alike)."""
    gfile = _gfile()
    for folder, _, names in gfile.walk(source):
        relative = folder[len(os.fspath(source)):].lstrip("/")
        gfile.makedirs(join(target, relative))
        for name in names:
            gfile.copy(join(folder, name), join(target, relative, name), overwrite=True)


def open_file(path, mode="r"):
    """`open`, or a tf.io.gfile.GFile for a URL."""
    return _gfile().GFile(path, mode) if is_url(path) else open(path, mode)
