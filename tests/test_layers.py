"""The package's layer rules (pyproject.toml [tool.importlinter]) hold, and they do catch a
forbidden import: run on a copy of the package with one bad import added."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")


def _lint(root):
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_layer_contracts():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def _copy(tmp_path):
    for name in ("brats_tf", "data_prep"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize("module, bad_import, contract", [
    ("brats_tf/evaluation/metrics.py", "import keras", "Evaluation is NumPy/SciPy only"),
    ("brats_tf/models/unet3d.py", "from brats_tf.io import nifti", "Models are pure Keras"),
    ("brats_tf/io/cases.py", "from brats_tf.training import loop", "Stages import only the stages below"),
    ("brats_tf/inference/ensemble.py", "from brats_tf import segment", "Stages import only the stages below"),
    ("brats_tf/records/reader.py", "from data_prep import build_records", "No library module imports"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, bad_import, contract):
    root = _copy(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{bad_import}  # added by the test\n")
    result = _lint(root)
    assert result.returncode != 0
    # The summary names each contract, then KEPT or BROKEN (long names wrap: whitespace folded).
    text = " ".join(result.stdout.split())
    assert re.search(re.escape(contract) + r"(?:(?! KEPT| BROKEN).)*? BROKEN", text), result.stdout[-3000:]


def test_evaluating_local_files_never_loads_tensorflow(tmp_path):
    """The one ignored import of the evaluation contract: io.files loads TensorFlow only for a URL."""
    script = ("import sys; from brats_tf.evaluation import evaluate; from brats_tf.io import files; "
              f"files.write_json({str(tmp_path / 'x.json')!r}, {{'a': 1}}); "
              f"assert files.read_json({str(tmp_path / 'x.json')!r}) == {{'a': 1}}; "
              f"assert files.listdir({str(tmp_path)!r}) == ['x.json']; "
              "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
