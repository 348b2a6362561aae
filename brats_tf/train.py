"""Trains a 2D model (or pretrains one subnetwork); re-running on the same work dir resumes.

    python -m brats_tf.train --config=brats_tf/configs/train2d.py:small \
        --config.data.records_dir=R --workdir=W [--config.model.kind=model2] \
        [--config.data.orientation=coronal] [--config.train.strategy=mirrored]

Writes to W: config.json (before step 0), split.json, checkpoints/, train_log.csv,
tensorboard/, and at the end model.keras + model_info.json.
"""

from absl import app, flags
from ml_collections import config_flags

from brats_tf.errors import run_main
from brats_tf.training.loop import TrainingError
from brats_tf.training.registry import trainer_class

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "brats_tf/configs/train2d.py:small", "Config preset file:preset.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work dir (resumes when it holds checkpoints).", required=True)


def main(argv):
    del argv
    try:
        result = trainer_class(FLAGS.config.get("stage", "2d"))(FLAGS.config, FLAGS.workdir).run()
    except TrainingError as err:
        raise SystemExit(f"error: {err}")
    val = ", ".join(f"{k} {v:.3f}" for k, v in result["validation"].items())
    print(f"trained {result['iterations']} iterations; model: {result['workdir']}/model.keras"
          + (f"; validation {val}" if val else ""))


if __name__ == "__main__":
    app.run(run_main(main))
