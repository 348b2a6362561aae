"""Every trainer by the `config.stage` it trains: each Trainer subclass declares its stage
name beside its class, and this module lists the classes (imported normally, so the import
graph shows which trainers exist). Entry points and experiments pick trainers here."""

from brats_tf.errors import ConfigError
from brats_tf.training.baselines import BaselineTrainer
from brats_tf.training.stage2d import Trainer2D
from brats_tf.training.stage3d import Trainer3D

TRAINERS = {cls.stage: cls for cls in (Trainer2D, Trainer3D, BaselineTrainer)}


def trainer_class(stage):
    """The Trainer subclass for `config.stage`."""
    if stage not in TRAINERS:
        raise ConfigError(f"config.stage={stage!r}; use one of {sorted(TRAINERS)}")
    return TRAINERS[stage]
