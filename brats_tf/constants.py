"""Names and label conventions used everywhere in the library (METHOD §1).

Defined once, as data: modalities and their canonical order, the internal label
convention, the evaluation regions, and how each on-disk layout's label values map
to the internal ones.
"""

# Canonical modality names, in the fixed order models expect them.
MODALITIES = ("t1", "t1c", "t2", "flair")

# Slice orientations of the 2D models, in the order their feature channels are stacked.
ORIENTATIONS = ("axial", "coronal", "sagittal")
# Volume axis that indexes slices: axial slices are x-y planes (fixed z), etc.
SLICE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}

# Internal label convention.
NON_TUMOR, NCR_NET, EDEMA, ENHANCING = 0, 1, 2, 3
NUM_CLASSES = 4
CLASS_NAMES = ("non-tumor", "ncr/net", "edema", "enhancing")

# Evaluation regions as sets of internal labels; order is the BraTS table order.
REGIONS = {
    "WT": (NCR_NET, EDEMA, ENHANCING),
    "TC": (NCR_NET, ENHANCING),
    "ET": (ENHANCING,),
}

# On-disk label value -> internal label, per label convention.
LABEL_MAPS = {
    "brats2017": {0: 0, 1: 1, 2: 2, 4: 3},
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},
    "brats2013": {0: 0, 1: 1, 2: 2, 3: 1, 4: 3},
    "msd": {0: 0, 1: 2, 2: 1, 3: 3},
}

# Internal label -> on-disk value when writing label maps.
OUTPUT_LABEL_MAPS = {
    "brats2017": {0: 0, 1: 1, 2: 2, 3: 4},
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},
}

# BraTS convention for HD95 when exactly one of prediction/reference is empty.
HD95_ONE_EMPTY_MM = 373.13

# Largest output side of a 3D inference tile (its input: +44); the default of `segment`,
# of the 3D trainer's validation and of the experiments (configs/experiments.py).
TILE_SIZE_3D = 64
# Memory (GB) a 3D model's whole-volume, layer-by-layer inference may take (its estimate);
# above it, or at 0, the model is tiled with TILE_SIZE_3D tiles (issue 14 item 2).
MEMORY_BUDGET_GB = 8.0
# Inference precisions (segment --precision): the models' inner layers in float32 or bfloat16
# (brats_tf/models/precision.py maps them to Keras dtype policies).
PRECISIONS = ("fp32", "bf16")
