"""Training checkpoints: model weights, optimizer slots and trainer state, written atomically.

A checkpoint is a folder `ckpt-<iteration>` holding `model.weights.h5`, `rng.npz` (the
random-generator states of dropout layers), `optimizer.npz` (every optimizer variable:
iteration counter, momentum, accumulators) and `state.json`
(the LR schedule's state and anything else the trainer needs). It is written under a
temporary name and renamed, so a run killed at any moment leaves only complete
checkpoints; the newest one is what a re-run resumes from.
"""

import json
import os
import re
import shutil

import numpy as np

_NAME = re.compile(r"^ckpt-(\d{8})$")


class CheckpointStore:
    def __init__(self, directory, keep=2):
        self.directory = os.fspath(directory)
        self.keep = keep

    def complete(self):
        """Iterations of complete checkpoints, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            match = _NAME.match(name)
            if match and os.path.isfile(os.path.join(self.directory, name, "state.json")):
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self):
        done = self.complete()
        return done[-1] if done else None

    def save(self, iteration, model, optimizer, state, write=True):
        """Saves a checkpoint; with write=False (non-chief workers) only syncs nothing to disk."""
        if not write:
            return None
        os.makedirs(self.directory, exist_ok=True)
        final = os.path.join(self.directory, f"ckpt-{iteration:08d}")
        tmp = os.path.join(self.directory, f".tmp-ckpt-{iteration:08d}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        model.save_weights(os.path.join(tmp, "model.weights.h5"))
        np.savez(os.path.join(tmp, "rng.npz"),
                 **{f"v{i:04d}": np.asarray(v.numpy()) for i, v in enumerate(_rng_states(model))})
        np.savez(os.path.join(tmp, "optimizer.npz"),
                 **{f"v{i:04d}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)})
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(dict(state, iteration=iteration), f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune()
        return final

    def restore(self, model, optimizer, iteration=None):
        """Loads checkpoint `iteration` (default: newest) into a built model/optimizer; returns state."""
        iteration = self.latest() if iteration is None else iteration
        if iteration is None:
            return None
        folder = os.path.join(self.directory, f"ckpt-{iteration:08d}")
        model.load_weights(os.path.join(folder, "model.weights.h5"))
        with np.load(os.path.join(folder, "optimizer.npz"), allow_pickle=False) as saved:
            values = [saved[k] for k in sorted(saved.files)]
        if len(values) != len(optimizer.variables):
            raise ValueError(f"{folder}: optimizer has {len(optimizer.variables)} variables, "
                             f"checkpoint {len(values)}")
        for variable, value in zip(optimizer.variables, values):
            variable.assign(value)
        rng_path = os.path.join(folder, "rng.npz")
        if os.path.exists(rng_path):   # absent in checkpoints written before it was added
            with np.load(rng_path, allow_pickle=False) as saved:
                states, keys = _rng_states(model), sorted(saved.files)
                if len(states) != len(keys):
                    raise ValueError(f"{folder}: model has {len(states)} random-generator states, "
                                     f"checkpoint {len(keys)}")
                for variable, key in zip(states, keys):
                    variable.assign(saved[key])
        with open(os.path.join(folder, "state.json")) as f:
            return json.load(f)

    def _prune(self):
        for iteration in self.complete()[:-self.keep]:
            shutil.rmtree(os.path.join(self.directory, f"ckpt-{iteration:08d}"), ignore_errors=True)
        for name in os.listdir(self.directory):   # leftovers of killed saves
            if name.startswith(".tmp-ckpt-") and not name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)


def _rng_states(model):
    """Model variables that the weights file does not hold: the random-generator states of
    dropout layers. Restoring them makes the dropout masks after a resume the ones an
    uninterrupted run would have drawn."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]
