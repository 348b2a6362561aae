"""Cloud paths (issue 13, item 4): everything training reads and writes goes through
`io.files`, hence `tf.io.gfile` for a URL. Proven with TensorFlow's in-memory file system
(`ram://`), which lives in one process: the training runs in a fresh child process that
prints what it found as JSON."""

import json
import subprocess
import sys

import numpy as np
import pytest

from brats_tf.io import files as fs
from tests.conftest import REPO, write_brats2017_case

RAM = "ram://brats_tf_test"


def test_json_text_and_folders_round_trip_through_ram():
    fs.write_json(f"{RAM}/a/b/config.json", {"x": [1, 2]})
    fs.write_text(f"{RAM}/a/b/log.csv", "iteration,loss\n1,0.5\n")
    assert fs.read_json(f"{RAM}/a/b/config.json") == {"x": [1, 2]}
    assert fs.isdir(f"{RAM}/a/b") and fs.isfile(f"{RAM}/a/b/log.csv") and not fs.isfile(f"{RAM}/a/b")
    assert sorted(fs.listdir(f"{RAM}/a/b")) == ["config.json", "log.csv"]   # no temporary left behind
    fs.rename(f"{RAM}/a/b", f"{RAM}/a/c")
    assert fs.listdir(f"{RAM}/a") == ["c"] and fs.read_json(f"{RAM}/a/c/config.json") == {"x": [1, 2]}
    fs.remove_tree(f"{RAM}/a")
    assert not fs.exists(f"{RAM}/a")
    assert fs.read_json(f"{RAM}/missing.json", default=None) is None


def test_a_failing_write_to_a_url_leaves_nothing_and_names_the_file():
    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("writer crashed")
    with pytest.raises(RuntimeError):
        fs.atomic_write(f"{RAM}/f/model.keras", fail)
    assert fs.listdir(f"{RAM}/f") == []


def _train_in_ram_and_on_disk(data, local):
    """Child process: records built in ram:// and on disk, 2 iterations of a small 2D model
    with work dir in ram://, the same on disk; prints the ram:// files and the largest weight
    difference."""
    import keras
    import tensorflow as tf
    from brats_tf.configs import train2d
    from brats_tf.records.writer import build_records
    from brats_tf.training.registry import trainer_class
    build_records(data, f"{local}/records", verbose=False)
    build_records(data, f"{RAM}/records", verbose=False)
    record_files = sorted(name for _, _, names in tf.io.gfile.walk(f"{RAM}/records") for name in names)

    def train(records, workdir):
        config = train2d.get_config("small")
        config.data.records_dir, config.model.kind = records, "model1"
        config.train.iterations, config.train.checkpoint_every, config.train.val_every = 2, 1, 2
        config.deterministic = True
        return trainer_class(config.stage)(config, workdir).run()
    results = {"ram": train(f"{RAM}/records", f"{RAM}/work"), "disk": train(f"{local}/records", f"{local}/work")}
    again = train(f"{RAM}/records", f"{RAM}/work")   # finished: reused, not retrained
    files = sorted(f"{folder[len(RAM) + 6:]}/{name}".lstrip("/")
                   for folder, _, names in tf.io.gfile.walk(f"{RAM}/work") for name in names)
    ram_model = keras.models.load_model(f"{RAM}/work/model.keras")
    disk_model = keras.models.load_model(f"{local}/work/model.keras")
    difference = max(float(np.abs(a - b).max()) for a, b in zip(ram_model.weights, disk_model.weights))
    print(json.dumps({"files": files, "record_files": record_files, "difference": difference, "reused": bool(again.get("reused")),
                      "validation": sorted(results["ram"]["validation"]), "iterations": results["ram"]["iterations"],
                      "disk_has_ram": any("ram:" in p for p in _walk(local))}))


def _walk(folder):
    import os
    return [os.path.join(d, n) for d, dirs, names in os.walk(folder) for n in names + dirs]


@pytest.mark.slow
def test_two_iterations_with_records_and_work_dir_in_ram_match_the_same_run_on_disk(tmp_path):
    data = tmp_path / "data"
    for i in range(4):
        write_brats2017_case(data, f"Case_{i}", shape=(24, 26, 20), seed=i)
    result = subprocess.run([sys.executable, __file__, "ram", str(data), str(tmp_path)], capture_output=True,
                            text=True, timeout=600, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    files = report["files"]
    for expected in ("config.json", "split.json", "train_log.csv", "model.keras", "model_info.json",
                     "checkpoints/ckpt-00000002/state.json", "checkpoints/ckpt-00000002/model_weights.npz"):
        assert expected in files, files
    assert any(f.startswith("tensorboard/") for f in files), files
    assert not any(f.split("/")[-1].startswith(".") for f in files), files   # no temporaries, no lock file
    assert report["iterations"] == 2 and report["reused"] and report["validation"]
    assert report["difference"] == 0.0, report   # the same deterministic run, wherever it is stored
    assert "manifest.json" in report["record_files"] and len(report["record_files"]) == 4 + 3, report
    assert not report["disk_has_ram"]   # no ram:// path was taken for a local folder name


if __name__ == "__main__" and sys.argv[1:2] == ["ram"]:
    _train_in_ram_and_on_disk(*sys.argv[2:4])
