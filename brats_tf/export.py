r"""Writes a self-contained model bundle: each network as a TensorFlow SavedModel with a
fixed-shape serving signature, and bundle.json describing how to run them.

    python -m brats_tf.export --models AX,COR,SAG,MODEL3D[,...] --out BUNDLE
    python -m brats_tf.segment --bundle BUNDLE --case_dir CASE --out_dir OUT

--models: exported model dirs (or model.keras files), as for `segment`: 2D models, 3D models
and the three 2D models of each 2D-3D model (found by content hash). The networks run at
fixed shapes: 2D slices padded to the canvas of --max_grid (the largest brain-cropped grid the
bundle serves), 3D tiles padded to --tile_size + 44 (pooled 3D models: the largest multiple of 4
<= --tile_size, + 40). `segment --models ... --max_grid X,Y,Z`
runs the Keras models at the same shapes and gives the same label maps, voxel for voxel.
The bundle is built beside --out and renamed into place; an existing bundle is replaced only
with --overwrite.
"""

from absl import app, flags

from brats_tf.constants import TILE_SIZE_3D
from brats_tf.errors import run_main
from brats_tf.inference import bundle_writer, ensemble

FLAGS = flags.FLAGS
flags.DEFINE_list("models", None, "Exported model dirs or model.keras files.", required=True)
flags.DEFINE_string("out", None, "The bundle folder to write.", required=True)
flags.DEFINE_list("max_grid", [str(n) for n in bundle_writer.DEFAULT_MAX_GRID],
                  "X,Y,Z: the largest brain-cropped grid the bundle serves (fixes the 2D slice canvases).")
flags.DEFINE_integer("tile_size", TILE_SIZE_3D, "Largest side of a 3D output tile; the 3D networks take "
                     "tile_size + 44 cubes (pooled ones: tile_size rounded down to a multiple of 4, + 40).", lower_bound=1)
flags.DEFINE_integer("batch_size", bundle_writer.BATCH_SIZE_2D, "2D slices per forward pass.", lower_bound=1)
flags.DEFINE_list("thresholds", [str(t) for t in ensemble.DEFAULT_THRESHOLDS],
                  "Vote thresholds T_tumor,T_core,T_enh recorded for several segmenting networks.")
flags.DEFINE_bool("overwrite", False, "Replace an existing bundle at --out.")


def main(argv):
    del argv
    manifest = bundle_writer.export_bundle(
        FLAGS.models, FLAGS.out, max_grid=FLAGS.max_grid, tile_size=FLAGS.tile_size, batch_size=FLAGS.batch_size,
        thresholds=FLAGS.thresholds, overwrite=FLAGS.overwrite)
    print(f"{FLAGS.out}: {len(manifest['networks'])} networks, {len(manifest['segmentation']['final'])} "
          f"segmenting", flush=True)


if __name__ == "__main__":
    app.run(run_main(main))
