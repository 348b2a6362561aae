"""Training config for the 2D stage.

    python -m brats_tf.train --config=brats_tf/configs/train2d.py:small \
        --config.data.records_dir=R --workdir=W [--config.model.kind=model2 ...]

Presets: `paper` (METHOD §2, §4, §5 settings: N=10, schedule 0.25/0.001/200/0.98, target
weights 0.7/0.1/0.1/0.1, full-resolution slices) and `small` (the same code at CPU-demo
scale: small filters, N=2, fewer iterations).
"""

import ml_collections

from brats_tf.configs import common

SEQUENCE_DROPOUT = common.SEQUENCE_DROPOUT
PRESETS = ("paper", "small")


def get_config(preset="small"):
    """`*_dropout` (paper_dropout, small_dropout): the preset with sequence dropout (issue 15):
    models that segment any non-empty subset of their sequences."""
    preset, dropout = common.split_dropout_preset(preset, PRESETS)
    if dropout:
        c = get_config(preset)
        c.data.sequence_dropout = SEQUENCE_DROPOUT
        return c
    paper = preset == "paper"
    c = common.base_config("2d", preset)

    c.model = ml_collections.ConfigDict()
    c.model.kind = "model1"                 # model1 | model2 | unet_axial (baseline)
    c.model.preset = "paper" if paper else "small"   # filter counts (models/unet2d.py)

    c.data = common.case_selection(num_val_cases=5 if paper else 2, window_cases=8 if paper else 16)
    c.data.orientation = "axial"            # axial | coronal | sagittal
    c.data.batch_size = 8 if not paper else 10
    c.data.tumor_fraction = 0.5             # share of non-guaranteed slices drawn from tumor slices
    # Sequence dropout (common.sequence_dropout): the `present` input gates each subnetwork.
    c.data.sequence_dropout = common.sequence_dropout()
    common.augmentation(c.data)

    c.loss = ml_collections.ConfigDict()
    c.loss.target_weights = (0.7, 0.1, 0.1, 0.1)
    c.loss.main_weight = 0.75

    c.optim = common.normalized_momentum(period=200 if paper else 40, accumulation_steps=10 if paper else 2)

    c.train = common.training_loop(iterations=20000 if paper else 150, checkpoint_every=200 if paper else 25,
                                   val_every=500 if paper else 25)
    c.train.pretrained_subnetworks = ml_collections.FieldReference(None, field_type=str)
    c.train.subnetwork = ml_collections.FieldReference(None, field_type=str)  # pretrain one alone
    return c
