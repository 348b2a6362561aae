"""Training configs for the [S] baselines (BCN, patch FCN, FIFCN; METHOD §9).

    python -m brats_tf.train --config=brats_tf/configs/baselines.py:bcn_demo \
        --config.data.records_dir=R --workdir=W [--config.model.dropout=True] \
        [--config.model.batch_norm=True] [--config.loss.kind=dice] [--config.train.init_from=DIR]

Presets `<model>_<scale>`: model bcn | fcn | fifcn, scale `paper` ([S] sizes: 25³/24³
patches, 160×160×144 FIFCN volumes, wider layers, long runs) or `demo` (the same code at
CPU-demo scale: fewer filters, a smaller FIFCN volume, a few hundred iterations). Records
must be built with `--normalization=zscore` ([S] §4.1: zero mean, unit std).

Decisions ([S] gives no numbers): Adam at a constant 1e-3 (Keras default; [S] names Adam
and no schedule), L2 1e-4 on every kernel, batch 16 patches (2 FIFCN volumes at demo
scale), dropout 0.5 on the BCN's first FC layer and 0.25 after the FCN's convolutions.
"""

import ml_collections

from brats_tf.configs import common

MODELS = ("bcn", "fcn", "fifcn")
SCALES = ("demo", "paper")
PRESETS = tuple(f"{m}_{s}" for m in MODELS for s in SCALES)

# Filter counts per model and scale; the FIFCN's paper ones are VGG-11's first five
# (64, 128, 256, 256, 512) / 4, as [S] §3.4 says ("~4x less filters").
FILTERS = {
    ("bcn", "paper"): (32, 32, 64, 64), ("bcn", "demo"): (8, 16, 16, 32),
    ("fcn", "paper"): (32, 64), ("fcn", "demo"): (16, 32),
    ("fifcn", "paper"): (16, 32, 64, 64, 128), ("fifcn", "demo"): (8, 16, 32, 32, 64),
}
FC_UNITS = {"paper": 128, "demo": 32}
DROPOUT_RATE = {"bcn": 0.5, "fcn": 0.25, "fifcn": 0.25}
FIFCN_VOLUME = {"paper": (160, 160, 144), "demo": (64, 64, 64)}


def get_config(preset="bcn_demo"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}")
    kind, scale = preset.split("_")
    paper = scale == "paper"
    c = common.base_config("baseline", preset)

    c.model = ml_collections.ConfigDict()
    c.model.kind = kind
    c.model.num_classes = 2                 # 2: background / whole tumor ([S]); 4: internal classes
    c.model.filters = FILTERS[(kind, scale)]
    c.model.fc_units = FC_UNITS[scale]      # BCN only
    c.model.dropout = False                 # ablation switches ([S] Table 1)
    c.model.batch_norm = kind == "fifcn"    # [S] Fig. 4: the FIFCN's deconvolutions have BN
    c.model.dropout_rate = DROPOUT_RATE[kind]
    c.model.l2 = 1e-4
    c.model.patch_size = 24                 # FCN
    c.model.volume_size = FIFCN_VOLUME[scale]   # FIFCN: center crop / pad of the cropped case
    c.model.num_pools = 3                   # FIFCN

    c.data = common.case_selection(num_val_cases=5 if paper else 2, window_cases=8 if paper else 16)
    c.data.normalization = "zscore"         # required of the records ([S] §4.1); None: any
    c.data.batch_size = (32 if paper else 16) if kind != "fifcn" else 2
    c.data.sampling = "tumor_balanced"      # [S]: majority-tumor / majority-background patches

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "cross_entropy"           # cross_entropy | dice (FIFCN, [S] §3.4)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3            # Adam, constant

    iterations = (20000 if paper else 200) if kind != "fifcn" else (10000 if paper else 150)
    c.train = common.training_loop(iterations, checkpoint_every=500 if paper else 50,
                                   val_every=1000 if paper else 0)
    c.train.init_from = ml_collections.FieldReference(None, field_type=str)   # transfer: a model dir
    c.train.inference_tile = 41 if paper else 33   # BCN output tile at validation (9 = [S]'s 25³ -> 9³)
    return c
