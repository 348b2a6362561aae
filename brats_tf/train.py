"""Trains a model as its config says (2D, 3D, baselines; or pretrains one subnetwork);
re-running on the same work dir resumes, and on a finished one changes nothing (model.keras
keeps its bytes and sha256: 2D-3D chains and feature manifests find it by that hash).

    python -m brats_tf.train --config=brats_tf/configs/train2d.py:small \
        --config.data.records_dir=R --workdir=W [--config.model.kind=model2] \
        [--config.data.orientation=coronal] [--config.train.strategy=mirrored]

Writes to W: config.json (before step 0), split.json, checkpoints/, train_log.csv,
tensorboard/ (scalars, a validation slice with the prediction overlaid, the config as
HParams), and at the end model.keras + model_info.json.
"""

from absl import app, flags
from ml_collections import config_flags

from brats_tf.configs import train2d
from brats_tf.errors import run_main
from brats_tf.training.loop import TrainingError
from brats_tf.training.registry import trainer_class

FLAGS = flags.FLAGS
# The default by absolute path, so that `brats-train` works from any folder.
config_flags.DEFINE_config_file("config", f"{train2d.__file__}:small", "Config preset file:preset "
                                "(default: brats_tf/configs/train2d.py:small).", lock_config=True)
flags.DEFINE_string("workdir", None, "Work dir (resumes when it holds checkpoints).", required=True)


def main(argv):
    del argv
    try:
        result = trainer_class(FLAGS.config.get("stage", "2d"))(FLAGS.config, FLAGS.workdir).run()
    except TrainingError as err:
        raise SystemExit(f"error: {err}")
    val = ", ".join(f"{k} {v:.3f}" for k, v in result["validation"].items())
    done, model = ("already trained", "model (unchanged)") if result.get("reused") else ("trained", "model")
    print(f"{done} {result['iterations']} iterations; {model}: {result['workdir']}/model.keras"
          + (f"; validation {val}" if val else ""))


if __name__ == "__main__":
    app.run(run_main(main))
