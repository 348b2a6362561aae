"""Training config for the 2D stage.

    python -m brats_tf.train --config=brats_tf/configs/train2d.py:small \
        --config.data.records_dir=R --workdir=W [--config.model.kind=model2 ...]

Presets: `paper` (METHOD §2, §4, §5 settings: N=10, schedule 0.25/0.001/200/0.98, target
weights 0.7/0.1/0.1/0.1, full-resolution slices) and `small` (the same code at CPU-demo
scale: small filters, N=2, fewer iterations).
"""

import ml_collections

MODEL_KINDS = ("model1", "model2", "unet")
PRESETS = ("paper", "small")


def get_config(preset="small"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}")
    paper = preset == "paper"
    c = ml_collections.ConfigDict()
    c.stage = "2d"                          # which trainer (brats_tf/training.py TRAINERS)
    c.preset = preset
    c.seed = 0
    c.deterministic = False   # tf.config.experimental.enable_op_determinism (disables XLA)

    c.model = ml_collections.ConfigDict()
    c.model.kind = "model1"                 # model1 | model2 | unet_axial (baseline)
    c.model.preset = "paper" if paper else "small"   # filter counts (models/unet2d.py)

    c.data = ml_collections.ConfigDict()
    c.data.records_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.orientation = "axial"            # axial | coronal | sagittal
    c.data.train_cases = ml_collections.FieldReference(None, field_type=list)  # None: all but val
    c.data.val_cases = ml_collections.FieldReference(None, field_type=list)    # None: a few held out
    c.data.num_val_cases = 2 if not paper else 5
    c.data.modalities = ml_collections.FieldReference(None, field_type=list)   # None: the records'
    c.data.batch_size = 8 if not paper else 10
    c.data.tumor_fraction = 0.5             # share of non-guaranteed slices drawn from tumor slices

    c.loss = ml_collections.ConfigDict()
    c.loss.target_weights = (0.7, 0.1, 0.1, 0.1)
    c.loss.main_weight = 0.75

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 0.25
    c.optim.min_learning_rate = 0.001
    c.optim.period = 200 if paper else 40
    c.optim.decrease_ratio = 0.98
    c.optim.momentum = 0.9
    c.optim.accumulation_steps = 10 if paper else 2
    c.optim.epsilon = 1e-8

    c.train = ml_collections.ConfigDict()
    c.train.iterations = 20000 if paper else 150
    c.train.checkpoint_every = 200 if paper else 25
    c.train.keep_checkpoints = 2
    c.train.val_every = 500 if paper else 25
    c.train.strategy = "off"                # off | mirrored | multi_worker | tpu
    c.train.jit_compile = False             # XLA: 11x slower on CPU here (KERAS3_NOTES)
    c.train.pretrained_subnetworks = ml_collections.FieldReference(None, field_type=str)
    c.train.subnetwork = ml_collections.FieldReference(None, field_type=str)  # pretrain one alone
    return c
