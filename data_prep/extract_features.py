r"""Extracts the 2D features of every case of a record set for the 3D stage.

    python -m data_prep.extract_features --records_dir R --out_dir F \
        --axial W_AX --coronal W_COR --sagittal W_SAG [--fold_models D1,D2,...]

Runs the three 2D models (trainer work dirs) over every slice in their orientation and
stores their 12 pre-softmax maps per case (a float16 feature record <case_id>.tfrecord) with
features_manifest.json naming the models and their sha256. --fold_models: folders each
holding axial/, coronal/ and sagittal/ work dirs of 2D models trained without some cases;
a case the main models were trained on then gets features from a fold that left it out.
A re-run with the same models continues an interrupted extraction.

Cross-fold, step 1 (prepares fold work dirs whose split.json the 2D trainer reuses):
    python -m data_prep.extract_features --prepare_folds 5 --fold_root D --axial W_AX \
        --records_dir R --out_dir F --coronal W_COR --sagittal W_SAG
then train each D/fold<k>/<orientation> with brats_tf.train (--workdir=D/fold<k>/axial ...),
and extract with --fold_models D/fold0,...,D/fold4.
"""

import os

from absl import app, flags

from brats_tf.constants import ORIENTATIONS
from brats_tf.inference import features
from brats_tf.errors import ConfigError, run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("records_dir", None, "Record set (data_prep.build_records).", required=True)
flags.DEFINE_string("out_dir", None, "Feature folder to write.", required=True)
flags.DEFINE_string("axial", None, "Work dir (or model.keras) of the axial 2D model.", required=True)
flags.DEFINE_string("coronal", None, "Work dir of the coronal 2D model.", required=True)
flags.DEFINE_string("sagittal", None, "Work dir of the sagittal 2D model.", required=True)
flags.DEFINE_list("fold_models", None, "Cross-fold extraction: folders with axial/, coronal/, sagittal/ work dirs.")
flags.DEFINE_integer("batch_size", 8, "Slices per forward pass.", lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Replace features from other models in --out_dir.")
flags.DEFINE_integer("prepare_folds", None, "Only write the split.json of this many cross-fold work dirs.",
                     lower_bound=2)
flags.DEFINE_string("fold_root", None, "Folder for the cross-fold work dirs (with --prepare_folds).")


def main(argv):
    del argv
    if FLAGS.prepare_folds:
        if not FLAGS.fold_root:
            raise ConfigError("--prepare_folds needs --fold_root")
        folds = features.write_fold_splits(FLAGS.axial, FLAGS.fold_root, FLAGS.prepare_folds)
        print(f"prepared {len(folds)} fold work dirs in {FLAGS.fold_root}; train each "
              f"<fold>/<orientation> with brats_tf.train, then pass --fold_models={','.join(folds)}")
        return
    folds = [{o: os.path.join(d, o) for o in ORIENTATIONS} for d in FLAGS.fold_models or []]
    manifest = features.extract_features(
        FLAGS.records_dir, FLAGS.out_dir,
        {"axial": FLAGS.axial, "coronal": FLAGS.coronal, "sagittal": FLAGS.sagittal},
        fold_models=folds, batch_size=FLAGS.batch_size, overwrite=FLAGS.overwrite)
    print(f"wrote features of {len(manifest['cases'])} cases ({len(manifest['channels'])} channels, "
          f"2D {manifest['kind']}) to {FLAGS.out_dir}")


if __name__ == "__main__":
    app.run(run_main(main))
