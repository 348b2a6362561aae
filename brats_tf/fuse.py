"""Fuses label maps by voting (METHOD §6).

    python -m brats_tf.fuse --output F.nii.gz [--method hierarchical|majority]
        [--thresholds 0.4,0.3,0.4] [--proportions_prefix P] SEG1 SEG2 ...

Inputs must share shape and geometry; the fused map is written in the first input's
geometry. With --proportions_prefix P, also writes P_tumor.nii.gz, P_core.nii.gz and
P_enh.nii.gz (fractions of models voting tumor, core among tumor, enhancing among core).
"""

from absl import app, flags

from brats_tf.inference import ensemble
from brats_tf.constants import LABEL_MAPS, OUTPUT_LABEL_MAPS
from brats_tf.errors import run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "Fused label map to write (.nii.gz).", required=True)
flags.DEFINE_enum("method", "hierarchical", ensemble.METHODS,
                  "hierarchical: the paper's vote with thresholds; majority: per-voxel mode "
                  "(ties go to the lowest label).")
flags.DEFINE_list("thresholds", [str(t) for t in ensemble.DEFAULT_THRESHOLDS],
                  "T_tumor,T_core,T_enh for the hierarchical vote (a proportion >= T passes).")
flags.DEFINE_string("proportions_prefix", None, "Also write <prefix>_{tumor,core,enh}.nii.gz vote proportions.")
flags.DEFINE_enum("label_convention", "brats2017", sorted(LABEL_MAPS),
                  "Label values of the inputs: brats2017 is 0/1/2/4, brats2023 is 0/1/2/3.")
flags.DEFINE_enum("output_convention", "brats2017", sorted(OUTPUT_LABEL_MAPS),
                  "Label values of the output: brats2017 writes enhancing as 4, brats2023 as 3.")


def main(argv):
    seg_paths = argv[1:]
    labels = ensemble.fuse_files(seg_paths, FLAGS.output, FLAGS.method, FLAGS.thresholds,
                                 FLAGS.proportions_prefix, FLAGS.label_convention, FLAGS.output_convention)
    print(f"fused {len(seg_paths)} label maps ({FLAGS.method}) into {FLAGS.output}: "
          f"{int((labels > 0).sum())} tumor voxels")


if __name__ == "__main__":
    app.run(run_main(main))
