"""Config sections every trainer's presets share (the trainer loop, case selection, the
[M] optimizer); each preset file adds its stage's model, data and loss fields."""

import ml_collections

from brats_tf.errors import ConfigError


def base_config(stage, preset):
    c = ml_collections.ConfigDict()
    c.stage = stage                         # which trainer (brats_tf/training/registry.py)
    c.preset = preset
    c.seed = 0
    c.deterministic = False   # tf.config.experimental.enable_op_determinism (disables XLA)
    return c


def case_selection(num_val_cases, window_cases=8):
    """`data` fields choosing the cases (the record set, train / validation ids, modalities)
    and how the training stream reads them (`records/streams.py`)."""
    data = ml_collections.ConfigDict()
    data.records_dir = ml_collections.FieldReference(None, field_type=str)
    data.train_cases = ml_collections.FieldReference(None, field_type=list)  # None: all but val
    data.val_cases = ml_collections.FieldReference(None, field_type=list)    # None: a few held out
    data.num_val_cases = num_val_cases
    data.modalities = ml_collections.FieldReference(None, field_type=list)   # None: the records'
    # Cases held in memory at once, and batches cut from them before the next window is read:
    # memory grows with the window, not with the dataset (BUILD_NOTES, "Streaming input pipelines").
    data.window_cases = window_cases
    data.batches_per_window = 16
    return data


SEQUENCE_DROPOUT = 0.25   # the `*_dropout` presets; with four sequences all four kept in 32 % of examples


def augmentation(data):
    """In-graph augmentation fields of a trainer's `data` (records/streams.py `augment`); None:
    off, as every run before them. `flip_lr`: mirror each example left-right (array axis 0 of
    the volumes, BraTS's L-R axis; sagittal slices have no such axis and stay as they are)
    with probability 1/2; `intensity_scale` s: multiply each image channel of each example by
    a factor uniform in [1 - s, 1 + s] (2D feature channels keep their values)."""
    data.flip_lr = ml_collections.FieldReference(None, field_type=bool)
    data.intensity_scale = ml_collections.FieldReference(None, field_type=float)
    return data


def sequence_dropout():
    """data.sequence_dropout: None builds the paper's model (one input, every sequence needed);
    a probability p in [0, 1) builds it with a `present` input (issue 15) and drops each present
    sequence of each training example with probability p (never all)."""
    return ml_collections.FieldReference(None, field_type=float)


def split_dropout_preset(preset, presets):
    """("small", True) for "small_dropout"; refuses a preset outside `presets` (+ their _dropout)."""
    known = tuple(presets) + tuple(f"{p}_dropout" for p in presets)
    if preset not in known:
        raise ValueError(f"unknown preset {preset!r}; use one of {known}")
    return (preset[:-len("_dropout")], True) if preset.endswith("_dropout") else (preset, False)


def normalized_momentum(period, accumulation_steps):
    """[M §2.4]: normalized-gradient momentum over N accumulated batches, plateau schedule."""
    optim = ml_collections.ConfigDict()
    optim.learning_rate = 0.25
    optim.min_learning_rate = 0.001
    optim.period = period
    optim.decrease_ratio = 0.98
    optim.momentum = 0.9
    optim.accumulation_steps = accumulation_steps
    optim.epsilon = 1e-8
    return optim


def training_loop(iterations, checkpoint_every, val_every):
    train = ml_collections.ConfigDict()
    train.iterations = iterations
    train.checkpoint_every = checkpoint_every
    train.keep_checkpoints = 2
    train.val_every = val_every             # 0: validate only at the end
    train.strategy = "off"                  # off | mirrored | multi_worker | tpu
    # mirrored on a CPU host: split its CPU into this many logical devices (one replica each);
    # tests and benches use it to run the multi-replica code path without accelerators.
    train.cpu_devices = ml_collections.FieldReference(None, field_type=int)
    # Batch statistics summed across replicas (E[x^2] - mean^2): None = when there are several
    # replicas; True also on one device, to compute exactly what a multi-replica run does.
    train.sync_batch_norm = ml_collections.FieldReference(None, field_type=bool)
    train.jit_compile = False               # XLA: 11x slower on CPU here (KERAS3_NOTES)
    # Precise batch norm before the export (loop.recalibrate_batch_norm): the statistics over
    # this many further training batches instead of the moving averages; None/0: off (the paper).
    train.precise_bn_batches = ml_collections.FieldReference(None, field_type=int)
    # Tail averaging (training/averaging.py): the exported weights are the mean of the weights
    # after each of the last this-many iterations (all, in a shorter run); None/0: the last weights.
    train.average_last = ml_collections.FieldReference(None, field_type=int)
    return train


# Lower bounds of the fields every trainer's config has (where it has them): below them a
# run would export an untrained model, loop forever or divide by zero some steps later.
MINIMUM = {"seed": 0, "train.iterations": 0, "train.checkpoint_every": 1, "train.keep_checkpoints": 1,
           "train.val_every": 0, "data.batch_size": 1, "data.num_val_cases": 0, "data.window_cases": 1,
           "data.batches_per_window": 1, "optim.accumulation_steps": 1, "optim.period": 1,
           "train.micro_batches": 1, "data.intensity_scale": 0, "train.precise_bn_batches": 0,
           "train.average_last": 0}
POSITIVE = ("optim.learning_rate",)


def check_ranges(config, prefix="--config", minimum=None, positive=POSITIVE):
    """Refuses (ConfigError, naming the flag) a config value out of range, before any work:
    below `minimum` ({dotted key: lower bound}, default a trainer's MINIMUM) or not > 0
    (`positive`); absent keys are skipped. `prefix` spells the field as the user gave it
    (run_experiment: --config.twod). Returns the config."""
    def value(key):
        node = config
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                return None
            node = node[part]
        return node
    for key, low in (MINIMUM if minimum is None else minimum).items():
        v = value(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= low):
            raise ConfigError(f"{prefix}.{key}={v}: must be a number >= {low}")
    for key in positive:
        v = value(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            raise ConfigError(f"{prefix}.{key}={v}: must be a number > 0")
    return config
