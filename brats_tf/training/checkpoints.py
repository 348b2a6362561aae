"""Training checkpoints: model weights, optimizer slots and trainer state, written atomically.

A checkpoint is a folder `ckpt-<iteration>` holding `model_weights.npz` (every variable of
`model.weights`, in order), `rng.npz` (the
random-generator states of dropout layers), `optimizer.npz` (every optimizer variable:
iteration counter, momentum, accumulators), any named arrays the trainer keeps besides
(`<name>.npz`: the tail average's sums, training/averaging.py) and `state.json`
(the LR schedule's state and anything else the trainer needs). It is written under a
temporary name and renamed, so a run killed at any moment leaves only complete
checkpoints; the newest one is what a re-run resumes from.

Each file is an npz built in memory and written with plain Python writes, and state.json
records their sha256: a full disk is one DataError (HDF5, which `save_weights` writes, left
objects on a failing file whose cleanup printed tracebacks and crashed the interpreter at
exit), and a file damaged since is refused at resume instead of loading other weights.
Checkpoints written before (`model.weights.h5`, no hashes) still load. The folder may be a
URL (gs://, ram://): files go through `io.files`, hence tf.io.gfile.
"""

import hashlib
import io
import json
import os
import re

import numpy as np
import tensorflow as tf

from brats_tf.errors import DataError, short_error
from brats_tf.io import files as fs

_NAME = re.compile(r"^ckpt-(\d{8})$")


class CheckpointStore:
    def __init__(self, directory, keep=2):
        self.directory = os.fspath(directory)
        self.keep = keep

    def complete(self):
        """Iterations of complete checkpoints, oldest first."""
        if not fs.isdir(self.directory):
            return []
        found = []
        for name in fs.listdir(self.directory):
            match = _NAME.match(name)
            if match and fs.isfile(fs.join(self.directory, name, "state.json")):
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self):
        done = self.complete()
        return done[-1] if done else None

    def save(self, iteration, model, optimizer, state, write=True, arrays=None):
        """Saves a checkpoint; with write=False (non-chief workers) only syncs nothing to disk.
        `arrays`: {name: {key: array}} the trainer keeps besides the variables, each as
        `<name>.npz` (read back with `read_arrays`)."""
        if not write:
            return None
        final = fs.join(self.directory, f"ckpt-{iteration:08d}")
        tmp = fs.join(self.directory, f".tmp-ckpt-{iteration:08d}-{os.getpid()}")
        files = {"model_weights.npz": _npz_bytes(model.weights),
                 "rng.npz": _npz_bytes(_rng_states(model)),
                 "optimizer.npz": _npz_bytes(optimizer.variables)}
        files.update({f"{name}.npz": _arrays_bytes(values) for name, values in (arrays or {}).items()})
        state = dict(state, iteration=iteration, files={n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
        files["state.json"] = json.dumps(state, indent=1).encode()   # last: it marks the checkpoint complete
        try:
            fs.makedirs(self.directory)
            fs.remove_tree(tmp)
            fs.makedirs(tmp)
            for name, data in files.items():
                with fs.open_file(fs.join(tmp, name), "wb") as f:
                    f.write(data)
        except (OSError, tf.errors.OpError) as err:
            fs.remove_tree(tmp)
            words = getattr(err, "strerror", None) or short_error(err)
            raise DataError(final, f"cannot write the checkpoint ({words})") from None
        fs.remove_tree(final)
        fs.rename(tmp, final)
        self._prune()
        return final

    def restore(self, model, optimizer, iteration=None):
        """Loads checkpoint `iteration` (default: newest) into a built model/optimizer; returns state."""
        iteration = self.latest() if iteration is None else iteration
        if iteration is None:
            return None
        folder = fs.join(self.directory, f"ckpt-{iteration:08d}")
        state = _read_state(folder)
        try:
            return self._load(folder, state, model, optimizer)
        except DataError:
            raise
        except Exception as err:   # h5py, zipfile and numpy raise many kinds for a damaged file
            raise DataError(folder, f"cannot read the checkpoint ({short_error(err)}); {_RESUME_HINT}") from None

    def read_arrays(self, name, iteration=None):
        """The `arrays[name]` checkpoint `iteration` (default: newest) was saved with, as a dict;
        None when it has none (saved without them, or no checkpoint)."""
        iteration = self.latest() if iteration is None else iteration
        if iteration is None:
            return None
        folder = fs.join(self.directory, f"ckpt-{iteration:08d}")
        path = fs.join(folder, f"{name}.npz")
        if not fs.exists(path):
            return None
        _read_state(folder)   # its sha256 checked against state.json
        try:
            with fs.open_file(path, "rb") as f:
                with np.load(io.BytesIO(f.read()), allow_pickle=False) as saved:
                    return {key: saved[key] for key in saved.files}
        except Exception as err:   # zipfile and numpy raise many kinds for a damaged file
            raise DataError(path, f"cannot read the checkpoint ({short_error(err)}); {_RESUME_HINT}") from None

    def _load(self, folder, state, model, optimizer):
        if fs.exists(fs.join(folder, "model.weights.h5")):   # checkpoints written before model_weights.npz
            model.load_weights(fs.join(folder, "model.weights.h5"))
        else:
            _assign_saved(folder, "model_weights.npz", model.weights, "model weights")
        _assign_saved(folder, "optimizer.npz", optimizer.variables, "optimizer variables")
        if fs.exists(fs.join(folder, "rng.npz")):   # absent in checkpoints written before it was added
            _assign_saved(folder, "rng.npz", _rng_states(model), "random-generator states")
        return state

    def _prune(self):
        for iteration in self.complete()[:-self.keep]:
            fs.remove_tree(fs.join(self.directory, f"ckpt-{iteration:08d}"))
        for name in fs.listdir(self.directory):   # leftovers of killed saves
            if name.startswith(".tmp-ckpt-") and not name.endswith(f"-{os.getpid()}"):
                fs.remove_tree(fs.join(self.directory, name))


_RESUME_HINT = "delete that checkpoint folder to resume from the one before it"


def _read_state(folder):
    """state.json of a checkpoint, after checking the sha256 it records of each other file
    (checkpoints written before it recorded them are read as they are)."""
    path = fs.join(folder, "state.json")
    try:
        with fs.open_file(path, "rb") as f:
            state = json.loads(f.read().decode())
    except (ValueError, UnicodeDecodeError) as err:   # json.JSONDecodeError is a ValueError
        raise DataError(path, f"not valid JSON ({short_error(err)}); {_RESUME_HINT}") from None
    if not isinstance(state, dict):
        raise DataError(path, f"not a JSON object; {_RESUME_HINT}")
    for name, recorded in (state.get("files") or {}).items():
        file = fs.join(folder, name)
        if not fs.isfile(file):
            raise DataError(file, f"missing from the checkpoint; {_RESUME_HINT}")
        with fs.open_file(file, "rb") as f:
            actual = hashlib.sha256(f.read()).hexdigest()
        if actual != recorded:
            raise DataError(file, f"modified since it was written (sha256 {actual[:12]}..., state.json records "
                                  f"{str(recorded)[:12]}...); {_RESUME_HINT}")
    return state


def _assign_saved(folder, name, variables, what):
    """Assigns the arrays of `folder/name` (an npz of v0000, v0001, ...) to `variables`, in order."""
    with fs.open_file(fs.join(folder, name), "rb") as f:
        data = io.BytesIO(f.read())
    with np.load(data, allow_pickle=False) as saved:
        keys = sorted(saved.files)
        if len(keys) != len(variables):
            raise ValueError(f"{folder}: the model has {len(variables)} {what}, the checkpoint {len(keys)}")
        for variable, key in zip(variables, keys):
            variable.assign(saved[key])


def _npz_bytes(variables):
    return _arrays_bytes({f"v{i:04d}": np.asarray(v.numpy()) for i, v in enumerate(variables)})


def _arrays_bytes(arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()



def _rng_states(model):
    """Model variables that the weights file does not hold: the random-generator states of
    dropout layers. Restoring them makes the dropout masks after a resume the ones an
    uninterrupted run would have drawn."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]
