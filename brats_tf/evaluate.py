"""Evaluates predicted label maps against references: Dice, HD95, sensitivity, specificity
(legacy) and the BraTS lesion-wise metrics.

    python -m brats_tf.evaluate --pred FILE --ref FILE --out metrics.csv
    python -m brats_tf.evaluate --pred_dir P --ref_dir R [--layout ...] --out metrics.csv
        [--metrics legacy|lesionwise|all] [--lesion_rules brats2026|brats2023]

Predictions are named <case_id>_seg.nii.gz or <case_id>.nii.gz; references come from
any supported layout (or --layout flat: a folder of label files named like the
predictions). Writes a CSV in the BraTS online-evaluation format (one row per case,
then Mean, StdDev, Median, 25quantile, 75quantile): the legacy columns, then the
lesion-wise ones (see brats_tf/evaluation/lesionwise.py; `nan` where a region is empty in
both masks, `inf` for a lesion-wise HD95 without any matched lesion). Predictions without
a reference and references without a prediction are listed on stderr and make the exit
status 1 unless --allow_missing.
"""

from absl import app, flags

from brats_tf.constants import LABEL_MAPS
from brats_tf.errors import run_main
from brats_tf.evaluation.evaluate import METRIC_SETS, run_evaluation
from brats_tf.evaluation.lesionwise import RULES
from brats_tf.io.cases import LAYOUT_CHOICES

FLAGS = flags.FLAGS
flags.DEFINE_string("pred", None, "One predicted label map (with --ref).")
flags.DEFINE_string("ref", None, "Its reference label map.")
flags.DEFINE_string("pred_dir", None, "Folder of predictions (with --ref_dir).")
flags.DEFINE_string("ref_dir", None, "Dataset folder holding the reference labels.")
flags.DEFINE_enum("layout", "auto", LAYOUT_CHOICES + ("flat",), "Layout of --ref_dir.")
flags.DEFINE_string("layout_file", None, "Generic layout JSON for --ref_dir (overrides --layout).")
flags.DEFINE_enum("pred_convention", "brats2017", sorted(LABEL_MAPS), "Label values of the predictions.")
flags.DEFINE_enum("ref_convention", "brats2017", sorted(LABEL_MAPS),
                  "Label values of --ref or of a --layout flat folder (other layouts say their own).")
flags.DEFINE_string("out", None, "Evaluation CSV to write.", required=True)
flags.DEFINE_integer("workers", 2, "Parallel processes over cases.", lower_bound=1)
flags.DEFINE_bool("allow_missing", False, "Evaluate the matched cases even when some have no counterpart.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_enum("metrics", "all", METRIC_SETS,
                  "legacy: Dice, sensitivity, specificity, HD95 per region (the CSV as before lesion-wise "
                  "metrics existed); lesionwise: the BraTS lesion-wise metrics; all: legacy then lesion-wise.")
flags.DEFINE_enum("lesion_rules", "brats2026", RULES,
                  "Lesion-wise rules: brats2026 (the organisers' brats-evaluation package: one-to-one "
                  "matching, ET/WT/TC/NETC/SNFH) or brats2023 (dilation-merged lesions, FP/FN penalised, "
                  "ET/WT/TC).")
flags.register_multi_flags_validator(
    ["pred", "ref", "pred_dir", "ref_dir"],
    lambda f: (bool(f["pred"] and f["ref"]) and not (f["pred_dir"] or f["ref_dir"])) or
              (bool(f["pred_dir"] and f["ref_dir"]) and not (f["pred"] or f["ref"])),
    "pass either --pred and --ref, or --pred_dir and --ref_dir")


def main(argv):
    del argv
    evaluation = run_evaluation(FLAGS.out, FLAGS.pred, FLAGS.ref, FLAGS.pred_dir, FLAGS.ref_dir, FLAGS.layout,
                                FLAGS.layout_file, FLAGS.pred_convention, FLAGS.ref_convention, FLAGS.workers,
                                FLAGS.allow_missing, FLAGS.progress, metrics=FLAGS.metrics,
                                lesion_rules=FLAGS.lesion_rules)
    print(f"evaluated {len(evaluation.rows)} case(s); wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(run_main(main))
