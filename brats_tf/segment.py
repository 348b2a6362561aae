r"""Segments cases with exported models; writes <case_id>_seg.nii.gz in the input's geometry.

    python -m brats_tf.segment --case_dir CASE [--layout_file L.json] \
        --models AX,COR,SAG,MODEL3D[,MODEL3D...] --out_dir OUT
    python -m brats_tf.segment --t1 T1 --t1c T1C --t2 T2 --flair FLAIR --models M --out_dir OUT
    python -m brats_tf.segment --case_dir CASE --bundle BUNDLE --out_dir OUT

--models: exported model dirs (or model.keras files): 2D models, 3D models, and the
three 2D models a 2D-3D model takes its features from (found by content hash). Several
segmenting models are fused by the hierarchical vote. Also writes
<case_id>_volumes.json (mL per WT/TC/ET), and on request the per-class probabilities
(--save_probabilities) and the vote-proportion maps P_tumor/P_core/P_enh
(--save_proportions).

A case lacking a sequence: 2D models trained with sequence dropout (train2d.py
*_dropout presets) gate out its subnetwork; other models refuse unless
--allow_missing=zero_fill. One line says which sequences are missing and how each is
handled; <case_id>_volumes.json records it ("missing_sequences").

3D models run layer by layer over the whole case when the estimated memory fits
--memory_budget_gb (default 8), else tiled; --precision=bf16 runs the 2D and 3D models in
bfloat16 with float32 logits (BUILD_NOTES, issue 14: speed and agreement with fp32).

--bundle: a model bundle written by `python -m brats_tf.export` instead of --models: its
SavedModels run with the chains, thresholds, tile and batch sizes of its bundle.json, after
every file's sha256 is checked. --max_grid X,Y,Z runs --models at the fixed shapes of a
bundle exported with that grid (and the same --tile_size and --batch_size): the same label map.
"""

from absl import app, flags

from brats_tf.inference import ensemble
from brats_tf.inference import pipeline
from brats_tf.constants import MEMORY_BUDGET_GB, OUTPUT_LABEL_MAPS, PRECISIONS, TILE_SIZE_3D
from brats_tf.errors import run_main
from brats_tf.io.cases import LAYOUT_CHOICES

FLAGS = flags.FLAGS
flags.DEFINE_string("case_dir", None, "A case folder (or a folder of cases) in any supported layout.")
flags.DEFINE_enum("layout", "auto", LAYOUT_CHOICES, "On-disk layout of --case_dir.")
flags.DEFINE_string("layout_file", None, "Generic layout JSON for --case_dir (overrides --layout).")
for _modality in pipeline.MODALITY_FLAGS:
    flags.DEFINE_string(_modality, None, f"{_modality} image file (instead of --case_dir).")
flags.DEFINE_string("mask", None, "Optional brain-mask file for explicit modality files.")
flags.DEFINE_string("case_id", None, "Case id for explicit files (default: from the file names).")
flags.DEFINE_list("models", None, "Exported model dirs or model.keras files (or --bundle).")
flags.DEFINE_string("bundle", None, "A model bundle folder (python -m brats_tf.export) instead of --models.")
flags.DEFINE_list("max_grid", None, "X,Y,Z: run --models at the fixed network shapes of a bundle exported "
                  "with this --max_grid (default: each case's own shapes).")
flags.DEFINE_string("out_dir", None, "Output folder.", required=True)
flags.DEFINE_enum("label_convention", "brats2017", sorted(OUTPUT_LABEL_MAPS),
                  "Labels written: brats2017 (0/1/2/4) or brats2023 (0/1/2/3).")
flags.DEFINE_list("thresholds", [str(t) for t in ensemble.DEFAULT_THRESHOLDS],
                  "Vote thresholds T_tumor,T_core,T_enh (several segmenting models).")
flags.DEFINE_bool("save_probabilities", False, "Also write <case_id>_probabilities.nii.gz (4 classes).")
flags.DEFINE_bool("save_proportions", False, "Also write the vote-proportion maps <case_id>_P_*.nii.gz.")
flags.DEFINE_integer("batch_size", pipeline.BATCH_SIZE_2D, "2D slices per forward pass.", lower_bound=1)
flags.DEFINE_enum("allow_missing", None, ["zero_fill"], "Run models trained without sequence dropout on a case "
                  "lacking one of their sequences, zero-filled (models trained with it need no flag).")
flags.DEFINE_integer("tile_size", TILE_SIZE_3D, "Largest side of the output block of one 3D tile (its input: +44; "
                     "pooled 3D models: rounded down to a multiple of 4, input +40); memory grows with its cube.", lower_bound=1)
flags.DEFINE_float("memory_budget_gb", MEMORY_BUDGET_GB, "A 3D model runs layer by layer over the whole case (each "
                   "voxel of each layer computed once) when its estimated memory fits this; else in --tile_size "
                   "tiles. 0: always tiles.", lower_bound=0)
flags.DEFINE_enum("precision", "fp32", list(PRECISIONS), "Compute precision of the 2D and 3D models' inner layers: "
                  "bf16 runs them in bfloat16 (Keras mixed_bfloat16, logits float32; 1.3-2x as fast on "
                  "CPUs with AVX512_BF16 or AMX, GPUs from Ampere, TPUs). Baselines and bundles run in fp32.")


def main(argv):
    del argv
    files = {m: getattr(FLAGS, m) for m in pipeline.MODALITY_FLAGS}
    given = lambda name: getattr(FLAGS, name) if FLAGS[name].present else None   # else the default or the bundle's
    pipeline.segment(   # prints "<case_id>: <label map>" as each case is written
        FLAGS.models, FLAGS.out_dir, case_dir=FLAGS.case_dir, files=files, layout=FLAGS.layout,
        layout_file=FLAGS.layout_file, case_id=FLAGS.case_id, mask=FLAGS.mask, bundle=FLAGS.bundle,
        max_grid=FLAGS.max_grid, label_convention=FLAGS.label_convention, thresholds=given("thresholds"),
        save_probabilities=FLAGS.save_probabilities, save_proportions=FLAGS.save_proportions,
        batch_size=given("batch_size"), tile_size=given("tile_size"), allow_missing=FLAGS.allow_missing,
        memory_budget_gb=FLAGS.memory_budget_gb, precision=FLAGS.precision)


if __name__ == "__main__":
    app.run(run_main(main))
