"""Case splits: seeded over *sorted* case ids (never directory order), written once as
`split.json` in a work dir and reused on every re-run, so a resumed or repeated run trains
and tests on the same cases. The trainers, the experiments and cross-fold feature
extraction all read and write splits through here."""

import numpy as np

from brats_tf.errors import ConfigError
from brats_tf.io import files as fs
from brats_tf.io.files import read_json, write_json

SPLIT_FILE = "split.json"


def seeded_order(ids, seed):
    """The ids as strings in a seeded random order (a permutation of the sorted ids)."""
    return [str(i) for i in np.random.default_rng(seed).permutation(sorted(ids))]


def read_split(folder):
    """The split saved in `folder` (a work dir), or None when there is none."""
    path = fs.join(folder, SPLIT_FILE)
    return read_json(path) if fs.isfile(path) else None


def write_split(folder, split):
    write_json(fs.join(folder, SPLIT_FILE), split)


def load_or_make(path, make, known_ids=None):
    """The split saved at `path`, else `make()` saved there. With `known_ids`, a saved split
    naming other cases is refused (the data changed under the work dir)."""
    if fs.exists(path):
        split = read_json(path)
        unknown = sorted(set(_ids_in(split)) - set(known_ids)) if known_ids is not None else []
        if unknown:
            raise ConfigError(f"{path}: cases {unknown[:3]} are not in the data; use a new --workdir")
        return split
    split = make()
    write_json(path, split)
    return split


def fold_train_cases(case_ids, num_folds, seed=0):
    """For cross-fold extraction: the training-case list of each fold's 2D models (each
    leaves one seeded fold of the sorted ids out)."""
    ids = sorted(case_ids)
    if not 2 <= num_folds <= len(ids):
        raise ConfigError(f"num_folds={num_folds}: need 2 <= folds <= {len(ids)} cases")
    order = np.random.default_rng(seed).permutation(len(ids))
    held_out = [set(order[k::num_folds].tolist()) for k in range(num_folds)]
    return [[ids[i] for i in range(len(ids)) if i not in fold] for fold in held_out]


def _ids_in(value):
    """Every case id in a split (lists of ids, possibly nested, in a dict)."""
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value
    return [i for item in items for i in _ids_in(item)]
