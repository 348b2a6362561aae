"""Trains a demo 3D model with the pooled design from the demo's own config.json (same data,
split, features, seed, schedule), changing only model.design and the patch size (bench/pooled_vs_atrous.sh).

    python -m bench.train_pooled_like SOURCE_MODEL_DIR WORKDIR INPUT_SIZE
"""
import json
import sys
import time

from brats_tf.configs import train3d
from brats_tf.training.stage3d import Trainer3D



def fill(target, values):
    """Sets every recorded value into the preset's config (fields added since stay as they are)."""
    for key, value in values.items():
        if isinstance(value, dict) and key in target and hasattr(target[key], "keys"):
            fill(target[key], value)
        else:
            target[key] = value


def main(source, workdir, input_size):
    recorded = json.load(open(f"{source}/config.json"))
    config = train3d.get_config(recorded["preset"])
    fill(config, recorded)
    config.model.design = "pooled"
    config.model.input_size = int(input_size)
    start = time.time()
    Trainer3D(config, workdir).run()
    print(json.dumps({"workdir": workdir, "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
