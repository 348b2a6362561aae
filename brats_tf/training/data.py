"""What a trainer trains on: the seeded case split and cases read from records."""


import numpy as np

from brats_tf.errors import ConfigError
from brats_tf.io import splits
from brats_tf.records import reader
from brats_tf.io import files as fs


def case_split(workdir, manifest, config):
    """Train/validation case ids: from the config, or a seeded split over sorted ids.

    The split is written to `<workdir>/split.json` once and reused on every re-run.
    """
    return splits.load_or_make(fs.join(workdir, splits.SPLIT_FILE), lambda: _make_split(manifest, config))


def _make_split(manifest, config):
    ids = sorted(c["case_id"] for c in manifest["cases"] if c["voxels_per_class"] is not None)
    if not ids:
        raise ConfigError(f"{config.data.records_dir}: no labeled cases to train on")
    val = list(config.data.val_cases) if config.data.val_cases is not None else None
    train = list(config.data.train_cases) if config.data.train_cases is not None else None
    if val is None:
        pool = [i for i in ids if train is None or i not in train]
        count = min(config.data.num_val_cases, max(len(ids) - 1, 0), len(pool))
        val = sorted(np.random.default_rng(config.seed).permutation(pool)[:count].tolist())
    if train is None:
        train = [i for i in ids if i not in val]
    unknown = sorted(set(train + val) - set(ids))
    if unknown:
        raise ConfigError(f"cases not in the labeled record set: {unknown[:5]}")
    return {"train": sorted(train), "val": sorted(val)}


def load_cases(records_dir, case_ids, channels=None, require_channels_present=False):
    """PreparedCases from records; `channels` selects image channels (subnetwork pretraining).

    With require_channels_present, cases lacking any selected modality are skipped.
    """
    cases = []
    for record_case in reader.read_cases(records_dir, case_ids):
        prepared = record_case.prepared
        if channels is not None:
            if require_channels_present and not record_case.modality_present[channels].all():
                continue
            prepared.image = prepared.image[..., channels]
            prepared.modalities = tuple(prepared.modalities[i] for i in channels)
        cases.append(prepared)
    return cases
