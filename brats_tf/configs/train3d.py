"""Training config for the 3D stage: the standard 3D model and 2D-3D models A, B, C.

    python -m brats_tf.train --config=brats_tf/configs/train3d.py:small \
        --config.data.records_dir=R --config.model.kind=A \
        --config.features.dir=F [--config.features.kind=model1] --workdir=W

Presets (each also as `<preset>_dropout`, with sequence dropout): `paper` (METHOD §3-§5:
70³ patches, receptive field 45³, target weights 0.4/0.2/0.2/0.2, N=5, schedule
0.25/0.001/200/0.98) and `small` (the same code at
CPU-demo scale: narrow filters, a shorter plateau period F, fewer iterations). The
receptive field is 45³ in both (fixed by the architecture); the patch side only sets how
many output voxels one patch trains (input - 44).

`model.design`: "atrous" (the default: full-resolution levels, dilated; any patch side >= 45,
input - 44 labels) or "pooled" (the classic 3D U-Net layout, 2³ max-pooling and 2³
up-convolutions, for comparison: patch sides multiples of 4, input - 40 labels, a 44³
field off-center by the position modulo 4; e.g. --config.model.design=pooled
--config.model.input_size=68). See models/unet3d.py.
"""

import ml_collections

from brats_tf.configs import common
from brats_tf.constants import TILE_SIZE_3D

PRESETS = ("paper", "small")


def get_config(preset="small"):
    """`*_dropout` (paper_dropout, small_dropout): with sequence dropout (issue 15)."""
    preset, dropout = common.split_dropout_preset(preset, PRESETS)
    if dropout:
        c = get_config(preset)
        c.data.sequence_dropout = common.SEQUENCE_DROPOUT
        return c
    paper = preset == "paper"
    c = common.base_config("3d", preset)

    c.model = ml_collections.ConfigDict()
    c.model.kind = "A"                      # standard | A | B | C (models/unet3d.py)
    c.model.preset = "paper" if paper else "small"     # filter counts
    c.model.design = "atrous"               # atrous | pooled (models/unet3d.py; docstring above)
    # Overrides of the preset's widths, e.g. --config.model.levels='(8,12,16)'.
    c.model.levels = ml_collections.FieldReference(None, field_type=tuple)  # 3 filter counts
    c.model.final = ml_collections.FieldReference(None, field_type=int)     # override: final conv maps
    # Patch side (labels: input - 44; pooled design: a multiple of 4, labels input - 40).
    # Measured on the 2-core CI machine, small widths, batch of 4: 70³ 2.6 s/step, 54³
    # 0.97 s/step; 70³ trains 6.5x more label voxels per second, so `small` keeps the
    # paper's 70³ (a smaller side works too: the field stays 45³).
    c.model.input_size = 70

    c.data = common.case_selection(num_val_cases=5 if paper else 2, window_cases=8 if paper else 16)
    c.data.batch_size = 5 if paper else 4   # >= 4: class-balanced batches hold every class
    c.data.sampling = "class_balanced"      # class_balanced | tumor_balanced | uniform
    # Sequence dropout (common.sequence_dropout): image channels zero-filled plus presence channels.
    c.data.sequence_dropout = common.sequence_dropout()
    common.augmentation(c.data)

    c.features = ml_collections.ConfigDict()
    c.features.dir = ml_collections.FieldReference(None, field_type=str)   # for A, B, C
    c.features.kind = ml_collections.FieldReference(None, field_type=str)  # 2D kind they must come from
    c.features.cross_fold = False           # require cross-fold extracted training features
    # Optional "axial,coronal,sagittal" model dirs the features must come from (by hash).
    c.features.models = ml_collections.FieldReference(None, field_type=str)

    c.loss = ml_collections.ConfigDict()
    c.loss.target_weights = (0.4, 0.2, 0.2, 0.2)
    c.loss.main_weight = 1.0                # one output, no auxiliary heads

    c.optim = common.normalized_momentum(period=200 if paper else 20, accumulation_steps=5)   # N [M §2.4]

    c.train = common.training_loop(iterations=20000 if paper else 40, checkpoint_every=200 if paper else 10,
                                   val_every=1000 if paper else 20)
    # Parts each batch is trained in, one after another, gradients summed: the same update
    # (3D models have no batch normalization) with a part's activation memory. Paper: 2D-3D
    # model C's step on 5 x 70³ x 16 took 16 GB on the CPU in one part, 7 GB in 5 (BUILD_NOTES,
    # the paper-scale smoke run); on a GPU with room for the whole batch, =1 is faster.
    c.train.micro_batches = 5 if paper else 1
    c.train.tile_size = TILE_SIZE_3D        # largest output side of a tile, validation inference
    return c
